"""``POST /v1/rerank`` (Cohere-compatible) routed to a rerank model group on the mock provider,
with the pipeline's checks and audit record, and a knowledge base re-ranking its retrieval
through it."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.conftest import gateway_config, wait_until
from tests.test_kb_api import call, create_kb, start_gateway, upload, wait_done
from tests.test_policies import ledger_rows, new_key

DOCS = [
    "Shipping takes three to five business days.",
    "You can return a product within 30 days for a full refund.",
    "Our office is closed on public holidays.",
]


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    cfg = gateway_config(module_mock)
    cfg["models"].append(
        {"name": "rerank-mock", "mode": "rerank", "deployments": [{"provider": "mock-openai", "model": "mock-rerank"}]}
    )
    priced = {"provider": "mock-openai", "model": "mock-rerank-priced", "input_cost_per_token": 1e-3}
    cfg["models"].append({"name": "rerank-priced", "mode": "rerank", "deployments": [priced]})
    g = start_gateway(tmp_root, module_mock, services, config=cfg)
    yield g
    g.stop()


@pytest.fixture(scope="module")
def key(gw) -> str:
    return new_key(gw, tenant=f"rr-{uuid.uuid4().hex[:6]}")["key"]


def rerank(gw, key: str, **body) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/rerank", headers={"Authorization": f"Bearer {key}"}, json=body, timeout=30)


def test_rerank_sorts_cuts_and_is_audited(gw, key, module_mock, services):
    module_mock.clear()
    r = rerank(gw, key, model="rerank-mock", query="return a product refund", documents=DOCS, top_n=2)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["results"][0]["index"] == 1
    assert len(out["results"]) == 2 and out["results"][0]["relevance_score"] >= out["results"][1]["relevance_score"]
    assert "document" not in out["results"][0]
    sent = module_mock.last()
    assert sent["path"] == "/v1/rerank" and sent["body"]["model"] == "mock-rerank"
    assert sent["headers"]["authorization"] in ("Bearer key-a", "Bearer key-b")
    with_docs = rerank(
        gw, key, model="rerank-mock", query="holidays", documents=[{"text": d} for d in DOCS], return_documents=True
    ).json()
    assert with_docs["results"][0]["document"]["text"] == DOCS[2]
    gid = r.headers["x-request-id"]
    wait_until(lambda: ledger_rows(services[0], "request_id = $1", gid), timeout=15, what="ledger row")
    row = ledger_rows(services[0], "request_id = $1", gid)[0]
    assert row["endpoint"] == "rerank" and row["model"] == "rerank-mock" and row["prompt_tokens"] > 0


def test_rerank_input_is_checked(gw, key):
    cases = [
        ({"model": "gpt-mock", "query": "q", "documents": ["a"]}, 400, "model"),
        ({"model": "nope", "query": "q", "documents": ["a"]}, 404, "model"),
        ({"model": "rerank-mock", "query": "q"}, 400, "documents"),
        ({"model": "rerank-mock", "query": "", "documents": ["a"]}, 400, "query"),
        ({"model": "rerank-mock", "query": "q", "documents": ["a"] * 1001}, 400, "documents"),
        ({"model": "rerank-mock", "query": "q", "documents": [{"text": "a", "x": 1}]}, 400, "documents[0]"),
        ({"model": "rerank-mock", "query": "q", "documents": ["a"], "top_n": 0}, 400, "top_n"),
        ({"model": "rerank-mock", "query": "q", "documents": ["a"], "extra": 1}, 400, "extra"),
    ]
    for body, status, param in cases:
        r = rerank(gw, key, **body)
        assert r.status_code == status and r.json()["error"]["param"] == param, (body, r.text)
    # the chat endpoint refuses a rerank group
    r = httpx.post(
        f"{gw.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "rerank-mock", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    narrow = new_key(gw, models=["gpt-mock"])["key"]
    r = rerank(gw, narrow, model="rerank-mock", query="q", documents=["a"])
    assert r.status_code == 403
    assert rerank(gw, "sk-wrong", model="rerank-mock", query="q", documents=["a"]).status_code == 401


def test_knowledge_base_retrieval_reranks_through_the_gateway(gw, module_mock, services):
    kb = create_kb(gw, settings={"rerank_model": "rerank-mock"})
    assert kb["settings"]["rerank_model"] == "rerank-mock"
    doc = upload(gw, kb["id"], "returns.txt").json()
    assert wait_done(gw, kb["id"], doc["id"])["status"] == "ready"
    module_mock.clear()
    query = f"/admin/knowledge-bases/{kb['id']}/query"
    out = call(gw, "POST", query, json={"query": "How long do I have to return a product?"}).json()
    assert out["reranked"] and out["hits"][0]["rerank_score"] is not None, (out["notes"], out["rerank_error"])
    assert "rerank_ms" in out["timings_ms"]
    assert [q["path"] for q in module_mock.requests()] == ["/v1/rerank"]

    def audited() -> bool:
        return bool(ledger_rows(services[0], "endpoint = 'rerank' AND workflow = 'kb-query' AND tenant = 'default'"))

    wait_until(audited, timeout=15, what="kb-query rerank ledger row")
    # the setting is checked, and can be cleared
    bad = call(gw, "PATCH", f"/admin/knowledge-bases/{kb['id']}", json={"settings": {"rerank_model": "gpt-mock"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "settings.rerank_model"
    # a tenant admin whose key may not use the rerank group cannot make every search use it
    narrow = new_key(gw, tenant=f"rrn-{uuid.uuid4().hex[:6]}", scopes=["admin"], models=["gpt-mock"])["key"]
    r = call(
        gw, "POST", "/admin/knowledge-bases", narrow, json={"name": "n", "settings": {"rerank_model": "rerank-mock"}}
    )
    assert r.status_code == 403 and r.json()["error"]["param"] == "settings.rerank_model", r.text
    off = call(gw, "PATCH", f"/admin/knowledge-bases/{kb['id']}", json={"settings": {"rerank_model": None}})
    assert off.status_code == 200 and off.json()["settings"]["rerank_model"] is None
    again = call(gw, "POST", query, json={"query": "How long do I have to return a product?"})
    assert again.json()["hits"] and not again.json()["reranked"]


def test_an_agent_turn_reranks_its_knowledge_base_sources(gw, module_mock):
    kb = create_kb(gw, settings={"rerank_model": "rerank-mock"})
    doc = upload(gw, kb["id"], "returns.txt").json()
    assert wait_done(gw, kb["id"], doc["id"])["status"] == "ready"
    name = f"rr-{uuid.uuid4().hex[:6]}"
    body = {"name": name, "model": "gpt-mock", "template": "You answer questions.", "knowledge_bases": [kb["id"]]}
    r = call(gw, "POST", "/admin/agents", json=body)
    assert r.status_code == 201, r.text
    key = new_key(gw)["key"]
    module_mock.clear()
    r = httpx.post(
        f"{gw.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={
            "model": f"agent:{name}",
            "messages": [{"role": "user", "content": "How long do I have to return a product?"}],
        },
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["citations"]
    paths = [q["path"] for q in module_mock.requests()]
    assert paths[0] == "/v1/rerank" and "/v1/chat/completions" in paths, paths


def test_a_huge_rerank_request_is_reserved_against_a_hard_budget(gw, module_mock):
    """Budget bypass: the reservation counted chat messages and embeddings input only, so a
    rerank body (query + documents) reserved ~3 tokens and any size passed a hard budget. Here
    ~100k tokens at $0.001 a token cannot fit a $1 budget: refused before the upstream call."""
    made = new_key(gw, budget_usd=1.0, budget_period="daily")
    key = made["key"]
    small = rerank(gw, key, model="rerank-priced", query="refund", documents=DOCS)
    assert small.status_code == 200, small.text

    def spent() -> bool:  # the budget is in force on this gateway (a small request was charged to it)
        return call(gw, "GET", f"/admin/budgets/{made['budget_id']}").json()["spent_usd"] > 0

    wait_until(spent, timeout=15, what="the key's budget charged")
    module_mock.clear()
    r = rerank(gw, key, model="rerank-priced", query="refund", documents=["word " * 6000] * 10)
    assert r.status_code == 429 and r.json()["error"]["type"] == "insufficient_quota", (
        r.status_code,
        call(gw, "GET", f"/admin/budgets/{made['budget_id']}").text,
    )
    assert not [q for q in module_mock.requests() if q["path"] == "/v1/rerank"]
