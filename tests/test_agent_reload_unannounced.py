"""A change committed but never announced (its writer SIGKILLed, or Redis failing, between the
commit and ``announce``; an agent archived by hand in SQL) reached no replica until some other
change, anywhere, was announced: a replica reloaded everything only when Redis's version moved
or a minute after a caught-up change (CATCH_UP_RELOAD_S). On a quiet gateway that is never: an
archived agent went on answering, a tool an operator removed stayed callable. A full reload now
costs one short mark per agent (runtime/agent_registry.py, ``MARKS_SQL``), and every replica does one
at least every CATCH_UP_RELOAD_S (0 here, so its next poll does). The registry runs in this
process with its real poll, on the embedded PostgreSQL and Valkey."""

from __future__ import annotations

import asyncio

import asyncpg
import redis.asyncio as aioredis

import runtime.agent_registry as registry_module
import runtime.agents as store
from tests.test_tools_review_s22 import unique


async def until(check, tries: int = 400) -> bool:
    for _ in range(tries):
        if check():
            return True
        await asyncio.sleep(0.025)
    return False


def test_an_agent_archived_without_an_announcement_stops_answering_with_no_later_change(services, monkeypatch):
    """(Failed before: the registry served the archived agent, and the one whose tools were
    removed, for as long as nothing else changed; the bounded wait below ran out.)"""
    monkeypatch.setattr(registry_module, "CATCH_UP_RELOAD_S", 0.0)
    tenant = unique("ua")

    async def main() -> tuple[bool, bool]:
        from gateway.db import migrate

        pool = await asyncpg.create_pool(services[0], min_size=1, max_size=2)
        redis = aioredis.from_url(services[1])
        registry = registry_module.AgentRegistry(pool, redis)
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
            ids = {}
            for name, settings in (("gone", {}), ("tooled", {"tools": [tool("refund")]})):
                async with pool.acquire() as conn, conn.transaction():
                    ids[name] = await store.create_agent(
                        conn, tenant=tenant, name=name, model="m", description="", settings=settings,
                        template="You help.", variables={},
                    )  # fmt: skip
            reloads = []
            reload = registry.reload

            async def counted() -> None:
                await reload()
                reloads.append(1)

            registry.reload = counted  # (the subscription's catch-up reload runs after start returns)
            await registry.start()
            assert await until(lambda: len(reloads) >= 2)
            assert registry.get(tenant, "gone") is not None
            assert [t.name for t in registry.get(tenant, "tooled").tools] == ["refund"]
            synced = await redis.get(store.VERSION_KEY)
            assert await until(lambda: registry._version == synced)
            # the writers: committed, then killed before their announcement (no message, no version)
            async with pool.acquire() as conn, conn.transaction():
                await store.archive_agent(conn, await store.load_agent(conn, ids["gone"]))
                agent = await store.load_agent(conn, ids["tooled"])
                await store.update_agent(conn, agent, None, None, {**agent.settings, "tools": []})
            archived = await until(lambda: registry.get(tenant, "gone") is None)
            untooled = await until(lambda: registry.get(tenant, "tooled").tools == ())
            return archived, untooled
        finally:
            await registry.stop()
            await redis.aclose()
            await pool.close()

    assert asyncio.run(main()) == (True, True)


def test_a_replica_that_cannot_reach_redis_still_drops_an_agent_archived_elsewhere(services, monkeypatch):
    """A replica cut off from Redis (its link, or Redis down, with ``policies.fail_open`` serving
    requests) hears no message and reads no version; its poll failed at the version read each
    second and never reloaded, though PostgreSQL was there: an agent archived through another
    replica went on answering on this one for as long as the cut lasted. (Failed before: the
    bounded wait ran out.) It still reloads from PostgreSQL every CATCH_UP_RELOAD_S."""
    import socket

    monkeypatch.setattr(registry_module, "CATCH_UP_RELOAD_S", 0.0)
    tenant = unique("ua")
    with socket.socket() as s:  # a port nothing listens on: every Redis call is refused
        s.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{s.getsockname()[1]}/0"

    async def main() -> bool:
        from gateway.db import migrate

        pool = await asyncpg.create_pool(services[0], min_size=1, max_size=2)
        redis = aioredis.from_url(dead, socket_connect_timeout=1)
        registry = registry_module.AgentRegistry(pool, redis)
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
            async with pool.acquire() as conn, conn.transaction():
                agent_id = await store.create_agent(
                    conn, tenant=tenant, name="gone", model="m", description="", settings={},
                    template="You help.", variables={},
                )  # fmt: skip
            await registry.start()
            assert registry.get(tenant, "gone") is not None
            async with pool.acquire() as conn, conn.transaction():  # (through another replica)
                await store.archive_agent(conn, await store.load_agent(conn, agent_id))
            return await until(lambda: registry.get(tenant, "gone") is None)
        finally:
            await registry.stop()
            await redis.aclose()
            await pool.close()

    assert asyncio.run(main()) is True


def tool(name: str) -> dict:
    config = {"url": "https://tools.invalid/x", "allowed_hosts": ["tools.invalid"], "method": "POST"}
    parameters = {"type": "object", "properties": {"q": {"type": "string"}}}
    return {"name": name, "kind": "http", "description": "a tool", "parameters": parameters, "config": config}
