"""Attacks on the files, vector stores and knowledge-base surface (gateway/openai_files.py,
gateway/openai_vector_stores.py, gateway/openai_vector_search.py, gateway/admin_kb.py) from an
attacker's review: what a tenant's key (or its admin key) can do to keep bytes on the shared disk
past its storage quota, keep a deleted file's text searchable, or get bad input accepted. Real
gateway process, real PostgreSQL and Valkey."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import uuid

import asyncpg
import httpx
import pytest

from gateway.openai_files import file_path
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


def _waiting_on_a_lock(services, like: str) -> int:
    return _sql(
        services,
        "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE $1",
        like,
    )[0]["n"]


def _until(check, what: str) -> None:
    """Polls ``check`` (bounded: ~60 s), without asserting any time."""
    for _ in range(1200):
        if check():
            return
        threading.Event().wait(0.05)
    raise AssertionError(f"never happened: {what}")


def test_attack_a_file_attached_while_it_is_deleted_leaves_no_document_behind(gw, services, tmp_root):
    """DELETE /v1/files/{id} removes the file from every vector store; an attach of the same
    file running at the same time read the file before the delete committed and inserted its
    document after the delete had removed the file's documents. Both answered 200: the file
    was gone, yet its text stayed searchable in the store, its bytes on disk (a hard link)
    counted by no quota. The delete and the attach are ordered here by a row lock the test
    holds on the file: the delete waits for it after removing the documents, the attach runs."""
    owner = f"kbrace-{uuid.uuid4().hex[:6]}"
    key = new_key(gw, tenant=owner)["key"]
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=gw.url, headers=auth, timeout=90) as h:
        f = h.post(
            "/v1/files", files={"file": ("secret.txt", b"The launch code is 0000.\n")}, data={"purpose": "assistants"}
        )
        assert f.status_code == 200, f.text
        fid = f.json()["id"]
        vs = h.post("/v1/vector_stores", json={"name": "race"}).json()["id"]

    answers: dict[str, httpx.Response] = {}

    def run(name: str, method: str, path: str, body=None) -> None:
        with httpx.Client(base_url=gw.url, headers=auth, timeout=90) as h:
            answers[name] = h.request(method, path, json=body)

    async def hold_and_race() -> None:
        conn = await asyncpg.connect(services[0])
        try:
            tx = conn.transaction()
            await tx.start()
            await conn.execute("SELECT 1 FROM openai_files WHERE id = $1 FOR UPDATE", fid)
            delete = threading.Thread(target=run, args=("delete", "DELETE", f"/v1/files/{fid}"))
            delete.start()
            await asyncio.to_thread(_until, lambda: _waiting_on_a_lock(services, "%openai_files%") >= 1, "delete waits")
            attach = threading.Thread(
                target=run, args=("attach", "POST", f"/v1/vector_stores/{vs}/files", {"file_id": fid})
            )
            attach.start()
            # the attach either finishes (it does not wait for the file) or waits for it too
            await asyncio.to_thread(
                _until,
                lambda: "attach" in answers or _waiting_on_a_lock(services, "%openai_files%") >= 2,
                "attach done or waiting",
            )
            await tx.rollback()
            await asyncio.to_thread(delete.join, 90)
            await asyncio.to_thread(attach.join, 90)
        finally:
            await conn.close()

    asyncio.run(hold_and_race())
    assert answers["delete"].status_code == 200, answers["delete"].text
    assert answers["attach"].status_code in (200, 404), answers["attach"].text
    if answers["attach"].status_code == 404:
        assert answers["attach"].json()["error"]["param"] == "file_id"
    docs = _sql(services, "SELECT id FROM kb_documents WHERE tenant = $1 AND file_id = $2", owner, fid)
    assert docs == [], "the deleted file is still a document of the vector store"
    assert not file_path(tmp_root / "data", owner, fid).exists()
    digest = hashlib.sha256(owner.encode()).hexdigest()[:16]
    assert not list((tmp_root / "data" / "kb" / digest).glob("doc_*"))


@pytest.mark.parametrize("value", [False, 0, "", []])
def test_attack_ranking_options_that_are_not_an_object_are_refused(gw, value):
    """``ranking_options`` false, 0, "" or [] was read as "none given" (``or {}``) and the
    search ran: bad input must be a 400 naming the field, as a non-empty non-object is."""
    key = new_key(gw, tenant=f"kbrank-{uuid.uuid4().hex[:6]}")["key"]
    with httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as h:
        vs = h.post("/v1/vector_stores", json={"name": "r"}).json()["id"]
        r = h.post(f"/v1/vector_stores/{vs}/search", json={"query": "x", "ranking_options": value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "ranking_options" and err["type"] == "invalid_request_error"


HOSTILE_QUERIES = [
    '"' + "w0 " * 1300 + '"',  # one phrase of a word repeated
    "w0 w1 w2 " * 450,  # three distinct keywords: it went as typed
    "w1999 w0 -w1 " * 400,  # ... with negations
    '"w0" ' + " or ".join(f"w{i}" for i in range(700)),  # a quote: it went as typed
    "a_" * 2000,  # one \\w+ word, one term per letter to PostgreSQL
    "a\u00b2" * 2000,  # superscript two: a word character to Python, a separator to PostgreSQL
    "x-" * 2000,
    "the " * 1000,
    "refund policy\n" + "-" * 40,  # a Markdown rule: 32 negations in a row overflowed the parser's stack
    "refund " + "- " * 40 + "policy",
]


@pytest.mark.parametrize("query", HOSTILE_QUERIES, ids=range(len(HOSTILE_QUERIES)))
def test_attack_a_long_search_query_makes_no_more_full_text_terms_than_a_short_one(services, query):
    """A search's full-text query is meant to hold at most MAX_TERMS keywords, but a query of
    few distinct keywords, or with a quote, went to websearch_to_tsquery as typed: 4,000
    characters made thousands of terms, phrases and negations — measured here at 2-12 s of a
    database core per search over 50,000 chunks (the index every tenant's chunks share),
    against ~20 ms for 16 terms. What reaches PostgreSQL is counted there (numnode)."""
    from rag.retrieve import MAX_QUERY_CHARS, MAX_TERMS, fts_query

    text = fts_query(query[:MAX_QUERY_CHARS])
    rows = _sql(services, "SELECT numnode(websearch_to_tsquery('simple', $1)) AS n", text)
    assert rows[0]["n"] <= 4 * MAX_TERMS, (rows[0]["n"], text[:200])


def test_short_search_queries_still_go_as_typed():
    from rag.retrieve import fts_query

    assert fts_query('"return window" -holiday') == '"return window" -holiday'
    assert fts_query("SKU-4411 price") == "SKU-4411 price"
    assert (
        fts_query("How long do I have to return a product or ask for a refund?")
        == "long or return or product or ask or refund"
    )


def test_attack_a_search_query_under_a_markdown_rule_is_answered(gw):
    """A short question pasted with a Markdown rule under it: 40 ``-`` went to PostgreSQL as typed,
    each a negation, and overflowed its full-text parser's stack: the search failed (500)."""
    key = new_key(gw, tenant=f"kbrule-{uuid.uuid4().hex[:6]}")["key"]
    with httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as h:
        vs = h.post("/v1/vector_stores", json={"name": "r"}).json()["id"]
        r = h.post(f"/v1/vector_stores/{vs}/search", json={"query": "refund policy\n" + "-" * 40})
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "vector_store.search_results.page"
