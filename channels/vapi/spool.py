"""VAPI records kept in Redis while an erasure holds their tenant's lock, written afterwards.

A webhook waits ``server.erasure_lock_wait_s`` at most for its tenant's erasure lock (a pooled
connection waits meanwhile). Answered 503 then, a record VAPI does not send again was lost: an
end-of-call report "may be retried", no more. So a record that carries what the call was — its
end-of-call report, a status update, the record of an outbound call just placed — is accepted
(200) and kept here instead, in a Redis list per account (``key``: every replica's; the lists are
named in ``INDEX``), for the writer (``Writer``, one per replica, of the accounts it serves) to
write once the lock is free: it waits for the lock without the
short bound, then, holding it, looks the call's conversation up among the erasures — a status or
a placed call's record of a conversation erased meanwhile is dropped, never written; a report is
written as one sent after the erasure, its duration and cost kept (the call's record, the ledger,
the budgets), not its words nor its caller's number — and writes it as the webhook would have
(``Events.apply``). An erasure drops its conversations' records from the list (``drop``):
they hold the caller's number and words.

The writer reads the list's head without taking it off and removes it once written (``LREM``):
a writer that dies on the way leaves it for the next. Two replicas may write the same record;
each write is idempotent (a report is in once, a status only moves forward), and the budgets are
charged by the one that stored the report. The list holds ``MAX_RECORDS`` and ``MAX_BYTES`` at
most (a report may be a megabyte: its transcript; the bytes held are counted beside the list, under
``bytes_key``, by every script that adds or removes one): past either, the webhook is answered 503
as before (VAPI may send it again), never a record dropped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import asyncpg
import orjson

from core.erasure_key import ErasureInProgress

log = logging.getLogger("gateway.channels.vapi")

INDEX = "gw:{gw}:vapi:spools"
MAX_RECORDS = 100_000  # of one account's list
MAX_BYTES = 64 * 1024 * 1024  # of one account's list (a webhook sender's records, kept in Redis)
DROP_PAGE = 100  # records read per round trip when an erasure looks for its own

# KEYS: the list, the index, the list's byte count; ARGV: the record, MAX_RECORDS, MAX_BYTES
_PUT = """
local n = redis.call('LLEN', KEYS[1])
if n == 0 then redis.call('DEL', KEYS[3]) end
if n >= tonumber(ARGV[2]) then return 0 end
local size = string.len(ARGV[1])
if tonumber(redis.call('GET', KEYS[3]) or '0') + size > tonumber(ARGV[3]) then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('INCRBY', KEYS[3], size)
redis.call('SADD', KEYS[2], KEYS[1])
return 1
"""
# KEYS: the list, its byte count; ARGV: the record, LREM's count. The number removed.
_REMOVE = """
local n = redis.call('LREM', KEYS[1], tonumber(ARGV[2]), ARGV[1])
if n > 0 and (redis.call('DECRBY', KEYS[2], n * string.len(ARGV[1])) <= 0 or redis.call('LLEN', KEYS[1]) == 0) then
  redis.call('DEL', KEYS[2])
end
return n
"""

# KEYS: the list, its byte count; ARGV: a record, what replaces it (everywhere it is). How many.
_REPLACE = """
local at = redis.call('LPOS', KEYS[1], ARGV[1], 'COUNT', 0)
for _, i in ipairs(at) do redis.call('LSET', KEYS[1], i, ARGV[2]) end
if #at > 0 then redis.call('INCRBY', KEYS[2], #at * (string.len(ARGV[2]) - string.len(ARGV[1]))) end
return #at
"""

_PREFIX = "gw:{gw}:vapi:spool:"
_BYTES_PREFIX = "gw:{gw}:vapi:spool-bytes:"


def key(tenant: str, account: str) -> str:
    """The list of one account's spooled records."""
    return _PREFIX + orjson.dumps([tenant, account]).decode()


def bytes_key(list_key: bytes | str) -> str:
    """The count of the bytes a list holds."""
    raw = list_key.decode() if isinstance(list_key, bytes) else list_key
    return _BYTES_PREFIX + raw.partition(_PREFIX)[2]


async def _remove(redis, list_key: bytes | str, raw: bytes, count: int) -> int:
    return int(await redis.eval(_REMOVE, 2, list_key, bytes_key(list_key), raw, count))


def _tenant_of(list_key: bytes | str) -> str | None:
    raw = list_key.decode() if isinstance(list_key, bytes) else list_key
    try:
        tenant, _ = orjson.loads(raw.partition(_PREFIX)[2])
    except (orjson.JSONDecodeError, ValueError, TypeError):
        return None
    return tenant if isinstance(tenant, str) else None


class Spool:
    """The list of records waiting for their tenant's erasure lock (``redis``: redis-py asyncio)."""

    def __init__(self, redis) -> None:
        self.redis = redis
        self._put = redis.register_script(_PUT)
        self.wake = asyncio.Event()  # set when this process spools one (its writer need not wait)

    async def put(self, record: dict, refused: ErasureInProgress) -> None:
        """Keeps ``record`` (tenant, conversation_id, kind...) for the writer; re-raises ``refused``
        (503, VAPI sends it again) when the list is full (records or bytes) or Redis cannot take it."""
        try:
            list_key = key(record["tenant"], record["account"])
            kept = await self._put(
                keys=[list_key, INDEX, bytes_key(list_key)], args=[orjson.dumps(record), MAX_RECORDS, MAX_BYTES]
            )
        except Exception as exc:
            log.error("VAPI record not spooled: %s", type(exc).__name__)
            raise refused from None
        if not kept:
            log.error("VAPI record not spooled: the spool holds %d records or %d bytes", MAX_RECORDS, MAX_BYTES)
            raise refused
        self.wake.set()

    async def head(self, list_key: str) -> bytes | None:
        return await self.redis.lindex(list_key, 0)

    async def remove(self, list_key: str, raw: bytes) -> None:
        await _remove(self.redis, list_key, raw, 1)


async def drop(redis, tenant: str, conversations: list[str]) -> int:
    """Drops the tenant's spooled records of these conversations (an erasure's): the number
    dropped. A report is not dropped but kept without its words and its caller (``_erased``): its
    duration and cost are the ledger's and the budgets'. Read a page at a time after the last
    record kept, found again by value (``LPOS``), as writers take the list's head meanwhile (a
    record a writer holds is checked against the erasures under the lock before it is written)."""
    wanted = set(conversations)
    dropped = 0
    for list_key in await redis.smembers(INDEX):
        if _tenant_of(list_key) == tenant:
            dropped += await _drop_from(redis, list_key, tenant, wanted)
    return dropped


async def _drop_from(redis, list_key, tenant: str, wanted: set[str]) -> int:
    dropped = 0
    after: bytes | None = None
    for _ in range(MAX_RECORDS // DROP_PAGE + 2):  # (bounded: the list holds MAX_RECORDS at most)
        start = 0
        if after is not None:
            pos = await redis.lpos(list_key, after)
            start = pos + 1 if pos is not None else 0
        page = await redis.lrange(list_key, start, start + DROP_PAGE - 1)
        for raw in page:
            record = _decode(raw)
            if record is None or record.get("tenant") != tenant or record.get("conversation_id") not in wanted:
                after = raw
            elif record.get("kind") == "report" and not record.get("erased"):
                kept = orjson.dumps(_erased(record))
                dropped += int(await redis.eval(_REPLACE, 2, list_key, bytes_key(list_key), raw, kept))
                after = kept
            elif record.get("kind") == "report":
                after = raw  # (kept without its words already)
            else:
                dropped += await _remove(redis, list_key, raw, 0)
        if len(page) < DROP_PAGE:
            break
    return dropped


_CALL_KEPT = ("call_id", "call_type", "assistant_id", "phone_number_id", "called_number", "status")
_REPORT_KEPT = ("ended_reason", "duration_s", "cost_usd", "ended_at")


def _erased(record: dict) -> dict:
    """A report of an erased conversation as it is kept: its call's ids, duration and cost; not its
    words (transcript, summary, recording link), its caller (number, name) nor its metadata."""
    info = record.get("info") if isinstance(record.get("info"), dict) else {}
    report = record.get("report") if isinstance(record.get("report"), dict) else {}
    return {
        **{k: record.get(k) for k in ("kind", "tenant", "account", "conversation_id", "agent")},
        "erased": True,
        "info": {k: info.get(k) for k in _CALL_KEPT},
        "report": {
            **{k: report.get(k) for k in _REPORT_KEPT},
            **dict.fromkeys(("transcript", "recording_url", "summary")),
        },
    }


def _decode(raw: bytes) -> dict | None:
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


# (a record that can never be written: not the shape it was spooled in, a value PostgreSQL refuses)
_NEVER = (KeyError, TypeError, ValueError, asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)


class Writer:
    """Writes the spooled records, oldest first (``apply``: one record written, or dropped when its
    conversation was erased; raises when PostgreSQL cannot take it yet, to be tried again after
    ``interval_s``). Records that can never be written (not a record, a value PostgreSQL refuses)
    are dropped with a log line naming no content."""

    def __init__(
        self,
        spool: Spool,
        apply: Callable[[dict], Awaitable[object]],
        accounts: list[tuple[str, str]],
        interval_s: float = 1.0,
    ) -> None:
        self.spool = spool
        self.apply = apply
        self.keys = [key(tenant, account) for tenant, account in accounts]  # (tenant, account name)
        self.interval_s = interval_s
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="vapi-spool-writer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def drain(self, limit: int = 1000) -> int:
        """Up to ``limit`` records of each account written (or dropped): how many left the lists."""
        done = 0
        for list_key in self.keys:
            done += await self._drain(list_key, limit)
        return done

    async def _drain(self, list_key: str, limit: int) -> int:
        done = 0
        for _ in range(limit):
            raw = await self.spool.head(list_key)
            if raw is None:
                break
            record = _decode(raw)
            if record is None:
                log.error("VAPI spooled record dropped: not a record")
            else:
                try:
                    await self.apply(record)
                except _NEVER as exc:
                    log.error("VAPI spooled %s record dropped: %s", record.get("kind"), type(exc).__name__)
            await self.spool.remove(list_key, raw)
            done += 1
        return done

    async def _run(self) -> None:
        while True:
            self.spool.wake.clear()
            try:
                await self.drain()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # PostgreSQL or Redis away, the lock not granted: next round
                log.warning("VAPI spool not written yet: %s", type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.spool.wake.wait(), self.interval_s)
