"""Attacks on the local cross-encoder re-ranker (rag/rerank_local.py, POST /v1/rerank with
``local/<name>``, and knowledge-base queries re-ranked by it): work that outlives its timeout,
one tenant holding the model's queue, bad input counted against a key, and documents tokenized
again on the event loop."""

from __future__ import annotations

import asyncio
import threading
import types
import uuid

import httpx
import pytest

from gateway import rerank
from rag.rerank import RerankError
from rag.rerank_local import MAX_WAITING_PER_OWNER, LocalReranker
from tests.test_policies import ledger_rows, new_key
from tests.test_rerank_local import FIXTURE, NAME, gw  # noqa: F401  (the gateway fixture)

LONG = "lorem ipsum dolor sit amet consectetur " * 800  # ~31,000 characters


async def _idle(reranker: LocalReranker) -> None:
    """Until the model's thread has finished whatever it was given before now."""
    await asyncio.wrap_future(reranker._executor.submit(lambda: None))


def test_attack_timed_out_local_rerank_stops_scoring():
    """A call far bigger than its timeout gets its 503; the model's thread must not go on
    scoring every one of its documents for nobody (16 such calls a minute would keep a core busy
    and every other tenant's re-ranks waiting behind them)."""

    async def go() -> None:
        reranker = LocalReranker(FIXTURE, batch_size=1, max_documents=200, timeout_s=0.02)
        batches = 0
        inner = reranker.model._batch

        def counted(query, documents):
            nonlocal batches
            batches += 1
            return inner(query, documents)

        reranker.model._batch = counted
        try:
            with pytest.raises(RerankError, match="timed out"):
                await reranker.rerank("which one", [f"{i} {LONG}" for i in range(200)], 3)
            await _idle(reranker)
            assert batches < 200, "the timed-out call was scored to the end"
            assert reranker._waiting == 0
        finally:
            reranker.close()

    asyncio.run(go())


def test_attack_one_tenant_cannot_fill_the_local_reranker_queue():
    """Tenant A's knowledge-base queries (or its /v1/rerank calls) hold at most
    MAX_WAITING_PER_OWNER places in the model's queue: tenant B's still get in."""

    async def go() -> None:
        reranker = LocalReranker(FIXTURE, timeout_s=5)
        svc = types.SimpleNamespace(local_reranker=reranker)
        gate = threading.Event()
        blocker = reranker._executor.submit(gate.wait)  # the model's thread is busy
        try:
            a = rerank.reranker_for(svc, NAME, "tenant-a")
            b = rerank.reranker_for(svc, NAME, "tenant-b")
            queued = [asyncio.ensure_future(a.rerank("q", ["one", "two"], 2)) for _ in range(MAX_WAITING_PER_OWNER)]
            await asyncio.sleep(0)  # they take their places
            with pytest.raises(RerankError, match="busy"):
                await a.rerank("q", ["one", "two"], 2)
            other = asyncio.ensure_future(b.rerank("q", ["one", "two"], 2))
            await asyncio.sleep(0)
            assert not other.done(), "tenant B was refused while tenant A filled the queue"
            gate.set()
            assert len(await other) == 2
            for job in queued:
                assert len(await job) == 2
        finally:
            gate.set()
            blocker.result()
            reranker.close()

    asyncio.run(go())


def test_attack_one_tenant_cannot_keep_the_local_model_thread_to_itself():
    """The model's thread takes tenants in turn: tenant B's call, made after tenant A queued three
    (each of which may take up to the timeout), runs after A's first, not after all of A's."""

    async def go() -> None:
        reranker = LocalReranker(FIXTURE, timeout_s=5)
        svc = types.SimpleNamespace(local_reranker=reranker)
        order: list[str] = []
        inner = reranker.model.score_counted

        def recorded(query, documents, cancelled=None):
            order.append(query)
            return inner(query, documents, cancelled)

        reranker.model.score_counted = recorded
        gate = threading.Event()
        blocker = reranker._executor.submit(gate.wait)  # the model's thread is busy
        try:
            a = rerank.reranker_for(svc, NAME, "tenant-a")
            b = rerank.reranker_for(svc, NAME, "tenant-b")
            calls = []
            for query, who in (("a1", a), ("a2", a), ("a3", a), ("b1", b)):
                calls.append(asyncio.ensure_future(who.rerank(query, ["one", "two"], 2)))
                await asyncio.sleep(0)  # queued in this order
            gate.set()
            for call in calls:
                await call
            assert order == ["a1", "b1", "a2", "a3"], order
        finally:
            gate.set()
            blocker.result()
            reranker.close()

    asyncio.run(go())


def test_attack_abandoned_queued_calls_let_go_of_their_documents():
    """Calls that time out while queued leave the queue at once (their documents, up to 8 MB a
    call, are not kept until the thread gets to them)."""

    async def go() -> None:
        reranker = LocalReranker(FIXTURE, timeout_s=0.05)
        gate = threading.Event()
        blocker = reranker._executor.submit(gate.wait)
        try:
            with pytest.raises(RerankError, match="timed out"):
                await reranker.rerank_counted("q", [LONG] * 10, 2, owner="tenant-a")
            assert "tenant-a" not in reranker._executor._queues
            assert reranker._waiting == 0  # its place is free too
        finally:
            gate.set()
            blocker.result()
            reranker.close()

    asyncio.run(go())


def test_attack_too_many_documents_for_the_local_model_do_not_count_against_the_key(gw):  # noqa: F811
    """More documents than the local model takes is bad input: refused before admission, it
    must not spend the key's requests per minute."""
    key = new_key(gw, tenant=f"lra-{uuid.uuid4().hex[:6]}", rpm=1)["key"]
    headers = {"Authorization": f"Bearer {key}"}
    bad = httpx.post(
        f"{gw.url}/v1/rerank", headers=headers, json={"model": NAME, "query": "q", "documents": ["a"] * 51}, timeout=30
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "documents"
    good = httpx.post(
        f"{gw.url}/v1/rerank", headers=headers, json={"model": NAME, "query": "q", "documents": ["a", "b"]}, timeout=30
    )
    assert good.status_code == 200, good.text


def test_attack_long_documents_are_not_tokenized_again_on_the_event_loop(gw, services):  # noqa: F811
    """Usage of a local re-rank is what the model read, counted on its thread: 50 documents of
    31,000 characters (a body may carry 8 MB of them) must not be run through
    tiktoken on the event loop after scoring (seconds during which the replica serves no one)."""
    key = new_key(gw, tenant=f"lrb-{uuid.uuid4().hex[:6]}")["key"]
    docs = [f"{i} {LONG}" for i in range(50)]
    r = httpx.post(
        f"{gw.url}/v1/rerank",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": NAME, "query": "which one", "documents": docs, "top_n": 1},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    gid = r.headers["x-request-id"]
    rows = []

    def found() -> bool:
        rows[:] = ledger_rows(services[0], "request_id = $1", gid)
        return bool(rows)

    from tests.conftest import wait_until

    wait_until(found, timeout=15, what="ledger row")
    tokens = rows[0]["prompt_tokens"]
    assert 0 < tokens <= 50 * 64, f"{tokens} tokens: the documents were tokenized again, untruncated"
