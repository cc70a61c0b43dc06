"""The audit ledger's way from the Redis stream to PostgreSQL.

Records are appended to a Redis stream by the settle script, in the same round trip that
settles the request's budgets. Every gateway process runs one consumer of the stream's
consumer group: it reads a batch, COPYs it into PostgreSQL, commits, and only then acknowledges
and deletes the entries. A batch whose write fails stays pending and is retried; entries
pending on a consumer that died (SIGKILL) are claimed by a live one after ``claim_idle``
seconds. Inserts ignore request ids already present, so a batch written twice counts once.
If Redis itself cannot take a record, it goes to a local spool file that is replayed later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from pathlib import Path

import asyncpg
import orjson
from redis.exceptions import ResponseError

from policies.engine import LEDGER_STREAM

log = logging.getLogger("gateway.ledger")
GROUP = "ledger-writers"
COLUMNS = (
    "request_id",
    "ts",
    "tenant",
    "key_id",
    "end_user",
    "agent",
    "workflow",
    "customer",
    "tags",
    "endpoint",
    "model",
    "served_model",
    "provider",
    "deployment",
    "attempts",
    "fallbacks",
    "stream",
    "status",
    "error_code",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "usage_estimated",
    "cost_usd",
    "latency_ms",
    "ttft_ms",
    "pii_entities",
)


def _row(rec: dict) -> tuple:
    from datetime import UTC, datetime

    values = {**rec, "end_user": rec.get("user"), "ts": datetime.fromtimestamp(rec["ts"], UTC)}
    pii = rec.get("pii_entities")
    values["pii_entities"] = orjson.dumps(pii).decode() if pii else None
    return tuple(values.get(c) for c in COLUMNS)


async def write_records(conn: asyncpg.Connection, records: list[dict]) -> None:
    """COPY into a temporary table, then insert what is new, in one transaction."""
    async with conn.transaction():
        await conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS ledger_in (LIKE ledger INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        await conn.copy_records_to_table("ledger_in", records=[_row(r) for r in records], columns=COLUMNS)
        await conn.execute(
            f"INSERT INTO ledger ({', '.join(COLUMNS)}) SELECT {', '.join(COLUMNS)} FROM ledger_in "
            "ON CONFLICT (request_id) DO NOTHING"
        )


class Spool:
    """Records Redis could not take, kept on local disk until they reach PostgreSQL."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: bytes) -> None:
        with open(self.path, "ab") as f:
            f.write(record.rstrip(b"\n") + b"\n")
            f.flush()
            os.fsync(f.fileno())

    async def replay(self, pool: asyncpg.Pool) -> int:
        """Writes this process's spool, and any left by processes that died, to PostgreSQL."""
        total = 0
        for path in [self.path, *self._orphans()]:
            work = path.with_suffix(".replaying")
            if path.exists() and not work.exists():
                path.rename(work)
            if not work.exists():
                continue
            records = [orjson.loads(line) for line in work.read_bytes().splitlines() if line.strip()]
            if records:
                async with pool.acquire() as conn:
                    await write_records(conn, records)
            work.unlink()
            total += len(records)
        return total

    def _orphans(self) -> list[Path]:
        found = []
        for path in self.path.parent.glob("ledger-spool-*.jsonl"):
            try:
                pid = int(path.stem.rsplit("-", 1)[1])
                os.kill(pid, 0)
            except ProcessLookupError:
                found.append(path)
            except (ValueError, PermissionError):
                continue
        return found


class LedgerWriter:
    def __init__(self, redis, pool: asyncpg.Pool, spool: Spool, *, batch: int = 500, claim_idle: float = 15.0) -> None:
        self._redis = redis
        self._pool = pool
        self.spool = spool
        self._batch = batch
        self._claim_idle_ms = int(claim_idle * 1000)
        self._name = f"{socket.gethostname()}-{os.getpid()}"
        self._task: asyncio.Task | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists already
            await self._redis.xgroup_create(LEDGER_STREAM, GROUP, id="0", mkstream=True)
        self._task = asyncio.create_task(self._run(), name="ledger-writer")

    async def stop(self) -> None:
        """Drains: everything this process appended (and its own pending entries) is written."""
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 30)
        with contextlib.suppress(Exception):
            await self._drain_once(block=None)

    async def _run(self) -> None:
        idle_rounds = 0
        while not self._stopping.is_set():
            try:
                wrote = await self._drain_once(block=500)
                idle_rounds = 0 if wrote else idle_rounds + 1
                if idle_rounds % 20 == 0:
                    await self._claim_stale()
                    await self.spool.replay(self._pool)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("ledger write failed, will retry: %s", exc)
                await asyncio.sleep(1)

    async def _drain_once(self, block: int | None) -> int:
        total = 0
        # Own pending entries first (a write that failed before), then new ones.
        for start in ("0", ">"):
            while True:
                resp = await self._redis.xreadgroup(
                    GROUP, self._name, {LEDGER_STREAM: start}, count=self._batch, block=block if start == ">" else None
                )
                entries = resp[0][1] if resp else []
                entries = [(i, f) for i, f in entries if f]
                if not entries:
                    break
                await self._commit(entries)
                total += len(entries)
                if start == ">" and len(entries) < self._batch:
                    break
        return total

    async def _commit(self, entries: list) -> None:
        records = [orjson.loads(fields[b"r"]) for _, fields in entries]
        async with self._pool.acquire() as conn:
            await write_records(conn, records)
        ids = [i for i, _ in entries]
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(LEDGER_STREAM, GROUP, *ids)
            pipe.xdel(LEDGER_STREAM, *ids)
            await pipe.execute()

    async def _claim_stale(self) -> None:
        """Entries a dead consumer read but never acknowledged become ours."""
        start = "0-0"
        while True:
            result = await self._redis.xautoclaim(
                LEDGER_STREAM, GROUP, self._name, self._claim_idle_ms, start_id=start, count=self._batch
            )
            start, claimed = result[0], [(i, f) for i, f in result[1] if f]
            if claimed:
                await self._commit(claimed)
            if start in (b"0-0", "0-0"):
                return
