"""The request pipeline, top to bottom.

    authenticate → parse & validate → route → call → account

Each stage is one small function over the ``RequestContext``; a stage short-circuits by
raising a ``GatewayError``, which the app renders. ``account`` always runs (app.py calls it
in a ``finally``), so refused and failed requests are counted too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from gateway import http, metrics
from gateway.errors import GatewayError
from gateway.logs import access_log
from gateway.services import Services
from gateway.types import RequestContext
from gateway.validation import validate_chat, validate_embeddings

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


async def authenticate(svc: Services, ctx: RequestContext, scope: dict) -> None:
    ctx.identity = await svc.auth.authenticate(http.header(scope, b"authorization"))


async def parse(svc: Services, ctx: RequestContext, scope: dict, receive, validate: Callable) -> None:
    body = http.parse_json(await http.read_body(scope, receive, svc.config.server.max_body_bytes))
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        ctx.model = body["model"]  # known early so refusals are counted by model
    validate(body)
    ctx.body = body
    ctx.stream = body.get("stream") is True
    opts = body.get("stream_options")
    ctx.include_usage = bool(ctx.stream and isinstance(opts, dict) and opts.get("include_usage"))


def route(svc: Services, ctx: RequestContext, mode: str) -> None:
    ctx.route = svc.router.route(ctx.model, mode)
    ctx.attempts += 1


def _route_headers(ctx: RequestContext) -> list[tuple[bytes, bytes]]:
    r = ctx.route
    return [
        (b"x-request-id", ctx.request_id.encode()),
        (b"x-gateway-provider", r.provider.encode()),
        (b"x-gateway-deployment", r.deployment.encode()),
        (b"x-gateway-attempts", str(ctx.attempts).encode()),
    ]


async def call(svc: Services, ctx: RequestContext, send) -> None:
    adapter = svc.adapters[ctx.route.provider]
    if ctx.endpoint == "embeddings":
        raw = await adapter.embeddings(ctx, ctx.route, ctx.body)
    else:
        raw = await adapter.chat(ctx, ctx.route, ctx.body)
    ctx.status = 200
    headers = [(b"content-type", http.JSON), (b"content-length", str(len(raw)).encode()), *_route_headers(ctx)]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": raw})


async def call_stream(svc: Services, ctx: RequestContext, send, receive) -> None:
    adapter = svc.adapters[ctx.route.provider]
    events = await adapter.open_chat_stream(ctx, ctx.route, ctx.body)
    ctx.status = 200
    await send({"type": "http.response.start", "status": 200, "headers": [*_SSE_HEADERS, *_route_headers(ctx)]})
    hangup = asyncio.ensure_future(receive())  # completes when the client goes away
    try:
        async for chunk in events:
            if hangup.done():
                ctx.status = 499
                ctx.error_code = "client_closed_request"
                break
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        hangup.cancel()
        with contextlib.suppress(Exception):
            await events.aclose()


async def chat(svc: Services, ctx: RequestContext, scope: dict, receive, send) -> None:
    await authenticate(svc, ctx, scope)
    await parse(svc, ctx, scope, receive, validate_chat)
    route(svc, ctx, "chat")
    if ctx.stream:
        await call_stream(svc, ctx, send, receive)
    else:
        await call(svc, ctx, send)


async def embeddings(svc: Services, ctx: RequestContext, scope: dict, receive, send) -> None:
    await authenticate(svc, ctx, scope)
    await parse(svc, ctx, scope, receive, validate_embeddings)
    route(svc, ctx, "embedding")
    await call(svc, ctx, send)


def account(svc: Services, ctx: RequestContext, now: float, error: GatewayError | None) -> None:
    """Metrics and the access-log line (the audit ledger joins here)."""
    provider = ctx.route.provider if ctx.route else ""
    model = ctx.model
    elapsed = now - ctx.started
    metrics.requests.get(ctx.endpoint, model, provider, str(ctx.status)).inc()
    metrics.latency.get(ctx.endpoint, model, provider).observe(elapsed)
    if ctx.ttft is not None:
        metrics.ttft.get(model, provider).observe(ctx.ttft)
    usage = ctx.usage
    if usage is not None:
        metrics.tokens.get(model, provider, "prompt").inc(usage.prompt_tokens)
        metrics.tokens.get(model, provider, "completion").inc(usage.completion_tokens)
        if usage.cached_tokens:
            metrics.tokens.get(model, provider, "cached").inc(usage.cached_tokens)
    upstream_failed = ctx.route is not None and ctx.status >= 500
    if upstream_failed:
        metrics.upstream_errors.get(provider, ctx.error_code or "unknown").inc()
    if svc.config.server.log_requests:
        line = {
            "level": "info" if ctx.status < 500 else "warning",
            "msg": "request",
            "request_id": ctx.request_id,
            "endpoint": ctx.endpoint,
            "status": ctx.status,
            "model": model,
            "provider": provider,
            "deployment": ctx.route.deployment if ctx.route else None,
            "stream": ctx.stream,
            "key_id": ctx.identity.key_id if ctx.identity else None,
            "latency_ms": round(elapsed * 1000, 2),
            "ttft_ms": round(ctx.ttft * 1000, 2) if ctx.ttft is not None else None,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
        }
        if error is not None or ctx.error_code:
            line["error_code"] = ctx.error_code
            line["error"] = error.message if error is not None else None
        access_log.write(line)
