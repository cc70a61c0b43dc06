"""A record PostgreSQL refuses gets one dead letter, however often it is refused: read again from
the stream after a Redis blip lost its acknowledgement, or replayed again from a spill file or
the ledger's spool after a replay stopped half way (real Valkey and PostgreSQL)."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from core.stream_writer import StreamWriter
from gateway.db import migrate
from policies.ledger import DEAD_FILE, Spool
from tests.test_ledger_write import _record


async def _pool(services) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(services[0], min_size=1, max_size=2)
    async with pool.acquire() as conn:
        await migrate(conn)
    return pool


def _refusing(written: list[dict]):
    """A writer whose table refuses a record marked bad (a real data exception: 22P02)."""

    async def write(conn, entries):
        for e in entries:
            if e.get(b"bad"):
                await conn.execute("SELECT $1::text::int", e[b"bad"].decode())
        written.extend(entries)

    return write


class _Blip:
    """The writer's Redis calls, its first acknowledgement (XACK and XDEL, sent together) failing
    as a dropped connection fails every command on it."""

    def __init__(self, writer: StreamWriter) -> None:
        self.call, self.failed = writer._call, set()
        writer._call = self

    async def __call__(self, *args, **kw):
        if args[0] in ("XACK", "XDEL") and args[0] not in self.failed:
            self.failed.add(args[0])
            raise RedisConnectionError("Connection closed by server.")
        return await self.call(*args, **kw)


@pytest.mark.parametrize("tagged", [False, True], ids=["untagged", "tagged"])
def test_a_refused_entry_read_again_after_a_lost_ack_has_one_dead_letter(services, tagged):
    async def main():
        pool = await _pool(services)
        redis = aioredis.from_url(services[1])
        stream = f"test:{{gw}}:cs-dead-{uuid.uuid4().hex[:8]}"
        written: list[dict] = []
        tag = (lambda r: "conv-1") if tagged else None
        writer = StreamWriter(redis, pool, stream=stream, group="g", write=_refusing(written), dead_tag=tag)
        await redis.xgroup_create(stream, "g", id="0", mkstream=True)
        await redis.xadd(stream, {"n": "0"})
        await redis.xadd(stream, {"n": "1", "bad": "one"})
        await redis.xadd(stream, {"n": "2", "bad": "two"})  # another bad entry: its own letter
        await redis.xadd(stream, {"n": "3"})
        blip = _Blip(writer)
        try:
            with pytest.raises(RedisConnectionError):
                await writer.drain()  # letters written, then the acknowledgement lost
            assert blip.failed == {"XACK", "XDEL"}
            writer._own_pending = True  # (as the loop sets it after a failure)
            await writer.drain()  # the batch read again: written again, refused again
            dead = await redis.xrange(f"{stream}:dead")
            assert sorted(f[b"n"] for _, f in dead) == [b"1", b"2"]
            if tagged:
                assert await redis.xlen(f"{stream}:dead:tags") == 2
            assert await redis.xlen(stream) == 0
            assert sorted({e[b"n"] for e in written}) == [b"0", b"3"]
            # a letter retried and refused again is a new letter (its key does not hide it)
            assert await writer.retry_dead(dead[0][0].decode())
            await writer.drain()
            again = await redis.xrange(f"{stream}:dead")
            assert sorted(f[b"n"] for _, f in again) == [b"1", b"2"] and again[0][0] != dead[0][0]
        finally:
            await redis.delete(stream, f"{stream}:dead", f"{stream}:dead:tags")
            await redis.aclose()
            await pool.close()

    asyncio.run(main())


def test_a_spill_file_replayed_again_after_stopping_half_way_has_one_dead_letter(services, tmp_path):
    async def main():
        pool = await _pool(services)
        redis = aioredis.from_url(services[1])
        stream = f"test:{{gw}}:cs-spill-{uuid.uuid4().hex[:8]}"
        written: list[dict] = []
        refusing = _refusing(written)
        away = False

        async def write(conn, entries):
            if away and any(e[b"n"] == b"2" for e in entries):
                raise OSError("database away")  # the replay stops here
            await refusing(conn, entries)

        writer = StreamWriter(redis, pool, stream=stream, group="g", write=write, spill_dir=tmp_path, batch=1)
        writer._spill.append([{b"n": b"0"}, {b"n": b"1", b"bad": b"x"}, {b"n": b"2"}])
        try:
            away = True
            with pytest.raises(OSError):
                await writer._replay_spill()
            away = False
            await writer._replay_spill()  # the work file from the start
            dead = await redis.xrange(f"{stream}:dead")
            assert [f[b"n"] for _, f in dead] == [b"1"]
            assert sorted({e[b"n"] for e in written}) == [b"0", b"2"]
            assert not list(tmp_path.glob("*.replaying"))
        finally:
            await redis.delete(f"{stream}:dead")
            await redis.aclose()
            await pool.close()

    asyncio.run(main())


def test_the_spool_replayed_again_after_stopping_half_way_keeps_one_dead_letter(services, tmp_path, monkeypatch):
    import policies.ledger as ledger

    monkeypatch.setattr(ledger, "REPLAY_CHUNK", 1)  # one record a transaction: the replay can stop between

    async def main():
        pool = await _pool(services)
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        bad = _record(tenant=tenant, prompt_tokens=2**40)  # beyond the column's int4: 22003
        good = _record(tenant=tenant)
        settlement = ["member", []]
        spool = Spool(tmp_path / "ledger-spool-1.jsonl")
        spool.append_many([orjson.dumps({**r, "_settle": settlement}) for r in (bad, good)])
        calls = 0

        async def settle(late):
            nonlocal calls
            calls += 1
            if calls == 2:  # Redis drops while the second record's settlement is applied
                raise RedisConnectionError("Connection closed by server.")

        try:
            with pytest.raises(RedisConnectionError):
                await spool.replay(pool, settle)
            await spool.replay(pool, settle)  # from the start
            lines = (tmp_path / DEAD_FILE).read_bytes().splitlines()
            assert [orjson.loads(line)["request_id"] for line in lines] == [bad["request_id"]]
            n = await pool.fetchval("SELECT count(*) FROM ledger WHERE tenant = $1", tenant)
            assert n == 1
        finally:
            await pool.close()

    asyncio.run(main())
