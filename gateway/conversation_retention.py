"""Conversations past their agent's retention are deleted in the background.

An agent's ``memory.retention_days`` (0, the default: kept for good) deletes each of its
conversations once it has been silent that long — the conversation row, every message of it
(by cascade), its memory dead letters and a channel's own copies (a WhatsApp customer's message
whose processing failed after its last retry, the documents and audio they sent), and the copies
of its words an erasure clears too
(``runtime.conversations.forget_copies``: the feedback on it or its turns; its escalations',
channel records' and unapproved learned examples' words — what is older than the retention).
Its run records and audit ledger rows older than the retention stay, holding the conversation's
keyed tag instead of its id (``runtime.erased_records``), a VAPI call's record and ledger rows
instead of its caller's number, its WhatsApp message records and escalations instead of its id
and number (an escalation still open is resolved, its hold in Redis released), and its WhatsApp
conversation state silent since the cutoff is deleted, as after an erasure.
Its recent window in Redis is dropped as well: an agent with a retention keeps its window at most
that long (``memory.ttl_s`` is capped to it), but a customer who writes again just before the
sweep has the old messages read back from PostgreSQL into Redis. Archived agents' conversations
are held to their setting too.

Every replica runs it, every ``GATEWAY_RETENTION_SWEEP_INTERVAL`` seconds (default 3600):
idempotent (a deleted conversation is no longer a candidate), and replicas do not repeat each
other's work (rows taken ``FOR UPDATE SKIP LOCKED``). At most ``BATCH`` conversations per agent
per statement, ``MAX_BATCHES`` statements per agent per sweep: a large backlog (a retention
just lowered) is worked off over several sweeps, never in one long transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import asyncpg

from core.background import Periodic
from core.env import env_float
from core.erasure_key import LOCK_WRITE
from gateway.db import tenant_transaction
from runtime import conversations, erased_records
from runtime.hitl import held
from runtime.memory import Memory

log = logging.getLogger("gateway.agents")

INTERVAL_ENV = "GATEWAY_RETENTION_SWEEP_INTERVAL"
DEFAULT_INTERVAL = 3600.0
BATCH = 500
MAX_BATCHES = 20

_AGENTS = """
SELECT id, tenant, (settings -> 'memory' ->> 'retention_days')::int AS days FROM agents
WHERE jsonb_typeof(settings -> 'memory' -> 'retention_days') = 'number'
  AND (settings -> 'memory' ->> 'retention_days')::int > 0
ORDER BY tenant, id
"""

_OLD = f"""
SELECT id, external_id, now() - make_interval(days => $3) AS cutoff FROM conversations
WHERE tenant = $1 AND agent_id = $2 AND last_at < now() - make_interval(days => $3)
ORDER BY last_at LIMIT {BATCH} FOR UPDATE SKIP LOCKED
"""


# (tenant, conversation ids) -> a channel's copies of those conversations deleted (its queue's
# dead letters, its stored media: ``channels.whatsapp.erasure.forget``)
ChannelCopies = Callable[[str, list[str]], Awaitable[object]]


def interval() -> float:
    return env_float(INTERVAL_ENV, DEFAULT_INTERVAL) or DEFAULT_INTERVAL


async def sweep(
    pool: asyncpg.Pool,
    memory: Memory | None = None,
    channel_copies: ChannelCopies | None = None,
    holds: held.Holds | None = None,
) -> int:
    """One sweep over every agent with a retention: the number of conversations deleted.
    ``memory``: their windows in Redis and memory dead letters go too; ``channel_copies``: a
    channel's copies of them (``channels.whatsapp.erasure.forget``); ``holds``: the holds of
    their escalations it resolved are released (the customer who writes again is answered)."""
    async with tenant_transaction(pool, None) as conn:
        agents = await conn.fetch(_AGENTS)
        await conversations.drop_unkeyed(conn)  # (erasures an older release recorded unkeyed)
    total = 0
    for agent in agents:
        deleted = 0
        for _ in range(MAX_BATCHES):
            n = await _delete_batch(pool, memory, channel_copies, holds, agent["tenant"], agent["id"], agent["days"])
            deleted += n
            if n < BATCH:
                break
        if deleted:
            log.info(
                "conversations past their retention deleted",
                extra={"fields": {"tenant": agent["tenant"], "agent_id": agent["id"], "deleted": deleted}},
            )
        total += deleted
    return total


async def _delete_batch(
    pool: asyncpg.Pool,
    memory: Memory | None,
    channel_copies: ChannelCopies | None,
    holds: held.Holds | None,
    tenant: str,
    agent_id: str,
    days: int,
) -> int:
    """Up to ``BATCH`` conversations of the agent past its retention, in one transaction: Redis
    first (a reload that read PostgreSQL before the commit does not warm the window again: the
    erased mark), then the copies of their words, then the rows. Redis away: nothing is deleted
    (the next sweep tries again)."""
    async with tenant_transaction(pool, tenant) as conn:
        # (the erasure's lock, shared, before the rows: an erasure takes it first, then the copies'
        # rows and the conversation's; the sweep took the conversation's row, then the copies':
        # the two deadlocked, and the erasure's caller got a 500)
        await conn.execute(LOCK_WRITE, tenant)
        old = await conn.fetch(_OLD, tenant, agent_id, days)
        if not old:
            return 0
        ids = [r["external_id"] for r in old]
        if memory is not None:
            await memory.forget_many(tenant, agent_id, ids)
            await memory.drop_dead_letters(tenant, [(agent_id, c) for c in ids])
        if channel_copies is not None:
            await channel_copies(tenant, ids)
        await conversations.forget_copies(conn, tenant, [agent_id], ids, before=old[0]["cutoff"])
        resolved = await erased_records.retag(conn, tenant, [agent_id], ids, before=old[0]["cutoff"])
        await conn.execute(
            "DELETE FROM conversations WHERE tenant = $1 AND id = ANY($2::text[])", tenant, [r["id"] for r in old]
        )
    for agent, conversation, escalation in resolved if holds is not None else ():  # (after the commit)
        try:
            await holds.release(tenant, agent, conversation, escalation)
        except Exception as exc:  # (the customer's next message releases it: the escalation is resolved)
            log.warning("retention: a hold not released: %s", type(exc).__name__)
    return len(old)


class RetentionSweeper(Periodic):
    def __init__(
        self,
        pool: asyncpg.Pool,
        every: float | None = None,
        memory: Memory | None = None,
        channel_copies: ChannelCopies | None = None,
        holds: held.Holds | None = None,
    ) -> None:
        self.pool = pool
        self.memory = memory
        self.channel_copies = channel_copies
        self.holds = holds
        super().__init__("conversation-retention", every or interval(), self._sweep, log)

    async def _sweep(self) -> None:
        await sweep(self.pool, self.memory, self.channel_copies, self.holds)
