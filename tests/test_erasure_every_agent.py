"""A WhatsApp conversation is its customer's, whichever agent served it: its erasure covers every
agent of the tenant. The agents were found by what PostgreSQL (and Redis) held of the
conversation, so a turn of another agent stored a moment before the erasure, whose row the memory
writer had not written yet and which Redis no longer knew (its turns spilled to disk and written
after a restart, a replica's writer far behind), reached PostgreSQL after the erasure said done;
its run kept the customer's number. The erasure now records itself for every agent of the
tenant (``runtime.conversations.erase_for_every_agent``), and the memory and runs writers skip
(tag) any agent's turn recorded up to it. Real embedded PostgreSQL and Valkey."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import orjson

from runtime import conversations
from runtime import runs as runs_module
from runtime.memory import Memory
from runtime.runs import RunRecorder
from tests.test_conversation_erasure import _record
from tests.test_erasure_clocks import _connect, _run, _stored_ids


def _entry(tenant: str, agent_id: str, conv: str, t: float, seq: int, words: str) -> dict:
    """A memory stream entry stamped ``t`` on Redis's clock (as the append script stamps it)."""
    return {**_record(tenant, agent_id, conv, t, seq, words), b"t": f"{t:.6f}".encode()}


async def _erase_with_every_agent(pool: asyncpg.Pool, r, tenant: str, agent_id: str, conv: str) -> float:
    """The route's erasure of a channel conversation through ``agent_id``, no other agent known."""
    _, at = await Memory(pool, r).forget_recent(tenant, agent_id, conv)
    async with pool.acquire() as conn, conn.transaction():
        await conversations.erase(conn, tenant, agent_id, conv, at)
        await conversations.erase_for_every_agent(conn, tenant, conv, at)
    return at


def test_another_agents_turn_on_its_way_when_a_channel_conversation_is_erased_is_not_written(services):
    plain = f"c-{uuid.uuid4().hex[:6]}"

    async def main() -> list[tuple[str, str]]:
        pool, r, tenant, named, conv = await _connect(services)
        other = f"agt_{uuid.uuid4().hex[:8]}"
        try:
            at = await _erase_with_every_agent(pool, r, tenant, named, conv)
            late = [
                _entry(tenant, other, conv, at - 0.5, 1, "my card is 4111"),  # stored before the erasure
                _entry(tenant, other, conv, at + 0.5, 2, "hello again"),  # after it: a new conversation
                _entry(tenant, other, plain, at - 0.5, 1, "another conversation"),
            ]
            async with pool.acquire() as conn, conn.transaction():
                await conversations.write_turns(conn, late)
            found = await pool.fetch(
                """SELECT c.external_id, m.content->>'content' AS words FROM messages m
                   JOIN conversations c ON c.id = m.conversation_id
                   WHERE c.tenant = $1 AND c.agent_id = $2 ORDER BY c.external_id, m.seq""",
                tenant,
                other,
            )
            return [(row["external_id"], row["words"]) for row in found]
        finally:
            await r.aclose()
            await pool.close()

    assert asyncio.run(main()) == [(plain, "another conversation"), ("wa:1066:4477", "hello again")]


def test_another_agents_run_on_its_way_when_a_channel_conversation_is_erased_keeps_the_tag(services, monkeypatch):
    stream = f"gw:{{gw}}:runs-every-{uuid.uuid4().hex[:8]}"  # (the suite's gateways consume the shared one)
    monkeypatch.setattr(runs_module, "RUNS_STREAM", stream)

    async def main() -> tuple[str, str]:
        pool, r, tenant, named, conv = await _connect(services)
        other = f"agt_{uuid.uuid4().hex[:8]}"
        recorder = RunRecorder(pool, r)
        await recorder.start()
        try:
            at = await _erase_with_every_agent(pool, r, tenant, named, conv)
            before = _run(tenant, other, conv, at, 1000.0)  # begun a second before the erasure
            after = _run(tenant, other, conv, at, 0.0)  # (reaches Redis after it: begun after it)
            return await _stored_ids(recorder, pool, [before, after])
        finally:
            await recorder.stop()
            await r.delete(stream)
            await r.aclose()
            await pool.close()

    stored_before, stored_after = asyncio.run(main())
    assert stored_before is not None and stored_before.startswith("erased:")
    assert stored_after == "wa:1066:4477"


def test_the_erasure_asks_redis_only_of_agents_deleted_within_their_memorys_lifetime(services):
    """A channel conversation's erasure asks Redis whether each other agent of the tenant holds the
    conversation (``Memory.holding``), deleted agents among them: a turn stored just before the
    deletion may still be on its way. Deleted agents have no cap, so a tenant that made and deleted
    many made every erasure of its customers ask Redis of each (rev3e's review). Only an agent
    deleted within its memory's lifetime (``memory.ttl_s`` + ``SEQ_GRACE_S``: what its keys live)
    can still hold anything."""
    from gateway.admin_conversations import _other_agents

    async def main():
        pool, r, tenant, _, _ = await _connect(services)
        try:
            async with pool.acquire() as conn:
                ids = {}
                for name, archived, ttl in (
                    ("live", None, None),
                    ("gone-lately", "1 day", None),  # (the default ttl: 7 days)
                    ("gone-long-ago", "30 days", None),
                    ("gone-long-ttl", "30 days", 60 * 86400),
                    ("known", None, None),
                ):
                    agent_id = ids[name] = f"agt_{uuid.uuid4().hex[:10]}"
                    settings = {"memory": {"ttl_s": ttl}} if ttl else {}
                    await conn.execute(
                        """INSERT INTO agents (id, tenant, name, model, settings, archived_at)
                           VALUES ($1, $2, $3, 'm', $4::jsonb,
                                   CASE WHEN $5::text IS NULL THEN NULL ELSE now() - $5::interval END)""",
                        agent_id, tenant, f"{name}-{agent_id[-4:]}", orjson.dumps(settings).decode(), archived,
                    )  # fmt: skip
                found = {row["id"] for row in await _other_agents(conn, tenant, [ids["known"]])}
            assert found == {ids["live"], ids["gone-lately"], ids["gone-long-ttl"]}
        finally:
            await r.aclose()
            await pool.close()

    asyncio.run(main())
