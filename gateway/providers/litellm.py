"""The long tail of providers (Gemini, Bedrock, Vertex, Cohere, ...) through litellm.

litellm costs seconds and ~165 MB to import, so it is imported only when a provider of this
kind is configured, and never on the path of the openai / anthropic kinds. Its price map is
read from the file bundled in the package (``LITELLM_LOCAL_MODEL_COST_MAP``): nothing is
fetched at start-up.

litellm's keyword arguments do more than carry a request: they choose where it goes
(``api_base``, ``base_url``, ``extra_headers``, ``custom_llm_provider``, ``aws_*``,
``vertex_*``), answer it without a provider (``mock_response``), add callbacks and loggers
(``metadata``, ``success_callback``, ``langfuse_host``), register prices
(``input_cost_per_token``) or call other deployments (``fallbacks``, ``model_list``). So a
client's body is never spread into them: only the OpenAI request parameters litellm maps are
taken from it (``CHAT_PARAMS``, ``EMBEDDING_PARAMS``), tools are rebuilt as plain function
tools, and the connection parameters are set from the config after everything else.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from typing import Any

import orjson

from core.config import Provider
from core.errors import GatewayError, InvalidRequest, UpstreamError, UpstreamTimeout
from core.sse import DONE, data_event
from core.types import RequestContext, Route, Usage
from gateway.providers.base import map_upstream_status

_litellm: Any = None

# The OpenAI parameters of a chat request litellm maps to its providers; ``stream`` and
# ``stream_options`` are the adapter's to set.
CHAT_PARAMS = frozenset(
    {
        "messages",
        "temperature",
        "top_p",
        "n",
        "stop",
        "max_tokens",
        "max_completion_tokens",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "user",
        "seed",
        "response_format",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "functions",
        "function_call",
        "modalities",
        "audio",
        "prediction",
        "reasoning_effort",
        "verbosity",
        "service_tier",
        "web_search_options",
        "safety_identifier",
        "prompt_cache_key",
    }
)
EMBEDDING_PARAMS = frozenset({"input", "dimensions", "encoding_format", "user"})
_FUNCTION_FIELDS = ("name", "description", "parameters", "strict")
# A litellm error's message starts with its class names: "litellm.RateLimitError: RateLimitError:
# OpenAIException - <the provider's message>".
_LITELLM_PREFIX = re.compile(r"^(?:litellm\.\w+:\s*)?(?:\w+Error:\s*)?(?:\w+Exception\s*-\s*)?")


def import_litellm() -> Any:
    global _litellm
    if _litellm is None:
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        os.environ.setdefault("LITELLM_LOG", "ERROR")
        import litellm

        litellm.telemetry = False
        litellm.suppress_debug_info = True
        litellm.drop_params = True
        # Media URLs in messages that litellm downloads itself go through its SSRF guard.
        litellm.user_url_validation = True
        litellm.user_url_allowed_hosts = []
        _litellm = litellm
    return _litellm


def _to_error(provider: str, exc: Exception) -> GatewayError:
    if isinstance(exc, GatewayError):
        return exc
    status = getattr(exc, "status_code", None)
    message = _LITELLM_PREFIX.sub("", str(getattr(exc, "message", None) or exc), count=1)[:500]
    name = type(exc).__name__
    if "Timeout" in name:
        return UpstreamTimeout(f"Provider {provider} timed out: {message}")
    if isinstance(status, int) and status >= 400:
        return map_upstream_status(provider, status, message, getattr(exc, "headers", None) or {})
    return UpstreamError(f"Provider {provider} failed: {name}: {message}")


def _function_tools(tools: list) -> list[dict]:
    """Function tools rebuilt from their known fields; other kinds (MCP servers, ...) refused."""
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type", "function") if isinstance(tool, dict) else None
        fn = tool.get("function") if isinstance(tool, dict) else None
        if kind != "function" or not isinstance(fn, dict):
            raise InvalidRequest(
                f"Tool type {kind!r} is not supported by this model's provider; use function tools.",
                param=f"tools[{i}].type",
                code="unsupported_value",
            )
        out.append({"type": "function", "function": {k: fn[k] for k in _FUNCTION_FIELDS if k in fn}})
    return out


class LiteLLMAdapter:
    def __init__(self, cfg: Provider, upstream: object) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self._litellm = import_litellm()

    def _kwargs(self, route: Route, body: dict, allowed: frozenset[str]) -> dict[str, Any]:
        """litellm's keyword arguments: the allowed parameters of ``body``, then the connection."""
        kwargs: dict[str, Any] = {k: v for k, v in body.items() if k in allowed}
        if kwargs.get("tools"):
            kwargs["tools"] = _function_tools(kwargs["tools"])
        prefix = self.cfg.litellm_provider
        connection: dict[str, Any] = {
            "model": f"{prefix}/{route.upstream_model}" if prefix else route.upstream_model,
            "timeout": self.cfg.timeouts.total,
            "num_retries": 0,  # the router retries
            "max_retries": 0,
        }
        if route.api_key:
            connection["api_key"] = route.api_key
        if self.cfg.base_url:
            connection["api_base"] = self.cfg.base_url
        if self.cfg.headers:
            connection["extra_headers"] = dict(self.cfg.headers)
        kwargs.update(connection)  # last: nothing of the client's can stand in for them
        return kwargs

    def _chat_kwargs(self, route: Route, body: dict) -> dict[str, Any]:
        kwargs = self._kwargs(route, body, CHAT_PARAMS)
        # Tools are plain functions here (``_function_tools``): litellm's MCP client, which it
        # would otherwise import for any request with tools (and which is not installed), has
        # nothing to do.
        kwargs["_skip_mcp_handler"] = True
        return kwargs

    async def chat(self, ctx: RequestContext, route: Route, body: dict) -> bytes:
        try:
            resp = await self._litellm.acompletion(**self._chat_kwargs(route, body), stream=False)
        except Exception as exc:
            raise _to_error(self.name, exc) from None
        data = resp.model_dump(exclude_none=False)
        data.pop("_hidden_params", None)
        ctx.usage = Usage.from_openai(data.get("usage"))
        return orjson.dumps(data, default=str)

    async def open_chat_stream(self, ctx: RequestContext, route: Route, body: dict) -> AsyncIterator[bytes]:
        kwargs = self._chat_kwargs(route, body)
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
        kwargs = self._kwargs(route, body, EMBEDDING_PARAMS)
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
