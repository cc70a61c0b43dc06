"""Pooled keep-alive HTTP to providers (aiohttp), with explicit timeouts.

``first_byte`` bounds the wait for the response headers, ``idle`` the silence between two
reads of the body, ``connect`` the TCP/TLS set-up and ``total`` the whole exchange.
"""

from __future__ import annotations

import asyncio

import aiohttp

from core.config import Timeouts
from core.errors import UpstreamError, UpstreamTimeout

# A provider's answer is read into memory whole (streams are relayed, not read here): bounded so
# a broken or hostile upstream cannot exhaust the process. Error bodies are only ever excerpted.
MAX_BODY_BYTES = 256 * 1024 * 1024
MAX_ERROR_BODY_BYTES = 1024 * 1024


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
        """The whole body, at most ``MAX_BODY_BYTES`` (``MAX_ERROR_BODY_BYTES`` for an error
        status, whose excess is dropped); a larger success body is a 502."""
        limit = MAX_ERROR_BODY_BYTES if resp.status >= 400 else MAX_BODY_BYTES
        try:
            if resp.content_length is not None and resp.content_length <= limit:
                return await resp.read()
            parts: list[bytes] = []
            size = 0
            async for chunk in resp.content.iter_any():
                size += len(chunk)
                if size > limit:
                    if resp.status >= 400:
                        parts.append(chunk[: len(chunk) - (size - limit)])
                        break
                    raise UpstreamError(
                        f"Provider {provider} sent a response larger than {limit // (1024 * 1024)} MiB.",
                        code="upstream_response_too_large",
                    )
                parts.append(chunk)
            return b"".join(parts)
        except TimeoutError:
            raise UpstreamTimeout(f"Provider {provider} stalled while sending its response.") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"Provider {provider} broke off its response: {type(exc).__name__}.", code="upstream_disconnected"
            ) from None
        finally:
            resp.release()
