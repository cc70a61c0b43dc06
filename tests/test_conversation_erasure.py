"""Erasing a conversation on request (``DELETE /admin/agents/{name}/conversations/{id}``): its
messages in PostgreSQL, its window in Redis and the feedback on it are gone, the next turn starts
it anew, and turns still on their way to PostgreSQL when it was erased are not written back."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import httpx
import openai
import orjson
import pytest

from runtime import conversations
from runtime.memory import keys
from tests.conftest import Gateway, wait_until
from tests.test_agents_e2e import config
from tests.test_channels_vapi import admin as _admin
from tests.test_channels_whatsapp import rows as _rows
from tests.test_memory import _agent, _run, _turn, _until
from tests.test_policies import new_key

TENANT = f"erase-{uuid.uuid4().hex[:6]}"


def _record(tenant: str, agent_id: str, conv: str, ts: float, seq: int, words: str) -> dict:
    record = {
        "tenant": tenant,
        "agent_id": agent_id,
        "external_id": conv,
        "request_id": f"r-{seq}",
        "prompt_version": 1,
        "variant": None,
        "ts": ts,
        "messages": [{"role": "user", "content": words}],
    }
    return {b"r": orjson.dumps(record), b"s": str(seq).encode()}


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    g = Gateway(tmp_root, config(module_mock), services)
    yield g
    g.stop()


def _stored(gw: Gateway, agent: str, conv: str, key: str) -> list[dict]:
    r = _admin(gw, "GET", f"/admin/agents/{agent}/conversations/{conv}/messages", key)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def _agent_and_client(gw: Gateway) -> tuple[str, str, openai.OpenAI]:
    """A new agent of TENANT: its tenant admin's key, its name, and a chat client of the tenant."""
    admin_key = new_key(gw, tenant=TENANT, scopes=["admin"])["key"]
    chat_key = new_key(gw, tenant=TENANT)["key"]
    agent = f"bot-{uuid.uuid4().hex[:6]}"
    body = {"name": agent, "model": "agent-model", "template": "You help.", "variables": {}}
    assert _admin(gw, "POST", "/admin/agents", admin_key, json=body).status_code == 201
    return admin_key, agent, openai.OpenAI(base_url=f"{gw.url}/v1", api_key=chat_key, max_retries=0)


def test_an_erased_conversation_is_gone_everywhere_and_starts_anew(gw, services, module_mock):
    admin_key, agent, client = _agent_and_client(gw)
    conv = f"customer-{uuid.uuid4().hex[:8]}"
    for words in ("my card is 4111", "my address is 1 Main St", "thanks"):
        client.chat.completions.create(
            model=f"agent:{agent}", messages=[{"role": "user", "content": words}], metadata={"conversation_id": conv}
        )
    answered = client.chat.completions.with_raw_response.create(
        model=f"agent:{agent}", messages=[{"role": "user", "content": "one more"}], metadata={"conversation_id": conv}
    )
    rid = answered.headers["x-request-id"]
    r = httpx.post(
        f"{gw.url}/v1/feedback",
        json={"conversation_id": conv, "agent": agent, "text": "she said her card is 4111", "thumbs": 1},
        headers={"Authorization": f"Bearer {client.api_key}"},
    )
    assert r.status_code in (200, 201), r.text
    r = httpx.post(
        f"{gw.url}/v1/feedback",
        json={"request_id": rid, "score": 0.2},
        headers={"Authorization": f"Bearer {client.api_key}"},
    )
    assert r.status_code in (200, 201), r.text
    wait_until(lambda: len(_stored(gw, agent, conv, admin_key)) == 8, what="the four turns stored")
    # (and the last turn's run: the feedback on a turn is found through it)
    wait_until(lambda: _rows(services[0], "SELECT 1 FROM runs WHERE request_id = $1", rid), what="the run stored")

    # a chat key may not erase, nor another tenant's admin, nor an unknown agent
    path = f"/admin/agents/{agent}/conversations/{conv}"
    assert _admin(gw, "DELETE", path, client.api_key).status_code == 403
    other = new_key(gw, tenant=f"other-{uuid.uuid4().hex[:6]}", scopes=["admin"])["key"]
    assert _admin(gw, "DELETE", path, other).status_code == 404
    assert _admin(gw, "DELETE", f"/admin/agents/nobody/conversations/{conv}", admin_key).status_code == 404

    r = _admin(gw, "DELETE", path, admin_key)
    assert r.status_code == 200, r.text
    assert r.json() | {"agent": agent} == {
        "object": "conversation.deleted",
        "agent": agent,
        "conversation_id": conv,
        "deleted": True,
        "messages": 8,
        "feedback": 2,
    }
    assert _stored(gw, agent, conv, admin_key) == []
    left = _rows(services[0], "SELECT count(*) AS n FROM feedback WHERE tenant = $1", TENANT)
    assert left == [{"n": 0}]
    assert "4111" not in str(_rows(services[0], "SELECT content FROM messages WHERE tenant = $1", TENANT))
    # the customer writes again: the model sees no history, and the conversation holds this turn only
    module_mock.clear()
    client.chat.completions.create(
        model=f"agent:{agent}",
        messages=[{"role": "user", "content": "hello again"}],
        metadata={"conversation_id": conv},
    )
    sent = [
        q["body"]["messages"] for q in module_mock.requests() if q["body"]["messages"][-1]["content"] == "hello again"
    ]
    assert [[m["role"] for m in s] for s in sent] == [["system", "user"]]
    wait_until(lambda: len(_stored(gw, agent, conv, admin_key)) == 2, what="the new turn stored")
    assert _stored(gw, agent, conv, admin_key)[0]["content"] == "hello again"
    # erasing what is not there is not an error (nothing to erase)
    r = _admin(gw, "DELETE", f"/admin/agents/{agent}/conversations/never-{uuid.uuid4().hex[:6]}", admin_key)
    assert r.status_code == 200 and r.json()["messages"] == 0


def test_turns_still_on_their_way_when_erased_are_not_written_back(services):
    """The memory writer moves turns from the Redis stream (or a spill on disk) to PostgreSQL in
    batches: a turn recorded before the erasure that arrives after it is skipped; one recorded
    after it starts the conversation anew."""

    async def go():
        pool = await asyncpg.create_pool(services[0], min_size=1, max_size=2)
        tenant, agent_id, conv = f"t-{uuid.uuid4().hex[:6]}", f"agt_{uuid.uuid4().hex[:8]}", "wa:1:4412"
        try:

            def entry(ts: float, seq: int, words: str) -> dict:
                return _record(tenant, agent_id, conv, ts, seq, words)

            async with pool.acquire() as conn, conn.transaction():
                await conversations.write_turns(conn, [entry(time.time() - 5, 1, "before")])
            erased_at = time.time()
            async with pool.acquire() as conn, conn.transaction():
                gone = await conversations.erase(conn, tenant, agent_id, conv, erased_at)
            assert gone == {"conversation": True, "messages": 1, "feedback": 0, "resolved": []}
            async with pool.acquire() as conn, conn.transaction():  # late: recorded before the erasure
                await conversations.write_turns(conn, [entry(erased_at - 1, 2, "late"), entry(erased_at + 1, 1, "new")])
            async with pool.acquire() as conn:
                rows = await conn.fetch(
                    """SELECT m.content->>'content' AS words FROM messages m JOIN conversations c
                       ON c.id = m.conversation_id WHERE c.tenant = $1 AND c.agent_id = $2 ORDER BY m.seq""",
                    tenant,
                    agent_id,
                )
                assert [r["words"] for r in rows] == ["new"]
                kept = await conn.fetch("SELECT external_hash FROM erased_conversations WHERE tenant = $1", tenant)
                assert [r["external_hash"] for r in kept] == [conversations.external_hash(tenant, conv)]  # (keyed)
        finally:
            await pool.close()

    asyncio.run(go())


def test_a_reload_that_read_postgresql_before_the_erasure_does_not_put_the_window_back(services):
    """A turn whose window Redis no longer held reads it from PostgreSQL and warms Redis again: if
    that read came before the erasure's commit, it must not put the erased messages back."""

    async def body(memory, pool, redis):
        agent = _agent(tenant=f"t-{uuid.uuid4().hex[:6]}")
        conv = f"c-{uuid.uuid4().hex[:6]}"
        for i in range(3):
            await memory.append(agent.tenant, agent, conv, _turn(i), request_id=f"r{i}", prompt_version=1, variant=None)
        await memory.flush()

        async def all_written() -> bool:  # (another replica's writer may have taken some of the turns)
            return len(await conversations.recent(pool, agent.tenant, agent.id, conv, 100)) == 6

        await _until(all_written, "the three turns in PostgreSQL")
        window_key, seq_key = keys(agent.tenant, agent.id, conv)
        await redis.delete(window_key, seq_key, f"{window_key}:w")  # expired: the next load reloads
        await memory.forget_recent(agent.tenant, agent.id, conv)  # the erasure began (PostgreSQL not yet)
        loaded = await memory.load(agent.tenant, agent, conv)  # reads PostgreSQL, still holding the turns
        assert len(loaded) == 6
        assert await redis.exists(window_key) == 0  # not warmed again
        await redis.delete(f"{window_key}:erased")
        assert len(await memory.load(agent.tenant, agent, conv)) == 6
        assert await redis.exists(window_key) == 1  # (without the mark it is)

    _run(services, body)


# ---- retention ----------------------------------------------------------------------------------
def test_conversations_silent_past_their_agents_retention_are_deleted(gw, services):
    """An agent's ``memory.retention_days`` deletes each conversation silent that long (its
    messages and the feedback on it); a recent one stays, and an agent without a retention keeps
    everything. The sweep runs in every replica (``GATEWAY_RETENTION_SWEEP_INTERVAL``); here it
    is called directly once the conversations' last activity was moved back in time."""
    from gateway.conversation_retention import sweep

    tenant = f"keep-{uuid.uuid4().hex[:6]}"
    admin_key = new_key(gw, tenant=tenant, scopes=["admin"])["key"]
    chat_key = new_key(gw, tenant=tenant)["key"]
    short, forever = f"short-{uuid.uuid4().hex[:6]}", f"forever-{uuid.uuid4().hex[:6]}"
    for name, memory in ((short, {"retention_days": 30, "ttl_s": 90 * 86400}), (forever, {})):
        body = {"name": name, "model": "agent-model", "template": "You help.", "variables": {}, "memory": memory}
        assert _admin(gw, "POST", "/admin/agents", admin_key, json=body).status_code == 201
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=chat_key, max_retries=0)
    convs = {(a, c): f"{c}-{uuid.uuid4().hex[:6]}" for a in (short, forever) for c in ("old", "new")}
    for (agent, _), conv in convs.items():
        client.chat.completions.create(
            model=f"agent:{agent}", messages=[{"role": "user", "content": "hi"}], metadata={"conversation_id": conv}
        )
        r = httpx.post(
            f"{gw.url}/v1/feedback",
            json={"conversation_id": conv, "agent": agent, "text": "kind words"},
            headers={"Authorization": f"Bearer {chat_key}"},
        )
        assert r.status_code in (200, 201), r.text

    def written() -> bool:
        got = _rows(services[0], "SELECT count(*) AS n FROM conversations WHERE tenant = $1", tenant)
        return got[0]["n"] == 4

    wait_until(written, what="the four conversations in PostgreSQL")
    # their agent's window in Redis is kept no longer than the retention
    window_key, _ = keys(tenant, _agent_id(services, tenant, short), convs[(short, "new")])
    ttl = _redis_ttl(services, window_key)
    assert 0 < ttl <= 30 * 86400
    old = [convs[(short, "old")], convs[(forever, "old")]]
    _rows(services[0], "UPDATE conversations SET last_at = now() - interval '31 days' WHERE external_id = ANY($1)", old)

    async def once() -> int:
        pool = await asyncpg.create_pool(services[0], min_size=1, max_size=2)
        try:
            return await sweep(pool)
        finally:
            await pool.close()

    assert asyncio.run(once()) >= 1
    left = _rows(services[0], "SELECT external_id FROM conversations WHERE tenant = $1 ORDER BY external_id", tenant)
    assert sorted(r["external_id"] for r in left) == sorted(
        [convs[(short, "new")], convs[(forever, "old")], convs[(forever, "new")]]
    )
    feedback = _rows(services[0], "SELECT conversation_id FROM feedback WHERE tenant = $1", tenant)
    assert convs[(short, "old")] not in {r["conversation_id"] for r in feedback} and len(feedback) == 3
    assert asyncio.run(once()) == 0  # idempotent


@pytest.mark.parametrize("value", [-1, 3651, "7", 1.5])
def test_a_retention_out_of_bounds_is_refused_naming_it(gw, value):
    body = {"name": f"r-{uuid.uuid4().hex[:6]}", "model": "agent-model", "template": "Hi.", "variables": {}}
    r = _admin(gw, "POST", "/admin/agents", json={**body, "memory": {"retention_days": value}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "memory.retention_days"


def _agent_id(services, tenant: str, name: str) -> str:
    return _rows(services[0], "SELECT id FROM agents WHERE tenant = $1 AND name = $2", tenant, name)[0]["id"]


def _redis_ttl(services, key: str) -> int:
    import redis as syncredis

    r = syncredis.Redis.from_url(services[1])
    try:
        return int(r.ttl(key))
    finally:
        r.close()


def test_turns_and_erasures_are_compared_on_redis_clock_not_the_gateways(services, monkeypatch):
    """A turn's stream entry carries Redis's time (``t``) and the erasure is stamped with it too:
    a turn recorded before the erasure by a replica whose clock runs ahead (its ``ts`` later than
    the erasure) is still skipped, and one recorded after it by a replica whose clock lags is kept."""
    from runtime import memory as memory_module

    private = f"gw:{{gw}}:memory-test-{uuid.uuid4().hex[:8]}"  # (no writer consumes it: read here)
    monkeypatch.setattr(memory_module, "MEMORY_STREAM", private)

    async def body(memory, pool, redis):
        agent = _agent(tenant=f"t-{uuid.uuid4().hex[:6]}")
        conv = f"c-{uuid.uuid4().hex[:6]}"
        await memory.append(agent.tenant, agent, conv, _turn(0), request_id="r0", prompt_version=1, variant=None)
        [(_, stored)] = await redis.xrange(private)
        await redis.delete(private)
        _, at = await memory.forget_recent(agent.tenant, agent.id, conv)
        assert 0 < float(stored[b"t"]) <= at  # stored before the erasure, on Redis's clock
        record = orjson.loads(stored[b"r"])
        ahead = {**stored, b"r": orjson.dumps({**record, "ts": at + 120})}  # a replica two minutes fast

        def entry(ts: float, t: float, seq: int, words: str) -> dict:
            return {**_record(agent.tenant, agent.id, conv, ts, seq, words), b"t": f"{t:.6f}".encode()}

        async with pool.acquire() as conn, conn.transaction():
            await conversations.erase(conn, agent.tenant, agent.id, conv, at)
        async with pool.acquire() as conn, conn.transaction():
            # the real entry (before the erasure) and one of a replica two minutes slow, after it
            await conversations.write_turns(conn, [ahead, entry(at - 120, at + 1, 9, "behind")])
        rows = await pool.fetch(
            """SELECT m.content->>'content' AS words FROM messages m JOIN conversations c ON c.id = m.conversation_id
               WHERE c.tenant = $1 AND c.agent_id = $2 AND c.external_id = $3""",
            agent.tenant,
            agent.id,
            conv,
        )
        assert [r["words"] for r in rows] == ["behind"]

    _run(services, body)


def test_an_erasure_recorded_unkeyed_by_an_older_release_is_read_then_dropped(services):
    """Erasures are kept under a keyed hash of tenant and id (a phone number's plain SHA-256 is
    undone by hashing every number). Those an older release recorded under the plain SHA-256
    (marked unkeyed by the migration) still keep their late turns out, until the retention sweep
    deletes them, 7 days on; keyed ones stay."""
    import hashlib

    async def go():
        pool = await asyncpg.create_pool(services[0], min_size=1, max_size=2)
        tenant, agent_id, conv = f"t-{uuid.uuid4().hex[:6]}", f"agt_{uuid.uuid4().hex[:8]}", "wa:1:4413"
        plain = hashlib.sha256(conv.encode()).hexdigest()
        assert conversations.external_hash(tenant, conv) not in (plain, conversations.external_hash("other", conv))
        insert = """INSERT INTO erased_conversations (tenant, agent_id, external_hash, erased_at, keyed)
                    VALUES ($1, $2, $3, now() - make_interval(days => $4), $5)"""
        try:
            async with pool.acquire() as conn:
                await conn.execute(insert, tenant, agent_id, plain, 0, False)
                await conn.execute(insert, tenant, agent_id, "old-unkeyed", 8, False)
                await conn.execute(insert, tenant, agent_id, "old-keyed", 8, True)
            now = time.time()
            async with pool.acquire() as conn, conn.transaction():
                late = _record(tenant, agent_id, conv, now - 5, 1, "late")
                await conversations.write_turns(conn, [late, _record(tenant, agent_id, conv, now + 5, 2, "new")])
            async with pool.acquire() as conn:
                words = await conn.fetch(
                    """SELECT m.content->>'content' AS w FROM messages m JOIN conversations c
                       ON c.id = m.conversation_id WHERE c.tenant = $1 AND c.agent_id = $2 ORDER BY m.seq""",
                    tenant,
                    agent_id,
                )
                assert [r["w"] for r in words] == ["new"]
                assert await conversations.drop_unkeyed(conn) >= 1
                left = await conn.fetch("SELECT external_hash FROM erased_conversations WHERE tenant = $1", tenant)
                assert sorted(r["external_hash"] for r in left) == sorted([plain, "old-keyed"])
                await conn.execute("DELETE FROM conversations WHERE tenant = $1", tenant)
                await conn.execute("DELETE FROM erased_conversations WHERE tenant = $1", tenant)
        finally:
            await pool.close()

    asyncio.run(go())


def test_an_erasure_keeps_an_end_user_and_customer_the_conversation_id_merely_contains(gw, services):
    """The ledger's end user and customer become the conversation's tag only when they are the id
    or its last part (a WhatsApp id ``wa:<pnid>:<wa_id>``'s customer): a short end user ("1") that
    the id happens to contain stays what it was."""
    admin_key, agent, client = _agent_and_client(gw)
    conv = f"chat-1a-{uuid.uuid4().hex[:8]}"
    rid = client.chat.completions.with_raw_response.create(
        model=f"agent:{agent}",
        messages=[{"role": "user", "content": "hi"}],
        metadata={"conversation_id": conv},
        user="1",
        extra_headers={"x-gateway-customer": "a"},
    ).headers["x-request-id"]
    q = "SELECT conversation_id, end_user, customer FROM ledger WHERE request_id = $1"
    wait_until(lambda: _rows(services[0], q, rid), what="the turn's ledger row")
    assert _admin(gw, "DELETE", f"/admin/agents/{agent}/conversations/{conv}", admin_key).status_code == 200
    [row] = _rows(services[0], q, rid)
    assert row["conversation_id"].startswith("erased:")
    assert (row["end_user"], row["customer"]) == ("1", "a")


def test_an_erasures_retag_of_runs_and_ledger_rows_uses_their_conversation_indexes(services):
    """The retag runs under the erasure's lock: on a tenant with many runs and ledger rows of one
    agent it reads the conversation's rows through (tenant, agent_id, conversation_id) and
    (tenant, conversation_id), never the agent's or tenant's every row."""
    from gateway.db import migrate
    from runtime import erased_records

    async def go() -> list[str]:
        conn = await asyncpg.connect(services[0])
        await migrate(conn)
        tenant = f"retag-{uuid.uuid4().hex[:6]}"
        try:
            await conn.execute(
                """INSERT INTO runs (request_id, tenant, agent_id, conversation_id)
                   SELECT 'req_' || md5(random()::text), $1, 'agt_x', 'c-' || (i % 5000)
                   FROM generate_series(1, 20000) i""",
                tenant,
            )
            await conn.execute(
                """INSERT INTO ledger (request_id, ts, tenant, conversation_id, end_user, endpoint, status)
                   SELECT 'req_' || md5(random()::text), now(), $1, 'c-' || (i % 5000), 'u', 'chat', 200
                   FROM generate_series(1, 20000) i""",
                tenant,
            )
            await conn.execute("ANALYZE runs")
            await conn.execute("ANALYZE ledger")
            plans = []
            for sql, args in (
                (erased_records._RUNS, (tenant, ["agt_x"], ["c-7"], ["erased:x"], None)),
                (erased_records._LEDGER, (tenant, ["c-7"], ["erased:x"], None)),
            ):
                rows = await conn.fetch(f"EXPLAIN {sql}", *args)
                plans.append("\n".join(r[0] for r in rows))
        finally:
            await conn.execute("DELETE FROM runs WHERE tenant = $1", tenant)
            await conn.execute("DELETE FROM ledger WHERE tenant = $1", tenant)
            await conn.close()
        return plans

    runs_plan, ledger_plan = asyncio.run(go())
    assert "runs_tenant_agent_conversation" in runs_plan and "Seq Scan on runs" not in runs_plan, runs_plan
    assert "ledger_tenant_conversation" in ledger_plan and "Seq Scan on ledger" not in ledger_plan, ledger_plan
