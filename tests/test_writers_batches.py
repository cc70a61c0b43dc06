"""The memory and runs writers' batches (two round trips each, temporary tables made once per
connection): a batch PostgreSQL fails stays in the stream and is written later, a replayed one
inserts nothing twice, a run reads back as recorded (real Valkey and PostgreSQL)."""

from __future__ import annotations

import asyncio
import logging
import uuid

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from core.fastredis import PipelinedRedis
from core.stream_writer import StreamWriter
from gateway.db import migrate
from runtime import conversations
from runtime.runs import STAMP, WAITED, RunRecorder, _write_run_entries, bound_run, encode_run
from tests.test_runs import _run_record


async def _pool(services, size: int = 2) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(services[0], min_size=1, max_size=size)
    async with pool.acquire() as conn:
        await migrate(conn)
    return pool


def _turn(tenant: str, conv: str, seq: int) -> dict:
    record = {
        "tenant": tenant,
        "agent_id": "agt_w",
        "external_id": conv,
        "request_id": f"r{seq}",
        "prompt_version": 1,
        "variant": None,
        "ts": 1.7e9 + seq,
        "messages": [{"role": "user", "content": f"q{seq}"}, {"role": "assistant", "content": f"a{seq}"}],
    }
    return {"r": orjson.dumps(record), "s": str(seq)}


async def _held(pool, table: str, tenant: str) -> str:
    """A trigger that fails every insert of ``tenant``'s rows into ``table`` (the database failing
    the batch, not its data: SQLSTATE P0001); its name, for ``_release``."""
    name = f"held_{uuid.uuid4().hex[:10]}"
    await pool.execute(
        f"""CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN IF NEW.tenant = '{tenant}' THEN RAISE EXCEPTION 'held by the test'; END IF; RETURN NEW; END $$;
            CREATE TRIGGER {name} BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION {name}()"""
    )
    return name


async def _release(pool, table: str, name: str) -> None:
    await pool.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}; DROP FUNCTION IF EXISTS {name}()")


async def _until(check, what: str, within: float = 30.0):
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)


async def _failed(caplog) -> bool:
    return any(
        "write failed, will retry" in r.getMessage() and "held by the test" in r.getMessage() for r in caplog.records
    )


async def _emptied(redis, stream: str) -> bool:
    return await _waiting(redis, stream) == (0, 0)


async def _waiting(redis, stream: str) -> tuple[int, int]:
    return int(await redis.xlen(stream)), int((await redis.xpending(stream, "g"))["pending"])


@pytest.mark.parametrize("kind", ["memory", "runs"])
def test_a_batch_postgres_fails_stays_in_the_stream_is_written_later_and_a_replay_inserts_nothing(
    services, kind, caplog
):
    async def main():
        pool = await _pool(services)
        redis = aioredis.from_url(services[1])
        reader = PipelinedRedis(services[1], timeout=10)
        stream = f"test:{{gw}}:wb-{uuid.uuid4().hex[:8]}"
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        if kind == "memory":
            table, write, stamp = "messages", conversations.write_turns, None
            fields = [_turn(tenant, "conv", 2 * i + 1) for i in range(5)]
            count = "SELECT count(*) FROM messages WHERE tenant = $1"
        else:
            table, write, stamp = "runs", _write_run_entries, STAMP
            fields = [{"r": encode_run(_run_record(tenant)), WAITED: "0.010"} for _ in range(5)]
            count = "SELECT count(*) FROM runs WHERE tenant = $1"
        writer = StreamWriter(redis, pool, stream=stream, group="g", write=write, fast=reader, stamp=stamp, block_ms=50)
        trigger = await _held(pool, table, tenant)
        for f in fields:  # (all there before the writer's first read: one batch)
            await redis.xadd(stream, f)
        await writer.start()
        try:
            with caplog.at_level(logging.WARNING, logger="gateway.streams"):
                await _until(lambda: _failed(caplog), "the batch failed by the database")
                # nothing written, nothing acknowledged: every entry still in the stream, read (pending)
                assert await pool.fetchval(count, tenant) == 0
                assert await _waiting(redis, stream) == (5, 5)
            await _release(pool, table, trigger)
            expected = 10 if kind == "memory" else 5

            async def written():
                return await _waiting(redis, stream) == (0, 0) and await pool.fetchval(count, tenant) == expected

            await _until(written, "the batch written once the database takes it")
            if kind == "memory":
                assert await pool.fetchval("SELECT turns FROM conversations WHERE tenant = $1", tenant) == 5
            # the same entries again (a batch committed whose acknowledgement was lost): nothing twice
            for f in fields:
                await redis.xadd(stream, f)
            await _until(lambda: _emptied(redis, stream), "the replayed entries taken")
            await writer.drain()
            assert await pool.fetchval(count, tenant) == expected
            if kind == "memory":
                assert await pool.fetchval("SELECT turns FROM conversations WHERE tenant = $1", tenant) == 5
        finally:
            await writer.stop()
            await _release(pool, table, trigger)
            await redis.delete(stream)
            await redis.aclose()
            await pool.close()

    asyncio.run(main())


def test_a_refused_run_on_a_fresh_connection_is_a_dead_letter_and_the_others_are_written(services):
    """The batch's temporary table is made in its transaction, which the refused record rolls
    back, table and all: each record written alone then makes it again (none fails for want of it)."""

    async def main():
        pool = await _pool(services, size=1)
        async with pool.acquire() as conn:  # (a connection that never made the runs' table)
            assert not await conn.fetchval("SELECT to_regclass('pg_temp.runs_raw_t') IS NOT NULL")
        redis = aioredis.from_url(services[1])
        stream = f"test:{{gw}}:wb-{uuid.uuid4().hex[:8]}"
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        good = [_run_record(tenant) for _ in range(2)]
        bad = orjson.dumps({"request_id": f"req_{uuid.uuid4().hex}", "tenant": tenant, "status": "x", "steps": []})
        writer = StreamWriter(redis, pool, stream=stream, group="g", write=_write_run_entries, stamp=STAMP)
        await writer._ensure_group()
        try:
            for r in (encode_run(good[0]), bad, encode_run(good[1])):
                await redis.xadd(stream, {"r": r, WAITED: "0.000"})
            assert await writer.drain() == 3
            ids = {r["request_id"] for r in await pool.fetch("SELECT request_id FROM runs WHERE tenant = $1", tenant)}
            assert ids == {g["request_id"] for g in good}
            letters, _ = await writer.dead_letters()
            assert [(d["error"], orjson.loads(d["record"]["r"])["status"]) for d in letters] == [("22P02", "x")]
        finally:
            await redis.delete(stream, f"{stream}:dead")
            await redis.aclose()
            await pool.close()

    asyncio.run(main())


def test_a_temporary_table_gone_from_the_connection_fails_one_batch_and_is_made_again(services):
    async def main():
        pool = await _pool(services, size=1)
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        entries = [{k.encode(): v.encode() if isinstance(v, str) else v for k, v in _turn(tenant, "c", 1).items()}]
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conversations.write_turns(conn, entries)
            async with pool.acquire() as conn:
                await conn.execute("DROP TABLE pg_temp.memory_raw")
            with pytest.raises(asyncpg.UndefinedTableError):  # (the batch stays in the stream)
                async with pool.acquire() as conn, conn.transaction():
                    await conversations.write_turns(conn, [{**entries[0], b"s": b"3"}])
            async with pool.acquire() as conn, conn.transaction():
                await conversations.write_turns(conn, [{**entries[0], b"s": b"3"}])
            seqs = await pool.fetch("SELECT seq FROM messages WHERE tenant = $1 ORDER BY seq", tenant)
            assert [r["seq"] for r in seqs] == [1, 2, 3, 4]
        finally:
            await pool.close()

    asyncio.run(main())


def test_a_run_reads_back_as_it_was_recorded(services, monkeypatch):
    from runtime import runs as runs_module

    monkeypatch.setattr(runs_module, "RUNS_STREAM", f"gw:{{gw}}:runs-test-{uuid.uuid4().hex[:8]}")

    async def main():
        pool = await _pool(services)
        redis = aioredis.from_url(services[1])
        fast, reader = PipelinedRedis(services[1]), PipelinedRedis(services[1], timeout=10)
        runs = RunRecorder(pool, redis, fast=fast, reader=reader)
        await runs.start()
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        run = _run_record(
            tenant,
            confidence=0.625,
            confidence_reasons=["short", "nul\x00here"],
            escalation_id="esc_1",
            memory_error="store failed: \x00",
            ts=1.7e9 + 0.25,
        )
        run["steps"].append({"kind": "tool", "name": "a\x00b", "status": "é\u2028✓", "error": "x" * 500})
        try:
            runs.record(run)
            await runs.flush()
            got = await runs.get(tenant, run["request_id"])
        finally:
            await runs.stop()
            await fast.close()
            await redis.aclose()
            await pool.close()
        expected = orjson.loads(orjson.dumps(bound_run(run)).replace(b"\\u0000", b"\\ufffd"))
        assert got.pop("created_at") == expected.pop("ts")
        assert got.pop("confidence") == pytest.approx(expected.pop("confidence"))
        assert {k: got[k] for k in expected} == expected
        assert got["steps"][-1] == {"kind": "tool", "name": "a\ufffdb", "status": "é\u2028✓", "error": "x" * 200}

    asyncio.run(main())
