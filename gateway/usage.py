"""Usage the provider did not report, counted with tiktoken (offline) from what was answered."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import orjson

from core.sse import DONE, data_event
from core.tokens import count_prompt, count_text
from core.types import RequestContext, Usage


def _text(value) -> str:
    """A field as the client received it: text as is, anything else (arguments sent as an
    object, content as parts) as its JSON."""
    if isinstance(value, str):
        return value
    return "" if value is None else orjson.dumps(value).decode()


_REASONING = ("reasoning_content", "reasoning")  # vLLM, DeepSeek; OpenRouter
# Output that is not the answer's content but is sent to the client and billed as completion
# tokens: reasoning, and a refusal (OpenAI's ``refusal``, under structured outputs, instead of
# the content). Counted, never an answer's content.
_OTHER_TEXT = (*_REASONING, "refusal")


def _answer_parts(data: dict, field: str, parts: list[str], tools: list[str] | None = None) -> None:
    """Text and tool calls of every choice's ``message`` (whole answers) or ``delta`` (chunks);
    the tool calls' text goes to ``tools`` when given. Whatever shape a provider gives them, they
    are counted, never a reason to fail the answer (or to leave it uncharged). Reasoning goes
    with the tool calls' text (counted, not part of the answer an agent stores)."""
    tools = parts if tools is None else tools
    choices = data.get("choices")
    for choice in choices if isinstance(choices, list) else ():  # (a provider may send any shape)
        msg = choice.get(field) if isinstance(choice, dict) else None
        if not isinstance(msg, dict):
            continue
        content = _text(msg.get("content"))
        if content:
            parts.append(content)
        for name in _OTHER_TEXT:  # billed as completion tokens; counted, never an answer's content
            if isinstance(msg.get(name), str) and msg[name]:
                tools.append(msg[name])
        calls = msg.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                tools.append(_text(fn.get("name")) + _text(fn.get("arguments")))


def _usage(ctx: RequestContext, parts: list[str]) -> Usage:
    ctx.extra["usage_estimated"] = True
    return Usage(prompt_tokens=ctx.prompt_tokens(), completion_tokens=count_text("".join(parts)) if parts else 0)


def _input_tokens(inp) -> int:
    """The tokens of an embeddings ``input`` (validated: a text, texts, a token array or token
    arrays): texts counted, token arrays by their length."""
    items = [inp] if isinstance(inp, str) else inp if isinstance(inp, list) else []
    if items and isinstance(items[0], int):  # one token array
        return len(items)
    return sum(count_text(t) if isinstance(t, str) else len(t) if isinstance(t, list) else 0 for t in items)


def estimate_usage(ctx: RequestContext, raw: bytes) -> Usage:
    """A complete answer (chat completion or embeddings) whose provider reported no usage."""
    if ctx.endpoint == "embeddings":
        ctx.extra["usage_estimated"] = True
        return Usage(prompt_tokens=_input_tokens(ctx.body.get("input")))
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = {}
    parts: list[str] = []
    if isinstance(data, dict):
        _answer_parts(data, "message", parts)
    return _usage(ctx, parts)


def stream_events(chunks: list[bytes]) -> Iterator[dict]:
    """The JSON objects of relayed stream chunks' ``data:`` events (anything else skipped)."""
    for chunk in chunks:
        for event in chunk.split(b"\n\n"):
            if event.startswith(b"data: {"):
                try:
                    data = orjson.loads(event[6:])
                except orjson.JSONDecodeError:
                    continue
                if isinstance(data, dict):
                    yield data


def estimate_stream_usage(ctx: RequestContext, chunks: list[bytes]) -> Usage:
    """A stream that ended (or broke) without the provider's usage: counted from what was sent."""
    parts: list[str] = []
    for data in stream_events(chunks):
        _answer_parts(data, "delta", parts)
    return _usage(ctx, parts)


MAX_STREAMED_CALLS = 128  # tool calls of one streamed answer assembled (a provider's index is any int)


def merge_calls(data: dict, calls: dict[int, dict], others: list[str] | None = None) -> None:
    """The tool-call deltas of a stream chunk's first choice merged into ``calls`` (by their
    ``index``), as a client assembles them: the id and type as first given, the function's name
    and arguments concatenated (their pieces listed, joined by ``assembled_calls``: appending
    each delta to the text so far copied it whole, quadratic in a long call's arguments, on the
    event loop). Whatever shape a provider sends, nothing here fails. The text of
    what is not kept — another choice's calls, a call with no int ``index`` or past
    ``MAX_STREAMED_CALLS``, a name or arguments that are not text — goes to ``others`` when given:
    the client was sent it, so the usage estimate counts it (``_answer_parts`` counts it so)."""
    choices = data.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        deltas = delta.get("tool_calls") if isinstance(delta, dict) else None
        first = choice.get("index", 0) == 0
        for d in deltas if isinstance(deltas, list) else ():
            if not isinstance(d, dict):
                continue
            fn = d.get("function") if isinstance(d.get("function"), dict) else {}
            index = d.get("index", 0)
            if not first or type(index) is not int or (index not in calls and len(calls) >= MAX_STREAMED_CALLS):
                if others is not None and fn:
                    others.append(_text(fn.get("name")) + _text(fn.get("arguments")))
                continue
            call = calls.setdefault(index, {"id": None, "type": "function", "name": [], "arguments": []})
            if call["id"] is None and isinstance(d.get("id"), str):
                call["id"] = d["id"]
            if isinstance(d.get("type"), str):
                call["type"] = d["type"]
            for part in ("name", "arguments"):
                if isinstance(fn.get(part), str):
                    call[part].append(fn[part])
                elif others is not None and fn.get(part) is not None:
                    others.append(_text(fn[part]))


def _assembled(calls: dict[int, dict]) -> list[tuple[int, dict]]:
    """``merge_calls``' calls by index, in order, each as a client holds it."""
    return [
        (i, {"id": c["id"], "type": c["type"], "function": {p: "".join(c[p]) for p in ("name", "arguments")}})
        for i, c in sorted(calls.items())
    ]


def assembled_calls(calls: dict[int, dict]) -> list[dict]:
    """``merge_calls``' calls in their order, each with an id (a provider that gave none: ``None``
    kept out, as a client could not answer it)."""
    return [c for _, c in _assembled(calls) if c["id"] is not None]


def compact(chunks: list[bytes]) -> bytes:
    """Relayed chunks as one event holding only what the usage estimate and an agent's stored
    answer read of them (the text, the reasoning, the refusal and the tool calls of every delta, the first
    choice's calls assembled as a client does, the text of every other call as one call of a
    second choice: counted, never stored): a long stream is not kept whole while it is relayed."""
    content: list[str] = []
    reasoning: list[str] = []
    refusal: list[str] = []
    calls: dict[int, dict] = {}
    others: list[str] = []
    for data in stream_events(chunks):
        merge_calls(data, calls, others)
        choices = data.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                continue
            text = _text(delta.get("content"))
            if text:
                content.append(text)
            for name in _REASONING:
                if isinstance(delta.get(name), str) and delta[name]:
                    reasoning.append(delta[name])
            if isinstance(delta.get("refusal"), str) and delta["refusal"]:
                refusal.append(delta["refusal"])
    delta: dict = {"content": "".join(content)}
    if reasoning:
        delta[_REASONING[0]] = "".join(reasoning)
    if refusal:
        delta["refusal"] = "".join(refusal)
    if calls:
        delta["tool_calls"] = [{"index": i, **c} for i, c in _assembled(calls)]
    choices = [{"index": 0, "delta": delta}]
    if others:
        choices.append({"index": 1, "delta": {"tool_calls": [{"function": {"arguments": "".join(others)}}]}})
    return b"data: " + orjson.dumps({"choices": choices}) + b"\n\n"


def with_usage(last: bytes, ctx: RequestContext) -> bytes:
    """The stream's last chunk (ending in ``[DONE]``) with the usage chunk a client that asked
    for ``include_usage`` expects before it, when the provider sent none (the estimate)."""
    chunk = {
        "id": ctx.request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": ctx.model,
        "choices": [],
        "usage": ctx.usage.to_openai(),
    }
    return last[: -len(DONE)] + data_event(chunk) + DONE


# A prompt this large is counted in a worker thread: tiktoken takes about a second per MB of
# text such as "aaaa…" (and lets go of the GIL meanwhile).
OFF_LOOP_BYTES = 32 * 1024


async def count_prompt_off_loop(ctx: RequestContext) -> None:
    """Counts a large prompt's tokens before a stage asks for them (a context window, a routing
    rule, a hard budget's reservation), so no client's body holds the event loop — every other
    request of the replica — while it is tokenized."""
    if ctx._prompt_tokens is None and ctx.body_bytes >= OFF_LOOP_BYTES and isinstance(ctx.body, dict):
        ctx._prompt_tokens = await asyncio.to_thread(count_prompt, ctx.body, ctx.known())
