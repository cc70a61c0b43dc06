"""Pooled keep-alive HTTP to providers (core/h1.py; aiohttp on request), with explicit timeouts.

``first_byte`` bounds the wait for the response headers, ``idle`` the silence between two
reads of the body, ``connect`` the TCP/TLS set-up and ``total`` the whole exchange.
"""

from __future__ import annotations

import asyncio
import os

import aiohttp

from core.config import Timeouts
from core.errors import UpstreamError, UpstreamTimeout
from core.h1 import H1Client, H1Error

# The upstream HTTP client: ``h1`` (core/h1.py, the default) or ``aiohttp``. The evaluation
# behind the choice is in loadtest/results/eval-server-client.md.
CLIENT_ENV = "GATEWAY_UPSTREAM_CLIENT"


class _Expiry:
    __slots__ = ("cancelling", "fired", "task")

    def __init__(self, task: asyncio.Task, cancelling: int) -> None:
        self.task = task
        self.cancelling = cancelling
        self.fired = False

    def fire(self) -> None:
        self.fired = True
        self.task.cancel()


# A provider's answer is read into memory whole (streams are relayed, not read here): bounded so
# a broken or hostile upstream cannot exhaust the process. Error bodies are only ever excerpted.
MAX_BODY_BYTES = 256 * 1024 * 1024
MAX_ERROR_BODY_BYTES = 1024 * 1024


class Upstream:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._h1: H1Client | None = None
        self._encoded: dict[int, tuple[dict, bytes]] = {}  # id(headers) -> (them, encoded)
        # id(config timeouts) -> (them, aiohttp's object): built once, not per request
        self._timeouts: dict[int, tuple[Timeouts, aiohttp.ClientTimeout]] = {}

    async def start(self) -> None:
        if os.environ.get(CLIENT_ENV, "h1") != "aiohttp":
            self._h1 = H1Client()
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
        if self._h1 is not None:
            await self._h1.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(
        self, url: str, body: bytes, headers: dict[str, str], timeouts: Timeouts, provider: str
    ) -> aiohttp.ClientResponse:
        """Sends the request and returns once the response headers are in."""
        assert self._session is not None, "Upstream.start() was not awaited"
        found = self._timeouts.get(id(timeouts))
        if found is None or found[0] is not timeouts:
            found = self._timeouts[id(timeouts)] = (
                timeouts,
                aiohttp.ClientTimeout(total=timeouts.total, sock_connect=timeouts.connect, sock_read=timeouts.idle),
            )
        timeout = found[1]
        # The first-byte bound: one timer handle that cancels this task (what asyncio.timeout
        # does, without its context manager and rescheduling: ~10 µs a request less).
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        expiry = _Expiry(task, task.cancelling())
        timer = loop.call_at(loop.time() + timeouts.first_byte, expiry.fire)
        try:
            if self._h1 is not None:
                return await self._h1.post(
                    url, body, self._encode(headers), timeouts.connect, timeouts.idle, timeouts.total
                )
            return await self._session.post(url, data=body, headers=headers, timeout=timeout)
        except H1Error as exc:
            if exc.connect:
                raise UpstreamError(
                    f"Could not connect to provider {provider}: {exc.strerror or exc}.", code="upstream_connect_error"
                ) from None
            raise UpstreamError(
                f"Connection to provider {provider} failed: {type(exc).__name__}.", code="upstream_connect_error"
            ) from None
        except asyncio.CancelledError:
            if expiry.fired and task.uncancel() <= expiry.cancelling:
                raise UpstreamTimeout(f"Provider {provider} did not answer within {timeouts.first_byte:g} s.") from None
            raise
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
        finally:
            timer.cancel()

    def _encode(self, headers: dict[str, str]) -> bytes:
        """``Name: value\\r\\n`` lines; adapters that keep their header dicts get them encoded once."""
        found = self._encoded.get(id(headers))
        if found is not None and found[0] is headers:
            return found[1]
        for k, v in headers.items():
            if "\r" in k or "\n" in k or "\r" in v or "\n" in v:
                raise UpstreamError(f"A header for the provider ({k[:40]!r}) contains a line break.")
        encoded = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")
        if len(self._encoded) > 4096:
            self._encoded.clear()
        self._encoded[id(headers)] = (headers, encoded)
        return encoded

    async def read(self, resp: aiohttp.ClientResponse, provider: str) -> bytes:
        """The whole body, at most ``MAX_BODY_BYTES`` (``MAX_ERROR_BODY_BYTES`` for an error
        status, whose excess is dropped); a larger success body is a 502."""
        limit = MAX_ERROR_BODY_BYTES if resp.status >= 400 else MAX_BODY_BYTES
        try:
            # (h1's Response: streamed below). Content-Length counts the encoded bytes: a gzip
            # body is decompressed by aiohttp's read() past any cap, so it is streamed and counted.
            length = getattr(resp, "content_length", None)
            if length is not None and length <= limit and "content-encoding" not in resp.headers:
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
