"""A person's WhatsApp reply in flight is noted without the customer's number.

A reply is noted (``channels.whatsapp.inflight``) before it goes, with a lease, so that a channel
worker runs its post-send check if the process serving it dies. The note held the conversation's
id, ``wa:<business number id>:<customer's number>``, in plain text: while the reply was in
flight, and after a crash until a worker's sweep (past an erasure of the conversation too). Now
the note names the conversation by the digest its Redis keys are named by and its keyed hash (its
erasure's tag), and the sweep's check does the same work from those; a note an older release
wrote is rewritten by the erasure of its conversation at once.

Real embedded PostgreSQL and Valkey (a Redis database of the module's own: no other module's
channel worker sweeps its notes), and a gateway (no channel configured) for the erasure."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from channels.whatsapp import erasure, inflight, sender
from channels.whatsapp.store import conversation_digest
from core.erasure_key import conversation_hash, conversation_tag
from tests.conftest import LOCAL_HTTP, MASTER_KEY, Gateway, environ

REDIS_DB = 10
PNID = "8136"
LEASE_MS = 600_000


def _urls(services) -> tuple[str, str]:
    return services[0], f"{services[1]}?db={REDIS_DB}"


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    config = {
        "providers": [{"name": "pp", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k"]}],
        "models": [{"name": "agent-model", "deployments": [{"provider": "pp", "model": "m"}]}],
    }
    g = Gateway(tmp_root, config, _urls(services))
    yield g
    g.stop()


def _admin(gw: Gateway, method: str, path: str, key: str = MASTER_KEY, **kw) -> httpx.Response:
    return LOCAL_HTTP.request(method, f"{gw.url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=60, **kw)


def _number() -> str:
    return f"4917{uuid.uuid4().int % 10**8:08d}"


def _run(services, body):
    async def go():
        r = aioredis.from_url(_urls(services)[1])
        try:
            async with asyncpg.create_pool(services[0], min_size=1, max_size=2) as pool:
                return await body(r, pool)
        finally:
            await r.aclose()

    return asyncio.run(go())


def test_an_inflight_note_holds_neither_the_customers_number_nor_the_conversation_id(gw, services):
    tenant, number = f"s36-note-{uuid.uuid4().hex[:6]}", _number()
    conv = f"wa:{PNID}:{number}"

    async def body(r, pool):
        member = await inflight.note(r, tenant, conv, "alpha", "deliver:human_reply:abc", 1234, LEASE_MS)
        stored = [m for m in await r.zrange(inflight.KEY, 0, -1) if m == member]
        await r.zrem(inflight.KEY, member)
        return member, stored

    member, stored = _run(services, body)
    assert stored == [member]
    assert number.encode() not in member and conv.encode() not in member, member
    assert inflight.read(member) == inflight.Note(
        tenant,
        conversation_digest(tenant, conv),
        conversation_hash(tenant, conv),
        "alpha",
        "deliver:human_reply:abc",
        1234,
    )
    assert inflight.names(member, tenant, conv) and not inflight.names(member, tenant, f"wa:{PNID}:{_number()}")


def test_the_sweep_of_a_dead_replys_note_forgets_what_its_send_wrote_after_the_erasure(gw, services):
    """The lease semantics hold with a note of hashes: a note whose lease ran out (its process
    died after the send) is claimed by a sweep, whose check finds the conversation erased since
    the reply was asked for: the send's record holds the tag without words, its send state, the
    alias of the number and their indexes go, and the note goes."""
    tenant, number = f"s36-sweep-{uuid.uuid4().hex[:6]}", _number()
    conv, key, wamid = f"wa:{PNID}:{number}", f"deliver:human_reply:{uuid.uuid4().hex}", f"wamid.{uuid.uuid4().hex}"
    alias = sender.alias_key("alpha", PNID, number)
    left = [sender.state_key("alpha", key), alias, sender.index_key(tenant, conv), sender.alias_index_key(tenant, conv)]

    async def body(r, pool):
        queued = await erasure.redis_now_us(r)
        send = sender.Sender(r, pool, None, lease_s=30)
        await send.note("alpha", key, sender.index_key(tenant, conv), p0=wamid)
        await r.set(alias, "4917000000", ex=600)
        await r.sadd(sender.alias_index_key(tenant, conv), alias)
        async with pool.acquire() as conn:
            await conn.execute(
                """INSERT INTO whatsapp_messages
                          (tenant, account, wamid, direction, conversation_id, wa_id, body, status)
                   VALUES ($1, 'alpha', $2, 'out', $3, $4, 'a person answers', 'sent')""",
                tenant,
                wamid,
                conv,
                number,
            )
        member = await inflight.note(r, tenant, conv, "alpha", key, queued, LEASE_MS)
        assert await inflight.sweep(r, pool, send, LEASE_MS) == 0  # (its lease runs: its process may be alive)
        await erasure.mark_erased(r, tenant, [conv])  # (the erasure, while the reply was out)
        await r.zadd(inflight.KEY, {member: 0})  # (its lease ran out: its process died)
        checked = await inflight.sweep(r, pool, send, LEASE_MS)
        async with pool.acquire() as conn:
            record = await conn.fetchrow(
                "SELECT conversation_id, wa_id, body FROM whatsapp_messages WHERE tenant = $1 AND wamid = $2",
                tenant,
                wamid,
            )
        notes = [m for m in await r.zrange(inflight.KEY, 0, -1) if inflight.names(m, tenant, conv)]
        return checked, dict(record), [k for k in left if await r.exists(k)], notes

    checked, record, kept, notes = _run(services, body)
    assert checked >= 1
    tag = conversation_tag(tenant, conv)
    assert record == {"conversation_id": tag, "wa_id": tag, "body": None}, record
    assert kept == [] and notes == []


def test_an_erasure_rewrites_an_older_releases_note_of_its_conversation_without_the_number(gw, services):
    """A note an older release wrote names the conversation by its id (the number): the erasure
    of that conversation rewrites it at once, as this release writes notes, under the same lease;
    another conversation's note is left as it is."""
    tenant = f"s36-old-{uuid.uuid4().hex[:6]}"
    number, other_number = _number(), _number()
    conv, other = f"wa:{PNID}:{number}", f"wa:{PNID}:{other_number}"
    r = _admin(gw, "POST", "/admin/keys", json={"name": "a", "tenant": tenant, "scopes": ["admin"]})
    assert r.status_code == 201, r.text
    admin_key = r.json()["key"]
    agent = f"bot-{uuid.uuid4().hex[:6]}"
    r = _admin(gw, "POST", "/admin/agents", admin_key, json={"name": agent, "model": "agent-model", "template": "Hi."})
    assert r.status_code == 201, r.text

    keys = {conv: f"deliver:human_reply:{uuid.uuid4().hex}", other: f"deliver:human_reply:{uuid.uuid4().hex}"}

    def old(c: str) -> bytes:  # (as an older release wrote a note)
        return orjson.dumps({"t": tenant, "c": c, "a": "alpha", "k": keys[c], "q": 77, "n": "ab"})

    async def noted(r, pool):
        await r.zadd(inflight.KEY, {old(conv): 1_000_000, old(other): 2_000_000})

    _run(services, noted)
    erased = _admin(gw, "DELETE", f"/admin/agents/{agent}/conversations/{conv}", admin_key)
    assert erased.status_code == 200, erased.text

    async def notes(r, pool):
        found = await r.zrange(inflight.KEY, 0, -1, withscores=True)
        mine = [(m, s) for m, s in found if orjson.loads(m).get("t") == tenant]
        await r.zrem(inflight.KEY, *[m for m, _ in mine])
        return mine

    mine = dict(_run(services, notes))
    assert old(other) in mine and mine[old(other)] == 2_000_000  # (not the erased conversation's)
    rewritten = [m for m in mine if m != old(other)]
    assert len(rewritten) == 1 and number.encode() not in rewritten[0], mine
    assert mine[rewritten[0]] == 1_000_000  # (the same lease)
    with environ({"GATEWAY_MASTER_KEY": MASTER_KEY}):  # (the gateway's erasure key: its tags' and hashes')
        digest, hashed = conversation_digest(tenant, conv), conversation_hash(tenant, conv)
    assert inflight.read(rewritten[0]) == inflight.Note(tenant, digest, hashed, "alpha", keys[conv], 77)
