"""Knowledge bases through the admin API of real gateway processes: uploads of every fixture
type processed by the background worker on the durable queue, failures with their reasons,
idempotent re-upload, deletes, the retrieval test endpoint, tenant isolation, a worker
SIGKILLed mid-document (dead letters: test_kb_dead_letters.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.conftest import LOCAL_HTTP, MASTER_KEY, ROOT, Gateway, environ, gateway_config, wait_until
from tests.test_policies import new_key

DATA = ROOT / "tests" / "data" / "kb"
GOOD = ("text.pdf", "guide.docx", "acme.md", "products.csv", "help.html", "returns.txt")
BAD = {
    "scanned.pdf": "scanned",
    "encrypted.pdf": "password",
    "corrupt.docx": "damaged Word document",
    "empty.txt": "empty",
}
KB_ENV = {
    "GATEWAY_KB_WORKER": "1",
    "GATEWAY_KB_VISIBILITY_TIMEOUT": "2",
    "GATEWAY_KB_MAX_RETRIES": "2",
    "GATEWAY_KB_BACKOFF": "0.2",
    "GATEWAY_KB_SWEEP_INTERVAL": "1",  # expired vector stores emptied (gateway/vector_store_expiry.py)
}


def start_gateway(tmp_root: Path, mock, services, *, worker: bool = True, config: dict | None = None) -> Gateway:
    """A gateway with the test timings; ``worker`` False: it queues uploads but consumes none."""
    with environ({**KB_ENV, "GATEWAY_KB_WORKER": "1" if worker else "0"}):
        return Gateway(tmp_root, config or gateway_config(mock), services)


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    g = start_gateway(tmp_root, module_mock, services)
    yield g
    g.stop()


def call(gw: Gateway, method: str, path: str, key: str = MASTER_KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", **kw.pop("headers", {})}
    return LOCAL_HTTP.request(method, f"{gw.url}{path}", headers=headers, timeout=60, **kw)


def create_kb(gw: Gateway, key: str = MASTER_KEY, **body) -> dict:
    body.setdefault("name", f"kb-{uuid.uuid4().hex[:8]}")
    r = call(gw, "POST", "/admin/knowledge-bases", key, json=body)
    assert r.status_code == 201, r.text
    return r.json()


def upload(gw: Gateway, kb_id: str, name: str, content: bytes | None = None, key: str = MASTER_KEY):
    data = (DATA / name).read_bytes() if content is None else content
    return call(gw, "POST", f"/admin/knowledge-bases/{kb_id}/documents", key, files={"file": (name, data)})


def wait_done(gw: Gateway, kb_id: str, doc_id: str, timeout: float = 120.0, key: str = MASTER_KEY) -> dict:
    found = {}

    def done() -> bool:
        r = call(gw, "GET", f"/admin/knowledge-bases/{kb_id}/documents/{doc_id}", key)
        found.update(r.json())
        return found.get("status") in ("ready", "failed")

    wait_until(done, timeout=timeout, what=f"document {doc_id} processed")
    return found


def chunk_rows(database_url: str, document_id: str) -> list[dict]:
    async def go():
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetch("SELECT generation, idx FROM kb_chunks WHERE document_id = $1", document_id)
            return [dict(r) for r in rows]
        finally:
            await conn.close()

    return asyncio.run(go())


@pytest.fixture(scope="module")
def loaded(gw):
    """A knowledge base with every good fixture ready and every bad one failed."""
    kb = create_kb(gw, description="fixtures")
    docs = {}
    for name in (*GOOD, *BAD):
        r = upload(gw, kb["id"], name)
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "queued"
        docs[name] = r.json()
    done = {name: wait_done(gw, kb["id"], d["id"]) for name, d in docs.items()}
    return kb, done


def test_create_validates_and_lists(gw):
    kb = create_kb(gw, settings={"chunk_size": 300, "chunk_overlap": 30, "top_k": 3, "threshold": 0.5})
    assert kb["embedding_model"] == "local/all-MiniLM-L6-v2" and kb["dims"] == 384
    assert kb["settings"]["chunk_size"] == 300 and kb["settings"]["chunk_overlap"] == 30
    r = call(gw, "POST", "/admin/knowledge-bases", json={"name": "x", "embedding_model": "text-embedding-3-small"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "embedding_model"
    assert "not a configured embedding model group" in r.json()["error"]["message"]
    r = call(gw, "POST", "/admin/knowledge-bases", json={"name": "y", "settings": {"chunk_size": 5}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "settings.chunk_size"
    r = call(gw, "POST", "/admin/knowledge-bases", json={"name": kb["name"]})
    assert r.status_code == 400  # the name is taken
    listed = call(gw, "GET", "/admin/knowledge-bases").json()["data"]
    assert kb["id"] in {k["id"] for k in listed}
    assert call(gw, "GET", f"/admin/knowledge-bases/{kb['id']}").json()["name"] == kb["name"]
    assert call(gw, "GET", "/admin/knowledge-bases/kb_nope").status_code == 404


def test_every_fixture_ends_ready_or_failed_with_its_reason(loaded):
    _, done = loaded
    for name in GOOD:
        assert done[name]["status"] == "ready", (name, done[name])
        assert done[name]["chunks"] > 0 and done[name]["reason"] is None
    for name, words in BAD.items():
        assert done[name]["status"] == "failed", (name, done[name])
        assert words in done[name]["reason"], (name, done[name]["reason"])


def test_query_finds_the_right_file_with_explanations(gw, loaded):
    kb, _ = loaded
    r = call(
        gw,
        "POST",
        f"/admin/knowledge-bases/{kb['id']}/query",
        json={"query": "How long do I have to return a product?"},
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["hits"], out
    assert out["hits"][0]["filename"] == "returns.txt"
    assert "30 days" in out["hits"][0]["text"]
    assert {"embedding_ms", "vector_ms", "total_ms"} <= set(out["timings_ms"])
    for cand in out["candidates"]:
        assert cand["decision"] and cand["why"]
    r = call(
        gw, "POST", f"/admin/knowledge-bases/{kb['id']}/query", json={"query": "Acme Enterprise plan single sign-on"}
    )
    acme = [h for h in r.json()["hits"] if h["filename"] == "acme.md"]
    assert acme and acme[0]["section"] == "Acme Cloud > Pricing > Enterprise", r.json()["hits"]
    bad = call(gw, "POST", f"/admin/knowledge-bases/{kb['id']}/query", json={"query": "x", "top_k": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_k"


def test_reupload_is_idempotent_and_delete_removes_chunks(gw, services, loaded):
    kb, done = loaded
    first = done["returns.txt"]
    again = upload(gw, kb["id"], "returns.txt")
    assert again.status_code == 200 and again.json()["id"] == first["id"]
    assert again.json()["chunks"] == first["chunks"]
    assert len(chunk_rows(services[0], first["id"])) == first["chunks"]
    # a new document, deleted: its chunks go with it
    doc = upload(gw, kb["id"], "notes.txt", b"Parking is free for visitors on weekends.\n").json()
    assert wait_done(gw, kb["id"], doc["id"])["status"] == "ready"
    assert chunk_rows(services[0], doc["id"])
    r = call(gw, "DELETE", f"/admin/knowledge-bases/{kb['id']}/documents/{doc['id']}")
    assert r.status_code == 200 and r.json()["deleted"]
    assert chunk_rows(services[0], doc["id"]) == []
    assert call(gw, "GET", f"/admin/knowledge-bases/{kb['id']}/documents/{doc['id']}").status_code == 404
    listed = call(gw, "GET", f"/admin/knowledge-bases/{kb['id']}/documents").json()["data"]
    assert doc["id"] not in {d["id"] for d in listed} and first["id"] in {d["id"] for d in listed}


def big_multipart():
    """A file of 51 MB, sent chunked (no Content-Length): the limit holds while streaming."""
    yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.txt"\r\n\r\n'
    for _ in range(51):
        yield b"word " * (1024 * 1024 // 5)
    yield b"\r\n--b--\r\n"


def test_upload_input_is_checked(gw):
    kb = create_kb(gw)
    r = call(gw, "POST", f"/admin/knowledge-bases/{kb['id']}/documents", json={"file": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    r = call(gw, "POST", f"/admin/knowledge-bases/{kb['id']}/documents", files={"other": ("a.txt", b"hi")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    r = call(
        gw,
        "POST",
        f"/admin/knowledge-bases/{kb['id']}/documents",
        content=big_multipart(),
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert r.status_code == 413, r.text
    assert upload(gw, "kb_missing", "returns.txt").status_code == 404
    assert call(gw, "GET", f"/admin/knowledge-bases/{kb['id']}/documents").json()["data"] == []


def test_tenant_isolation(gw, loaded):
    kb, _ = loaded  # the default tenant's
    other = new_key(gw, tenant=f"t-{uuid.uuid4().hex[:6]}", scopes=["admin"])["key"]
    assert call(gw, "GET", f"/admin/knowledge-bases/{kb['id']}", other).status_code == 404
    r = call(gw, "POST", f"/admin/knowledge-bases/{kb['id']}/query", other, json={"query": "return policy"})
    assert r.status_code == 404
    assert upload(gw, kb["id"], "returns.txt", key=other).status_code == 404
    assert kb["id"] not in {k["id"] for k in call(gw, "GET", "/admin/knowledge-bases", other).json()["data"]}
    own = create_kb(gw, other)
    doc = upload(gw, own["id"], "returns.txt", key=other).json()
    assert wait_done(gw, own["id"], doc["id"], key=other)["status"] == "ready"
    r = call(
        gw,
        "POST",
        f"/admin/knowledge-bases/{own['id']}/query",
        other,
        json={"query": "How long do I have to return a product?"},
    )
    assert {h["kb_id"] for h in r.json()["hits"]} == {own["id"]}
    # the queue admin is the super-admin's
    assert call(gw, "GET", "/admin/queues/kb-ingest", other).status_code == 403
    r = call(gw, "DELETE", f"/admin/knowledge-bases/{own['id']}", other)
    assert r.status_code == 200
    assert call(gw, "GET", f"/admin/knowledge-bases/{own['id']}", other).status_code == 404


def big_document(paragraphs: int = 120) -> bytes:
    """One chunk a paragraph: 120 take the worker seconds (the victim is killed within 50 ms of
    starting), and more than the 50 chunks the test asks for."""
    words = "alpha beta gamma delta epsilon zeta theta iota kappa lambda omicron sigma".split()
    out = []
    for i in range(paragraphs):
        body = " ".join(words[(i + j) % len(words)] for j in range(120))
        out.append(f"Paragraph {i} about item {i * 7}. {body}.")
    return "\n\n".join(out).encode()


def test_worker_killed_mid_document_still_ends_ready_without_duplicates(tmp_root, services, module_mock, gw):
    victim = start_gateway(tmp_root, module_mock, services)
    kb = create_kb(victim)
    doc = upload(victim, kb["id"], "big.txt", big_document()).json()
    seen = {}

    def processing() -> bool:
        seen.update(call(victim, "GET", f"/admin/knowledge-bases/{kb['id']}/documents/{doc['id']}").json())
        return seen["status"] != "queued"

    wait_until(processing, timeout=60, what="processing started")
    victim.stop(signal.SIGKILL)  # the gateway dies mid-document (or the other gateway took the job)
    # `gw` (same database, Redis and data directory) claims the message after the visibility timeout
    done = wait_done(gw, kb["id"], doc["id"], timeout=240)
    assert done["status"] == "ready", done
    rows = chunk_rows(services[0], doc["id"])
    assert len(rows) == done["chunks"] > 50
    assert len({r["idx"] for r in rows}) == len(rows) and len({r["generation"] for r in rows}) == 1


def test_cli_creates_and_adds_with_progress(gw, tmp_root):
    env = {**os.environ, "GATEWAY_URL": gw.url, "GATEWAY_MASTER_KEY": MASTER_KEY}
    name = f"cli-{uuid.uuid4().hex[:6]}"
    run = [sys.executable, "-m", "gateway", "kb"]
    out = subprocess.run([*run, "create", name], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    kb_id = out.stdout.strip()
    files = [str(DATA / "returns.txt"), str(DATA / "acme.md"), str(DATA / "empty.txt")]
    out = subprocess.run([*run, "add", name, *files], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 1, out.stderr  # empty.txt failed
    assert "[1/3] returns.txt … ready" in out.stderr and "[3/3] empty.txt … failed" in out.stderr
    docs = call(gw, "GET", f"/admin/knowledge-bases/{kb_id}/documents").json()["data"]
    assert sorted(d["status"] for d in docs) == ["failed", "ready", "ready"]
