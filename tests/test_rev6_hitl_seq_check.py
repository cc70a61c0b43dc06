"""An escalation is not written after its conversation's erasure when Redis fails the turn's seq
comparison (rev6).

A later turn (its window loaded from Redis, ``seq`` > 0) takes Redis's time, then compares its
seq with the erasures' marks, and writes its escalation unless the erasure's record (PostgreSQL)
is from that time on (``gateway.hitl_stage._open``). The comparison is the memory's
``erased_since``, which answers False when Redis fails it (a timeout: the memory's is 1 s, the
clock's read 3 s; an error): an erasure that ran after the turn loaded its window but before it
took the time was then found by neither — the escalation was written after the erasure, naming
the conversation with the customer's words and holding it for a person. Now a comparison that
failed leaves no time: every erasure of the conversation counts, and none is opened.

Pinned, never timed: the gateway is launched with Redis's clock read (``redis_now_us``) waiting
for the test while a flag is set; the erasure runs whole meanwhile; the test then makes the
erasure's mark unreadable (a value of another type: Redis answers WRONGTYPE to the comparison's
read, as a failing Redis would fail it). The real stack otherwise: the gateway over HTTP, the
OpenAI SDK, the mock LLM, the embedded PostgreSQL and Valkey."""

from __future__ import annotations

import asyncio
import textwrap
import threading
import uuid

import asyncpg
import pytest
import redis as sync_redis

from core.erasure_key import LOCK_ERASURE
from runtime.memory import keys as memory_keys
from tests.conftest import Gateway
from tests.test_hitl_s36_escalation_erasure import admin, chat, new_tenant

RUN = uuid.uuid4().hex[:6]
GATE = f"test:rev6:gate:{RUN}"
HANDOFF = "A person will answer you here."

LAUNCHER = textwrap.dedent(
    f"""
    import os
    import sys

    import redis.asyncio as aioredis

    from channels.whatsapp import erasure as wa_erasure
    from gateway import hitl_stage

    import asyncpg

    hitl_stage.DB_TIMEOUT = 120.0  # (the clock's read and the escalation's transaction wait for the test)
    _create_pool = asyncpg.create_pool


    def create_pool(*args, **kw):
        # (the driver's 30 s per statement lifted: a wait for the erasure's lock is bounded by what
        # the gateway bounds it with, nothing else)
        return _create_pool(*args, **{{**kw, "command_timeout": 300}})


    asyncpg.create_pool = create_pool
    _now = wa_erasure.redis_now_us


    async def redis_now_us(redis):
        # while the test's flag is set: says so, and waits for the test to let it read the clock
        r = aioredis.from_url(os.environ["REDIS_URL"])
        try:
            if await r.exists("{GATE}"):
                await r.rpush("{GATE}:at-clock", "1")
                await r.blpop(["{GATE}:go"], timeout=120)
        finally:
            await r.aclose()
        return await _now(redis)


    wa_erasure.redis_now_us = redis_now_us

    from gateway.cli import main

    sys.exit(main())
    """
)


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    config = {
        "router": {"max_attempts": 1},
        "providers": [{"name": "pp", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k"]}],
        "models": [{"name": "agent-model", "deployments": [{"provider": "pp", "model": "m"}]}],
        "server": {"erasure_lock_wait_s": 0.2},
    }
    g = Gateway(tmp_root, config, services, launcher=LAUNCHER, launcher_name="rev6_hitl_gateway")
    yield g
    g.stop()


@pytest.fixture()
def tenant(gw):
    return new_tenant(gw, "rev6")


LOW_CONFIDENCE = '[[mock:{"logprob": -2}]] My card 4111 was charged twice'


async def _escalations(dsn: str, tenant: str) -> list[dict]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT conversation_id, question, status FROM escalations WHERE tenant = $1", tenant)
        return [dict(r) for r in rows]
    finally:
        await conn.close()


def test_an_erasure_before_a_turns_clock_read_counts_when_redis_fails_its_seq_comparison(gw, services, tenant):
    conv = f"rev6-{uuid.uuid4().hex[:8]}"
    content, escalation = chat(gw, tenant, conv, "Hello there")  # (the next turn loads a window)
    assert escalation is None and content
    r = sync_redis.Redis.from_url(services[1])
    answer: dict = {}
    r.set(GATE, "1")
    turn = threading.Thread(target=lambda: answer.update(out=chat(gw, tenant, conv, LOW_CONFIDENCE)))
    turn.start()
    try:
        assert r.blpop([f"{GATE}:at-clock"], timeout=120) is not None  # (loaded, before the clock)
        r.delete(GATE)
        erased = admin(gw, "DELETE", f"/admin/agents/{tenant['agent']}/conversations/{conv}", tenant["admin"])
        assert erased.status_code == 200, erased.text
        mark = f"{memory_keys(tenant['name'], tenant['agent_id'], conv)[0]}:erased:seq"
        assert r.get(mark) is not None  # (the erasure's mark, which the comparison reads)
        r.delete(mark)
        r.hset(mark, "x", "1")  # (Redis now fails that read: WRONGTYPE)
    finally:
        r.delete(GATE)
        r.rpush(f"{GATE}:go", "1")
        turn.join(180)
    try:
        content, escalation = answer["out"]
        rows = asyncio.run(_escalations(services[0], tenant["name"]))
    finally:
        r.delete(mark, f"{GATE}:go", f"{GATE}:at-clock")
        r.close()
    assert escalation is None and content != HANDOFF, (content, escalation)
    assert all(row["conversation_id"] != conv and row["question"] is None for row in rows), rows


BOUND = 60.0  # seconds: a hang guard only, never a timing assertion


def test_an_escalating_turn_waits_for_an_erasures_lock_no_longer_than_a_webhook(gw, services, tenant):
    """An erasure holds the tenant's erasure lock (here: a test connection, exclusively, as
    ``runtime.conversations`` does; its bucket is other tenants' too). An escalating turn waited
    for it as long as its escalation's transaction allowed (3 s), holding a pooled connection (ten
    are every tenant's): a tenant's escalating turns during its own erasures held the pool. Now it
    waits ``server.erasure_lock_wait_s`` at most, as a webhook, and spools its escalation: the
    turn is answered (the hand-over) while the lock is still held."""
    conv = f"rev6-lock-{uuid.uuid4().hex[:8]}"
    content, escalation = chat(gw, tenant, conv, "Hello there")
    assert escalation is None and content

    async def scenario():
        holder = await asyncpg.connect(services[0])
        tx = holder.transaction()
        await tx.start()
        try:
            await holder.execute(LOCK_ERASURE, tenant["name"])
            turn = asyncio.ensure_future(asyncio.to_thread(chat, gw, tenant, conv, LOW_CONFIDENCE))
            done, _ = await asyncio.wait({turn}, timeout=BOUND)  # (a hang guard)
            answered_while_held = bool(done)
        finally:
            await tx.rollback()
            await holder.close()
        return answered_while_held, await turn

    answered, (content, escalation) = asyncio.run(scenario())
    assert answered
    assert escalation is not None and content == HANDOFF, (content, escalation)
