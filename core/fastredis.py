"""A small pipelined Redis client for the two calls on the request path (admit, settle).

redis-py's asyncio client spends ~150 µs of Python per command here (connection pool, retry
wrappers, the parser); at a few thousand requests per second that is most of a core. This
client keeps one connection, writes every caller's command into it as it comes (one system
call per event-loop turn), and hands replies back in order (RESP is ordered), parsed by
hiredis. Everything else (pub/sub, streams, the admin API) keeps using redis-py.
``rediss://`` URLs connect over TLS (verified, unless ``ssl_cert_reqs=none``, as redis-py reads them).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from urllib.parse import parse_qs, unquote, urlparse

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


def pack(args: tuple) -> bytes:
    """RESP-encodes a command (hiredis, in C; by hand for what it does not take)."""
    try:
        return hiredis.pack_command(args)
    except TypeError:
        return _pack(args)


def _pack(args: tuple) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, bytes):
            b = a
        elif isinstance(a, str):
            b = a.encode()
        else:
            b = str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class _Expired(Exception):
    """A reply that did not come within the client's timeout."""


def _tls(u) -> ssl.SSLContext | None:
    """TLS for ``rediss://`` URLs, with redis-py's ``ssl_cert_reqs`` and ``ssl_ca_certs``."""
    if u.scheme != "rediss":
        return None
    query = parse_qs(u.query)
    context = ssl.create_default_context(cafile=query.get("ssl_ca_certs", [None])[0])
    if query.get("ssl_cert_reqs", ["required"])[0].lower() in ("none", "cert_none"):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _retrieved(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(_Expired())


class _Protocol(asyncio.Protocol):
    """One connection and what rides it: the commands not yet written and the callers waiting
    for a reply, in order. Both die with the connection, so a reply is only ever matched to a
    command sent on the same connection."""

    def __init__(self, client: PipelinedRedis) -> None:
        self.client = client
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        self.waiting: collections.deque[asyncio.Future] = collections.deque()
        self.buffer: list[bytes] = []
        self.flush_scheduled = False
        self.lost = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, packed: list[bytes], now: bool) -> list[asyncio.Future]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in packed]
        if self.lost:  # (never published once lost; a caller holding it gets told at once)
            for fut in futures:
                fut.set_exception(RedisConnectionError("Redis connection lost"))
            return futures
        self.waiting.extend(futures)
        self.buffer.extend(packed)
        if now:
            self.flush()
        elif not self.flush_scheduled:
            self.flush_scheduled = True
            loop.call_soon(self.flush)
        return futures

    def send_one(self, packed: bytes, now: bool) -> asyncio.Future:
        """``send`` of one command, without the lists (the request path's call)."""
        if self.lost:
            return self.send([packed], now)[0]
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.waiting.append(fut)
        self.buffer.append(packed)
        if now:
            self.flush()
        elif not self.flush_scheduled:
            self.flush_scheduled = True
            loop.call_soon(self.flush)
        return fut

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.buffer and not self.lost and self.transport is not None:
            data, self.buffer = b"".join(self.buffer), []
            self.transport.write(data)

    def abort(self) -> None:
        """Its replies can no longer be matched to callers (one timed out): drop it now, and
        what waits on it with it."""
        self.client._forget(self)
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting = self.waiting
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            if not waiting:  # a reply nobody asked for on this connection: it cannot be trusted
                self.abort()
                return
            fut = waiting.popleft()
            if fut.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                message = str(reply)
                fut.set_exception(NoScriptError(message) if message.startswith("NOSCRIPT") else ResponseError(message))
            else:
                fut.set_result(reply)

    def connection_lost(self, exc) -> None:
        self.lost = True
        self.client._forget(self)
        self.buffer = []  # never sent: these commands did not run, and never will
        waiting, self.waiting = self.waiting, collections.deque()
        for fut in waiting:
            if not fut.done():
                fut.set_exception(RedisConnectionError(f"Redis connection lost: {exc}"))


class PipelinedRedis:
    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self._url = urlparse(url)
        self._timeout = timeout
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Task | None = None

    async def _connect(self) -> _Protocol:
        """The connection, opened once for all the callers that need it meanwhile (they share
        the attempt and its outcome), within the client's timeout: a host that drops packets
        would otherwise hold every caller for the system's minutes of connect retries."""
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._open())
            self._connecting.add_done_callback(_retrieved)  # (no warning when every caller left)
        return await asyncio.shield(self._connecting)

    async def _open(self) -> _Protocol:
        if self._proto is not None:
            return self._proto
        loop = asyncio.get_running_loop()
        u = self._url
        try:
            async with asyncio.timeout(self._timeout):
                if u.scheme == "unix":
                    _, proto = await loop.create_unix_connection(lambda: _Protocol(self), unquote(u.path))
                else:
                    _, proto = await loop.create_connection(
                        lambda: _Protocol(self), u.hostname or "localhost", u.port or 6379, ssl=_tls(u)
                    )
        except TimeoutError:
            raise RedisTimeoutError("cannot connect to Redis: no answer in time") from None
        except OSError as exc:
            raise RedisConnectionError(f"cannot connect to Redis: {exc}") from None
        setup = []
        if u.password:
            setup.append(
                ("AUTH", *((unquote(u.username), unquote(u.password)) if u.username else (unquote(u.password),)))
            )
        # redis://host/3 or unix:///path/valkey.sock?db=3, as redis-py reads them
        db = parse_qs(u.query).get("db", [""])[0] if u.scheme == "unix" else (u.path or "/0").lstrip("/")
        if db and db != "0":
            setup.append(("SELECT", db))
        # The setup goes first and alone: the connection is nobody else's before it is done.
        try:
            if setup:
                futures = proto.send([pack(cmd) for cmd in setup], now=True)
                await self._wait(proto, futures, None)
                for fut in futures:
                    fut.result()  # AUTH or SELECT refused: raised
        except BaseException:
            proto.abort()
            raise
        if proto.lost:
            raise RedisConnectionError("Redis connection lost")
        self._proto = proto
        return proto

    def _forget(self, proto: _Protocol) -> None:
        if self._proto is proto:
            self._proto = None

    async def _wait(self, proto: _Protocol, futures: list[asyncio.Future], limit_s: float | None) -> None:
        """Waits for the last of ``futures`` (replies come in order: then all are in), under one
        timer; on expiry the connection is dropped, since its later replies would go to the wrong
        callers. An error reply is left in its future."""
        loop = asyncio.get_running_loop()
        last = futures[-1]
        # One timer handle per call (asyncio.timeout's context manager, task lookup and
        # rescheduling cost ~10 µs a call here); on expiry the future fails, not the task.
        timer = loop.call_at(loop.time() + (limit_s or self._timeout), _expire, last)
        try:
            await last
        except ResponseError:
            pass
        except BaseException as exc:  # timed out, cancelled, or the connection lost
            for fut in futures:  # replies still to come are skipped; those in are retrieved (no warning)
                if not fut.cancel() and not fut.cancelled():
                    fut.exception()
            if not isinstance(exc, _Expired):
                raise
            proto.abort()
            raise RedisTimeoutError("Redis did not answer in time") from None
        finally:
            timer.cancel()

    async def execute(self, *args, limit_s: float | None = None, now: bool = False):
        """Sends a command and waits for its reply. Commands issued in one turn of the loop go
        out in one write; ``now`` writes at once (with whatever waits in the buffer), so the
        command is on its way before the caller's next step."""
        proto = self._proto or await self._connect()
        fut = proto.send_one(pack(args), now)
        # (``_wait`` inlined: this is the request path's call, a coroutine less per command)
        loop = fut.get_loop()
        timer = loop.call_at(loop.time() + (limit_s or self._timeout), _expire, fut)
        try:
            return await fut
        except _Expired:
            proto.abort()  # its later replies would go to the wrong callers
            raise RedisTimeoutError("Redis did not answer in time") from None
        finally:
            timer.cancel()

    async def execute_many(self, commands: list[tuple], limit_s: float | None = None) -> list:
        """Sends the commands in one write and returns their replies in order, or raises the first
        error reply: one future per command, but a single timer and a single wait (replies come
        in order, so the last one in means all are), where ``execute`` per command costs a task
        and a timer each."""
        if not commands:
            return []
        proto = self._proto or await self._connect()
        futures = proto.send([pack(args) for args in commands], now=True)
        await self._wait(proto, futures, limit_s)
        errors = [f.exception() for f in futures]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        return [f.result() for f in futures]

    async def evalsha(self, sha: str, numkeys: int, *args, limit_s: float | None = None, now: bool = False):
        return await self.execute("EVALSHA", sha, numkeys, *args, limit_s=limit_s, now=now)

    async def run_script(self, script: str, sha: str, numkeys: int, *args, limit_s: float | None = None):
        """``script`` by its ``sha`` (EVALSHA); sent whole (EVAL, which loads it again) when the
        server has forgotten it (a restart)."""
        try:
            return await self.execute("EVALSHA", sha, numkeys, *args, limit_s=limit_s)
        except NoScriptError:
            return await self.execute("EVAL", script, numkeys, *args, limit_s=limit_s)

    async def script_load(self, script: str) -> str:
        sha = await self.execute("SCRIPT", "LOAD", script)
        return sha.decode() if isinstance(sha, bytes) else sha

    async def close(self) -> None:
        if self._proto is not None:
            self._proto.abort()
