"""Knowledge bases on a provider embedding model: ingestion and queries embed through the
gateway's own embeddings path (routing to the mock provider, the ledger under ``kb-ingest`` /
``kb-query``), the dimension probed and recorded; and a model change re-embeds every document
in the background while search keeps answering from the old model, then switches at once."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from tests.conftest import wait_until
from tests.test_kb_api import call, create_kb, start_gateway, upload, wait_done
from tests.test_policies import ledger_rows

PARKING = "Parking is free for visitors on weekends."
HOURS = "The help desk answers calls from eight to six."


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    g = start_gateway(tmp_root, module_mock, services)
    yield g
    g.stop()


def chunk_models(database_url: str, kb_id: str) -> list[tuple[str, str, int, int]]:
    async def go():
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetch(
                """SELECT c.document_id, c.embedding_model, c.dims, c.generation FROM kb_chunks c
                   WHERE c.kb_id = $1 ORDER BY 1""",
                kb_id,
            )
            return [tuple(r) for r in rows]
        finally:
            await conn.close()

    return asyncio.run(go())


def query(gw, kb_id: str, text: str) -> dict:
    r = call(gw, "POST", f"/admin/knowledge-bases/{kb_id}/query", json={"query": text, "threshold": 0.9})
    assert r.status_code == 200, r.text
    return r.json()


def test_provider_model_ingests_and_queries_through_the_gateway(gw, module_mock, services):
    module_mock.clear()
    kb = create_kb(gw, embedding_model="embed-mock")
    assert kb["embedding_model"] == "embed-mock" and kb["dims"] == 8  # probed: the mock's dimension
    doc = upload(gw, kb["id"], "parking.txt", PARKING.encode()).json()
    done = wait_done(gw, kb["id"], doc["id"])
    assert done["status"] == "ready" and done["embedding_model"] == "embed-mock", done
    sent = [r for r in module_mock.requests() if r["path"] == "/v1/embeddings"]
    assert sent and all(r["body"]["model"] == "mock-embedding" for r in sent)
    out = query(gw, kb["id"], PARKING)  # the mock's vectors hash the text: the same text is similarity 1
    assert out["hits"] and out["hits"][0]["similarity"] > 0.99, out
    assert out["candidates"][0]["vector_rank"] == 1
    assert "embedding_ms" in out["timings_ms"]

    def ledgered() -> bool:
        rows = ledger_rows(services[0], "tenant = 'default' AND model = 'embed-mock' AND endpoint = 'embeddings'")
        return {"kb-ingest", "kb-query"} <= {r["workflow"] for r in rows}

    wait_until(ledgered, timeout=15, what="kb-ingest and kb-query ledger rows")
    r = call(gw, "POST", "/admin/knowledge-bases", json={"name": "x", "embedding_model": "gpt-mock"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "embedding_model"


def test_model_change_reembeds_in_the_background_and_switches_atomically(gw, module_mock, services):
    kb = create_kb(gw)  # the local model
    docs = [upload(gw, kb["id"], f"d{i}.txt", text.encode()).json() for i, text in enumerate((PARKING, HOURS))]
    for d in docs:
        assert wait_done(gw, kb["id"], d["id"])["status"] == "ready"
    before = chunk_models(services[0], kb["id"])
    assert {m for _, m, _, _ in before} == {"local/all-MiniLM-L6-v2"}
    module_mock.configure(ttft_ms=700)  # the new model is slow: the move takes a while
    try:
        r = call(gw, "PATCH", f"/admin/knowledge-bases/{kb['id']}", json={"embedding_model": "embed-mock"})
        assert r.status_code == 202, r.text
        moving = r.json()
        assert moving["embedding_model"] == "local/all-MiniLM-L6-v2"
        assert moving["reembedding"] == {"embedding_model": "embed-mock", "dims": 8}
        # meanwhile search answers from the old model's live chunks
        out = query(gw, kb["id"], "Is parking free for visitors?")
        assert out["embedding_model"] == "local/all-MiniLM-L6-v2" and out["hits"], out
        # re-embedding storm: another model while the move runs would queue (and bill) every
        # document again; refused until the move is over, nothing changed
        storm = call(gw, "PATCH", f"/admin/knowledge-bases/{kb['id']}", json={"embedding_model": "embed-other"})
        assert storm.status_code == 409 and storm.json()["error"]["code"] == "reembedding_in_progress", storm.text
        same = call(gw, "PATCH", f"/admin/knowledge-bases/{kb['id']}", json={"embedding_model": "embed-mock"})
        assert same.status_code == 200 and same.json()["reembedding"]["embedding_model"] == "embed-mock"
        state = {}

        def switched() -> bool:
            state.update(call(gw, "GET", f"/admin/knowledge-bases/{kb['id']}").json())
            return state["embedding_model"] == "embed-mock"

        wait_until(switched, timeout=60, what="the knowledge base switched models")
    finally:
        module_mock.configure(ttft_ms=0)
    assert state["reembedding"] is None and state["dims"] == 8
    after = chunk_models(services[0], kb["id"])
    assert len(after) == len(before) and {(m, dims) for _, m, dims, _ in after} == {("embed-mock", 8)}
    assert len({(doc, gen) for doc, _, _, gen in after}) == len(docs)  # one live generation per document
    out = query(gw, kb["id"], HOURS)
    assert out["embedding_model"] == "embed-mock" and out["hits"][0]["similarity"] > 0.99, out


def test_a_vector_store_search_embeds_for_the_callers_key_not_the_tenants(gw, module_mock, services):
    """Budget/allow-list bypass: a /v1 search embeds the query with the knowledge base's provider
    model; that call runs for the caller's key (its ledger rows, limits and model allow-list),
    not under the tenant's own unmetered identity."""
    from tests.test_policies import new_key

    kb = create_kb(gw, embedding_model="embed-mock")
    doc = upload(gw, kb["id"], "parking.txt", PARKING.encode()).json()
    assert wait_done(gw, kb["id"], doc["id"])["status"] == "ready"
    plain = new_key(gw)
    r = call(gw, "POST", f"/v1/vector_stores/{kb['id']}/search", plain["key"], json={"query": PARKING})
    assert r.status_code == 200 and r.json()["data"], r.text

    def mine() -> list[dict]:
        return ledger_rows(services[0], "key_id = $1 AND workflow = 'kb-query'", plain["id"])

    wait_until(mine, timeout=15, what="the search's embedding ledgered for the caller's key")
    assert mine()[0]["model"] == "embed-mock" and mine()[0]["endpoint"] == "embeddings"
    # a key that may not use the embedding model gets full-text results, and no embedding call
    narrow = new_key(gw, models=["gpt-mock"])
    module_mock.clear()
    r = call(gw, "POST", f"/v1/vector_stores/{kb['id']}/search", narrow["key"], json={"query": "parking visitors"})
    assert r.status_code == 200, r.text
    assert not [q for q in module_mock.requests() if q["path"] == "/v1/embeddings"]
