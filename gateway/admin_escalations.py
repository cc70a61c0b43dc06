"""The human side of human in the loop (``/admin/escalations...``, ``/admin/agents/{name}/learned``,
``/admin/agents/{name}/training-data``, ``/admin/agents/{name}/conversations/{id}/messages``).

Mounted into gateway/admin.py: authenticated, access-logged, tenant-scoped like every admin route
(filtered in SQL and walled by row-level security; the super-admin sees every tenant). The person
working an item is the authenticated key (its id is the lease holder), never a field of a body.

    GET  /admin/escalations                  the queue (?team= &skill= &status= &urgency= &limit=), by priority
    GET  /admin/escalations/feed             server-sent events of queue changes (every replica's)
    GET  /admin/escalations/stats            waiting, in progress, breached, p50/p90 by team and urgency
    POST /admin/escalations/claim-next       {"team", "skill"}: the highest-priority item, claimed
    GET  /admin/escalations/{id}             the context handoff
    POST /admin/escalations/{id}/claim       a lease (``hitl.lease_s``); 409 when someone else holds it
    POST /admin/escalations/{id}/reply       {"text"}: stored in memory, delivered through the channel
    POST /admin/escalations/{id}/resolve     {"outcome", "corrected_answer", "approve_draft", "reply"}
    POST /admin/escalations/{id}/reassign    {"team", "skills", "urgency"}
    POST /admin/escalations/{id}/release     back to the queue

A reply (``/reply``, ``/resolve`` with ``reply``) to a channel conversation the erasure marks (a
WhatsApp customer's) takes Redis's time before it checks the escalation: an erasure of the
conversation marked since (before the reply was stored, before it was sent) refuses it with 409
``conversation_erased`` and nothing of it is kept (the memory's ``erased`` check, the deliverer's
``erasure.after_send``), and so is one whose erasure began before and has not committed yet
(``_not_being_erased``); one that lands while the send is out leaves the customer the message,
and what the send wrote goes as the erasure's own did (the tag, no words). A reply to any other
conversation (an API client's, a VAPI call's) takes the time too and is held to the erasure time
the agent's memory keeps of the conversation (``runtime.memory.erasure_mark``) the same way: it
was stored under the id after the erasure when the two raced. Redis's clock out of reach, such a
reply is stored unchecked, as before (its memory write needs the rest of Redis anyway).
"""

from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime, timedelta

import orjson
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from channels.whatsapp.erasure import erased_key, mark_us, redis_now_us
from core import http
from core.errors import GatewayError, InvalidRequest, NotFound, RateLimited, ServiceUnavailable
from gateway import admin as base  # a module, not names: admin.py imports this module in turn
from gateway import admin_input as inp
from gateway import conversation_paths, hitl_service, hitl_stage
from gateway.agent_announce import announced
from gateway.agent_stage import ERASURE_MARKED, ConversationErased
from gateway.db import tenant_transaction
from runtime import agents as agent_store
from runtime.delivery import Outbound
from runtime.hitl import escalations, held, learning
from runtime.hitl.settings import URGENCIES
from runtime.memory import Erased, erasure_mark, erasure_mark_us

MAX_REPLY = 4000
HEARTBEAT_S = 15.0
# A Redis call of a reply's erasure check (its time, the erasure's mark) runs inside the check's
# transaction, the escalation's row locked: a call Redis does not answer counts as one that failed.
REDIS_S = 2.0
ID_RE = re.compile(r"^(esc|lex)_[0-9a-f]{16}$")
TEAM_RE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def _only(data: dict, allowed: set) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        name = str(unknown[0])[:64]
        raise InvalidRequest(
            f"Unknown parameter '{name}'; known: {', '.join(sorted(allowed))}.", param=name, code="unknown_parameter"
        )


def _team(value, param: str = "team") -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= 64 or not set(value) <= TEAM_RE_CHARS:
        raise InvalidRequest(f"'{param}' must be 1-64 letters, digits, '-' or '_'.", param=param, code="invalid_value")
    return value


def _reply_text(data: dict, name: str, required: bool) -> str | None:
    text = data.get(name)
    if text is None and not required:
        return None
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_REPLY or "\x00" in text:
        raise InvalidRequest(
            f"'{name}' must be a non-empty string of at most {MAX_REPLY} characters.", param=name, code="invalid_value"
        )
    return text


def _suggested(esc: dict) -> list[dict]:
    """What the person may do next, from why the agent was unsure."""
    out = []
    reasons = set(esc.get("reasons") or ())
    if esc.get("draft") and "fallback" not in reasons:
        out.append({"action": "approve_draft", "why": "the AI drafted an answer; send it as is if it is right"})
    if reasons & {"no_sources", "weak_sources"}:
        out.append(
            {"action": "correct_and_teach", "why": "no good source in the knowledge base; a correction is learned"}
        )
    if "tool_failure" in reasons:
        out.append({"action": "check_tools", "why": "a tool of the agent failed during the turn"})
    if reasons & {"asked_for_human", "escalate_tool"}:
        out.append({"action": "reply", "why": "the customer (or the agent) asked for a person"})
    if "negative_sentiment" in reasons or esc.get("urgency") in ("high", "urgent"):
        out.append({"action": "prioritise", "why": "the customer seems upset or the matter is urgent"})
    out.append({"action": "resolve", "why": "close it with an outcome (and a corrected answer to learn from)"})
    return out


class EscalationAdmin:
    def __init__(self, admin) -> None:
        self.admin = admin

    @property
    def svc(self):
        return self.admin.svc

    @property
    def hitl(self):
        if getattr(self.svc, "hitl", None) is None:
            raise ServiceUnavailable("Human in the loop is not enabled on this gateway.")
        return self.svc.hitl

    def routes(self) -> list[Route]:
        return [
            Route("/admin/escalations", self.list_queue, methods=["GET"]),
            Route("/admin/escalations/feed", self.feed, methods=["GET"]),
            Route("/admin/escalations/stats", self.stats, methods=["GET"]),
            Route("/admin/escalations/claim-next", self.claim_next, methods=["POST"]),
            Route("/admin/escalations/{id}", self.get, methods=["GET"]),
            Route("/admin/escalations/{id}/claim", self.claim, methods=["POST"]),
            Route("/admin/escalations/{id}/reply", self.reply, methods=["POST"]),
            Route("/admin/escalations/{id}/resolve", self.resolve, methods=["POST"]),
            Route("/admin/escalations/{id}/reassign", self.reassign, methods=["POST"]),
            Route("/admin/escalations/{id}/release", self.release, methods=["POST"]),
            Route("/admin/agents/{name}/learned", self.learned, methods=["GET"]),
            Route("/admin/agents/{name}/learned/{id}/approve", self.approve, methods=["POST"]),
            Route("/admin/agents/{name}/learned/{id}/reject", self.reject, methods=["POST"]),
            Route("/admin/agents/{name}/training-data", self.training_data, methods=["GET"]),
            Route("/admin/agents/{name}/conversations/{conversation_id:path}/messages", self.messages, methods=["GET"]),
        ]

    def _id(self, request: Request) -> str:
        value = request.path_params["id"]
        if not ID_RE.match(value):
            raise NotFound(f"No such item {value[:64]!r}.", param="id")
        return value

    async def _publish(self, kind: str, row: dict) -> None:
        await held.publish(self.svc.redis, row["tenant"], kind, row)

    # ---- the queue -----------------------------------------------------------------------------
    async def list_queue(self, request: Request) -> Response:
        q = request.query_params
        status = inp.text(dict(q), "status", choices=escalations.STATUSES)
        urgency = inp.text(dict(q), "urgency", choices=URGENCIES)
        limit = http.query_limit(q, 100, 500)
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            rows = await escalations.list_queue(
                conn,
                base._view(request),
                team=_team(q.get("team")),
                status=status,
                urgency=urgency,
                skill=_team(q.get("skill"), "skill"),
                aging=self.hitl.config.aging_per_minute,
                limit=limit,
            )
        return base._json({"object": "list", "data": [_summary(r) for r in rows]})

    async def stats(self, request: Request) -> Response:
        since = inp.when(request.query_params.get("from"), "from") or datetime.now(UTC) - timedelta(days=7)
        async with self.admin.report_transaction(request) as conn:  # ('from' may be years back)
            rows = await escalations.stats(conn, base._view(request), since)
        totals = {k: sum(r[k] for r in rows) for k in ("waiting", "in_progress", "resolved", "breached")}
        return base._json({"object": "escalation.stats", "from": since, **totals, "data": rows})

    async def feed(self, request: Request) -> StreamingResponse:
        hitl = self.hitl
        tenant = base._view(request)
        if not hitl.feed.has_room(tenant):
            raise RateLimited(
                "Too many open escalation feeds; close one (or use another replica).", code="too_many_feeds"
            )

        async def still_valid() -> bool:
            """A stream outlives its authentication: the key (and its address) is checked again —
            from the cache, which revocations reach by pub/sub — before anything more is sent."""
            try:
                await self.svc.auth.authenticate_scope(request.scope)
            except GatewayError:
                return False
            return True

        async def events():
            try:
                with hitl.feed.subscribe(tenant) as queue:
                    yield b": connected\n\n"
                    while True:
                        try:
                            event = await asyncio.wait_for(queue.get(), HEARTBEAT_S)
                        except TimeoutError:
                            event = b""
                        if event is None or not await still_valid():  # stopping, or the key was revoked
                            return
                        if event == b"":
                            yield b": keep-alive\n\n"
                            continue
                        yield b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"
            except held.FeedFull:  # filled between the check above and this stream's start
                yield b": too many open feeds\n\n"

        headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    async def get(self, request: Request) -> Response:
        """The context handoff: the escalation, the whole conversation, the customer's variables,
        the sources retrieved, the AI's draft and why confidence was low, suggested actions."""
        esc_id = self._id(request)
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            esc = await escalations.must_get(conn, base._view(request), esc_id)
        conversation = await self._conversation(esc["tenant"], esc["agent_id"], esc["conversation_id"])
        context = esc.get("context") or {}
        return base._json(
            {
                **esc,
                "conversation": conversation,
                "variables": context.get("variables") or {},
                "sources": context.get("sources") or [],
                "why": {"confidence": esc["confidence"], "reasons": esc["reasons"], "rule": context.get("rule")},
                "suggested_actions": _suggested(esc),
            }
        )

    async def _conversation(self, tenant: str, agent_id: str, conversation_id: str) -> list[dict]:
        """Every message PostgreSQL has, then what Redis holds beyond it (stored a moment ago)."""
        rows = await self.svc.memory.history(tenant, agent_id, conversation_id, limit=1000)
        messages = [r["message"] for r in rows]
        agent = self.svc.agents.by_id(agent_id) if self.svc.agents is not None else None
        if agent is not None:
            from runtime.memory import keys

            window_key, _ = keys(tenant, agent_id, conversation_id)
            last = rows[-1]["seq"] if rows else 0
            for raw in await self.svc.redis.lrange(window_key, 0, -1):
                entry = orjson.loads(raw)
                if entry.get("s", 0) > last:
                    messages.append(entry["m"])
        return messages

    async def claim(self, request: Request) -> Response:
        esc_id = self._id(request)
        holder = base._ident(request).key_id
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            esc = await escalations.claim(conn, base._view(request), esc_id, holder, self.hitl.config.lease_s)
        await self._publish("claimed", esc)
        return base._json(_summary(esc))

    async def claim_next(self, request: Request) -> Response:
        data = await inp.body(request)
        _only(data, {"team", "skill"})
        holder = base._ident(request).key_id
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            esc = await escalations.claim_next(
                conn,
                base._view(request),
                holder,
                self.hitl.config.lease_s,
                team=_team(data.get("team")),
                skill=_team(data.get("skill"), "skill"),
                aging=self.hitl.config.aging_per_minute,
            )
        if esc is None:
            raise NotFound("The queue is empty.", param="team", code="queue_empty")
        await self._publish("claimed", esc)
        return base._json(_summary(esc))

    async def _asked_at(self) -> int | None:
        """Redis's time (µs), taken before the escalation is checked: an erasure marked since is
        one the reply raced (``_send``) — the channel's mark of a channel conversation, the
        memory's own (``runtime.memory.erasure_mark``) of any other (an API client's, a call's: a
        reply racing its erasure was stored under the id after it). None when Redis cannot tell
        the time: a reply to a conversation no channel marks is then stored unchecked, as before
        erasures were compared (a failing clock does not refuse it); a channel's is refused (503,
        ``_not_being_erased``)."""
        try:
            async with asyncio.timeout(REDIS_S):
                return await redis_now_us(self.svc.redis)
        except (RedisError, OSError, TimeoutError):
            return None

    async def _not_being_erased(self, conn, esc: dict, asked_us: int | None) -> None:
        """In the escalation check's transaction (its row locked: ``check_can_reply`` with a
        holder), after it: 409 ``conversation_erased`` when the conversation's erasure was marked
        after the reply was asked for, or when the escalation was there when the mark was set:
        the erased conversation's, about to be resolved with the tag (its erasure began and has
        not committed; committed, it would be resolved). Not by the erasure's record: the erasure
        marks the conversation again once it has committed (its second channel step), so no
        record of a finished erasure is at or after its mark, and an agent made since has none.
        An escalation opened after the mark is a new conversation's."""
        marked = esc["conversation_id"].startswith(ERASURE_MARKED)
        if asked_us is None and not marked:  # (Redis's clock out of reach: see _asked_at)
            return
        if asked_us is None:  # (Redis's clock out of reach: a channel's conversation is refused for now)
            raise ServiceUnavailable("The reply could not be sent just now; try again.")
        try:
            async with asyncio.timeout(REDIS_S):
                if marked:
                    mark = await mark_us(self.svc.redis, esc["tenant"], esc["conversation_id"])
                else:  # (an API client's conversation: the agent's memory keeps its erasure's time)
                    mark = await erasure_mark_us(self.svc.redis, esc["tenant"], esc["agent_id"], esc["conversation_id"])
        except (RedisError, OSError, TimeoutError) as exc:
            raise ServiceUnavailable(f"The reply could not be sent just now ({type(exc).__name__}).") from None
        if mark is None:
            return
        if mark >= asked_us:
            raise _erased(esc)
        before = await conn.fetchval(
            "SELECT created_at <= to_timestamp($2) FROM escalations WHERE id = $1", esc["id"], mark / 1_000_000
        )
        if before is not False:
            raise _erased(esc)

    async def _send(self, request: Request, esc: dict, text: str, asked_us: int | None) -> dict:
        """A person's reply: into the conversation's memory (the next turn's history, and what a
        REST client reads back), then to the customer through the channel that owns it. Neither
        once the conversation was erased after ``asked_us`` (409 ``conversation_erased``)."""
        agent = self.svc.agents.by_id(esc["agent_id"]) if self.svc.agents is not None else None
        if agent is None:
            raise NotFound("The escalation's agent no longer exists.", param="id", code="agent_gone")
        marked = esc["conversation_id"].startswith(ERASURE_MARKED)
        mark = (
            erased_key(esc["tenant"], esc["conversation_id"])
            if marked
            else erasure_mark(esc["tenant"], agent.id, esc["conversation_id"])
        )
        try:
            await self.svc.memory.append(
                esc["tenant"],
                agent,
                esc["conversation_id"],
                [{"role": "assistant", "content": text, "name": hitl_stage.HUMAN}],
                request_id=f"{esc['id']}-{int(time.time() * 1000)}",
                prompt_version=esc.get("prompt_version") or 0,
                variant=esc.get("variant"),
                erased=(mark, asked_us) if asked_us is not None else None,
            )
        except Erased:
            raise _erased(esc) from None
        out = await self.svc.delivery.deliver(
            Outbound(
                esc["tenant"],
                esc["agent"],
                esc["conversation_id"],
                text,
                kind="human_reply",
                ref=esc["id"],
                queued_us=asked_us if marked else None,
            )
        )
        if out.status == "erased":
            raise _erased(esc)
        return {"channel": out.channel, "status": out.status, "detail": out.detail, "at": time.time()}

    async def reply(self, request: Request) -> Response:
        esc_id = self._id(request)
        data = await inp.body(request)
        _only(data, {"text"})
        text = _reply_text(data, "text", required=True)
        holder = base._ident(request).key_id
        asked = await self._asked_at()
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            esc = await escalations.check_can_reply(conn, base._view(request), esc_id, holder)
            await self._not_being_erased(conn, esc, asked)
        delivery = await self._send(request, esc, text, asked)
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            esc = await escalations.record_reply(
                conn, base._view(request), esc_id, holder, delivery, self.hitl.config.lease_s
            )
        await self._publish("replied", esc)
        return base._json({**_summary(esc), "delivery": delivery})

    async def resolve(self, request: Request) -> Response:
        esc_id = self._id(request)
        data = await inp.body(request)
        _only(data, {"outcome", "corrected_answer", "approve_draft", "reply"})
        outcome = inp.text(data, "outcome", choices=escalations.OUTCOMES) or "resolved"
        corrected = data.get("corrected_answer")
        if corrected is not None and (
            not isinstance(corrected, str)
            or not corrected.strip()
            or len(corrected) > learning.MAX_ANSWER
            or "\x00" in corrected
        ):
            raise InvalidRequest(
                f"'corrected_answer' must be a non-empty string of at most {learning.MAX_ANSWER} characters.",
                param="corrected_answer",
                code="invalid_value",
            )
        approve = data.get("approve_draft", False)
        if not isinstance(approve, bool):
            raise InvalidRequest("'approve_draft' must be true or false.", param="approve_draft", code="invalid_type")
        reply = _reply_text(data, "reply", required=False)
        ident = base._ident(request)
        asked = await self._asked_at() if reply is not None else None
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            esc = await escalations.check_can_reply(conn, base._view(request), esc_id, ident.key_id)
            if reply is not None:
                await self._not_being_erased(conn, esc, asked)
        answer = corrected or (esc.get("draft") if approve else None)
        if answer:  # redacted before anything is sent: a PII stage that fails stops the whole resolve
            agent = self.svc.agents.by_id(esc["agent_id"]) if self.svc.agents is not None else None
            question, answer = await hitl_service.redact_for_learning(
                self.svc.pii,
                esc["tenant"],
                agent.model if agent is not None else "",
                [esc.get("question") or "", answer],
                "corrected_answer" if corrected else "approve_draft",
            )
        delivery = await self._send(request, esc, reply, asked) if reply is not None else None
        if delivery is not None:  # recorded on its own (as /reply does): sent is sent, whatever the resolve finds
            async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
                await escalations.record_reply(
                    conn, base._view(request), esc_id, ident.key_id, delivery, self.hitl.config.lease_s
                )
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            esc = await escalations.resolve(
                conn,
                base._view(request),
                esc_id,
                ident.key_id,
                by=ident.key_id,
                outcome=outcome,
                corrected_answer=corrected,
            )
            example = None
            if answer:
                example = await learning.add(
                    conn,
                    tenant=esc["tenant"],
                    agent_id=esc["agent_id"],
                    escalation_id=esc["id"],
                    question=question,
                    answer=answer,
                    created_by=ident.key_id,
                )
        await self.hitl.holds.release(esc["tenant"], esc["agent_id"], esc["conversation_id"], esc["id"])
        await self._publish("resolved", esc)
        return base._json({**_summary(esc), "delivery": delivery, "learned_example": example})

    async def reassign(self, request: Request) -> Response:
        esc_id = self._id(request)
        data = await inp.body(request)
        _only(data, {"team", "skills", "urgency"})
        team = _team(data.get("team"))
        if team is None:
            raise InvalidRequest("Missing required parameter: 'team'.", param="team", code="missing_required_parameter")
        skills = inp.str_list(data, "skills") if data.get("skills") is not None else None
        if skills is not None:
            skills = [_team(s, "skills") for s in skills[:32]]
        urgency = inp.text(data, "urgency", choices=URGENCIES)
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            esc = await escalations.reassign(
                conn, base._view(request), esc_id, team=team, skills=skills, urgency=urgency
            )
        await self._publish("reassigned", esc)
        return base._json(_summary(esc))

    async def release(self, request: Request) -> Response:
        esc_id = self._id(request)
        holder = base._ident(request).key_id
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            esc = await escalations.release(conn, base._view(request), esc_id, holder)
        await self._publish("released", esc)
        return base._json(_summary(esc))

    # ---- learning ------------------------------------------------------------------------------
    async def _agent(self, request: Request, conn):
        name = request.path_params["name"]
        found = (
            await agent_store.find_agents(conn, name[:64], base._view(request))
            if agent_store.NAME_RE.match(name)
            else []
        )
        if len(found) != 1:
            if len(found) > 1:
                raise InvalidRequest(
                    f"Several tenants have an agent named {name!r}; name one with ?tenant=.",
                    param="tenant",
                    code="ambiguous_agent",
                )
            raise NotFound(f"No agent named {name[:64]!r}.", param="name")
        return found[0]

    async def learned(self, request: Request) -> Response:
        status = inp.text(dict(request.query_params), "status", choices=learning.STATUSES)
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            agent = await self._agent(request, conn)
            rows = await learning.list_for(conn, agent.tenant, agent.id, status)
        return base._json({"object": "list", "agent": agent.name, "data": rows})

    async def approve(self, request: Request) -> Response:
        return await self._review(request, learning.approve)

    async def reject(self, request: Request) -> Response:
        return await self._review(request, learning.reject)

    async def _review(self, request: Request, action) -> Response:
        example_id = self._id(request)
        indexer = self.hitl.indexer
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            agent = await self._agent(request, conn)
            example = await action(conn, agent, example_id, base._ident(request).key_id, indexer)
        headers: dict[str, str] = {}
        if agent.id in indexer.changed_agents:  # the learned-answers knowledge base was attached
            indexer.changed_agents.discard(agent.id)
            headers = await announced(self.svc, agent.id)
        return base._json(example, headers=headers)

    async def training_data(self, request: Request) -> StreamingResponse:
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            agent = await self._agent(request, conn)

        def transaction():
            return tenant_transaction(self.svc.pool, base._wall(request))

        async def lines():  # a page per transaction: a slow reader holds no pooled connection
            async for line in learning.training_data(transaction, agent.tenant, agent.id):
                yield line

        return StreamingResponse(
            lines(),
            media_type="application/jsonl",
            headers={"content-disposition": f'attachment; filename="{agent.name}-training.jsonl"'},
        )

    async def messages(self, request: Request) -> Response:
        """A conversation's messages, the people's replies included (``name: "human"``): how a
        REST client's operator reads what was said while a person held it."""
        conversation_id = conversation_paths.admin_conversation_id(request.scope, request.path_params, messages=True)
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            agent = await self._agent(request, conn)
            row = await conn.fetchrow(
                """SELECT id, status FROM escalations WHERE tenant = $1 AND agent_id = $2 AND conversation_id = $3
                   ORDER BY created_at DESC LIMIT 1""",
                agent.tenant,
                agent.id,
                conversation_id,
            )
        messages = await self._conversation(agent.tenant, agent.id, conversation_id)
        return base._json(
            {
                "object": "list",
                "agent": agent.name,
                "conversation_id": conversation_id,
                "escalation": dict(row) if row else None,
                "data": messages,
            }
        )


def _erased(esc: dict) -> ConversationErased:
    return ConversationErased(
        f"The conversation of escalation {esc['id']} was erased while the reply was on its way; "
        "it was neither sent nor kept.",
        param="id",
    )


def _summary(esc: dict) -> dict:
    """An escalation without its bulky context (the handoff route shows that)."""
    return {k: v for k, v in esc.items() if k != "context"}


def routes(admin) -> list[Route]:
    return EscalationAdmin(admin).routes()
