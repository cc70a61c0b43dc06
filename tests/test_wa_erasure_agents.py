"""Which agents a WhatsApp conversation's erasure covers beside the one it names: those that
served the conversation (a conversation in memory, an escalation or a run under its id), active
or deleted. Every agent of the tenant was covered, up to a thousand and silently no further:
about ten statements per agent under the erasure's lock, seconds with a thousand deleted agents,
and an agent past the thousandth kept the customer's words. Real embedded PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from gateway.admin_conversations import _channel_agents
from gateway.db import migrate


def test_the_erasure_covers_the_agents_that_served_the_conversation_and_no_others(services):
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    conv = f"wa:8401:{uuid.uuid4().int % 10**11}"
    ids = {k: f"agt_{uuid.uuid4().hex[:12]}" for k in ("named", "memory", "escalated", "ran", "idle", "gone")}

    async def go() -> set[str]:
        conn = await asyncpg.connect(services[0])
        try:
            await migrate(conn)
            for key, agent_id in ids.items():
                await conn.execute(
                    """INSERT INTO agents (id, tenant, name, model, settings, archived_at)
                       VALUES ($1, $2, $3, 'gpt-mock', '{}'::jsonb, CASE WHEN $4 THEN now() END)""",
                    agent_id,
                    tenant,
                    key,
                    key in ("escalated", "gone"),  # (deleted agents: one served it, one did not)
                )
            await conn.execute(
                "INSERT INTO conversations (id, tenant, agent_id, external_id) VALUES ($1, $2, $3, $4)",
                f"conv_{uuid.uuid4().hex[:12]}",
                tenant,
                ids["memory"],
                conv,
            )
            await conn.execute(
                """INSERT INTO escalations (id, tenant, agent_id, agent, conversation_id, sla_first_s, sla_resolve_s)
                   VALUES ($1, $2, $3, 'escalated', $4, 60, 3600)""",
                f"esc_{uuid.uuid4().hex[:12]}",
                tenant,
                ids["escalated"],
                conv,
            )
            await conn.execute(
                "INSERT INTO runs (request_id, tenant, agent_id, conversation_id) VALUES ($1, $2, $3, $4)",
                f"req-{uuid.uuid4().hex}",
                tenant,
                ids["ran"],
                conv,
            )
            rows = await _channel_agents(conn, tenant, [ids["named"]], conv)
            return {r["id"] for r in rows}
        finally:
            await conn.close()

    covered = asyncio.run(go())
    assert covered == {ids["memory"], ids["escalated"], ids["ran"]}
