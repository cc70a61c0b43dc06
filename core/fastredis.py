"""A small pipelined Redis client for the two calls on the request path (admit, settle).

redis-py's asyncio client spends ~150 µs of Python per command here (connection pool, retry
wrappers, the parser); at a few thousand requests per second that is most of a core. This
client keeps one connection, writes every caller's command into it as it comes (one system
call per event-loop turn), and hands replies back in order (RESP is ordered), parsed by
hiredis. Everything else (pub/sub, streams, the admin API) keeps using redis-py.
"""

from __future__ import annotations

import asyncio
import collections
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


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(_Expired())


class _Protocol(asyncio.Protocol):
    def __init__(self, client: PipelinedRedis) -> None:
        self.client = client
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting = self.client._waiting
        while True:
            reply = self.reader.gets()
            if reply is False:
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
        self.client._lost(exc)


class PipelinedRedis:
    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self._url = urlparse(url)
        self._timeout = timeout
        self._proto: _Protocol | None = None
        self._waiting: collections.deque[asyncio.Future] = collections.deque()
        self._buffer: list[bytes] = []
        self._flush_scheduled = False
        self._connecting: asyncio.Lock | None = None

    async def _connect(self) -> None:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._proto is not None:
                return
            loop = asyncio.get_running_loop()
            u = self._url
            try:
                if u.scheme == "unix":
                    _, proto = await loop.create_unix_connection(lambda: _Protocol(self), unquote(u.path))
                else:
                    _, proto = await loop.create_connection(
                        lambda: _Protocol(self), u.hostname or "localhost", u.port or 6379
                    )
            except OSError as exc:
                raise RedisConnectionError(f"cannot connect to Redis: {exc}") from None
            self._proto = proto
            setup = []
            if u.password:
                setup.append(
                    ("AUTH", *((unquote(u.username), unquote(u.password)) if u.username else (unquote(u.password),)))
                )
            # redis://host/3 or unix:///path/valkey.sock?db=3, as redis-py reads them
            db = parse_qs(u.query).get("db", [""])[0] if u.scheme == "unix" else (u.path or "/0").lstrip("/")
            if db and db != "0":
                setup.append(("SELECT", db))
            for cmd in setup:
                await self.execute(*cmd)

    def _lost(self, exc) -> None:
        self._proto = None
        waiting, self._waiting = self._waiting, collections.deque()
        for fut in waiting:
            if not fut.done():
                fut.set_exception(RedisConnectionError(f"Redis connection lost: {exc}"))

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._buffer and self._proto is not None and self._proto.transport is not None:
            data, self._buffer = b"".join(self._buffer), []
            self._proto.transport.write(data)

    async def execute(self, *args, limit_s: float | None = None, now: bool = False):
        """Sends a command and waits for its reply. Commands issued in one turn of the loop go
        out in one write; ``now`` writes at once (with whatever waits in the buffer), so the
        command is on its way before the caller's next step."""
        if self._proto is None:
            await self._connect()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._waiting.append(fut)
        self._buffer.append(pack(args))
        if now:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        # One timer handle per call (asyncio.timeout's context manager, task lookup and
        # rescheduling cost ~10 µs a call here); on expiry the future fails, not the task.
        timer = loop.call_at(loop.time() + (limit_s or self._timeout), _expire, fut)
        try:
            return await fut
        except _Expired:
            # The connection's replies can no longer be matched to callers: start afresh.
            if self._proto is not None and self._proto.transport is not None:
                self._proto.transport.close()
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
        if self._proto is None:
            await self._connect()
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        self._waiting.extend(futures)
        self._buffer.extend(pack(args) for args in commands)
        self._flush()
        timer = loop.call_at(loop.time() + (limit_s or self._timeout), _expire, futures[-1])
        try:
            await futures[-1]
        except ResponseError:
            pass  # raised below: the first error reply, whichever command it answered
        except BaseException as exc:  # timed out, cancelled, or the connection lost
            for fut in futures:  # replies still to come are skipped; those in are retrieved (no warning)
                if not fut.cancel() and not fut.cancelled():
                    fut.exception()
            if not isinstance(exc, _Expired):
                raise
            # The connection's replies can no longer be matched to callers: start afresh.
            if self._proto is not None and self._proto.transport is not None:
                self._proto.transport.close()
            raise RedisTimeoutError("Redis did not answer in time") from None
        finally:
            timer.cancel()
        errors = [f.exception() for f in futures]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        return [f.result() for f in futures]

    async def evalsha(self, sha: str, numkeys: int, *args, limit_s: float | None = None, now: bool = False):
        return await self.execute("EVALSHA", sha, numkeys, *args, limit_s=limit_s, now=now)

    async def script_load(self, script: str) -> str:
        sha = await self.execute("SCRIPT", "LOAD", script)
        return sha.decode() if isinstance(sha, bytes) else sha

    async def close(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
        self._proto = None
