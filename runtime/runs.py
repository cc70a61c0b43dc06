"""Agent run records: one row per agent turn, every step of it, written off the request path.

``RunRecorder.record(run)`` returns at once: the run is bounded (steps, string lengths), encoded
and buffered; a flusher task appends the buffer to a Redis stream (one pipelined round trip for
however many runs gathered), and a ``StreamWriter`` moves the stream into PostgreSQL in
batches, acknowledging entries only after their transaction committed. A batch written twice
inserts once (the key is the gateway's request id, never the caller's). If Redis cannot take
the runs, the flusher writes them to PostgreSQL itself.

``StreamWriter`` (core/stream_writer.py) is shared with the ledger and ``runtime.memory``:
consumer group, batches bounded in entries and bytes, write in one transaction, ack after
commit, claim entries of consumers that died (SIGKILL).

Given ``core.fastredis`` clients (the composition passes them), the per-batch stream calls
(append, read, ack, claim) skip redis-py: its Python command packing and reply parsing cost
more of an agent turn's CPU than the rest of this module's work.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
import weakref
from pathlib import Path

import asyncpg
import orjson

from core.background import stop_task
from core.erasure_key import EVERY_AGENT, TAG_PREFIX, erasure_key, lock_batch_tenants, record_hash
from core.stream_writer import StreamWriter

log = logging.getLogger("gateway.runs")

RUNS_STREAM = "gw:{gw}:runs"
RUNS_GROUP = "run-writers"

MAX_STEPS = 64  # steps kept per run; the rest are counted in a final {"kind": "omitted"} step
MAX_TEXT = 200  # characters kept of any string field
MAX_BUFFER = 10_000  # runs waiting for Redis in this process; beyond that the oldest are dropped
MAX_BUFFER_BYTES = 32 * 1024 * 1024  # and their encoded bytes (a run of 64 full steps is ~16 KB)
FLUSH_BATCH = 500  # runs appended to the stream in one pipelined round trip
STAMP = b"t"  # a run's time in the runs stream (its entry id's: Redis's clock), added by its writer
WAITED = "w"  # seconds a run waited in its recorder's buffer before reaching the stream (its own clock's
# durations: no wall clock): the run's end on Redis's clock is its ``STAMP`` less this
LINGER_S = 0.05  # how long the flusher lets runs gather before appending them


# --- run records -------------------------------------------------------------------------------

_STEP_INTS = ("step", "arguments_bytes", "result_bytes")
_STEP_TEXTS = ("kind", "name", "status", "deployment", "error", "part")  # part: of a withheld message
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1

# Each bound below has a fast path for the exact type the gateway itself writes (a str, an int,
# a float) and gives anything else to the general function: the same value either way.


def _text(value, limit: int = MAX_TEXT) -> str | None:
    if value is None:
        return None
    return value[:limit] if type(value) is str else str(value)[:limit]


def _int(value) -> int | None:
    if type(value) is int:
        return value if _INT_MIN <= value <= _INT_MAX else (_INT_MIN if value < 0 else _INT_MAX)
    if value is None:  # (int(None) raises: an exception per absent field cost more than all the rest)
        return None
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return max(_INT_MIN, min(_INT_MAX, number))


def _float(value) -> float | None:
    if type(value) is float:
        return value if math.isfinite(value) else None
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _tokens(value) -> int | dict | None:
    if type(value) is dict and len(value) <= 4:  # the tools loop's {"prompt_tokens": n, "completion_tokens": m}
        return {(k[:40] if type(k) is str else str(k)[:40]): _int(v) for k, v in value.items()}
    if isinstance(value, dict):
        return {str(k)[:40]: _int(v) for k, v in list(value.items())[:4]}
    return _int(value)


def bound_step(step: dict) -> dict:
    out: dict = {}
    get = step.get
    for key in _STEP_INTS:
        value = get(key)
        if value is not None:
            out[key] = _int(value)
    for key in _STEP_TEXTS:
        value = get(key)
        if value is not None:
            out[key] = value[:MAX_TEXT] if type(value) is str else str(value)[:MAX_TEXT]
    value = get("duration_ms")
    if value is not None:
        out["duration_ms"] = _float(value)
    value = get("tokens")
    if value is not None:
        out["tokens"] = _tokens(value)
    return out


def bound_run(run: dict) -> dict:
    """The run as stored: known fields only, every string and the list of steps bounded."""
    get = run.get
    all_steps = get("steps") or []
    steps = [bound_step(s) for s in all_steps[:MAX_STEPS] if isinstance(s, dict)]
    omitted = len(all_steps) - MAX_STEPS
    if omitted > 0:
        steps.append({"kind": "omitted", "count": omitted})
    reasons = get("confidence_reasons")
    return {
        "request_id": _text(run["request_id"]),
        "tenant": _text(get("tenant") or "default"),
        "agent": _text(get("agent")),
        "agent_id": _text(get("agent_id")),
        "prompt_version": _int(get("prompt_version")),
        "variant": _text(get("variant")),
        "conversation_id": _text(get("conversation_id"), 256),
        "status": _int(get("status")),
        "degraded": bool(get("degraded")),
        "escalated": bool(get("escalated")),
        "memory_error": _text(get("memory_error")),
        "confidence": _float(get("confidence")),
        "confidence_reasons": [_text(r, 40) for r in reasons[:16]] or None if reasons else None,
        "escalation_id": _text(get("escalation_id"), 64),
        "steps": steps,
        "latency_ms": _float(get("latency_ms")),
        "ts": _float(get("ts")) or time.time(),
    }


def encode_run(run: dict) -> bytes:
    """The stream entry's ``r`` field (for a caller that appends runs in a round trip of its own)."""
    return orjson.dumps(bound_run(run))


# A run of a conversation erased after the turn began (its time less its latency) keeps the
# conversation's tag instead of its id (``runtime.erased_records``): it was on its way (the
# stream, a spill, a dead letter retried) when the erasure rewrote the runs already written.
# ``h``: the keyed hash of the conversation, computed by the writer (``core.erasure_key``).
# The turn's end is ``t``, on Redis's clock (the erasure's too; a replica's clock may be off): the
# time its run reached the runs stream (its entry id) less the time it waited in the recorder's
# buffer (``_ended``); else (written straight to PostgreSQL while Redis was away, an older
# release's) its ``ts``. A turn begun in the erasure's very millisecond counts as erased. An erasure
# with every agent (``EVERY_AGENT``: a channel's customer's) covers any agent's run.
ERASED_OR_ID = f"""CASE WHEN h IS NOT NULL AND EXISTS (
    SELECT 1 FROM erased_conversations e
    WHERE e.tenant = r->>'tenant' AND e.agent_id IN (r->>'agent_id', '{EVERY_AGENT}') AND e.external_hash = h
      AND e.erased_at >= to_timestamp(
        coalesce(t, (r->>'ts')::float8) - coalesce((r->>'latency_ms')::float8, 0) / 1000))
  THEN '{TAG_PREFIX}' || h ELSE r->>'conversation_id' END"""
_RUN_COLUMNS = (
    ("request_id", "r->>'request_id'"),
    ("tenant", "r->>'tenant'"),
    ("agent", "r->>'agent'"),
    ("agent_id", "r->>'agent_id'"),
    ("prompt_version", "(r->>'prompt_version')::int"),
    ("variant", "r->>'variant'"),
    ("conversation_id", ERASED_OR_ID),
    ("status", "(r->>'status')::int"),
    ("degraded", "COALESCE((r->>'degraded')::boolean, false)"),
    ("escalated", "COALESCE((r->>'escalated')::boolean, false)"),
    ("memory_error", "r->>'memory_error'"),
    ("confidence", "(r->>'confidence')::real"),
    ("confidence_reasons", "r->'confidence_reasons'"),
    ("escalation_id", "r->>'escalation_id'"),
    ("steps", "COALESCE(r->'steps', '[]'::jsonb)"),
    ("latency_ms", "(r->>'latency_ms')::real"),
    ("created_at", "to_timestamp((r->>'ts')::float8)"),
)
# A batch may hold one request id twice (a run recorded again): the first one recorded stays,
# in the batch (DISTINCT ON, in the order given) as across batches (ON CONFLICT DO NOTHING).
_LOCK_TENANTS = lock_batch_tenants("runs_raw_t", "h IS NOT NULL")
_INSERT_RUNS = (
    f"INSERT INTO runs ({', '.join(c for c, _ in _RUN_COLUMNS)}) "
    f"SELECT {', '.join(e for _, e in _RUN_COLUMNS)} FROM ("
    "SELECT DISTINCT ON (r->>'request_id') r, h, t FROM runs_raw_t "
    "WHERE r->>'request_id' IS NOT NULL ORDER BY r->>'request_id', n) AS first "
    "ON CONFLICT (request_id) DO NOTHING"
)
RUNS_RAW_DDL = "CREATE TEMP TABLE IF NOT EXISTS runs_raw_t (n integer, r jsonb, h text, t float8) ON COMMIT DELETE ROWS"

# The encoded records (bytes, UTF-8 JSON) as jsonb, in SQL: they go to PostgreSQL as one bytea
# array, no Python work per record. jsonb cannot hold U+0000, which a client can put in any string
# it sends (see the ledger): its escapes become U+FFFD's.
JSONB_OF = "replace(convert_from({}, 'UTF8'), '\\u0000', '\\ufffd')::jsonb"
_FILL_RUNS = (
    f"INSERT INTO runs_raw_t (n, r, h, t) SELECT n, {JSONB_OF.format('r')}, h, t "
    "FROM unnest($1::bytea[], $2::text[], $3::float8[]) WITH ORDINALITY AS u(r, h, t, n)"
)
# (one simple query, its statements in order, each with a snapshot of its own as when sent one by
# one: the erasures are read after the tenants' locks are granted)
_AFTER_FILL_RUNS = f"{_LOCK_TENANTS};\n{_INSERT_RUNS}"

# A writer's connections, and which of the temporary tables above each has made (its session's:
# made once, then only filled). Keyed by the connection, not a pool's proxy of it (a new one each
# time the connection is lent), and forgotten with it.
_MADE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.asynccontextmanager
async def temp_table(conn: asyncpg.Connection, ddl: str):
    """``ddl`` (a ``CREATE TEMP TABLE IF NOT EXISTS``) run on ``conn`` unless a write on it made
    the table before; a batch's write runs inside. Remembered once the write succeeded (made in a
    transaction that failed, the table is gone with it: its creation rolled back); a table missing
    all the same (``UndefinedTableError``: its batch stays in the stream, written again later) is
    forgotten, made again next time."""
    raw = getattr(conn, "_con", conn)  # (a pool's proxy: the connection it lends)
    made = _MADE.get(raw)
    if made is None:
        made = _MADE[raw] = set()
    if ddl not in made:
        await conn.execute(ddl)
    try:
        yield
    except asyncpg.UndefinedTableError:
        made.discard(ddl)
        raise
    made.add(ddl)  # (only now: made in a transaction that failed, the table went with it)


async def write_runs(
    conn: asyncpg.Connection, raw: list[bytes], key: bytes | None = None, times: list[float | None] | None = None
) -> None:
    """Insert what is new of the encoded runs (call it inside a transaction): a batch written twice
    inserts once. Two round trips: the runs into a temporary table, then the insert from it.
    ``key``: the erasures' (``core.erasure_key``). ``times``: each run's end on Redis's clock
    (``_ended``; None: not known, its ``ts`` counts)."""
    key = erasure_key() if key is None else key
    times = times if times is not None else [None] * len(raw)
    if len(times) != len(raw):
        raise ValueError("one time per run")
    hashes = [record_hash(r, key) for r in raw]
    async with temp_table(conn, RUNS_RAW_DDL):
        await conn.execute(_FILL_RUNS, raw, hashes, times)
        await conn.execute(_AFTER_FILL_RUNS)


async def _write_run_entries(conn: asyncpg.Connection, entries: list[dict]) -> None:
    found = [e for e in entries if b"r" in e]
    await write_runs(conn, [e[b"r"] for e in found], times=[_ended(e) for e in found])


def _ended(entry: dict) -> float | None:
    """When the run's turn ended on Redis's clock: its ``STAMP`` less its ``WAITED``. None (its
    ``ts`` counts) without both: a run an older release's recorder appended, whose wait before the
    stream is not known, or one appended by hand."""
    try:
        return float(entry[STAMP]) - float(entry[WAITED.encode()])
    except (KeyError, ValueError):
        return None


_SCOPE_SQL = "SELECT set_config('gateway.tenant', $1, true), set_config('role', 'gateway_tenant', true)"


@contextlib.asynccontextmanager
async def tenant_transaction(pool: asyncpg.Pool, tenant: str | None):
    """As ``gateway.db.tenant_transaction`` (a domain cannot import it): a transaction that sees
    only ``tenant``'s rows under row-level security; ``None`` is the super-admin."""
    async with pool.acquire() as conn, conn.transaction():
        if tenant is not None:
            await conn.execute(_SCOPE_SQL, tenant)
        yield conn


class RunRecorder:
    """``fast`` (a ``core.fastredis.PipelinedRedis``; appends do not block, so the request path's
    shared one will do) appends the runs; ``reader``, one of the writer's own, moves them on."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        redis,
        *,
        fast=None,
        reader=None,
        batch: int = 500,
        claim_idle: float = 15.0,
        spill_dir: Path | None = None,
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._fast = fast
        self._writer = StreamWriter(
            redis, pool, stream=RUNS_STREAM, group=RUNS_GROUP, write=_write_run_entries, batch=batch,
            claim_idle=claim_idle, fast=reader, spill_dir=spill_dir, stamp=STAMP,
        )  # fmt: skip
        # each run, and when it was buffered (``time.monotonic()``: its wait here, ``WAITED``)
        self._buffer: collections.deque[tuple[bytes, float]] = collections.deque()
        self._buffered = 0  # bytes in ``_buffer``
        self._wake = asyncio.Event()
        self._stopping = False
        self._flusher: asyncio.Task | None = None
        self._flush_lock = asyncio.Lock()  # ``flush()`` waits for a batch on its way to Redis
        self.dropped = 0  # runs lost because the buffer overflowed while Redis and PostgreSQL were down

    @property
    def writer(self) -> StreamWriter:
        """The stream writer moving runs into PostgreSQL (its depth and dead letters: admin API)."""
        return self._writer

    async def start(self) -> None:
        await self._writer.start()
        self._flusher = asyncio.create_task(self._flush_loop(), name="run-recorder")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._flusher is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(self._flusher), 10)
            await stop_task(self._flusher)
        if self._buffer:  # the loop gave up: last try, straight to PostgreSQL
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._write_direct([e for e, _ in self._buffer]), 10)
                self._buffer.clear()
                self._buffered = 0
        await self._writer.stop()

    def record(self, run: dict) -> None:
        """Queues the run (returns at once; never raises for a malformed run, which is logged)."""
        try:
            encoded = encode_run(run)
        except Exception as exc:
            log.warning("run record not encodable, dropped: %s", type(exc).__name__)
            return
        self._buffer.append((encoded, time.monotonic()))
        self._buffered += len(encoded)
        while len(self._buffer) > MAX_BUFFER or (self._buffered > MAX_BUFFER_BYTES and len(self._buffer) > 1):
            self._buffered -= len(self._buffer.popleft()[0])
            self.dropped += 1
        self._wake.set()

    async def flush(self) -> None:
        """Appends what is buffered to the stream and writes the stream to PostgreSQL now."""
        await self._flush_buffer()
        await self._writer.drain()

    async def get(self, tenant: str | None, request_id: str) -> dict | None:
        """The run of one request (``tenant`` None: any tenant's, for the super-admin)."""
        sql = "SELECT * FROM runs WHERE request_id = $1" + (" AND tenant = $2" if tenant is not None else "")
        args = (request_id, tenant) if tenant is not None else (request_id,)
        async with tenant_transaction(self._pool, tenant) as conn:
            row = await conn.fetchrow(sql, *args)
        if row is None:
            return None
        out = dict(row)
        out["steps"] = orjson.loads(out["steps"]) if isinstance(out["steps"], str) else out["steps"]
        reasons = out.get("confidence_reasons")  # jsonb, as text: a list of reason codes, or null
        out["confidence_reasons"] = orjson.loads(reasons) if isinstance(reasons, str) else reasons
        out["created_at"] = out["created_at"].timestamp()
        return out

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            if not self._stopping and len(self._buffer) < FLUSH_BATCH:
                # Let a batch gather: a pipeline per run cost more CPU than the rest of the
                # run's recording (make bench, --only agents); a run waits LINGER_S at most.
                await asyncio.sleep(LINGER_S)
            self._wake.clear()
            try:
                await self._flush_buffer()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("run records not stored yet, will retry: %s", exc)
                await asyncio.sleep(1)
                self._wake.set()
            if self._stopping and not self._buffer:
                return

    async def _flush_buffer(self) -> None:
        async with self._flush_lock:
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        while self._buffer:
            batch = [self._buffer.popleft() for _ in range(min(len(self._buffer), FLUSH_BATCH))]
            taken = sum(len(encoded) for encoded, _ in batch)
            self._buffered -= taken
            try:
                await self._append(batch)
            except asyncio.CancelledError:  # stop() gave up waiting: its last try writes them
                self._put_back(batch, taken)
                raise
            except Exception as exc:
                log.warning("run records: Redis unavailable (%s), writing to PostgreSQL directly", exc)
                try:
                    await asyncio.wait_for(self._write_direct([encoded for encoded, _ in batch]), 10)
                except BaseException:
                    self._put_back(batch, taken)
                    raise

    def _put_back(self, batch: list[tuple[bytes, float]], size: int) -> None:
        """A batch not stored goes back to the buffer's head (runs recorded meanwhile stay behind it)."""
        self._buffer.extendleft(reversed(batch))
        self._buffered += size

    async def _append(self, batch: list[tuple[bytes, float]]) -> None:
        """The runs appended to the stream, each with how long it waited here (``WAITED``)."""
        now = time.monotonic()
        waited = [(encoded, f"{max(0.0, now - at):.3f}") for encoded, at in batch]
        if self._fast is None:
            pipe = self._redis.pipeline(transaction=False)
            for encoded, wait in waited:
                pipe.xadd(RUNS_STREAM, {"r": encoded, WAITED: wait})
            await asyncio.wait_for(pipe.execute(), 5)
            return
        await self._fast.execute_many(
            [("XADD", RUNS_STREAM, "*", "r", encoded, WAITED, wait) for encoded, wait in waited], limit_s=5
        )

    async def _write_direct(self, batch: list[bytes]) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await write_runs(conn, batch)
