"""An erasure's time and the time of what it is compared with are one clock, Redis's:

- WhatsApp: the erasure's mark (``channels.whatsapp.erasure.mark_erased``) and a job's queue time
  (``core.queue.Job.queued_us``, stamped by the enqueue script and kept across retries and
  dead-letter retries) are Redis's time, whatever the webhook process's clock says.
- Runs and ledger: the writers compare the time a record reached Redis (its runs stream entry's
  id, the settle script's ``t``) less its latency with the erasure's time (Redis's), not the
  record's ``ts`` (the replica's clock); a record that never reached Redis falls back to ``ts``."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from channels.whatsapp import erasure as wa_erasure
from core import queue as queue_module
from gateway.db import migrate
from policies import ledger, scripts
from runtime import conversations
from runtime import runs as runs_module
from runtime.memory import Memory
from runtime.runs import RunRecorder

SKEW = 30.0  # seconds: how far the other process's clock is off


async def _drop_queue(r, q: queue_module.Queue) -> None:
    async for k in r.scan_iter(match=f"{q.stream}*"):
        await r.delete(k)


def test_a_message_queued_after_an_erasure_by_a_webhook_whose_clock_lags_is_kept(services, monkeypatch):
    tenant, conv = f"clk-{uuid.uuid4().hex[:6]}", f"wa:1066:44{uuid.uuid4().int % 10**10}"

    async def main():
        r = aioredis.from_url(services[1])
        q = queue_module.Queue(r, f"clk-{uuid.uuid4().hex[:8]}", ordered=True)
        got: list[bool] = []
        try:
            await wa_erasure.mark_erased(r, tenant, [conv])  # the erasure
            real = time.time
            monkeypatch.setattr(queue_module.time, "time", lambda: real() - SKEW)  # the webhook's, behind
            await q.enqueue({"conversation_id": conv, "text": "hello again"}, key=conv)
            monkeypatch.setattr(queue_module.time, "time", real)

            handled = asyncio.Event()

            async def handle(job: queue_module.Job) -> None:
                got.append(await wa_erasure.erased_since(r, tenant, conv, job.queued_us))
                handled.set()

            running = asyncio.create_task(q.run(handle, concurrency=1))
            await asyncio.wait_for(handled.wait(), 30)
            await q.stop()
            await running
        finally:
            await r.delete(wa_erasure.erased_key(tenant, conv))
            await _drop_queue(r, q)
            await r.aclose()
        # queued after the erasure: not the erased conversation's
        assert got == [False]

    asyncio.run(main())


@pytest.mark.parametrize("via", ["retry", "dead_letter_retry"])
def test_a_job_queued_before_an_erasure_is_still_before_it_when_retried_after(services, via):
    """A retried job keeps its first queue time (the stamp is not renewed when it goes back to the
    queue, from a failed attempt or from the dead letters): queued before the erasure, it is the
    erased conversation's however late it runs."""
    tenant, conv = f"clk-{uuid.uuid4().hex[:6]}", f"wa:1066:44{uuid.uuid4().int % 10**10}"

    async def main():
        r = aioredis.from_url(services[1])
        retries = 1 if via == "retry" else 0
        q = queue_module.Queue(r, f"clk-{uuid.uuid4().hex[:8]}", ordered=True, max_retries=retries, backoff_base=0)
        got: list[tuple[int, int, bool]] = []
        failed, handled = asyncio.Event(), asyncio.Event()
        try:

            async def handle(job: queue_module.Job) -> None:
                if not failed.is_set():
                    failed.set()
                    await wa_erasure.mark_erased(r, tenant, [conv])  # the erasure, while it fails
                    raise RuntimeError("the gateway is away")
                got.append((job.attempt, job.queued_us, await wa_erasure.erased_since(r, tenant, conv, job.queued_us)))
                handled.set()

            await q.enqueue({"conversation_id": conv, "text": "before the erasure"}, key=conv)
            first = queue_module._job(orjson.loads(await r.lindex(q._list_key(queue_module._digest(conv)), 0)))
            running = asyncio.create_task(q.run(handle, concurrency=1))
            if via == "dead_letter_retry":
                for _ in range(300):  # bounded: the failed attempt reaches the dead letters
                    if letters := await q.dead_letters():
                        break
                    await asyncio.sleep(0.05)
                assert len(letters) == 1
                assert await q.retry_dead(letters[0]["id"])
            await asyncio.wait_for(handled.wait(), 30)
            await q.stop()
            await running
        finally:
            await r.delete(wa_erasure.erased_key(tenant, conv))
            await _drop_queue(r, q)
            await r.aclose()
        assert first.redis_us is not None
        assert got == [(2 if via == "retry" else 1, first.queued_us, True)]

    asyncio.run(main())


async def _connect(services) -> tuple[asyncpg.Pool, object, str, str, str]:
    pool = await asyncpg.create_pool(services[0], min_size=1, max_size=2)
    r = aioredis.from_url(services[1])
    tenant, agent_id, conv = f"clk-{uuid.uuid4().hex[:6]}", f"agt_{uuid.uuid4().hex[:8]}", "wa:1066:4477"
    async with pool.acquire() as conn:
        await migrate(conn)
    return pool, r, tenant, agent_id, conv


async def _erase(pool: asyncpg.Pool, r, tenant: str, agent_id: str, conv: str) -> float:
    """The erasure's time (Redis's clock, as the route takes it) and its record."""
    _, at = await Memory(pool, r).forget_recent(tenant, agent_id, conv)
    async with pool.acquire() as conn, conn.transaction():
        await conversations.erase(conn, tenant, agent_id, conv, at)
    return at


async def _erased(services) -> tuple[asyncpg.Pool, object, str, str, str, float]:
    pool, r, tenant, agent_id, conv = await _connect(services)
    return pool, r, tenant, agent_id, conv, await _erase(pool, r, tenant, agent_id, conv)


def _run(tenant: str, agent_id: str, conv: str, ts: float, latency_ms: float) -> dict:
    return {"request_id": f"req_{uuid.uuid4().hex}", "tenant": tenant, "agent": "bot", "agent_id": agent_id,
            "conversation_id": conv, "status": 200, "steps": [], "latency_ms": latency_ms,
            "ts": ts}  # fmt: skip


async def _stored_ids(recorder, pool: asyncpg.Pool, runs: list[dict]) -> list:
    """The conversation id each run is stored with (its tag when erased), once the recorder wrote them."""
    for run in runs:
        recorder.record(run)
    await recorder.flush()
    sql = "SELECT conversation_id FROM runs WHERE request_id = $1"
    return [await pool.fetchval(sql, run["request_id"]) for run in runs]


def test_runs_are_compared_with_an_erasure_on_redis_clock(services, monkeypatch):
    """A turn begun a second before the erasure (on Redis's clock), recorded by a replica whose clock
    runs SKEW ahead, keeps the tag; a turn begun after it, on a replica SKEW behind, keeps its id."""

    stream = f"gw:{{gw}}:runs-clk-{uuid.uuid4().hex[:8]}"  # (the suite's gateways consume the shared one)
    monkeypatch.setattr(runs_module, "RUNS_STREAM", stream)

    async def main():
        pool, r, tenant, agent_id, conv, at = await _erased(services)
        recorder = RunRecorder(pool, r)
        await recorder.start()
        try:
            before = _run(tenant, agent_id, conv, at + SKEW, 1000.0)  # in flight when the erasure ran
            after = _run(tenant, agent_id, conv, at - SKEW, 0.0)  # begun after it (it reached Redis after)
            return await _stored_ids(recorder, pool, [before, after])
        finally:
            await recorder.stop()
            await r.delete(stream)
            await r.aclose()
            await pool.close()

    stored_before, stored_after = asyncio.run(main())
    assert stored_before is not None and stored_before != "wa:1066:4477"
    assert stored_after == "wa:1066:4477"


def test_a_run_that_waited_in_its_recorder_past_the_erasure_is_still_before_it(services, monkeypatch):
    """A turn answered before the erasure whose run waits in the recorder's buffer (Redis slow or
    away) and reaches the stream after the erasure: its end on Redis's clock is its entry's time less
    that wait, so it keeps the tag although its entry is younger than the erasure."""
    stream = f"gw:{{gw}}:runs-clk-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(runs_module, "RUNS_STREAM", stream)

    async def main():
        pool, r, tenant, agent_id, conv = await _connect(services)
        recorder = RunRecorder(pool, r)  # its flusher not started: the run waits in the buffer
        await recorder.writer.start()
        try:
            run = _run(tenant, agent_id, conv, time.time(), 5.0)
            recorder.record(run)  # the turn's end
            await _erase(pool, r, tenant, agent_id, conv)
            await recorder.flush()  # appended to the stream after the erasure, and written
            return await pool.fetchval("SELECT conversation_id FROM runs WHERE request_id = $1", run["request_id"])
        finally:
            await recorder.stop()
            await r.delete(stream)
            await r.aclose()
            await pool.close()

    stored = asyncio.run(main())
    assert stored is not None and stored != "wa:1066:4477"


def _ledger_record(tenant: str, conv: str, ts: float, latency_ms: float) -> dict:
    return {"request_id": f"req_{uuid.uuid4().hex}", "ts": ts, "tenant": tenant, "user": None, "customer": None,
            "endpoint": "chat", "model": "m", "status": 200, "conversation_id": conv, "latency_ms": latency_ms,
            "step": 1}  # fmt: skip


def test_ledger_records_are_compared_with_an_erasure_on_redis_clock(services):
    """As the runs: the settle script stamps the record with Redis's time, which its writer compares;
    a record without it (spooled while Redis was away) falls back to its ``ts``."""

    async def main():
        pool, r, tenant, _, conv, at = await _erased(services)
        stream = f"gw:{{gw}}:clk-ledger-{uuid.uuid4().hex[:8]}"
        try:
            before = _ledger_record(tenant, conv, at + SKEW, 1000.0)
            after = _ledger_record(tenant, conv, at - SKEW, 0.0)
            spooled = _ledger_record(tenant, conv, at + SKEW, 1000.0)  # no Redis time: its ts (after)
            for rec in (before, after):  # the settle of a call without budgets or token limits
                await r.eval(scripts.SETTLE, 0, int(time.time() * 1000), "m", 0, 0, stream, orjson.dumps(rec), "x")
            entries = [fields for _, fields in await r.xrange(stream)]
            assert all(b"t" in fields for fields in entries)
            async with pool.acquire() as conn, conn.transaction():
                await ledger._write_entries(conn, [*entries, {b"r": orjson.dumps(spooled)}])
            sql = "SELECT conversation_id FROM ledger WHERE request_id = $1"
            return [await pool.fetchval(sql, rec["request_id"]) for rec in (before, after, spooled)]
        finally:
            await r.delete(stream)
            await r.aclose()
            await pool.close()

    stored_before, stored_after, stored_spooled = asyncio.run(main())
    assert stored_before is not None and stored_before != "wa:1066:4477"
    assert stored_after == "wa:1066:4477"
    assert stored_spooled == "wa:1066:4477"  # (its ts says it began after the erasure)


def test_ledger_records_spilled_to_the_spool_keep_redis_time(services, tmp_path):
    """PostgreSQL away, the ledger's stream backs up and is spilled to the local spool; the
    conversation is erased once PostgreSQL is back, before the spool is replayed. The spilled
    records keep their settle time (``t``, Redis's): a call begun before the erasure on a replica
    whose clock runs SKEW ahead keeps the tag, not the clear id (spilled without ``t``, its ``ts``
    said it began after the erasure)."""
    from core.fastredis import PipelinedRedis

    async def main():
        pool, r, tenant, agent_id, conv = await _connect(services)
        away = await asyncpg.create_pool(services[0], min_size=1, max_size=1)
        await away.close()  # PostgreSQL "away"
        stream = f"gw:{{gw}}:clk-ledger-{uuid.uuid4().hex[:8]}"
        spool = ledger.Spool(tmp_path / "ledger-spool-1.jsonl")  # (pid 1: a live process, never an orphan)
        writer = ledger.LedgerWriter(r, PipelinedRedis(services[1], timeout=10), away, spool)
        writer.stream, writer._spill_after, writer._block_ms = stream, 4, 50
        recs = [_ledger_record(tenant, conv, time.time() + SKEW, 1000.0) for _ in range(12)]
        for rec in recs:  # settled before the erasure (Redis's clock); the replica's ts is ahead
            await r.eval(scripts.SETTLE, 0, int(time.time() * 1000), "m", 0, 0, stream, orjson.dumps(rec), "x")
        await writer.start()
        try:
            for _ in range(400):  # bounded: the backlog reaches the spool
                if spool.path.exists() and await r.xlen(stream) <= 4:
                    break
                await asyncio.sleep(0.05)
            assert spool.path.exists()
            await _erase(pool, r, tenant, agent_id, conv)
            writer._pool = pool  # PostgreSQL is back: the stream's rest and the spool are written
            sql = "SELECT conversation_id FROM ledger WHERE tenant = $1"
            for _ in range(800):  # bounded
                stored = [row[0] for row in await pool.fetch(sql, tenant)]
                if len(stored) == len(recs):
                    break
                await asyncio.sleep(0.05)
            return stored
        finally:
            await writer.stop()
            await r.delete(stream)
            await r.aclose()
            await pool.close()

    stored = asyncio.run(main())
    assert len(stored) == 12
    assert "wa:1066:4477" not in stored  # every record of the erased conversation keeps its tag


def test_a_message_queued_after_an_erasure_is_not_taken_into_the_erased_ones_burst(services, monkeypatch):
    """A conversation erased between the worker's look at a burst's head (queued before: not yet
    erased) and its read of the messages behind it, and a new message arriving in between: the
    head is the erased conversation's, the new message the new conversation's first. The new
    message must not ride in the erased head's burst, which the turn drops whole (``_erased_under_way``
    compares the head's queue time): it is answered on its own."""
    from channels.config import WhatsAppAccount
    from channels.whatsapp.worker import Worker, conversation_key

    tenant, pnid, wa_id = f"clk-{uuid.uuid4().hex[:6]}", "1066", f"44{uuid.uuid4().int % 10**10}"
    conv, key = f"wa:{pnid}:{wa_id}", conversation_key("acme", pnid, wa_id)
    acct = WhatsAppAccount(
        tenant=tenant, agent="bot", app_secret="s" * 8, verify_token="v" * 8, access_token="a" * 8,
        api_key="k" * 8, debounce=0.2, debounce_max_wait=1,
    )  # fmt: skip

    def message(text: str) -> dict:
        return {"kind": "in", "account": "acme", "pnid": pnid, "wa_id": wa_id, "wamid": uuid.uuid4().hex, "text": text}

    async def main():
        r = aioredis.from_url(services[1])
        q = queue_module.Queue(r, f"clk-{uuid.uuid4().hex[:8]}", ordered=True)
        none = dict.fromkeys(("sender", "graph", "media", "gateway"))  # (the stubbed turn uses none of them)
        worker = Worker({"acme": acct}, pool=None, inbound=q, redis=r, **none)
        turns: list[list[str]] = []
        done = asyncio.Event()

        async def turn(_acct, messages: list[dict], _queued_us=None) -> int:  # (the turn: what it answers)
            turns.append([m["text"] for m in messages])
            if any(m["text"] == "new" for m in messages):
                done.set()
            return len(messages)

        real_following, raced = q.following, []

        async def following(job, limit=20):
            if not raced:  # the erasure, and the new conversation's first message, come now
                raced.append(True)
                await wa_erasure.mark_erased(r, tenant, [conv])
                await q.enqueue(message("new"), key=key)
            return await real_following(job, limit)

        monkeypatch.setattr(worker, "_turn", turn)
        monkeypatch.setattr(q, "following", following)
        real = time.time
        monkeypatch.setattr(queue_module.time, "time", lambda: real() - SKEW)  # the head waited past max wait
        await q.enqueue(message("old"), key=key)
        monkeypatch.setattr(queue_module.time, "time", real)
        running = asyncio.create_task(q.run(worker.handle, concurrency=1))
        try:
            await asyncio.wait_for(done.wait(), 30)
        finally:
            await q.stop()
            await running
            await r.delete(wa_erasure.erased_key(tenant, conv))
            await _drop_queue(r, q)
            await r.aclose()
        return turns

    assert asyncio.run(main()) == [["new"]]


def test_attack_a_payload_naming_redis_us_does_not_choose_its_jobs_queue_time(services):
    """A webhook sender's (or a tenant's) payload holding ``redis_us`` stays the payload's: the
    queue time that decides "queued before the erasure" is the envelope's, stamped by Redis."""

    async def main():
        r = aioredis.from_url(services[1])
        q = queue_module.Queue(r, f"clk-{uuid.uuid4().hex[:8]}", ordered=True)
        try:
            (now_s, now_us) = await r.time()
            await q.enqueue({"redis_us": 0, "text": "x"}, key="k")
            raw = await r.lindex(q._list_key(queue_module._digest("k")), 0)
            return now_s * 1_000_000 + now_us, raw, queue_module._job(orjson.loads(raw))
        finally:
            await _drop_queue(r, q)
            await r.aclose()

    before, raw, job = asyncio.run(main())
    assert raw.count(b'"redis_us"') == 2  # the payload's, nested, and the envelope's
    assert job.payload == {"redis_us": 0, "text": "x"}
    assert job.queued_us == job.redis_us >= before
