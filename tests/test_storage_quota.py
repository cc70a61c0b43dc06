"""A tenant's storage on the gateway's disk is bounded: files uploaded to /v1/files and documents
uploaded to its knowledge bases through the admin API count together, in number and in bytes
(``policies.max_files_per_tenant``, ``policies.max_file_bytes_per_tenant``). Knowledge-base
documents had no bound at all: a tenant's admin key could upload 50 MB documents until the disk
every tenant shares was full."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from tests.conftest import gateway_config
from tests.test_kb_api import call, create_kb, start_gateway, upload
from tests.test_policies import new_key


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    config = gateway_config(module_mock)
    config["policies"] = {**config.get("policies", {}), "max_files_per_tenant": 3, "max_file_bytes_per_tenant": 1000}
    g = start_gateway(tmp_root, module_mock, services, worker=False, config=config)  # (uploads queue only)
    yield g
    g.stop()


def _tenant_admin(gw) -> tuple[str, str]:
    tenant = f"quota-{uuid.uuid4().hex[:8]}"
    return tenant, new_key(gw, tenant=tenant, scopes=["admin"])["key"]


def _file(gw, key: str, content: bytes):
    return call(gw, "POST", "/v1/files", key, data={"purpose": "assistants"}, files={"file": ("f.txt", content)})


def _stored(database_url: str, tenant: str) -> tuple[int, int]:
    async def go():
        conn = await asyncpg.connect(database_url)
        try:
            files = await conn.fetchval("SELECT count(*) FROM openai_files WHERE tenant = $1", tenant)
            docs = await conn.fetchval("SELECT count(*) FROM kb_documents WHERE tenant = $1", tenant)
            return int(files), int(docs)
        finally:
            await conn.close()

    return asyncio.run(go())


def _refused(r) -> None:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["code"], err["param"]) == ("too_many_files", "file")
    assert "max_files_per_tenant" in err["message"]


def test_files_and_knowledge_base_documents_count_together_against_the_tenants_quota(gw, services):
    tenant, key = _tenant_admin(gw)
    kb = create_kb(gw, key)
    assert upload(gw, kb["id"], "a.txt", b"first document " * 4, key).status_code == 202
    assert _file(gw, key, b"a file of the tenant").status_code == 200
    assert upload(gw, kb["id"], "b.txt", b"second document " * 4, key).status_code == 202
    # three stored: a fourth is refused, whichever way it comes, and nothing of it is kept
    _refused(upload(gw, kb["id"], "c.txt", b"third document", key))
    _refused(_file(gw, key, b"another file"))
    assert _stored(services[0], tenant) == (1, 2)
    # deleting frees room; the same content again is the document it was (nothing more stored,
    # not counted twice); a full tenant is refused before the body is read (50 MB never reach the
    # disk), so then even that is refused
    doc = upload(gw, kb["id"], "b.txt", b"second document " * 4, key)
    _refused(doc)
    docs = call(gw, "GET", f"/admin/knowledge-bases/{kb['id']}/documents", key).json()["data"]
    second = next(d for d in docs if d["filename"] == "b.txt")
    r = call(gw, "DELETE", f"/admin/knowledge-bases/{kb['id']}/documents/{second['id']}", key)
    assert r.status_code in (200, 204), r.text
    again = upload(gw, kb["id"], "a-again.txt", b"first document " * 4, key)
    assert again.status_code == 200, again.text
    assert upload(gw, kb["id"], "c.txt", b"third document", key).status_code == 202
    _refused(upload(gw, kb["id"], "d.txt", b"fourth document", key))
    assert _stored(services[0], tenant) == (1, 2)
    # another tenant has its own quota
    _, other = _tenant_admin(gw)
    assert upload(gw, create_kb(gw, other)["id"], "a.txt", b"first document " * 4, other).status_code == 202


def test_the_byte_quota_counts_documents_and_files_together(gw, services):
    tenant, key = _tenant_admin(gw)
    kb = create_kb(gw, key)
    assert upload(gw, kb["id"], "big.txt", b"x" * 600, key).status_code == 202
    assert _file(gw, key, b"y" * 300).status_code == 200
    _refused(upload(gw, kb["id"], "more.txt", b"z" * 200, key))  # 1,100 bytes > 1,000
    _refused(_file(gw, key, b"w" * 200))
    assert upload(gw, kb["id"], "small.txt", b"v" * 100, key).status_code == 202  # exactly 1,000
    assert _stored(services[0], tenant) == (1, 2)
