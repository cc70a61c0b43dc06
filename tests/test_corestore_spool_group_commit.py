"""A Redis outage fails every request's settle, and each request's audit record (with its
settlement) is spooled to local disk before the client hears its answer. The spooling used to
fsync on the event loop, once per request: every request of the replica stalled behind each
other's disk flush. The fsync runs in a worker thread, and the settles that fail together share
one (group commit); every settlement is still applied once Redis is back (real Valkey and
PostgreSQL; the outage is a port nobody listens on)."""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace

from core.fastredis import PipelinedRedis
from core.types import Usage
from gateway import pipeline
from policies.budgets import NANO
from policies.ledger import LedgerWriter, Spool
from tests.test_admission_credit_attacks import Replica, _closed_port, _priced_route, hard_budget, stores

N = 8
OUTPUT_TOKENS = 300


def test_settles_failing_together_share_one_fsync_off_the_event_loop_and_all_are_replayed(
    services, tmp_path, monkeypatch
):
    budget = hard_budget(100)
    spent_key, reserved_key, _, _ = budget.keys()
    spool = Spool(tmp_path / f"ledger-spool-{uuid.uuid4().hex[:6]}-1.jsonl")
    all_spooled = threading.Event()
    syncs: list[int] = []  # the thread of each fsync of the spool's files
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if Path(os.readlink(f"/proc/self/fd/{fd}")).is_relative_to(tmp_path):
            syncs.append(threading.get_ident())
            if len(syncs) == 1:  # the first flush waits until every settle has failed (or a bound)
                all_spooled.wait(timeout=10)
        real_fsync(fd)

    async def run():
        pool, redis = await stores(services)
        a = Replica(services[1], budget, policies={"local_admission": False})
        await a.start()
        ctxs = [await a.admit() for _ in range(N)]
        assert int(await redis.get(reserved_key)) == N * 1000 * NANO // 1_000_000
        for ctx in ctxs:
            ctx.route, ctx.usage, ctx.status = _priced_route(), Usage(0, OUTPUT_TOKENS), 200
            ctx.extra["attribution"] = ctx.extra["attr"]
        engine = a.engine
        spooled = 0

        def counted(*args):
            nonlocal spooled
            spooled += 1
            if spooled == N:
                all_spooled.set()
            return engine.spooled(*args)

        svc = SimpleNamespace(
            config=SimpleNamespace(policies=SimpleNamespace(enabled=True)),
            policies=SimpleNamespace(settle=engine.settle, spooled=counted),
            ledger=SimpleNamespace(spool=spool),
        )
        live = engine._redis
        engine._redis = PipelinedRedis(f"redis://127.0.0.1:{_closed_port()}", timeout=0.5)  # Redis away
        monkeypatch.setattr(os, "fsync", fsync)
        loop_thread = threading.get_ident()
        try:
            await asyncio.gather(*(pipeline.settle(svc, ctx, {"headers": []}) for ctx in ctxs))
        finally:
            monkeypatch.setattr(os, "fsync", real_fsync)
            engine._redis = live
        assert spool.path.read_bytes().count(b"\n") == N  # each record on disk once settle returned
        # Redis is back: the writer's maintenance replays the spool
        await LedgerWriter(redis, PipelinedRedis(services[1]), pool, spool)._replay()
        spent, reserved = int(await redis.get(spent_key) or 0), int(await redis.get(reserved_key) or 0)
        rows = await pool.fetchval(
            "SELECT count(*) FROM ledger WHERE request_id = ANY($1)", [c.request_id for c in ctxs]
        )
        await engine.close()
        await redis.aclose()
        await pool.close()
        return loop_thread, spent, reserved, rows

    loop_thread, spent, reserved, rows = asyncio.run(run())
    assert syncs and loop_thread not in syncs, "the spool's fsync ran on the event loop"
    assert len(syncs) < N, f"{len(syncs)} fsyncs for {N} settles"
    assert spent == N * OUTPUT_TOKENS * NANO // 1_000_000 and reserved == 0
    assert rows == N


def test_a_record_added_while_a_replay_claims_the_spool_is_written(services, tmp_path):
    """The claim of the spool for a replay (a rename) and an append in a worker thread are one
    after the other: a record is in the file the replay took, or in the next one."""

    async def run():
        pool, redis = await stores(services)
        spool = Spool(tmp_path / "ledger-spool-1.jsonl")
        import orjson

        from tests.test_ledger_write import _record

        recs = [_record(tenant=f"t-{uuid.uuid4().hex[:8]}") for _ in range(40)]
        writer = LedgerWriter(redis, PipelinedRedis(services[1]), pool, spool)
        adds = [asyncio.ensure_future(spool.add(orjson.dumps(r))) for r in recs[:20]]
        replay = asyncio.ensure_future(writer._replay())
        adds += [asyncio.ensure_future(spool.add(orjson.dumps(r))) for r in recs[20:]]
        await asyncio.gather(*adds, replay)
        await writer._replay()
        n = await pool.fetchval(
            "SELECT count(*) FROM ledger WHERE request_id = ANY($1)", [r["request_id"] for r in recs]
        )
        await redis.aclose()
        await pool.close()
        return n

    assert asyncio.run(run()) == 40
