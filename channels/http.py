"""Outbound HTTP for the channels: one lazily opened, pooled aiohttp session per client, and a
capped body read (an answer is never read past what the caller will accept)."""

from __future__ import annotations

import aiohttp


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
