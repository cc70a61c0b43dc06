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
for, what the send wrote goes.

A note never holds the conversation's id (the customer's number), nor a plain hash of it: it
names the conversation by what the check needs, the keyed digest its Redis keys are named by
(``store.conversation_digest``: the erasure's mark, the send states' and aliases' indexes) and
its keyed hash (``core.erasure_key.conversation_hash``: the tag its records take), and the send
by its account and key. A note an older release wrote (``"c"``, the id; ``"d"``, a plain hash) is
read as well; the worker's start rewrites them all (``upgrade``), and an erasure those of its
conversation at once (``neutralise``) rather than leave the number until a sweep.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from channels.whatsapp import erasure
from channels.whatsapp.sender import Sender, sent_wamids
from channels.whatsapp.store import conversation_digest, digest_of, digests
from core.erasure_key import conversation_hash, is_legacy_name

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
# KEYS: the notes. ARGV: a note, what replaces it (under the same lease).
_REPLACE = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], score, ARGV[2])
return 1
"""


@dataclass(frozen=True, slots=True)
class Note:
    tenant: str
    digest: str  # store.conversation_digest of the conversation
    hashed: str  # core.erasure_key.conversation_hash of it
    account: str
    key: str
    queued_us: int


def _member(tenant: str, conversation: str, account: str, key: str, queued_us: int, nonce: str) -> bytes:
    digest, hashed = conversation_digest(tenant, conversation), conversation_hash(tenant, conversation)
    return _member_of(Note(tenant, digest, hashed, account, key, queued_us), nonce)


def _member_of(n: Note, nonce: str) -> bytes:
    return orjson.dumps(
        {"t": n.tenant, "d": n.digest, "h": n.hashed, "a": n.account, "k": n.key, "q": n.queued_us, "n": nonce}
    )


def read(member: bytes) -> Note | None:
    """What a note says (None: not a note of ours); an older release's, naming the conversation
    by its id, is read as a note of its hashes."""
    try:
        n = orjson.loads(member)
        tenant, account, key, queued = n["t"], n["a"], n["k"], int(n["q"])
        if "c" in n:
            digest, hashed = conversation_digest(tenant, n["c"]), conversation_hash(tenant, n["c"])
        else:
            digest, hashed = n["d"], n["h"]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    if not all(isinstance(v, str) for v in (tenant, digest, hashed, account, key)):
        return None
    return Note(tenant, digest, hashed, account, key, queued)


def names(member: bytes, tenant: str, conversation: str) -> bool:
    """Whether the note is of the tenant's conversation."""
    found = read(member)
    return found is not None and found.tenant == tenant and found.digest in digests(tenant, conversation)


async def note(redis, tenant: str, conversation: str, account: str, key: str, queued_us: int, lease_ms: int) -> bytes:
    """A send of ``key`` (its send state's) to the conversation, asked for at ``queued_us``, is
    about to go: noted for ``lease_ms``. The note, for ``done``."""
    member = _member(tenant, conversation, account, key, queued_us, secrets.token_hex(6))
    await redis.eval(_NOTE, 1, KEY, member, int(lease_ms))
    return member


async def neutralise(redis, tenant: str, conversations: list[str]) -> int:
    """The notes an older release wrote of the tenant's conversations, naming each by its id (the
    customer's number) or by a plain hash of it (which gives the number back), rewritten as this
    release writes them (its keyed hashes), under the same lease: an erasure's. (That release's
    ``done`` then misses its note, which a sweep checks and deletes once its lease runs out.) How
    many were rewritten."""
    names = {d for c in conversations for d in digests(tenant, c)}
    return await _rewrite(redis, lambda n: n.tenant == tenant and n.digest in names)


async def upgrade(redis) -> int:
    """Every note an older release wrote, rewritten as ``neutralise`` rewrites an erased
    conversation's (``names.upgrade``, at the worker's start). How many were rewritten."""
    return await _rewrite(redis, lambda n: True)


def _renamed(member: bytes) -> tuple[Note, bytes] | None:
    """An older release's note (``"c"``: the id; ``"d"`` a plain hash) and what this release writes
    for it; None for a note of this release's, or none of ours."""
    found = read(member)
    if found is None:
        return None
    n = orjson.loads(member)
    if "c" not in n and not is_legacy_name(found.digest):
        return None
    digest = digest_of(found.digest) if is_legacy_name(found.digest) else found.digest
    again = Note(found.tenant, digest, found.hashed, found.account, found.key, found.queued_us)
    return found, _member_of(again, str(n.get("n", "")))


async def _rewrite(redis, which: Callable[[Note], bool]) -> int:
    rewritten = 0
    cursor = 0
    while True:
        cursor, page = await redis.zscan(KEY, cursor, count=SWEEP_PAGE)
        for member, _ in page:
            renamed = _renamed(member)
            if renamed is not None and which(renamed[0]):
                rewritten += int(await redis.eval(_REPLACE, 1, KEY, member, renamed[1]))
        if not int(cursor):
            return rewritten


async def done(redis, member: bytes) -> None:
    """The send's post-send check has run: nothing is left to do for it."""
    await redis.zrem(KEY, member)


async def sweep(redis, pool, sender: Sender, lease_ms: int, limit: int = SWEEP_PAGE) -> int:
    """The notes whose lease ran out (their process stopped between the send and its check):
    the check run for each (``erasure.after_noted_send``, with the pieces its send state records), then
    the note deleted. A check that fails leaves its note, claimed again once the new lease runs
    out. How many were checked."""
    checked = 0
    for member in await redis.eval(_CLAIM, 1, KEY, int(lease_ms), int(limit)) or ():
        n = read(member)
        if n is None:
            await redis.zrem(KEY, member)  # (none of ours: never checked, never kept)
            continue
        try:
            wamids = sent_wamids(await sender.state(n.account, n.key))
            if await erasure.after_noted_send(
                redis, pool, n.tenant, n.account, n.digest, n.hashed, n.queued_us, wamids
            ):
                log.info("whatsapp send of a stopped process, erased meanwhile: forgotten")
        except Exception as exc:  # (PostgreSQL or Redis away: the next sweep after its lease)
            log.warning("whatsapp send of a stopped process not checked yet: %s", type(exc).__name__)
            continue
        await redis.zrem(KEY, member)
        checked += 1
    return checked
