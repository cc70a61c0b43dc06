"""An erasure drops the escalations of its conversation still spooled in Redis.

An escalation PostgreSQL could not take on its turn waits in Redis (``runtime.hitl.held.spool``)
for the sweeper to open it, holding the conversation's id (a WhatsApp customer's number) and the
customer's words. The erasure left it there, and the sweeper opened it after the erasure when its
turn had loaded no window (``seq`` None: its ``erased_after`` check passes): the erased words and
id back in the escalation queue. The real stack: a gateway (its sweeper idle: a long interval)
over the embedded PostgreSQL and Valkey, and a sweeper of the test's own. The gateway and the
test use a Redis database of their own (``DB``): another gateway of the session on the shared one
(its sweeper on a short interval) opened the spooled escalations the test reads back."""

from __future__ import annotations

import asyncio
import threading
import uuid

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from runtime.hitl import held, sla
from tests.conftest import MASTER_KEY, Gateway, environ
from tests.test_agents_e2e import config
from tests.test_channels_vapi import admin as _admin
from tests.test_channels_whatsapp import rows as _rows
from tests.test_policies import new_key

DB = 13  # (the gateway's and the first test's; the second test's is 12)


def _private(services) -> tuple[str, str]:
    return services[0], f"{services[1]}?db={DB}"


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    g = Gateway(tmp_root, config(module_mock, hitl={"sweep_interval_s": 3600}), _private(services))
    yield g
    g.stop()


def _esc(tenant: str, agent_id: str, conv: str, words: str) -> dict:
    return {
        "id": f"esc_{uuid.uuid4().hex[:12]}", "tenant": tenant, "agent_id": agent_id, "agent": "bot",
        "conversation_id": conv, "urgency": "normal", "base_priority": 0, "team": "support",
        "question": words, "draft": "a draft", "seq": None, "sla_first_s": 60, "sla_resolve_s": 600,
    }  # fmt: skip


def _spooled(url: str, db: int | None = None) -> list[dict]:
    async def go():
        r = aioredis.from_url(url if db is None else f"{url}?db={db}")
        try:
            return [orjson.loads(x) for x in await r.lrange(held.PENDING_KEY, 0, -1)]
        finally:
            await r.aclose()

    return asyncio.run(go())


def test_an_erasure_drops_its_conversations_spooled_escalation_and_the_sweeper_never_opens_it(gw, services):
    redis_url = _private(services)[1]
    tenant, other_tenant = f"spool-a-{uuid.uuid4().hex[:6]}", f"spool-b-{uuid.uuid4().hex[:6]}"
    admin_key = new_key(gw, tenant=tenant, scopes=["admin"])["key"]
    agent = f"bot-{uuid.uuid4().hex[:6]}"
    body = {"name": agent, "model": "agent-model", "template": "You help.", "variables": {}}
    body["escalation"] = {"enabled": True, "threshold": 0.5}
    r = _admin(gw, "POST", "/admin/agents", admin_key, json=body)
    assert r.status_code == 201, r.text
    agent_id = r.json()["id"]
    erased, kept = f"wa:8101:4917{uuid.uuid4().int % 10**8:08d}", f"c-{uuid.uuid4().hex[:6]}"
    spooled = [
        _esc(tenant, agent_id, erased, "my card is 4111"),
        _esc(tenant, agent_id, kept, "where is my parcel"),
        _esc(other_tenant, agent_id, erased, "another tenant's customer"),  # (same ids: not this tenant's)
    ]

    async def spool():
        r = aioredis.from_url(redis_url)
        try:
            for esc in spooled:
                await held.spool(r, esc)
        finally:
            await r.aclose()

    asyncio.run(spool())
    r = _admin(gw, "DELETE", f"/admin/agents/{agent}/conversations/{erased}", admin_key)
    assert r.status_code == 200, r.text
    left = [e["id"] for e in _spooled(redis_url) if e["id"] in {s["id"] for s in spooled}]
    assert left == [spooled[1]["id"], spooled[2]["id"]], left

    async def sweep():  # (what the gateway's sweeper does on its next pass)
        r = aioredis.from_url(redis_url)
        async with asyncpg.create_pool(services[0], min_size=1, max_size=2) as pool:
            try:

                async def emit(alert):
                    pass

                await sla.Sweeper(pool, r, held.Holds(r), emit).open_spooled()
            finally:
                await r.aclose()

    asyncio.run(sweep())
    opened = _rows(
        services[0],
        "SELECT tenant, conversation_id, question FROM escalations WHERE tenant = ANY($1::text[]) ORDER BY tenant",
        [tenant, other_tenant],
    )
    assert [(o["tenant"], o["conversation_id"]) for o in opened] == [(tenant, kept), (other_tenant, erased)], opened


def test_a_spooled_escalation_the_sweeper_popped_before_the_erasure_is_not_written_after_its_commit(
    gw, services, monkeypatch
):
    """The sweeper pops a spooled escalation (its ``erased_after`` check passes: no window), then
    the erasure runs whole — its ``drop_spooled`` finds nothing, the entry is out of the list —
    then the sweeper writes it: the erased customer's id and words were back in the queue. The
    interleaving is pinned: the sweeper waits, between its check and its write, for the erasure's
    answer. Now its write reads the erasure (under the erasure's lock, shared) and drops it."""
    redis_url = _private(services)[1]
    tenant = f"spool-r-{uuid.uuid4().hex[:6]}"
    admin_key = new_key(gw, tenant=tenant, scopes=["admin"])["key"]
    agent = f"bot-{uuid.uuid4().hex[:6]}"
    body = {"name": agent, "model": "agent-model", "template": "You help.", "variables": {}}
    r = _admin(gw, "POST", "/admin/agents", admin_key, json=body)
    assert r.status_code == 201, r.text
    agent_id = r.json()["id"]
    conv = f"wa:8101:4918{uuid.uuid4().int % 10**8:08d}"
    esc = _esc(tenant, agent_id, conv, "my card is 4111 1111")
    popped, erased = threading.Event(), threading.Event()
    checked = sla.erased_after

    async def erased_after_then_wait(*args):  # (the sweeper between its check and its write)
        answer = await checked(*args)
        popped.set()
        await asyncio.to_thread(erased.wait, 60)
        return answer

    monkeypatch.setattr(sla, "erased_after", erased_after_then_wait)
    outcome: list = []

    async def sweep():
        r = aioredis.from_url(redis_url)
        async with asyncpg.create_pool(services[0], min_size=1, max_size=2) as pool:
            try:
                await r.delete(held.PENDING_KEY)
                await held.spool(r, esc)

                async def emit(alert):
                    pass

                outcome.append(await sla.Sweeper(pool, r, held.Holds(r), emit).open_spooled())
            finally:
                await r.aclose()

    with environ({"GATEWAY_MASTER_KEY": MASTER_KEY}):  # (the gateway's erasure key: its hashes)
        sweeper = threading.Thread(target=lambda: asyncio.run(sweep()))
        sweeper.start()
        try:
            assert popped.wait(60), "the sweeper never popped the spooled escalation"
            r = _admin(gw, "DELETE", f"/admin/agents/{agent}/conversations/{conv}", admin_key)
            assert r.status_code == 200, r.text
        finally:
            erased.set()
            sweeper.join(60)
    assert outcome == [0], outcome
    opened = _rows(services[0], "SELECT conversation_id, question FROM escalations WHERE tenant = $1", tenant)
    assert opened == [], opened
    assert _spooled(redis_url) == []


def test_dropping_a_conversations_spooled_escalations_reads_the_whole_spool_a_page_at_a_time(services):
    """More entries than a page, the conversation's among them anywhere: all of them go, none of
    the others. (A private Redis database: no gateway's sweeper takes them.)"""

    async def go():
        r = aioredis.from_url(f"{services[1]}?db=12")
        try:
            await r.delete(held.PENDING_KEY)
            tenant, agents = "t-page", ["agt_1", "agt_2"]
            for i in range(held.DROP_PAGE * 2 + 50):
                conv = "erased" if i % 3 == 0 else f"other-{i}"
                await held.spool(r, _esc(tenant, agents[i % 2], conv, f"words {i}"))
            await held.spool(r, _esc(tenant, "agt_3", "erased", "another agent's"))
            dropped = await held.drop_spooled(r, tenant, agents, "erased")
            left = [orjson.loads(x) for x in await r.lrange(held.PENDING_KEY, 0, -1)]
            return dropped, left
        finally:
            await r.delete(held.PENDING_KEY)
            await r.aclose()

    dropped, left = asyncio.run(go())
    total = held.DROP_PAGE * 2 + 50
    assert dropped == len(range(0, total, 3))
    assert [e["conversation_id"] for e in left if e["agent_id"] != "agt_3"] == [
        f"other-{i}" for i in range(total) if i % 3
    ]
    assert [e["question"] for e in left if e["agent_id"] == "agt_3"] == ["another agent's"]


class _ErasingTool:
    """A tool endpoint (a third party's HTTP server) that erases the conversation of the turn
    calling it before it answers: the erasure comes after the turn loaded its (empty) window and
    before the turn's escalation is written — pinned, not timed."""

    def __init__(self, gw, agent: str, admin_key: str) -> None:
        import http.server

        self.conv: str | None = None
        self.erased: list[int] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                r = _admin(gw, "DELETE", f"/admin/agents/{agent}/conversations/{outer.conv}", admin_key)
                outer.erased.append(r.status_code)
                body = b'{"status": "looked up"}'
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/lookup"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _erasing_agent(gw, tenant: str, admin_key: str) -> tuple[str, str, _ErasingTool]:
    agent = f"bot-{uuid.uuid4().hex[:6]}"
    tool = _ErasingTool(gw, agent, admin_key)
    body = {"name": agent, "model": "agent-model", "template": "You help.", "variables": {}, "tenant": tenant}
    body["escalation"] = {"enabled": True, "threshold": 0.5}
    body["tools"] = [
        {
            "name": "lookup",
            "description": "looks the order up",
            "kind": "http",
            "parameters": {"type": "object", "properties": {}},
            "config": {"allowed_hosts": ["127.0.0.1"], "allow_private_networks": True, "url": tool.url},
        }
    ]
    r = _admin(gw, "POST", "/admin/agents", MASTER_KEY, json=body)  # (a private network: the operator's)
    assert r.status_code == 201, r.text
    return agent, r.json()["id"], tool


def _first_turn_erased_midway(gw, tenant: str, agent: str, tool: _ErasingTool, conv: str):
    import openai

    tool.conv = conv
    key = new_key(gw, tenant=tenant)["key"]
    c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=60)
    directive = orjson.dumps({"tool_calls": [{"name": "lookup", "arguments": {}}]}).decode()
    return c.chat.completions.with_raw_response.create(
        model=f"agent:{agent}",
        messages=[{"role": "user", "content": f"[[mock:{directive}]] my card is 4111 1111, talk to a person"}],
        metadata={"conversation_id": conv},
    )


def test_a_first_turns_escalation_is_not_opened_after_its_conversation_was_erased_during_the_turn(gw, services):
    """A conversation's first turn (its window empty: no ``seq`` for ``erased_after`` to compare)
    loads, its tool runs, the conversation is erased, and the turn then escalates: the escalation
    was written after the erasure's commit, with the customer's words and id, where no erasure
    finds it (the turn's memory store was refused, its escalation not). Now the escalation's write
    reads, under the erasure's lock, whether the conversation was erased since the turn loaded it
    (the window's ``since``, Redis's clock, as the erasure's): it was, no escalation."""
    tenant = f"spool-f-{uuid.uuid4().hex[:6]}"
    admin_key = new_key(gw, tenant=tenant, scopes=["admin"])["key"]
    agent, _agent_id, tool = _erasing_agent(gw, tenant, admin_key)
    conv = f"c-{uuid.uuid4().hex[:8]}"
    try:
        raw = _first_turn_erased_midway(gw, tenant, agent, tool, conv)
    finally:
        tool.close()
    assert tool.erased == [200], tool.erased
    assert raw.headers.get("x-gateway-escalation") is None
    opened = _rows(services[0], "SELECT conversation_id, question FROM escalations WHERE tenant = $1", tenant)
    assert opened == [], opened


def _refusing_escalations(database_url: str, tenant: str):
    """A trigger refusing the tenant's escalation writes (PostgreSQL failing them: spooled)."""
    name = f"refuse_{uuid.uuid4().hex[:8]}"
    _rows(
        database_url,
        f"""CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN IF NEW.tenant = '{tenant}' THEN RAISE EXCEPTION 'refused by the test'; END IF; RETURN NEW; END $$""",
    )
    _rows(database_url, f"CREATE TRIGGER {name} BEFORE INSERT ON escalations FOR EACH ROW EXECUTE FUNCTION {name}()")

    def drop():
        _rows(database_url, f"DROP TRIGGER {name} ON escalations")
        _rows(database_url, f"DROP FUNCTION {name}()")

    return drop


def _sweep(services, redis_url: str) -> int:
    async def go():
        r = aioredis.from_url(redis_url)
        async with asyncpg.create_pool(services[0], min_size=1, max_size=2) as pool:
            try:

                async def emit(alert):
                    pass

                return await sla.Sweeper(pool, r, held.Holds(r), emit).open_spooled()
            finally:
                await r.aclose()

    with environ({"GATEWAY_MASTER_KEY": MASTER_KEY}):  # (the gateway's erasure key: its hashes)
        return asyncio.run(go())


def test_a_first_turns_escalation_refused_by_postgresql_while_its_conversation_is_erased_is_never_opened(gw, services):
    """As above, PostgreSQL refusing the escalation's write (a trigger): it was spooled after the
    erasure ran whole (its ``drop_spooled`` found nothing) and the sweeper opened it."""
    redis_url = _private(services)[1]
    tenant = f"spool-g-{uuid.uuid4().hex[:6]}"
    admin_key = new_key(gw, tenant=tenant, scopes=["admin"])["key"]
    agent, _agent_id, tool = _erasing_agent(gw, tenant, admin_key)
    conv = f"c-{uuid.uuid4().hex[:8]}"
    drop = _refusing_escalations(services[0], tenant)
    try:
        _first_turn_erased_midway(gw, tenant, agent, tool, conv)
    finally:
        tool.close()
        drop()
    assert tool.erased == [200], tool.erased
    _sweep(services, redis_url)
    opened = _rows(services[0], "SELECT conversation_id, question FROM escalations WHERE tenant = $1", tenant)
    assert opened == [], opened
    assert [e for e in _spooled(redis_url) if e.get("tenant") == tenant] == []


def test_the_sweeper_counts_an_erasure_after_the_turn_loaded_its_conversation_not_only_after_the_spool(gw, services):
    """The sweeper compared the erasures with ``spooled_at``: an escalation spooled after an
    erasure that came while its turn ran (its write failed, or took long) was opened. Its turn's
    load time (``since``, kept in the spooled entry) is compared now."""
    redis_url = _private(services)[1]
    tenant = f"spool-h-{uuid.uuid4().hex[:6]}"
    admin_key = new_key(gw, tenant=tenant, scopes=["admin"])["key"]
    agent = f"bot-{uuid.uuid4().hex[:6]}"
    body = {"name": agent, "model": "agent-model", "template": "You help.", "variables": {}}
    r = _admin(gw, "POST", "/admin/agents", admin_key, json=body)
    assert r.status_code == 201, r.text
    agent_id = r.json()["id"]
    erased, kept = f"c-{uuid.uuid4().hex[:8]}", f"c-{uuid.uuid4().hex[:8]}"

    async def now() -> float:
        r = aioredis.from_url(redis_url)
        try:
            seconds, micros = await r.time()
            return int(seconds) + int(micros) / 1_000_000
        finally:
            await r.aclose()

    loaded = asyncio.run(now())  # (the turns load their conversations)
    r = _admin(gw, "DELETE", f"/admin/agents/{agent}/conversations/{erased}", admin_key)
    assert r.status_code == 200, r.text
    entries = [
        {**_esc(tenant, agent_id, erased, "my card is 4111"), "seq": 0, "since": loaded},
        {**_esc(tenant, agent_id, kept, "where is my parcel"), "seq": 0, "since": loaded},
    ]

    async def spool():  # (their turns spool them now, after the erasure)
        r = aioredis.from_url(redis_url)
        try:
            await r.delete(held.PENDING_KEY)
            for esc in entries:
                await held.spool(r, esc)
        finally:
            await r.aclose()

    asyncio.run(spool())
    assert _sweep(services, redis_url) == 1
    opened = _rows(services[0], "SELECT conversation_id FROM escalations WHERE tenant = $1", tenant)
    assert opened == [{"conversation_id": kept}], opened


def test_a_turn_spools_its_escalation_with_the_time_it_loaded_its_conversation(gw, services):
    """What the sweeper compares: the spooled entry of a first turn holds ``since`` (Redis's
    clock, seconds), no later than ``spooled_at``; with no erasure the sweeper opens it."""
    redis_url = _private(services)[1]
    tenant = f"spool-i-{uuid.uuid4().hex[:6]}"
    admin_key = new_key(gw, tenant=tenant, scopes=["admin"])["key"]
    agent = f"bot-{uuid.uuid4().hex[:6]}"
    body = {"name": agent, "model": "agent-model", "template": "You help.", "variables": {}}
    body["escalation"] = {"enabled": True, "threshold": 0.5}
    r = _admin(gw, "POST", "/admin/agents", admin_key, json=body)
    assert r.status_code == 201, r.text
    conv = f"c-{uuid.uuid4().hex[:8]}"
    drop = _refusing_escalations(services[0], tenant)
    try:
        import openai

        key = new_key(gw, tenant=tenant)["key"]
        c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=60)
        raw = c.chat.completions.with_raw_response.create(
            model=f"agent:{agent}",
            messages=[{"role": "user", "content": "talk to a person"}],
            metadata={"conversation_id": conv},
        )
    finally:
        drop()
    (mine,) = [e for e in _spooled(redis_url) if e.get("tenant") == tenant]
    assert raw.headers.get("x-gateway-escalation") == mine["id"]
    assert isinstance(mine.get("since"), float) and mine["since"] <= mine["spooled_at"], mine
    assert _sweep(services, redis_url) >= 1
    opened = _rows(services[0], "SELECT conversation_id FROM escalations WHERE tenant = $1", tenant)
    assert opened == [{"conversation_id": conv}], opened
