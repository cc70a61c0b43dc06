"""An agent change, committed in PostgreSQL, told to every replica (runtime/agents.py ``announce``)
and served by this one at once. The admin routes that change an agent (gateway/admin_agents.py,
and the approval of a learned answer in gateway/admin_escalations.py) answer with its headers.

A change whose announcement fails (Redis unreachable) is committed all the same, and answers as
such: its usual status and body, with ``x-gateway-warning`` saying the other replicas were not
told, and a warning logged (the error's type, nothing of the change). A 500 would have the
client make it again: a second prompt version, a label moved twice. The other replicas load it
at their next full reload (``AgentRegistry`` reloads from PostgreSQL at least every
``CATCH_UP_RELOAD_S``, with or without Redis); the key and budget routes (gateway/admin.py) keep
such a change and log it the same way.
"""

from __future__ import annotations

import logging

import asyncpg
from redis.exceptions import RedisError

from runtime import agents as store

log = logging.getLogger("gateway.admin")

WARNING = "x-gateway-warning"
NOT_ANNOUNCED = "saved; the other replicas were not told (Redis unreachable) and load it at their next full reload"
NOT_RELOADED = "saved; this replica could not read it back (database) and serves it at its next reload"


async def announced(svc, agent_id: str) -> dict[str, str]:
    """The agent ``agent_id`` told to every replica and reloaded in this one; the answer's headers."""
    headers: dict[str, str] = {}
    try:
        await store.announce(svc.redis, agent_id)
    except RedisError as exc:
        log.warning("agent change not announced (Redis unreachable): %s", type(exc).__name__)
        headers[WARNING] = NOT_ANNOUNCED
    registry = getattr(svc, "agents", None)
    if registry is not None:  # this replica serves the change at once, not a message later
        try:
            await registry.reload_agent(agent_id)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            # committed all the same: a 500 would have it made again; served at the next reload
            log.warning("agent change not reloaded here (database): %s", type(exc).__name__)
            headers[WARNING] = NOT_RELOADED if WARNING not in headers else f"{headers[WARNING]}; {NOT_RELOADED}"
    return headers
