"""Outbound HTTP for the channels: one lazily opened, pooled aiohttp session per client, and a
capped body read (an answer is never read past what the caller will accept).

The per-message POSTs (the agent turn to the gateway, sends and mark-as-read to the Graph API)
go through ``LeanPost`` instead: core/h1.py's keep-alive HTTP/1.1 client (httptools parser, one
write per request), which costs a fraction of aiohttp's ~50 µs of Python per request plus its
several socket writes — at hundreds of messages a second, a good share of the worker's core."""

from __future__ import annotations

import aiohttp
from multidict import CIMultiDict

from core.h1 import H1Client


class PooledSession:
    """A keep-alive session opened on first use (inside the running loop) and closed by ``close``."""

    def __init__(self, *, timeout: float, connections: int = 256) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=5)
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._connections, keepalive_timeout=60),
                timeout=self._timeout,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes:
    """The body, stopping after ``cap`` bytes (a longer body is cut there: the caller checks)."""
    chunks, size = [], 0
    async for chunk in resp.content.iter_chunked(65536):
        chunks.append(chunk)
        size += len(chunk)
        if size >= cap:
            break
    return b"".join(chunks)[:cap]


class LeanPost:
    """POSTs over core/h1.py, with the connect timeout, an overall timeout (also the longest
    silence), and the answer read up to ``cap`` bytes (a longer one is cut there, its connection
    closed: the caller checks the length). Raises ``core.h1.H1Error`` (an aiohttp client error;
    ``connect`` True when the request never left) or ``TimeoutError``."""

    def __init__(self, *, timeout: float, connect_timeout: float = 5.0) -> None:
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._h1: H1Client | None = None

    async def post(
        self, url: str, body: bytes, headers: bytes, cap: int, resend: bool = True
    ) -> tuple[int, CIMultiDict, bytes]:
        """``headers``: pre-encoded ``Name: value\\r\\n`` lines (Host and Content-Length are added).
        ``resend=False`` for a request that must not be sent twice (core/h1.py ``post``)."""
        if self._h1 is None:
            self._h1 = H1Client()
        resp = await self._h1.post(url, body, headers, self._connect_timeout, self._timeout, self._timeout, resend)
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in resp.content.iter_any():
                chunks.append(chunk)
                size += len(chunk)
                if size >= cap:
                    break
        finally:
            resp.release()  # back to the pool when read to the end, else closed
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return resp.status, resp.headers, raw[:cap]

    async def close(self) -> None:
        if self._h1 is not None:
            await self._h1.close()
            self._h1 = None


def header_lines(headers: dict[str, str]) -> bytes:
    """``Name: value\\r\\n`` lines; a value with a control character is refused (it would
    split the request)."""
    out = []
    for name, value in headers.items():
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise ValueError(f"the {name} header has a control character")
        out.append(f"{name}: {value}\r\n")
    return "".join(out).encode("latin-1")
