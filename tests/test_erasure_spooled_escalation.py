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
