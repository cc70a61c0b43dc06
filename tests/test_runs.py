"""Agent run records: recorded off the request path, bounded, read back per tenant (real Valkey and PostgreSQL)."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest
import redis.asyncio as aioredis

from core.fastredis import PipelinedRedis
from gateway.db import migrate
from runtime.runs import MAX_BUFFER_BYTES, MAX_STEPS, MAX_TEXT, RunRecorder, bound_run, encode_run
from tests.conftest import free_port


def _run_record(tenant: str, **over) -> dict:
    run = {
        "request_id": f"req_{uuid.uuid4().hex}",
        "tenant": tenant,
        "agent": "support",
        "agent_id": "agt_1",
        "prompt_version": 7,
        "variant": "7",
        "conversation_id": "conv-1",
        "status": 200,
        "degraded": False,
        "escalated": True,
        "memory_error": None,
        "steps": [
            {
                "step": 1,
                "kind": "model",
                "name": "gpt-mock",
                "duration_ms": 12.5,
                "status": "ok",
                "deployment": "mock-openai/mock-gpt",
                "tokens": {"prompt_tokens": 10, "completion_tokens": 4},
            },
            {"step": 1, "kind": "tool", "name": "lookup", "arguments_bytes": 12, "result_bytes": 300, "status": "ok"},
            {"step": 2, "kind": "model", "name": "gpt-mock", "duration_ms": 8.0, "status": "ok", "tokens": 20},
        ],
        "latency_ms": 40.25,
    }
    run.update(over)
    return run


async def _pool(services) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(services[0], min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await migrate(conn)
    return pool


@pytest.fixture
def own_runs_stream(monkeypatch):
    """A runs stream of this test's own: the suite's gateways are consumers of the shared one, and
    a run recorded twice keeps its first record only within one consumer's batch."""
    from runtime import runs

    monkeypatch.setattr(runs, "RUNS_STREAM", f"gw:{{gw}}:runs-test-{uuid.uuid4().hex[:8]}")


def test_run_is_recorded_and_read_back(services, own_runs_stream):
    async def main():
        pool = await _pool(services)
        redis = aioredis.from_url(services[1])
        runs = RunRecorder(pool, redis)
        await runs.start()
        try:
            tenant = f"t-{uuid.uuid4().hex[:8]}"
            run = _run_record(tenant)
            runs.record(run)
            runs.record({**run, "status": 500})  # the same request id again: the first one stays
            await runs.flush()
            got = await runs.get(tenant, run["request_id"])
            assert got is not None
            for key in ("tenant", "agent", "agent_id", "prompt_version", "variant", "conversation_id", "escalated"):
                assert got[key] == run[key], key
            assert got["status"] == 200 and got["degraded"] is False and got["memory_error"] is None
            assert got["latency_ms"] == 40.25 and isinstance(got["created_at"], float)
            assert got["steps"] == run["steps"]
            count = await pool.fetchval("SELECT count(*) FROM runs WHERE request_id = $1", run["request_id"])
            assert count == 1
        finally:
            await runs.stop()
            await redis.aclose()
            await pool.close()

    asyncio.run(main())


def test_run_record_is_bounded():
    step = {"kind": "tool", "name": "n" * 10_000, "secret_field": "x", "tokens": "many"}
    steps = [{**step, "step": i} for i in range(500)]
    bounded = bound_run(_run_record("acme", steps=steps, memory_error="e" * 5000, latency_ms=float("nan")))
    assert len(bounded["steps"]) == MAX_STEPS + 1
    assert bounded["steps"][-1] == {"kind": "omitted", "count": 500 - MAX_STEPS}
    assert all(len(s.get("name", "")) <= MAX_TEXT and "secret_field" not in s for s in bounded["steps"])
    assert bounded["steps"][0]["tokens"] is None
    assert len(bounded["memory_error"]) == MAX_TEXT and bounded["latency_ms"] is None


def test_runs_are_tenant_isolated(services):
    async def main():
        pool = await _pool(services)
        redis = aioredis.from_url(services[1])
        runs = RunRecorder(pool, redis)
        await runs.start()
        try:
            mine, theirs = f"t-{uuid.uuid4().hex[:8]}", f"t-{uuid.uuid4().hex[:8]}"
            run = _run_record(mine)
            runs.record(run)
            await runs.flush()
            assert (await runs.get(mine, run["request_id"]))["tenant"] == mine
            assert await runs.get(theirs, run["request_id"]) is None
            assert (await runs.get(None, run["request_id"]))["tenant"] == mine  # the super-admin
            assert await runs.get(mine, "req_unknown") is None
        finally:
            await runs.stop()
            await redis.aclose()
            await pool.close()

    asyncio.run(main())


def test_runs_waiting_for_redis_are_bounded_in_bytes_not_only_in_count():
    """While Redis and PostgreSQL are away the recorder keeps runs in memory: 10,000 of them
    was the only bound, and a run of 64 steps with long names and arguments is ~16 KB
    encoded — ~160 MB held by one process. The newest runs within MAX_BUFFER_BYTES are kept."""
    step = {"kind": "tool", "name": "n" * 10_000, "arguments": "a" * 10_000, "status": "ok"}
    run = _run_record("acme", steps=[{**step, "step": i} for i in range(100)])
    size = len(encode_run(run))
    runs = RunRecorder(None, None)  # never started: nothing leaves the buffer
    n = MAX_BUFFER_BYTES // size * 3
    for _ in range(n):
        runs.record(run)
    kept = sum(len(encoded) for encoded, _ in runs._buffer)
    assert kept <= MAX_BUFFER_BYTES and kept == runs._buffered
    assert runs.dropped == n - len(runs._buffer) > 0


@pytest.mark.parametrize("pipelined", [False, True], ids=["redis-py", "fastredis"])
def test_runs_reach_postgres_when_redis_is_down(services, pipelined):
    async def main():
        pool = await _pool(services)
        nowhere = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
        redis = aioredis.from_url(nowhere)
        clients = {"fast": PipelinedRedis(nowhere), "reader": PipelinedRedis(nowhere)} if pipelined else {}
        runs = RunRecorder(pool, redis, **clients)
        await runs.start()
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        run = _run_record(tenant, memory_error="redis: ConnectionError")
        try:
            runs.record(run)
        finally:
            await runs.stop()  # the recorder writes what Redis could not take straight to PostgreSQL
            await redis.aclose()
        try:
            got = await RunRecorder(pool, redis).get(tenant, run["request_id"])
            assert got is not None and got["memory_error"] == "redis: ConnectionError"
        finally:
            await pool.close()

    asyncio.run(main())
