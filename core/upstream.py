"""Pooled keep-alive HTTP to providers (aiohttp), with explicit timeouts.

``first_byte`` bounds the wait for the response headers, ``idle`` the silence between two
reads of the body, ``connect`` the TCP/TLS set-up and ``total`` the whole exchange.
"""

from __future__ import annotations

import asyncio

import aiohttp

from core.config import Timeouts
from core.errors import UpstreamError, UpstreamTimeout


class Upstream:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[Timeouts, aiohttp.ClientTimeout] = {}

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=0, keepalive_timeout=60, ttl_dns_cache=300, enable_cleanup_closed=True
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
            read_bufsize=2**16,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(
        self, url: str, body: bytes, headers: dict[str, str], timeouts: Timeouts, provider: str
    ) -> aiohttp.ClientResponse:
        """Sends the request and returns once the response headers are in."""
        assert self._session is not None, "Upstream.start() was not awaited"
        timeout = aiohttp.ClientTimeout(total=timeouts.total, sock_connect=timeouts.connect, sock_read=timeouts.idle)
        try:
            async with asyncio.timeout(timeouts.first_byte):
                return await self._session.post(url, data=body, headers=headers, timeout=timeout)
        except TimeoutError:
            raise UpstreamTimeout(f"Provider {provider} did not answer within {timeouts.first_byte:g} s.") from None
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamError(
                f"Could not connect to provider {provider}: {exc.strerror or exc}.", code="upstream_connect_error"
            ) from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"Connection to provider {provider} failed: {type(exc).__name__}.", code="upstream_connect_error"
            ) from None

    async def read(self, resp: aiohttp.ClientResponse, provider: str) -> bytes:
        try:
            return await resp.read()
        except TimeoutError:
            raise UpstreamTimeout(f"Provider {provider} stalled while sending its response.") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"Provider {provider} broke off its response: {type(exc).__name__}.", code="upstream_disconnected"
            ) from None
        finally:
            resp.release()
