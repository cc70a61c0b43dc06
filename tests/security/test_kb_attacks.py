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
from gateway.storage_quota import StorageQuota


async def _insert(conn, owner: str, quota: StorageQuota):
    return await openai_files.insert_file(
        conn,
        owner,
        filename="a.txt",
        purpose="assistants",
        size=10,
        sha256="0" * 64,
        content_type="text/plain",
        quota=quota,
    )


def test_concurrent_uploads_cannot_overshoot_the_tenant_storage_cap(services):
    """Two uploads racing for the last free slot: the second counts only after the first commits
    (it waits while the first is open), so it sees the cap reached. Without the per-tenant lock
    it would count the committed rows alone and both would be stored."""
    quota = StorageQuota(max_files=1)
    owner = f"cap-{uuid.uuid4().hex[:8]}"

    async def go() -> None:
        pool = await asyncpg.create_pool(services[0], min_size=2, max_size=2)
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
            async with tenant_transaction(pool, owner) as first:
                await _insert(first, owner, quota)

                async def second() -> None:
                    async with tenant_transaction(pool, owner) as conn:
                        await _insert(conn, owner, quota)

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


class _Gated:
    """An embedder of ``model`` (DIMS-dimensional unit vectors) that can be held mid-call."""

    def __init__(self, model: str, gate: asyncio.Event | None = None) -> None:
        self.model = model
        self.gate = gate
        self.entered = asyncio.Event()

    async def embed(self, texts: list[str]) -> list[list[float]]:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        return [[1.0] + [0.0] * 7 for _ in texts]


def test_a_model_move_started_while_a_document_is_processed_still_finishes(services, tmp_path):
    """A re-embedding begun while a document is being processed does not list it (it is not
    ready yet); the document's own job must see the move when it goes live and embed it for the
    new model too, or the move waits for it forever (and the knowledge base can never change
    model again)."""
    from core.queue import Job
    from rag import ingest, store

    owner = f"mv-{uuid.uuid4().hex[:8]}"

    async def go() -> None:
        pool = await asyncpg.create_pool(services[0], min_size=2, max_size=4)
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
                await store.ensure_vector_index(conn, 8)
            async with store.scoped(pool, owner) as conn:
                kb = await store.create_kb(conn, owner, "kb", embedding_model="old-model", dims=8)
                doc, _ = await store.add_document(
                    conn, owner, kb.id, filename="a.txt", content_type="text/plain", size=5, sha256="1" * 64
                )
            path = ingest.document_path(tmp_path, owner, doc.id)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("Parking is free for visitors on weekends.")
            gate = asyncio.Event()
            old, new = _Gated("old-model", gate), _Gated("new-model")
            job = Job("1-0", {"tenant": owner, "kb_id": kb.id, "document_id": doc.id}, None, 1, 0.0)
            task = asyncio.ensure_future(
                ingest.handle(
                    job,
                    pool=pool,
                    embedder=None,
                    data_dir=tmp_path,
                    embedders=lambda model, _t, _k=None: {"old-model": old, "new-model": new}.get(model),
                )
            )
            await asyncio.wait_for(old.entered.wait(), 30)  # processing, not ready
            async with store.scoped(pool, owner) as conn:
                assert await store.start_reembed(conn, owner, kb.id, "new-model", 8) == []
            gate.set()
            await asyncio.wait_for(task, 30)
            async with store.scoped(pool, owner) as conn:
                now = await store.get_kb(conn, owner, kb.id)
                got = await store.get_document(conn, owner, doc.id)
            assert got.status == "ready"
            assert (now.embedding_model, now.reembed_model) == ("new-model", None), now
            assert got.embedding_model == "new-model"
        finally:
            await pool.close()

    asyncio.run(go())


def test_the_extraction_sandbox_child_gets_none_of_the_gateways_secrets(monkeypatch):
    """A parser exploit in the PDF/DOCX child would read its environment: it must hold no key,
    token or connection URL of the gateway's."""
    from rag import sandbox

    secrets_env = {
        "GATEWAY_MASTER_KEY": "sk-master-secret",
        "OPENAI_API_KEY": "sk-provider-secret",
        "DATABASE_URL": "postgresql://u:secret@db/gw",
        "GATEWAY_REDIS_URL": "redis://:secret@cache",
    }
    for k, v in secrets_env.items():
        monkeypatch.setenv(k, v)
    env = sandbox.child_env()
    assert not set(secrets_env) & set(env)
    assert not any("secret" in v for v in env.values())
    assert env.get("PATH") == __import__("os").environ["PATH"]


def test_bytes_of_a_document_deleted_before_its_job_runs_do_not_stay_on_disk(services, tmp_path):
    """Delete a vector store (or file) between an attach's commit and its job: the bytes linked
    to the document's path meanwhile would stay on disk forever, outside every storage cap."""
    from core.queue import Job
    from rag import ingest

    owner = f"orph-{uuid.uuid4().hex[:8]}"
    doc_id = "doc_" + uuid.uuid4().hex[:12]
    path = ingest.document_path(tmp_path, owner, doc_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * 1000)

    async def go() -> None:
        pool = await asyncpg.create_pool(services[0], min_size=1, max_size=2)
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
            job = Job("1-0", {"tenant": owner, "kb_id": "kb_gone", "document_id": doc_id}, None, 1, 0.0)
            await ingest.handle(job, pool=pool, embedder=None, data_dir=tmp_path)
        finally:
            await pool.close()

    asyncio.run(go())
    assert not path.exists()


def test_a_query_vector_is_never_compared_with_chunks_of_another_model(services):
    """The swap race: a search embeds its query with the model it read (old), the knowledge base
    switches to a new model of the same dimension, then the search runs. Comparing the old
    model's query vector with the new model's chunks scores noise as similarity; only chunks of
    the query's own model may be compared (here: none left, so full-text only)."""
    from rag import store
    from rag.retrieve import retrieve

    owner = f"swap-{uuid.uuid4().hex[:8]}"
    vec = [1.0] + [0.0] * 7

    async def go() -> None:
        pool = await asyncpg.create_pool(services[0], min_size=1, max_size=2)
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
                await store.ensure_vector_index(conn, 8)
            async with store.scoped(pool, owner) as conn:
                kb = await store.create_kb(conn, owner, "kb", embedding_model="new-model", dims=8)
                doc, _ = await store.add_document(
                    conn, owner, kb.id, filename="a.txt", content_type="text/plain", size=5, sha256="2" * 64
                )

                class C:
                    index, text, section, tokens = 0, "refund policy details", "", 5

                await store.replace_chunks(conn, owner, kb.id, doc.id, [C()], [vec], "new-model")
            r = await retrieve(pool, owner, [kb.id], "refund policy", vec, threshold=0.0, query_model="old-model")
            (cand,) = r.candidates  # found by its words, never by the other model's vector
            assert cand.vector_rank is None and cand.similarity is None
            r = await retrieve(pool, owner, [kb.id], "refund policy", vec, threshold=0.0, query_model="new-model")
            assert r.hits and r.hits[0].similarity > 0.99
        finally:
            await pool.close()

    asyncio.run(go())
