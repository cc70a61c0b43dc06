"""Escalations and holds that raced their conversation's erasure keep nothing of it.

- A turn whose window came from Redis (``seq`` > 0) compared that seq with the erasures' marks in
  Redis, then wrote its escalation with no further check: an erasure that ran whole in between
  (it found no escalation to resolve) left the escalation naming the conversation, with the
  customer's words and the AI's draft, and the conversation held for a person. Now the turn takes
  Redis's time before that comparison and reads the erasure's record again (from that time on)
  under the tenant's erasure lock as it writes: that escalation is not opened.
- A turn's (and the sweeper's, for a spooled escalation) hold was written after the escalation's
  commit: an erasure that waited for that commit resolved the escalation and released its holds
  before the hold was written, and the hold stayed 90 days (the customer's next message held for
  a person, a key of the conversation). Now the hold is written before the commit, under the
  erasure's lock: the erasure releases it after.
- The sweeper's repair of the holds (an escalation read open, its hold put back, then re-read)
  released the hold of one resolved meanwhile under the conversation its row held then: the
  erasure's tag, not the hold's conversation. Now it releases the hold it put back.

Interleavings pinned, never timed: the gateway is launched with the memory's seq comparison
wrapped to wait for the test (a Redis list it pops), a trigger on the escalation's insert that
waits on an advisory lock the test holds (``tests.pg_locks.blocked_by`` says when the others
wait), and the test's own sweeper whose hold waits until the erasure waits or is over. The real
stack otherwise: the gateway over HTTP, the mock LLM, the embedded PostgreSQL and Valkey."""

from __future__ import annotations

import asyncio
import textwrap
import threading
import uuid

import asyncpg
import httpx
import openai
import pytest
import redis as sync_redis
import redis.asyncio as aioredis

from runtime.hitl import escalations, held, sla
from tests.conftest import LOCAL_HTTP, MASTER_KEY, Gateway
from tests.pg_locks import blocked_by

REDIS_DB = 9  # (the module's own: no other gateway's sweeper takes its spooled escalation)
RUN = uuid.uuid4().hex[:6]
LOCK_KEY = (0x533336, int(uuid.uuid4().int % 2**31))  # (the trigger's advisory lock: this run's)
HANDOFF = "A person will answer you here."

LAUNCHER = textwrap.dedent(
    """
    import os
    import sys

    import redis.asyncio as aioredis

    from gateway import hitl_stage
    from runtime import memory

    hitl_stage.DB_TIMEOUT = 120.0  # (the escalation's transaction waits for the test's lock)
    _erased_since = memory.Memory.erased_since


    async def erased_since(self, tenant, agent_id, conversation_id, seq, **kw):
        # the turn's seq compared with the erasures' marks; then, for a gated conversation, it
        # says so and waits for the test to let it write its escalation
        answer = await _erased_since(self, tenant, agent_id, conversation_id, seq, **kw)
        if conversation_id.startswith("s36-gate-"):
            r = aioredis.from_url(os.environ["REDIS_URL"])
            try:
                await r.rpush("test:s36:checked:" + conversation_id, "1")
                await r.blpop(["test:s36:go:" + conversation_id], timeout=120)
            finally:
                await r.aclose()
        return answer


    memory.Memory.erased_since = erased_since

    from gateway.cli import main

    sys.exit(main())
    """
)


def _urls(services) -> tuple[str, str]:
    return services[0], f"{services[1]}?db={REDIS_DB}"


def admin(gw: Gateway, method: str, path: str, key: str = MASTER_KEY, **kw) -> httpx.Response:
    return LOCAL_HTTP.request(method, f"{gw.url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=120, **kw)


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    config = {
        "router": {"max_attempts": 1},
        "providers": [{"name": "pp", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k"]}],
        "models": [{"name": "agent-model", "deployments": [{"provider": "pp", "model": "m"}]}],
        "hitl": {"sweep_interval_s": 3600},  # (its sweeper idle: the tests run their own)
    }
    g = Gateway(tmp_root, config, _urls(services), launcher=LAUNCHER, launcher_name="s36_hitl_gateway")
    yield g
    g.stop()


@pytest.fixture()
def tenant(gw):
    return new_tenant(gw, "s36")


def new_tenant(gw: Gateway, prefix: str) -> dict:
    """A tenant with a client key, an admin key and an escalating agent."""
    name = f"{prefix}-{RUN}-{uuid.uuid4().hex[:4]}"
    keys = {}
    for kind, scopes in (("key", None), ("admin", ["admin"])):
        body = {"name": f"k-{uuid.uuid4().hex[:6]}", "tenant": name, **({"scopes": scopes} if scopes else {})}
        r = admin(gw, "POST", "/admin/keys", json=body)
        assert r.status_code == 201, r.text
        keys[kind] = r.json()["key"]
    agent = f"helper-{uuid.uuid4().hex[:6]}"
    body = {
        "name": agent,
        "model": "agent-model",
        "template": "You are the support assistant.",
        "escalation": {"enabled": True, "threshold": 0.5, "logprobs": True, "handoff_message": HANDOFF},
    }
    r = admin(gw, "POST", "/admin/agents", keys["admin"], json=body)
    assert r.status_code == 201, r.text
    return {"name": name, "agent": agent, "agent_id": r.json()["id"], **keys}


def chat(gw: Gateway, t: dict, conv: str, text: str) -> tuple[str, str | None]:
    """(the answer, its escalation header) of one customer turn through the OpenAI SDK."""
    c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=t["key"], max_retries=0, timeout=120)
    raw = c.chat.completions.with_raw_response.create(
        model=f"agent:{t['agent']}",
        messages=[{"role": "user", "content": text}],
        metadata={"conversation_id": conv},
    )
    return raw.parse().choices[0].message.content, raw.headers.get("x-gateway-escalation")


LOW_CONFIDENCE = '[[mock:{"logprob": -2}]] My card 4111 was charged twice'


def _first_turn(gw: Gateway, t: dict, conv: str) -> None:
    """The conversation's first turn, not escalated: the next one loads its window (seq > 0)."""
    content, escalation = chat(gw, t, conv, "Hello there")
    assert escalation is None and content, content


def _erase(gw: Gateway, t: dict, conv: str) -> httpx.Response:
    return admin(gw, "DELETE", f"/admin/agents/{t['agent']}/conversations/{conv}", t["admin"])


async def _escalations(dsn: str, tenant: str) -> list[dict]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT conversation_id, question, draft, status, outcome FROM escalations WHERE tenant = $1", tenant
        )
        return [dict(r) for r in rows]
    finally:
        await conn.close()


def _nothing_of(services, t: dict, conv: str) -> None:
    """No escalation names the conversation or keeps words, and no hold of it is left."""
    for row in asyncio.run(_escalations(services[0], t["name"])):
        assert row["conversation_id"] != conv and row["question"] is None and row["draft"] is None, row
        assert row["status"] == "resolved", row
    r = sync_redis.Redis.from_url(_urls(services)[1])
    try:
        assert r.get(held.held_key(t["name"], t["agent_id"], conv)) is None
    finally:
        r.close()


def test_an_erasure_between_a_loaded_turns_seq_check_and_its_escalation_leaves_no_escalation(gw, services, tenant):
    """The turn compared its window's seq with the erasures' marks (none yet) and waits; the
    erasure runs whole (200); then the turn writes its escalation. It was written, naming the
    conversation with the customer's words, and held it. Now it reads the erasure under the
    erasure's lock and writes none: the customer gets the AI's answer."""
    conv = f"s36-gate-{uuid.uuid4().hex[:8]}"
    _first_turn(gw, tenant, conv)
    r = sync_redis.Redis.from_url(_urls(services)[1])
    answer: dict = {}
    turn = threading.Thread(target=lambda: answer.update(out=chat(gw, tenant, conv, LOW_CONFIDENCE)))
    turn.start()
    try:
        assert r.blpop([f"test:s36:checked:{conv}"], timeout=120) is not None  # (compared, waiting)
        erased = _erase(gw, tenant, conv)
        assert erased.status_code == 200, erased.text
    finally:
        r.rpush(f"test:s36:go:{conv}", "1")
        turn.join(180)
        r.close()
    content, escalation = answer["out"]
    assert escalation is None and content != HANDOFF, (content, escalation)
    _nothing_of(services, tenant, conv)


async def _until(holder: asyncpg.Connection, pid: int, n: int, tasks: list) -> None:
    """Until ``n`` sessions wait behind ``pid``'s locks or one of ``tasks`` is over (bounded)."""
    for _ in range(6000):
        if await blocked_by(holder, pid) >= n or any(t.done() for t in tasks):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{n} sessions never waited behind {pid}")


def test_an_erasure_while_a_turns_escalation_is_written_releases_its_hold(gw, services, tenant):
    """The turn's escalation insert waits (a trigger on the test's lock); the erasure comes. It ran
    whole (the turn held no erasure lock) and the escalation was written after it, naming the
    conversation, held. Now the turn holds the erasure's lock (shared) and writes its hold before
    its commit: the erasure waits, then resolves the escalation and releases the hold."""
    conv = f"s36-trig-{uuid.uuid4().hex[:8]}"
    _first_turn(gw, tenant, conv)
    name = f"s36_wait_{uuid.uuid4().hex[:8]}"

    async def go():
        holder = await asyncpg.connect(services[0])
        try:
            await holder.execute(
                f"""CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
                    BEGIN
                      PERFORM pg_advisory_xact_lock({LOCK_KEY[0]}, {LOCK_KEY[1]});
                      RETURN NEW;
                    END $$"""
            )
            await holder.execute(
                f"""CREATE TRIGGER {name} BEFORE INSERT ON escalations FOR EACH ROW
                    WHEN (NEW.tenant = '{tenant["name"]}') EXECUTE FUNCTION {name}()"""
            )
            await holder.execute("SELECT pg_advisory_lock($1, $2)", *LOCK_KEY)
            pid = holder.get_server_pid()
            turn = asyncio.create_task(asyncio.to_thread(chat, gw, tenant, conv, LOW_CONFIDENCE))
            await _until(holder, pid, 1, [turn])  # (its insert waits)
            erasure = asyncio.create_task(asyncio.to_thread(_erase, gw, tenant, conv))
            await _until(holder, pid, 2, [turn, erasure])  # (the erasure waits behind it, or is over)
            await holder.execute("SELECT pg_advisory_unlock($1, $2)", *LOCK_KEY)
            return await turn, await erasure
        finally:
            await holder.execute(f"DROP TRIGGER IF EXISTS {name} ON escalations")
            await holder.execute(f"DROP FUNCTION IF EXISTS {name}()")
            await holder.close()

    (content, escalation), erased = asyncio.run(go())
    assert erased.status_code == 200, erased.text
    assert escalation is not None and content == HANDOFF, (content, escalation)  # (opened before the erasure)
    _nothing_of(services, tenant, conv)


def _esc(t: dict, conv: str) -> dict:
    return {
        "id": escalations.new_id(), "tenant": t["name"], "agent_id": t["agent_id"], "agent": t["agent"],
        "conversation_id": conv, "urgency": "normal", "base_priority": 100, "team": "support",
        "question": "my card 4111 was charged twice", "draft": "a draft", "seq": None,
        "sla_first_s": 60, "sla_resolve_s": 600,
    }  # fmt: skip


async def _noop(alert) -> None:
    pass


def test_a_spooled_escalations_hold_written_by_the_sweeper_does_not_outlive_the_erasure(
    gw, services, tenant, monkeypatch
):
    """The sweeper opens a spooled escalation; the erasure comes before the sweeper holds the
    conversation. The hold was written after the escalation's commit, so after the erasure that
    resolved it had released its holds: it stayed 90 days. Now it is written before the commit,
    under the erasure's lock: the erasure waits, then releases it."""
    monkeypatch.setenv("GATEWAY_MASTER_KEY", MASTER_KEY)  # (names keyed as the gateway keys them)
    conv = f"s36-spool-{uuid.uuid4().hex[:8]}"
    esc = _esc(tenant, conv)
    redis_url = _urls(services)[1]

    async def go():
        r = aioredis.from_url(redis_url)
        pids: list[int] = []

        async def note_pid(conn):
            pids.append(conn.get_server_pid())

        watcher = await asyncpg.connect(services[0])
        erasures: list[asyncio.Task] = []

        class ErasedBeforeTheHold(held.Holds):
            async def hold(self, tenant_, agent_id, conversation_id, escalation_id):
                erasure = asyncio.create_task(asyncio.to_thread(_erase, gw, tenant, conv))
                erasures.append(erasure)
                await _until(watcher, pids[0], 1, [erasure])  # (waits behind the sweeper, or is over)
                await super().hold(tenant_, agent_id, conversation_id, escalation_id)

        try:
            async with asyncpg.create_pool(services[0], min_size=1, max_size=1, init=note_pid) as pool:
                await held.spool(r, esc)
                await sla.Sweeper(pool, r, ErasedBeforeTheHold(r), _noop).open_spooled()
            assert len(erasures) == 1
            return await erasures[0]
        finally:
            await r.delete(held.PENDING_KEY)
            await r.aclose()
            await watcher.close()

    erased = asyncio.run(go())
    assert erased.status_code == 200, erased.text
    _nothing_of(services, tenant, conv)


def test_the_sweepers_repair_releases_the_hold_it_put_back_for_an_escalation_an_erasure_resolved(gw, services, tenant):
    """The repair read an escalation open, the erasure resolved it (its row now holds the
    erasure's tag as its conversation) and released its hold, then the repair put the hold back
    and re-read the escalation: resolved, it released the hold of the tag's conversation, and the
    conversation's hold stayed 90 days. Now the hold it put back is released."""
    conv = f"s36-repair-{uuid.uuid4().hex[:8]}"
    esc = _esc(tenant, conv)
    redis_url = _urls(services)[1]

    async def opened():
        r = aioredis.from_url(redis_url)
        conn = await asyncpg.connect(services[0])
        try:
            async with conn.transaction():
                row, created = await escalations.open_escalation(conn, esc)
            assert created
            await held.Holds(r).hold(tenant["name"], tenant["agent_id"], conv, row["id"])
            return row["id"]
        finally:
            await conn.close()
            await r.aclose()

    esc_id = asyncio.run(opened())
    read_before = [(tenant["name"], tenant["agent_id"], conv, esc_id)]  # (the repair's read of the open ones)
    erased = _erase(gw, tenant, conv)
    assert erased.status_code == 200, erased.text

    async def repair():
        r = aioredis.from_url(redis_url)
        try:
            async with asyncpg.create_pool(services[0], min_size=1, max_size=1) as pool:
                await sla.Sweeper(pool, r, held.Holds(r), _noop)._repair(read_before)
        finally:
            await r.aclose()

    asyncio.run(repair())
    _nothing_of(services, tenant, conv)
