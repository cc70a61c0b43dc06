"""The sweep that empties expired vector stores (gateway/vector_store_expiry.py), on the real
PostgreSQL: what it deletes and what it keeps, and two replicas sweeping at once."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import asyncpg

from gateway.db import migrate
from gateway.vector_store_expiry import sweep
from rag import ingest
from rag import store as kb_store
from rag.chunking import Chunk

DIMS = 3


async def _store(conn, tenant: str, data_dir: Path, *, expires: int | None, idle_days: int) -> tuple[str, str]:
    """A knowledge base with one document of two chunks (and its bytes on disk): (kb id, doc id)."""
    kb = await kb_store.create_kb(conn, tenant, f"kb-{uuid.uuid4().hex[:8]}", embedding_model="m", dims=DIMS)
    await conn.execute(
        "UPDATE knowledge_bases SET expires_after_days = $2, last_active_at = now() - make_interval(days => $3) "
        "WHERE id = $1",
        kb.id,
        expires,
        idle_days,
    )
    doc, _ = await kb_store.add_document(
        conn, tenant, kb.id, filename="a.txt", content_type="text/plain", size=5, sha256=uuid.uuid4().hex
    )
    chunks = [Chunk(i, f"text {i}", "", 2) for i in range(2)]
    await kb_store.replace_chunks(conn, tenant, kb.id, doc.id, chunks, [[1.0, 0.0, 0.0]] * 2, "m")
    path = ingest.document_path(data_dir, tenant, doc.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"hello")
    return kb.id, doc.id


async def _counts(conn, kb_id: str) -> tuple[int, int, int]:
    return (
        await conn.fetchval("SELECT count(*) FROM knowledge_bases WHERE id = $1", kb_id),
        await conn.fetchval("SELECT count(*) FROM kb_documents WHERE kb_id = $1", kb_id),
        await conn.fetchval("SELECT count(*) FROM kb_chunks WHERE kb_id = $1", kb_id),
    )


def test_expired_stores_are_emptied_once_across_replicas_and_live_ones_kept(services, tmp_path):
    async def go() -> None:
        pool = await asyncpg.create_pool(services[0], min_size=1, max_size=4)
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
                a, b = f"exp-{uuid.uuid4().hex[:6]}", f"exp-{uuid.uuid4().hex[:6]}"
                expired_a = await _store(conn, a, tmp_path, expires=1, idle_days=2)
                expired_b = await _store(conn, b, tmp_path, expires=3, idle_days=4)
                active = await _store(conn, a, tmp_path, expires=7, idle_days=2)  # expires in 5 days
                forever = await _store(conn, b, tmp_path, expires=None, idle_days=400)
            # two replicas sweep at once: each store is emptied by one of them
            emptied = await asyncio.gather(sweep(pool, tmp_path), sweep(pool, tmp_path))
            async with pool.acquire() as conn:
                for kb_id, doc_id in (expired_a, expired_b):
                    assert await _counts(conn, kb_id) == (1, 0, 0)  # the store stays, as 'expired'
                    owner = a if (kb_id, doc_id) == expired_a else b
                    assert not ingest.document_path(tmp_path, owner, doc_id).exists()
                    assert not await conn.fetchval("SELECT count(*) FROM kb_chunk_terms WHERE kb_id = $1", kb_id)
                for (kb_id, doc_id), owner in ((active, a), (forever, b)):
                    assert await _counts(conn, kb_id) == (1, 1, 2)
                    assert ingest.document_path(tmp_path, owner, doc_id).exists()
            # each expired store emptied by exactly one of the two sweeps; the live ones by none
            # (the lists may hold other tests' expired stores: the database is shared)
            ours = [kb for kb in emptied[0] + emptied[1] if kb in {expired_a[0], expired_b[0], active[0], forever[0]}]
            assert sorted(ours) == sorted([expired_a[0], expired_b[0]])
            again = await sweep(pool, tmp_path)  # idempotent: an emptied store is no candidate
            assert expired_a[0] not in again and expired_b[0] not in again
        finally:
            await pool.close()

    asyncio.run(go())


def test_attack_sweep_does_not_empty_a_store_an_agent_grounds_on(services, tmp_path):
    """An agent's turns search its knowledge bases without touching last_active_at (no database
    write on the hot path): a vector store used on every turn would look idle, expire, and lose
    its documents under the live agent. An archived agent's stores are no longer in use."""

    async def go() -> None:
        pool = await asyncpg.create_pool(services[0], min_size=1, max_size=2)
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
                tenant = f"exp-{uuid.uuid4().hex[:6]}"
                used = await _store(conn, tenant, tmp_path, expires=1, idle_days=2)
                was_used = await _store(conn, tenant, tmp_path, expires=1, idle_days=2)
                for kb_id, archived in ((used[0], None), (was_used[0], "now()")):
                    await conn.execute(
                        f"""INSERT INTO agents (id, tenant, name, model, settings, archived_at)
                            VALUES ($1, $2, $3, 'gpt-mock', $4::jsonb, {archived or "NULL"})""",
                        f"agt_{uuid.uuid4().hex}",
                        tenant,
                        f"a-{uuid.uuid4().hex[:6]}",
                        f'{{"knowledge_bases": ["{kb_id}"]}}',
                    )
            while await sweep(pool, tmp_path):  # (other tests' expired stores may come first)
                pass
            async with pool.acquire() as conn:
                assert await _counts(conn, used[0]) == (1, 1, 2)
                assert ingest.document_path(tmp_path, tenant, used[1]).exists()
                assert await _counts(conn, was_used[0]) == (1, 0, 0)
        finally:
            await pool.close()

    asyncio.run(go())
