"""The audit ledger's way from the Redis stream to PostgreSQL.

Records are appended to a Redis stream by the settle script, in the same round trip that
settles the request's budgets. Every gateway process runs one consumer of the stream's
consumer group: it reads a batch, COPYs it into PostgreSQL, commits, and only then acknowledges
and deletes the entries. A batch whose write fails stays pending and is retried; entries
pending on a consumer that died (SIGKILL) are claimed by a live one after ``claim_idle``
seconds. Inserts ignore request ids already present, so a batch written twice counts once:
the request id is the gateway's own (``http.new_request_id``), never the caller's, so only a
retried batch can repeat one. The caller's id is the ``client_request_id`` column beside it
(searchable, not unique): a client reusing its ids cannot erase or collide with any record.
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
from redis.exceptions import ResponseError

from core.background import pause
from policies.engine import LEDGER_STREAM

log = logging.getLogger("gateway.ledger")
GROUP = "ledger-writers"
LINGER = 0.5  # seconds to let records gather after a short batch: fewer, larger COPYs

# Records are COPYed as they sit in the stream (JSON) and PostgreSQL takes them apart: the
# writer does no per-record work in Python, so it costs the serving process next to nothing.
_FIELDS = (
    ("request_id", "r->>'request_id'"),
    ("client_request_id", "r->>'client_request_id'"),
    ("ts", "to_timestamp((r->>'ts')::float8)"),
    ("tenant", "r->>'tenant'"),
    ("key_id", "r->>'key_id'"),
    ("end_user", "r->>'user'"),
    ("agent", "r->>'agent'"),
    ("workflow", "r->>'workflow'"),
    ("customer", "r->>'customer'"),
    ("tags", "ARRAY(SELECT jsonb_array_elements_text(COALESCE(r->'tags', '[]')))"),
    ("endpoint", "r->>'endpoint'"),
    ("model", "r->>'model'"),
    ("served_model", "r->>'served_model'"),
    ("provider", "r->>'provider'"),
    ("deployment", "r->>'deployment'"),
    ("attempts", "COALESCE((r->>'attempts')::int, 0)"),
    ("fallbacks", "COALESCE((r->>'fallbacks')::int, 0)"),
    ("stream", "COALESCE((r->>'stream')::boolean, false)"),
    ("status", "(r->>'status')::int"),
    ("error_code", "r->>'error_code'"),
    ("prompt_tokens", "COALESCE((r->>'prompt_tokens')::int, 0)"),
    ("completion_tokens", "COALESCE((r->>'completion_tokens')::int, 0)"),
    ("cached_tokens", "COALESCE((r->>'cached_tokens')::int, 0)"),
    ("usage_estimated", "COALESCE((r->>'usage_estimated')::boolean, false)"),
    ("cost_usd", "COALESCE((r->>'cost_usd')::float8, 0)"),
    ("latency_ms", "(r->>'latency_ms')::float8"),
    ("ttft_ms", "(r->>'ttft_ms')::float8"),
    ("pii_entities", "NULLIF(r->'pii_entities', 'null'::jsonb)"),
    # agent turns: one record per model call, linked by the request id and the step
    ("step", "COALESCE((r->>'step')::int, 1)"),
    ("prompt_version", "(r->>'prompt_version')::int"),
    ("variant", "r->>'variant'"),
    ("conversation_id", "r->>'conversation_id'"),
)
COLUMNS = tuple(name for name, _ in _FIELDS)
_INSERT = (
    f"INSERT INTO ledger ({', '.join(COLUMNS)}) SELECT {', '.join(expr for _, expr in _FIELDS)} "
    "FROM ledger_raw ON CONFLICT (request_id, step) DO NOTHING"
)


async def write_records(conn: asyncpg.Connection, records: list[bytes]) -> None:
    """COPY the records (JSON, as appended to the stream) into a temporary table, then insert
    what is new, in one transaction. Writing a batch twice counts it once."""
    async with conn.transaction():
        await conn.execute("CREATE TEMP TABLE IF NOT EXISTS ledger_raw (r jsonb) ON COMMIT DELETE ROWS")
        # PostgreSQL's jsonb cannot hold U+0000, which a client can put in any string it sends; one
        # such record would fail its whole batch, again and again. It is stored as U+FFFD.
        rows = [(r.replace(b"\\u0000", b"\\ufffd").decode(),) for r in records]
        await conn.copy_records_to_table("ledger_raw", records=rows, columns=("r",))
        await conn.execute(_INSERT)


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
            records = [line for line in work.read_bytes().splitlines() if line.strip()]
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
    """Moves records from the stream to PostgreSQL. Stream reads and acknowledgements go over a
    connection of its own (``fast``: replies parsed by hiredis, no per-entry Python objects);
    ``redis`` (redis-py) does the rare calls (group creation, claiming)."""

    def __init__(
        self, redis, fast, pool: asyncpg.Pool, spool: Spool, *, batch: int = 1000, claim_idle: float = 15.0
    ) -> None:
        self._redis = redis
        self._fast = fast
        self._pool = pool
        self.spool = spool
        self._batch = batch
        self._claim_idle_ms = int(claim_idle * 1000)
        self._name = f"{socket.gethostname()}-{os.getpid()}"
        self._task: asyncio.Task | None = None
        self._stopping = asyncio.Event()
        self._own_pending = True  # entries read but not acknowledged (after a failed write)

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
        self._own_pending = True
        with contextlib.suppress(Exception):
            await self._drain_once(block=None)
        await self._fast.close()

    async def _run(self) -> None:
        idle_rounds = 0
        while not self._stopping.is_set():
            try:
                wrote = await self._drain_once(block=500)
                idle_rounds = 0 if wrote else idle_rounds + 1
                if idle_rounds % 20 == 0:
                    await self._claim_stale()
                    await self.spool.replay(self._pool)
                if 0 < wrote < self._batch:  # a trickle: let the next batch gather
                    await pause(self._stopping, LINGER)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._own_pending = True
                log.warning("ledger write failed, will retry: %s", exc)
                await asyncio.sleep(1)

    async def _read(self, start: str, block: int | None) -> list:
        args = ["XREADGROUP", "GROUP", GROUP, self._name, "COUNT", self._batch]
        if block is not None:
            args += ["BLOCK", block]
        reply = await self._fast.execute(*args, "STREAMS", LEDGER_STREAM, start)
        if not reply:
            return []
        return [(entry_id, fields[1]) for entry_id, fields in reply[0][1] if fields]

    async def _drain_once(self, block: int | None) -> int:
        total = 0
        # Own pending entries first (a write that failed before), then new ones.
        for start in ("0", ">") if self._own_pending else (">",):
            while True:
                entries = await self._read(start, block if start == ">" else None)
                if not entries:
                    break
                await self._commit(entries)
                total += len(entries)
                if start == ">" and len(entries) < self._batch:
                    break
            if start == "0":
                self._own_pending = False
        return total

    async def _commit(self, entries: list) -> None:
        async with self._pool.acquire() as conn:
            await write_records(conn, [record for _, record in entries])
        ids = [i for i, _ in entries]
        await asyncio.gather(
            self._fast.execute("XACK", LEDGER_STREAM, GROUP, *ids), self._fast.execute("XDEL", LEDGER_STREAM, *ids)
        )

    async def _claim_stale(self) -> None:
        """Entries a dead consumer read but never acknowledged become ours."""
        start = "0-0"
        while True:
            result = await self._redis.xautoclaim(
                LEDGER_STREAM, GROUP, self._name, self._claim_idle_ms, start_id=start, count=self._batch
            )
            start, claimed = result[0], [(i, f[b"r"]) for i, f in result[1] if f and b"r" in f]
            if claimed:
                await self._commit(claimed)
            if start in (b"0-0", "0-0"):
                return
