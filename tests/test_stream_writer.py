"""The stream writers of runs and memory over either Redis client: redis-py, or the pipelined
hiredis client (core.fastredis) that takes redis-py off their per-turn path (real Valkey and
PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import asyncpg
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core.fastredis import PipelinedRedis
from core.stream_writer import StreamWriter
from gateway.db import migrate
from runtime import conversations
from runtime.memory import Memory
from runtime.runs import RunRecorder
from runtime.types import Agent, MemorySettings
from tests.test_runs import _run_record

CLIENTS = ["redis-py", "fastredis"]


async def _until(check, what: str, within: float = 20.0):
    deadline = asyncio.get_running_loop().time() + within
    while not (result := await check()):
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)
    return result


def _reader(client: str, url: str, **kw) -> PipelinedRedis | None:
    return PipelinedRedis(url, **{"timeout": 10, **kw}) if client == "fastredis" else None


def _writer(redis, pool, client: str, url: str, stream: str, write, **kw) -> StreamWriter:
    return StreamWriter(redis, pool, stream=stream, group="g", write=write, fast=_reader(client, url), **kw)


@contextlib.asynccontextmanager
async def _running(services, redis, client: str, stream: str, write, **kw):
    """A started writer over the stream (its own pool), stopped on the way out."""
    async with asyncpg.create_pool(services[0], min_size=1, max_size=2) as pool:
        writer = _writer(redis, pool, client, services[1], stream, write, **kw)
        await writer.start()
        try:
            yield writer
        finally:
            await writer.stop()


async def _empty(redis, stream: str) -> bool:
    return await redis.xlen(stream) == 0 and (await redis.xpending(stream, "g"))["pending"] == 0


@pytest.mark.parametrize("client", CLIENTS)
def test_own_pending_entries_are_rewritten_after_a_failed_write_and_a_deleted_one_is_skipped(services, client):
    async def main():
        stream = f"test:{{gw}}:sw-{uuid.uuid4().hex[:8]}"
        redis = aioredis.from_url(services[1])
        ids = [await redis.xadd(stream, {"n": str(i)}) for i in range(3)]
        calls: list[list[dict]] = []

        async def write(conn, entries):
            calls.append(entries)
            if len(calls) == 1:  # the database fails this batch; meanwhile one of its entries is deleted
                await redis.xdel(stream, ids[1])
                raise OSError("database away")

        async with _running(services, redis, client, stream, write):
            await _until(lambda: _empty(redis, stream), "stream written, acknowledged and emptied")
        assert calls == [[{b"n": b"0"}, {b"n": b"1"}, {b"n": b"2"}], [{b"n": b"0"}, {b"n": b"2"}]]
        await redis.delete(stream)
        await redis.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("client", CLIENTS)
def test_entries_of_a_killed_consumer_are_claimed_written_and_deleted(services, client):
    async def main():
        stream = f"test:{{gw}}:sw-{uuid.uuid4().hex[:8]}"
        redis = aioredis.from_url(services[1])
        await redis.xgroup_create(stream, "g", id="0", mkstream=True)
        for i in range(5):
            await redis.xadd(stream, {"n": str(i)})
        # a consumer reads them and dies (SIGKILL) before writing them
        await redis.xreadgroup("g", "dead-consumer", {stream: ">"}, count=100)
        written: list[dict] = []

        async def write(conn, entries):
            written.extend(entries)

        async with asyncpg.create_pool(services[0], min_size=1, max_size=2) as pool:
            # claims come after 20 idle reads: short ones
            writer = _writer(redis, pool, client, services[1], stream, write, claim_idle=0.0, batch=2, block_ms=50)
            await writer.start()
            try:
                await _until(lambda: _empty(redis, stream), "claimed entries written and deleted")
            finally:
                await writer.stop()
        assert sorted(e[b"n"] for e in written) == [b"0", b"1", b"2", b"3", b"4"]
        consumers = await redis.xinfo_consumers(stream, "g")
        assert [c["pending"] for c in consumers if c["name"] == b"dead-consumer"] == [0]
        await redis.delete(stream)
        await redis.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("client", CLIENTS)
def test_the_writer_recreates_its_group_when_redis_lost_it(services, client):
    async def main():
        stream = f"test:{{gw}}:sw-{uuid.uuid4().hex[:8]}"
        redis = aioredis.from_url(services[1])
        written: list[dict] = []

        async def write(conn, entries):
            written.extend(entries)

        async with _running(services, redis, client, stream, write, block_ms=100):
            await redis.xadd(stream, {"n": "before"})
            await _until(lambda: _empty(redis, stream), "the first entry written")
            await redis.delete(stream)  # a restart without persistence: stream and group gone
            await redis.xadd(stream, {"n": "after"})  # appended again, to a stream with no group
            await _until(lambda: _empty(redis, stream), "the group recreated and the entry written")
        assert written == [{b"n": b"before"}, {b"n": b"after"}]
        await redis.delete(stream)
        await redis.aclose()

    asyncio.run(main())


def test_a_blocking_read_outlasts_a_shorter_connection_timeout_and_stop_closes_the_connection(services, caplog):
    async def main():
        stream = f"test:{{gw}}:sw-{uuid.uuid4().hex[:8]}"
        redis = aioredis.from_url(services[1])
        fast = PipelinedRedis(services[1], timeout=0.2)  # shorter than the 500 ms wait of a read
        connection = await fast.execute("CLIENT", "ID")

        async def write(conn, entries):
            return None

        async with asyncpg.create_pool(services[0], min_size=1, max_size=2) as pool:
            writer = StreamWriter(redis, pool, stream=stream, group="g", write=write, fast=fast, block_ms=500)
            with caplog.at_level(logging.WARNING, logger="gateway.streams"):
                await writer.start()
                await asyncio.sleep(1.2)  # two reads waited out on an empty stream
                await writer.stop()
        assert not [r for r in caplog.records if "failed" in r.getMessage()]
        # the writer's connection is closed once its last batch is written
        await _until(lambda: _gone(redis, connection), "the writer's connection closed")
        await redis.delete(stream)
        await redis.aclose()

    async def _gone(redis, connection: int) -> bool:
        return not (await redis.execute_command("CLIENT", "LIST", "ID", connection)).strip()

    asyncio.run(main())


def test_stop_ends_the_blocking_read_and_still_writes_and_leaves_the_group(services, caplog):
    """A read that would wait ten minutes for an entry: stop() does not wait it out (nor its own
    grace, then the read still holding the connection): the entry written before, the final
    drain without failure, and the writer's consumer gone from the group."""

    async def main():
        stream = f"test:{{gw}}:sw-{uuid.uuid4().hex[:8]}"
        redis = aioredis.from_url(services[1])
        written: list[dict] = []

        async def write(conn, entries):
            written.extend(entries)

        fast = PipelinedRedis(services[1], timeout=10)
        connection = await fast.execute("CLIENT", "ID")
        async with asyncpg.create_pool(services[0], min_size=1, max_size=2) as pool:
            writer = StreamWriter(redis, pool, stream=stream, group="g", write=write, fast=fast, block_ms=600_000)
            with caplog.at_level(logging.WARNING, logger="gateway.streams"):
                await writer.start()
                await redis.xadd(stream, {"n": "1"})
                await _until(lambda: _empty(redis, stream), "the entry written")
                await _until(lambda: _blocked_read(redis, connection), "the writer waiting in its blocking read")
                await asyncio.wait_for(writer.stop(grace=300), 120)
        assert written == [{b"n": b"1"}]
        assert not [r for r in caplog.records if "failed" in r.getMessage()]
        assert await redis.xinfo_consumers(stream, "g") == []
        await redis.delete(stream)
        await redis.aclose()

    async def _blocked_read(redis, connection: int) -> bool:
        fields = dict(
            f.split("=", 1) for f in (await redis.execute_command("CLIENT", "LIST", "ID", connection)).decode().split()
        )
        return fields.get("cmd") == "xreadgroup" and "b" in fields.get("flags", "")  # b: blocked

    asyncio.run(main())


async def _pool(services) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(services[0], min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await migrate(conn)
    return pool


def test_runs_recorded_over_the_pipelined_clients_go_through_the_stream_to_postgres(services, caplog, monkeypatch):
    from runtime import runs as runs_module

    # a stream of its own: the suite's gateways consume the shared one, and a run recorded twice
    # keeps its first record only within one consumer's batch
    monkeypatch.setattr(runs_module, "RUNS_STREAM", f"gw:{{gw}}:runs-test-{uuid.uuid4().hex[:8]}")

    async def main():
        pool = await _pool(services)
        redis = aioredis.from_url(services[1])
        fast = PipelinedRedis(services[1])
        runs = RunRecorder(pool, redis, fast=fast, reader=PipelinedRedis(services[1], timeout=10))
        await runs.start()
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        recorded = [_run_record(tenant) for _ in range(3)]
        try:
            for run in recorded:
                runs.record(run)
            runs.record({**recorded[0], "status": 500})  # the same request id again: the first one stays
            with caplog.at_level(logging.WARNING, logger="gateway.runs"):
                await runs.flush()
            assert not caplog.records  # appended to the stream, not written around it
            for run in recorded:
                got = await runs.get(tenant, run["request_id"])
                assert got is not None and got["status"] == 200 and got["steps"] == run["steps"]
            assert await pool.fetchval("SELECT count(*) FROM runs WHERE tenant = $1", tenant) == 3
        finally:
            await runs.stop()
            await fast.close()  # the shared client is the caller's to close
            await redis.aclose()
            await pool.close()

    asyncio.run(main())


def test_memory_turns_reach_postgres_over_the_writers_own_connection(services):
    async def main():
        pool = await _pool(services)
        redis = aioredis.from_url(services[1])
        fast = PipelinedRedis(services[1])
        memory = Memory(pool, redis, fast=fast, reader=PipelinedRedis(services[1], timeout=10))
        await memory.start()
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        agent = Agent(id=f"agt_{uuid.uuid4().hex[:12]}", tenant=tenant, name="a", model="m", memory=MemorySettings())
        turns = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(3)]
        try:
            for i, turn in enumerate(turns):
                await memory.append(tenant, agent, "conv", turn, request_id=f"r{i}", prompt_version=1, variant=None)
            await memory.flush()
            stored = [m for turn in turns for m in turn]

            async def written():
                history = await conversations.history(pool, tenant, agent.id, "conv", 100)
                return [h["message"] for h in history] == stored

            await _until(written, "the turns in PostgreSQL")
        finally:
            await memory.stop()
            await fast.close()  # (closed by memory.stop already: a second close does nothing)
            await redis.aclose()
            await pool.close()

    asyncio.run(main())


# --- PipelinedRedis.execute_many ---------------------------------------------------------------


def test_execute_many_answers_in_order_and_raises_the_first_error_after_every_command_ran(services):
    async def main():
        key = f"test:em-{uuid.uuid4().hex[:8]}"
        fast = PipelinedRedis(services[1])
        try:
            assert await fast.execute_many([("INCR", key), ("INCRBY", key, 5), ("GET", key)]) == [1, 6, b"6"]
            with pytest.raises(ResponseError):
                await fast.execute_many([("INCR", key), ("HGET", key, "f"), ("INCR", key)])  # a wrong type
            assert await fast.execute("GET", key) == b"8"  # the commands after the error ran too
            assert await fast.execute_many([]) == []
        finally:
            await fast.execute("DEL", key)
            await fast.close()

    asyncio.run(main())


def test_execute_many_times_out_and_the_client_answers_again_afterwards(services):
    async def main():
        fast = PipelinedRedis(services[1], timeout=5)
        try:
            with pytest.raises(RedisTimeoutError):
                await fast.execute_many([("PING",), ("BLPOP", f"test:none-{uuid.uuid4().hex}", 2)], limit_s=0.2)
            assert await _until(lambda: _pong(fast), "a fresh connection") == b"PONG"
        finally:
            await fast.close()

    async def _pong(fast):
        try:
            return await fast.execute("PING")
        except Exception:
            return None

    asyncio.run(main())


MB = 1024 * 1024


def _sizes(batch: list[dict]) -> int:
    return sum(len(v) for fields in batch for v in fields.values())


@pytest.mark.parametrize("client", CLIENTS)
def test_a_batch_is_bounded_in_bytes_however_large_its_entries(services, client):
    """Entries are the callers' to size (a turn's messages, a prompt in an audit record): 12 of
    1 MB must not come back as one read of 12 MB when the budget is 3 MB — neither new entries,
    nor own pending ones read again after a failed write, nor a dead consumer's, claimed."""

    async def main():
        stream = f"test:{{gw}}:sw-{uuid.uuid4().hex[:8]}"
        redis = aioredis.from_url(services[1])
        await redis.xgroup_create(stream, "g", id="0", mkstream=True)
        for i in range(12):
            await redis.xadd(stream, {"n": str(i), "blob": bytes([65 + i]) * MB})
        await redis.xreadgroup("g", "dead-consumer", {stream: ">"}, count=4)  # read, then SIGKILLed
        batches: list[list[dict]] = []

        async def write(conn, entries):
            batches.append(entries)
            if len(batches) == 1:
                raise OSError("database away")  # this batch is read again, from the writer's own pending

        async with _running(
                services, redis, client, stream, write,
                max_batch_bytes=3 * MB, claim_idle=0.0, block_ms=50,
            ):  # fmt: skip
            await _until(lambda: _empty(redis, stream), "every entry written, acknowledged and deleted", 30)
        # pending and claimed entries: at most the budget plus the entry that crossed it
        assert max(_sizes(b) for b in batches) <= 4 * MB + 64, [len(b) for b in batches]
        assert sorted(int(e[b"n"]) for b in batches[1:] for e in b) == list(range(12))
        await redis.delete(stream)
        await redis.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("client", CLIENTS)
def test_large_entries_after_small_ones_never_take_a_batch_past_its_budget(services, client):
    async def main():
        stream = f"test:{{gw}}:sw-{uuid.uuid4().hex[:8]}"
        redis = aioredis.from_url(services[1])
        for i in range(40):
            await redis.xadd(stream, {"n": str(i), "blob": b"s" * 100})
        for i in range(40, 60):
            await redis.xadd(stream, {"n": str(i), "blob": b"L" * MB})
        batches: list[list[dict]] = []

        async def write(conn, entries):
            batches.append(entries)

        async with _running(services, redis, client, stream, write, max_batch_bytes=2 * MB):
            await _until(lambda: _empty(redis, stream), "every entry written", 30)
        assert max(_sizes(b) for b in batches) <= 2 * MB  # entries are sized before they are taken
        assert sorted(int(e[b"n"]) for b in batches for e in b) == list(range(60))
        await redis.delete(stream)
        await redis.aclose()

    asyncio.run(main())


def test_an_audit_record_postgres_refuses_goes_to_the_dead_letters_and_the_ledger_goes_on(services, tmp_path):
    """A record the ledger table cannot take (a count beyond its int4) used to fail its whole
    batch, read again and again: no record after it ever reached PostgreSQL."""
    from policies.ledger import LedgerWriter, Spool
    from tests.test_ledger_write import _record

    async def main():
        pool = await _pool(services)
        redis = aioredis.from_url(services[1])
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        good = [_record(tenant=tenant) for _ in range(3)]
        bad = _record(tenant=tenant, prompt_tokens=2**40, content=[{"role": "user", "content": "my secret"}])
        ledger = LedgerWriter(redis, PipelinedRedis(services[1], timeout=10), pool, Spool(tmp_path / "spool.jsonl"))
        ledger.stream = stream = f"test:{{gw}}:ledger-{uuid.uuid4().hex[:8]}"  # (gateways read the real one)
        await ledger.start()
        try:
            import orjson

            for rec in (good[0], bad, *good[1:]):
                await redis.xadd(stream, {"r": orjson.dumps(rec)})

            async def landed():
                n = await pool.fetchval("SELECT count(*) FROM ledger WHERE tenant = $1", tenant)
                return n == 3

            await _until(landed, "the good records written")
            dead = await redis.xrange(f"{stream}:dead")
            assert [orjson.loads(f[b"r"])["request_id"] for _, f in dead if b"r" in f][-1:] == [bad["request_id"]]
            assert dead[-1][1][b"error"] == b"22003"  # numeric value out of range
            assert b"my secret" not in dead[-1][1][b"r"]  # a dead letter is no place for a prompt to linger
        finally:
            await ledger.stop()
            await redis.delete(stream, f"{stream}:dead")
            await redis.aclose()
            await pool.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    "sizes",
    [[1] + [MB] * 8, [9 * MB // 10] * 4],  # a small entry, then eight of the budget's size; four of 0.9 of it
    ids=["small-then-large", "near-budget"],
)
@pytest.mark.parametrize("client", CLIENTS)
def test_large_entries_arriving_while_the_writer_waits_are_taken_within_the_budget(services, client, sizes):
    """The blocking read takes one entry; what came with it is sized, from the first, against
    what is left of the budget (two cases an independent review found: a batch took eight
    budget-sized entries after a small one, and two of 0.9 MB for a 1 MB budget)."""

    async def main():
        stream = f"test:{{gw}}:sw-{uuid.uuid4().hex[:8]}"
        redis = aioredis.from_url(services[1])
        batches: list[list[dict]] = []

        async def write(conn, entries):
            batches.append(entries)

        async with _running(services, redis, client, stream, write, max_batch_bytes=MB, block_ms=2000):
            await asyncio.sleep(0.3)  # the writer waits in its blocking read
            pipe = redis.pipeline(transaction=False)
            for i, size in enumerate(sizes):
                pipe.xadd(stream, {"n": str(i), "blob": b"L" * size})
            await pipe.execute()
            await _until(lambda: _empty(redis, stream), "every entry written", 30)
        assert max(_sizes(b) for b in batches) <= MB + 8, [_sizes(b) for b in batches]
        assert sorted(int(e[b"n"]) for b in batches for e in b) == list(range(len(sizes)))
        await redis.delete(stream)
        await redis.aclose()

    asyncio.run(main())


# (entries, bytes each, spill_after, spill_bytes): past the count; past the bytes, far under the count
BACKLOGS = {"by-entries": (60, 100, 20, 256 * MB), "by-bytes": (40, 64 * 1024, 10_000, MB)}


@pytest.mark.parametrize("backlog", BACKLOGS)
@pytest.mark.parametrize("client", CLIENTS)
def test_a_backlog_goes_to_local_disk_while_postgres_is_away_and_to_postgres_once_it_is_back(
    services, client, tmp_path, backlog
):
    """A database outage must not fill Redis (budgets, limits and conversations live there too):
    past ``spill_after`` entries — or ``spill_bytes`` of Redis's memory, as a few thousand large
    entries (audit records with content logging) reach long before the count — the writer moves
    the stream's backlog to local disk, then writes it from there when PostgreSQL answers again:
    every entry, the spill files gone."""
    n, size, spill_after, spill_bytes = BACKLOGS[backlog]

    async def main():
        stream = f"test:{{gw}}:sw-{uuid.uuid4().hex[:8]}"
        redis = aioredis.from_url(services[1])
        away = True
        written: list[dict] = []

        async def write(conn, entries):
            if away:
                raise OSError("database away")
            written.extend(entries)

        blob = b"x" * size
        async with _running(
                services, redis, client, stream, write, spill_dir=tmp_path, spill_after=spill_after,
                spill_bytes=spill_bytes, batch=8, block_ms=50, claim_idle=0.5,
            ):  # fmt: skip
            for i in range(n):
                await redis.xadd(stream, {"n": str(i), "blob": blob})

            async def moved() -> bool:
                under = (await redis.memory_usage(stream) or 0) <= spill_bytes
                return under and await redis.xlen(stream) <= spill_after

            await _until(moved, "the backlog moved to disk")
            assert await redis.xlen(stream) < n and list(tmp_path.glob("spill-*"))
            away = False  # the database is back
            await _until(lambda: _empty(redis, stream), "the stream written")

            async def spilled_written() -> bool:
                left = [p for p in tmp_path.glob("spill-*") if p.suffix != ".lock"]
                return len({e[b"n"] for e in written}) == n and not left

            await _until(spilled_written, "the spilled entries written from disk", 30)
        assert sorted({int(e[b"n"]) for e in written}) == list(range(n))
        assert all(e[b"blob"] == blob for e in written)
        await redis.delete(stream)
        await redis.aclose()

    asyncio.run(main())


def test_the_ledgers_backlog_goes_to_its_spool_while_postgres_is_away(services, tmp_path):
    import orjson

    from policies.ledger import LedgerWriter, Spool
    from tests.test_ledger_write import _record

    async def main():
        pool = await _pool(services)
        away = await asyncpg.create_pool(services[0], min_size=1, max_size=1)
        await away.close()  # PostgreSQL "away"
        redis = aioredis.from_url(services[1])
        stream = f"test:{{gw}}:ledger-{uuid.uuid4().hex[:8]}"  # (the gateways of other tests read the real one)
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        spool = Spool(tmp_path / "ledger-spool-1.jsonl")  # (pid 1: a live process, never an orphan)
        ledger = LedgerWriter(redis, PipelinedRedis(services[1], timeout=10), away, spool)
        ledger.stream, ledger._spill_after, ledger._block_ms = stream, 10, 50  # (idle rounds replay the spool)
        await ledger.start()
        try:
            for _ in range(40):
                await redis.xadd(stream, {"r": orjson.dumps(_record(tenant=tenant))})
            await _until(lambda: _at_most(redis, stream, 10), "the backlog moved to the spool")
            assert (tmp_path / "ledger-spool-1.jsonl").exists()
            ledger._pool = pool  # PostgreSQL is back

            async def landed():
                return await pool.fetchval("SELECT count(*) FROM ledger WHERE tenant = $1", tenant) == 40

            await _until(landed, "every record in the ledger", 40)
        finally:
            await ledger.stop()
            await redis.delete(stream)
            await redis.aclose()
            await pool.close()

    async def _at_most(redis, stream: str, n: int) -> bool:
        return await redis.xlen(stream) <= n

    asyncio.run(main())
