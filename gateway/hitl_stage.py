"""Human in the loop on the request path of an agent turn.

- **held** (agent stage): one Redis GET, issued beside the memory read, says whether a person
  holds the conversation. If so the customer's message joins the escalation (stored in memory;
  counted on the escalation and announced on the feed in the background) and the turn answers at
  once with the agent's hold message — no model call, no PostgreSQL query on its path.
- **respond** (tools loop): the answer's confidence is scored (runtime/hitl/confidence.py: no
  model call unless the agent asks for a judge), recorded with the run and as a metric; below
  the agent's threshold, or on a rule, the turn escalates: the escalation opens (PostgreSQL, on
  that rare turn only), the conversation is held (Redis), the feed hears of it, and the customer
  gets the hand-off message (or the AI answer plus a note that a person will confirm it). The
  response carries ``x-gateway-escalation: <id>``.
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson

from channels.whatsapp import erasure as wa_erasure
from core.types import RequestContext
from gateway.hitl_service import CONFIDENCE, ESCALATIONS
from runtime.hitl import confidence, escalations, held
from runtime.hitl import settings as hitl_settings
from runtime.memory_window import client_saw

log = logging.getLogger("gateway.hitl")

DB_TIMEOUT = 3.0
HOLD_TIMEOUT = 1.0  # the hold's SET, made while the escalation's transaction waits
MAX_CONTEXT_BYTES = 16_000


def start_check(svc, turn) -> asyncio.Task | None:
    """The held check, started now so its GET travels with the memory read."""
    hitl = getattr(svc, "hitl", None)
    if hitl is None or turn.conversation_id is None or not hitl_settings.of(turn.agent).enabled:
        return None  # an agent that never escalates never holds a conversation: nothing to check
    return asyncio.ensure_future(hitl.holds.get(turn.agent.tenant, turn.agent.id, turn.conversation_id))


async def on_prepare(svc, ctx: RequestContext, turn, check: asyncio.Task | None) -> bool:
    """True when a person holds the conversation (the agent stage then stops: no grounding, no
    tools; the tools loop answers with the hold message)."""
    settings = hitl_settings.of(turn.agent)
    if check is not None:
        turn.hold = await check
        if turn.hold is not None:
            ctx.body["model"] = ctx.model = turn.agent.model
            ctx.agent = turn
            return True
    if settings.logprobs and not ctx.body.get("logprobs"):
        ctx.body["logprobs"] = True
        ctx.extra["hitl_logprobs_added"] = True
    return False


def buffered(agent) -> bool:
    """An agent that may escalate answers a stream once its answer is known (the hand-off
    message may replace it); the others stream live."""
    return hitl_settings.of(agent).enabled


HUMAN = "human"  # the name of a person's reply in memory (admin_escalations._send)


def from_client(messages: list) -> list[dict]:
    """The client's new messages as memory stores them: an assistant message the client sent is
    never stored as a person's reply (``name: "human"`` marks only what the escalation API sent:
    the console, the REST reader and the next turns' model would take a forged one for a
    colleague's word). System and developer messages are not stored. What the client sent is what
    it saw: an assistant message's tool calls are marked the client's, no other message keeps a
    mark (``memory_window.client_saw``: a turn's, and a held conversation's, read back alike)."""
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") in ("system", "developer"):
            continue
        if m.get("role") == "assistant" and m.get("name") == HUMAN:
            m = {k: v for k, v in m.items() if k != "name"}
        out.append(client_saw(m))
    return out


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


async def join(svc, ctx: RequestContext) -> str:
    """The customer's message while a person holds the conversation: stored, counted, announced;
    returns the hold message the customer gets."""
    turn = ctx.agent
    agent = turn.agent
    text = hitl_settings.of(agent).hold_message
    ctx.status = 200
    turn.escalation_id = turn.hold
    turn.steps.append({"step": 0, "kind": "held", "status": "joined", "name": turn.hold})
    new = from_client(turn.new_messages)
    stored = [*new, {"role": "assistant", "content": text}] if text else new
    try:
        await svc.memory.append(
            agent.tenant,
            agent,
            turn.conversation_id,
            stored,
            request_id=ctx.request_id,
            prompt_version=turn.selection.version.version,
            variant=turn.selection.variant,
            erased=turn.erased_mark,
        )
    except Exception as exc:
        turn.memory_error = f"store failed: {type(exc).__name__}"
        log.warning("a held conversation's message was not stored: %s", type(exc).__name__)
    # Counted on the escalation off the request path: the answer waits for no PostgreSQL.
    spawn_count(svc, agent, turn.conversation_id, turn.hold)
    return text


_PENDING: set[asyncio.Task] = set()  # counting tasks in flight (a reference keeps them alive)
# A held message costs its turn no PostgreSQL, but its count does: a flood of held messages must
# not become a flood of UPDATEs taking every pooled connection. At most MAX_COUNTING wait, at most
# COUNTING_CONCURRENCY run; beyond that a message is stored but not counted (the count lags).
MAX_COUNTING = 1000
COUNTING_CONCURRENCY = 4
_SLOTS = asyncio.Semaphore(COUNTING_CONCURRENCY)


def spawn_count(svc, agent, conversation_id: str, escalation_id: str) -> bool:
    if len(_PENDING) >= MAX_COUNTING:
        return False
    task = asyncio.ensure_future(_count(svc, agent, conversation_id, escalation_id))
    _PENDING.add(task)
    task.add_done_callback(_PENDING.discard)
    return True


async def _count(svc, agent, conversation_id: str, escalation_id: str) -> None:
    try:
        async with _SLOTS, asyncio.timeout(DB_TIMEOUT), svc.pool.acquire() as conn:
            row = await escalations.join(conn, agent.tenant, escalation_id)
        if row is None:  # resolved meanwhile (its key not yet gone): let the next message through
            await svc.hitl.holds.release(agent.tenant, agent.id, conversation_id, escalation_id)
        else:
            await held.publish(svc.redis, agent.tenant, "customer_message", row)
    except Exception as exc:  # the message is in memory; the count can lag
        log.warning("escalation %s: customer message not counted: %s", escalation_id, type(exc).__name__)


def _last_users(messages: list, n: int) -> list[dict]:
    """The last ``n`` user messages, oldest first, read from the end: a stateless client sends
    its whole history each turn, and only its last questions are compared."""
    found: list[dict] = []
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            found.append(m)
            if len(found) == n:
                break
    found.reverse()
    return found


def _signals(ctx: RequestContext, answer: dict) -> confidence.Signals:
    turn = ctx.agent
    new = turn.new_messages
    if len(new) == 1:  # (the usual turn: one message, no list walked)
        m = new[0]
        users = [m] if isinstance(m, dict) and m.get("role") == "user" else []
    else:
        users = _last_users(new, 4)
    question = _text(users[-1].get("content"))[: confidence.MAX_TEXT] if users else ""  # the last one
    previous = [_text(m.get("content"))[:2000] for m in users[-4:-1]]
    if len(previous) < 3:
        # the messages memory gave (after the system prompt), newest first: only the last three
        # questions are compared
        history = ctx.body.get("messages") or []
        for m in reversed(history[1 : turn.memory_loaded + 1]):
            if isinstance(m, dict) and m.get("role") == "user":
                content = m.get("content")
                previous.insert(0, (content if type(content) is str else _text(content))[:2000])
                if len(previous) >= 3:
                    break
    citations = turn.citations
    best = None
    if citations:
        sims = [c.get("similarity") for c in citations if isinstance(c.get("similarity"), int | float)]
        best = max(sims) if sims else None
    failures = 0
    escalate_tool = False
    for s in turn.steps:  # one pass: failed tools, and whether escalate_to_human ran
        if s.get("kind") == "tool":
            status = s.get("status")
            if status not in ("ok", None):
                failures += 1
            elif status == "ok" and s.get("name") == "escalate_to_human":
                escalate_tool = True
    urgency = None
    if escalate_tool:
        for m in ctx.extra.get("tool_messages", ()):
            for call in m.get("tool_calls") or () if m.get("role") == "assistant" else ():
                fn = call.get("function") or {}
                if fn.get("name") == "escalate_to_human":
                    try:
                        urgency = (orjson.loads(fn.get("arguments") or "{}") or {}).get("urgency")
                    except (orjson.JSONDecodeError, AttributeError):
                        pass
    return confidence.Signals(  # (positional, in the field order: a class called with keywords costs a dict)
        question,
        previous[-3:],
        _text(answer.get("content")),
        None,  # logprobs (after_answer adds them)
        bool(turn.agent.knowledge_bases),
        best,
        len(citations),
        escalate_tool,
        urgency if isinstance(urgency, str) else None,
        failures,
        turn.degraded,
    )


def _logprobs(raw: bytes) -> list[float] | None:
    """The answer's token log-probabilities, or None (a provider's odd shape costs the turn
    nothing: the signal is just missing)."""
    data = orjson.loads(raw)
    choices = data.get("choices") if isinstance(data, dict) else None
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    content = choice["logprobs"].get("content") if isinstance(choice.get("logprobs"), dict) else None
    if not isinstance(content, list) or not content:
        return None
    return [t["logprob"] for t in content if isinstance(t, dict) and isinstance(t.get("logprob"), int | float)]


async def after_answer(svc, ctx: RequestContext, raw: bytes, message: dict) -> tuple[bytes, dict]:
    """Scores the answer; escalates when it must. Returns the response and message to send."""
    turn = ctx.agent
    settings = hitl_settings.of(turn.agent)
    signals = _signals(ctx, message)
    added = ctx.extra.get("hitl_logprobs_added")
    if settings.logprobs:
        signals.logprobs = _logprobs(raw)
    if settings.judge_model and signals.question and not turn.degraded:
        signals.judge = await _judge(svc, ctx, settings.judge_model, signals.question, signals.answer)
    conf = confidence.score(signals, settings)
    turn.confidence = conf
    if added:  # the client did not ask for them
        data = orjson.loads(raw)
        for choice in data.get("choices") or ():
            if isinstance(choice, dict):
                choice["logprobs"] = None
        raw = orjson.dumps(data)
    if conf.escalate and turn.conversation_id is not None and getattr(svc, "hitl", None) is not None:
        escalation_id = await _open(svc, ctx, conf, signals)
        if escalation_id is not None:
            turn.escalation_id = escalation_id
            data = orjson.loads(raw)
            choice = (data.get("choices") or [{}])[0]
            out = {"role": "assistant"}
            if settings.mode == "answer_and_confirm" and signals.answer:
                out["content"] = f"{signals.answer}\n\n{settings.confirm_note}"
            else:
                out["content"] = settings.handoff_message
            if message.get("citations") and settings.mode == "answer_and_confirm":
                out["citations"] = message["citations"]
            choice["message"] = out
            choice["finish_reason"] = "stop"
            raw, message = orjson.dumps(data), out
    _observe("true" if turn.escalation_id else "false", conf.score)
    return raw, message


def score_streamed(ctx: RequestContext, text: str) -> None:
    """A live-streamed turn (an agent that never escalates): scored and recorded only."""
    turn = ctx.agent
    conf = confidence.score(_signals(ctx, {"content": text}), hitl_settings.of(turn.agent))
    conf.escalate = False
    turn.confidence = conf
    _observe("false", conf.score)


_OBSERVE: dict[str, object] = {}  # the metric's two children, resolved on first use (not .labels() per turn)


def _observe(escalated: str, value: float) -> None:
    observe = _OBSERVE.get(escalated)
    if observe is None:
        observe = _OBSERVE[escalated] = CONFIDENCE.labels(escalated).observe
    observe(value)


async def _erased_since_queued(svc, turn) -> bool:
    """Whether a channel's turn with a signed queue time (``turn.erased_mark``) had its conversation
    erased since (``channels.whatsapp.erasure``'s mark): its escalation would keep the erased
    conversation's words. The mark unreadable (Redis away): counted as erased, as no escalation
    written is (the customer gets the AI's answer)."""
    if turn.erased_mark is None:
        return False
    try:
        async with asyncio.timeout(DB_TIMEOUT):
            return await wa_erasure.erased_since(
                svc.redis, turn.agent.tenant, turn.conversation_id, turn.erased_mark[1]
            )
    except Exception as exc:
        log.warning("no escalation: its conversation's erasure mark could not be read: %s", type(exc).__name__)
        return True


def _loaded_at(turn, checked_us: int | None = None) -> float | None:
    """When the turn's words are known to predate no erasure from (unix seconds, Redis's clock, as
    an erasure's ``erased_at``): the earliest of its load finding the conversation empty (the
    window's ``since``: a first turn, whose ``seq`` tells nothing), its channel's signed queue
    time and the moment its window's ``seq`` was last compared with the erasures' (``checked_us``:
    an erasure before it is found by that comparison, one after it by this time); None when none
    is known."""
    times = [
        getattr(turn.history, "since", None),
        turn.erased_mark[1] if turn.erased_mark is not None else None,
        checked_us,
    ]
    known = [t for t in times if type(t) is int]
    return min(known) / 1_000_000 if known else None


async def _seq_checked_at(svc, seq) -> tuple[bool, int | None]:
    """Before a loaded window's ``seq`` is compared with the erasures' (Redis's): (whether there is
    one to compare, Redis's time now in µs, None when Redis cannot say). An erasure whose mark the
    comparison misses began after this time, and its record (``erased_at``, Redis's clock) is read
    again under the erasure's lock when the escalation is written: one that ran whole between the
    comparison and the write is found there."""
    if type(seq) is not int or seq <= 0:
        return False, None
    try:
        async with asyncio.timeout(DB_TIMEOUT):
            return True, await wa_erasure.redis_now_us(svc.redis)
    except Exception as exc:  # (then any erasure of the conversation counts: no escalation after one)
        log.warning("no time for the escalation's erasure check: %s", type(exc).__name__)
        return True, None


def _bounded_context(turn, conf, signals) -> dict:
    context = {
        "variables": turn.variables,
        "sources": turn.citations[:20],
        "reasons": conf.reasons,
        "rule": conf.rule,
        "memory_loaded": turn.memory_loaded,
        "prompt_version": turn.selection.version.version,
    }
    encoded = orjson.dumps(context, default=str)
    if len(encoded) > MAX_CONTEXT_BYTES:
        context["variables"] = {"omitted": "too large"}
    return context


async def _open(svc, ctx: RequestContext, conf, signals) -> str | None:
    turn = ctx.agent
    agent = turn.agent
    hitl = svc.hitl
    memory = getattr(svc, "memory", None)
    seq = getattr(turn.history, "seq", None)
    compared, checked_us = await _seq_checked_at(svc, seq) if memory is not None else (False, None)
    try:
        erased = memory is not None and await memory.erased_since(
            agent.tenant, agent.id, turn.conversation_id, seq, strict=True
        )
    except Exception as exc:  # (not compared: an erasure before checked_us would be found by neither)
        log.warning("the escalation's erasure check could not read Redis: %s", type(exc).__name__)
        erased, checked_us = False, None  # (then any erasure of the conversation counts)
    if erased:
        # loaded before the conversation was erased: an escalation would keep its words (the
        # customer's message, the draft) and hold it for a person; the turn's answer goes out
        log.info("no escalation for agent %s: its conversation was erased during the turn", agent.name)
        return None
    if await _erased_since_queued(svc, turn):  # (a first turn too: it loaded no seq to compare)
        log.info("no escalation for agent %s: its conversation was erased since it was queued", agent.name)
        return None
    since = _loaded_at(turn, checked_us)
    checked = compared or since is not None  # (else nothing tells this turn's words from an erased one's)
    settings = hitl_settings.of(agent)
    tier_name = hitl.config.tier_variable
    tier = turn.variables.get(tier_name)
    meta = ctx.body.get("metadata")
    if tier is None and isinstance(meta, dict):
        tier = meta.get(tier_name)
    tier = str(tier)[:32] if isinstance(tier, str | int) and not isinstance(tier, bool) else None
    slas = hitl.sla_for(conf.urgency)
    esc = {
        "id": escalations.new_id(),
        "tenant": agent.tenant,
        "agent_id": agent.id,
        "agent": agent.name,
        "conversation_id": turn.conversation_id,
        "request_id": ctx.request_id,
        "prompt_version": turn.selection.version.version,
        "variant": turn.selection.variant,
        "urgency": conf.urgency,
        "tier": tier,
        "base_priority": escalations.base_priority(conf.urgency, tier, hitl.config.tiers),
        "team": conf.team or settings.team,
        "skills": list(conf.skills or settings.skills),
        "confidence": conf.score,
        "reasons": conf.reasons,
        "question": signals.question,
        "draft": signals.answer,
        "context": _bounded_context(turn, conf, signals),
        "sla_first_s": slas.first_response_s,
        "sla_resolve_s": slas.resolution_s,
        "seq": seq,  # (a spooled one is not opened once the conversation was erased after this window)
        "since": since,  # (nor once it was erased after the turn loaded it: a first turn has no seq)
    }
    trigger = conf.rule or "low_confidence"
    try:
        async with asyncio.timeout(DB_TIMEOUT), svc.pool.acquire() as conn, conn.transaction():
            # (under the tenant's erasure lock, shared: an erasure committed since the turn's words
            # are known to predate any is read here; one that has not waits for this commit). Waited
            # for server.erasure_lock_wait_s at most, as a webhook: an erasure holds it as long as it
            # takes, its bucket is other tenants' too, and each turn waiting holds a pooled connection
            # (past it: spooled, the sweeper opens it, unless the erasure dropped it)
            wait_s = svc.config.server.erasure_lock_wait_s
            if checked:
                opened = await escalations.open_unless_erased(conn, esc, since, wait_s)
            else:
                opened = await escalations.open_locked(conn, esc, wait_s)
            if opened is None:
                log.info("no escalation for agent %s: its conversation was erased during the turn", agent.name)
                return None
            row, created = opened
            # (held before the commit, under that lock: the erasure that waits for it resolves the
            # escalation and releases this hold after it; held after the commit, the hold came after
            # that release and kept the conversation, the customer's next message held, 90 days)
            await _hold(hitl, agent, turn.conversation_id, row["id"])
    except Exception as exc:  # kept in Redis for the sweeper to open: the hand-over is not lost
        log.error("escalation not written for agent %s: %s", agent.name, type(exc).__name__)
        try:
            await held.spool(svc.redis, esc)
        except Exception as again:  # nowhere to keep it: the customer gets the AI's answer
            log.error("escalation lost for agent %s: %s", agent.name, type(again).__name__)
            turn.steps.append({"step": ctx.step, "kind": "escalation", "status": "error", "error": type(exc).__name__})
            return None
        ESCALATIONS.labels(trigger).inc()
        turn.steps.append({"step": ctx.step, "kind": "escalation", "status": "spooled", "error": type(exc).__name__})
        return esc["id"]
    ESCALATIONS.labels(trigger).inc()
    turn.steps.append({"step": ctx.step, "kind": "escalation", "status": "opened" if created else "joined"})
    await held.publish(svc.redis, agent.tenant, "opened" if created else "customer_message", row)
    return row["id"]


async def _hold(hitl, agent, conversation_id: str, escalation_id: str) -> None:
    try:
        async with asyncio.timeout(HOLD_TIMEOUT):
            await hitl.holds.hold(agent.tenant, agent.id, conversation_id, escalation_id)
    except Exception as exc:  # the escalation stands; the sweeper puts the missing hold back
        log.warning("escalation %s: conversation not held yet: %s", escalation_id, type(exc).__name__)


async def _judge(svc, ctx: RequestContext, model: str, question: str, answer: str) -> float | None:
    """The optional judge: one call through the gateway's router (fallbacks, retries, the audit
    record) to a cheap model group that answers with a number from 0 to 1."""
    from core.types import RequestContext as Ctx
    from gateway import pipeline

    group = svc.router.groups.get(model)
    ident = ctx.identity
    if group is None or (ident is not None and ident.models and model not in ident.models):
        return None  # a judge the caller's key may not use is not called
    body = {
        "model": model,
        "max_tokens": 5,
        "messages": [
            {
                "role": "system",
                "content": "Rate from 0 to 1 how well the answer resolves the customer's message. "
                "Reply with the number only.",
            },
            {"role": "user", "content": f"Customer: {question[:2000]}\n\nAnswer: {answer[:4000]}"},
        ],
    }
    jctx = Ctx(
        request_id=f"{ctx.request_id}-judge", endpoint="chat", body=body, started=time.perf_counter(), model=model
    )
    jctx.identity = ctx.identity
    jctx.extra["attribution"] = dict(ctx.extra.get("attribution") or {})  # the agent's, for the audit record
    # What holds for the turn holds for its judge: the tags the key and tenant require (zdr), the
    # key's model allow-list on every group a rule or fallback may reach, and PII scrubbing by
    # the policy of the judge's group (the customer's text and the answer leave the gateway again).
    jctx.constraints = ctx.constraints
    jctx.models_allowed = ident.models if ident is not None and ident.models else frozenset()
    try:
        await pipeline.scrub(svc, jctx)
        raw = await pipeline.complete(svc, jctx, svc.router.resolve(jctx, "chat"))
        await pipeline.settle(svc, jctx, {"headers": []})
        text = _text(((orjson.loads(raw).get("choices") or [{}])[0].get("message") or {}).get("content"))
        value = float(text.strip().split()[0])
    except Exception as exc:
        log.info("judge call gave no score: %s", type(exc).__name__)
        return None
    return value if 0.0 <= value <= 1.0 else None


def headers(turn) -> list[tuple[bytes, bytes]]:
    if turn.escalation_id is None:
        return []
    return [(b"x-gateway-escalation", turn.escalation_id.encode())]


def record(turn, run: dict | None = None) -> dict:
    """The run record's human-in-the-loop fields (a held turn names its escalation, but did not
    escalate: it is not counted again in the experiment report), added to ``run`` when given."""
    conf = turn.confidence
    if run is None:
        run = {}
    run["escalated"] = turn.escalation_id is not None and turn.hold is None
    run["escalation_id"] = turn.escalation_id
    run["confidence"] = conf.score if conf is not None else None
    run["confidence_reasons"] = conf.reasons if conf is not None else None
    return run
