"""``DELETE /admin/agents/{name}/conversations/{conversation_id}``: a conversation erased on
request (a customer's right to erasure): its messages in PostgreSQL, its recent window in Redis,
its memory dead letters (turns PostgreSQL refused), a channel conversation's queue dead letters
(a WhatsApp customer's message, or a send to them, that failed after its last retry) and the
files a WhatsApp customer sent (documents, audio, images), for this tenant only
(``channels.whatsapp.erasure``), the answers kept to replay its turns
(``Idempotency-Key``), and the feedback given on it or on its turns.
Turns recorded up to the erasure that were still on their way to PostgreSQL (the memory stream, a
spill on disk) are skipped when they arrive (``runtime.conversations.erase`` records the erasure,
under a keyed hash of tenant and id only: ``core.erasure_key``). A turn that comes after it starts
the conversation anew. A WhatsApp conversation's jobs queued before the erasure are dropped, and
a turn of it under way is neither sent nor kept (``channels.whatsapp.erasure.mark_erased``).

The copies of its words are cleared with it (``runtime.conversations.forget_copies``, which the
retention shares): a channel's records of the conversation (``whatsapp_messages``,
``vapi_calls``) stay, for their delivery statuses, durations and costs, but lose the words they
kept (a message's body; a call's transcript, summary and recording link, cleared with its number
under the erasure's lock: ``runtime.erased_records``); its escalations stay
too (their lifecycle, SLAs and outcome) without the words they kept (the customer's question, the
AI's draft, the person's answer, the context shown); the learned examples drawn from them that
nobody approved are deleted.

A WhatsApp conversation's id (``wa:<phone_number_id>:<wa_id>``) holds the customer's number, and
no record of it keeps the number (``runtime.erased_records``): its message records hold the tag
below as their conversation and customer (the same tag as its ledger rows: they still belong
together; a status Meta sends later finds its message by wamid and moves its status only, and one
of a wamid never recorded is kept without its recipient); the channel's state of it
(``whatsapp_conversations``: agent, last inbound message for the 24-hour window, profile name,
the number as its key) is deleted, not tagged — a customer who writes again starts a new
conversation with a window of its own, as after any erasure, and nothing is sent from the old
state; its escalations hold the tag, and one still open is resolved (outcome ``erased``: there is
nothing left to answer, and its hold would keep the customer's next message from the agent) and
its hold in Redis released. The channel's Redis state naming the number goes too
(``channels.whatsapp.erasure``: the status queue's dead letters, the send aliases of the number).
Its escalations still waiting in Redis for the sweeper (PostgreSQL could not take them on their
turns; they hold the id and the customer's words) are dropped (``runtime.hitl.held.drop_spooled``).
The same customer's conversation on another business number, or in another tenant, is another
conversation and keeps its records.

A WhatsApp conversation is the customer's, not an agent's: its id is the business number and
the customer's number, its channel state (``whatsapp_conversations``) and erasure mark are one
per tenant and id whichever agent answered it (the number's agent may change in the config, a
client with the channel's key may talk to the id through another agent). A customer who asks to
be erased expects their number gone from that tenant's channel for that business number, and an
erasure of X's conversation that deleted the shared channel state and set the mark (so Y's next
turns were refused) but left agent Y's memory and its open escalation naming the number was
half of each. So the erasure of a channel conversation (``agent_stage.ERASURE_MARKED``) covers
every agent of the tenant that served it (``_channel_agents``: active and deleted), as
it covers every agent that had the path's name: their messages, windows, escalations (resolved,
holds released), dead letters, replay answers and the tag in their runs. An agent whose turn of
a moment ago is still on its way to PostgreSQL is known to Redis only (its window and seq
counter: ``Memory.holding``, asked once the conversation is marked), and is covered too. One
whose turn neither store knows any more (spilled to disk, written after a restart) is covered
by the erasure's record for every agent (``runtime.conversations.erase_for_every_agent``): the
memory and runs writers skip (tag) any agent's turn recorded up to it. A plain API
conversation's id is the client's to choose per agent and stays per agent.

A send to the customer racing the erasure keeps nothing of them either: a person's reply to an
escalation takes Redis's time before it checks the escalation and is refused (409
``conversation_erased``) if the conversation is marked erased since, before it is stored or sent
(``gateway.admin_escalations``); every send path reads the mark again once its send is over
(``channels.whatsapp.erasure.after_send``), and a send the erasure overtook (sent, failed or
unknown) leaves its record tagged without words, no channel state and no dead letter.

Kept without the id: the audit ledger (tokens and cost, never content) and run records (sizes
and durations, never content) hold ``erased:<keyed hash>`` in its place (``runtime.erased_records``:
the rows written, those on their way, the writers' dead letters in Redis and this replica's
``ledger-dead.jsonl``; another replica's file, in its own data directory, keeps them until an
erasure or retention of the id is served there). A ledger row's end user and customer become the
tag too when they are the conversation's party (``core.erasure_key.names_party``): the id or its
last part (a WhatsApp customer's number) or, in a VAPI call's conversation (``vapi:<call id>``),
the caller — their number, the channel's pseudonym of it, a web call's id. That call's record
(``vapi_calls``) keeps its duration and cost with the tag as its caller's number (not NULL: a
status update VAPI sends later fills only what is unknown, so it cannot bring the number back, and
the call's report is then recorded under the tag, without its transcript, summary and
recording; a record first written once the call was under way, likewise: ``channels.vapi.calls``, whose
report holds the erasure's lock shared, so the two never run at once); no callback is placed to
it. The same caller's other calls are other conversations and keep the number: the channel
treats a caller as a person across calls only for limits and budgets (end user, customer), not
for its conversations.
Left as they are: approved learned examples (curated by a reviewer, redacted for
learning, indexed as the agent's knowledge: reject them through their own route).

PostgreSQL's part is one transaction that takes the tenant's erasure lock before any row (the
writers of the records it rewrites, a retention sweep among them, take it shared before theirs:
one lock order, ``runtime.conversations.lock_erasures``). Aborted anyway (a deadlock's victim, a
serialization failure), it is run again whole a few times (``gateway.db.retried``; Redis's steps
around it are not repeated), then answered 503 as when Redis is away: erasing is safe to repeat.

The id is the path after ``/conversations/``, percent-decoded (``gateway.conversation_paths``):
``DELETE …/x/messages`` is refused (405), never the erasure of a conversation ``x/messages``.

Who may: the tenant's admin keys for its agents (tenant-scoped like every admin route), the
super-admin for any (``?tenant=`` when names clash). The agent may have been deleted since (its
conversations are kept): the conversation is erased with every agent that had the name.
"""

from __future__ import annotations

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.erasure_key import conversation_tag
from core.errors import InvalidRequest, NotFound, ServiceUnavailable
from gateway import admin as base  # a module, not names: admin.py imports this module in turn
from gateway import admin_reports, conversation_paths
from gateway.agent_stage import ERASURE_MARKED
from gateway.db import ABORTED, retried, tenant_transaction
from runtime import agents as agents_store
from runtime import conversations
from runtime.hitl import held
from runtime.memory import SEQ_GRACE_S
from runtime.types import MemorySettings

MAX_EARLIER_HOLDS = 10  # escalations earlier erasures of a conversation resolved, their holds released again
MAX_AGENT_GENERATIONS = 100  # agents of one name (the active one and those deleted) one erasure covers


class ConversationAdmin:
    def __init__(self, admin) -> None:
        self.admin = admin
        # (the erasures running, per tenant: each waits for the tenant's erasure lock on a pooled
        # connection, server.erasures_per_tenant at once)
        self.running = admin_reports.Running("conversation erasures", "server.erasures_per_tenant", "too_many_erasures")

    @property
    def svc(self):
        return self.admin.svc

    def routes(self) -> list[Route]:
        return [Route("/admin/agents/{name}/conversations/{conversation_id:path}", self.erase, methods=["DELETE"])]

    async def erase(self, request: Request) -> Response:
        conversation_id = conversation_paths.admin_conversation_id(request.scope, request.path_params, messages=False)
        _audit_as_tag(request, base._view(request) or "", conversation_id)  # (the id may be a phone number)
        if self.svc.memory is None:
            raise ServiceUnavailable("Conversation memory is not enabled on this gateway.")
        every_agent = conversation_id.startswith(ERASURE_MARKED)  # the customer's, whichever agent served them
        unknown: list = []  # (the tenant's agents PostgreSQL knows of no state of the conversation)
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            name, tenant, agent_ids = await _agents_named(request, conn)
            names = [name]
            if every_agent:
                others = await _channel_agents(conn, tenant, agent_ids, conversation_id)
                agent_ids += [r["id"] for r in others]
                names += list(dict.fromkeys(r["name"] for r in others if r["name"] != name))
                unknown = await _other_agents(conn, tenant, agent_ids)
        _audit_as_tag(request, tenant, conversation_id)
        # Redis first (a turn that starts now finds nothing to answer with), then PostgreSQL and
        # the erasure's record in one transaction, then Redis again: a turn stored meanwhile, or a
        # reload that read PostgreSQL before the commit, is dropped too.
        # (each of a tenant's erasures waits for its erasure lock on a pooled connection: 429 before
        # any change past server.erasures_per_tenant at once)
        async with self.running.one(tenant, self.svc.config.server.erasures_per_tenant, redis=self.svc.redis):
            try:
                # (a channel's conversation marked first: its jobs queued before now are dropped, and a
                # turn of one signed so, x-gateway-queued-at, stores nothing from now on — a first turn
                # too, which the memory's erasure below cannot stop: it loaded no seq. Marked after
                # it, a first turn stored between the two reached PostgreSQL after the erasure.)
                if self.svc.forget_channel is not None:
                    await self.svc.forget_channel(tenant, [conversation_id])
                if unknown:  # (an agent whose turn of a moment ago is still on its way to PostgreSQL)
                    held_by = set(await self.svc.memory.holding(tenant, [r["id"] for r in unknown], conversation_id))
                    found = [r for r in unknown if r["id"] in held_by]
                    agent_ids += [r["id"] for r in found]
                    names += list(dict.fromkeys(r["name"] for r in found if r["name"] not in names))
                # (each agent's erasure is stamped with Redis's clock, as the turns it skips are)
                forgot = [
                    await self.svc.memory.forget_recent(tenant, agent_id, conversation_id) for agent_id in agent_ids
                ]
                # (PostgreSQL's part alone is tried again when aborted: Redis's before and after it once)
                feedback, messages, resolved = await retried(
                    lambda: self._erase_rows(request, tenant, agent_ids, conversation_id, forgot, every_agent)
                )
                await self._release_holds(request, tenant, agent_ids, conversation_id, resolved)
                for agent_id in agent_ids:
                    await self.svc.memory.forget_recent(tenant, agent_id, conversation_id)
                # (after the commit: a turn the memory writer refused until then is among them)
                await self.svc.memory.drop_dead_letters(tenant, [(agent_id, conversation_id) for agent_id in agent_ids])
                # (after the commit too: an escalation its turn could not write, waiting for the sweeper)
                await held.drop_spooled(self.svc.redis, tenant, agent_ids, conversation_id)
                if self.svc.forget_channel is not None:  # (again: its dead letters, its customer's files)
                    await self.svc.forget_channel(tenant, [conversation_id])
                idempotency = getattr(self.admin.gateway, "idempotency", None)
                if idempotency is not None:  # the answers kept to replay its turns (Idempotency-Key)
                    for agent_name in names:
                        await idempotency.forget_conversation(tenant, agent_name, conversation_id)
            except (RedisError, OSError, TimeoutError, *ABORTED) as exc:
                raise ServiceUnavailable(
                    f"The conversation could not be erased just now ({type(exc).__name__}); erasing is safe to repeat."
                ) from None
        return base._json(
            {
                "object": "conversation.deleted",
                "agent": name,
                "conversation_id": conversation_id,
                "deleted": True,
                "messages": messages,
                "feedback": feedback,
            }
        )

    async def _erase_rows(
        self,
        request: Request,
        tenant: str,
        agent_ids: list[str],
        conversation_id: str,
        forgot: list[tuple[int, float]],
        every_agent: bool,
    ) -> tuple[int, int, list[tuple[str, str, str]]]:
        """PostgreSQL's part of the erasure, one transaction (``gateway.db.retried``: run again
        whole when PostgreSQL aborts it; the erasure's times are Redis's, taken before it, so a
        second run records the same). The tenant's erasure lock first, before any row: a
        retention sweep (``gateway.conversation_retention``) and a WhatsApp send's record
        (``channels.whatsapp.store.OutboundRecords``) take it (shared) before their rows too,
        so neither holds a row the erasure waits for while waiting for a row it holds (the copies'
        rows taken before the lock, and the conversation's after it, deadlocked both). The
        feedback deleted, the messages, the escalations resolved."""
        messages = 0
        resolved: list[tuple[str, str, str]] = []
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            await conversations.lock_erasures(conn, tenant)
            feedback = await conversations.forget_copies(conn, tenant, agent_ids, [conversation_id])
            for agent_id, (handed_out, at) in zip(agent_ids, forgot, strict=True):
                gone = await conversations.erase(conn, tenant, agent_id, conversation_id, at, copies=False)
                # (PostgreSQL's, or the number Redis handed out when turns were still on their way)
                messages += max(gone["messages"], handed_out)
                resolved += gone["resolved"]
            if every_agent:  # (any agent's turn still on its way, known to neither store: see there)
                last = max(at for _, at in forgot)
                await conversations.erase_for_every_agent(conn, tenant, conversation_id, last)
        return feedback, messages, resolved

    async def _release_holds(
        self, request: Request, tenant: str, agent_ids: list[str], conversation_id: str, resolved: list
    ) -> None:
        """The holds (``runtime.hitl.held``) of the escalations the erasure resolved: a customer
        who writes again is answered, not held for a person with no conversation to answer. Those
        an earlier erasure of the conversation resolved too (the newest few, by the tag they hold):
        one whose hold Redis failed to release (503) is released when the erasure is repeated,
        as its resolution is not found again. A hold names its escalation: a newer one's stays."""
        hitl = self.svc.hitl
        if hitl is None:
            return
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            earlier = await conn.fetch(
                """SELECT agent_id, id FROM escalations
                   WHERE tenant = $1 AND agent_id = ANY($2::text[]) AND conversation_id = $3
                     AND resolved_by = 'erasure' ORDER BY resolved_at DESC LIMIT $4""",
                tenant,
                agent_ids,
                conversation_tag(tenant, conversation_id),
                MAX_EARLIER_HOLDS,
            )
        holds = dict.fromkeys([(a, e) for a, _, e in resolved] + [(r["agent_id"], r["id"]) for r in earlier])
        for agent_id, escalation_id in holds:
            await hitl.holds.release(tenant, agent_id, conversation_id, escalation_id)


def _audit_as_tag(request: Request, tenant: str, conversation_id: str) -> None:
    """The access audit records the erasure's path with the conversation's tag in place of its id
    (``core.erasure_key``: the tenant's tag, as its runs and ledger rows keep it)."""
    name = request.path_params["name"]
    request.scope[base.AUDIT_PATH] = f"/admin/agents/{name}/conversations/{conversation_tag(tenant, conversation_id)}"


async def _agents_named(request: Request, conn) -> tuple[str, str, list[str]]:
    """The name, tenant and ids of the agents of the path's ``{name}`` the caller's view holds:
    the active one and those deleted before it (archived, their conversations kept), since a
    conversation with an agent outlives it. 404 when there is none; 400 when the super-admin's
    view holds the name in several tenants and no ``?tenant=``."""
    name = request.path_params["name"]
    rows = []
    if agents_store.NAME_RE.match(name):
        rows = await conn.fetch(
            """SELECT id, tenant FROM agents WHERE name = $1 AND ($2::text IS NULL OR tenant = $2)
               ORDER BY tenant, archived_at IS NULL, archived_at LIMIT $3""",
            name,
            base._view(request),
            MAX_AGENT_GENERATIONS + 1,
        )
    if not rows:
        raise NotFound(f"No agent named {name[:64]!r}.", param="name")
    if len({r["tenant"] for r in rows}) > 1:
        raise InvalidRequest(
            f"Several tenants have an agent named {name!r}; name one with ?tenant=.",
            param="tenant",
            code="ambiguous_agent",
        )
    if len(rows) > MAX_AGENT_GENERATIONS:
        raise InvalidRequest(
            f"More than {MAX_AGENT_GENERATIONS} agents were named {name!r}; erase with the super-admin's help.",
            param="name",
            code="too_many_agents",
        )
    return name, rows[0]["tenant"], [r["id"] for r in rows]


async def _channel_agents(conn, tenant: str, named: list[str], conversation_id: str) -> list:
    """The tenant's other agents that served the channel conversation (active or deleted): a
    conversation of theirs (memory), an escalation or a run under its id. A channel
    conversation's id is its customer's (a WhatsApp number on a business number), and every agent
    that served it is erased with it; one that never did holds nothing of it (each agent covered
    costs the erasure about ten statements under its lock: every agent of the tenant made an
    erasure take seconds with a thousand deleted agents)."""
    return await conn.fetch(
        """SELECT a.id, a.name FROM agents a
           WHERE a.tenant = $1 AND NOT (a.id = ANY($2::text[])) AND (
                 EXISTS (SELECT 1 FROM conversations c
                         WHERE c.tenant = $1 AND c.agent_id = a.id AND c.external_id = $3)
              OR EXISTS (SELECT 1 FROM escalations e
                         WHERE e.tenant = $1 AND e.agent_id = a.id AND e.conversation_id = $3)
              OR EXISTS (SELECT 1 FROM runs r
                         WHERE r.tenant = $1 AND r.agent_id = a.id AND r.conversation_id = $3))
           ORDER BY a.archived_at IS NOT NULL, a.archived_at DESC""",
        tenant,
        named,
        conversation_id,
    )


async def _other_agents(conn, tenant: str, known: list[str]) -> list:
    """The tenant's agents besides ``known`` (active and deleted): those of them Redis holds the
    channel conversation of are erased with it too (``Memory.holding``). A turn stored a moment
    before the erasure is in Redis at once but in PostgreSQL only once the memory writer has
    written it, so ``_channel_agents`` alone missed its agent, and its messages landed after the
    erasure. Ids and names only: one indexed read of the tenant's agents. A deleted agent only while
    its keys may live (its ``memory.ttl_s`` + ``SEQ_GRACE_S`` since the deletion): deleted agents
    have no cap, and older ones hold nothing in Redis."""
    return await conn.fetch(
        f"""SELECT id, name FROM agents
            WHERE tenant = $1 AND NOT (id = ANY($2::text[]))
              AND (archived_at IS NULL OR archived_at > now() - make_interval(secs =>
                   CASE WHEN jsonb_typeof(settings->'memory'->'ttl_s') = 'number'
                        THEN (settings->'memory'->>'ttl_s')::float8 ELSE {MemorySettings().ttl_s} END
                   + {SEQ_GRACE_S}))
            ORDER BY id""",
        tenant,
        known,
    )


def routes(admin) -> list[Route]:
    return ConversationAdmin(admin).routes()
