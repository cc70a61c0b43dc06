"""Prompt versions and a replica's memory: a tenant admin could save versions in a loop, and
every replica held every version of every agent of every tenant (about 19 MB per 100 versions
of 60 KB). The registry now holds what labels point at and reads an old pinned version on
demand (bounded, coalesced, LRU in bytes); a tenant's stored versions are bounded in number and
bytes. Real gateway over HTTP, real embedded PostgreSQL and Valkey, the OpenAI SDK as client."""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor

import asyncpg
import httpx
import openai
import pytest
import redis.asyncio as aioredis

from core.errors import RateLimited
from runtime import prompt_versions, prompts
from runtime.agent_registry import AgentRegistry
from runtime.prompt_versions import size_of
from tests.test_agents_admin import AgentGateway, call, config, create, db, new_key

BIG = 60 * 1024  # characters of one saved template (the review measured 60 KB versions)
QUOTA_VERSIONS = 40
QUOTA_BYTES = 2_000_000  # 32 versions of 60 KB


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    cfg = config(module_mock)
    cfg["policies"] = {"max_prompt_versions_per_tenant": QUOTA_VERSIONS, "max_prompt_bytes_per_tenant": QUOTA_BYTES}
    g = AgentGateway(tmp_root, cfg, services)
    yield g
    g.stop()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def big_template(n: int) -> str:
    return f"Version {n} for {{{{ who }}}}.\n" + (f"line {n} of a long prompt\n" * (BIG // 24))[:BIG]


def save(gw, name: str, template: str, key: str | None = None, **body):
    return call(
        gw, "POST", f"/admin/agents/{name}/versions", *([key] if key else []), json={"template": template, **body}
    )


async def _registry(services, cache_bytes: int | None = None):
    pool = await asyncpg.create_pool(
        services[0], min_size=1, max_size=4, server_settings={"application_name": "pinned-versions-test"}
    )
    redis = aioredis.from_url(services[1])
    reg = AgentRegistry(pool, redis, cache_bytes=cache_bytes)
    await reg.reload()  # what start() reads (its pub/sub listener is the label tests' concern)
    return reg, pool, redis


async def _close(reg, pool, redis) -> None:
    await redis.aclose()
    await pool.close()


def test_the_registry_holds_the_labelled_versions_not_every_saved_one(gw, services):
    """Thirty saved versions of 60 KB: the registry holds the two labels point at (production
    at 1, latest at 30) — before, all thirty (1.8 MB in every replica for one agent)."""
    tenant, name = unique("t"), unique("mem")
    assert create(gw, name=name, tenant=tenant, template=big_template(1)).status_code == 201
    n = 30
    for i in range(2, n + 1):
        assert save(gw, name, big_template(i)).status_code == 201

    async def go():
        reg, pool, redis = await _registry(services)
        try:
            agent = reg.get(tenant, name)
            held = {v.version: len(v.template) for v in agent.versions.values()}
            assert set(held) == {1, n}, sorted(held)  # production and latest
            assert sum(held.values()) < 2 * (BIG + 1024), f"{len(held)} versions, {sum(held.values())} bytes"
            assert prompts.select(agent, None, "c").version.version == 1
            assert prompts.select(agent, "latest", "c").version.version == n
        finally:
            await _close(reg, pool, redis)

    asyncio.run(go())


def test_a_pinned_old_version_is_read_once_on_demand_coalesced_and_lru_bounded_in_bytes(gw, services):
    tenant, name = unique("t"), unique("pin")
    assert create(gw, name=name, tenant=tenant, template=big_template(1)).status_code == 201
    for i in range(2, 6):
        assert save(gw, name, big_template(i)).status_code == 201

    async def go():
        reg, pool, redis = await _registry(services, cache_bytes=int(2.5 * BIG))  # room for two
        try:
            agent = reg.get(tenant, name)
            cache = reg.pinned_versions
            assert await reg.pinned(agent, None) is None and await reg.pinned(agent, "latest") is None
            assert await reg.pinned(agent, "1") is None  # held: production points at it
            assert await reg.pinned(agent, "6") is None and await reg.pinned(agent, "99999") is None
            assert cache.reads == 0  # past latest: refused without a read
            # twenty turns pin version 3 at once: one read
            found = await asyncio.gather(*(reg.pinned(agent, "3") for _ in range(20)))
            assert {v.version for v in found} == {3} and found[0].template.startswith("Version 3 ")
            assert cache.reads == 1
            selection = prompts.select(agent, "3", "c", found[0])
            assert selection.version.version == 3 and selection.label is None
            assert (await reg.pinned(agent, "3")) is found[0] and cache.reads == 1  # cached
            for number in ("2", "4", "3", "2"):
                await reg.pinned(agent, number)
            assert cache.bytes <= int(2.5 * BIG) and len(cache) == 2
            assert cache.reads == 5  # 2, 4 (3 falls out), 3 again (2 falls out), 2 again (4 falls out)
            assert (await reg.pinned(agent, "3")) is not None and cache.reads == 5  # still held
            versions, total = reg.held()  # the whole registry (other tests' agents too)
            mine = sum(size_of(v) for v in agent.versions.values())
            assert versions >= 4 and total >= mine + cache.bytes
        finally:
            await _close(reg, pool, redis)

    asyncio.run(go())


def test_a_pinned_old_version_answers_through_the_gateway_with_the_openai_sdk(gw, module_mock):
    tenant, name = unique("t"), unique("sdk")
    made = create(gw, name=name, tenant=tenant, template="First for {{ who }}.", defaults={"who": "everyone"})
    assert made.status_code == 201, made.text
    for i in (2, 3):
        assert save(gw, name, f"Number {i} for {{{{ who }}}}.").status_code == 201
    c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=new_key(gw, tenant), max_retries=0, timeout=30)
    for model, number, text in ((f"agent:{name}@2", "2", "Number 2 for everyone."), (f"agent:{name}", "1", "First")):
        resp = c.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": "hi"}])
        assert resp.headers["x-gateway-prompt-version"] == number
        assert module_mock.last()["body"]["messages"][0]["content"].startswith(text)
    metrics = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in httpx.get(f"{gw.url}/metrics").text.splitlines()
        if line.startswith("gateway_agent_prompt_bytes{")
    }
    assert metrics['gateway_agent_prompt_bytes{held="labelled"}'] > 0
    assert metrics['gateway_agent_prompt_bytes{held="pinned"}'] > 0  # version 2, read on demand
    with pytest.raises(openai.NotFoundError) as err:
        c.chat.completions.create(model=f"agent:{name}@4", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["param"] == "model"
    # history and the diff read versions no label holds
    assert call(gw, "GET", f"/admin/agents/{name}/versions/2").json()["template"] == "Number 2 for {{ who }}."
    diff = call(gw, "GET", f"/admin/agents/{name}/diff", params={"from": 2, "to": 3}).json()
    assert "-Number 2" in diff["template"] and "+Number 3" in diff["template"]
    assert call(gw, "GET", f"/admin/agents/{name}/versions/7").status_code == 404


def _count(services, tenant: str) -> int:
    return db(services[0], "SELECT count(*) AS n FROM prompt_versions WHERE tenant = $1", tenant)[0]["n"]


def test_a_tenants_prompt_versions_are_bounded_in_number_a_400_naming_template_storing_nothing(gw, services):
    tenant = unique("t")
    boss = new_key(gw, tenant, admin=True)
    name = unique("q")
    assert create(gw, boss, name=name, template="v1 {{ who }}").status_code == 201
    for i in range(2, QUOTA_VERSIONS + 1):
        assert save(gw, name, f"v{i} {{{{ who }}}}", boss).status_code == 201
    refused = save(gw, name, "one too many {{ who }}", boss, labels=["production"])
    assert refused.status_code == 400, refused.text
    err = refused.json()["error"]
    assert err["param"] == "template" and err["code"] == "too_many_prompt_versions"
    assert "policies.max_prompt_versions_per_tenant" in err["message"]
    assert _count(services, tenant) == QUOTA_VERSIONS
    assert call(gw, "GET", f"/admin/agents/{name}", boss).json()["labels"]["production"] == {"1": 1}  # unmoved
    other = create(gw, boss, name=unique("q"))  # a new agent's version 1 counts too
    assert other.status_code == 400 and other.json()["error"]["code"] == "too_many_prompt_versions"
    # another tenant is not affected; archiving an agent frees nothing (its versions are kept)
    assert create(gw, new_key(gw, unique("t"), admin=True), name=unique("q")).status_code == 201
    assert call(gw, "DELETE", f"/admin/agents/{name}", boss).status_code == 200
    assert create(gw, boss, name=unique("q")).json()["error"]["code"] == "too_many_prompt_versions"


def test_a_tenants_prompt_versions_are_bounded_in_bytes_and_racing_saves_cannot_pass(gw, services):
    tenant = unique("t")
    boss = new_key(gw, tenant, admin=True)
    names = [unique("b") for _ in range(4)]
    for name in names:
        assert create(gw, boss, name=name, template=big_template(1)).status_code == 201
    for i in range(2, 29):
        assert save(gw, names[0], big_template(i), boss).status_code == 201
    # 31 versions of 60 KB; one more fits (2 000 000 bytes: 32 of them): four agents race for it
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda name: save(gw, name, big_template(99), boss), names))
    assert sorted(r.status_code for r in answers) == [201, 400, 400, 400], [r.text[:200] for r in answers]
    err = next(r for r in answers if r.status_code == 400).json()["error"]
    assert err["param"] == "template" and err["code"] == "prompt_storage_exceeded"
    assert "policies.max_prompt_bytes_per_tenant" in err["message"]
    assert _count(services, tenant) == 32
    # a small version still fits
    assert save(gw, names[1], "short {{ who }}", boss).status_code == 201


def test_an_agent_has_a_bounded_number_of_labels(gw):
    from runtime.agents import MAX_LABELS

    name = unique("lab")
    assert create(gw, name=name, tenant=unique("t")).status_code == 201
    for i in range(MAX_LABELS - 3):  # latest and production exist
        assert call(gw, "PUT", f"/admin/agents/{name}/labels/l{i}", json={"version": 1}).status_code == 200
    with ThreadPoolExecutor(4) as pool:  # four new labels race for the last place
        raced = list(
            pool.map(lambda i: call(gw, "PUT", f"/admin/agents/{name}/labels/r{i}", json={"version": 1}), range(4))
        )
    assert sorted(r.status_code for r in raced) == [200, 400, 400, 400], [r.text[:200] for r in raced]
    refused = call(gw, "PUT", f"/admin/agents/{name}/labels/one-more", json={"version": 1})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "label"
    assert call(gw, "PUT", f"/admin/agents/{name}/labels/l0", json={"version": 1}).status_code == 200  # moving is fine


def test_a_pinned_version_that_cannot_be_read_is_a_503_for_every_waiter_and_is_read_again_later(gw, services):
    from core.errors import ServiceUnavailable

    tenant, name = unique("t"), unique("down")
    assert create(gw, name=name, tenant=tenant).status_code == 201
    assert save(gw, name, "two {{ who }}").status_code == 201
    assert save(gw, name, "three {{ who }}").status_code == 201

    async def go():
        reg, pool, redis = await _registry(services)
        agent = reg.get(tenant, name)
        await pool.close()  # PostgreSQL unreachable from this replica
        try:
            answers = await asyncio.gather(*(reg.pinned(agent, "2") for _ in range(5)), return_exceptions=True)
            assert all(isinstance(a, ServiceUnavailable) and a.param == "model" for a in answers), answers
            assert len(reg.pinned_versions) == 0
            reg.pinned_versions._pool = await asyncpg.create_pool(services[0], min_size=1, max_size=2)
            assert (await reg.pinned(agent, "2")).template == "two {{ who }}"  # nothing stale was kept
            await reg.pinned_versions._pool.close()
        finally:
            await _close(reg, pool, redis)

    asyncio.run(go())


def test_one_tenant_cannot_queue_pinned_version_reads_without_end(gw, services):
    """A read of a pinned version comes before the turn is admitted, and every replica had four
    read slots for all tenants with an unbounded queue before them: one tenant's key pinning
    many versions that fall out of the cache held every slot, and the other tenants' pinned
    turns waited out the read timeout behind it. Now a tenant has at most two reads in flight
    per replica (its others wait for those, not for another tenant's slots) and at most
    MAX_QUEUED_PER_TENANT in flight or waiting (a turn waiting on a read already begun adds
    none); past that it gets 429 at once, and another tenant's read still goes. PostgreSQL is
    held up for real: a transaction holds the table's lock, so the reads stay in flight."""
    queued = prompt_versions.MAX_QUEUED_PER_TENANT
    hog, other = unique("t"), unique("t")
    hog_agent, other_agent = unique("hog"), unique("calm")
    assert create(gw, name=hog_agent, tenant=hog, template="v1").status_code == 201
    assert create(gw, name=other_agent, tenant=other, template="v1").status_code == 201
    for i in range(2, queued + 4):  # production at 1, latest at queued + 3: 2 .. queued + 2 read on demand
        assert save(gw, hog_agent, f"v{i}").status_code == 201
    for i in (2, 3):
        assert save(gw, other_agent, f"v{i}").status_code == 201

    async def go():
        reg, pool, redis = await _registry(services)
        lock = await asyncpg.connect(services[0])
        try:
            a, b = reg.get(hog, hog_agent), reg.get(other, other_agent)
            tx = lock.transaction()
            await tx.start()
            await lock.execute("LOCK TABLE prompt_versions IN ACCESS EXCLUSIVE MODE")
            first = [asyncio.ensure_future(reg.pinned(a, str(n))) for n in range(2, queued + 2)]
            same = asyncio.ensure_future(reg.pinned(a, "2"))  # joins the read of 2
            await asyncio.sleep(0)
            with pytest.raises(RateLimited) as refused:
                await reg.pinned(a, str(queued + 2))
            assert refused.value.status == 429 and refused.value.param == "model"
            assert refused.value.headers["retry-after"] == "1"
            calm = asyncio.ensure_future(reg.pinned(b, "2"))  # another tenant: not refused, not behind
            waiting = (  # this registry's own sessions: a gateway reloading its agents may wait on the lock too
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND wait_event = 'relation' "
                "AND application_name = 'pinned-versions-test'"
            )

            async def in_flight() -> int:  # pg_stat_activity is a snapshot kept to the transaction's end
                await lock.execute("SELECT pg_stat_clear_snapshot()")
                return await lock.fetchval(waiting)

            for _ in range(500):  # the hog's two reads and the other tenant's reach PostgreSQL
                if await in_flight() == 3:
                    break
                await asyncio.sleep(0.01)
            assert await in_flight() == 3  # the hog's others wait for its own two
            assert not calm.done() and not any(f.done() for f in first)
            await tx.rollback()
            versions = await asyncio.gather(*first, same, calm)
            assert [v.template for v in versions] == [f"v{n}" for n in range(2, queued + 2)] + ["v2", "v2"]
            assert reg.pinned_versions.reads == queued + 1
            # the tenant's reads are done: room again
            assert (await reg.pinned(a, str(queued + 2))).template == f"v{queued + 2}"
        finally:
            await lock.close()
            await _close(reg, pool, redis)

    asyncio.run(go())
