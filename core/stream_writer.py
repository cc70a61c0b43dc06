"""A Redis stream moved into PostgreSQL: the audit ledger, agent runs, conversation memory.

One consumer per process in the stream's consumer group reads a batch, writes it in one
transaction, and only then acknowledges and deletes the entries. A batch whose write fails stays
pending and is read again; entries pending on a consumer that died (SIGKILL) are claimed by a
live one after ``claim_idle`` seconds. A record PostgreSQL refuses (bad data, a constraint) is
written alone and, refused again, moved to ``<stream>:dead`` so it cannot hold back the rest,
once however often it is read again (``core.dead_tags.DEAD_ONCE``; the newest ``DEAD_MAX`` kept;
``gateway_dead_letters_total`` counts them). A writer whose records must stay erasable
(conversation turns) tags its dead letters (``dead_tag``), and ``drop_dead_tagged`` drops those
of some tags, reading the tags alone. While PostgreSQL is away, a stream longer than
``spill_after`` entries, or taking more than ``spill_bytes`` of Redis's memory, is moved to
local disk (``core.stream_spill``) and written from there once PostgreSQL is back.

Batches are bounded in entries *and bytes*. An entry's size is the caller's to choose (a
conversation turn carries the client's messages, an audit record with content logging its
prompt: up to the request body limit each), so a read by count alone could take thousands of
large entries at once, and a process that dies of that reads them again at its next start. Reads
run as scripts in Redis that size entries before taking them (``_READ``): a batch of new entries
holds at most ``max_batch_bytes`` of fields, or its first entry when that alone is larger; own
pending entries read again and claimed ones are taken one at a time until the budget is passed
(at most the budget plus one entry).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from core.background import pause, stop_task
from core.dead_tags import (
    DEAD_KEY_TTL,
    DEAD_ONCE,
    DEAD_PAGE,
    DEAD_PAGE_BYTES,
    dead_key,
    drop_tagged,
    entries,
    forget,
    tag_older,
    tag_streams,
)
from core.metrics import DEAD_LETTERS, SPILL_FAILURES, SPILLED
from core.stream_spill import SpillFile, chunks

log = logging.getLogger("gateway.streams")

REPLY_S = 5.0  # how long a Redis reply may take beyond a blocking read's wait
SPILL_AFTER = 200_000  # entries waiting in a stream while PostgreSQL is away before the rest go to disk
SPILL_BYTES = 256 * 1024 * 1024  # or Redis memory the stream takes (large entries: content logging)
MAX_BATCH_BYTES = 8 * 1024 * 1024  # field bytes read in one batch (or its first entry's, if larger)
_PEEK = 64  # entries sized ahead of one read inside the script
DEAD_MAX = 10_000  # dead letters kept per stream (about: the oldest go first)
_CLAIM_CALLS = 64  # XAUTOCLAIMs in one run of the claim script

Writer = Callable[[asyncpg.Connection, list[dict]], Awaitable[None]]
_ENTRY_ID = re.compile(r"(\d{1,20})-(\d{1,20})", re.ASCII)


def entry_id(text: str) -> bool:
    """A stream entry's id as Redis reads it: two decimal numbers below 2**64 (no newline after)."""
    found = _ENTRY_ID.fullmatch(text)
    return found is not None and all(int(part) < 2**64 for part in found.groups())


DEAD_FIELD_CHARS = 4096  # of each field a dead letter's listing shows

# KEYS: the dead-letter stream, the stream. ARGV: the dead letter's id. Moves it back to the
# stream (without its error field) as a new entry, atomically; 0 when there is none.
_REVIVE = """
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then return 0 end
local flat, fields = found[1][2], {}
for i = 1, #flat, 2 do
  if flat[i] ~= 'error' then fields[#fields + 1] = flat[i]; fields[#fields + 1] = flat[i + 1] end
end
if #fields == 0 then fields = {'error', ''} end
redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('XDEL', KEYS[1], ARGV[1])
return 1
"""

# Shared by the scripts: ``take(got)`` adds a reply's entries to ``out``, counting their field
# bytes in ``used``.
_TAKE = """
local out, n, used = {}, 0, 0
local function size_of(entry)
  local size = 0
  if entry[2] then for i = 2, #entry[2], 2 do size = size + #entry[2][i] end end
  return size
end
local function take(got)
  for j = 1, #got do
    n = n + 1
    out[n] = got[j]
    used = used + size_of(got[j])
  end
end
"""

# KEYS: stream. ARGV: group, consumer, start id ('>' new entries, else own pending after it),
# most entries, byte budget, optionally the id of the entry last delivered to this consumer (the
# blocking read's: new entries are then sized from the first). Returns {more, entries}: ``more``
# is 1 when the batch stopped at a bound with entries possibly left, 0 when the stream had no more.
# New entries: the first alone, then as many of the next ``_PEEK`` as fit in what is left of the
# budget, sized beforehand with XRANGE — exactly the entries XREADGROUP delivers next, since
# nothing else runs while the script does. Own pending entries (re-read after a failed write):
# one at a time. A batch's field bytes are at most the budget, or its first entry's size.
_READ = (
    _TAKE
    + f"""
local group, consumer, start = ARGV[1], ARGV[2], ARGV[3]
local limit, budget = tonumber(ARGV[4]), tonumber(ARGV[5])
local last = nil
if ARGV[6] and ARGV[6] ~= '' then last = ARGV[6] end  -- (an entry just taken: size from after it)
while true do
  if n >= limit or used >= budget then return {{1, out}} end
  local asked = 1
  if start == '>' and last then
    local ahead = redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', math.min({_PEEK}, limit - n))
    if #ahead == 0 then return {{0, out}} end
    local room = budget - used
    asked = 0
    for j = 1, #ahead do
      room = room - size_of(ahead[j])
      if room < 0 then break end
      asked = asked + 1
    end
    if asked == 0 then return {{1, out}} end
  end
  local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', asked, 'STREAMS', KEYS[1], start)
  if not reply then return {{0, out}} end
  local got = reply[1][2]
  take(got)
  if #got < asked then return {{0, out}} end
  last = got[#got][1]
  if start ~= '>' then start = last end
end
"""
)

# KEYS: stream. ARGV: group, consumer, min idle ms, start id, most entries, byte budget. Returns
# {next start id ('0-0' when the scan is complete), entries}. One entry per XAUTOCLAIM (claims
# are rare: consumers that died), at most ``_CLAIM_CALLS`` per run, so a long list of pending
# entries that are not idle yet is scanned over several runs, not in one.
_CLAIM = (
    _TAKE
    + f"""
local group, consumer, idle, start = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local limit, budget = tonumber(ARGV[5]), tonumber(ARGV[6])
for _ = 1, {_CLAIM_CALLS} do
  if n >= limit or used >= budget then break end
  local reply = redis.call('XAUTOCLAIM', KEYS[1], group, consumer, idle, start, 'COUNT', 1)
  start = reply[1]
  take(reply[2])
  if start == '0-0' then break end
end
return {{start, out}}
"""
)


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def is_bad_data(exc: asyncpg.PostgresError) -> bool:
    """The record's fault (a data exception or a constraint), not the database's: retrying it
    can never succeed."""
    return str(getattr(exc, "sqlstate", "") or "")[:2] in ("22", "23")


async def write_or_isolate(write: Callable[[list], Awaitable[object]], records: list) -> list[tuple[object, str]]:
    """``write(records)`` in one go; when PostgreSQL refuses it for a record's fault, each record
    alone, so one record cannot hold back the others, again and again. Returns the records it
    refused alone, with their SQLSTATE (the caller keeps them as dead letters)."""
    try:
        await write(records)
        return []
    except asyncpg.PostgresError as exc:
        if not is_bad_data(exc):
            raise
    refused = []
    for record in records:
        try:
            await write([record])
        except asyncpg.PostgresError as exc:
            if not is_bad_data(exc):
                raise
            refused.append((record, str(exc.sqlstate)))
    return refused


class StreamWriter:
    """Moves the entries of one Redis stream to PostgreSQL with ``write(conn, entries)`` (each
    entry its fields, as a dict of bytes), called inside a transaction.

    ``fast``, a ``core.fastredis.PipelinedRedis`` of the writer's own (a blocking read holds its
    connection, so never one the request path shares), reads, acknowledges and claims the
    entries; ``stop()`` closes it. ``redis`` (redis-py) does the rare calls, and everything when
    ``fast`` is not given. ``maintain``, if given, runs beside the claim of dead consumers'
    entries (every 20 idle reads)."""

    def __init__(
        self,
        redis,
        pool: asyncpg.Pool,
        *,
        stream: str,
        group: str,
        write: Writer,
        batch: int = 500,
        max_batch_bytes: int = MAX_BATCH_BYTES,
        claim_idle: float = 15.0,
        linger: float = 0.2,
        block_ms: int = 500,
        fast=None,
        maintain: Callable[[], Awaitable[object]] | None = None,
        spill_dir: Path | None = None,
        spill_to: Callable[[list[dict]], None] | None = None,
        spill_after: int = SPILL_AFTER,
        spill_bytes: int = SPILL_BYTES,
        dead_tag: Callable[[dict], str | None] | None = None,
        stamp: bytes | None = None,
    ) -> None:
        self._redis = redis
        self._fast = fast
        self._pool = pool
        self.stream = stream
        self.group = group
        self._write = write
        self._batch = batch
        self._max_bytes = max_batch_bytes
        self._claim_idle_ms = int(claim_idle * 1000)
        self._linger = linger
        self._block_ms = block_ms
        self._maintain = maintain
        self._name = f"{socket.gethostname()}-{os.getpid()}-{id(self):x}"
        self._task: asyncio.Task | None = None
        self._stopping = asyncio.Event()
        self._own_pending = True  # entries read but not acknowledged (after a failed write)
        self._lock = asyncio.Lock()  # one drain at a time: ``drain()`` waits for the loop's batch
        self._shas: dict[str, str] = {}
        # where a backlog goes while PostgreSQL is away: a spill file of this writer's own
        # (``spill_dir``, replayed by it), or the caller's (``spill_to``: the ledger's spool)
        self._spill = SpillFile(spill_dir, stream) if spill_dir is not None else None
        self._spill_to = spill_to or (self._spill.append if self._spill is not None else None)
        self._spill_after = spill_after
        self._spill_bytes = spill_bytes
        # what a dead letter is found by (``drop_dead_tagged``): a writer whose records hold
        # what must be erasable (a conversation's turns) tags each one
        self._dead_tag = dead_tag
        # ``stamp``: the field each record read gets, unless it has it, with the time its entry
        # reached the stream (its id's ms: Redis's clock, "seconds.ms"), kept with the record to
        # the local disk, a dead letter and a retried one (``runtime.runs``: a turn's end, compared
        # with an erasure's time)
        self._stamp = stamp
        self._legacy: asyncio.Task | None = None
        self._blocked = False  # the loop waits in a blocking read on ``fast`` (stop() ends it)

    async def start(self) -> None:
        try:
            await self._ensure_group()
        except (RedisError, OSError) as exc:  # Redis away for now: the loop creates it when back
            log.warning("%s: consumer group not created yet: %s", self.stream, exc)
        self._task = asyncio.create_task(self._run(), name=f"stream-writer {self.stream}")
        if self._dead_tag is not None:
            self._legacy = asyncio.create_task(self._tag_older_dead(), name=f"dead tags {self.stream}")

    async def stop(self, grace: float = 10.0) -> None:
        """Writes what this process appended and its own pending entries; gives up after
        ``grace`` seconds (what is left stays in the stream for another replica or the next start)."""
        self._stopping.set()
        if self._blocked:
            # The loop waits out its blocking read (up to ``block_ms``) for nothing: drop that
            # connection (the writer's own), which ends the read at once. An entry the read took
            # meanwhile is this consumer's pending one, which the final drain below writes.
            await self._fast.close()
        if self._legacy is not None:
            await stop_task(self._legacy)
        if self._task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(self._task), grace)
            await stop_task(self._task)
        self._own_pending = True
        try:
            await asyncio.wait_for(self.drain(), grace)
            # Leave no consumer behind in the group (its name is this process's alone), unless
            # it still holds entries for another replica to claim.
            mine = await self._redis.xpending_range(self.stream, self.group, "-", "+", 1, consumername=self._name)
            if not mine:
                await self._redis.xgroup_delconsumer(self.stream, self.group, self._name)
        except Exception as exc:  # shutdown goes on; what is not written stays in the stream
            log.warning("%s: final flush failed, entries stay in the stream: %s", self.stream, exc)
        if self._fast is not None:
            await self._fast.close()

    async def drain(self) -> int:
        """Writes everything readable now (own pending entries, then new ones), without blocking;
        whatever was appended before the call is in PostgreSQL when it returns."""
        async with self._lock:
            return await self._drain_once(block=None)

    async def _ensure_group(self) -> None:
        with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists already
            await self._redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)

    async def _run(self) -> None:
        idle_rounds = 0
        while not self._stopping.is_set():
            try:
                async with self._lock:
                    wrote = await self._drain_once(block=self._block_ms)
                    idle_rounds = 0 if wrote else idle_rounds + 1
                    if idle_rounds % 20 == 0:
                        await self._claim_stale()
                        await self._replay_spill()
                        if self._maintain is not None:
                            await self._maintain()
                if 0 < wrote < self._batch:  # a trickle: let the next batch gather
                    await pause(self._stopping, self._linger)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._own_pending = True
                if self._stopping.is_set() and isinstance(exc, RedisConnectionError):
                    return  # stop() dropped the blocking read's connection: it drains next
                if "NOGROUP" in str(exc):  # Redis lost the group (restart without persistence)
                    with contextlib.suppress(Exception):
                        await self._ensure_group()
                log.warning("%s: write failed, will retry: %s", self.stream, exc)
                try:
                    async with self._lock:
                        await self._spill_backlog()
                except Exception as spill_exc:  # Redis away too (nothing to move), or the disk full
                    if not isinstance(spill_exc, RedisError):
                        SPILL_FAILURES.labels(self.stream).inc()
                        log.error("%s: backlog not moved to local disk: %r", self.stream, spill_exc)
                await pause(self._stopping, 1.0)

    async def _spill_backlog(self) -> None:
        """PostgreSQL is away and the stream has grown past ``spill_after`` entries or
        ``spill_bytes`` of Redis's memory (``MEMORY USAGE``, sampled: one entry with content
        logging can be megabytes): batches of it (own pending ones first) go to local disk, each
        acknowledged and deleted only once it is there, until the stream is back to half of
        both — so Redis's memory, which budgets, limits and conversations share, is not what a
        database outage fills."""
        if self._spill_to is None or self._spill_after <= 0:
            return
        length = int(await self._call("XLEN", self.stream) or 0)
        try:
            used = int(await self._call("MEMORY", "USAGE", self.stream) or 0)
        except ResponseError:  # a managed Redis that refuses MEMORY: by the count alone
            used = 0
        over_n = length - self._spill_after // 2 if length > self._spill_after else 0
        over_b = used - self._spill_bytes // 2 if used > self._spill_bytes else 0
        if not over_n and not over_b:
            return
        moved = moved_bytes = 0
        for start in ("0", ">"):
            while moved < over_n or moved_bytes < over_b:
                more, found = await self._read(start, None)
                if not found:
                    break
                records = [self._stamped(i, fields) for i, fields in found if fields]
                if records:  # (on disk, fsynced, in a worker thread: not on the event loop)
                    await asyncio.to_thread(self._spill_to, records)
                await self._ack(found)
                moved += len(found)
                moved_bytes += sum(len(k) + len(v) for fields in records for k, v in fields.items())
                if not more:
                    break
        self._own_pending = False
        SPILLED.labels(self.stream).inc(moved)
        log.warning(
            "%s: PostgreSQL away and %d entries (%d bytes) waiting: %d moved to local disk",
            self.stream, length, used, moved,
        )  # fmt: skip

    async def _replay_spill(self) -> None:
        """What was moved to local disk, written to PostgreSQL (bounded batches; a record it
        refuses goes to the dead letters as the stream's would)."""
        if self._spill is None:
            return
        for work in self._spill.claim():
            for records in chunks(work, self._max_bytes, self._batch):
                await self._write_or_isolate(records)
            work.unlink()

    async def _call(self, *args, limit_s: float | None = None):
        if self._fast is not None:
            return await self._fast.execute(*args, limit_s=limit_s)
        return await self._redis.execute_command(*args)

    async def _script(self, source: str, *args):
        """One of this module's scripts over the stream (loaded again if Redis forgot it)."""
        sha = self._shas.get(source)
        if sha is not None:
            try:
                return await self._call("EVALSHA", sha, 1, self.stream, *args)
            except NoScriptError:  # the server restarted and forgot the script
                pass
        loaded = await self._call("SCRIPT", "LOAD", source)
        self._shas[source] = loaded.decode() if isinstance(loaded, bytes) else loaded
        return await self._call("EVALSHA", self._shas[source], 1, self.stream, *args)

    async def _bounded(
        self, start: str, limit: int, budget: int, after: bytes | str = ""
    ) -> tuple[bool, list[tuple[bytes, dict]]]:
        more, raw = await self._script(_READ, self.group, self._name, start, limit, budget, after)
        return bool(more), entries(raw)

    async def _read(self, start: str, block: int | None) -> tuple[bool, list[tuple[bytes, dict]]]:
        """A batch (bounded in entries and bytes) and whether the stream may hold more now.
        ``block``: with nothing to read, wait that long (ms) for the next entry."""
        more, found = await self._bounded(start, self._batch, self._max_bytes)
        if found or block is None or start != ">":
            return more, found
        # a blocking read cannot run in a script: wait for one entry, then take what fits beside it
        first = await self._wait_one(block)
        if not first:
            return False, []
        room = self._max_bytes - sum(len(v) for _, fields in first for v in fields.values())
        if self._batch <= 1 or room <= 0:
            return True, first
        more, rest = await self._bounded(">", self._batch - 1, room, first[-1][0])
        return more, first + rest

    async def _wait_one(self, block: int) -> list[tuple[bytes, dict]]:
        if self._fast is not None:
            if self._stopping.is_set():
                return []
            limit = block / 1000 + REPLY_S  # the reply comes after the wait: the timeout must not cut it
            self._blocked = True
            try:
                reply = await self._fast.execute(
                    "XREADGROUP", "GROUP", self.group, self._name, "COUNT", 1, "BLOCK", block,
                    "STREAMS", self.stream, ">", limit_s=limit,
                )  # fmt: skip
            finally:
                self._blocked = False
            return entries(reply[0][1]) if reply else []
        reply = await self._redis.xreadgroup(self.group, self._name, {self.stream: ">"}, count=1, block=block)
        if not reply:
            return []
        # RESP2 answers a list of [stream, entries]; RESP3 a dict {stream: [entries]}
        found = next(iter(reply.values()))[0] if isinstance(reply, dict) else reply[0][1]
        return [(entry_id, fields or {}) for entry_id, fields in found]

    async def _drain_once(self, block: int | None) -> int:
        total = 0
        for start in ("0", ">") if self._own_pending else (">",):
            while True:
                more, found = await self._read(start, block if start == ">" else None)
                if not found:
                    break
                await self._commit(found)
                total += len(found)
                if not more:
                    break
            if start == "0":
                self._own_pending = False
        return total

    async def _commit(self, found: list[tuple[bytes, dict]]) -> None:
        if self._stamp is None:
            records = [fields for _, fields in found if fields]  # (a deleted entry has none)
        else:
            records = [self._stamped(i, fields) for i, fields in found if fields]
        if records:
            await self._write_or_isolate(records)
        await self._ack(found)

    def _stamped(self, entry: bytes | str, fields: dict) -> dict:
        """The record with ``stamp`` (its entry id's time) when the writer asks for it."""
        if self._stamp is None or self._stamp in fields:
            return fields
        ms = int(_text(entry).split("-", 1)[0])
        return {**fields, self._stamp: f"{ms // 1000}.{ms % 1000:03d}".encode()}

    async def _ack(self, found: list[tuple[bytes, dict]]) -> None:
        """The entries acknowledged and deleted (once they are in PostgreSQL, or on local disk)."""
        ids = [i for i, _ in found]
        ack, delete = ("XACK", self.stream, self.group, *ids), ("XDEL", self.stream, *ids)
        if self._fast is not None:  # (one write and one wait for both: no task per command)
            await self._fast.execute_many([ack, delete])
            return
        await asyncio.gather(self._call(*ack), self._call(*delete))

    async def _write_or_isolate(self, records: list[dict]) -> None:
        """One record PostgreSQL refuses alone goes to the dead-letter stream (``<stream>:dead``),
        once: the record read again (its acknowledgement lost to a Redis blip, a spill file
        replayed again after a replay stopped half way) finds its letter there (``DEAD_ONCE``)."""
        dead = f"{self.stream}:dead"
        for record, sqlstate in await write_or_isolate(self._write_batch, records):
            fields = {**self.dead_record(record), b"error": sqlstate}
            flat = [part for pair in fields.items() for part in pair]
            tagged = self._dead_tag is not None
            tag = (self._dead_tag(record) or "") if tagged else ""
            keys = [dead, tag_streams(dead)[0], dead_key(dead, record)]
            added = await self._redis.eval(
                DEAD_ONCE, 3, *keys, DEAD_MAX, "1" if tagged else "0", tag, DEAD_KEY_TTL, *flat
            )
            if added:
                log.error("%s: record refused by PostgreSQL (%s), moved to %s", self.stream, sqlstate, dead)
                DEAD_LETTERS.labels(self.stream).inc()

    async def _write_batch(self, records: list[dict]) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await self._write(conn, records)

    def dead_record(self, record: dict) -> dict:
        """What of a refused record its dead letter keeps (a writer may drop what must not
        linger, such as message content)."""
        return record

    # ---- dead letters and depth, for the admin API (/admin/streams) -----------------------------
    async def stats(self) -> dict:
        """Entries waiting (``length``), read but not yet written (``pending``), and dead letters."""
        length = await self._redis.xlen(self.stream)
        dead = await self._redis.xlen(f"{self.stream}:dead")
        try:
            pending = (await self._redis.xpending(self.stream, self.group))["pending"]
        except ResponseError:  # no group yet
            pending = 0
        return {"length": int(length), "pending": int(pending), "dead_letters": int(dead)}

    async def dead_letters(self, limit: int = 100, after: str | None = None) -> tuple[list[dict], bool]:
        """The oldest dead letters first (after ``after``, an id): id, the error PostgreSQL gave
        (its SQLSTATE), the record's fields as text (each cut at ``DEAD_FIELD_CHARS``); and
        whether there may be more. A page stops after about ``DEAD_PAGE_BYTES`` of records read
        (a memory dead letter is a whole turn), sized one by one in Redis (``DEAD_PAGE``), which
        sends each field already cut: this process never holds a whole large record."""
        start = "-" if after is None else f"({after}"
        more, raw = await self._redis.eval(
            DEAD_PAGE, 1, f"{self.stream}:dead", start, limit, DEAD_PAGE_BYTES, DEAD_FIELD_CHARS * 4
        )
        out: list[dict] = []
        for entry_id, fields in entries(raw):
            text = {_text(k): _text(v)[:DEAD_FIELD_CHARS] for k, v in fields.items()}
            error = text.pop("error", None)
            letter = {"id": _text(entry_id), "object": "stream.dead_letter", "error": error or None}
            out.append({**letter, "record": text})
        return out, bool(more)

    async def retry_dead(self, dead_id: str) -> bool:
        """Moves a dead letter back to the stream (after the cause is mended: a column widened, a
        constraint changed), where the writer takes it as any entry; False if there is none."""
        if not entry_id(dead_id):
            return False
        revived = bool(await self._redis.eval(_REVIVE, 2, f"{self.stream}:dead", self.stream, dead_id))
        await forget(self._redis, f"{self.stream}:dead", dead_id)  # (back in the stream)
        return revived

    async def drop_dead(self, dead_id: str) -> bool:
        if not entry_id(dead_id):
            return False
        await forget(self._redis, f"{self.stream}:dead", dead_id)
        return bool(await self._redis.xdel(f"{self.stream}:dead", dead_id))

    async def drop_dead_tagged(self, tags: set[str]) -> int:
        """Drops the dead letters tagged with one of ``tags`` (``dead_tag``); the number dropped.
        Reads the tags only (``core.dead_tags.drop_tagged``): at most ``DEAD_MAX / TAG_SCAN`` short
        calls whatever the records' sizes (and as many for an older release's, ``_tag_older_dead``)."""
        return await drop_tagged(self._redis, f"{self.stream}:dead", tags)

    async def _tag_older_dead(self) -> None:
        """Once per stream: the dead letters there before they were tagged (an older release's) get
        their tags in ``<stream>:dead:tags0`` (``core.dead_tags.tag_older``), each field cut (a
        record's first bytes name its conversation), so an erasure finds them too."""
        if self._dead_tag is not None:
            await tag_older(self._redis, f"{self.stream}:dead", self._name, self._dead_tag, self._stopping, 2048)

    async def _claim_stale(self) -> None:
        """Entries a dead consumer read but never acknowledged become ours (bounded like reads)."""
        start = "0-0"
        while True:
            start, raw = await self._script(
                _CLAIM, self.group, self._name, self._claim_idle_ms, start, self._batch, self._max_bytes
            )
            claimed = entries(raw)
            if claimed:
                await self._commit(claimed)
            if start in (b"0-0", "0-0"):
                return
