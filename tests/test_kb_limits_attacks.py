"""Attacks on what one tenant can make the knowledge-base layer store and do (an attacker's
review of gateway/vector_store_attach.py, gateway/openai_vector_stores.py, gateway/admin_kb.py
and gateway/kb_limits.py): batches that count a store's documents once per file, one file
attached to every store outside any quota, file-batch rows without end, admin knowledge bases
and uploads past the limits the OpenAI surface keeps, and admin counts that stopped at 1,000.
Real gateway process, real PostgreSQL and Valkey."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from gateway import vector_store_attach
from rag import store as kb_store
from tests.conftest import gateway_config
from tests.test_kb_api import call, start_gateway, upload
from tests.test_kb_store_attacks import _sql
from tests.test_policies import new_key

MAX_ATTACHED_FILES = 3
MAX_ATTACHED_BYTES = 1000


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    config = gateway_config(module_mock)
    config["policies"] = {
        **config.get("policies", {}),
        "max_attached_files_per_tenant": MAX_ATTACHED_FILES,
        "max_attached_bytes_per_tenant": MAX_ATTACHED_BYTES,
    }
    g = start_gateway(tmp_root, module_mock, services, worker=False, config=config)  # (attaches queue only)
    yield g
    g.stop()


@pytest.fixture
def owner(services):
    """A new tenant, whose knowledge bases and files go at the end: 1,000 knowledge bases left
    behind would push the next tests' out of the super-admin's list."""
    name = f"kblimits-{uuid.uuid4().hex[:8]}"
    yield name
    _sql(services, "DELETE FROM knowledge_bases WHERE tenant = $1", name)
    _sql(services, "DELETE FROM openai_files WHERE tenant = $1", name)


async def _store_and_files(conn, owner: str, n_files: int, size: int = 10) -> tuple[kb_store.KnowledgeBase, list[str]]:
    """A vector store of ``owner`` and ``n_files`` of its files, written as the API leaves them."""
    vs_id = f"vs_{uuid.uuid4().hex[:24]}"
    row = await conn.fetchrow(
        f"""INSERT INTO knowledge_bases (id, tenant, name, embedding_model, dims) VALUES ($1, $2, $1, 'local', 384)
            RETURNING {kb_store._KB_COLS}""",
        vs_id,
        owner,
    )
    ids = [f"file-{uuid.uuid4().hex}" for _ in range(n_files)]
    await conn.execute(
        """INSERT INTO openai_files (id, tenant, filename, purpose, bytes, sha256)
           SELECT f, $2, 'f.txt', 'assistants', $3, md5(f) FROM unnest($1::text[]) AS f""",
        ids,
        owner,
        size,
    )
    return kb_store._kb(row), ids


async def _setup(services, owner: str, n_files: list[int]) -> list[tuple[kb_store.KnowledgeBase, list[str]]]:
    """A store with its files for each of ``n_files``, committed."""
    conn = await asyncpg.connect(services[0])
    try:
        return [await _store_and_files(conn, owner, n) for n in n_files]
    finally:
        await conn.close()


class _Counting:
    """A connection that records the SQL it is given."""

    def __init__(self, conn) -> None:
        self._conn = conn
        self.queries: list[str] = []

    def __getattr__(self, name):
        attr = getattr(self._conn, name)
        if name in ("fetch", "fetchrow", "fetchval", "execute"):

            async def recorded(query, *args, **kw):
                self.queries.append(query)
                return await attr(query, *args, **kw)

            return recorded
        return attr


def test_attack_a_file_batch_counts_the_stores_documents_once_not_once_per_file(gw, services, owner):
    """A batch of up to 500 files counted the store's documents once per file: up to 500 ×
    10,000 rows scanned in one request. They are counted once per transaction (the lock is
    held to its end, so the count stays exact)."""

    async def go():
        conn = await asyncpg.connect(services[0])
        try:
            kb, files = await _store_and_files(conn, owner, 40)
            counting = _Counting(conn)
            async with conn.transaction():
                entries = [(f, {}, None, f"file_ids[{i}]") for i, f in enumerate(files)]
                attached = await vector_store_attach.attach(counting, owner, kb, entries)
            assert [new for _, new in attached] == [True] * 40
            return [q for q in counting.queries if "count(" in q.lower()]
        finally:
            await conn.close()

    counts = asyncio.run(go())
    assert 1 <= len(counts) <= 2, f"{len(counts)} counting queries for one batch of 40 files"


def _waiting_on_advisory_lock(conn, owner: str):
    return conn.fetchval(
        """SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND wait_event = 'advisory'
           AND backend_type = 'client backend' AND application_name = $1""",
        owner,
    )


async def _race(services, owner: str, first, second) -> BaseException | None:
    """Runs ``first(conn)`` in a transaction left open, then ``second(conn)`` in another one,
    until ``second`` finishes or waits on an advisory lock; commits the first. What ``second``
    raised (None: nothing). Ordered by the locks, not by time."""
    c1, c2, watch = [await asyncpg.connect(services[0], server_settings={"application_name": owner}) for _ in "123"]
    try:
        tx = c1.transaction()
        await tx.start()
        await first(c1)

        async def run_second():
            async with c2.transaction():
                await second(c2)

        task = asyncio.create_task(run_second())
        for _ in range(1200):  # bounded (~60 s): never asserts a time
            if task.done() or await _waiting_on_advisory_lock(watch, owner):
                break
            await asyncio.sleep(0.05)
        await tx.commit()
        try:
            await task
        except Exception as exc:  # what the second one raised is the result
            return exc
        return None
    finally:
        for c in (c1, c2, watch):
            await c.close()


def test_attack_two_replicas_attaching_one_file_to_two_stores_cannot_both_pass_the_tenants_quota(gw, services, owner):
    """Two replicas attach the same file to two different stores of a tenant that has room for
    one more attachment: each store's own lock let both count and insert. The tenant's quota
    is checked under the tenant's lock (the storage quota's), so the second one counts after
    the first commits, and is refused."""
    from core.errors import InvalidRequest
    from gateway import kb_limits

    limits = kb_limits.Limits(max_attached_files=1)
    (kb1, [fid]), (kb2, _) = asyncio.run(_setup(services, owner, [1, 0]))

    async def first(conn):
        await vector_store_attach.attach(conn, owner, kb1, [(fid, {}, None, "file_id")], limits)

    async def second(conn):
        await vector_store_attach.attach(conn, owner, kb2, [(fid, {}, None, "file_id")], limits)

    err = asyncio.run(_race(services, owner, first, second))
    assert isinstance(err, InvalidRequest), err
    assert (err.code, err.param) == ("too_many_attached_files", "file_id")
    rows = _sql(services, "SELECT kb_id FROM kb_documents WHERE tenant = $1", owner)
    assert len(rows) == 1


def test_two_replicas_filling_the_last_place_of_a_store_cannot_both_pass(gw, services, owner):
    """The 10,000-files-per-store limit stays exact now that a batch counts once: two replicas
    each attaching a file to a store with room for one."""
    from core.errors import InvalidRequest
    from gateway import kb_limits

    limits = kb_limits.Limits(max_files_per_store=1)
    [(kb, files)] = asyncio.run(_setup(services, owner, [2]))

    async def first(conn):
        await vector_store_attach.attach(conn, owner, kb, [(files[0], {}, None, "file_ids[0]")], limits)

    async def second(conn):
        await vector_store_attach.attach(conn, owner, kb, [(files[1], {}, None, "file_ids[0]")], limits)

    err = asyncio.run(_race(services, owner, first, second))
    assert isinstance(err, InvalidRequest), err
    assert (err.code, err.param) == ("too_many_files", "file_ids[0]")


def _client(gw, owner: str, scopes=None) -> str:
    return new_key(gw, tenant=owner, scopes=scopes or [])["key"]


def _file(gw, key: str, content: bytes) -> str:
    r = call(gw, "POST", "/v1/files", key, data={"purpose": "assistants"}, files={"file": ("f.txt", content)})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _store(gw, key: str) -> str:
    r = call(gw, "POST", "/v1/vector_stores", key, json={"name": "s"})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _refused(r, code: str, param: str) -> None:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["type"], err["code"], err["param"]) == ("invalid_request_error", code, param), err


def test_attack_one_file_attached_to_many_stores_counts_once_per_store(gw, services, owner):
    """One file counts once toward the tenant's storage quota, but could be attached to ~1,000
    stores × 10,000 files: ~10 M documents, their chunks and embedding work, outside any quota.
    Each attachment counts (in number and by the file's bytes, as OpenAI bills each store's
    usage_bytes) toward policies.max_attached_files_per_tenant / _bytes_per_tenant, whichever
    way it is attached, and a refused attach leaves nothing behind."""
    key = _client(gw, owner)
    fid = _file(gw, key, b"small file")
    stores = [_store(gw, key) for _ in range(MAX_ATTACHED_FILES + 1)]
    for vs in stores[:MAX_ATTACHED_FILES]:
        r = call(gw, "POST", f"/v1/vector_stores/{vs}/files", key, json={"file_id": fid})
        assert r.status_code == 200, r.text
    r = call(gw, "POST", f"/v1/vector_stores/{stores[-1]}/files", key, json={"file_id": fid})
    _refused(r, "too_many_attached_files", "file_id")
    assert "max_attached_files_per_tenant" in r.json()["error"]["message"]
    r = call(gw, "POST", f"/v1/vector_stores/{stores[-1]}/file_batches", key, json={"file_ids": [fid]})
    _refused(r, "too_many_attached_files", "file_ids[0]")
    r = call(gw, "POST", "/v1/vector_stores", key, json={"name": "more", "file_ids": [fid]})
    _refused(r, "too_many_attached_files", "file_ids[0]")
    # attached again where it is: nothing more is held, so it is not refused
    r = call(gw, "POST", f"/v1/vector_stores/{stores[0]}/files", key, json={"file_id": fid})
    assert r.status_code == 200, r.text
    rows = _sql(services, "SELECT count(*) AS n FROM kb_documents WHERE tenant = $1", owner)
    assert rows[0]["n"] == MAX_ATTACHED_FILES
    # removing an attachment frees its place
    r = call(gw, "DELETE", f"/v1/vector_stores/{stores[0]}/files/{fid}", key)
    assert r.status_code == 200, r.text
    r = call(gw, "POST", f"/v1/vector_stores/{stores[-1]}/files", key, json={"file_id": fid})
    assert r.status_code == 200, r.text


def test_attack_a_large_file_attached_to_many_stores_counts_its_bytes_in_each(gw, services, owner):
    key = _client(gw, owner)
    fid = _file(gw, key, b"x" * 400)
    stores = [_store(gw, key) for _ in range(3)]
    for vs in stores[:2]:
        assert call(gw, "POST", f"/v1/vector_stores/{vs}/files", key, json={"file_id": fid}).status_code == 200
    r = call(gw, "POST", f"/v1/vector_stores/{stores[2]}/files", key, json={"file_id": fid})
    _refused(r, "too_many_attached_files", "file_id")
    assert "max_attached_bytes_per_tenant" in r.json()["error"]["message"]


def test_attack_resending_a_file_batch_keeps_at_most_the_tenants_newest_batches(gw, services, owner):
    """Each file batch is a kb_file_batches row (~15 KB for 500 ids): re-sending the same
    file_ids added one each time, bounded only by the request rate. A tenant keeps its newest
    1,000 (kb_limits.MAX_BATCHES_PER_TENANT); older ones are forgotten (their files stay)."""
    kept = 1000
    key = _client(gw, owner)
    fid = _file(gw, key, b"batched")
    vs = _store(gw, key)
    _sql(
        services,
        """INSERT INTO kb_file_batches (id, tenant, kb_id, file_ids, created_at)
           SELECT 'vsfb_old' || i, $1, $2, ARRAY[$3], now() - interval '1 day' + i * interval '1 second'
           FROM generate_series(1, $4) AS i""",
        owner,
        vs,
        fid,
        kept,
    )
    r = call(gw, "POST", f"/v1/vector_stores/{vs}/file_batches", key, json={"file_ids": [fid]})
    assert r.status_code == 200, r.text
    newest = r.json()["id"]
    rows = _sql(services, "SELECT id FROM kb_file_batches WHERE tenant = $1", owner)
    ids = {row["id"] for row in rows}
    assert len(ids) == kept and newest in ids and "vsfb_old1" not in ids
    assert call(gw, "GET", f"/v1/vector_stores/{vs}/file_batches/{newest}", key).status_code == 200
    assert call(gw, "GET", f"/v1/vector_stores/{vs}/file_batches/vsfb_old1", key).status_code == 404


def test_attack_the_admin_api_creates_no_more_knowledge_bases_than_the_vector_store_api(gw, services, owner):
    """A tenant has at most 1,000 knowledge bases (vector stores included) through /v1; the
    admin API created them without a cap."""
    admin = _client(gw, owner, ["admin"])
    _sql(
        services,
        """INSERT INTO knowledge_bases (id, tenant, name, embedding_model, dims)
           SELECT 'kb_cap' || i || $1, $1, 'n' || i, 'local', 384 FROM generate_series(1, 1000) AS i""",
        owner,
    )
    r = call(gw, "POST", "/admin/knowledge-bases", admin, json={"name": "one-too-many"})
    _refused(r, "too_many_stores", None)  # (no field is at fault)
    r = call(gw, "POST", "/v1/vector_stores", admin, json={"name": "one-too-many"})
    _refused(r, "too_many_stores", None)
    assert _sql(services, "SELECT count(*) AS n FROM knowledge_bases WHERE tenant = $1", owner)[0]["n"] == 1000


def test_attack_an_admin_upload_into_a_full_vector_store_is_refused(gw, services, owner):
    """Admin uploads into a vs_ store skipped the 10,000-files-per-store limit that attaching
    keeps."""
    admin = _client(gw, owner, ["admin"])
    vs = _store(gw, admin)
    _sql(
        services,
        """INSERT INTO kb_documents (id, tenant, kb_id, filename, bytes, sha256, status, file_id)
           SELECT 'doc_' || md5($2 || i), $1, $2, 'x.txt', 1, md5($2 || i), 'ready', 'file-x' || i
           FROM generate_series(1, 10000) AS i""",
        owner,
        vs,
    )
    r = upload(gw, vs, "one-more.txt", b"one more document", admin)
    _refused(r, "too_many_files", "file")
    n = _sql(services, "SELECT count(*) AS n FROM kb_documents WHERE kb_id = $1", vs)[0]["n"]
    assert n == 10000


def test_attack_admin_counts_and_lists_of_a_knowledge_base_do_not_stop_at_1000_documents(gw, services, owner):
    """GET of a knowledge base counted its documents and chunks from a list capped at 1,000,
    and the document list stopped there too: past 1,000 the counts were wrong and the rest
    could not be listed. Counts are exact; the list pages with ``after``."""
    admin = _client(gw, owner, ["admin"])
    r = call(gw, "POST", "/admin/knowledge-bases", admin, json={"name": "big"})
    assert r.status_code == 201, r.text
    kb = r.json()["id"]
    _sql(
        services,
        """INSERT INTO kb_documents (id, tenant, kb_id, filename, bytes, sha256, status, chunks)
           SELECT 'doc_' || md5($2 || i), $1, $2, 'x.txt', 1, md5($2 || i), 'ready', 2
           FROM generate_series(1, 1001) AS i""",
        owner,
        kb,
    )
    out = call(gw, "GET", f"/admin/knowledge-bases/{kb}", admin).json()
    assert out["documents"] == {"queued": 0, "processing": 0, "ready": 1001, "failed": 0}
    assert out["chunks"] == 2002
    first = call(gw, "GET", f"/admin/knowledge-bases/{kb}/documents", admin).json()
    assert len(first["data"]) == 1000 and first["has_more"] is True
    rest = call(gw, "GET", f"/admin/knowledge-bases/{kb}/documents?after={first['last_id']}", admin).json()
    assert len(rest["data"]) == 1 and rest["has_more"] is False
    seen = {d["id"] for d in first["data"]} | {d["id"] for d in rest["data"]}
    assert len(seen) == 1001
    small = call(gw, "GET", f"/admin/knowledge-bases/{kb}/documents?limit=10", admin).json()
    assert [d["id"] for d in small["data"]] == [d["id"] for d in first["data"][:10]]
    r = call(gw, "GET", f"/admin/knowledge-bases/{kb}/documents?after=doc_nosuch", admin)
    assert r.status_code == 400 and r.json()["error"]["param"] == "after", r.text


def test_attack_the_super_admins_list_of_knowledge_bases_does_not_stop_at_1000(gw, services, owner):
    """The super-admin's list of every tenant's knowledge bases stopped at the first 1,000: past
    that, a new knowledge base was never listed (and ``gateway kb add <name>`` could not find
    it). The list pages with ``after`` like the document list."""
    from tests.test_kb_api import create_kb

    _sql(
        services,
        """INSERT INTO knowledge_bases (id, tenant, name, embedding_model, dims, created_at)
           SELECT 'kb_list' || i || $1, $1, 'n' || i, 'local', 384, now() - interval '1 day'
           FROM generate_series(1, 1000) AS i""",
        owner,
    )
    newest = create_kb(gw, name=f"newest-{owner}")  # (the master key's: tenant default)
    try:
        pages, after = [], None
        for _ in range(1000):
            r = call(gw, "GET", "/admin/knowledge-bases" + (f"?after={after}" if after else ""))
            assert r.status_code == 200, r.text
            page = r.json()
            pages.append(page)
            if not page.get("has_more"):
                break
            after = page["last_id"]
        assert len(pages[0]["data"]) == 1000
        listed = [k["id"] for p in pages for k in p["data"]]
        assert newest["id"] in listed and len(listed) == len(set(listed))
        r = call(gw, "GET", "/admin/knowledge-bases?after=kb_nosuch")
        assert r.status_code == 400 and r.json()["error"]["param"] == "after", r.text
    finally:
        _sql(services, "DELETE FROM knowledge_bases WHERE id = $1", newest["id"])
