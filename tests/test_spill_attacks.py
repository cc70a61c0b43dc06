"""Attacks on the spill of a stream's backlog to local disk (core.stream_spill, StreamWriter's
_spill_backlog / _replay_spill, the ledger's spool): real Valkey, real PostgreSQL, a real
filesystem that fills up (a tiny tmpfs; needs root, skipped otherwise)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from core.fastredis import PipelinedRedis
from core.stream_writer import StreamWriter


async def _until(check, what: str, within: float = 20.0):
    deadline = asyncio.get_running_loop().time() + within
    while not (result := await check()):
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)
    return result


@pytest.fixture
def small_disk(tmp_path: Path):
    d = tmp_path / "small"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)  # (lazily: this process holds a lock file there)


def _fill(d: Path) -> Path:
    filler = d / "filler"
    st = os.statvfs(d)
    with open(filler, "wb") as f:
        f.write(b"\0" * (st.f_bavail * st.f_frsize))
    return filler


def test_a_spill_torn_by_a_full_disk_loses_the_first_entry_of_the_next_spill(services, small_disk):
    """A spill that fails part way (ENOSPC) leaves half a line at the end of the spill file; its
    entries stay in Redis (right), but the next spill's first line is glued to that half line,
    so it is skipped as 'torn' at replay — after its entry was acknowledged and deleted."""

    async def main():
        stream = f"test:{{gw}}:spill-{uuid.uuid4().hex[:8]}"
        redis = aioredis.from_url(services[1])
        away = True
        written: list[dict] = []

        async def write(conn, entries):
            if away:
                raise OSError("database away")
            written.extend(entries)

        async with asyncpg.create_pool(services[0], min_size=1, max_size=2) as pool:
            writer = StreamWriter(
                redis, pool, stream=stream, group="g", write=write, fast=PipelinedRedis(services[1], timeout=10),
                spill_dir=small_disk, spill_after=20, batch=8, block_ms=50, claim_idle=0.5,
            )  # fmt: skip
            await writer.start()
            try:
                for i in range(30):
                    await redis.xadd(stream, {"n": str(i), "blob": b"x" * 50})
                await _until(lambda: _xlen_at_most(redis, stream, 20), "first spill")
                filler = _fill(small_disk)  # the data directory's disk is full
                for i in range(30, 70):
                    await redis.xadd(stream, {"n": str(i), "blob": b"y" * 300})
                await asyncio.sleep(3)  # spills fail (ENOSPC) part way, entries stay in Redis
                assert await redis.xlen(stream) > 20
                filler.unlink()  # space again
                await _until(lambda: _xlen_at_most(redis, stream, 20), "second spill")
                away = False  # PostgreSQL back

                async def done() -> bool:
                    left = [
                        p for p in small_disk.glob("spill-*") if p.suffix != ".lock"
                    ]  # (a live process's lock stays)
                    return await redis.xlen(stream) == 0 and not left

                await _until(done, "everything written", 30)
            finally:
                await writer.stop()
        got = {int(e[b"n"]) for e in written}
        await redis.delete(stream)
        await redis.aclose()
        assert sorted(set(range(70)) - got) == []

    async def _xlen_at_most(redis, stream: str, n: int) -> bool:
        return await redis.xlen(stream) <= n

    asyncio.run(main())


class _Lag:
    """The event loop's lag: a 5 ms ticker's worst delay while something runs beside it."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.over_100ms = 0
        self._task: asyncio.Task | None = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(0.005)
            late = loop.time() - t - 0.005
            self.worst = max(self.worst, late)
            self.over_100ms += late > 0.1

    def __enter__(self):
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *exc):
        self._task.cancel()


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_a_ledger_spool_torn_by_a_full_disk_keeps_the_next_record_out_of_the_ledger(services, small_disk):
    """The same with the ledger's spool (LedgerWriter spill_to -> Spool.append_many): the
    batch that failed part way stays in the stream (right), the next batch is written and
    acknowledged, and its first record, glued to the half line, never reaches the ledger."""
    import orjson

    from gateway.db import migrate
    from policies.ledger import Spool
    from tests.test_ledger_write import _record

    async def main():
        conn = await asyncpg.connect(services[0])
        await migrate(conn)
        await conn.close()
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        spool = Spool(small_disk / "ledger-spool-1.jsonl")
        first = [orjson.dumps(_record(tenant=tenant)) for _ in range(3)]
        spool.append_many(first)
        filler = _fill(small_disk)
        with pytest.raises(OSError):
            spool.append_many([orjson.dumps(_record(tenant=tenant)) for _ in range(20)])  # entries stay in Redis
        filler.unlink()
        last = [orjson.dumps(_record(tenant=tenant)) for _ in range(3)]
        spool.append_many(last)  # fsynced: the writer acknowledges and deletes them
        async with asyncpg.create_pool(services[0], min_size=1, max_size=2) as pool:
            await spool.replay(pool)
            ids = {r["request_id"] for r in await pool.fetch("SELECT request_id FROM ledger WHERE tenant = $1", tenant)}
            await pool.execute("DELETE FROM ledger WHERE tenant = $1", tenant)
        missing = [orjson.loads(r)["request_id"] for r in first + last if orjson.loads(r)["request_id"] not in ids]
        dead = (small_disk / "ledger-dead.jsonl").read_bytes() if (small_disk / "ledger-dead.jsonl").exists() else b""
        assert missing == [], dead[:120]

    asyncio.run(main())


def test_a_conversation_started_during_an_outage_keeps_the_time_of_its_first_turn(services, tmp_path):
    """Spilled turns are written after the stream's newer ones (the drain, then maintenance):
    the conversation row is created by the newer turns, and its created_at is theirs."""
    import time

    import orjson

    from gateway.db import migrate
    from runtime import conversations

    async def main():
        pool = await asyncpg.create_pool(services[0], min_size=1, max_size=4)
        async with pool.acquire() as conn:
            await migrate(conn)
        stream = f"test:{{gw}}:mem-{uuid.uuid4().hex[:8]}"
        redis = aioredis.from_url(services[1])
        tenant, agent, conv = f"t-{uuid.uuid4().hex[:8]}", "agent-1", "c-1"
        away = True

        async def write(conn, entries):
            if away:
                raise OSError("database away")
            await conversations.write_turns(conn, entries)

        writer = StreamWriter(
            redis, pool, stream=stream, group="g", write=write, fast=PipelinedRedis(services[1], timeout=10),
            spill_dir=tmp_path, spill_after=20, batch=8, block_ms=50,
        )  # fmt: skip
        await writer.start()
        t0 = time.time() - 3600  # the outage began an hour ago
        try:
            for i in range(40):
                turn = {"tenant": tenant, "agent_id": agent, "external_id": conv, "request_id": f"r{i}",
                        "prompt_version": 1, "variant": None, "ts": t0 + i * 60,
                        "messages": [{"role": "user", "content": f"turn {i}"}]}  # fmt: skip
                await redis.xadd(stream, {"r": orjson.dumps(turn), "s": str(i + 1)})
            await _until(lambda: _at_most(redis, stream, 20), "spilled")
            away = False

            async def done():
                left = [p for p in tmp_path.glob("spill-*") if p.suffix != ".lock"]  # (a live process's lock stays)
                return await redis.xlen(stream) == 0 and not left

            await _until(done, "written", 30)
        finally:
            await writer.stop()
        row = await conversations.conversation(pool, tenant, agent, conv)
        first = await pool.fetchval(
            "SELECT min(m.created_at) FROM messages m JOIN conversations c ON c.id = m.conversation_id "
            "WHERE c.tenant = $1", tenant
        )  # fmt: skip
        n = await pool.fetchval(
            "SELECT count(*) FROM messages m JOIN conversations c ON c.id = m.conversation_id WHERE c.tenant = $1",
            tenant,
        )
        print(f"\nmessages {n}, turns {row['turns']}; conversation created_at {row['created_at'] - t0:.0f}s after the "
              f"first turn; first message at {first.timestamp() - t0:.0f}s")  # fmt: skip
        await redis.delete(stream)
        await redis.aclose()
        await pool.close()
        assert row["created_at"] <= first.timestamp()

    async def _at_most(redis, stream, n):
        return await redis.xlen(stream) <= n

    asyncio.run(main())


def test_one_refused_turn_in_a_spill_makes_every_turn_of_its_chunk_a_transaction(services, tmp_path):
    """Spill chunks were bounded in bytes only (8 MB), not in entries like the stream's batches
    (500): one record PostgreSQL refuses made write_or_isolate write each of the chunk's turns alone."""
    import time

    import orjson

    from core.stream_spill import SpillFile
    from gateway.db import migrate
    from runtime import conversations

    async def main():
        pool = await asyncpg.create_pool(services[0], min_size=1, max_size=4)
        async with pool.acquire() as conn:
            await migrate(conn)
        redis = aioredis.from_url(services[1])
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        calls = 0

        async def write(conn, entries):
            nonlocal calls
            calls += 1
            await conversations.write_turns(conn, entries)

        stream = f"test:{{gw}}:mem-{uuid.uuid4().hex[:8]}"
        writer = StreamWriter(redis, pool, stream=stream, group="g", write=write, spill_dir=tmp_path)
        n = 5_000
        turns = []
        for i in range(n):
            turn = {"tenant": tenant, "agent_id": "a", "external_id": f"c{i % 100}", "request_id": f"r{i}",
                    "prompt_version": 1, "variant": None, "ts": "not a time" if i == n // 2 else time.time(),
                    "messages": [{"role": "user", "content": "x" * 150}]}  # fmt: skip
            turns.append({b"r": orjson.dumps(turn), b"s": str(i + 1).encode()})
        SpillFile(tmp_path, stream).append(turns)
        t = time.perf_counter()
        await writer._replay_spill()
        took = time.perf_counter() - t
        print(f"\nreplay of {n} spilled turns with one refused: {calls} transactions, {took:.1f}s")
        await redis.delete(f"{stream}:dead")
        await redis.aclose()
        await pool.close()
        assert calls <= n // 500 + 500 + 1  # (it was a transaction per turn: 5,001)

    asyncio.run(main())


_FSIZE_PROBE = """
import errno, resource, signal, sys
from pathlib import Path
from core.stream_spill import append_lines, chunks
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
path = Path(sys.argv[1])
append_lines(path, [b'{"n":"0"}'])
size = path.stat().st_size
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, resource.RLIM_INFINITY))
try:
    append_lines(path, [b'{"n":"%d","blob":"%s"}' % (i, b"y" * 50) for i in range(1, 20)])
    raise SystemExit("the write past the limit succeeded")
except OSError as exc:
    assert exc.errno == errno.EFBIG, exc
assert path.stat().st_size == size, (path.stat().st_size, size)  # cut back: no half line left
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
append_lines(path, [b'{"n":"20"}'])
print(sorted(int(e[b"n"]) for batch in chunks(path, 1 << 20, 500) for e in batch))
"""


def test_a_write_cut_short_leaves_no_half_line_without_root(tmp_path):
    """The torn-write tests above need root (a tiny tmpfs); this one runs anywhere: a file-size
    limit (RLIMIT_FSIZE) makes the real filesystem refuse the write part way, as a full disk does."""
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _FSIZE_PROBE, str(tmp_path / "spill-x-1.jsonl")],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[0, 20]"
