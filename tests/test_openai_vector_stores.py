"""The OpenAI Files and Vector Stores API of a real gateway, driven by the OpenAI SDK: uploads,
attach-and-poll to completed or failed with ``last_error``, batches, search with filters and
score thresholds, list pagination, tenant isolation (another tenant's ids are 404), and the
hostile inputs tried on it (filters built to inject SQL or to cost unbounded work, oversized
attributes, unknown parameters)."""

from __future__ import annotations

import io
import uuid

import httpx
import openai
import pytest

from tests.conftest import MASTER_KEY
from tests.test_kb_api import DATA, start_gateway
from tests.test_policies import new_key


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    g = start_gateway(tmp_root, module_mock, services)
    yield g
    g.stop()


def sdk(gw, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tenant_key(gw) -> str:
    return new_key(gw, tenant=f"vs-{uuid.uuid4().hex[:6]}")["key"]


@pytest.fixture(scope="module")
def client(gw, tenant_key):
    with sdk(gw, tenant_key) as c:
        yield c


@pytest.fixture(scope="module")
def store(client):
    """A vector store with returns.txt (attributes: policy, 2024) and acme.md (pricing, 2025)
    ready, plus a failed empty file."""
    vs = client.vector_stores.create(name="Support FAQ", metadata={"team": "support"})
    returns = client.files.create(file=("returns.txt", (DATA / "returns.txt").read_bytes()), purpose="assistants")
    acme = client.files.create(file=("acme.md", (DATA / "acme.md").read_bytes()), purpose="assistants")
    done = client.vector_stores.files.create_and_poll(
        vector_store_id=vs.id, file_id=returns.id, attributes={"kind": "policy", "year": 2024, "public": True}
    )
    assert done.status == "completed", done
    done = client.vector_stores.files.create_and_poll(
        vector_store_id=vs.id, file_id=acme.id, attributes={"kind": "pricing", "year": 2025}
    )
    assert done.status == "completed", done
    return vs, {"returns": returns, "acme": acme}


def test_files_create_list_retrieve_content_delete(client):
    data = b"Opening hours: Monday to Friday, 9 to 17.\n"
    f = client.files.create(file=("hours.txt", io.BytesIO(data)), purpose="assistants")
    assert f.id.startswith("file-") and f.object == "file" and f.bytes == len(data)
    assert f.filename == "hours.txt" and f.purpose == "assistants" and f.created_at > 0
    assert client.files.retrieve(f.id).filename == "hours.txt"
    assert client.files.content(f.id).read() == data
    assert f.id in {x.id for x in client.files.list()}
    gone = client.files.delete(f.id)
    assert gone.deleted and gone.id == f.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("x.txt", b"hi"), purpose="fine-tune")
    assert err.value.body["param"] == "purpose"


def test_upload_and_poll_completes_and_search_finds_the_passage(client, store):
    vs, files = store
    got = client.vector_stores.retrieve(vs.id)
    assert got.name == "Support FAQ" and got.status == "completed" and got.metadata == {"team": "support"}
    assert got.file_counts.completed == 2 and got.file_counts.total == 2 and got.usage_bytes > 0
    page = client.vector_stores.search(vs.id, query="How long do I have to return a product?", max_num_results=3)
    results = list(page)
    assert results and results[0].filename == "returns.txt" and results[0].file_id == files["returns"].id
    assert "30 days" in results[0].content[0].text and results[0].content[0].type == "text"
    assert 0 < results[0].score <= 1 and results[0].attributes["kind"] == "policy"
    assert len(results) <= 3


def test_failed_file_reports_last_error(client, store):
    vs, _ = store
    bad = client.vector_stores.files.upload_and_poll(
        vector_store_id=vs.id, file=("scanned.pdf", (DATA / "scanned.pdf").read_bytes())
    )
    assert bad.status == "failed" and bad.last_error.code == "invalid_file"
    assert "scanned" in bad.last_error.message
    failed = list(client.vector_stores.files.list(vs.id, filter="failed"))
    assert [f.id for f in failed] == [bad.id]
    assert client.vector_stores.files.delete(file_id=bad.id, vector_store_id=vs.id).deleted
    assert client.vector_stores.retrieve(vs.id).file_counts.failed == 0


def test_search_filters_and_threshold(client, store):
    vs, files = store
    q = "pricing plans and returns"

    def ids(**kw) -> set[str]:
        return {r.file_id for r in client.vector_stores.search(vs.id, query=q, max_num_results=10, **kw)}

    assert ids(filters={"key": "kind", "type": "eq", "value": "pricing"}) == {files["acme"].id}
    assert ids(filters={"key": "year", "type": "gte", "value": 2025}) == {files["acme"].id}
    assert ids(filters={"key": "year", "type": "lt", "value": 2025}) == {files["returns"].id}
    assert ids(filters={"key": "kind", "type": "in", "value": ["policy", "faq"]}) == {files["returns"].id}
    assert ids(filters={"key": "public", "type": "ne", "value": True}) == {files["acme"].id}
    both = {
        "type": "or",
        "filters": [
            {"key": "kind", "type": "eq", "value": "policy"},
            {"type": "and", "filters": [{"key": "year", "type": "eq", "value": 2025}]},
        ],
    }
    assert ids(filters=both) == {files["acme"].id, files["returns"].id}
    # a number never compares with a string
    assert ids(filters={"key": "year", "type": "gt", "value": "2000"}) == set()
    assert ids(ranking_options={"score_threshold": 0.99}) == set()


def test_hostile_filters_are_parameters_and_bounded(client, store, gw):
    vs, _ = store
    inject = "kind') = '\"x\"' OR true; DROP TABLE kb_chunks; --"
    found = client.vector_stores.search(vs.id, query="return", filters={"key": inject, "type": "eq", "value": inject})
    assert list(found) == []
    deep: dict = {"key": "kind", "type": "eq", "value": "policy"}
    for _ in range(10):
        deep = {"type": "and", "filters": [deep]}
    with pytest.raises(openai.BadRequestError) as err:
        client.vector_stores.search(vs.id, query="return", filters=deep)
    assert err.value.body["param"].startswith("filters")
    wide = {"type": "or", "filters": [{"key": f"k{i}", "type": "eq", "value": i} for i in range(100)]}
    with pytest.raises(openai.BadRequestError):
        client.vector_stores.search(vs.id, query="return", filters=wide)
    with pytest.raises(openai.BadRequestError) as err:
        client.vector_stores.search(vs.id, query="x", filters={"key": "k", "type": "regex", "value": ".*"})
    assert err.value.body["param"] == "filters.type"
    with pytest.raises(openai.BadRequestError) as err:
        client.vector_stores.search(vs.id, query="x", max_num_results=51)
    assert err.value.body["param"] == "max_num_results"
    with pytest.raises(openai.BadRequestError) as err:
        client.vector_stores.files.update(
            vector_store_id=vs.id, file_id="file-x", attributes={f"k{i}": i for i in range(17)}
        )
    assert err.value.body["param"] == "attributes"
    r = httpx.post(
        f"{gw.url}/v1/vector_stores/{vs.id}/search",
        headers={"Authorization": f"Bearer {client.api_key}"},
        json={"query": "x", "unknown": 1},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "unknown"
    # the chunks are all still there
    assert list(client.vector_stores.search(vs.id, query="return a product"))


def test_tenant_isolation_other_tenant_gets_404(gw, client, store):
    vs, files = store
    with sdk(gw, new_key(gw, tenant=f"other-{uuid.uuid4().hex[:6]}")["key"]) as other:
        with pytest.raises(openai.NotFoundError):
            other.vector_stores.retrieve(vs.id)
        with pytest.raises(openai.NotFoundError):
            other.vector_stores.search(vs.id, query="return")
        with pytest.raises(openai.NotFoundError):
            other.files.retrieve(files["returns"].id)
        with pytest.raises(openai.NotFoundError):
            other.files.content(files["returns"].id)
        with pytest.raises(openai.NotFoundError):
            other.vector_stores.files.retrieve(file_id=files["returns"].id, vector_store_id=vs.id)
        # attaching someone else's file to one's own store is a 404 naming the file
        own = other.vector_stores.create(name="mine")
        with pytest.raises(openai.NotFoundError) as err:
            other.vector_stores.files.create(vector_store_id=own.id, file_id=files["returns"].id)
        assert err.value.body["param"] == "file_id"
        assert vs.id not in {s.id for s in other.vector_stores.list()}
        assert files["returns"].id not in {f.id for f in other.files.list()}
        with pytest.raises(openai.NotFoundError):
            other.vector_stores.delete(vs.id)
    assert client.vector_stores.retrieve(vs.id).file_counts.completed == 2


def test_list_pagination(client):
    made = [client.vector_stores.create(name=f"page-{i}") for i in range(5)]
    ids = [m.id for m in made]
    first = client.vector_stores.list(limit=2, order="asc", after=ids[0])
    assert [s.id for s in first.data] == ids[1:3] and first.has_more
    assert first.first_id == ids[1] and first.last_id == ids[2]
    every = [s.id for s in client.vector_stores.list(limit=2, order="asc", after=ids[0]) if s.id in ids]
    assert every == ids[1:]  # the SDK followed `after` through the pages
    before = client.vector_stores.list(limit=2, order="asc", before=ids[4])
    assert [s.id for s in before.data] == ids[2:4]
    desc = client.vector_stores.list(limit=3, order="desc")
    assert [s.id for s in desc.data] == ids[::-1][:3]
    with pytest.raises(openai.BadRequestError) as err:
        client.vector_stores.list(after="vs_unknown")
    assert err.value.body["param"] == "after"
    with pytest.raises(openai.BadRequestError) as err:
        client.vector_stores.list(limit=101)
    assert err.value.body["param"] == "limit"
    for m in made:
        assert client.vector_stores.delete(m.id).deleted


def test_update_delete_and_file_batches(client):
    vs = client.vector_stores.create(name="batch", expires_after={"anchor": "last_active_at", "days": 7})
    assert vs.expires_after.days == 7 and vs.expires_at > vs.created_at
    vs = client.vector_stores.update(vs.id, name="renamed", metadata={"a": "b"})
    assert vs.name == "renamed" and vs.metadata == {"a": "b"}
    batch = client.vector_stores.file_batches.upload_and_poll(
        vs.id,
        files=[
            ("products.csv", (DATA / "products.csv").read_bytes()),
            ("help.html", (DATA / "help.html").read_bytes()),
        ],
    )
    assert batch.status == "completed" and batch.file_counts.completed == 2 and batch.id.startswith("vsfb_")
    listed = list(client.vector_stores.file_batches.list_files(batch_id=batch.id, vector_store_id=vs.id))
    assert len(listed) == 2 and {f.status for f in listed} == {"completed"}
    content = client.vector_stores.files.content(file_id=listed[0].id, vector_store_id=vs.id)
    assert next(iter(content)).text
    # a file deleted from Files leaves every vector store too
    client.files.delete(listed[0].id)
    assert client.vector_stores.retrieve(vs.id).file_counts.total == 1
    gone = client.vector_stores.delete(vs.id)
    assert gone.deleted and gone.object == "vector_store.deleted"
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.retrieve(vs.id)


def test_master_key_acts_for_the_default_tenant(gw):
    with sdk(gw, MASTER_KEY) as master:
        vs = master.vector_stores.create()
        assert vs.name == "" and vs.status == "completed"
        assert master.vector_stores.delete(vs.id).deleted


def test_hostile_uploads_and_bodies_are_bounded(gw, client, tenant_key, tmp_root):
    auth = {"Authorization": f"Bearer {tenant_key}"}
    # a filename that climbs directories is reduced to its last part; the bytes go under the id
    f = client.files.create(file=("../../../etc/passwd", b"root:x:0:0\n"), purpose="user_data")
    assert f.filename == "passwd"
    assert not (tmp_root / "etc" / "passwd").exists()
    assert list((tmp_root / "data" / "files").glob(f"*/{f.id}"))
    # more multipart parts than any client sends
    parts = b"".join(b'--b\r\nContent-Disposition: form-data; name="p%d"\r\n\r\nx\r\n' % i for i in range(40))
    body = parts + b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n\r\nhi\r\n--b--\r\n'
    r = httpx.post(
        f"{gw.url}/v1/files", headers={**auth, "Content-Type": "multipart/form-data; boundary=b"}, content=body
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    r = httpx.post(f"{gw.url}/v1/files", headers=auth, files={"file": ("a.txt", b"hi")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
    vs = client.vector_stores.create(name="bounds")
    with pytest.raises(openai.BadRequestError) as err:
        client.vector_stores.create(metadata={"k": "x" * 513})
    assert err.value.body["param"] == "metadata.k"
    with pytest.raises(openai.BadRequestError) as err:
        client.vector_stores.files.create(vector_store_id=vs.id, file_id=f.id, attributes={"k": {"nested": 1}})
    assert err.value.body["param"] == "attributes.k"
    with pytest.raises(openai.BadRequestError) as err:
        client.vector_stores.file_batches.create(vector_store_id=vs.id, file_ids=[f.id] * 501)
    assert err.value.body["param"] == "file_ids"
    with pytest.raises(openai.BadRequestError) as err:
        client.vector_stores.files.create(
            vector_store_id=vs.id,
            file_id=f.id,
            chunking_strategy={"type": "static", "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 90}},
        )
    assert err.value.body["param"] == "chunking_strategy.static.chunk_overlap_tokens"
    # nothing was attached by the refused calls
    assert client.vector_stores.retrieve(vs.id).file_counts.total == 0
    assert client.vector_stores.delete(vs.id).deleted and client.files.delete(f.id).deleted


def test_tenant_isolation_on_mutating_routes_batches_and_cursors(gw, client, store):
    """Another tenant's ids on every route that changes or lists something: 404 (or, as a list
    cursor, 400 like an id that never existed), and nothing of the owner's changes."""
    vs, files = store
    fid = files["returns"].id
    batch = client.vector_stores.file_batches.create(vector_store_id=vs.id, file_ids=[fid])
    key = new_key(gw, tenant=f"other-{uuid.uuid4().hex[:6]}")["key"]
    base = f"{gw.url}/v1/vector_stores/{vs.id}"
    attempts = [
        ("DELETE", f"{gw.url}/v1/files/{fid}", None),
        ("POST", base, {"name": "pwned"}),
        ("POST", f"{base}/files", {"file_id": fid}),
        ("POST", f"{base}/files/{fid}", {"attributes": {"kind": "pwned"}}),
        ("DELETE", f"{base}/files/{fid}", None),
        ("GET", f"{base}/files/{fid}/content", None),
        ("GET", f"{base}/files", None),
        ("GET", f"{base}/file_batches/{batch.id}", None),
        ("POST", f"{base}/file_batches/{batch.id}/cancel", None),
        ("GET", f"{base}/file_batches/{batch.id}/files", None),
        ("POST", f"{base}/file_batches", {"file_ids": [fid]}),
    ]
    with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=30) as h:
        for method, url, body in attempts:
            r = h.request(method, url, json=body)
            assert r.status_code == 404, (method, url, r.status_code, r.text)
        for url, cursor in ((f"{gw.url}/v1/vector_stores", vs.id), (f"{gw.url}/v1/files", fid)):
            r = h.get(url, params={"after": cursor})
            assert r.status_code == 400 and r.json()["error"]["param"] == "after", r.text
    got = client.vector_stores.files.retrieve(file_id=fid, vector_store_id=vs.id)
    assert got.status == "completed" and got.attributes["kind"] == "policy"
    assert client.vector_stores.retrieve(vs.id).name == "Support FAQ"
    assert client.files.retrieve(fid).id == fid


def test_an_expired_vector_store_cannot_be_revived_by_searching_or_adding(gw, client, store, services):
    """Expiry counts from last_active_at: a search, an attach or an update of an expired store
    would make it active again and keep data its owner asked to expire. They are refused."""
    import asyncio

    import asyncpg

    vs = client.vector_stores.create(name="short-lived", expires_after={"anchor": "last_active_at", "days": 1})

    async def age() -> None:
        conn = await asyncpg.connect(services[0])
        try:
            await conn.execute(
                "UPDATE knowledge_bases SET last_active_at = now() - interval '2 days' WHERE id = $1", vs.id
            )
        finally:
            await conn.close()

    asyncio.run(age())
    assert client.vector_stores.retrieve(vs.id).status == "expired"
    fid = store[1]["returns"].id
    for call_ in (
        lambda: client.vector_stores.search(vs.id, query="return"),
        lambda: client.vector_stores.files.create(vector_store_id=vs.id, file_id=fid),
        lambda: client.vector_stores.file_batches.create(vector_store_id=vs.id, file_ids=[fid]),
        lambda: client.vector_stores.update(vs.id, name="revived"),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            call_()
        assert err.value.body["code"] == "vector_store_expired"
    assert client.vector_stores.retrieve(vs.id).status == "expired"
    assert client.vector_stores.delete(vs.id).deleted


def test_files_and_vector_stores_refuse_missing_and_wrong_keys(gw):
    for path in ("/v1/files", "/v1/vector_stores", "/v1/vector_stores/vs_x/search"):
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}):
            r = httpx.request("POST" if path.endswith("search") else "GET", f"{gw.url}{path}", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"], (path, headers, r.text)


def test_attack_flood_of_file_and_vector_store_calls_is_cut_per_key_before_the_body_is_read(gw):
    """Every /v1/files and /v1/vector_stores call costs database work and an upload costs disk:
    a key is held to its requests per minute on them, in one window across replicas, counted
    before the body is read — a refused upload stores nothing."""
    owner = f"flood-{uuid.uuid4().hex[:6]}"
    key = new_key(gw, tenant=owner, rpm=3)["key"]
    codes: list[int] = []
    with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=30) as h:
        for _ in range(2):  # a minute boundary may split one burst; never two in a row
            burst = [h.get(f"{gw.url}/v1/vector_stores").status_code for _ in range(5)]
            codes += burst
            if burst[-1] == 429:
                break
        assert codes[-1] == 429 and codes[-2] == 429 and set(codes) == {200, 429}, codes
        refused = h.post(f"{gw.url}/v1/files", files={"file": ("a.txt", b"x" * 1000)}, data={"purpose": "assistants"})
    if refused.status_code == 429:
        assert refused.json()["error"]["type"] == "rate_limit_error" and int(refused.headers["retry-after"]) >= 1
        other = new_key(gw, tenant=owner)["key"]  # another key of the tenant has its own window
        with sdk(gw, other) as c:
            assert c.files.list().data == []  # the refused upload left nothing


def test_expired_vector_store_is_emptied_in_the_background(gw, client, store, services):
    """An expired store's documents, chunks and bytes are deleted by the sweep; the store reads
    back as expired with no files; its uploaded file (its own object) and live stores stay."""
    import asyncio

    import asyncpg

    from tests.conftest import wait_until

    vs = client.vector_stores.create(name="to-expire", expires_after={"anchor": "last_active_at", "days": 1})
    fid = store[1]["returns"].id
    assert client.vector_stores.files.create_and_poll(vector_store_id=vs.id, file_id=fid).status == "completed"

    async def sql(query: str, *args):
        conn = await asyncpg.connect(services[0])
        try:
            return await conn.fetchval(query, *args)
        finally:
            await conn.close()

    assert asyncio.run(sql("SELECT count(*) FROM kb_chunks WHERE kb_id = $1", vs.id)) > 0
    asyncio.run(sql("UPDATE knowledge_bases SET last_active_at = now() - interval '2 days' WHERE id = $1", vs.id))
    wait_until(
        lambda: asyncio.run(sql("SELECT count(*) FROM kb_documents WHERE kb_id = $1", vs.id)) == 0,
        timeout=30,
        what="the expired store emptied",
    )
    assert asyncio.run(sql("SELECT count(*) FROM kb_chunks WHERE kb_id = $1", vs.id)) == 0
    got = client.vector_stores.retrieve(vs.id)
    assert got.status == "expired" and got.file_counts.total == 0
    assert client.vector_stores.files.list(vector_store_id=vs.id).data == []
    assert client.files.retrieve(fid).id == fid
    live = store[0]
    assert client.vector_stores.retrieve(live.id).file_counts.completed >= 2
