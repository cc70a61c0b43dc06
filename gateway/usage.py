"""Usage the provider did not report, counted with tiktoken (offline) from what was answered."""

from __future__ import annotations

import orjson

from core.tokens import count_text
from core.types import RequestContext, Usage


def _text(value) -> str:
    """A field as the client received it: text as is, anything else (arguments sent as an
    object, content as parts) as its JSON."""
    if isinstance(value, str):
        return value
    return "" if value is None else orjson.dumps(value).decode()


def _answer_parts(data: dict, field: str, parts: list[str]) -> None:
    """Text and tool calls of every choice's ``message`` (whole answers) or ``delta`` (chunks).
    Whatever shape a provider gives them, they are counted, never a reason to fail the answer
    (or to leave it uncharged)."""
    choices = data.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        msg = choice.get(field) if isinstance(choice, dict) else None
        if not isinstance(msg, dict):
            continue
        parts.append(_text(msg.get("content")))
        calls = msg.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                parts.append(_text(fn.get("name")) + _text(fn.get("arguments")))


def _usage(ctx: RequestContext, parts: list[str]) -> Usage:
    ctx.extra["usage_estimated"] = True
    return Usage(prompt_tokens=ctx.prompt_tokens(), completion_tokens=count_text("".join(parts)) if parts else 0)


def estimate_usage(ctx: RequestContext, raw: bytes) -> Usage:
    """A complete answer (chat completion or embeddings) whose provider reported no usage."""
    if ctx.endpoint == "embeddings":
        ctx.extra["usage_estimated"] = True
        inp = ctx.body.get("input")
        texts = (
            [inp] if isinstance(inp, str) else [t for t in inp if isinstance(t, str)] if isinstance(inp, list) else []
        )
        return Usage(prompt_tokens=sum(count_text(t) for t in texts))
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = {}
    parts: list[str] = []
    if isinstance(data, dict):
        _answer_parts(data, "message", parts)
    return _usage(ctx, parts)


def estimate_stream_usage(ctx: RequestContext, chunks: list[bytes]) -> Usage:
    """A stream that ended (or broke) without the provider's usage: counted from what was sent."""
    parts: list[str] = []
    for chunk in chunks:
        for event in chunk.split(b"\n\n"):
            if event.startswith(b"data: {"):
                try:
                    data = orjson.loads(event[6:])
                except orjson.JSONDecodeError:
                    continue
                _answer_parts(data, "delta", parts)
    return _usage(ctx, parts)
