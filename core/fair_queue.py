"""A queue that serves its keys in turn: one busy key (a tenant that uploaded 1,000 files) cannot
make another key's next message wait behind all of its own.

``FairQueue`` is a core/queue.py ``Queue`` whose messages wait per key, each key with messages
waiting holding exactly one *token* in a stream of tokens. A worker that reads a token takes the
key's next message at once and, when the key still has messages waiting, appends a fresh token
for the key to the stream's tail before it starts the work. So consecutive reads cycle through
the keys that have work (round-robin: with K busy keys, a key's next message waits for at most
one message of each other key per free worker), while one key alone still fills every worker of
every replica (the scheduler is work-conserving: no per-key cap, no lanes).

Two levels (``sub_key_of``): within a key's turns, its sub-keys take turns too (a tenant's
knowledge bases: one with 1,000 documents does not hold another's one). A key's messages wait in
a sorted set scored by *round*: a sub-key's next message goes one round after its previous one
(and no earlier than the round being served), and the key's turn takes the lowest round. So each
round serves every busy sub-key once, and a key with one sub-key (no ``sub_key_of``) is served in
arrival order. Everything stays in the key's own keys, named in each script's KEYS.

Unlike ``ordered=True``, a key's messages are not kept in order and a failing message does not
hold its key: a message being retried waits in its own delayed set and goes back to the *front*
of its key's list when due, so the key's other messages keep flowing meanwhile. Everything else
is the Queue's: at-least-once delivery, claims renewed while a handler runs, claimed from a worker
that died once its liveness ran out (a failed attempt), retries with backoff, dead letters,
dedupe, ``max_depth`` and ``max_per_key``. A worker that dies between reading a key's token and
taking the key's head holds the key's only token: it is claimed the same way (the key's turn is
not lost for the visibility timeout), and the head, which no handler saw, goes back to the front
of its key's list without counting an attempt.

Keys, for a queue ``P = gw:{gw}:q:<name>`` (one hash tag, as the Queue's):

- ``P:fair``          the token stream the consumer group reads (field ``k``: a key's hash).
- ``P:fair:z:<hash>`` a key's waiting messages (member: the sub-key's hash, then the message),
                      scored by round.
- ``P:fair:r:<hash>`` the key's rounds: ``_`` the round last taken; a sub-key's hash, the round
                      of its last waiting message.
- ``P:fair:k:<hash>`` the list an earlier layout of this class kept: still taken first, never
                      written to except by a retry that layout had delayed.
- ``P:fair:taken``    token entry id → the message its reader took: a worker that dies mid-message
                      leaves it there, and whoever claims the entry gets the same message.
- ``P:fair:delayed``  messages waiting for a retry (member: the key's and the sub-key's hashes,
                      then the message).
- ``P:fair:consumers`` the running consumers' liveness (core/queue.py).
- ``P:live``, ``P:dead``, ``P:n``, ``P:d:<hash>`` shared with a plain Queue of the same name.

Upgrades: a plain Queue of the same name (what a release before this one used) keeps its stream
``P`` and its delayed set ``P:delayed``. A release with FairQueue never writes to them, and also
drains them with a plain consumer of its own (one message at a time), so messages queued before
the upgrade — or by an older replica still running beside a new one — are processed, and an old
replica never sees a token it cannot read. Dead letters are shared: a new release's ``retry_dead``
puts any of them (an old one keyed by ``key_of``) back in turn; an old release's puts them on ``P``.

Rollbacks: ``downgrade()`` (``gateway queue downgrade <name>``) moves every message of this
release to ``P`` and ``P:delayed``, where a release before FairQueue reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import orjson

from core.queue import (
    MOVE_BATCH,
    Job,
    Queue,
    _digest,
    _jobs,
    _messages,
    _oldest,
    _s,
    log,
)
from core.queue_scripts import OWNED as _OWNED
from core.queue_scripts import STAMP

# Where a key's messages wait: ``z`` (a sorted set of sub-key hash .. message, scored by round),
# ``r`` (the key's rounds: ``_`` the round last taken, a sub-key's hash the round of its last
# waiting message) and ``l`` (the list an earlier layout kept, drained first). A new message of a
# sub-key goes one round after that sub-key's last (at least the current round): so a key's
# turns go round its sub-keys (a knowledge base of 1,000 documents and one of 1 each get the next
# turn in turn), and one sub-key alone is served in arrival order. ``front`` (a retry coming
# back): the current round. Returns whether nothing of the key was waiting before.
_PLACE = """
local function place(z, r, l, sub, m, front)
  local empty = redis.call('ZCARD', z) + redis.call('LLEN', l) == 0
  local cur = tonumber(redis.call('HGET', r, '_') or '0')
  local last = redis.call('HGET', r, sub)
  local round = cur
  if front then
    if not last or tonumber(last) < cur then redis.call('HSET', r, sub, cur) end
  else
    if last and tonumber(last) + 1 > cur then round = tonumber(last) + 1 end
    redis.call('HSET', r, sub, round)
  end
  redis.call('ZADD', z, round, sub .. m)
  return empty
end
"""

# KEYS: stream, taken, z, r, l. ARGV: group, consumer, entry_id, keyhash.
# Returns {1, message} (just taken); {3, message} (taken by this entry's reader before: a worker
# that stopped); {2} when the key had nothing left (the token is dropped); {0} when this consumer
# does not own the entry (it was claimed by another).
_TAKE = (
    _OWNED
    + """
if not owned(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return {0} end
local m = redis.call('HGET', KEYS[2], ARGV[3])
if m then return {3, m} end
m = redis.call('LPOP', KEYS[5])
if not m then
  local top = redis.call('ZPOPMIN', KEYS[3])
  if #top == 0 then
    redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
    redis.call('XDEL', KEYS[1], ARGV[3])
    redis.call('DEL', KEYS[4])
    return {2}
  end
  local sub = string.sub(top[1], 1, 32)
  m = string.sub(top[1], 33)
  redis.call('HSET', KEYS[4], '_', top[2])
  local last = redis.call('HGET', KEYS[4], sub)
  if last and tonumber(last) <= tonumber(top[2]) then redis.call('HDEL', KEYS[4], sub) end
end
redis.call('HSET', KEYS[2], ARGV[3], m)
if redis.call('ZCARD', KEYS[3]) + redis.call('LLEN', KEYS[5]) > 0 then
  redis.call('XADD', KEYS[1], '*', 'k', ARGV[4])
else
  redis.call('DEL', KEYS[4])
end
return {1, m}
"""
)

# KEYS: stream, live, delayed, dead, counters, taken
# ARGV: group, consumer, entry_id, mode (done|retry|dead), job_id, packed, due_ms, key and sub-key
#       hashes, failed_at, dead_max, count_retry
_FINISH = (
    _OWNED
    + """
if not owned(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
redis.call('HDEL', KEYS[6], ARGV[3])
if ARGV[4] == 'retry' then
  redis.call('ZADD', KEYS[3], ARGV[7], ARGV[8] .. ARGV[6])
  if ARGV[11] == '1' then redis.call('HINCRBY', KEYS[5], 'retries', 1) end
  return 1
end
if ARGV[4] == 'dead' then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[10], '*', 'm', ARGV[6], 'failed_at', ARGV[9])
  redis.call('HINCRBY', KEYS[5], 'dead', 1)
end
redis.call('ZREM', KEYS[2], ARGV[5])
return 1
"""
)

# KEYS: delayed, stream, then z, r, l of each member's key. ARGV: the due members (read by the
# caller; member: key hash, sub-key hash, message — or, from an earlier layout, key hash and
# message, which goes back to the front of the key's list). A due message goes back to the front
# of its key; a member another worker moved meanwhile is skipped. Every key is named in KEYS: a
# cluster (or a server such as Dragonfly) that checks a script's keys against the declared ones
# accepts it.
_MOVE_DUE = (
    _PLACE
    + """
local moved = 0
for i, m in ipairs(ARGV) do
  if redis.call('ZREM', KEYS[1], m) == 1 then
    moved = moved + 1
    local z, r, l = KEYS[3 * i], KEYS[3 * i + 1], KEYS[3 * i + 2]
    local empty
    if string.sub(m, 33, 33) == '{' then
      empty = redis.call('ZCARD', z) + redis.call('LLEN', l) == 0
      redis.call('LPUSH', l, string.sub(m, 33))
    else
      empty = place(z, r, l, string.sub(m, 33, 64), string.sub(m, 65), true)
    end
    if empty then redis.call('XADD', KEYS[2], '*', 'k', string.sub(m, 1, 32)) end
  end
end
return moved
"""
)

# KEYS: stream, live, dedupe, z, r, l. ARGV: id, packed, enqueued_ms, dedupe_ttl, keyhash, max_depth,
# max_per_key, sub-key hash. The message is stored stamped (core/queue.py's ``STAMP``).
_ENQUEUE = (
    _PLACE
    + STAMP
    + """
if ARGV[4] ~= '0' then
  local existing = redis.call('GET', KEYS[3])
  if existing then return {0, existing} end
end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[6]) then return {-1, ''} end
if tonumber(ARGV[7]) > 0 and redis.call('ZCARD', KEYS[4]) + redis.call('LLEN', KEYS[6]) >= tonumber(ARGV[7]) then
  return {-2, ''}
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
local m = stamped(ARGV[2])
if place(KEYS[4], KEYS[5], KEYS[6], ARGV[8], m, false) then redis.call('XADD', KEYS[1], '*', 'k', ARGV[5]) end
if ARGV[4] ~= '0' then redis.call('SET', KEYS[3], ARGV[1], 'EX', ARGV[4]) end
return {1, ARGV[1]}
"""
)

# KEYS: dead, stream, live, z, r, l. ARGV: dead_id, keyhash, packed, job_id, now_ms, sub-key hash
_REVIVE = (
    _PLACE
    + """
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[4])
if place(KEYS[4], KEYS[5], KEYS[6], ARGV[6], ARGV[3], false) then redis.call('XADD', KEYS[2], '*', 'k', ARGV[2]) end
return 1
"""
)

# The way back (``FairQueue.downgrade``): this release's jobs moved where a previous release reads.
# KEYS: a key's list, the plain stream. ARGV: batch. Moves the list's head batch, in order.
_PLAIN_LIST = """
local ms = redis.call('LPOP', KEYS[1], ARGV[1])
if not ms then return 0 end
for _, m in ipairs(ms) do redis.call('XADD', KEYS[2], '*', 'm', m) end
return #ms
"""

# KEYS: a key's sorted set, its rounds, the plain stream. ARGV: batch. In the order of its turns.
_PLAIN_ZSET = """
local ms = redis.call('ZPOPMIN', KEYS[1], ARGV[1])
for i = 1, #ms, 2 do redis.call('XADD', KEYS[3], '*', 'm', string.sub(ms[i], 33)) end
if #ms == 0 then redis.call('DEL', KEYS[2]) end
return #ms / 2
"""

# KEYS: delayed, the plain delayed set. ARGV: batch. Same due times; the member loses its hashes.
_PLAIN_DELAYED = """
local ms = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1, 'WITHSCORES')
for i = 1, #ms, 2 do
  local from = 65
  if string.sub(ms[i], 33, 33) == '{' then from = 33 end
  redis.call('ZADD', KEYS[2], ms[i + 1], string.sub(ms[i], from))
  redis.call('ZREM', KEYS[1], ms[i])
end
return #ms / 2
"""

# KEYS: taken, the plain stream. ARGV: token entry ids. What stopped workers had taken.
_PLAIN_TAKEN = """
local n = 0
for i = 1, #ARGV do
  local m = redis.call('HGET', KEYS[1], ARGV[i])
  if m then
    redis.call('XADD', KEYS[2], '*', 'm', m)
    redis.call('HDEL', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n
"""


class _Drain(Queue):
    """The plain queue of the same name (a previous release's): consumed, never written to."""

    def __init__(self, owner: FairQueue, redis, name: str, **options) -> None:
        super().__init__(redis, name, **options)
        self.owner = owner

    async def stats(self) -> dict:  # the gauges show the whole queue, never this part alone
        return await self.owner.stats()


class FairQueue(Queue):
    def __init__(
        self,
        redis,
        name: str,
        *,
        key_of: Callable[[dict], str | None] | None = None,
        sub_key_of: Callable[[dict], str | None] | None = None,
        legacy_concurrency: int = 1,
        **options,
    ) -> None:
        """``key_of(payload)``: the key of a message enqueued without one (and of an old dead
        letter put back); None, or no ``key_of``: the message is a key of its own. ``options``:
        the Queue's (not ``ordered``). ``sub_key_of(payload)``: within a key's turns, its
        sub-keys take turns (a tenant's knowledge bases); without it, or None, a key's messages
        are served in arrival order."""
        if options.get("ordered"):
            raise ValueError("a FairQueue does not keep a key's order")
        if options.get("dead_tag") is not None:
            raise ValueError("a FairQueue does not tag its dead letters")
        super().__init__(redis, name, **options)
        self.key_of = key_of
        self.sub_key_of = sub_key_of
        self.legacy = _Drain(self, redis, name, **{k: v for k, v in options.items() if k != "consumer"})
        self.legacy_concurrency = max(1, int(legacy_concurrency))
        fair = f"{self._prefix}:fair"
        self.stream, self.delayed, self.taken = fair, f"{fair}:delayed", f"{fair}:taken"
        self._fair = fair
        self._enqueue_fair = redis.register_script(_ENQUEUE)
        self._take = redis.register_script(_TAKE)
        self._finish_fair = redis.register_script(_FINISH)
        self._move_due_fair = redis.register_script(_MOVE_DUE)
        self._revive_fair = redis.register_script(_REVIVE)
        self._plain_list = redis.register_script(_PLAIN_LIST)
        self._plain_zset = redis.register_script(_PLAIN_ZSET)
        self._plain_delayed = redis.register_script(_PLAIN_DELAYED)
        self._plain_taken = redis.register_script(_PLAIN_TAKEN)

    def _list_key(self, keyhash: str) -> str:
        return f"{self._fair}:k:{keyhash}"

    def _waiting(self, keyhash: str) -> list[str]:
        """Where a key's messages wait (the scripts' z, r, l)."""
        return [f"{self._fair}:z:{keyhash}", f"{self._fair}:r:{keyhash}", self._list_key(keyhash)]

    def _sub(self, payload) -> str:
        """A message's sub-key hash (one for every message without a sub-key)."""
        found = self.sub_key_of(payload) if self.sub_key_of is not None and isinstance(payload, dict) else None
        return _digest(found[:256] if isinstance(found, str) and found else "")

    def _key(self, payload: dict, key: str | None) -> str | None:
        if key is None and self.key_of is not None:
            found = self.key_of(payload)
            key = found[:256] if isinstance(found, str) and found else None
        return key

    # -- producing --------------------------------------------------------------------------

    async def enqueue(
        self, payload: dict, *, key: str | None = None, dedupe: str | None = None, max_per_key: int = 0
    ) -> str:
        """Appends a message to its key's (``key``, else ``key_of(payload)``); returns its id.
        ``dedupe``, ``max_per_key``: as Queue.enqueue."""
        key = self._key(payload, key) if isinstance(payload, dict) else key
        return await super().enqueue(payload, key=key, dedupe=dedupe, max_per_key=max_per_key)

    async def _enqueue_entry(
        self,
        job_id: str,
        packed: bytes,
        now: float,
        dedupe: str | None,
        keyhash: str,
        max_per_key: int,
        payload: dict | None = None,
    ):
        return await self._script(
            self._enqueue_fair,
            [self.stream, self.live, f"{self._prefix}:d:{_digest(dedupe or '')}", *self._waiting(keyhash)],
            [
                job_id,
                packed,
                int(now * 1000),
                self.dedupe_ttl if dedupe is not None else 0,
                keyhash,
                self.max_depth,
                max(0, int(max_per_key)),
                self._sub(payload),
            ],
        )

    # -- consuming --------------------------------------------------------------------------

    async def run(self, handler: Callable[[Job], Awaitable[int | None]], *, concurrency: int = 8) -> None:
        """Consumes the keys in turn with ``concurrency`` handlers, and the previous release's
        plain queue beside them with ``legacy_concurrency``."""
        drain = asyncio.create_task(
            self.legacy.run(handler, concurrency=self.legacy_concurrency), name=f"queue-{self.name}-drain"
        )
        try:
            await super().run(handler, concurrency=concurrency)
        finally:
            with contextlib.suppress(Exception):
                await self.legacy.stop(self.stop_timeout)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(drain, 15)

    async def stop(self, grace: float | None = None) -> None:
        await asyncio.gather(super().stop(grace), self.legacy.stop(grace))

    async def _message(self, fields: dict, entry_id: str) -> tuple[dict | None, str]:
        """Takes the head of the token's key (or what this entry took before) and passes the
        key's turn on."""
        msg, keyhash, _ = await self._take_entry(fields, entry_id)
        return msg, keyhash

    async def _take_entry(self, fields: dict, entry_id: str) -> tuple[dict | None, str, bool]:
        """(the message, its key's hash, whether this entry had taken it before)."""
        keyhash = _s(fields.get(b"k") or fields.get("k") or "")
        reply = await self._script(
            self._take,
            [self.stream, self.taken, *self._waiting(keyhash)],
            [self.group, self.consumer, entry_id, keyhash],
        )
        status = int(reply[0])
        if status == 0:
            raise RuntimeError("the entry was claimed by another worker")
        if status == 2:
            return None, keyhash, False
        return orjson.loads(reply[1]), keyhash, status == 3

    async def _claimed(self, entry_id: str, fields: dict, why: str) -> None:
        """A token claimed from a worker that stopped: when that worker had taken a message, it
        counts as a failed attempt; when it stopped between reading the token and taking (no
        handler saw a message), the key's head is taken now and handed back untouched — to the
        front of its key's list, with its key's turn — without counting an attempt."""
        if not fields or entry_id in self._inflight:
            return
        msg, keyhash, started = await self._take_entry(fields, entry_id)
        if msg is None:
            return  # the key had nothing left: the take dropped the token
        _jobs.get(self.name, "claimed").inc()
        if started:
            log.warning("queue %s: message %s claimed from a worker that stopped", self.name, msg["id"])
            await self._fail(entry_id, msg, keyhash, why)
        else:
            await self._settle(entry_id, msg, keyhash, "retry", due=time.time())
            await self.move_due()

    async def _finish_entry(
        self, entry_id: str, msg: dict, keyhash: str, mode: str, due: float, count: bool, absorbed: int
    ):
        """Files the message in the fair structures (its tenant's list, the taken job released)."""
        return await self._script(
            self._finish_fair,
            [self.stream, self.live, self.delayed, self.dead, self.counters, self.taken],
            [
                self.group,
                self.consumer,
                entry_id,
                mode,
                msg["id"],
                orjson.dumps(msg),
                int(due * 1000),
                keyhash + self._sub(msg.get("payload")),
                f"{time.time():.3f}",
                self.max_dead,
                "1" if count else "0",
            ],
        )

    async def move_due(self) -> int:
        moved = 0
        for _ in range(1000):  # bounded: MOVE_BATCH at a time
            due = await self._redis.zrangebyscore(
                self.delayed, "-inf", int(time.time() * 1000), start=0, num=MOVE_BATCH
            )
            if not due:
                break
            keys = [k for m in due for k in self._waiting(_s(m[:32]))]
            moved += int(await self._move_due_fair(keys=[self.delayed, self.stream, *keys], args=due))
            if len(due) < MOVE_BATCH:
                break
        return moved

    # -- administration ---------------------------------------------------------------------

    async def retry_dead(self, id: str) -> bool:
        """Puts a dead letter (of this release or the previous one) back in its key's list with a
        fresh attempt count; False if there is no such dead letter."""
        msg = await self._revivable(id)
        if msg is None:
            return False
        if msg.get("key") is None and isinstance(msg.get("payload"), dict):
            msg["key"] = self._key(msg["payload"], None)
        keyhash = _digest(msg["key"] if msg.get("key") is not None else msg["id"])
        done = await self._revive_fair(
            keys=[self.dead, self.stream, self.live, *self._waiting(keyhash)],
            args=[id, keyhash, orjson.dumps(msg), msg["id"], int(time.time() * 1000), self._sub(msg.get("payload"))],
        )
        return bool(done)

    async def running(self) -> list[str]:
        """The consumers of this release whose liveness has not run out (by Redis's clock)."""
        seconds, micros = await self._redis.time()
        now = int(seconds) * 1000 + int(micros) // 1000
        return [_s(c) for c in await self._redis.zrangebyscore(self.consumers, now, "+inf")]

    async def downgrade(self, *, force: bool = False) -> dict:
        """The way back to a release before FairQueue, which reads only the plain stream: moves
        every message of this release there — the keys' lists in order, the retries with their
        due times, what stopped workers had taken — and drops the token stream. Run it after
        stopping every replica of this release: with a consumer still alive it raises
        RuntimeError unless ``force`` (its messages in flight would then run twice). Dead
        letters, dedupe keys and the unfinished set are shared and stay. Safe to run again, and
        a later upgrade drains the plain stream as it does after any upgrade."""
        alive = await self.running()
        if alive and not force:
            raise RuntimeError(f"{len(alive)} consumer(s) of queue {self.name} are still running")
        plain = self.legacy
        moved = {"queued": 0, "delayed": 0, "in_flight": 0}
        async for key in self._redis.scan_iter(match=f"{self._fair}:k:*", count=1000):
            while n := int(await self._plain_list(keys=[key, plain.stream], args=[MOVE_BATCH])):
                moved["queued"] += n
        async for key in self._redis.scan_iter(match=f"{self._fair}:z:*", count=1000):
            rounds = f"{self._fair}:r:{_s(key).rsplit(':', 1)[1]}"
            while n := int(await self._plain_zset(keys=[key, rounds, plain.stream], args=[MOVE_BATCH])):
                moved["queued"] += n
        while n := int(await self._plain_delayed(keys=[self.delayed, plain.delayed], args=[MOVE_BATCH])):
            moved["delayed"] += n
        while entries := await self._redis.hkeys(self.taken):
            moved["in_flight"] += int(
                await self._plain_taken(keys=[self.taken, plain.stream], args=entries[:MOVE_BATCH])
            )
        await self._redis.delete(self.stream, self.consumers)
        self._group_ready = False
        return moved

    async def stats(self) -> dict:
        """The whole queue's: this release's messages and what waits in the previous one's."""
        await self._ensure_group()
        await self.legacy._ensure_group()
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self.live)
            pipe.xpending(self.stream, self.group)
            pipe.xpending(self.legacy.stream, self.legacy.group)
            pipe.zcard(self.delayed)
            pipe.zcard(self.legacy.delayed)
            pipe.xlen(self.dead)
            pipe.hget(self.counters, "retries")
            pipe.zrange(self.live, 0, 0, withscores=True)
            live, pending, old_pending, delayed, old_delayed, dead, retries, oldest = await pipe.execute()
        pending = _pending(pending) + _pending(old_pending)
        delayed = int(delayed) + int(old_delayed)
        age = max(0.0, time.time() - oldest[0][1] / 1000) if oldest else 0.0
        out = {
            "depth": max(0, int(live) - pending - delayed),
            "pending": pending,
            "oldest_age_s": round(age, 3),
            "retries": int(retries or 0),
            "dead_letters": int(dead),
            "delayed": delayed,
        }
        for state in ("depth", "pending", "delayed", "dead_letters"):
            _messages.get(self.name, state).set(out[state])
        _oldest.get(self.name).set(out["oldest_age_s"])
        return out


def _pending(reply) -> int:
    return int(reply["pending"] if isinstance(reply, dict) else reply[0])
