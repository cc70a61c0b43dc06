"""The long tail of providers (Gemini, Bedrock, Vertex, Cohere, ...) through litellm.

litellm costs seconds and ~165 MB to import, so it is imported only when a provider of this
kind is configured, and never on the path of the openai / anthropic kinds. Its price map is
read from the file bundled in the package (``LITELLM_LOCAL_MODEL_COST_MAP``): nothing is
fetched at start-up.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import orjson

from gateway.config import Provider
from gateway.errors import GatewayError, UpstreamError, UpstreamTimeout
from gateway.providers.base import map_upstream_status
from gateway.sse import DONE, data_event
from gateway.types import RequestContext, Route, Usage

_litellm: Any = None


def import_litellm() -> Any:
    global _litellm
    if _litellm is None:
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        os.environ.setdefault("LITELLM_LOG", "ERROR")
        import litellm

        litellm.telemetry = False
        litellm.suppress_debug_info = True
        litellm.drop_params = True
        _litellm = litellm
    return _litellm


def _to_error(provider: str, exc: Exception) -> GatewayError:
    if isinstance(exc, GatewayError):
        return exc
    status = getattr(exc, "status_code", None)
    message = str(getattr(exc, "message", None) or exc)[:500]
    name = type(exc).__name__
    if "Timeout" in name:
        return UpstreamTimeout(f"Provider {provider} timed out: {message}")
    if isinstance(status, int) and status >= 400:
        return map_upstream_status(provider, status, message, getattr(exc, "headers", None) or {})
    return UpstreamError(f"Provider {provider} failed: {name}: {message}")


class LiteLLMAdapter:
    def __init__(self, cfg: Provider, upstream: object) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self._litellm = import_litellm()

    def _kwargs(self, route: Route, body: dict) -> dict:
        kwargs = {k: v for k, v in body.items() if k not in ("model", "stream_options")}
        prefix = self.cfg.litellm_provider
        kwargs["model"] = f"{prefix}/{route.upstream_model}" if prefix else route.upstream_model
        if route.api_key:
            kwargs["api_key"] = route.api_key
        if self.cfg.base_url:
            kwargs["api_base"] = self.cfg.base_url
        if self.cfg.headers:
            kwargs["extra_headers"] = dict(self.cfg.headers)
        kwargs["timeout"] = self.cfg.timeouts.total
        kwargs["num_retries"] = 0
        return kwargs

    async def chat(self, ctx: RequestContext, route: Route, body: dict) -> bytes:
        try:
            resp = await self._litellm.acompletion(**self._kwargs(route, body))
        except Exception as exc:
            raise _to_error(self.name, exc) from None
        data = resp.model_dump(exclude_none=False)
        data.pop("_hidden_params", None)
        ctx.usage = Usage.from_openai(data.get("usage"))
        return orjson.dumps(data, default=str)

    async def open_chat_stream(self, ctx: RequestContext, route: Route, body: dict) -> AsyncIterator[bytes]:
        kwargs = self._kwargs(route, body)
        kwargs["stream"] = True
        kwargs["stream_options"] = {"include_usage": True}
        try:
            stream = await self._litellm.acompletion(**kwargs)
        except Exception as exc:
            raise _to_error(self.name, exc) from None
        return self._relay(ctx, stream)

    async def _relay(self, ctx: RequestContext, stream: Any) -> AsyncIterator[bytes]:
        try:
            async for chunk in stream:
                data = chunk.model_dump(exclude_none=False)
                usage = Usage.from_openai(data.get("usage"))
                if usage is not None:
                    ctx.usage = usage
                if not data.get("choices"):
                    if ctx.include_usage and usage is not None:
                        yield data_event(data)
                    continue
                if not ctx.include_usage:
                    data.pop("usage", None)
                yield data_event(data)
            yield DONE
        except GeneratorExit:
            raise
        except Exception as exc:
            raise _to_error(self.name, exc) from None

    async def embeddings(self, ctx: RequestContext, route: Route, body: dict) -> bytes:
        kwargs = self._kwargs(route, body)
        kwargs["input"] = kwargs.pop("input")
        try:
            resp = await self._litellm.aembedding(**kwargs)
        except Exception as exc:
            raise _to_error(self.name, exc) from None
        data = resp.model_dump(exclude_none=False)
        data.pop("_hidden_params", None)
        ctx.usage = Usage.from_openai(data.get("usage"))
        return orjson.dumps(data, default=str)

    async def close(self) -> None:
        return None
