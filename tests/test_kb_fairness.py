"""Tenants take turns on the ingestion queue, through real gateway processes: a tenant's one
document is ready while a tenant that queued many before it still has most of them waiting,
and a tenant alone still has two documents processing at once. Ingestion is made slow by the
mock provider's latency (the knowledge bases embed with ``embed-mock``), and the documents are
queued by a gateway that consumes none, so what is compared is counts, never times. Upgrades:
jobs a previous release left on the plain queue (its stream, its retries, its dead letters) are
processed by the new release. (Its own module: no other gateway may consume meanwhile.)"""

from __future__ import annotations

import asyncio
import time
import uuid

import orjson
import pytest
import redis.asyncio as aioredis

from core.queue import Queue, _digest
from gateway.kb_worker import QUEUE, make_queue
from tests.conftest import wait_until
from tests.test_kb_api import call, create_kb, start_gateway, upload, wait_done

SLOW_MS = 400  # each embedding request of the mock provider


def own_queue(services) -> int:
    """The ingestion queue emptied for this module (modules on one xdist worker share its Redis:
    one that queued documents with no worker to consume them leaves jobs this module's worker
    would take, and a slot it holds is not this module's tenants'); the keys deleted."""

    async def go() -> int:
        r = aioredis.from_url(services[1])
        try:
            found = [k async for k in r.scan_iter(match=f"gw:{{gw}}:q:{QUEUE}*", count=1000)]
            return await r.delete(*found) if found else 0
        finally:
            await r.aclose()

    return asyncio.run(go())


@pytest.fixture(scope="module")
def uploader(tmp_root, services, module_mock):
    own_queue(services)
    g = start_gateway(tmp_root, module_mock, services, worker=False)
    yield g
    g.stop()


def _tenant_kb(gw, tenant: str) -> dict:
    return create_kb(gw, tenant=tenant, embedding_model="embed-mock")


def _statuses(gw, kb_id: str) -> list[str]:
    r = call(gw, "GET", f"/admin/knowledge-bases/{kb_id}/documents")
    assert r.status_code == 200, r.text
    return [d["status"] for d in r.json()["data"]]


def _doc(n: int) -> bytes:
    return f"Document {n} {uuid.uuid4().hex}: the returns desk opens at nine.\n".encode()


def _queue_idle(gw) -> bool:
    s = call(gw, "GET", f"/admin/queues/{QUEUE}").json()
    return s["depth"] == 0 and s["pending"] == 0 and s["delayed"] == 0


def test_a_tenants_one_document_is_not_stuck_behind_anothers_many(uploader, tmp_root, services, module_mock):
    many = 12
    a = _tenant_kb(uploader, f"fair-a-{uuid.uuid4().hex[:6]}")
    b = _tenant_kb(uploader, f"fair-b-{uuid.uuid4().hex[:6]}")
    module_mock.configure(ttft_ms=SLOW_MS)
    try:
        for n in range(many):
            assert upload(uploader, a["id"], f"a{n}.txt", _doc(n)).status_code == 202
        late = upload(uploader, b["id"], "b.txt", _doc(99)).json()  # queued after all of a's
        assert _statuses(uploader, a["id"]) == ["queued"] * many
        worker = start_gateway(tmp_root, module_mock, services)
        try:
            assert wait_done(uploader, b["id"], late["id"], timeout=60)["status"] == "ready"
            waiting = sum(s in ("queued", "processing") for s in _statuses(uploader, a["id"]))
            print(f"fairness: {waiting} of tenant A's {many} documents not yet processed when B's was ready")
            # Served in turn, b's document went with a's first: a's others still wait. (One FIFO
            # queue processed b's after every one of a's: at most one of them still processing.)
            assert waiting >= many - 3, waiting
            # a tenant alone still gets both workers: two of its documents processing at once
            wait_until(
                lambda: _statuses(uploader, a["id"]).count("processing") == 2, timeout=30, what="two in parallel"
            )
            wait_until(lambda: _statuses(uploader, a["id"]) == ["ready"] * many, timeout=60, what="all of a's")
            wait_until(lambda: _queue_idle(uploader), timeout=30, what="the queue idle")
        finally:
            worker.stop()
    finally:
        module_mock.configure(ttft_ms=0)


def _legacy(services) -> tuple[aioredis.Redis, Queue]:
    r = aioredis.from_url(services[1])
    return r, Queue(r, QUEUE)  # what the previous release built: a plain queue of the same name


async def _take_back(services, tenant: str) -> list[dict]:
    """The fair jobs of ``tenant`` the uploader queued, taken off the queue (as if never queued)."""
    r = aioredis.from_url(services[1])
    try:
        fair = make_queue(r)
        z, rounds, key = fair._waiting(_digest(f"tenant:{tenant}"))
        msgs = [orjson.loads(m[32:]) for m in await r.zrange(z, 0, -1)]  # after each sub-key's hash
        msgs += [orjson.loads(m) for m in await r.lrange(key, 0, -1)]
        await r.delete(z, rounds, key)  # its token, left in the stream, is dropped when read
        if msgs:
            await r.zrem(fair.live, *[m["id"] for m in msgs])
        return [m["payload"] for m in msgs]
    finally:
        await r.aclose()


async def _queue_as_the_previous_release(services, queued: dict, retrying: dict, dead: dict) -> None:
    r, old = _legacy(services)
    try:
        await old.enqueue(queued)  # on its stream
        now = time.time()
        msg = {"id": uuid.uuid4().hex, "payload": retrying, "key": None, "attempt": 2, "enqueued_at": now}
        await r.zadd(old.live, {msg["id"]: int(now * 1000)})
        await r.zadd(old.delayed, {orjson.dumps(msg): int(now * 1000)})  # waiting for its retry, due
        msg = {"id": uuid.uuid4().hex, "payload": dead, "key": None, "attempt": 3, "enqueued_at": now}
        await r.xadd(old.dead, {"m": orjson.dumps({**msg, "error": "RuntimeError: down"}), "failed_at": str(now)})
    finally:
        await r.aclose()


def test_jobs_the_previous_release_queued_are_processed(uploader, tmp_root, services, module_mock):
    tenant = f"fair-up-{uuid.uuid4().hex[:6]}"
    kb = _tenant_kb(uploader, tenant)
    docs = [upload(uploader, kb["id"], f"old{n}.txt", _doc(n)).json() for n in range(3)]
    payloads = {p["document_id"]: p for p in asyncio.run(_take_back(services, tenant))}
    assert set(payloads) == {d["id"] for d in docs}
    queued, retrying, dead = (payloads[d["id"]] for d in docs)
    asyncio.run(_queue_as_the_previous_release(services, queued, retrying, dead))
    stats = call(uploader, "GET", f"/admin/queues/{QUEUE}").json()
    assert stats["depth"] >= 1 and stats["delayed"] >= 1 and stats["dead_letters"] >= 1, stats
    worker = start_gateway(tmp_root, module_mock, services)
    try:
        for d in docs[:2]:
            assert wait_done(uploader, kb["id"], d["id"], timeout=60)["status"] == "ready"
        letters = call(uploader, "GET", f"/admin/queues/{QUEUE}/dead-letters?limit=1000").json()["data"]
        (letter,) = [x for x in letters if x["payload"]["document_id"] == docs[2]["id"]]
        r = call(uploader, "POST", f"/admin/queues/{QUEUE}/dead-letters/{letter['id']}/retry")
        assert r.status_code == 200 and r.json()["retried"]
        assert wait_done(uploader, kb["id"], docs[2]["id"], timeout=60)["status"] == "ready"
        wait_until(lambda: _queue_idle(uploader), timeout=30, what="the queue idle")
    finally:
        worker.stop()
