"""The one door every provider adapter is reached through.

Whatever fails in an adapter (a provider's error body, a stream's error event, a connection
failure the HTTP client describes, a litellm exception) leaves it as a ``GatewayError``; here
its message is scrubbed of the provider's keys and hosts and of anything shaped like a key or
an address (``scrub.Scrubber``), and its ``param`` / ``code`` are kept only when plain, before
a client, a log line or the ledger sees them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import aiohttp

from core.config import Provider
from core.errors import GatewayError, UpstreamError
from core.types import RequestContext, Route
from gateway.providers.base import ProviderAdapter, bad_response
from gateway.providers.scrub import Scrubber, safe_field

log = logging.getLogger("gateway.providers")

# Failures the pipeline maps itself (a stream that stalls or breaks off after its first byte).
_TRANSPORT = (TimeoutError, aiohttp.ClientError)


def _unreadable(provider: str, exc: Exception, ctx: RequestContext) -> Exception:
    """An adapter tripped over an answer of a shape it did not expect (a block that is not an
    object, a field missing): the provider's answer is bad — a 502 the router may fall back
    from, never an unhandled error. Logged by type only (the answer may hold message content).
    A failure before the provider answered (building the request from the client's body) is
    no verdict on the provider: it is left as it is (it must not count towards a circuit)."""
    if ctx.upstream_headers is None:
        return exc
    log.warning(
        "provider answer could not be read", extra={"fields": {"provider": provider, "error": type(exc).__name__}}
    )
    return bad_response(provider, "an answer of an unexpected shape")


class GuardedAdapter:
    def __init__(self, inner: ProviderAdapter, cfg: Provider) -> None:
        self.name = inner.name
        self.inner = inner
        self._scrubber = Scrubber.for_provider(cfg.base_url, cfg.api_keys, cfg.headers)

    def clean(self, err: GatewayError, ctx: RequestContext, route: Route) -> None:
        """Scrubs ``err`` in place; the model names of the request are left readable."""
        err.message = self._scrubber.clean(err.message, keep=(route.upstream_model, route.model, ctx.model))
        err.args = (err.message,)
        err.param = safe_field(err.param)
        err.code = safe_field(err.code)

    async def chat(self, ctx: RequestContext, route: Route, body: dict) -> bytes:
        try:
            return await self.inner.chat(ctx, route, body)
        except GatewayError as err:
            self.clean(err, ctx, route)
            raise
        except _TRANSPORT:
            raise
        except Exception as exc:
            raise _unreadable(self.name, exc, ctx) from None

    async def embeddings(self, ctx: RequestContext, route: Route, body: dict) -> bytes:
        try:
            return await self.inner.embeddings(ctx, route, body)
        except GatewayError as err:
            self.clean(err, ctx, route)
            raise
        except _TRANSPORT:
            raise
        except Exception as exc:
            raise _unreadable(self.name, exc, ctx) from None

    async def rerank(self, ctx: RequestContext, route: Route, body: dict) -> bytes:
        """Cohere-compatible re-ranking, for adapters that speak it (gateway/rerank.py)."""
        call = getattr(self.inner, "rerank", None)
        if call is None:
            raise UpstreamError(f"Provider {self.name} has no rerank API.", code="unsupported_operation")
        try:
            return await call(ctx, route, body)
        except GatewayError as err:
            self.clean(err, ctx, route)
            raise

    async def open_chat_stream(self, ctx: RequestContext, route: Route, body: dict) -> AsyncIterator[bytes]:
        try:
            events = await self.inner.open_chat_stream(ctx, route, body)
        except GatewayError as err:
            self.clean(err, ctx, route)
            raise
        except _TRANSPORT:
            raise
        except Exception as exc:
            raise _unreadable(self.name, exc, ctx) from None
        return self._events(events, ctx, route)

    async def _events(self, events: AsyncIterator[bytes], ctx: RequestContext, route: Route) -> AsyncIterator[bytes]:
        try:
            async for chunk in events:
                yield chunk
        except GatewayError as err:
            self.clean(err, ctx, route)
            raise
        except _TRANSPORT:
            raise
        except Exception as exc:
            raise _unreadable(self.name, exc, ctx) from None
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    async def close(self) -> None:
        await self.inner.close()
