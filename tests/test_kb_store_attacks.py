"""Attacks on the files, vector stores and knowledge-base surface (gateway/openai_files.py,
gateway/openai_vector_stores.py, gateway/openai_vector_search.py, gateway/admin_kb.py) from an
attacker's review: what a tenant's key (or its admin key) can do to keep bytes on the shared disk
past its storage quota, keep a deleted file's text searchable, or get bad input accepted. Real
gateway process, real PostgreSQL and Valkey."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from rag.ingest import document_path
from tests.test_kb_api import call, create_kb, start_gateway
from tests.test_policies import new_key


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    g = start_gateway(tmp_root, module_mock, services)
    yield g
    g.stop()


def _sql(services, query: str, *args):
    async def go():
        conn = await asyncpg.connect(services[0])
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()

    return asyncio.run(go())


def test_attack_deleting_a_knowledge_base_of_more_than_1000_documents_leaves_no_bytes_on_disk(gw, services, tmp_root):
    """A tenant admin uploads 1,001 documents to a knowledge base and deletes it: every row goes
    (the storage quota is free again), so every document's bytes must go too. The delete read
    the documents to unlink through a list capped at 1,000: the rest stayed on the disk every
    tenant shares, counted by no quota — upload, delete, repeat. (The documents are written
    here as the uploads would leave them, without 1,001 uploads' worth of ingestion.)"""
    owner = f"kbdel-{uuid.uuid4().hex[:6]}"
    admin_key = new_key(gw, tenant=owner, scopes=["admin"])["key"]
    kb = create_kb(gw, admin_key)
    ids = [f"doc_{uuid.uuid4().hex[:16]}" for _ in range(1001)]
    _sql(
        services,
        """INSERT INTO kb_documents (id, tenant, kb_id, filename, bytes, sha256, status, reason)
           SELECT d, $2, $3, 'x.txt', 3, md5(d), 'failed', 'test' FROM unnest($1::text[]) AS d""",
        ids,
        owner,
        kb["id"],
    )
    paths = [document_path(tmp_root / "data", owner, d) for d in ids]
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for p in paths:
        p.write_bytes(b"abc")
    r = call(gw, "DELETE", f"/admin/knowledge-bases/{kb['id']}", admin_key)
    assert r.status_code == 200, r.text
    assert _sql(services, "SELECT id FROM kb_documents WHERE kb_id = $1", kb["id"]) == []
    left = [p.name for p in paths if p.exists()]
    assert left == [], f"{len(left)} documents' bytes stayed on disk"
