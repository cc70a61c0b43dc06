"""Dead letters found by a tag: what an erasure or a retention drops without reading the records.

A dead-letter stream ``<dead>`` whose records hold what must stay erasable (a conversation's
turns in the memory writer's, a customer's message in a channel queue's) keeps beside it, under
each record's own id, the record's tag alone in ``<dead>:tags`` (written in the same script as
the record: ``DEAD_ONCE`` for a stream writer's, its own finishing script for a queue's). Dead
letters written before their stream was tagged (an older release's) get their tags once, in
``<dead>:tags0`` (``tag_older``), from the records themselves. ``drop_tagged`` reads the tags
alone, ``TAG_SCAN`` a call, and drops the records of the tags asked for: short calls whatever
the records' sizes, never one script over a whole dead-letter stream.

A stream writer's record gets one dead letter however often it is refused (``DEAD_ONCE``, keyed
by ``dead_key``): read again after a lost acknowledgement, or replayed again from a spill file.
A queue's dead letter is written with the entry's acknowledgement, in one script
(``core.queue``).

Used by ``core.stream_writer.StreamWriter`` (the memory writer) and ``core.queue.Queue`` (the
WhatsApp channel's queues).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable

log = logging.getLogger("gateway.streams")

DEAD_PAGE_BYTES = 8 * 1024 * 1024  # records read for one page of dead letters (then: has_more)
OLDER_PAGE = 500  # dead letters read per call while tagging an older release's


def tag_streams(dead: str) -> tuple[str, str]:
    """The tags of a dead-letter stream's records: those tagged when they died, and those tagged
    afterwards (``tag_older``)."""
    return f"{dead}:tags", f"{dead}:tags0"


# A dead letter with its tag: the record in ``<dead>`` and, under the same id, its tag alone in
# ``<dead>:tags`` — both trimmed to the newest ARGV[1] exactly, so they hold the same ids (the tags
# are what a search reads, never the records). KEYS: dead, tags. ARGV: most kept, the tag ('' none),
# then the record's fields and values.
DEAD_TAGGED = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[1], '*', unpack(ARGV, 3))
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[1], id, 't', ARGV[2])
return id
"""

DEAD_KEY_TTL = 7 * 24 * 3600  # seconds a dead letter's key is kept (a record read again within it: no second letter)

# A record's dead letter, once: KEYS[3] (``dead_key``: the record's own key) names the dead letter
# already written for the record, if any, and while that letter is in the stream no second one is
# written (the record read again after a Redis blip cut the acknowledgement, a spill replayed again
# after it stopped half way). A letter retried, dropped or trimmed is gone: the record, refused
# again, gets a new one. KEYS: dead, tags, the record's key. ARGV: most kept, '1' tagged ('0' not:
# trimmed about, no tags), the tag, the key's ttl, then the record's fields and values. Returns
# the new letter's id, or false when the record has one already.
DEAD_ONCE = """
local known = redis.call('GET', KEYS[3])
if known and #redis.call('XRANGE', KEYS[1], known, known) > 0 then return false end
local id
if ARGV[2] == '1' then
  id = redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[1], '*', unpack(ARGV, 5))
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[1], id, 't', ARGV[3])
else
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 5))
end
redis.call('SET', KEYS[3], id, 'EX', ARGV[4])
return id
"""


def dead_key(dead: str, record: dict) -> str:
    """The Redis key naming ``record``'s dead letter in ``dead``: a digest of the record's fields
    (the same record read again, from the stream or a spill file, has the same key; the digest
    keeps none of its content readable)."""
    digest = hashlib.blake2b(digest_size=16, person=b"gw-dead-letter")
    for name in sorted(record):
        value = record[name]
        for part in (name, value):
            raw = part if isinstance(part, bytes) else str(part).encode()
            digest.update(len(raw).to_bytes(8, "big"))
            digest.update(raw)
    return f"{dead}:once:{digest.hexdigest()}"


# A page of dead letters: one entry at a time, until ARGV[2] entries or ARGV[3] bytes of fields read
# (the entry that passes the budget included), each field sent cut to its first ARGV[4] bytes.
# KEYS: dead. ARGV: the start ('-', or '(' and an id), most entries, byte budget, bytes kept of a
# field. Returns {more (0: the stream ended), entries}.
DEAD_PAGE = """
local out, read, start = {}, 0, ARGV[1]
local limit, budget, cut = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
while #out < limit and read < budget do
  local got = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', 1)
  if #got == 0 then return {0, out} end
  local flat, fields = got[1][2], {}
  for i = 1, #flat, 2 do
    read = read + #flat[i] + #flat[i + 1]
    fields[i] = flat[i]
    fields[i + 1] = string.sub(flat[i + 1], 1, cut)
  end
  out[#out + 1] = {got[1][1], fields}
  start = '(' .. got[1][1]
end
return {1, out}
"""

# The dead letters of some tags dropped, ``TAG_SCAN`` tags read per call (small entries: a call
# takes well under a millisecond whatever the records' sizes). KEYS: dead, tags. ARGV: the
# start ('-', or '(' and the last id read), then the tags. Returns {dropped, the last id read
# ('' when the scan is complete)}.
TAG_SCAN = 1000
DROP_TAGGED = f"""
local wanted = {{}}
for i = 2, #ARGV do wanted[ARGV[i]] = true end
local got = redis.call('XRANGE', KEYS[2], ARGV[1], '+', 'COUNT', {TAG_SCAN})
local dropped = 0
for _, entry in ipairs(got) do
  local fields = entry[2]
  if fields and fields[2] and wanted[fields[2]] then
    dropped = dropped + redis.call('XDEL', KEYS[1], entry[1])
    redis.call('XDEL', KEYS[2], entry[1])
  end
end
if #got < {TAG_SCAN} then return {{dropped, ''}} end
return {{dropped, got[#got][1]}}
"""


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def entries(raw: list) -> list[tuple[bytes, dict]]:
    """``(id, fields)`` of stream entries as RESP2 gives them: ``[id, [k1, v1, k2, v2...]]``, the
    fields nil for an entry deleted since it was read."""
    out = []
    for entry_id, flat in raw:
        pairs = iter(flat or ())
        out.append((entry_id, dict(zip(pairs, pairs, strict=False))))
    return out


async def drop_tagged(redis, dead: str, tags: set[str]) -> int:
    """Drops the dead letters of ``dead`` tagged with one of ``tags``; the number dropped. Reads
    the tags only, ``TAG_SCAN`` a call: at most (the stream's length / ``TAG_SCAN``) short calls
    per tag stream, whatever the records' sizes."""
    if not tags:
        return 0
    dropped = 0
    wanted = sorted(tags)
    for tag_stream in tag_streams(dead):
        start = "-"
        while True:
            n, last = await redis.eval(DROP_TAGGED, 2, dead, tag_stream, start, *wanted)
            dropped += int(n)
            if not last:
                break
            start = f"({_text(last)}"
    return dropped


async def forget(redis, dead: str, dead_id: str) -> None:
    """A dead letter's tag removed (the letter was retried or dropped by its id)."""
    for tag_stream in tag_streams(dead):
        await redis.xdel(tag_stream, dead_id)


def _tag(tag_of: Callable[[dict], str | None], fields: dict) -> str:
    try:
        return tag_of(fields) or ""
    except Exception:  # a record no release could read: untagged, and the others still tagged
        return ""


async def tag_older(
    redis,
    dead: str,
    owner: str,
    tag_of: Callable[[dict], str | None],
    stopping: asyncio.Event,
    cut: int,
) -> None:
    """Once per dead-letter stream (any replica; resumed if it dies): the dead letters there before
    they were tagged (an older release's) get their tags in ``<dead>:tags0``, read a page at a time
    with each field cut to ``cut`` bytes (``DEAD_PAGE``) and tagged by ``tag_of(fields)``, so an
    erasure finds them too. Redis away: the next start tries again."""
    legacy = tag_streams(dead)[1]
    try:
        if await redis.exists(f"{legacy}:done"):
            return
        if not await redis.set(f"{legacy}:lock", owner, nx=True, ex=600):
            return  # another replica is at it
        done = await redis.xrevrange(legacy, count=1)
        start = f"({_text(done[0][0])}" if done else "-"
        while not stopping.is_set():
            more, raw = await redis.eval(DEAD_PAGE, 1, dead, start, OLDER_PAGE, DEAD_PAGE_BYTES, cut)
            found = entries(raw)
            for entry_id, fields in found:
                await redis.xadd(legacy, {"t": _tag(tag_of, fields)}, id=entry_id)
            if not more or not found:
                await redis.set(f"{legacy}:done", "1")
                break
            start = f"({_text(found[-1][0])}"
        await redis.delete(f"{legacy}:lock")
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # Redis away: the next start tries again
        log.warning("%s: older dead letters not tagged yet: %s", dead, exc)
