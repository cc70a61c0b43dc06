"""Privacy s25: what an erased or expired conversation left behind, each reproduced before its fix —
the words escalations and channel records kept past a retention, the memory dead letters, the
Redis window a reload warmed just before a retention sweep, the learned examples never reviewed,
the route that erased ``x/messages`` when asked for the messages of ``x``, and the erasure's scan
of the agent's runs."""

from __future__ import annotations

import asyncio
import time
import urllib.parse
import uuid

import asyncpg
import openai
import orjson
import pytest
import redis.asyncio as aioredis

from gateway.db import migrate
from runtime import conversations
from runtime.memory import MEMORY_STREAM, Memory, keys
from runtime.types import Agent, MemorySettings
from tests.conftest import Gateway, wait_until
from tests.test_agents_e2e import config
from tests.test_channels_vapi import admin as _admin
from tests.test_channels_whatsapp import rows as _rows
from tests.test_policies import new_key

DEAD = f"{MEMORY_STREAM}:dead"


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    g = Gateway(tmp_root, config(module_mock), services)
    yield g
    g.stop()


def _agent_with_key(gw: Gateway, tenant: str, **memory) -> tuple[str, str, str, str]:
    admin_key = new_key(gw, tenant=tenant, scopes=["admin"])["key"]
    chat_key = new_key(gw, tenant=tenant)["key"]
    agent = f"bot-{uuid.uuid4().hex[:6]}"
    body = {"name": agent, "model": "agent-model", "template": "You help.", "variables": {}}
    if memory:
        body["memory"] = memory
    r = _admin(gw, "POST", "/admin/agents", admin_key, json=body)
    assert r.status_code == 201, r.text
    return agent, r.json()["id"], admin_key, chat_key


def _stored(services, tenant: str, conv: str) -> int:
    sql = """SELECT count(*) AS n FROM messages m JOIN conversations c ON c.id = m.conversation_id
             WHERE c.tenant = $1 AND c.external_id = $2"""
    return _rows(services[0], sql, tenant, conv)[0]["n"]


def _redis(services, fn):
    async def go():
        r = aioredis.from_url(services[1])
        try:
            return await fn(r)
        finally:
            await r.aclose()

    return asyncio.run(go())


def _dead_letter(services, tenant: str, agent_id: str, conv: str, words: str) -> None:
    """A turn PostgreSQL refuses (a prompt version that is no number) put in the memory stream:
    the gateway's memory writer moves it to the dead letters, whole."""
    record = {
        "tenant": tenant,
        "agent_id": agent_id,
        "external_id": conv,
        "request_id": f"r-{uuid.uuid4().hex[:8]}",
        "prompt_version": "not-a-number",
        "variant": None,
        "ts": time.time(),
        "messages": [{"role": "user", "content": words}],
    }
    _redis(services, lambda r: r.xadd(MEMORY_STREAM, {"r": orjson.dumps(record), "s": "1"}))


async def _tenant_letters(r, tenant: str) -> list[tuple[bytes, dict]]:
    """(id, record) of the tenant's memory dead letters. Other modules run by this pytest worker
    leave letters of their own, some of them no JSON (filler bytes): they are not the tenant's."""
    out = []
    for entry_id, fields in await r.xrange(DEAD):
        try:
            record = orjson.loads(fields.get(b"r", b""))
        except orjson.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("tenant") == tenant:
            out.append((entry_id, record))
    return out


def _dead_words(services, tenant: str) -> list[str]:
    """The words of the tenant's memory dead letters (the test reads the whole dead stream)."""

    async def read(r):
        return [m["content"] for _, record in await _tenant_letters(r, tenant) for m in record["messages"]]

    return _redis(services, read)


def _drop_dead(services, tenant: str) -> None:
    """The tenant's memory dead letters (and their tags) removed: other modules list the stream."""

    async def drop(r):
        for entry_id, _ in await _tenant_letters(r, tenant):
            await r.xdel(DEAD, entry_id)
            await r.xdel(f"{DEAD}:tags", entry_id)

    _redis(services, drop)


# ---- 1, 2, 5: retention clears what erasure clears, dead letters included ----------------------


def _seed_conversation(conn, tenant: str, agent_id: str, conv: str, days_ago: int):
    return conn.execute(
        """WITH c AS (
               INSERT INTO conversations (id, tenant, agent_id, external_id, created_at, last_at, turns)
               VALUES ('conv_' || md5(random()::text), $1, $2, $3, now() - make_interval(days => $4),
                       now() - make_interval(days => $4), 1) RETURNING id)
           INSERT INTO messages (tenant, conversation_id, seq, role, content, created_at)
           SELECT $1, c.id, 1, 'user', '{"role": "user", "content": "my card is 4111"}',
                  now() - make_interval(days => $4) FROM c""",
        tenant,
        agent_id,
        conv,
        days_ago,
    )


def _seed_words(conn, tenant: str, agent_id: str, agent: str, conv: str, days_ago: int):
    """The customer's words a second time: an escalation, a WhatsApp record, a call record, a
    pending learned example, the WhatsApp profile name."""

    async def go():
        esc = f"esc_{uuid.uuid4().hex[:12]}"
        at = f"now() - make_interval(days => {int(days_ago)})"
        await conn.execute(
            f"""INSERT INTO escalations (id, tenant, agent_id, agent, conversation_id, question, draft,
                                         corrected_answer, context, status, outcome, sla_first_s, sla_resolve_s,
                                         created_at, updated_at)
                VALUES ($1, $2, $3, $4, $5, 'my card is 4111', 'your card 4111', 'ok 4111', '{{"v": "4111"}}',
                        'resolved', 'answered', 60, 600, {at}, {at})""",
            esc,
            tenant,
            agent_id,
            agent,
            conv,
        )
        await conn.execute(
            f"""INSERT INTO learned_examples (id, tenant, agent_id, escalation_id, question, answer, created_at)
                VALUES ($1, $2, $3, $4, 'my card is 4111', 'ok 4111', {at})""",
            f"lex_{uuid.uuid4().hex[:12]}",
            tenant,
            agent_id,
            esc,
        )
        await conn.execute(
            f"""INSERT INTO whatsapp_messages (tenant, account, wamid, direction, conversation_id, wa_id, body,
                                               status, created_at)
                VALUES ($1, 'acct', $2, 'in', $3, '4477', 'my card is 4111', 'read', {at})""",
            tenant,
            f"wamid.{uuid.uuid4().hex}",
            conv,
        )
        await conn.execute(
            f"""INSERT INTO whatsapp_conversations (tenant, account, phone_number_id, wa_id, conversation_id, agent,
                                                    profile_name, last_inbound_at)
                VALUES ($1, 'acct', '1555', $2, $3, $4, 'Jane Customer', {at})""",
            tenant,
            uuid.uuid4().hex[:10],
            conv,
            agent,
        )
        await conn.execute(
            f"""INSERT INTO vapi_calls (id, tenant, account, call_id, conversation_id, transcript, summary,
                                        recording_url, status, cost_usd, created_at)
                VALUES ($1, $2, 'acct', $3, $4, 'my card is 4111', 'card 4111', 'https://r.example/1.wav',
                        'ended', 0.25, {at})""",
            f"vcall_{uuid.uuid4().hex[:12]}",
            tenant,
            uuid.uuid4().hex[:10],
            conv,
        )

    return go()


_WORDS = """
SELECT 'escalation' AS kind, conversation_id, concat_ws('|', question, draft, corrected_answer,
       nullif(context::text, '{}')) AS words, status || '/' || outcome AS kept FROM escalations WHERE tenant = $1
UNION ALL
SELECT 'whatsapp', conversation_id, body, status FROM whatsapp_messages WHERE tenant = $1
UNION ALL
SELECT 'profile', conversation_id, profile_name, agent FROM whatsapp_conversations WHERE tenant = $1
UNION ALL
SELECT 'call', conversation_id, concat_ws('|', transcript, summary, recording_url), status || '/' || cost_usd
FROM vapi_calls WHERE tenant = $1
UNION ALL
SELECT 'learned', e.conversation_id, l.question || '|' || l.answer, l.status
FROM learned_examples l JOIN escalations e ON e.id = l.escalation_id WHERE l.tenant = $1
"""


def _words(services, tenant: str) -> dict[tuple[str, str], tuple[str | None, str | None]]:
    return {
        (r["kind"], r["conversation_id"]): (r["words"] or None, r["kept"]) for r in _rows(services[0], _WORDS, tenant)
    }


def _memory_run(services, body):
    async def main():
        async with asyncpg.create_pool(services[0], min_size=1, max_size=4) as pool:
            redis = aioredis.from_url(services[1])
            memory = Memory(pool, redis)
            await memory.start()
            try:
                return await body(memory, pool, redis)
            finally:
                await memory.stop()
                await redis.aclose()

    return asyncio.run(main())


def test_retention_clears_the_words_escalations_channels_and_dead_letters_kept_as_erasure_does(gw, services):
    """A conversation past its agent's retention lost its messages and feedback, but the
    customer's words stayed in its escalations (question, draft, answer, context), its channel
    records (a WhatsApp body, a call's transcript, summary and recording), the WhatsApp profile
    name, the learned example never reviewed, and the memory dead letters — all of which the
    erasure clears. The records stay (statuses, outcomes, costs); a recent conversation keeps all."""
    from gateway.conversation_retention import sweep

    tenant = f"ret-{uuid.uuid4().hex[:6]}"
    agent, agent_id, _, _ = _agent_with_key(gw, tenant, retention_days=30, ttl_s=90 * 86400)
    old, new = f"wa:1555:{uuid.uuid4().int % 10**9}", f"wa:1555:{uuid.uuid4().int % 10**9}"

    async def seed():
        conn = await asyncpg.connect(services[0])
        try:
            for conv, days in ((old, 31), (new, 1)):
                await _seed_conversation(conn, tenant, agent_id, conv, days)
                await _seed_words(conn, tenant, agent_id, agent, conv, days)
        finally:
            await conn.close()

    asyncio.run(seed())
    for conv in (old, new):
        _dead_letter(services, tenant, agent_id, conv, f"dead words of {conv}")
    wait_until(lambda: len(_dead_words(services, tenant)) == 2, what="the two dead letters")

    assert _memory_run(services, lambda memory, pool, redis: sweep(pool, memory)) >= 1
    words = _words(services, tenant)
    from core.erasure_key import conversation_tag

    tag = conversation_tag(tenant, old)  # (the records kept: the escalation's, the message's)
    assert {k: v for k, v in words.items() if k[1] in (old, tag)} == {
        ("escalation", tag): (None, "resolved/answered"),
        ("whatsapp", tag): (None, "read"),
        ("call", old): (None, "ended/0.25"),
    }  # (the learned example never reviewed is gone, and so is the WhatsApp conversation's state)
    assert all(w is not None for (_, conv), (w, _) in words.items() if conv == new) and len(words) == 8
    assert _dead_words(services, tenant) == [f"dead words of {new}"]
    assert _stored(services, tenant, old) == 0 and _stored(services, tenant, new) == 1
    _drop_dead(services, tenant)


def test_retention_releases_the_hold_of_an_open_escalation_it_resolves(gw, services):
    """A conversation past its retention with an escalation still open: the sweep resolves it
    (outcome ``erased``) but left its hold in Redis (90 days), so the customer's next message got
    the hold message instead of an answer. Now the sweep releases it; a recent conversation's hold
    stays."""
    from core.erasure_key import conversation_tag
    from gateway.conversation_retention import sweep
    from runtime.hitl import held

    tenant = f"ret-hold-{uuid.uuid4().hex[:6]}"
    agent, agent_id, _, _ = _agent_with_key(gw, tenant, retention_days=30, ttl_s=30 * 86400)
    old, new = f"wa:1555:{uuid.uuid4().int % 10**9}", f"wa:1555:{uuid.uuid4().int % 10**9}"
    escs = {old: f"esc_{uuid.uuid4().hex[:12]}", new: f"esc_{uuid.uuid4().hex[:12]}"}

    async def seed():
        conn = await asyncpg.connect(services[0])
        try:
            for conv, days in ((old, 31), (new, 1)):
                await _seed_conversation(conn, tenant, agent_id, conv, days)
                await conn.execute(
                    """INSERT INTO escalations (id, tenant, agent_id, agent, conversation_id, status, sla_first_s,
                                                sla_resolve_s, created_at, updated_at)
                       VALUES ($1, $2, $3, $4, $5, 'queued', 60, 600, now() - make_interval(days => $6),
                               now() - make_interval(days => $6))""",
                    escs[conv],
                    tenant,
                    agent_id,
                    agent,
                    conv,
                    days,
                )
        finally:
            await conn.close()

    asyncio.run(seed())

    async def body(memory, pool, redis):
        holds = held.Holds(redis)
        for conv, esc in escs.items():
            await holds.hold(tenant, agent_id, conv, esc)
        await sweep(pool, memory, holds=holds)
        return {conv: await redis.get(held.held_key(tenant, agent_id, conv)) for conv in escs}

    left = _memory_run(services, body)
    assert left == {old: None, new: escs[new].encode()}, left
    rows = _rows(services[0], "SELECT id, status, outcome FROM escalations WHERE tenant = $1 ORDER BY id", tenant)
    assert {(r["id"], r["status"], r["outcome"]) for r in rows} == {
        (escs[old], "resolved", "erased"),
        (escs[new], "queued", None),
    }
    assert _rows(services[0], "SELECT conversation_id FROM escalations WHERE id = $1", escs[old]) == [
        {"conversation_id": conversation_tag(tenant, old)}
    ]


def test_retention_puts_the_tag_in_place_of_an_old_calls_callers_number_as_an_erasure_does(gw, services):
    """A VAPI call's conversation past its agent's retention: its call record and its ledger rows
    hold the conversation's tag in place of the caller's number (the id is not the number), as
    an erasure leaves them; a recent call of the same caller keeps its number."""
    from core.erasure_key import conversation_tag
    from gateway.conversation_retention import sweep

    tenant = f"ret-{uuid.uuid4().hex[:6]}"
    _, agent_id, _, _ = _agent_with_key(gw, tenant, retention_days=30, ttl_s=90 * 86400)
    old, new = f"vapi:{uuid.uuid4()}", f"vapi:{uuid.uuid4()}"
    number = f"+1415{uuid.uuid4().int % 10**7:07d}"

    async def seed():
        conn = await asyncpg.connect(services[0])
        try:
            for conv, days in ((old, 31), (new, 1)):
                at = f"now() - make_interval(days => {days})"
                await _seed_conversation(conn, tenant, agent_id, conv, days)
                await conn.execute(
                    f"""INSERT INTO vapi_calls (id, tenant, account, call_id, conversation_id, customer_number,
                                                status, cost_usd, created_at)
                        VALUES ($1, $2, 'acct', $3, $4, $5, 'ended', 0.25, {at})""",
                    f"vcall_{uuid.uuid4().hex[:12]}",
                    tenant,
                    conv.removeprefix("vapi:"),
                    conv,
                    number,
                )
                await conn.execute(
                    f"""INSERT INTO ledger (request_id, ts, tenant, conversation_id, end_user, customer, endpoint,
                                            status, cost_usd)
                        VALUES ($1, {at}, $2, $3, $4, $4, 'chat', 200, 0.5)""",
                    f"req_{uuid.uuid4().hex}",
                    tenant,
                    conv,
                    number,
                )
        finally:
            await conn.close()

    asyncio.run(seed())
    assert _memory_run(services, lambda memory, pool, redis: sweep(pool, memory)) >= 1
    tag = conversation_tag(tenant, old)
    calls = _rows(services[0], "SELECT conversation_id, customer_number FROM vapi_calls WHERE tenant = $1", tenant)
    assert {r["conversation_id"]: r["customer_number"] for r in calls} == {old: tag, new: number}
    ledger = _rows(
        services[0], "SELECT conversation_id, end_user, customer, cost_usd FROM ledger WHERE tenant = $1", tenant
    )
    assert sorted(tuple(r.values()) for r in ledger) == sorted([(tag, tag, tag, 0.5), (new, number, number, 0.5)])


def test_an_erasure_clears_dead_letters_learned_examples_and_the_profile_name(gw, services):
    """The memory dead letters keep whole turns (until 10,000 newer ones push them out); a
    pending learned example keeps the customer's question verbatim when no PII policy redacted
    it; the WhatsApp conversation keeps the customer's profile name: an erasure left all three."""
    tenant = f"erase-dl-{uuid.uuid4().hex[:6]}"
    agent, agent_id, admin_key, _ = _agent_with_key(gw, tenant)
    conv, other = f"wa:1555:{uuid.uuid4().int % 10**9}", f"wa:1555:{uuid.uuid4().int % 10**9}"

    async def seed():
        conn = await asyncpg.connect(services[0])
        try:
            for c in (conv, other):
                await _seed_conversation(conn, tenant, agent_id, c, 0)
                await _seed_words(conn, tenant, agent_id, agent, c, 0)
        finally:
            await conn.close()

    asyncio.run(seed())
    for c in (conv, other):
        _dead_letter(services, tenant, agent_id, c, f"dead words of {c}")
    wait_until(lambda: len(_dead_words(services, tenant)) == 2, what="the two dead letters")

    r = _admin(gw, "DELETE", f"/admin/agents/{agent}/conversations/{urllib.parse.quote(conv, safe='')}", admin_key)
    assert r.status_code == 200, r.text
    assert _dead_words(services, tenant) == [f"dead words of {other}"]
    _drop_dead(services, tenant)
    words = _words(services, tenant)
    from tests.test_wa_dead_letters_erasure import _tag

    tag = _tag(tenant, conv)  # (the records kept: the escalation's, the message's: the gateway's key)
    assert {k: v for k, v in words.items() if k[1] in (conv, tag)} == {
        ("escalation", tag): (None, "resolved/answered"),
        ("whatsapp", tag): (None, "read"),
        ("call", conv): (None, "ended/0.25"),
    }  # (the WhatsApp conversation's state, profile name and all, is gone)
    assert all(w is not None for (_, c), (w, _) in words.items() if c == other) and len(words) == 8


def test_a_reload_just_before_a_retention_sweep_does_not_keep_the_expired_window_in_redis(gw, services):
    """A customer who writes again after the retention: the turn's load finds nothing in Redis
    (the window's TTL is capped to the retention) and reads the old messages back from
    PostgreSQL into Redis; the sweep then deleted them from PostgreSQL only, and the window in
    Redis — the expired words — went on being sent to the model for another TTL."""
    from gateway.conversation_retention import sweep

    tenant = f"ret-rw-{uuid.uuid4().hex[:6]}"
    _, agent_id, _, _ = _agent_with_key(gw, tenant, retention_days=30, ttl_s=30 * 86400)
    agent = Agent(id=agent_id, tenant=tenant, name="x", model="agent-model", memory=MemorySettings(ttl_s=30 * 86400))
    conv = f"c-{uuid.uuid4().hex[:6]}"

    async def body(memory, pool, redis):
        async with pool.acquire() as conn:
            await _seed_conversation(conn, tenant, agent_id, conv, 31)
        assert [m["content"] for m in await memory.load(tenant, agent, conv)] == ["my card is 4111"]
        window_key, _ = keys(tenant, agent_id, conv)
        assert await redis.exists(window_key) == 1  # warmed from PostgreSQL
        await sweep(pool, memory)
        assert await conversations.recent(pool, tenant, agent_id, conv, 10) == []
        return await memory.load(tenant, agent, conv)

    assert _memory_run(services, body) == []


# ---- 3: the erasure's feedback lookup --------------------------------------------------------


def test_the_erasures_feedback_lookup_uses_an_index_on_the_runs_conversation(services):
    """The erasure deletes the feedback given on the conversation's turns, found through the
    agent's runs: with no index on (tenant, agent_id, conversation_id) it read every run of the
    agent (86 ms an erasure at a million runs). Both its statement and the retention's use it."""
    plan = _feedback_plan(services, feedback_rows=0)
    assert "runs_tenant_agent_conversation" in plan, plan


def test_the_erasures_feedback_delete_reads_no_more_than_the_conversations_feedback(services):
    """``request_id IN (SELECT … FROM runs …)`` beside ``OR conversation_id = …`` is a hashed
    subplan that no index serves: the delete read every feedback row of the tenant (a sequential
    scan, 150 ms an erasure at a million rows, each conversation of a retention's batch alike).
    As ``= ANY(ARRAY(SELECT …))`` the runs are read first and both feedback indexes are used."""
    plan = _feedback_plan(services, feedback_rows=20000)
    assert "Seq Scan on feedback" not in plan and "feedback_tenant_request" in plan, plan


def _feedback_plan(services, feedback_rows: int) -> str:
    async def go():
        conn = await asyncpg.connect(services[0])
        await migrate(conn)  # (run alone, before any gateway started)
        tenant = f"runs-{uuid.uuid4().hex[:6]}"
        try:
            await conn.execute(
                """INSERT INTO runs (request_id, tenant, agent_id, conversation_id)
                   SELECT 'req_' || md5(random()::text), $1, 'agt_x', 'c-' || (i % 5000)
                   FROM generate_series(1, 20000) i""",
                tenant,
            )
            await conn.execute(
                """INSERT INTO feedback (tenant, request_id, conversation_id, agent_id, score)
                   SELECT $1, CASE WHEN i % 2 = 0 THEN 'req_' || i END, CASE WHEN i % 2 = 1 THEN 'c-' || i END,
                          'agt_x', 0.5
                   FROM generate_series(1, $2) i""",
                tenant,
                feedback_rows,
            )
            await conn.execute("ANALYZE runs")
            await conn.execute("ANALYZE feedback")
            plan = await conn.fetch(f"EXPLAIN {conversations.DELETE_FEEDBACK}", tenant, ["agt_x"], ["c-7"])
        finally:
            await conn.execute("DELETE FROM runs WHERE tenant = $1", tenant)
            await conn.execute("DELETE FROM feedback WHERE tenant = $1", tenant)
            await conn.close()
        return "\n".join(r[0] for r in plan)

    return asyncio.run(go())


# ---- 4: which conversation a path names -----------------------------------------------------


def test_delete_of_a_conversations_messages_path_never_erases_another_conversation(gw, services):
    """``{conversation_id:path}`` takes the rest of the path, so ``DELETE …/conversations/x/messages``
    erased (and answered 200 for) a conversation ``x/messages`` nobody had, leaving ``x`` whole,
    while ``GET …/conversations/x/messages`` means the messages of ``x``; and ``GET …/x%2Fmessages``
    (the conversation ``x/messages``, its slash encoded) answered the messages of ``x``. The rule
    now: the id is the path after ``/conversations/``, percent-decoded; a literal final
    ``/messages`` names the messages sub-resource; an id with ``/`` may encode it as %2F (one that
    ends in ``/messages`` must)."""
    tenant = f"paths-{uuid.uuid4().hex[:6]}"
    agent, _, admin_key, chat_key = _agent_with_key(gw, tenant)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=chat_key, max_retries=0)
    x, slashed, tail = (f"{p}-{uuid.uuid4().hex[:6]}" for p in ("x", "acme/cust", "y"))
    tail = f"{tail}/messages"  # an id that itself ends in /messages
    for conv in (x, slashed, tail):
        client.chat.completions.create(
            model=f"agent:{agent}", messages=[{"role": "user", "content": "hi"}], metadata={"conversation_id": conv}
        )
    for conv in (x, slashed, tail):
        wait_until(lambda c=conv: _stored(services, tenant, c) == 2, what="the turns stored")
    base = f"/admin/agents/{agent}/conversations"

    r = _admin(gw, "DELETE", f"{base}/{x}/messages", admin_key)
    assert r.status_code == 405, r.text
    assert r.json()["error"]["param"] == "conversation_id"
    assert _stored(services, tenant, x) == 2  # nothing erased
    r = _admin(gw, "GET", f"{base}/{urllib.parse.quote(x + '/messages', safe='')}", admin_key)
    assert r.status_code == 405, r.text  # the conversation "x/messages" has no GET: not x's messages

    # an id with a slash: encoded or not, reading and erasing name the same conversation
    for path in (f"{base}/{urllib.parse.quote(slashed, safe='')}/messages", f"{base}/{slashed}/messages"):
        r = _admin(gw, "GET", path, admin_key)
        assert r.status_code == 200 and [m["role"] for m in r.json()["data"]] == ["user", "assistant"], r.text
    r = httpx_get(gw, f"/v1/agents/{agent}/conversations/{urllib.parse.quote(slashed, safe='')}/messages", chat_key)
    assert r.status_code == 200, r.text  # the client's own read of it, too
    assert r.json()["conversation_id"] == slashed and len(r.json()["data"]) == 2

    encoded_tail = urllib.parse.quote(tail, safe="")
    r = _admin(gw, "GET", f"{base}/{encoded_tail}/messages", admin_key)
    assert r.status_code == 200 and len(r.json()["data"]) == 2, r.text
    r = _admin(gw, "DELETE", f"{base}/{encoded_tail}", admin_key)
    assert r.status_code == 200 and r.json()["conversation_id"] == tail and r.json()["messages"] == 2, r.text
    assert _stored(services, tenant, tail) == 0 and _stored(services, tenant, x) == 2
    # a name whose encoded slashes make the router read another name and id: no agent of that name
    odd = f"/admin/agents/{agent}%2Fconversations%2Fzz/conversations/{x}"
    assert _admin(gw, "DELETE", odd, admin_key).status_code == 404 and _stored(services, tenant, x) == 2
    r = _admin(gw, "DELETE", f"{base}/{slashed}", admin_key)  # (unencoded, as before)
    assert r.status_code == 200 and r.json()["conversation_id"] == slashed and r.json()["messages"] == 2, r.text


def httpx_get(gw: Gateway, path: str, key: str):
    import httpx

    return httpx.get(f"{gw.url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=30)


# ---- a turn in flight on another replica while its conversation is erased -------------------


@pytest.fixture(scope="module")
def gw2(tmp_root, services, module_mock, gw):
    g = Gateway(tmp_root, config(module_mock), services)
    yield g
    g.stop()


def test_a_turn_in_flight_on_another_replica_when_its_conversation_is_erased_is_not_stored(
    gw, gw2, services, module_mock
):
    """A turn that loaded the conversation before the erasure (its window, its words) and answered
    after it was stored: the customer's message sent before the erasure and an answer written
    from the erased history were the conversation's first turn again, in Redis and
    then PostgreSQL. A turn that began after the erasure is stored, as before."""
    import concurrent.futures

    tenant = f"inflight-{uuid.uuid4().hex[:6]}"
    agent, _, admin_key, chat_key = _agent_with_key(gw, tenant)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=chat_key, max_retries=0)
    conv = f"c-{uuid.uuid4().hex[:8]}"

    def turn(words: str):
        return client.chat.completions.create(
            model=f"agent:{agent}", messages=[{"role": "user", "content": words}], metadata={"conversation_id": conv}
        )

    turn("my card is 4111")
    marker = f"slow-{uuid.uuid4().hex[:6]}"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(turn, f'[[mock:{{"delay_ms": 1500}}]] {marker} what was my card?')
        wait_until(
            lambda: any(marker in str(q["body"]) for q in module_mock.requests()), what="the slow turn at the model"
        )
        r = _admin(gw2, "DELETE", f"/admin/agents/{agent}/conversations/{conv}", admin_key)  # the other replica
        assert r.status_code == 200, r.text
        slow.result()
    sent = [q["body"]["messages"] for q in module_mock.requests() if marker in str(q["body"])]
    assert "4111" in str(sent)  # (it was answered from the history since erased)

    read = httpx_get(gw, f"/v1/agents/{agent}/conversations/{conv}/messages", chat_key)
    assert read.status_code == 200 and read.json()["data"] == [], read.text  # not in Redis
    turn("hello again")
    stored = f"""SELECT m.content->>'content' AS words FROM messages m JOIN conversations c ON c.id = m.conversation_id
                 WHERE c.tenant = '{tenant}' AND c.external_id = '{conv}' ORDER BY m.seq"""
    wait_until(lambda: len(_rows(services[0], stored)) >= 2, what="the new turn in PostgreSQL")
    words = [r["words"] for r in _rows(services[0], stored)]
    assert len(words) == 2 and words[0] == "hello again" and marker not in str(words), words
    turn("and again")  # (a turn that loaded the conversation after the erasure goes on from it)
    wait_until(lambda: len(_rows(services[0], stored)) == 4, what="the next turn in PostgreSQL")
    read = httpx_get(gw2, f"/v1/agents/{agent}/conversations/{conv}/messages", chat_key)
    contents = [m["content"] for m in read.json()["data"]]
    assert len(contents) == 4 and contents[0] == "hello again" and contents[2] == "and again", read.text


# ---- the idempotency cache ------------------------------------------------------------------


def test_an_erasure_drops_the_conversations_answers_kept_for_idempotent_replays(gw, services):
    """A turn sent with an Idempotency-Key (every WhatsApp turn is) keeps its whole answer in
    Redis for ``server.idempotency_ttl_s`` (a day) to replay it: after the erasure, the same
    request replayed the erased answer. Now the erasure drops the conversation's stored answers
    (and their bytes from the tenant's count): the repeat is a new turn. Another conversation's
    stays."""
    tenant = f"erase-idem-{uuid.uuid4().hex[:6]}"
    agent, _, admin_key, chat_key = _agent_with_key(gw, tenant)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=chat_key, max_retries=0)
    conv, other = f"c-{uuid.uuid4().hex[:8]}", f"c-{uuid.uuid4().hex[:8]}"

    def turn(c: str, key: str, via_header: bool = False):
        extra = {"x-gateway-conversation": c} if via_header else {}
        return client.chat.completions.with_raw_response.create(
            model=f"agent:{agent}",
            messages=[{"role": "user", "content": "my card is 4111"}],
            metadata={} if via_header else {"conversation_id": c},
            extra_headers={"Idempotency-Key": key, **extra},
        )

    keys_ = {(c, h): f"idem-{uuid.uuid4().hex[:8]}" for c in (conv, other) for h in (False, True)}
    for (c, h), k in keys_.items():
        assert turn(c, k, h).headers.get("x-gateway-idempotent-replay") is None
    for (c, h), k in keys_.items():
        assert turn(c, k, h).headers.get("x-gateway-idempotent-replay") == "true"  # stored
    from gateway.idempotency import _tenant_key

    counted = f"{_tenant_key(tenant)}:bytes"
    before = int(_redis(services, lambda r: r.get(counted)))
    r = _admin(gw, "DELETE", f"/admin/agents/{agent}/conversations/{conv}", admin_key)
    assert r.status_code == 200, r.text
    after = int(_redis(services, lambda r: r.get(counted)))
    assert 0 < after < before  # (the tenant's bound counts the answers still stored only)
    for h in (False, True):
        assert turn(conv, keys_[(conv, h)], h).headers.get("x-gateway-idempotent-replay") is None  # run again
        assert turn(other, keys_[(other, h)], h).headers.get("x-gateway-idempotent-replay") == "true"


def test_a_turn_in_flight_when_its_conversation_is_erased_opens_no_escalation_with_its_words(
    gw, gw2, services, module_mock
):
    """A low-confidence turn that loaded the conversation before its erasure and was scored after
    it opened an escalation holding the customer's message and the AI's draft (and held the
    conversation for a person): the words of the erased conversation, in the queue for good."""
    import concurrent.futures

    tenant = f"inflight-esc-{uuid.uuid4().hex[:6]}"
    admin_key = new_key(gw, tenant=tenant, scopes=["admin"])["key"]
    chat_key = new_key(gw, tenant=tenant)["key"]
    agent = f"esc-{uuid.uuid4().hex[:6]}"
    body = {
        "name": agent,
        "model": "agent-model",
        "template": "You help.",
        "variables": {},
        "escalation": {"enabled": True, "threshold": 0.5, "logprobs": True},
    }
    assert _admin(gw, "POST", "/admin/agents", admin_key, json=body).status_code == 201
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=chat_key, max_retries=0)
    conv = f"c-{uuid.uuid4().hex[:8]}"

    def turn(words: str):
        return client.chat.completions.with_raw_response.create(
            model=f"agent:{agent}", messages=[{"role": "user", "content": words}], metadata={"conversation_id": conv}
        )

    turn("my card is 4111")
    marker = f"slow-{uuid.uuid4().hex[:6]}"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(turn, f'[[mock:{{"delay_ms": 1500, "logprob": -2}}]] {marker} card 4111 lost')
        wait_until(
            lambda: any(marker in str(q["body"]) for q in module_mock.requests()), what="the slow turn at the model"
        )
        r = _admin(gw2, "DELETE", f"/admin/agents/{agent}/conversations/{conv}", admin_key)
        assert r.status_code == 200, r.text
        answered = slow.result()
    opened = _rows(services[0], "SELECT question FROM escalations WHERE tenant = $1", tenant)
    assert opened == [] and answered.headers.get("x-gateway-escalation") is None, opened
    # (a low-confidence turn after the erasure escalates as ever)
    later = turn('[[mock:{"logprob": -2}]] where is my parcel?')
    assert later.headers.get("x-gateway-escalation"), later.headers


def test_an_escalation_spooled_by_a_turn_that_loaded_an_erased_conversation_is_not_opened(services):
    """An escalation PostgreSQL could not take on its turn waits in Redis for the sweeper; one
    whose turn loaded the conversation before its erasure was opened after it, with the words.
    (A private Redis database: no gateway's sweeper takes the spooled escalations.)"""
    from runtime.hitl import held, sla

    async def go():
        redis = aioredis.from_url(f"{services[1]}?db=13")
        async with asyncpg.create_pool(services[0], min_size=1, max_size=2) as pool:
            async with pool.acquire() as conn:
                await migrate(conn)
            memory = Memory(pool, redis)
            agent = Agent(
                id=f"agt_{uuid.uuid4().hex[:12]}", tenant=f"spool-{uuid.uuid4().hex[:6]}", name="x", model="m"
            )
            erased, other = f"c-{uuid.uuid4().hex[:6]}", f"c-{uuid.uuid4().hex[:6]}"
            turn = [{"role": "user", "content": "my card is 4111"}, {"role": "assistant", "content": "ok"}]
            for conv in (erased, other):
                await memory.append(agent.tenant, agent, conv, turn, request_id="r1", prompt_version=1, variant=None)
            await memory.forget_recent(agent.tenant, agent.id, erased)  # the erasure
            for conv in (erased, other):
                esc = {
                    "id": f"esc_{uuid.uuid4().hex[:12]}", "tenant": agent.tenant, "agent_id": agent.id,
                    "agent": agent.name, "conversation_id": conv, "urgency": "normal", "base_priority": 0,
                    "team": "support", "question": "my card is 4111", "draft": "your card", "seq": 2,
                    "sla_first_s": 60, "sla_resolve_s": 600,
                }  # fmt: skip
                await held.spool(redis, esc)

            async def emit(alert):
                pass

            sweeper = sla.Sweeper(pool, redis, held.Holds(redis), emit)
            try:
                await sweeper.open_spooled()
                return await pool.fetch(
                    "SELECT conversation_id FROM escalations WHERE tenant = $1 ORDER BY 1", agent.tenant
                ), other
            finally:
                await redis.delete(held.PENDING_KEY)
                await redis.aclose()

    opened, other = asyncio.run(go())
    assert [r["conversation_id"] for r in opened] == [other]


# ---- listing the memory dead letters --------------------------------------------------------


def test_listing_dead_letters_after_small_ones_holds_a_bounded_part_of_the_large_ones(gw, services):
    """A page of dead letters is fetched a few at a time, as many as the ones read so far say fit
    in its 8 MB: after a few small turns (a few hundred bytes each: the average) that came to
    thousands, and the next fetch took every large turn behind them at once (here 48 MB, in the
    serving process). Now Redis sizes each entry before sending it and cuts its fields to what
    the listing shows: the gateway holds a page's worth at most."""
    import redis as syncredis

    from tests.test_admin_streams import _peak_rss_kb

    r = syncredis.Redis.from_url(services[1])
    big = b'{"messages":[{"role":"user","content":"' + b"z" * (4 * 1024 * 1024) + b'"}]}'
    ids = [r.xadd(DEAD, {"r": b'{"tenant":"small"}', "s": b"1", "error": b"22P02"}) for _ in range(3)]
    ids += [r.xadd(DEAD, {"r": big, "s": b"1", "error": b"23514"}) for _ in range(12)]
    try:
        pid = gw.proc.pid
        with open(f"/proc/{pid}/clear_refs", "w") as f:  # the peak (VmHWM) from here
            f.write("5")
        before = _peak_rss_kb(pid)
        after = ids[0].decode()
        got = _admin(gw, "GET", "/admin/streams/memory/dead-letters", params={"limit": 1000, "after": after})
        assert got.status_code == 200, got.text
        grew_mb = (_peak_rss_kb(pid) - before) / 1024
        page = got.json()
        assert [d["id"] for d in page["data"]][:2] == [i.decode() for i in ids[1:3]]
        assert all(len(d["record"]["r"]) <= 4096 for d in page["data"]) and page["has_more"] is True
        assert len(page["data"]) < 14
        assert grew_mb < 40, f"the listing took {grew_mb:.0f} MB of the gateway's memory"
    finally:
        r.xdel(DEAD, *ids)
        r.close()


def test_dead_letters_written_before_they_were_tagged_are_found_by_an_erasure(services):
    """The memory dead letters an older release wrote carry no tag: an erasure could not find
    them. A writer tags them once (any replica, in the background), reading each record's first
    bytes only."""
    from core.stream_writer import StreamWriter
    from runtime.memory import conversation_tag, dead_tag

    stream = f"gw:{{gw}}:memory-test-{uuid.uuid4().hex[:8]}"

    async def go():
        r = aioredis.from_url(services[1])
        try:
            for conv, words in (("a", "my card is 4111"), ("a", "and 4112"), ("b", "keep me")):
                record = {"tenant": "t", "agent_id": "agt", "external_id": conv, "request_id": "r",
                          "prompt_version": 1, "variant": None, "ts": 1.0,
                          "messages": [{"role": "user", "content": words + " " + "z" * 10000}]}  # fmt: skip
                await r.xadd(f"{stream}:dead", {"r": orjson.dumps(record), "s": "1", "error": "22P02"})
            writer = StreamWriter(r, None, stream=stream, group="g", write=None, dead_tag=dead_tag)
            await writer.start()
            try:
                for _ in range(200):
                    if await r.exists(f"{stream}:dead:tags0:done"):
                        break
                    await asyncio.sleep(0.05)
                dropped = await writer.drop_dead_tagged({conversation_tag("t", "agt", "a")})
            finally:
                await writer.stop(grace=1)
            left = [orjson.loads(f[b"r"])["external_id"] for _, f in await r.xrange(f"{stream}:dead")]
            return dropped, left
        finally:
            await r.delete(stream, f"{stream}:dead", f"{stream}:dead:tags", f"{stream}:dead:tags0",
                           f"{stream}:dead:tags0:done")  # fmt: skip
            await r.aclose()

    assert asyncio.run(go()) == (2, ["b"])


def test_a_conversations_index_of_stored_answers_is_bounded_and_an_erasure_reads_it_in_one_short_call(services):
    """Every agent answer stored for an Idempotency-Key was added to its conversation's index, and
    nothing ever left it: a client sending a conversation's turns with fresh keys grew it without
    end (about 90 bytes a turn, past the tenant's byte bound and kept alive by each add), and an
    erasure then read it whole in one script that held Redis for every tenant. The index now
    holds the newest MAX_CONVERSATION_ANSWERS answers that have not expired."""
    from gateway import idempotency as idem

    tenant = f"t-{uuid.uuid4().hex[:8]}"
    conv_index = idem.conversation_index(tenant, "bot", "c-1")
    tenant_index, count = idem._tenant_key(tenant) + ":index", idem._tenant_key(tenant) + ":bytes"
    n = idem.MAX_CONVERSATION_ANSWERS + 50

    async def go(r):
        keys = [f"gw:{{gw}}:idem-test:{tenant}:{i}" for i in range(n)]
        async with r.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.eval(idem._STORE, 4, key, tenant_index, count, conv_index, "m", b"D" + b"x" * 20, 3600, 10**9)
            await pipe.execute()
        size = await r.zcard(conv_index)
        dropped = await r.eval(idem._FORGET_CONVERSATION, 3, conv_index, tenant_index, count)
        left = sum([await r.exists(k) for k in keys]), await r.exists(conv_index)
        await r.delete(*keys, tenant_index, count)
        return size, dropped, left

    size, dropped, left = _redis(services, go)
    assert size == idem.MAX_CONVERSATION_ANSWERS  # (the answers out of it end with their ttl)
    assert dropped == idem.MAX_CONVERSATION_ANSWERS and left == (n - idem.MAX_CONVERSATION_ANSWERS, 0)
