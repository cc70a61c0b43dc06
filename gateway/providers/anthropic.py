"""Anthropic Messages API upstreams, translated to and from OpenAI's wire format."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import orjson

from core.config import Provider
from core.errors import GatewayError, InvalidRequest
from core.sse import EventTooLarge, iter_events
from core.types import RequestContext, Route
from core.upstream import Upstream
from gateway.providers.anthropic_translate import StreamTranslator, from_anthropic, to_anthropic
from gateway.providers.base import bad_response, encode_request, incomplete_stream, map_upstream_status

DEFAULT_BASE_URL = "https://api.anthropic.com"

# The status an error event inside a stream stands for.
_STREAM_ERROR_STATUS = {"overloaded_error": 529, "rate_limit_error": 429, "api_error": 500}


def anthropic_error(provider: str, status: int, raw: bytes, headers) -> GatewayError:
    message, kind = "no error message", None
    try:
        data = orjson.loads(raw)
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict):
            message = str(err.get("message") or err.get("type") or message)
            kind = err.get("type")
    except orjson.JSONDecodeError:
        message = raw[:200].decode("utf-8", "replace") or message
    code = None
    if status == 400 and "prompt is too long" in message:
        code = "context_length_exceeded"
    if status == 400 and "credit balance is too low" in message:  # the operator's account, as a 402
        return map_upstream_status(provider, 402, message, headers)
    return map_upstream_status(provider, status, message, headers, code=code or kind)


class AnthropicAdapter:
    def __init__(self, cfg: Provider, upstream: Upstream) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self._upstream = upstream
        self._url = f"{cfg.base_url or DEFAULT_BASE_URL}/v1/messages"

    def _headers(self, route: Route) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            "anthropic-version": self.cfg.anthropic_version,
            **self.cfg.headers,
        }
        if route.api_key:
            headers["x-api-key"] = route.api_key
        return headers

    async def _send(self, ctx: RequestContext, route: Route, payload: dict) -> aiohttp.ClientResponse:
        resp = await self._upstream.post(
            self._url, encode_request(payload), self._headers(route), self.cfg.timeouts, self.name
        )
        ctx.upstream_headers = resp.headers
        if resp.status != 200:
            raw = await self._upstream.read(resp, self.name)
            raise anthropic_error(self.name, resp.status, raw, resp.headers)
        return resp

    async def chat(self, ctx: RequestContext, route: Route, body: dict) -> bytes:
        payload = to_anthropic({**body, "stream": False}, route.upstream_model, self.cfg.default_max_tokens)
        resp = await self._send(ctx, route, payload)
        raw = await self._upstream.read(resp, self.name)
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise bad_response(self.name, "body is not JSON") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), list):
            raise bad_response(self.name, "no 'content' array")
        completion, ctx.usage = from_anthropic(msg)
        return orjson.dumps(completion)

    async def open_chat_stream(self, ctx: RequestContext, route: Route, body: dict) -> AsyncIterator[bytes]:
        payload = to_anthropic({**body, "stream": True}, route.upstream_model, self.cfg.default_max_tokens)
        resp = await self._send(ctx, route, payload)
        ctype = resp.headers.get("Content-Type", "")
        if "text/event-stream" not in ctype:
            await self._upstream.read(resp, self.name)
            raise bad_response(self.name, f"expected an event stream, got {ctype or 'no content type'}")
        return self._translate(ctx, resp)

    async def _translate(self, ctx: RequestContext, resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        tr = StreamTranslator(ctx.include_usage)
        try:
            async for event, data in iter_events(resp.content.iter_any()):
                if not data:
                    continue
                try:
                    obj = orjson.loads(data)
                except orjson.JSONDecodeError:
                    raise bad_response(self.name, "a stream event is not JSON") from None
                if not isinstance(obj, dict):
                    raise bad_response(self.name, "a stream event is not an object")
                if obj.get("type") == "error" or event == "error":
                    err = obj.get("error") or {}
                    status = _STREAM_ERROR_STATUS.get(err.get("type"), 500)
                    raise map_upstream_status(self.name, status, str(err.get("message") or "stream error"), {})
                out = tr.feed(event, obj)
                # (None: the gateway estimates, from what was sent when the stream ends early)
                ctx.usage = tr.usage if tr.usage_valid and tr.usage_final else None
                if out:
                    yield out
                if tr.done:
                    return
            raise incomplete_stream(self.name)
        except EventTooLarge:
            raise bad_response(self.name, "a stream event that does not end") from None
        finally:
            resp.release()

    async def embeddings(self, ctx: RequestContext, route: Route, body: dict) -> bytes:
        raise InvalidRequest(
            f"Model {ctx.model!r} is served by Anthropic, which has no embeddings endpoint.",
            param="model",
            code="unsupported_model",
        )

    async def close(self) -> None:
        return None
