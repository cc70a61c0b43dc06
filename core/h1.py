"""A lean HTTP/1.1 client for the upstream hot path: keep-alive pool, httptools parser.

aiohttp's ``ClientSession._request`` costs ~50 µs of Python per call here (tracing hooks,
cookie jar, auto headers, payload registry, timer handles), a fifth of the gateway's whole
CPU per request. A provider call needs none of that: POST a body with fixed headers on a
pooled connection and read the answer, whole or as it comes. This client does exactly that,
with the parser in C (httptools, uvicorn's), TLS through the event loop, back-pressure
(reading pauses while 256 KiB wait unread) and the timeouts ``core.upstream`` asks for.

Failures raise ``H1Error`` (a connection that broke or never came) or ``TimeoutError``; a
request written on a reused connection that the server had already closed (no byte of an
answer came back) is sent again once on a new connection, as browsers and aiohttp do.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from urllib.parse import urlsplit

import aiohttp
import httptools
from multidict import CIMultiDict

_HIGH_WATER = 256 * 1024
# A response's head (status line and headers) is bounded: a provider (or whatever answers at
# its address) cannot make the gateway hold headers without end.
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 256
_MAX_IDLE_S = 30.0  # a pooled connection unused for longer is closed, not reused
# A request that must not be sent twice (``resend=False``) reuses only a connection this fresh:
# under the shortest keep-alive servers commonly use (5 s), so the server closing an idle
# connection as the request goes out — which then fails rather than being sent again — is rare.
_MAX_IDLE_ONCE_S = 4.0


class H1Error(aiohttp.ClientConnectionError):
    """The connection failed, or broke before the answer was complete (an aiohttp client
    error, so code that handles the other client's failures handles these too)."""

    def __init__(self, message: str, connect: bool = False, strerror: str | None = None) -> None:
        super().__init__(message)
        self.connect = connect
        self.strerror = strerror


class _Target:
    __slots__ = ("host", "host_header", "key", "path", "port", "ssl")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"unsupported URL scheme {parts.scheme!r}")
        self.host = parts.hostname or ""
        tls = parts.scheme == "https"
        self.port = parts.port or (443 if tls else 80)
        self.ssl = tls
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.key = (self.host, self.port, tls)
        default = self.port == (443 if tls else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal
        self.host_header = (host if default else f"{host}:{self.port}").encode("idna")


class Response:
    """What the adapters read: ``status``, ``headers``, ``read()``, ``content.iter_any()``,
    ``release()`` (the shape of aiohttp's, so the adapters need not know which client ran)."""

    __slots__ = ("_conn", "content", "headers", "status")

    def __init__(self, conn: _Conn, status: int, headers: CIMultiDict) -> None:
        self._conn = conn
        self.status = status
        self.headers = headers
        self.content = self

    async def read(self) -> bytes:
        conn = self._conn
        while not conn.complete:
            await conn.wait()
        data = b"".join(conn.chunks)
        conn.chunks.clear()
        conn.buffered = 0
        self.release()
        return data

    async def iter_any(self):
        conn = self._conn
        while True:
            if conn.chunks:
                data = b"".join(conn.chunks) if len(conn.chunks) > 1 else conn.chunks[0]
                conn.chunks.clear()
                conn.buffered = 0
                conn.resume()
                yield data
                continue
            if conn.complete:
                return
            await conn.wait()

    def release(self) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.done()


class _Conn(asyncio.Protocol):
    def __init__(self, pool: H1Client, key: tuple) -> None:
        self.pool = pool
        self.key = key
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.headers: CIMultiDict | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.headers_done = False
        self.received = False  # any byte of the current answer
        self.head_bytes = 0  # bytes received before the headers were complete, or since the body last moved
        self.error: BaseException | None = None
        self.closed = False
        self.paused = False
        self.waiter: asyncio.Future | None = None
        self.idle = 60.0
        self.deadline = 0.0  # loop time by which the whole exchange must be over
        self.keep_alive = True
        self.idle_since = 0.0

    # ---- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received = True
        body = self.buffered
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            inner = exc.__cause__ or exc.__context__  # a bound of ours, raised in a parser callback
            self._fail(inner if isinstance(inner, H1Error) else H1Error(f"malformed HTTP response: {exc}"))
            self.transport.close()
            return
        if self.headers_done and self.buffered > body:
            self.head_bytes = 0  # the body moves (chunk framing between its pieces is no head)
        elif not self.complete:  # the head, or bytes with no body in them: trailers, chunk extensions
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self._fail(H1Error(f"response headers longer than {MAX_HEAD_BYTES} bytes"))
                self.transport.close()

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.headers_done and not self.complete and exc is None and self._until_close():
            self.complete = True  # a body delimited by the end of the connection
            self.keep_alive = False
            self._wake()
        if not self.complete:
            self._fail(H1Error(f"connection closed: {exc}" if exc else "server closed the connection"))
        self.pool._forget(self)

    def _until_close(self) -> bool:
        h = self.headers
        return "content-length" not in h and "chunked" not in h.get("transfer-encoding", "").lower()

    # ---- httptools callbacks ---------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.headers = CIMultiDict()

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= MAX_HEADERS:
            raise H1Error(f"more than {MAX_HEADERS} response headers")  # the parser fails the response
        self.headers.add(name.decode("latin-1"), value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        self.headers_done = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and not self.closed:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # ---- waiting ---------------------------------------------------------------------------
    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        w = self.waiter
        if w is not None and not w.done():
            w.set_exception(exc)

    async def wait(self, limit: float | None = None) -> None:
        """Until the parser has news; ``TimeoutError`` after ``limit`` (default: idle) of silence."""
        if self.error is not None:
            raise self.error
        now = self.loop.time()
        if now >= self.deadline:
            raise TimeoutError
        self.waiter = w = self.loop.create_future()
        timer = self.loop.call_at(min(now + (limit or self.idle), self.deadline), _expire, w)
        try:
            await w
        finally:
            timer.cancel()
            self.waiter = None

    def resume(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    # ---- a request -------------------------------------------------------------------------
    def reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.headers = None
        self.chunks.clear()
        self.buffered = 0
        self.complete = False
        self.headers_done = False
        self.received = False
        self.error = None
        self.head_bytes = 0

    def done(self) -> None:
        """The answer was read (or abandoned): back to the pool when reusable, else closed."""
        if self.complete and self.keep_alive and not self.closed and self.error is None:
            self.resume()
            self.pool._put(self)
        elif self.transport is not None:
            self.closed = True
            self.transport.close()


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class H1Client:
    def __init__(self, max_idle_per_host: int = 256) -> None:
        self._idle: dict[tuple, list[_Conn]] = {}
        self._targets: dict[str, _Target] = {}
        self._max_idle = max_idle_per_host
        self._ssl: ssl.SSLContext | None = None
        self._all: set[_Conn] = set()

    def _target(self, url: str) -> _Target:
        t = self._targets.get(url)
        if t is None:
            if len(self._targets) > 1024:
                self._targets.clear()
            t = self._targets[url] = _Target(url)
        return t

    def _put(self, conn: _Conn) -> None:
        idle = self._idle.setdefault(conn.key, [])
        conn.idle_since = conn.loop.time()
        if len(idle) < self._max_idle:
            idle.append(conn)
        else:
            conn.closed = True
            conn.transport.close()

    def _forget(self, conn: _Conn) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    async def _connect(self, t: _Target, limit: float) -> _Conn:
        loop = asyncio.get_running_loop()
        ctx = None
        if t.ssl:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            ctx = self._ssl
        try:
            async with asyncio.timeout(limit):
                _, conn = await loop.create_connection(
                    lambda: _Conn(self, t.key), t.host, t.port, ssl=ctx, server_hostname=t.host if ctx else None
                )
        except TimeoutError:
            raise H1Error(f"connect to {t.host}:{t.port} timed out", connect=True, strerror="timed out") from None
        except OSError as exc:
            raise H1Error(
                f"cannot connect to {t.host}:{t.port}: {exc.strerror or exc}", connect=True, strerror=exc.strerror
            ) from None
        self._all.add(conn)
        return conn

    async def post(
        self,
        url: str,
        body: bytes,
        headers: bytes,
        connect_timeout: float,
        idle_timeout: float,
        total: float,
        resend: bool = True,
    ) -> Response:
        """Sends ``body`` with ``headers`` (pre-encoded ``Name: value\\r\\n`` lines) and returns
        once the status line and headers are in. ``resend=False``: a request that must not be
        sent twice (it may have been acted on although no byte of an answer came back) is not sent
        again when its reused connection breaks: the H1Error reaches the caller."""
        t = self._target(url)
        head = b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n%s\r\n" % (
            t.path.encode(),
            t.host_header,
            len(body),
            headers,
        )
        idle = self._idle.get(t.key)
        max_idle = _MAX_IDLE_S if resend else _MAX_IDLE_ONCE_S
        for _ in range(2):
            reused = False
            conn = None
            while idle:
                candidate = idle.pop()
                if candidate.closed:
                    continue
                if candidate.loop.time() - candidate.idle_since > max_idle:
                    # long idle: a peer or a middlebox may have dropped it without a word
                    candidate.closed = True
                    candidate.transport.close()
                    continue
                conn, reused = candidate, True
                break
            if conn is None:
                conn = await self._connect(t, connect_timeout)
            conn.reset()
            conn.idle = idle_timeout
            conn.deadline = conn.loop.time() + total
            conn.transport.write(head + body if len(body) < 16384 else head)
            if len(body) >= 16384:
                conn.transport.write(body)
            try:
                while not conn.headers_done:
                    await conn.wait()
            except H1Error:
                conn.done()
                if reused and not conn.received and resend:
                    continue  # the server had closed the idle connection: once more, anew
                raise
            except BaseException:
                conn.closed = True
                if conn.transport is not None:
                    conn.transport.close()
                raise
            return Response(conn, conn.parser.get_status_code(), conn.headers)
        raise H1Error("server closed the connection")  # pragma: no cover - the loop returns or raises

    async def close(self) -> None:
        for conn in list(self._all):
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()
        self._all.clear()
