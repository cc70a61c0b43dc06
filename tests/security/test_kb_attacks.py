"""Attacks on the knowledge-base surface (Files, Vector Stores) that need no gateway process:
the caps a tenant is held to, raced by concurrent requests, on the real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from core.errors import InvalidRequest
from gateway import openai_files
from gateway.db import migrate, tenant_transaction


async def _insert(conn, owner: str):
    return await openai_files.insert_file(
        conn, owner, filename="a.txt", purpose="assistants", size=10, sha256="0" * 64, content_type="text/plain"
    )


def test_concurrent_uploads_cannot_overshoot_the_tenant_storage_cap(services, monkeypatch):
    """Two uploads racing for the last free slot: the second counts only after the first commits
    (it waits while the first is open), so it sees the cap reached. Without the per-tenant lock
    it would count the committed rows alone and both would be stored."""
    monkeypatch.setattr(openai_files, "MAX_FILES", 1)
    owner = f"cap-{uuid.uuid4().hex[:8]}"

    async def go() -> None:
        pool = await asyncpg.create_pool(services[0], min_size=2, max_size=2)
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
            async with tenant_transaction(pool, owner) as first:
                await _insert(first, owner)

                async def second() -> None:
                    async with tenant_transaction(pool, owner) as conn:
                        await _insert(conn, owner)

                racer = asyncio.ensure_future(second())
                done, _ = await asyncio.wait([racer], timeout=1.0)
                assert not done, "the second upload counted before the first one committed"
            with pytest.raises(InvalidRequest) as err:
                await racer
            assert err.value.code == "too_many_files"
            async with pool.acquire() as conn:
                assert await conn.fetchval("SELECT count(*) FROM openai_files WHERE tenant = $1", owner) == 1
        finally:
            await pool.close()

    asyncio.run(go())
