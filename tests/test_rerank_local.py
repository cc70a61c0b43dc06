"""The local cross-encoder re-ranker (rag/rerank_local.py) against scores Hugging Face
transformers computed for the same tiny random model (tests/fixtures/make_cross_encoder.py made
both, with torch; this test needs neither), then served by a gateway process: ``POST /v1/rerank``
with the local model, and a knowledge base whose queries it re-ranks."""

from __future__ import annotations

import asyncio
import json
import shutil
import struct
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

from core.config import RagRerank
from rag.bert import ModelError, read_safetensors
from rag.rerank import RerankError
from rag.rerank_local import MAX_WAITING, CrossEncoder, LocalReranker, from_settings
from tests.conftest import ROOT, gateway_config, refused_start, wait_until
from tests.test_kb_api import call, create_kb, start_gateway, upload, wait_done
from tests.test_policies import ledger_rows, new_key

FIXTURE = ROOT / "tests" / "fixtures" / "cross-encoder-tiny"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
NAME = "local/cross-encoder-tiny"


def by_query() -> dict[str, list[tuple[int, str]]]:
    """The fixture's pairs grouped by query: (index into the expected scores, document)."""
    out: dict[str, list[tuple[int, str]]] = {}
    for i, (q, d) in enumerate(EXPECTED["pairs"]):
        out.setdefault(q, []).append((i, d))
    return out


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, offset, blobs = {}, 0, []
    for name, arr in tensors.items():
        raw = np.ascontiguousarray(arr).tobytes()
        dtype = {np.float32: "F32", np.float16: "F16"}[arr.dtype.type]
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def copy_fixture(tmp_path: Path, name: str = "ce") -> Path:
    folder = tmp_path / name
    shutil.copytree(FIXTURE, folder)
    return folder


def test_scores_match_transformers_reference_one_by_one_and_batched():
    model = CrossEncoder(FIXTURE)
    assert model.max_length == EXPECTED["max_length"] and model.activation == "sigmoid"
    expected = np.array(EXPECTED["scores"])
    singles = [model.score(q, [d])[0] for q, d in EXPECTED["pairs"]]
    np.testing.assert_allclose(singles, expected, atol=1e-4, rtol=0)
    model.batch_size = 2  # batches of mixed lengths: padding must not change a score
    for query, docs in by_query().items():
        scores = model.score(query, [d for _, d in docs])
        np.testing.assert_allclose(scores, expected[[i for i, _ in docs]], atol=1e-4, rtol=0)
    # truncation cases are in the fixture: pairs of exactly max_length tokens
    assert max(EXPECTED["tokens"]) == EXPECTED["max_length"]
    truncated = [i for i, n in enumerate(EXPECTED["tokens"]) if n == EXPECTED["max_length"]]
    assert len(truncated) >= 3


def test_unprefixed_weights_and_identity_activation_give_the_logits(tmp_path):
    folder = copy_fixture(tmp_path)
    weights = read_safetensors(folder / "model.safetensors")
    write_safetensors(folder / "model.safetensors", {k.removeprefix("bert."): v for k, v in weights.items()})
    config = json.loads((folder / "config.json").read_text())
    config["sbert_ce_default_activation_function"] = "torch.nn.modules.linear.Identity"
    (folder / "config.json").write_text(json.dumps(config))
    model = CrossEncoder(folder)
    assert model.activation == "identity"
    scores = [model.score(q, [d])[0] for q, d in EXPECTED["pairs"]]
    np.testing.assert_allclose(scores, EXPECTED["logits"], atol=1e-4, rtol=0)


def test_local_reranker_orders_cuts_to_top_n_and_bounds_documents():
    asyncio.run(_reranker_orders_bounds())


async def _reranker_orders_bounds() -> None:
    reranker = LocalReranker(FIXTURE, max_documents=4)
    try:
        assert reranker.name == NAME
        (query, docs), *_ = [(q, d) for q, d in by_query().items() if len(d) >= 4]
        texts = [d for _, d in docs[:4]]
        want = sorted(range(4), key=lambda j: -EXPECTED["scores"][docs[j][0]])
        ranked = await reranker.rerank(query, texts, 2)
        assert [i for i, _ in ranked] == want[:2]
        assert await reranker.rerank(query, [], 3) == []
        with pytest.raises(RerankError, match="at most 4 documents"):
            await reranker.rerank(query, [*texts, "x"], 5)
        reranker._waiting = MAX_WAITING  # the queue for the model's thread is full
        with pytest.raises(RerankError, match="busy"):
            await reranker.rerank(query, texts, 2)
        reranker._waiting = 0
        reranker.timeout_s = 1e-6
        with pytest.raises(RerankError, match="timed out"):
            await reranker.rerank(query, texts, 2)
        await asyncio.wrap_future(reranker._executor.submit(lambda: None))  # its place is held until it stops
        assert reranker._waiting == 0
    finally:
        reranker.close()


def test_unusable_folder_is_refused_with_its_reason(tmp_path):
    missing = copy_fixture(tmp_path, "missing")
    (missing / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match=r"tokenizer\.json not found"):
        LocalReranker(missing)
    two = copy_fixture(tmp_path, "two-labels")
    config = json.loads((two / "config.json").read_text())
    config["id2label"] = {"0": "a", "1": "b"}
    (two / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="2 labels"):
        LocalReranker(two)
    half = copy_fixture(tmp_path, "half")
    weights = read_safetensors(half / "model.safetensors")
    write_safetensors(half / "model.safetensors", {k: v.astype(np.float16) for k, v in weights.items()})
    with pytest.raises(ModelError, match="only F32"):
        LocalReranker(half)
    # not configured: off; configured by the environment: on
    assert from_settings(RagRerank(), environ={}) is None
    on = from_settings(RagRerank(name="mine"), environ={"GATEWAY_RERANK_MODEL_DIR": str(FIXTURE)})
    assert on is not None and on.name == "mine"
    on.close()
    with pytest.raises(ModelError, match="is a configured model group"):
        from_settings(RagRerank(local_model_dir=str(FIXTURE)), environ={}, taken=frozenset({NAME}))


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    cfg = gateway_config(module_mock, rag={"rerank": {"local_model_dir": str(FIXTURE), "max_documents": 50}})
    g = start_gateway(tmp_root, module_mock, services, config=cfg)
    yield g
    g.stop()


def test_v1_rerank_serves_the_local_model_in_reference_order(gw, services):
    key = new_key(gw, tenant=f"lr-{uuid.uuid4().hex[:6]}")["key"]
    query, docs = max(by_query().items(), key=lambda kv: len(kv[1]))
    texts = [d for _, d in docs]
    r = httpx.post(
        f"{gw.url}/v1/rerank",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": NAME, "query": query, "documents": texts, "return_documents": True, "top_n": 3},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    out = r.json()
    want = sorted(range(len(docs)), key=lambda j: -EXPECTED["scores"][docs[j][0]])
    assert [x["index"] for x in out["results"]] == want[:3]
    for x in out["results"]:
        assert abs(x["relevance_score"] - EXPECTED["scores"][docs[x["index"]][0]]) < 1e-4
        assert x["document"]["text"] == texts[x["index"]]
    assert out["meta"]["model"] == NAME
    gid = r.headers["x-request-id"]  # audited like any call: the model, the tokens, no cost
    wait_until(lambda: ledger_rows(services[0], "request_id = $1", gid), timeout=15, what="ledger row")
    row = ledger_rows(services[0], "request_id = $1", gid)[0]
    assert row["endpoint"] == "rerank" and row["model"] == NAME and row["prompt_tokens"] > 0
    listed = httpx.get(f"{gw.url}/v1/models", headers={"Authorization": f"Bearer {key}"}).json()["data"]
    assert NAME in {m["id"] for m in listed}
    one = httpx.get(f"{gw.url}/v1/models/{NAME}", headers={"Authorization": f"Bearer {key}"})
    assert one.status_code == 200 and one.json()["id"] == NAME
    too_many = httpx.post(
        f"{gw.url}/v1/rerank",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": NAME, "query": query, "documents": ["a"] * 51},
        timeout=30,
    )
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "documents"
    # a key limited to other models may not use it
    limited = new_key(gw, models=["gpt-mock"])["key"]
    r = httpx.post(
        f"{gw.url}/v1/rerank",
        headers={"Authorization": f"Bearer {limited}"},
        json={"model": NAME, "query": query, "documents": texts},
        timeout=30,
    )
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"


def test_knowledge_base_query_is_reranked_locally_with_its_latency(gw):
    kb = create_kb(gw, settings={"rerank_model": NAME})
    assert kb["settings"]["rerank_model"] == NAME
    texts = {
        "ship.txt": b"Shipping takes three to five business days within the country.",
        "refund.txt": b"Refunds are paid to the original card within ten days after we receive the parcel.",
        "office.txt": b"Our office is closed on public holidays and weekends.",
    }
    ids = [upload(gw, kb["id"], name, body).json()["id"] for name, body in texts.items()]
    for doc_id in ids:
        assert wait_done(gw, kb["id"], doc_id)["status"] == "ready"
    r = call(
        gw,
        "POST",
        f"/admin/knowledge-bases/{kb['id']}/query",
        json={"query": "can I get a refund", "threshold": 0, "top_k": 3},
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["reranked"] is True and out["rerank_error"] is None
    assert out["timings_ms"]["rerank_ms"] > 0
    scores = [h["rerank_score"] for h in out["hits"]]
    assert len(scores) == 3 and all(s is not None for s in scores) and scores == sorted(scores, reverse=True)
    # the model's own scores, outside the gateway, put the hits in the same order
    model = CrossEncoder(FIXTURE)
    direct = model.score("can I get a refund", [h["text"] for h in out["hits"]])
    np.testing.assert_allclose(direct, scores, atol=1e-5)
    # an unknown name is refused as before
    bad = call(gw, "POST", "/admin/knowledge-bases", json={"name": "z", "settings": {"rerank_model": "local/nope"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "settings.rerank_model"


def test_gateway_named_an_unusable_reranker_folder_refuses_to_start_with_the_reason(services, tmp_path):
    folder = copy_fixture(tmp_path, "broken")
    (folder / "model.safetensors").unlink()
    out = refused_start(tmp_path, {"rag": {"rerank": {"local_model_dir": str(folder)}}}, services, timeout=90)
    assert "model.safetensors not found" in out


def test_agent_turn_grounded_in_a_locally_reranked_knowledge_base(gw):
    """An agent's knowledge base naming the local re-ranker: the turn's sources come in the
    model's order (checked against the model run outside the gateway)."""
    from tests.test_agents_e2e import client, create_agent

    kb = create_kb(gw, settings={"rerank_model": NAME})
    texts = [
        "Refunds are paid back to the original card within ten days after we receive the parcel.",
        "Refunds for damaged items are paid to your account within five days.",
        "A refund to a gift card is paid at once; card refunds take a week.",
    ]
    ids = [upload(gw, kb["id"], f"{i}.txt", t.encode()).json()["id"] for i, t in enumerate(texts)]
    for doc_id in ids:
        assert wait_done(gw, kb["id"], doc_id)["status"] == "ready"
    agent = create_agent(gw, model="gpt-mock", knowledge_bases=[kb["id"]])
    question = "How are refunds paid back to my card account?"
    resp = client(gw, new_key(gw)["key"]).chat.completions.create(
        model=f"agent:{agent['name']}",
        messages=[{"role": "user", "content": question}],
        extra_body={"variables": {"company": "Acme"}},
    )
    cited = [c["document_id"] for c in resp.choices[0].message.model_extra["citations"]]
    scores = CrossEncoder(FIXTURE).score(question, texts)
    by_score = [ids[i] for i in sorted(range(3), key=lambda i: -scores[i])]
    assert len(cited) >= 2 and cited == [d for d in by_score if d in cited], (cited, by_score)
