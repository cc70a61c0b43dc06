"""An agent turn from its first model call to the response: complete → tools → (admit → scrub →
complete)* → respond.

When the model calls the agent's server-side tools, the gateway runs them (concurrently,
validated against their schemas), appends the results and calls the model again, up to the
agent's ``max_steps`` and the request's deadline. Each model call is one step with its own
budget check and audit record (linked by the request id and the step). Tools the client passed
stay the client's: their calls reach it as normal OpenAI tool calls. The client sees one normal
response or stream.

Streams: an agent without server-side tools streams live, chunk by chunk. With server-side
tools the steps run unstreamed and the final answer is sent as a stream once known.

When every deployment fails, an agent with a fallback message answers with it
(``finish_reason: "stop"``, ``x-gateway-degraded: true``) and the turn is recorded as degraded;
so it does when, after the tools ran, a fallback group's PII policy refuses the client's messages.
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson

from core.errors import GatewayError
from core.types import RequestContext, Usage
from gateway import grounding, hitl_stage, pipeline, withholding
from gateway.routing import Group
from gateway.usage import assembled_calls, count_prompt_off_loop, merge_calls, stream_events
from runtime.memory import Window
from runtime.memory_window import client_saw
from runtime.tools import validation_budget

log = logging.getLogger("gateway.agents")

TURN_DEADLINE = 120.0  # seconds for a whole turn, tools included
_FAILOVER_STATUSES = (500, 502, 503, 504)


def _headers(ctx: RequestContext) -> list[tuple[bytes, bytes]]:
    turn = ctx.agent
    out = [
        (b"x-gateway-agent", turn.agent.name.encode()),
        (b"x-gateway-prompt-version", str(turn.selection.version.version).encode()),
    ]
    if turn.selection.variant is not None:
        out.append((b"x-gateway-variant", turn.selection.variant.encode()))
    if turn.degraded:
        out.append((b"x-gateway-degraded", b"true"))
    if turn.memory_error:
        out.append((b"x-gateway-memory", b"unavailable"))
    out += hitl_stage.headers(turn)
    return out


def _message(raw: bytes) -> tuple[dict, dict]:
    data = orjson.loads(raw)
    choices = data.get("choices") or [{}]
    return data, choices[0].get("message") or {}


def _fallback_body(ctx: RequestContext, text: str) -> bytes:
    return orjson.dumps(
        {
            "id": f"chatcmpl-{ctx.request_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": ctx.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": Usage().to_openai(),
        }
    )


def _step(ctx: RequestContext, started: float, kind: str = "model", **extra) -> dict:
    r = ctx.route
    usage = ctx.usage
    step = {
        "step": ctx.step,
        "kind": kind,
        "deployment": r.deployment if r is not None else None,
        "status": ctx.status,
        "duration_ms": round((time.perf_counter() - started) * 1000, 3),
        # under "tokens", the one key of a step the run record keeps them under (runtime/runs.py)
        "tokens": {
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "completion_tokens": usage.completion_tokens if usage else 0,
        },
    }
    step.update(extra)
    return step


_UNFINISHED = "I could not finish this request."


async def _degraded(svc, ctx: RequestContext, scope: dict, err: GatewayError) -> bytes:
    """The answer of a turn whose model call failed (every deployment: 5xx) or, once its tools ran, whose
    later step failed or was refused for any reason: the agent's fallback message (else a plain
    sentence), ``finish_reason: stop``, ``x-gateway-degraded: true``. Once the tools have run, an
    error would have the client retry the turn — the OpenAI SDKs retry a 429 or a 5xx on their
    own — and run the tools' side effects (an order, a refund) again. The failed step keeps its
    audit record (its status and code); the run record shows the step and the degraded turn."""
    ctx.status, ctx.error_code = err.status, err.code
    await pipeline.settle(svc, ctx, scope)  # the failed or refused step's record
    ctx.agent.degraded = True
    ctx.status = 200
    ctx.error_code = None
    return _fallback_body(ctx, ctx.agent.agent.fallback_message or _UNFINISHED)


def _add(total: Usage, usage: Usage | None) -> None:
    if usage is not None:
        total.prompt_tokens += usage.prompt_tokens
        total.completion_tokens += usage.completion_tokens
        total.cached_tokens += usage.cached_tokens


async def _scrub_step(svc, ctx: RequestContext, step_messages: list[dict]) -> None:
    """``pipeline.scrub`` of a body that now holds this step's messages: what a refusal names of
    them (a tool result, the model's tool-call arguments) is withheld, not the turn failed
    (``withholding``); any other refusal stands."""
    await withholding.scrubbed(ctx, step_messages, lambda: pipeline.scrub(svc, ctx))


async def _next_step(svc, ctx: RequestContext, scope: dict, step_messages: list[dict]) -> None:
    """Reset what belongs to one model call, then check limits and budgets and scrub again (the
    body now holds tool results: ``_scrub_step``)."""
    ctx.step += 1
    ctx.usage = None
    ctx.attempts = 0
    ctx.fallbacks = 0
    ctx.status = 0
    ctx.error_code = None
    ctx.ttft = None
    ctx._prompt_tokens = None
    ctx.max_output = pipeline._int(ctx.body.get("max_completion_tokens")) or pipeline._int(ctx.body.get("max_tokens"))
    # (and the last step's scrub: a step refused before its own has sent nothing to log)
    for name in ("settled", "admitted", "reserved_nano", "budgets", "budget_keys", "usage_estimated", "pii"):
        ctx.extra.pop(name, None)
    await count_prompt_off_loop(ctx)  # tool results can be large: not tokenized on the event loop
    await pipeline.admit(svc, ctx, scope)
    await _scrub_step(svc, ctx, step_messages)


async def run_turn(svc, ctx: RequestContext, group: Group, scope: dict, send, receive) -> None:
    turn = ctx.agent
    agent = turn.agent
    has_server_tools = bool(agent.tools or agent.builtins)
    started = time.perf_counter()
    if turn.hold is not None:  # a person holds the conversation: no model call (gateway/hitl_stage.py)
        raw = _fallback_body(ctx, await hitl_stage.join(svc, ctx))
        await pipeline.settle(svc, ctx, scope)
        _record(svc, ctx, started)
        await (_send_as_stream(ctx, raw, send) if ctx.stream else pipeline.respond(ctx, raw, send, _headers(ctx)))
        return
    if ctx.stream and not has_server_tools and not hitl_stage.buffered(agent):
        await _stream_live(svc, ctx, group, scope, send, receive, started)
        return
    deadline = time.monotonic() + TURN_DEADLINE
    validation = validation_budget()  # every step's tool calls together
    total = Usage()
    parsed: tuple[bytes, dict] | None = None  # the last answer read, and its message
    while True:
        step_started = time.perf_counter()
        try:
            raw = await pipeline.complete(svc, ctx, group)
        except GatewayError as err:
            tools_ran = bool(ctx.extra.get("tool_messages"))
            turn.steps.append(_step(ctx, step_started, status=err.status, error=err.code))
            if not tools_ran and (agent.fallback_message is None or err.status not in _FAILOVER_STATUSES):
                raise
            log.warning("agent %s: step %d failed (%s); the turn answers degraded", agent.name, ctx.step, err.code)
            raw = await _degraded(svc, ctx, scope, err)
            break
        _add(total, ctx.usage)
        data, message = _message(raw)
        parsed = (raw, message)
        calls = message.get("tool_calls") or []
        server = [c for c in calls if svc.tools.is_server_tool(agent, (c.get("function") or {}).get("name"))]
        turn.steps.append(_step(ctx, step_started, tool_calls=len(calls)))
        if not server:
            break
        if len(server) < len(calls):  # the client's own tools were called too: it runs those
            message["tool_calls"] = [c for c in calls if c not in server]
            raw = orjson.dumps(data)
            break
        if ctx.step >= agent.max_steps or time.monotonic() >= deadline:
            turn.steps.append(
                {
                    "step": ctx.step,
                    "kind": "limit",
                    "reason": "max_steps" if ctx.step >= agent.max_steps else "deadline",
                }
            )
            text = agent.fallback_message or "I could not finish this request within the steps allowed."
            data["choices"][0]["message"] = {"role": "assistant", "content": text}
            data["choices"][0]["finish_reason"] = "stop"
            raw = orjson.dumps(data)
            break
        await pipeline.settle(svc, ctx, scope)  # this step's audit record and budget
        tools_started = time.perf_counter()
        results = await svc.tools.run(
            agent,
            server,
            deadline=deadline,
            context={"tenant": agent.tenant, "request_id": ctx.request_id, "turn": turn, "identity": ctx.identity},
            budget=validation,
        )
        for res in results:
            turn.steps.append(
                {
                    "step": ctx.step,
                    "kind": "tool",
                    "name": res.name,
                    "status": res.status,
                    "arguments_bytes": len(orjson.dumps(res.arguments)) if res.arguments is not None else 0,
                    "result_bytes": len(res.content),
                    "duration_ms": round(res.duration_ms, 3),
                }
            )
        turn.steps.append(
            {"step": ctx.step, "kind": "tools", "duration_ms": round((time.perf_counter() - tools_started) * 1000, 3)}
        )
        step_messages = [
            {"role": "assistant", "content": message.get("content"), "tool_calls": server},
            *({"role": "tool", "tool_call_id": r.tool_call_id, "content": r.content} for r in results),
        ]
        ctx.body["messages"] = [*ctx.body["messages"], *step_messages]
        ctx.body_bytes += len(orjson.dumps(step_messages))  # the prompt's bound grows with it
        ctx.extra.setdefault("tool_messages", []).extend(step_messages)  # remembered with the turn
        try:
            await _next_step(svc, ctx, scope, step_messages)
        except GatewayError as err:  # refused (rate limit, budget, scrubbing away) before the next model call
            turn.steps.append({"step": ctx.step, "kind": "model", "status": err.status, "error": err.code})
            log.warning("agent %s: step %d refused (%s); the turn answers degraded", agent.name, ctx.step, err.code)
            raw = await _degraded(svc, ctx, scope, err)
            break
    if ctx.step > 1 and not turn.degraded:  # the client is told what the whole turn used
        data = orjson.loads(raw)
        data["usage"] = total.to_openai()
        raw = orjson.dumps(data)

    async def answer() -> tuple[bytes, dict]:
        out = grounding.with_citations(raw, turn.citations)
        message = parsed[1] if parsed is not None and out is parsed[0] else _message(out)[1]  # (read once)
        out, message = await hitl_stage.after_answer(svc, ctx, out, message)  # confidence; maybe escalate
        await _remember(svc, ctx, message)
        return out, message

    # Settlement and the memory store are both Redis round trips: issued together they share one
    # write and one read (core.fastredis pipelines them). Both finish before the client hears.
    _, (raw, message) = await asyncio.gather(pipeline.settle(svc, ctx, scope), answer())
    _record(svc, ctx, started)
    if ctx.stream:
        await _send_as_stream(ctx, raw, send)
    else:
        await pipeline.respond(ctx, raw, send, _headers(ctx))


async def _stream_live(svc, ctx: RequestContext, group: Group, scope: dict, send, receive, started: float) -> None:
    turn = ctx.agent

    async def done() -> None:
        answer = _streamed_answer(ctx.extra.get("sent") or [])
        hitl_stage.score_streamed(ctx, answer["content"])
        await _remember(svc, ctx, answer)  # (the client's tool calls it was streamed too)

    try:
        await pipeline.call_stream(svc, ctx, group, scope, send, receive, _headers(ctx), on_done=done)
    except GatewayError as err:
        if turn.agent.fallback_message is None or err.status not in _FAILOVER_STATUSES or ctx.extra.get("sent"):
            raise
        await pipeline.settle(svc, ctx, scope)
        turn.degraded = True
        ctx.status = 200
        ctx.error_code = None
        raw = _fallback_body(ctx, turn.agent.fallback_message)
        turn.steps.append({"step": 1, "kind": "model", "status": err.status, "error": err.code})
        _record(svc, ctx, started)
        await _send_as_stream(ctx, raw, send)
        return
    turn.steps.append(_step(ctx, started))
    _record(svc, ctx, started)


def _streamed_answer(chunks: list[bytes]) -> dict:
    """The answer a stream gave, as its client assembled it: the text of its deltas and the tool
    calls (of the client's tools: an agent that streams live has none of its own)."""
    parts: list[str] = []
    calls: dict[int, dict] = {}
    for data in stream_events(chunks):
        merge_calls(data, calls)
        choices = data.get("choices")
        for choice in choices if isinstance(choices, list) else ():  # relayed whatever its shape
            delta = choice.get("delta") if isinstance(choice, dict) else None
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str):
                parts.append(content)
    answer: dict = {"role": "assistant", "content": "".join(parts)}
    found = assembled_calls(calls)
    if found:
        answer["tool_calls"] = found
    return answer


async def _send_as_stream(ctx: RequestContext, raw: bytes, send) -> None:
    """A complete answer, sent in OpenAI's chunk format."""
    data, message = _message(raw)
    base = {
        "id": data.get("id"),
        "object": "chat.completion.chunk",
        "created": data.get("created"),
        "model": data.get("model"),
    }
    choice = (data.get("choices") or [{}])[0]
    delta: dict = {"role": "assistant", "content": message.get("content") or ""}
    if message.get("tool_calls"):
        delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]
    events = [
        {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": choice.get("finish_reason") or "stop"}]},
    ]
    if ctx.include_usage:
        usage = data.get("usage") or (ctx.usage.to_openai() if ctx.usage is not None else None)  # (or the estimate)
        events.append({**base, "choices": [], "usage": usage})
    body = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    headers = [*pipeline._SSE_HEADERS, *pipeline._route_headers(ctx), *_headers(ctx)]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _remember(svc, ctx: RequestContext, answer: dict) -> None:
    """The turn goes into the conversation's memory before the client hears the answer, so its
    next message finds it; a memory that cannot take it is recorded, not fatal."""
    turn = ctx.agent
    if turn.conversation_id is None or turn.memory_error is not None:
        return
    # a client never stores a person's reply; what it sent and the answer are what it saw (their
    # tool calls are the client's: marked so, the tools steps between are not, whatever the
    # agent's tools are when the conversation is read back: ``memory_window.CLIENT_SAW``)
    new = hitl_stage.from_client(turn.new_messages)
    answer = {k: v for k, v in answer.items() if k in ("role", "content", "tool_calls") and v is not None}
    answer.setdefault("role", "assistant")
    answer = client_saw(answer)
    try:
        await svc.memory.append(
            turn.agent.tenant,
            turn.agent,
            turn.conversation_id,
            [*new, *ctx.extra.get("tool_messages", ()), answer],
            request_id=ctx.request_id,
            prompt_version=turn.selection.version.version,
            variant=turn.selection.variant,
            base=turn.history if isinstance(turn.history, Window) else None,
            erased=turn.erased_mark,
        )
    except Exception as exc:  # memory is not the answer: record and go on
        turn.memory_error = f"store failed: {type(exc).__name__}"
        log.warning("memory store failed for a turn of agent %s: %s", turn.agent.name, exc)


def _citation_step(c: dict) -> dict:
    section = f" {c['section']}" if c.get("section") else ""
    return {"kind": "citation", "name": f"[{c['source']}] {c['document_id']}{section}", "status": "ok"}


def _record(svc, ctx: RequestContext, started: float) -> None:
    turn = ctx.agent
    agent = turn.agent
    selection = turn.selection
    run = {
        "request_id": ctx.request_id,
        "tenant": agent.tenant,
        "agent": agent.name,
        "agent_id": agent.id,
        "prompt_version": selection.version.version,
        "variant": selection.variant,
        "conversation_id": turn.conversation_id,
        "status": ctx.status,
        "degraded": turn.degraded,
        "memory_error": turn.memory_error,
    }
    hitl_stage.record(turn, run)  # confidence, reasons, escalation (added: no second dict merged in)
    run["steps"] = [*turn.steps, *map(_citation_step, turn.citations[:20])] if turn.citations else turn.steps
    run["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
    svc.runs.record(run)
