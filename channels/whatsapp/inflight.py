"""Sends outside the queue in flight: a person's reply, delivered by the admin API's process.

A send of the queue that dies is taken over by the queue (its job is claimed and retried, and a
retry of an erased conversation's job cleans what the dead try wrote: ``Worker._forget_tried``).
A person's reply is sent by the process serving the admin's request: killed between its send and
its post-send check (``erasure.after_send``), nothing retried it, and what the send wrote after
an erasure of its conversation stayed (its send state in Redis, 8 days, the alias of the
customer's number, 90 days, and in PostgreSQL whatever the record left).

So each such send is noted before it goes, with a lease (the time it may take), and the note is
deleted once its check has run. A note whose lease ran out is a send whose process stopped: every
channel worker sweeps them (``sweep``), claiming each for a new lease as ``XAUTOCLAIM`` claims a
stream entry (of several sweepers one takes a note; a sweeper that dies leaves it to the next),
and runs the check the dead process did not: the conversation erased since the send was asked
for, what the send wrote goes. The note names the conversation (the customer's number) only while
the send is in flight, or until the next sweep after its process died.
"""

from __future__ import annotations

import logging
import secrets

import orjson

from channels.whatsapp import erasure
from channels.whatsapp.sender import Sender, sent_wamids

log = logging.getLogger("channels.whatsapp")

KEY = "gw:{gw}:wa:inflight"  # a sorted set: each note, scored by the end of its lease (ms, Redis's clock)
SWEEP_PAGE = 100

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
# KEYS: the notes. ARGV: the note, lease ms.
_NOTE = _NOW + "redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])\nreturn 1\n"
# KEYS: the notes. ARGV: lease ms, at most this many. The notes whose lease ran out, each claimed
# for a new lease (of several sweepers, one gets each).
_CLAIM = (
    _NOW
    + """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, m in ipairs(due) do redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), m) end
return due
"""
)


async def note(redis, tenant: str, conversation: str, account: str, key: str, queued_us: int, lease_ms: int) -> bytes:
    """A send of ``key`` (its send state's) to the conversation, asked for at ``queued_us``, is
    about to go: noted for ``lease_ms``. The note, for ``done``."""
    member = orjson.dumps(
        {"t": tenant, "c": conversation, "a": account, "k": key, "q": queued_us, "n": secrets.token_hex(6)}
    )
    await redis.eval(_NOTE, 1, KEY, member, int(lease_ms))
    return member


async def done(redis, member: bytes) -> None:
    """The send's post-send check has run: nothing is left to do for it."""
    await redis.zrem(KEY, member)


async def sweep(redis, pool, sender: Sender, lease_ms: int, limit: int = SWEEP_PAGE) -> int:
    """The notes whose lease ran out (their process stopped between the send and its check):
    the check run for each (``erasure.after_send``, with the pieces its send state records), then
    the note deleted. A check that fails leaves its note, claimed again once the new lease runs
    out. How many were checked."""
    checked = 0
    for member in await redis.eval(_CLAIM, 1, KEY, int(lease_ms), int(limit)) or ():
        try:
            n = orjson.loads(member)
            tenant, conv, account, key, queued = n["t"], n["c"], n["a"], n["k"], int(n["q"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            await redis.zrem(KEY, member)  # (none of ours: never checked, never kept)
            continue
        try:
            wamids = sent_wamids(await sender.state(account, key))
            if await erasure.after_send(redis, pool, tenant, conv, queued, wamids):
                log.info("whatsapp send of a stopped process, erased meanwhile: forgotten")
        except Exception as exc:  # (PostgreSQL or Redis away: the next sweep after its lease)
            log.warning("whatsapp send of a stopped process not checked yet: %s", type(exc).__name__)
            continue
        await redis.zrem(KEY, member)
        checked += 1
    return checked
