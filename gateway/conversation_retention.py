"""Conversations past their agent's retention are deleted in the background.

An agent's ``memory.retention_days`` (0, the default: kept for good) deletes each of its
conversations once it has been silent that long — the conversation row, every message of it
(by cascade) and the feedback given on it or its turns. Its recent window in Redis is gone by
then: an agent with a retention keeps its window at most that long (``memory.ttl_s`` is capped
to it). Archived agents' conversations are held to their setting too.

Every replica runs it, every ``GATEWAY_RETENTION_SWEEP_INTERVAL`` seconds (default 3600):
idempotent (a deleted conversation is no longer a candidate), and replicas do not repeat each
other's work (rows taken ``FOR UPDATE SKIP LOCKED``). At most ``BATCH`` conversations per agent
per statement, ``MAX_BATCHES`` statements per agent per sweep: a large backlog (a retention
just lowered) is worked off over several sweeps, never in one long transaction.
"""

from __future__ import annotations

import logging

import asyncpg

from core.background import Periodic
from core.env import env_float
from gateway.db import tenant_transaction

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

_DELETE = f"""
WITH old AS (
    SELECT id, external_id FROM conversations
    WHERE tenant = $1 AND agent_id = $2 AND last_at < now() - make_interval(days => $3)
    ORDER BY last_at LIMIT {BATCH} FOR UPDATE SKIP LOCKED
), feedback_gone AS (
    DELETE FROM feedback f
    WHERE f.tenant = $1 AND (f.agent_id = $2 OR f.agent_id IS NULL)
      AND (f.conversation_id IN (SELECT external_id FROM old)
           OR f.request_id IN (SELECT r.request_id FROM runs r
                               WHERE r.tenant = $1 AND r.agent_id = $2
                                 AND r.conversation_id IN (SELECT external_id FROM old)))
), gone AS (
    DELETE FROM conversations c USING old WHERE c.id = old.id AND c.tenant = $1 RETURNING 1
)
SELECT count(*) FROM gone
"""


def interval() -> float:
    return env_float(INTERVAL_ENV, DEFAULT_INTERVAL) or DEFAULT_INTERVAL


async def sweep(pool: asyncpg.Pool) -> int:
    """One sweep over every agent with a retention: the number of conversations deleted."""
    async with tenant_transaction(pool, None) as conn:
        agents = await conn.fetch(_AGENTS)
    total = 0
    for agent in agents:
        deleted = 0
        for _ in range(MAX_BATCHES):
            async with tenant_transaction(pool, agent["tenant"]) as conn:
                n = await conn.fetchval(_DELETE, agent["tenant"], agent["id"], agent["days"])
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


class RetentionSweeper(Periodic):
    def __init__(self, pool: asyncpg.Pool, every: float | None = None) -> None:
        self.pool = pool
        super().__init__("conversation-retention", every or interval(), self._sweep, log)

    async def _sweep(self) -> None:
        await sweep(self.pool)
