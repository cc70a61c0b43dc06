"""``gateway serve``'s server: uvicorn's, with one step added to its shutdown.

uvicorn stops listening first, then waits for the open connections, then runs the lifespan's
shutdown. The WhatsApp channel's turns call the gateway over HTTP (the process's own address):
stopped in the lifespan's shutdown, a turn in flight then found no gateway to call, and each
shutdown used up one of its retries (with one replica, the customer's message could go to the
dead letters and the fallback message out instead of the answer). Here the application drains
first (``GatewayApp.drain``: no new job is taken, the turns in flight finish, or go back to their
queue unchanged), while the socket still listens; the drain's time counts against
``timeout_graceful_shutdown`` (the bound of the whole shutdown), uvicorn's steps get the rest.

With several workers uvicorn's supervisor builds each worker's server itself (in the worker
process, ``uvicorn.supervisors.multiprocess.Process.server``): ``serve`` hands it a ``Process``
whose server is this one.

Served on a Unix socket (``uds``), the socket's file is removed on the way out, as
``uvicorn.run`` does (a clean stop, or one by a signal): a file left behind is a socket nobody
listens on. One found at the start is replaced: a lone server's event loop does that itself when
it creates the socket (asyncio's and uvloop's ``create_unix_server``); the supervisor of several
workers binds the socket itself, so the stale file is removed first (only a socket, as they do).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat

import uvicorn
from uvicorn.supervisors import multiprocess

log = logging.getLogger("gateway")


def _drain_of(app):
    """The application's ``drain`` (through any middleware uvicorn wrapped it in), or None."""
    for _ in range(4):
        drain = getattr(app, "drain", None)
        if drain is not None:
            return drain
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


class DrainingServer(uvicorn.Server):
    bound: tuple[int, int] | None = None  # the Unix socket's file this server created

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if sockets is None and self.config.uds:
            self.bound = _identity(self.config.uds)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        drain = _drain_of(getattr(self.config, "loaded_app", None))
        bound = float(self.config.timeout_graceful_shutdown or 0)
        if drain is not None and not self.force_exit:
            loop = asyncio.get_running_loop()
            began = loop.time()
            log.info("draining before the server stops listening (at most %.0f s)", bound)
            try:
                async with asyncio.timeout(bound or None):
                    await drain(bound or None)
            except Exception as exc:  # (a drain that fails or overruns: the shutdown goes on)
                log.warning("drain before shutdown: %s", type(exc).__name__)
            if bound:
                self.config.timeout_graceful_shutdown = max(1.0, bound - (loop.time() - began))
        await super().shutdown(sockets)


class DrainingProcess(multiprocess.Process):
    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = DrainingServer(config=self.config)
        return self._server


def _identity(path: str | None) -> tuple[int, int] | None:
    """The socket's file at ``path`` (device, inode), None when there is none."""
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None


def _remove_socket(path: str | None, ours: tuple[int, int] | None) -> None:
    """The Unix socket's file at ``path`` removed when it is the one this server bound (``ours``):
    one that did not start, or not yet, leaves another's (a gateway still serving on that path),
    and anything else there, alone."""
    if ours is not None and _identity(path) == ours:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _remove_stale(path: str | None) -> None:
    """A socket's file at ``path`` nobody listens on removed before it is bound again (one a
    server is listening on is left: the bind then fails, address in use)."""
    if _identity(path) is None:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    except OSError:
        pass
    finally:
        probe.close()


def serve(config: uvicorn.Config) -> int:
    """Runs ``config`` as ``uvicorn.run`` does (one process, or a supervisor of ``workers``),
    each server a ``DrainingServer``. 0, or 3 when a single server did not start."""
    ours: tuple[int, int] | None = None
    server: DrainingServer | None = None
    try:
        if config.workers > 1:
            _remove_stale(config.uds)  # (a stale one: binding it would fail, address in use)
            sock = config.bind_socket()
            ours = _identity(config.uds)
            with contextlib.ExitStack() as undo:  # (the supervisor builds its Process by this name)
                undo.callback(setattr, multiprocess, "Process", multiprocess.Process)
                multiprocess.Process = DrainingProcess
                multiprocess.Multiprocess(config, sockets=[sock]).run()
            return 0
        server = DrainingServer(config=config)
        with contextlib.suppress(KeyboardInterrupt):
            server.run()
        return 0 if server.started else 3
    finally:  # (also when the server stopped by a signal leaves by ``SystemExit``: ``gateway serve``)
        _remove_socket(config.uds, ours if server is None else server.bound)
