"""OpenAI-compatible upstreams (OpenAI, Groq, vLLM, Ollama, ...): a relay.

The request is re-encoded only to swap in the upstream model name (and to ask for usage in
streams). Responses are relayed as the upstream sent them: a non-streamed body is parsed only
to read its usage, a stream is cut into events and passed through untouched, except the usage
event the gateway asked for and the client did not, which is read and dropped.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import aiohttp
import orjson

from core.config import Provider
from core.errors import InvalidRequest
from core.http import check_depth
from core.retention import ZDR, without_retention
from core.sse import EventSplitter, EventTooLarge
from core.types import RequestContext, Route, Usage
from core.upstream import Upstream
from gateway.providers.base import bad_response, encode_request, error_from_response, incomplete_stream, stream_error


class OpenAIAdapter:
    def __init__(self, cfg: Provider, upstream: Upstream) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self._upstream = upstream
        self._chat_url = f"{cfg.base_url}/chat/completions"
        self._embeddings_url = f"{cfg.base_url}/embeddings"
        self._header_cache: dict[str | None, dict[str, str]] = {}

    def _headers(self, route: Route) -> dict[str, str]:
        """Built once per API key (read-only afterwards: the HTTP client copies them)."""
        headers = self._header_cache.get(route.api_key)
        if headers is None:
            headers = {"Content-Type": "application/json", **self.cfg.headers}
            if route.api_key:
                headers["Authorization"] = f"Bearer {route.api_key}"
            self._header_cache[route.api_key] = headers
        return headers

    async def _send(self, url: str, ctx: RequestContext, route: Route, payload: dict) -> aiohttp.ClientResponse:
        resp = await self._upstream.post(
            url, encode_request(payload), self._headers(route), self.cfg.timeouts, self.name
        )
        ctx.upstream_headers = resp.headers
        if resp.status != 200:
            raw = await self._upstream.read(resp, self.name)
            raise error_from_response(self.name, resp.status, raw, resp.headers)
        return resp

    async def _complete(self, url: str, ctx: RequestContext, route: Route, payload: dict, shape: str) -> bytes:
        resp = await self._send(url, ctx, route, payload)
        raw = await self._upstream.read(resp, self.name)
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise bad_response(self.name, "body is not JSON") from None
        if not isinstance(parsed, dict) or not isinstance(parsed.get(shape), list):
            raise bad_response(self.name, f"no '{shape}' array")
        try:  # nested past what the gateway writes again (an agent's answer, restored pseudonyms)
            check_depth(raw, parsed)
        except InvalidRequest:
            raise bad_response(self.name, "nested too deeply") from None
        ctx.usage = Usage.from_openai(parsed.get("usage"))
        return raw

    async def chat(self, ctx: RequestContext, route: Route, body: dict) -> bytes:
        payload = _upstream_payload(ctx, body, route)
        if payload.get("stream"):  # an agent's tool steps run unstreamed while its client streams
            payload = {k: v for k, v in payload.items() if k not in ("stream", "stream_options")}
        return await self._complete(self._chat_url, ctx, route, payload, "choices")

    async def embeddings(self, ctx: RequestContext, route: Route, body: dict) -> bytes:
        payload = {**body, "model": route.upstream_model}
        return await self._complete(self._embeddings_url, ctx, route, payload, "data")

    async def rerank(self, ctx: RequestContext, route: Route, body: dict) -> bytes:
        """Cohere-compatible ``POST {base_url}/rerank`` (Cohere, Jina, Voyage, TEI, vLLM...)."""
        payload = {**body, "model": route.upstream_model}
        return await self._complete(f"{self.cfg.base_url}/rerank", ctx, route, payload, "results")

    async def open_chat_stream(self, ctx: RequestContext, route: Route, body: dict) -> AsyncIterator[bytes]:
        payload = _upstream_payload(ctx, body, route)
        opts = body.get("stream_options")
        payload["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
        resp = await self._send(self._chat_url, ctx, route, payload)
        ctype = resp.headers.get("Content-Type", "")
        if "text/event-stream" not in ctype:
            raw = await self._upstream.read(resp, self.name)
            raise bad_response(self.name, f"expected an event stream, got {ctype or 'no content type'} ({raw[:80]!r})")
        return self._relay(ctx, resp)

    async def _relay(self, ctx: RequestContext, resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        splitter = EventSplitter()
        keep_usage = ctx.include_usage
        try:
            async for data in resp.content.iter_any():
                out = []
                try:
                    events = splitter.feed(data)
                except EventTooLarge:
                    raise bad_response(self.name, "a stream event that does not end") from None
                for event in events:
                    if not event.startswith(b"data: ") and event.startswith(b"data:"):
                        event = b"data: " + event[5:]  # the space is optional in SSE; ours has it
                    if event.startswith(b"data: [DONE]"):
                        yield b"".join([*out, event])
                        return
                    if b'"error"' in event:  # an error event ("error": or "error" :): not relayed as is
                        err = stream_error(self.name, event)
                        if err is not None:
                            if out:
                                yield b"".join(out)
                            raise err
                    if b'"usage"' in event and _USAGE_OBJECT.search(event):  # ("usage" : { too; not null)
                        if self._read_usage(ctx, event) and not keep_usage:
                            continue
                    out.append(event)
                if out:
                    yield b"".join(out) if len(out) > 1 else out[0]
            raise incomplete_stream(self.name)
        finally:
            resp.release()

    @staticmethod
    def _read_usage(ctx: RequestContext, event: bytes) -> bool:
        """Reads usage from an event; True when it is the usage-only event (no choices)."""
        try:
            chunk = orjson.loads(event[6:])
        except orjson.JSONDecodeError:
            return False
        if not isinstance(chunk, dict):
            return False
        usage = Usage.from_openai(chunk.get("usage"))
        if usage is not None:
            ctx.usage = usage
        # by its shape, not its counts: a usage-only chunk whose counts are no counts (the
        # gateway estimates instead) is still not for a client that did not ask for usage
        return isinstance(chunk.get("usage"), dict) and not chunk.get("choices")

    async def close(self) -> None:
        return None


_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')


def _upstream_payload(ctx: RequestContext, body: dict, route: Route) -> dict:
    """The body for the upstream: its model, and nothing a zero-data-retention request may not
    send (the pipeline refuses a client's request asking for retention: ``check_retention``;
    this holds for every other chat call too, an agent's steps and its judge included)."""
    payload = {**body, "model": route.upstream_model}
    if ZDR in ctx.constraints.tags:
        without_retention(payload)
    return _without_gateway_metadata(payload)


def _without_gateway_metadata(payload: dict) -> dict:
    """``metadata`` is the gateway's (attribution: tags, user, agent, workflow, customer; an
    agent's conversation id and variables) unless the client asks OpenAI to store the completion
    (``store: true``), the only case in which OpenAI takes it: without ``store`` it answers 400
    "The 'metadata' parameter is only allowed when 'store' is enabled"."""
    if "metadata" in payload and payload.get("store") is not True:
        del payload["metadata"]
    return payload
