"""A server on a Unix socket removes only the socket's file it bound itself (rev6).

``gateway.serving.serve`` removes its socket's file on the way out (hitl, s36). It removed
whatever socket was at the path: a second gateway started by mistake on the path a running one
serves, whose start then failed (PostgreSQL away, a bad setting: its lifespan refused before
it bound anything), deleted the running gateway's socket on its way out; the running one went on
listening on a file nobody could reach. A supervisor of several workers removed a live socket
before binding, taking the path over from the gateway serving on it.

Real uvicorn servers and real sockets in this process; the other gateway is a socket listening at
the path (``listen``), the failed start a lifespan that fails.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

import pytest
import uvicorn

from gateway import serving


async def _refusing(scope, receive, send):
    """An application whose start fails, as the gateway's when PostgreSQL cannot be reached."""
    assert scope["type"] == "lifespan"
    await receive()
    await send({"type": "lifespan.startup.failed", "message": "PostgreSQL unreachable"})


@pytest.fixture()
def live():
    folder = tempfile.mkdtemp(prefix="rev6uds-", dir="/tmp")  # (a socket's path is short: 108 bytes)
    path = os.path.join(folder, "gw.sock")
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(path)
    other.listen()  # (another gateway, serving on the path)
    yield path
    other.close()
    shutil.rmtree(folder, ignore_errors=True)


def _reachable(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def test_a_server_that_failed_to_start_leaves_the_socket_another_serves_on(live):
    config = uvicorn.Config(_refusing, uds=live, lifespan="on", log_level="critical")
    try:
        code = serving.serve(config)
    except SystemExit as exc:  # (uvicorn leaves a failed start this way)
        code = exc.code
    assert code not in (0, None)
    assert os.path.exists(live) and _reachable(live)


def test_a_supervisor_of_workers_leaves_a_socket_another_serves_on(live):
    """Several workers asked for on a path a server listens on: the bind fails (address in use),
    the other's socket stays."""
    config = uvicorn.Config(_refusing, uds=live, lifespan="on", log_level="critical", workers=2)
    with pytest.raises(SystemExit):
        serving.serve(config)
    assert os.path.exists(live) and _reachable(live)
