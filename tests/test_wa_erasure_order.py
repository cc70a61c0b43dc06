"""The admin erasure of a WhatsApp conversation marks it erased (the mark the gateway reads with a
turn's signed queue time, ``x-gateway-queued-at``) before it clears the conversation's memory.

A first turn (the conversation held nothing when it was loaded, so the seq floor that stops a
later turn cannot) answered while the erasure runs stores itself after the memory's erasure began:
only the mark can refuse it. Marked after the memory step, a turn stored between the two was kept,
and reached PostgreSQL after the erasure (stamped after the erasure's time, it is not one of the
turns "on their way" the erasure skips): the customer's words from before the erasure, kept.

The erasure is paused right after its memory step by a gateway launched with
``runtime.memory.Memory.forget_recent`` wrapped (it waits for a Redis key the test sets), and the
turn is answered there: the order is the gateway's own, the timing the test's.

The real stack: a gateway process (its channel worker off), the mock LLM, the mock Graph API."""

from __future__ import annotations

import textwrap
import threading
import urllib.parse
import uuid
from pathlib import Path

import httpx
import orjson
import pytest
import redis

from core import queued_proof
from runtime.memory import MEMORY_GROUP, MEMORY_STREAM
from runtime.memory import keys as memory_keys
from runtime.runs import RUNS_GROUP, RUNS_STREAM
from tests.conftest import (
    MASTER_KEY,
    Gateway,
    environ,
    run_cli,
    wait_until,
)
from tests.test_channels_whatsapp import rows
from tests.test_wa_queued_erasure import KEY, SLOW, _account, _redis_now, _turn

TENANT = f"waord-{uuid.uuid4().hex[:6]}"
PNID = "8303"
# + conversation id: ":armed" (the erasure pauses after its memory step), ":held" (it does), ":go"
# (it goes on); ":writer" (the memory and runs writers hold the conversation's turns), ":written"
# (they write); ":append" (a turn pauses before its store), ":appending" (it does), ":stored" (it goes on)
PAUSE = "test:erasure-pause:"

LAUNCHER = textwrap.dedent(
    """
    import asyncio
    import os
    import sys

    import orjson
    import redis.asyncio as aioredis

    from runtime import conversations, memory

    GATE = "test:erasure-pause:"
    _client = []


    def _redis():
        if not _client:
            _client.append(aioredis.from_url(os.environ["REDIS_URL"]))
        return _client[0]


    async def _wait_for(key):
        for _ in range(1200):  # bounded: the test lets it go on
            if await _redis().exists(key):
                return
            await asyncio.sleep(0.05)


    _forget_recent = memory.Memory.forget_recent


    async def forget_recent(self, tenant, agent_id, conversation_id):
        out = await _forget_recent(self, tenant, agent_id, conversation_id)
        gate = GATE + conversation_id
        if await _redis().delete(gate + ":armed"):  # (once: the erasure's first memory step)
            await _redis().set(gate + ":held", "1", ex=300)
            await _wait_for(gate + ":go")
        return out


    _write_turns = conversations.write_turns


    async def write_turns(conn, entries, key=None):
        # a memory writer behind the erasure (PostgreSQL slow, a busy replica): a turn of an armed
        # conversation reaches PostgreSQL once the test says the erasure is over
        for e in entries:
            gate = GATE + str(orjson.loads(e[b"r"]).get("external_id"))
            if await _redis().exists(gate + ":writer"):
                await _wait_for(gate + ":written")
        return await _write_turns(conn, entries, key)


    _append = memory.Memory.append


    async def append(self, tenant, agent, conversation_id, messages, **kw):
        # a turn answered and about to be stored: paused here once when the test arms it
        gate = GATE + conversation_id
        if await _redis().delete(gate + ":append"):
            await _redis().set(gate + ":appending", "1", ex=300)
            await _wait_for(gate + ":stored")
        return await _append(self, tenant, agent, conversation_id, messages, **kw)


    from runtime import runs

    _write_run_entries = runs._write_run_entries


    async def write_run_entries(conn, entries):
        # the runs writer behind too (a run names its agent, by which the erasure found it)
        for e in entries:
            gate = GATE + str(orjson.loads(e[b"r"]).get("conversation_id"))
            if await _redis().exists(gate + ":writer"):
                await _wait_for(gate + ":written")
        return await _write_run_entries(conn, entries)


    memory.Memory.forget_recent = forget_recent
    memory.Memory.append = append
    conversations.write_turns = write_turns
    runs._write_run_entries = write_run_entries

    from gateway.cli import main

    sys.exit(main())
    """
)


class PausingGateway(Gateway):
    """``gateway serve`` whose erasures pause after their memory step when the test arms it."""

    def __init__(self, tmp: Path, config: dict, urls: tuple[str, str]) -> None:
        env = {"GATEWAY_CHANNEL_WORKER": "0"}
        super().__init__(tmp, config, urls, launcher=LAUNCHER, launcher_name="pausing_gateway", env=env)


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock, graph):
    out = run_cli("keys", "create", "--name", "waord", "--tenant", TENANT, urls=services, tmp=tmp_root)
    assert out.returncode == 0, out.stderr
    key = out.stdout.splitlines()[0].strip()
    config = {
        "router": {"max_attempts": 1},
        "providers": [{"name": "llm", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k"]}],
        "models": [{"name": "agent-model", "deployments": [{"provider": "llm", "model": "m"}]}],
        "channels": {"whatsapp": {"ord": _account(TENANT, PNID, "WAORD_KEY", graph.url)}},
    }
    with environ({"WAORD_KEY": key}):
        g = PausingGateway(tmp_root, config, services)
    g.key = key
    try:
        for name in ("wabot", "wabot2"):  # wabot answers the business number; wabot2 is another agent
            body = {
                "name": name,
                "tenant": TENANT,
                "model": "agent-model",
                "template": "You help {{ customer_number }}.",
                "variables": {"customer_number": {"type": "string", "required": False}},
            }
            r = httpx.post(
                f"{g.url}/admin/agents", json=body, headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=30
            )
            assert r.status_code == 201, r.text
        yield g
    finally:
        g.stop()


def _on_its_way(services, conv: str, stream: str = MEMORY_STREAM, group_name: str = MEMORY_GROUP,
                field: str = "external_id") -> bool:  # fmt: skip
    """Whether the memory stream (or another writer's) holds a turn of the conversation its writers
    have not written yet (not delivered, or delivered and not acknowledged)."""
    r = redis.Redis.from_url(services[1])
    try:
        ours = [entry_id for entry_id, fields in r.xrange(stream) if orjson.loads(fields[b"r"]).get(field) == conv]
        if not ours:
            return False
        group = next(g for g in r.xinfo_groups(stream) if g["name"].decode() == group_name)
        delivered = tuple(int(p) for p in group["last-delivered-id"].decode().split("-"))
        pending = {p["message_id"] for p in r.xpending_range(stream, group_name, "-", "+", 10_000)}
        return any(tuple(int(p) for p in i.decode().split("-")) > delivered or i in pending for i in ours)
    finally:
        r.close()


def _runs_on_their_way(services, conv: str) -> bool:
    return _on_its_way(services, conv, RUNS_STREAM, RUNS_GROUP, "conversation_id")


def test_a_first_turn_stored_while_the_erasure_clears_the_memory_is_refused_and_not_kept(gw, services, module_mock):
    wa_id = str(uuid.uuid4().int % 10**12 + 10**11)
    conv = f"wa:{PNID}:{wa_id}"
    queued = queued_proof.sign(TENANT, conv, _redis_now(services), KEY)  # queued before the erasure
    r = redis.Redis.from_url(services[1])
    r.set(f"{PAUSE}{conv}:armed", "1", ex=300)
    r.set(f"{PAUSE}{conv}:writer", "1", ex=300)
    answered: list[httpx.Response] = []
    erased: list[httpx.Response] = []
    call = threading.Thread(
        target=lambda: answered.append(_turn(gw, gw.key, conv, wa_id, "my card is 4111" + SLOW, queued))
    )
    path = f"/admin/agents/wabot/conversations/{urllib.parse.quote(conv, safe='')}"
    erase = threading.Thread(
        target=lambda: erased.append(
            httpx.delete(
                f"{gw.url}{path}",
                params={"tenant": TENANT},
                headers={"Authorization": f"Bearer {MASTER_KEY}"},
                timeout=120,
            )
        )
    )
    call.start()
    try:
        # the first turn loaded the (empty) conversation and waits for the model
        wait_until(
            lambda: any(wa_id in str(q["body"].get("messages")) for q in module_mock.requests()),
            what="the model asked",
        )
        erase.start()
        wait_until(lambda: r.exists(f"{PAUSE}{conv}:held"), what="the erasure past its memory step")
        call.join(60)  # the model answers, the turn stores itself: the erasure is between its steps
        assert answered and answered[0].status_code == 200, answered and answered[0].text
    finally:
        r.set(f"{PAUSE}{conv}:go", "1", ex=300)
        call.join(60)
        if erase.ident is not None:
            erase.join(120)
        r.set(f"{PAUSE}{conv}:written", "1", ex=300)  # the memory writer goes on, after the erasure
        r.close()
    assert erased and erased[0].status_code == 200, erased and erased[0].text
    wait_until(lambda: not _on_its_way(services, conv), what="the memory writers past the turn")
    kept = """SELECT m.content->>'content' AS words FROM messages m JOIN conversations c ON c.id = m.conversation_id
              WHERE c.tenant = $1 AND c.external_id = $2"""
    assert rows(services[0], kept, TENANT, conv) == []
    assert rows(services[0], "SELECT 1 FROM conversations WHERE tenant = $1 AND external_id = $2", TENANT, conv) == []


def _erase(gw, conv: str, agent: str = "wabot") -> httpx.Response:
    path = f"/admin/agents/{agent}/conversations/{urllib.parse.quote(conv, safe='')}"
    return httpx.delete(
        f"{gw.url}{path}", params={"tenant": TENANT}, headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=120
    )


def _agent_turn(gw, agent: str, conv: str, words: str) -> httpx.Response:
    """A turn of ``agent`` on ``conv`` with the channel's key, no queue time (as a REST client)."""
    body = {
        "model": f"agent:{agent}",
        "messages": [{"role": "user", "content": words}],
        "metadata": {"conversation_id": conv},
    }
    return httpx.post(
        f"{gw.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {gw.key}"}, timeout=60
    )


def _kept(services, conv: str) -> list:
    """What PostgreSQL holds under the id, any agent's: its messages' words and its runs."""
    words = rows(
        services[0],
        """SELECT m.content->>'content' AS words FROM messages m JOIN conversations c ON c.id = m.conversation_id
           WHERE c.tenant = $1 AND c.external_id = $2""",
        TENANT,
        conv,
    )
    ran = rows(services[0], "SELECT agent FROM runs WHERE tenant = $1 AND conversation_id = $2", TENANT, conv)
    return [*words, *ran]


def _window(services, agent: str, conv: str) -> list[bytes]:
    agent_id = rows(services[0], "SELECT id FROM agents WHERE tenant = $1 AND name = $2", TENANT, agent)[0]["id"]
    r = redis.Redis.from_url(services[1])
    try:
        return r.lrange(memory_keys(TENANT, agent_id, conv)[0], 0, -1)
    finally:
        r.close()


def test_another_agents_turn_not_yet_in_postgresql_is_erased_with_the_customers_conversation(gw, services):
    """wabot2 answered the customer a moment before the erasure through wabot; the memory and runs
    writers had not written its turn yet, so PostgreSQL knew of no state of wabot2's: the erasure
    left wabot2 out, and the turn (the customer's words, the run naming the number) landed after
    it said done. Redis knows the turn at once: the erasure covers wabot2 too."""
    wa_id = str(uuid.uuid4().int % 10**12 + 10**11)
    conv = f"wa:{PNID}:{wa_id}"
    r = redis.Redis.from_url(services[1])
    r.set(f"{PAUSE}{conv}:writer", "1", ex=300)
    try:
        said = _agent_turn(gw, "wabot2", conv, "my card is 4111")
        assert said.status_code == 200, said.text
        assert _window(services, "wabot2", conv) != []
        erased = _erase(gw, conv)
        assert erased.status_code == 200, erased.text
    finally:
        r.set(f"{PAUSE}{conv}:written", "1", ex=300)  # the writers go on, after the erasure
        r.close()
    wait_until(lambda: not _on_its_way(services, conv), what="the memory writers past the turn")
    assert _window(services, "wabot2", conv) == []
    wait_until(lambda: not _runs_on_their_way(services, conv), what="the runs writers past the run")
    assert _kept(services, conv) == []


def test_a_first_api_turn_answered_while_its_conversation_is_erased_is_not_stored(gw, services):
    """A conversation no channel marks (an API client's id): its first turn loaded nothing, was
    answered, and stored itself after the erasure (no seq floor told it from a turn after it). The
    turn is paused before its store, the erasure runs whole, then the turn goes on: nothing of it
    is kept. A turn begun after the erasure is stored."""
    conv = f"api-{uuid.uuid4().hex[:8]}"
    r = redis.Redis.from_url(services[1])
    r.set(f"{PAUSE}{conv}:append", "1", ex=300)
    answered: list[httpx.Response] = []
    call = threading.Thread(target=lambda: answered.append(_agent_turn(gw, "wabot", conv, "my card is 4111")))
    call.start()
    try:
        wait_until(lambda: r.exists(f"{PAUSE}{conv}:appending"), what="the turn answered, before its store")
        erased = _erase(gw, conv)
        assert erased.status_code == 200, erased.text
    finally:
        r.set(f"{PAUSE}{conv}:stored", "1", ex=300)
        call.join(60)
        r.close()
    assert answered and answered[0].status_code == 200, answered and answered[0].text
    assert _window(services, "wabot", conv) == []
    wait_until(lambda: not _on_its_way(services, conv), what="the memory writers past the turn")
    assert rows(services[0], "SELECT 1 FROM conversations WHERE tenant = $1 AND external_id = $2", TENANT, conv) == []
    assert _agent_turn(gw, "wabot", conv, "hello again").status_code == 200
    assert len(_window(services, "wabot", conv)) == 2


async def _until_waiting(conn, where: str, task) -> None:
    """Until a session of the database waits on a lock in a statement matching ``where`` (SQL on
    ``query``), or ``task`` is done (a failure its test reads); bounded (~60 s)."""
    import asyncio

    for _ in range(1200):
        waiting = await conn.fetchval(
            f"SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND {where}"
        )
        if waiting or task.done():
            return
        await asyncio.sleep(0.05)


def _call_kept_without_words(services, call_id: str, conv: str) -> None:
    """The call's record after its conversation's erasure: the tag as its caller's number, no
    words, its duration kept (the reports here last 42 s)."""
    from tests.test_wa_dead_letters_erasure import _tag

    kept = rows(
        services[0],
        """SELECT customer_number, transcript, summary, recording_url, duration_s FROM vapi_calls
           WHERE tenant = $1 AND call_id = $2""",
        TENANT, call_id,
    )  # fmt: skip
    assert kept == [
        {"customer_number": _tag(TENANT, conv), "transcript": None, "summary": None, "recording_url": None,
         "duration_s": 42.0}
    ]  # fmt: skip


def _erased_while_clearing_words(gw, services, conv: str, during) -> httpx.Response:
    """The erasure of ``conv``, held inside its copies step (the messages' and escalations' words
    cleared, its lock taken before them) by a row lock on the customer's channel state (its
    profile name is cleared after them), while ``during(pool)`` writes: until it is done, or waits
    for a lock (a writer that takes the erasure's lock shared waits for the erasure's commit)."""
    import asyncio

    import asyncpg

    wa_id = conv.rsplit(":", 1)[1]

    async def go() -> httpx.Response:
        holder = await asyncpg.connect(services[0])
        pool = await asyncpg.create_pool(services[0], min_size=1, max_size=2)
        try:
            await holder.execute(
                """INSERT INTO whatsapp_conversations (tenant, account, phone_number_id, wa_id,
                                                       conversation_id, agent, profile_name)
                   VALUES ($1, 'ord', $2, $3, $4, 'wabot', 'Ann')""",
                TENANT, PNID, wa_id, conv,
            )  # fmt: skip
            tx = holder.transaction()
            await tx.start()
            await holder.execute(
                "SELECT 1 FROM whatsapp_conversations WHERE tenant = $1 AND conversation_id = $2 FOR UPDATE",
                TENANT, conv,
            )  # fmt: skip
            erasing = asyncio.ensure_future(asyncio.to_thread(_erase, gw, conv))
            # (the erasure reaches the customer's channel state)
            await _until_waiting(pool, "query LIKE '%UPDATE whatsapp_conversations SET profile_name%'", erasing)
            assert not erasing.done(), erasing.result().text
            writing = asyncio.ensure_future(during(pool))
            # (a send's record: its tenants' shared lock, ``store._LOCK_TENANTS``)
            await _until_waiting(
                pool, "wait_event = 'advisory' AND query LIKE '%FROM unnest($1::text[]) AS t%'", writing
            )
            await tx.rollback()
            await asyncio.wait_for(writing, 60)
            return await erasing
        finally:
            await holder.close()
            await pool.close()

    return asyncio.run(go())


def test_a_reply_recorded_while_the_erasure_clears_the_words_keeps_no_words(gw, services, monkeypatch):
    """The erasure cleared the words of the customer's records (``forget_copies``) before it took
    its lock and tagged them (``erased_records.retag``). A reply's record committed between the two
    (its deliverer then killed before its post-send check) was not yet seen as erased by its writer
    (the erasure had not committed) and was tagged with its words kept: the reply, under the tag,
    where no later erasure of the id finds it. The erasure takes its lock first now: the reply's
    writer (the lock shared) waits for its commit, then records the reply as the erased one's."""
    from channels.whatsapp import store
    from tests.test_wa_dead_letters_erasure import _tag
    from tests.test_wa_queued_erasure import _redis_now

    monkeypatch.delenv("GATEWAY_ERASURE_KEY", raising=False)
    monkeypatch.setenv("GATEWAY_MASTER_KEY", MASTER_KEY)  # (the writer hashes the id as the gateway does)
    wa_id = str(uuid.uuid4().int % 10**12 + 10**11)
    conv = f"wa:{PNID}:{wa_id}"
    wamid = f"wamid.race-{uuid.uuid4().hex[:8]}"
    asked = _redis_now(services)

    async def reply(pool) -> None:
        record = store.Conversation(TENANT, "ord", PNID, wa_id, conv, "wabot", None, None, asked_us=asked)
        await store.OutboundRecords(pool).record(record, wamid, "text", "Your card 4111 is blocked, Ann.", None, "sent")

    erased = _erased_while_clearing_words(gw, services, conv, reply)
    assert erased.status_code == 200, erased.text
    kept = rows(
        services[0], "SELECT conversation_id, wa_id, body FROM whatsapp_messages WHERE tenant = $1 AND wamid = $2",
        TENANT, wamid,
    )  # fmt: skip
    tag = _tag(TENANT, conv)
    assert kept == [{"conversation_id": tag, "wa_id": tag, "body": None}]


def test_an_escalation_opened_while_the_erasure_clears_the_words_keeps_no_words(gw, services):
    """A turn in flight when the erasure began opens its escalation (the customer's question, the
    AI's draft) between the erasure's clearing of the escalations' words and its lock: the erasure
    resolved it and tagged it with the words kept."""
    from tests.test_wa_dead_letters_erasure import _tag

    conv = f"wa:{PNID}:{uuid.uuid4().int % 10**12 + 10**11}"
    esc_id = f"esc_race_{uuid.uuid4().hex[:8]}"

    async def escalate(pool) -> None:
        await pool.execute(
            """INSERT INTO escalations (id, tenant, agent_id, agent, conversation_id, question, draft, context,
                                        sla_first_s, sla_resolve_s)
               SELECT $1, $2, id, name, $3, 'my card 4111 was stolen', 'I will block 4111.',
                      '{"variables": {"customer_number": "+4915100000"}}'::jsonb, 60, 600
               FROM agents WHERE tenant = $2 AND name = 'wabot'""",
            esc_id, TENANT, conv,
        )  # fmt: skip

    erased = _erased_while_clearing_words(gw, services, conv, escalate)
    assert erased.status_code == 200, erased.text
    kept = rows(
        services[0],
        "SELECT conversation_id, status, question, draft, context::text AS context FROM escalations WHERE id = $1",
        esc_id,
    )
    tag = _tag(TENANT, conv)
    assert kept == [{"conversation_id": tag, "status": "resolved", "question": None, "draft": None, "context": "{}"}]


def test_a_call_report_stored_while_the_erasure_waits_for_its_lock_keeps_no_words(gw, services, monkeypatch):
    """A VAPI call's end-of-call report (its transcript, summary, recording link) stored after the
    erasure cleared the call's words and before it took its lock was read as not erased (the
    erasure had not committed) and then tagged with its transcript kept. The erasure is held at
    its lock: the test holds the tenant's exclusive erasure lock. The report, which takes that
    lock shared, waits behind the erasure now, and reads it once it is committed (the report is the
    call's first record: any erasure of its conversation counts)."""
    import asyncio
    import contextlib

    import asyncpg

    from channels.vapi import calls, wire
    from core.erasure_key import ERASURE_LOCK_BUCKETS, ERASURE_LOCK_CLASS

    monkeypatch.delenv("GATEWAY_ERASURE_KEY", raising=False)
    monkeypatch.setenv("GATEWAY_MASTER_KEY", MASTER_KEY)  # (the report hashes the id as the gateway does)
    call_id = f"call-{uuid.uuid4().hex[:10]}"
    conv = f"vapi:{call_id}"
    report = calls.Report("customer-ended-call", 42.0, 0.1, "I am Ann, card 4111.", "https://r.example/a.wav",
                          "Ann called about card 4111.", None)  # fmt: skip

    async def go() -> httpx.Response:
        holder = await asyncpg.connect(services[0])
        pool = await asyncpg.create_pool(services[0], min_size=1, max_size=2)

        @contextlib.asynccontextmanager
        async def tx(tenant):
            async with pool.acquire() as conn, conn.transaction():
                yield conn

        try:
            lock = holder.transaction()
            await lock.start()
            await holder.execute(
                f"SELECT pg_advisory_xact_lock({ERASURE_LOCK_CLASS}, hashtext($1) & {ERASURE_LOCK_BUCKETS - 1})", TENANT
            )
            erasing = asyncio.ensure_future(asyncio.to_thread(_erase, gw, conv))
            # (the erasure waits for its lock, its copies step done)
            await _until_waiting(pool, "query LIKE 'SELECT pg_advisory_xact_lock(%'", erasing)
            assert not erasing.done(), erasing.result().text
            info = wire.CallInfo(call_id=call_id, call_type="inboundPhoneCall", customer_number="+4915123456789")
            reporting = asyncio.ensure_future(calls.CallStore(tx).report(TENANT, "vp", info, "wabot", report, True))
            # (the report waits for the lock too, behind the erasure)
            await _until_waiting(pool, "query LIKE 'SELECT pg_advisory_xact_lock_shared(%'", reporting)
            await lock.rollback()
            await asyncio.wait_for(reporting, 60)
            return await erasing
        finally:
            await holder.close()
            await pool.close()

    erased = asyncio.run(go())
    assert erased.status_code == 200, erased.text
    _call_kept_without_words(services, call_id, conv)
