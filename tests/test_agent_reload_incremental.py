"""A full reload of the agent registry (at start, on a version gap, on ``ALL``, and a minute after
any caught-up change) read and built every agent of every tenant on the event loop: one tenant's
admin making two changes at once stalled every replica for time proportional to all tenants'
agents. It now builds only the agents whose mark moved (runtime/agent_registry.py, ``MARKS_SQL``), and
still ends where a registry built from scratch does, whatever changed and however, with no
pub/sub message. The registry runs in this process (never started: only the reloads the tests
call reach it); changes go through the store functions the admin API calls, or SQL by hand.
Real embedded PostgreSQL and Valkey."""

from __future__ import annotations

import asyncio

import pytest

from runtime import agent_registry as registry_module
from runtime import agents as store
from tests.test_agent_review_s31 import schema_tool
from tests.test_tools_review_s22 import unique


def tool(name: str) -> dict:
    return schema_tool(name, {"type": "object", "properties": {"q": {"type": "string"}}})


def run(services, body):
    """``await body(pool, redis)`` on a pool and a Redis client of the test's own."""
    import asyncpg
    import redis.asyncio as aioredis

    from gateway.db import migrate

    async def main():
        pool = await asyncpg.create_pool(services[0], min_size=1, max_size=2)
        redis = aioredis.from_url(services[1])
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
            return await body(pool, redis)
        finally:
            await redis.aclose()
            await pool.close()

    return asyncio.run(main())


async def create(pool, tenant: str, name: str, tools: list[dict] | None = None) -> str:
    async with pool.acquire() as conn, conn.transaction():
        return await store.create_agent(
            conn,
            tenant=tenant,
            name=name,
            model="m",
            description="",
            settings={"tools": tools} if tools else {},
            template=f"You are {name}.",
            variables={},
        )


async def loaded(conn, agent_id: str) -> store.Agent:
    agent = await store.load_agent(conn, agent_id)
    assert agent is not None
    return agent


@pytest.fixture
def built(monkeypatch) -> list[str]:
    """The ids of the agents built (``agent_from_rows``) and whose held bytes were counted
    (``held_bytes``), in order, tagged."""
    seen: list[str] = []
    build, held = registry_module.agent_from_rows, registry_module.held_bytes

    def counted_build(row, *args, **kwargs):
        seen.append("build " + row["id"])
        return build(row, *args, **kwargs)

    def counted_held(agent):
        seen.append("bytes " + agent.id)
        return held(agent)

    monkeypatch.setattr(registry_module, "agent_from_rows", counted_build)
    monkeypatch.setattr(registry_module, "held_bytes", counted_held)
    return seen


def test_a_full_reload_builds_again_only_the_agent_that_changed(services, built):
    """(Failed before: every reload built all 20 agents again, and every other module's, and
    summed the bytes of every version they hold.) Nothing changed: nothing is built, every
    agent is the same object; one agent changed: it alone is built, and its bytes alone counted."""
    tenants = unique("rl"), unique("rl")

    async def body(pool, redis) -> None:
        ids = [await create(pool, t, f"a{i}", [tool(f"t{j}") for j in range(4)]) for t in tenants for i in range(10)]
        registry = registry_module.AgentRegistry(pool, redis)
        await registry.reload()
        before = {i: registry.by_id(i) for i in ids}
        assert None not in before.values()

        built.clear()
        await registry.reload()
        assert built == []
        assert all(registry.by_id(i) is before[i] for i in ids)

        changed = ids[13]
        async with pool.acquire() as conn, conn.transaction():
            agent = await loaded(conn, changed)
            await store.update_agent(conn, agent, None, "changed", agent.settings)
        built.clear()
        await registry.reload()
        assert sorted(set(built)) == [f"build {changed}", f"bytes {changed}"]
        assert registry.by_id(changed).description == "changed"
        assert registry.by_id(changed).tools is before[changed].tools  # its tools did not change: kept
        assert all(registry.by_id(i) is before[i] for i in ids if i != changed)

    run(services, body)


def test_a_full_reload_after_one_agents_message_builds_nothing(services, built):
    """(Failed before: the reload a minute after a caught-up change, CATCH_UP_RELOAD_S, built
    every agent again.) The agent a message reloaded (``reload_agent``) is held with its mark, so
    the full reload that follows finds nothing to build."""
    tenant = unique("rl")

    async def body(pool, redis) -> None:
        ids = [await create(pool, tenant, f"a{i}") for i in range(5)]
        registry = registry_module.AgentRegistry(pool, redis)
        await registry.reload()
        async with pool.acquire() as conn, conn.transaction():
            agent = await loaded(conn, ids[2])
            await store.save_version(conn, agent, "Second.", {}, labels=["production"])
        await registry.reload_agent(ids[2])
        assert registry.by_id(ids[2]).labels["production"] == {2: 1}
        built.clear()
        await registry.reload()
        assert built == []

    run(services, body)


def test_a_full_reload_alone_sees_every_kind_of_change(services):
    """(Held before too.) With no message to any registry: a settings change, a new version with
    a label moved to it, a label removed, a label split into variants, an agent archived and its
    name taken by a new one, a new agent, an agent of another tenant changed, and a label
    written by hand before the version it names (the version saved later, by hand)."""
    tenant, other = unique("rl"), unique("rl")

    async def body(pool, redis) -> None:
        patched = await create(pool, tenant, "patched", [tool("old")])
        saved = await create(pool, tenant, "saved")
        unlabelled = await create(pool, tenant, "unlabelled")
        split = await create(pool, tenant, "split")
        archived = await create(pool, tenant, "archived")
        early = await create(pool, tenant, "early")
        elsewhere = await create(pool, other, "elsewhere")
        async with pool.acquire() as conn, conn.transaction():
            await store.set_label(conn, await loaded(conn, unlabelled), "staging", {1: 1})
            await store.save_version(conn, await loaded(conn, split), "Arm two.", {})
            await conn.execute(
                """INSERT INTO prompt_labels (agent_id, tenant, label, target) VALUES ($1, $2, 'next', '{"2": 1}')""",
                early,
                tenant,
            )
        registry = registry_module.AgentRegistry(pool, redis)
        await registry.reload()
        assert set(registry.get(tenant, "unlabelled").labels) == {"latest", "production", "staging"}
        assert set(registry.get(tenant, "early").versions) == {1}

        async with pool.acquire() as conn, conn.transaction():
            agent = await loaded(conn, patched)
            await store.update_agent(conn, agent, "m2", None, {"tools": [tool("new")], "max_steps": 3})
            await store.save_version(conn, await loaded(conn, saved), "Second.", {}, labels=["production"])
            await conn.execute("DELETE FROM prompt_labels WHERE agent_id = $1 AND label = 'staging'", unlabelled)
            await store.set_label(conn, await loaded(conn, split), "production", {1: 50, 2: 50})
            await store.archive_agent(conn, await loaded(conn, archived))
            agent = await loaded(conn, elsewhere)
            await store.update_agent(conn, agent, None, "moved", agent.settings)
            await conn.execute(
                """INSERT INTO prompt_versions (agent_id, tenant, version, template)
                   VALUES ($1, $2, 2, 'Early two.')""",
                early,
                tenant,
            )
        reborn = await create(pool, tenant, "archived")
        fresh = await create(pool, tenant, "fresh")
        await registry.reload()

        got = registry.get(tenant, "patched")
        assert (got.model, got.max_steps, [t.name for t in got.tools]) == ("m2", 3, ["new"])
        got = registry.get(tenant, "saved")
        assert got.labels["production"] == {2: 1} and got.versions[2].template == "Second."
        assert set(registry.get(tenant, "unlabelled").labels) == {"latest", "production"}
        got = registry.get(tenant, "split")
        assert got.labels["production"] == {1: 50, 2: 50} and set(got.versions) == {1, 2}
        assert registry.by_id(archived) is None and registry.get(tenant, "archived").id == reborn
        assert registry.get(tenant, "fresh").id == fresh
        assert registry.get(other, "elsewhere").description == "moved"
        assert registry.get(tenant, "early").versions[2].template == "Early two."

    run(services, body)


def test_reloads_after_changes_end_where_a_registry_built_from_scratch_does(services):
    """(Held before too.) Rounds of changes, each followed by a full reload (and some agents by
    their message's ``reload_agent`` first): the registry's agents, names and held versions and
    bytes equal those of a new registry's first reload, every round."""
    tenants = unique("rl"), unique("rl")

    async def same(registry, pool, redis) -> None:
        scratch = registry_module.AgentRegistry(pool, redis)
        await scratch.reload()
        assert registry._by_id == scratch._by_id
        assert registry._agents == scratch._agents
        assert registry.held() == scratch.held()

    async def body(pool, redis) -> None:
        ids = [await create(pool, t, f"a{i}", [tool("t")] if i % 2 else None) for t in tenants for i in range(6)]
        registry = registry_module.AgentRegistry(pool, redis)
        await registry.reload()
        await same(registry, pool, redis)
        for round_ in range(4):
            async with pool.acquire() as conn, conn.transaction():
                agent = await loaded(conn, ids[round_])
                await store.save_version(conn, agent, f"Round {round_}.", {}, labels=["production"])
                agent = await loaded(conn, ids[6 + round_])
                settings = {**agent.settings, "tools": [tool(f"r{round_}")]}
                await store.update_agent(conn, agent, None, f"round {round_}", settings)
                if round_:  # the agent the round before created
                    await store.archive_agent(conn, await loaded(conn, ids[-1]))
            ids.append(await create(pool, tenants[round_ % 2], f"new{round_}", [tool("n")]))
            if round_ % 2:
                await registry.reload_agent(ids[round_])
            await registry.reload()
            await same(registry, pool, redis)

    run(services, body)
