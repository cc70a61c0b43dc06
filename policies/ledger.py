"""The audit ledger's way from the Redis stream to PostgreSQL.

Records are appended to a Redis stream by the settle script, in the same round trip that
settles the request's budgets. Every gateway process runs one consumer of the stream's
consumer group (``core.stream_writer``): it reads a batch (bounded in records and bytes: with
content logging a record holds the prompt), COPYs it into PostgreSQL, commits, and only then
acknowledges and deletes the entries. A batch whose write fails stays pending and is retried; entries
pending on a consumer that died (SIGKILL) are claimed by a live one after ``claim_idle``
seconds. Inserts ignore request ids already present, so a batch written twice counts once:
the request id is the gateway's own (``http.new_request_id``), never the caller's, so only a
retried batch can repeat one. The caller's id is the ``client_request_id`` column beside it
(searchable, not unique): a client reusing its ids cannot erase or collide with any record.
If Redis itself cannot take a record, it goes to a local spool file that is replayed later. A
record PostgreSQL refuses is written alone, and refused again, kept in ``<stream>:dead`` (a
spooled one in ``ledger-dead.jsonl``), once however often it is read or replayed again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import orjson

from core import locked_lines
from core.erasure_key import TAG_PREFIX, erasure_key, lock_batch_tenants, names_party_sql, record_hash
from core.metrics import DEAD_LETTERS
from core.stream_spill import append_lines, claim, hold, line_chunks
from core.stream_writer import StreamWriter, write_or_isolate
from policies.engine import LEDGER_STREAM
from policies.scripts import SETTLE_LATE

log = logging.getLogger("gateway.ledger")

GROUP = "ledger-writers"
LATE_CHUNK = 500  # spooled settlements applied in one Redis call (a long outage spools many)
REPLAY_CHUNK = 1000  # spooled records written in one transaction
REPLAY_BYTES = 8 * 1024 * 1024
LINGER = 0.5  # seconds to let records gather after a short batch: fewer, larger COPYs

# Records are COPYed as they sit in the stream (JSON) and PostgreSQL takes them apart: the
# writer does no per-record work in Python, so it costs the serving process next to nothing.
_CONV = "(r->>'conversation_id')"
_USER_IS_PARTY = names_party_sql(_CONV, "(r->>'user')")
_CUSTOMER_IS_PARTY = names_party_sql(_CONV, "(r->>'customer')")
_FIELDS = (
    ("request_id", "r->>'request_id'"),
    ("client_request_id", "r->>'client_request_id'"),
    ("ts", "to_timestamp((r->>'ts')::float8)"),
    ("tenant", "r->>'tenant'"),
    ("key_id", "r->>'key_id'"),
    ("end_user", f"CASE WHEN gone AND {_USER_IS_PARTY} THEN tag ELSE r->>'user' END"),
    ("agent", "r->>'agent'"),
    ("workflow", "r->>'workflow'"),
    (
        "customer",
        f"CASE WHEN gone AND {_CUSTOMER_IS_PARTY} THEN tag ELSE r->>'customer' END",
    ),
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
    ("conversation_id", "CASE WHEN gone THEN tag ELSE r->>'conversation_id' END"),
)
COLUMNS = tuple(name for name, _ in _FIELDS)
# A record of a conversation erased after its call began (its time less its latency) keeps the
# conversation's tag instead of its id, and instead of its end user and customer when the id
# ends with them (a WhatsApp turn's: the customer's number): it was on its way (the stream, the spool,
# a dead letter retried) when the erasure rewrote the rows already written
# (``runtime.erased_records``). ``h``: the keyed hash of the conversation, computed by the writer
# (``core.erasure_key``); the ledger does not say which agent answered: any erasure of the tenant's.
# The record's time is ``t``, Redis's when the settle script added it to the stream (the erasure's
# clock too; a replica's may be off), else (spooled while Redis was away, an older release's) its
# ``ts``. A call begun in the erasure's very microsecond counts as erased. A record the writer
# spilled to the spool (PostgreSQL away) keeps its ``t`` in it as ``_t`` (``_spilled``).
_ERASED = """h IS NOT NULL AND EXISTS (
    SELECT 1 FROM erased_conversations e
    WHERE e.tenant = r->>'tenant' AND e.external_hash = h
      AND e.erased_at >= to_timestamp(
        coalesce(t, (r->>'_t')::float8, (r->>'ts')::float8) - coalesce((r->>'latency_ms')::float8, 0) / 1000))"""
_INSERT = (
    f"INSERT INTO ledger ({', '.join(COLUMNS)}) SELECT {', '.join(expr for _, expr in _FIELDS)} "
    f"FROM (SELECT r, {_ERASED} AS gone, '{TAG_PREFIX}' || h AS tag FROM ledger_raw_t) raw "
    "ON CONFLICT (request_id, step) DO NOTHING"
)
_LOCK_TENANTS = lock_batch_tenants("ledger_raw_t", "h IS NOT NULL")


async def write_records(conn: asyncpg.Connection, records: list[bytes]) -> None:
    """COPY the records (JSON, as appended to the stream) into a temporary table, then insert
    what is new, in one transaction. Writing a batch twice counts it once."""
    async with conn.transaction():
        await _copy(conn, records)


async def _copy(conn: asyncpg.Connection, records: list[bytes], times: list[float | None] | None = None) -> None:
    """``times``: each record's time in the stream (Redis's, the settle script's ``t``; None: its ``ts``)."""
    await conn.execute("CREATE TEMP TABLE IF NOT EXISTS ledger_raw_t (r jsonb, h text, t float8) ON COMMIT DELETE ROWS")
    # PostgreSQL's jsonb cannot hold U+0000, which a client can put in any string it sends; one
    # such record would fail its whole batch, again and again. It is stored as U+FFFD.
    key = erasure_key()
    times = times if times is not None else [None] * len(records)
    rows = [
        (r.replace(b"\\u0000", b"\\ufffd").decode(), record_hash(r, key), t)
        for r, t in zip(records, times, strict=True)
    ]
    await conn.copy_records_to_table("ledger_raw_t", records=rows, columns=("r", "h", "t"))
    if any(row[1] is not None for row in rows):
        await conn.execute(_LOCK_TENANTS)
    await conn.execute(_INSERT)


async def _write_entries(conn: asyncpg.Connection, entries: list[dict]) -> None:
    """The stream writer's batch (inside its transaction): each entry's record is field ``r``."""
    found = [e for e in entries if b"r" in e]
    await _copy(conn, [e[b"r"] for e in found], [_stream_time(e.get(b"t")) for e in found])


def _stream_time(value: bytes | None) -> float | None:
    """A record's ``t`` (seconds on Redis's clock); None when absent (an older release's) or unreadable."""
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


_TIME = re.compile(rb"\d{1,12}(\.\d{1,9})?")


def _spilled(entry: dict) -> bytes:
    """An entry's record as the spool keeps it: with its ``t`` (Redis's time, which its replay
    compares with an erasure's) as the record's last field ``_t``, spliced in as it is (the last
    of two equal keys is the one jsonb keeps). A record without a readable ``t`` stays as it is
    (its ``ts`` counts)."""
    raw, t = entry[b"r"], entry.get(b"t")
    body = raw.rstrip()
    if t is None or not _TIME.fullmatch(t) or not body.startswith(b"{") or not body.endswith(b"}") or body == b"{}":
        return raw
    return body[:-1] + b',"_t":' + t + b"}"


def _late(line: bytes) -> list | None:
    """A spooled record's settlement ([member, [[spent_key, reserved_key, held, actual, ttl], ...]])."""
    try:
        settlement = orjson.loads(line).get("_settle")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return settlement if isinstance(settlement, list) and len(settlement) == 2 else None


def _spool_owner(name: str) -> tuple[str, int]:
    stem = name.split(".", 1)[0]
    return stem, int(stem.rsplit("-", 1)[1])


def _dead(record: bytes, error: str | None) -> bytes:
    """A refused record as its dead letter keeps it: without message content (which the ledger
    never stores: a dead letter must not be the one place a prompt lingers), with the error."""
    try:
        rec = orjson.loads(record)
    except orjson.JSONDecodeError:
        return orjson.dumps({"unparsable": record[:1000].decode("utf-8", "replace"), "error": error})
    if isinstance(rec, dict):
        rec.pop("content", None)
        rec.pop("_settle", None)
        rec["error"] = error
    return orjson.dumps(rec)


def _dead_key(line: bytes) -> object:
    """A dead letter's record, as the ledger knows it: its request id and step (the line itself
    when it has none)."""
    try:
        rec = orjson.loads(line)
    except orjson.JSONDecodeError:
        return line
    if isinstance(rec, dict) and isinstance(rec.get("request_id"), str):
        return rec["request_id"], str(rec.get("step") or 1)
    return line


def settle_args(settlements: list) -> list:
    """``SETTLE_LATE``'s arguments for spooled settlements ([member, [[spent_key, reserved_key,
    held, actual, ttl], ...]] each)."""
    argv: list = [len(settlements)]
    for member, budgets in settlements:
        argv += [str(member), len(budgets)]
        for spent_key, reserved_key, held, actual, ttl in budgets:
            argv += [str(spent_key), str(reserved_key), int(held), int(actual), int(ttl)]
    return argv


DEAD_FILE = "ledger-dead.jsonl"


class Spool:
    """Records Redis could not take, kept on local disk until they reach PostgreSQL.

    A Redis outage fails every request's settle: each one's record is spooled (``add``) in a
    worker thread, never on the event loop, and the records of the settles that fail while one
    write is on its way go to disk together, with one fsync (group commit). A settle's ``add``
    returns once its record is on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # appends (worker threads, any of them) and the claim of this process's file for a replay
        # (which renames it): an append is in the file claimed, or in the next one, never lost
        self._file = threading.Lock()
        self._waiting: list[tuple[bytes, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None

    @property
    def dead_path(self) -> Path:
        """The spool's dead letters (records PostgreSQL refused), beside it: appended under the
        file's lock (``core.locked_lines``), which an erasure's rewrite of them takes too."""
        return self.path.parent / DEAD_FILE

    def append(self, record: bytes) -> None:
        self.append_many([record])

    def append_many(self, records: list[bytes]) -> None:
        """Records on disk (one fsync for all of them) when this returns; on an error, none.
        Blocks (an fsync): not for the event loop (``add``)."""
        if records:
            with self._file:
                if self.path.stem.endswith(f"-{os.getpid()}"):  # (this process's spool: its lock says it lives)
                    hold(self.path.parent, self.path.stem)
                append_lines(self.path, [r.rstrip(b"\n") for r in records])

    async def add(self, record: bytes) -> None:
        """The record on disk when this returns (with those added meanwhile: one write, one fsync,
        in a worker thread). A caller cancelled while it waits does not take its record back."""
        fut = asyncio.get_running_loop().create_future()
        self._waiting.append((record, fut))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name="ledger spool")
        await fut

    async def _flush(self) -> None:
        batch: list[tuple[bytes, asyncio.Future]] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    await asyncio.to_thread(self.append_many, [record for record, _ in batch])
                except Exception as exc:
                    _answer(batch, exc)
                else:
                    _answer(batch, None)
                batch = []
        finally:
            self._flusher = None
            if batch or self._waiting:  # (cancelled: the loop is closing)
                left, self._waiting = [*batch, *self._waiting], []
                _answer(left, RuntimeError("the spool was stopped before the record was written"))

    async def replay(self, pool: asyncpg.Pool, settle: Callable[[list], Awaitable[object]] | None = None) -> int:
        """Writes this process's spool, and any left by processes that are gone (a spool, or one
        whose replay they did not finish), to PostgreSQL, ``REPLAY_CHUNK`` records (at most 8 MB)
        to a transaction, read as it goes. Records of settles Redis did not take carry what they
        would have done (``_settle``): ``settle`` applies those of a chunk before it is written
        (each once however often it is replayed: ``SETTLE_LATE``). A replay that stops half way
        is done again from the start; what was written counts once."""
        if not self.path.parent.exists():
            return 0
        total = 0
        for work in await asyncio.to_thread(self._claim):
            for records in line_chunks(work, REPLAY_BYTES, REPLAY_CHUNK):
                if settle is not None:
                    late = [x for x in (_late(line) for line in records if b'"_settle"' in line) if x is not None]
                    for i in range(0, len(late), LATE_CHUNK):
                        await settle(late[i : i + LATE_CHUNK])
                async with pool.acquire() as conn:
                    await self._write(conn, records)
                total += len(records)
            work.unlink()
        return total

    def _claim(self) -> list[Path]:
        """The work files of a replay (``core.stream_spill.claim``), this process's spool
        renamed between two appends."""
        with self._file:
            return claim(
                self.path.parent,
                [self.path, self.path.with_suffix(".replaying")],  # (and an older release's work file)
                self.path.stem,
                ("ledger-spool-*.jsonl", "ledger-spool-*.replaying"),
                _spool_owner,
            )

    async def _write(self, conn: asyncpg.Connection, records: list[bytes]) -> None:
        """One transaction; what PostgreSQL refuses alone goes to the spool's dead letters
        (``dead_path``), so one record cannot keep the others out of the ledger, replay after
        replay."""
        refused = await write_or_isolate(lambda batch: write_records(conn, batch), records)
        if refused:
            dead = self.dead_path
            # (in a thread: an erasure's rewrite of the file holds its lock for as long as it copies
            # it, and this runs on the event loop). Once per record: a replay that stopped half way
            # is done again from the start, and refuses the same records again.
            added = await asyncio.to_thread(
                locked_lines.append_new, dead, [_dead(record, sqlstate) for record, sqlstate in refused], _dead_key
            )
            if added:
                log.error("%d spooled audit records refused by PostgreSQL, kept in %s", added, dead)
                DEAD_LETTERS.labels("ledger-spool").inc(added)


def _answer(waiting: list[tuple[bytes, asyncio.Future]], exc: BaseException | None) -> None:
    """Tells the settles waiting for their records: on disk (``exc`` None), or not."""
    for _, fut in waiting:
        if fut.done():  # (its caller was cancelled: the record was written all the same)
            continue
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)


class LedgerWriter(StreamWriter):
    """Moves records from the stream to PostgreSQL (``core.stream_writer``: batches bounded in
    entries and bytes, a record PostgreSQL refuses moved to the dead-letter stream), and replays
    the spool beside its claim of dead consumers' entries. Stream reads and acknowledgements go
    over ``fast``, a connection of its own; ``redis`` (redis-py) does the rare calls."""

    def __init__(
        self, redis, fast, pool: asyncpg.Pool, spool: Spool, *, batch: int = 1000, claim_idle: float = 15.0
    ) -> None:
        super().__init__(
            redis, pool, stream=LEDGER_STREAM, group=GROUP, write=_write_entries, batch=batch,
            claim_idle=claim_idle, linger=LINGER, fast=fast, maintain=self._replay,
            spill_to=lambda records: spool.append_many([_spilled(r) for r in records if b"r" in r]),  # (t kept: _t)
        )  # fmt: skip
        self.spool = spool

    def dead_record(self, record: dict) -> dict:
        raw = record.get(b"r")
        if raw is None:
            return record
        return {**record, b"r": _dead(raw, None)}

    async def _replay(self) -> None:
        await self.spool.replay(self._pool, self._settle_late)

    async def _settle_late(self, settlements: list) -> None:
        await self._redis.eval(SETTLE_LATE, 0, *settle_args(settlements))

    async def stop(self, grace: float = 30.0) -> None:
        """Drains: everything this process appended (and its own pending entries) is written."""
        await super().stop(grace)
