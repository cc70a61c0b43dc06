"""The per-key send state (sender.py) in Redis, in one round trip per step.

Over core/fastredis.py's pipelined client when the process has one (redis-py spends ~150 µs of
Python per command; a turn makes several of these calls), else over redis-py. Steps that must be
atomic (set-and-expire; pace-then-claim; a piece's lease) are Lua scripts.

A piece's send is owned by the try that claimed it for a *lease* (field ``<piece>:lease``: the
owner's token and the end of the lease in Redis's clock, ms), which covers the Graph POST's
timeout: while it runs no other try of the key takes the piece over (``takeover``), and the owner
releases a send that failed (``release``) only while the piece is still its own.
"""

from __future__ import annotations

import hashlib

from redis.exceptions import NoScriptError

# Each script given a conversation's index (KEYS' last, ``sender.index_key``) adds the state's key
# to it: an erasure of the conversation finds its states there (they hold the words sent).
_INDEX = """
local function indexed(n)
  if #KEYS >= n then
    redis.call('SADD', KEYS[n], KEYS[1])
    redis.call('EXPIRE', KEYS[n], ARGV[1])
  end
end
"""

# KEYS: state[, index]. ARGV: ttl, field, value, field, value, ...
_NOTE = (
    _INDEX
    + """
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
indexed(2)
return 1
"""
)
_NOW = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# KEYS: state, pace counter[, index]. ARGV: ttl, field, value, pace limit (0: no pacing), lease
# token ('' : no lease), lease ms. -1: over the pace this second (nothing claimed); 0: the field
# was set already; 1: claimed (with the lease); 2 (leased claims only): the field reads
# ``pending``, another try's send (``takeover`` tells whether it is alive).
_CLAIM = (
    _INDEX
    + _NOW
    + """
if ARGV[4] ~= '0' then
  local n = redis.call('INCR', KEYS[2])
  if n == 1 then redis.call('EXPIRE', KEYS[2], 3) end
  if n > tonumber(ARGV[4]) then return -1 end
end
if redis.call('HSETNX', KEYS[1], ARGV[2], ARGV[3]) == 0 then
  if ARGV[5] ~= '' and redis.call('HGET', KEYS[1], ARGV[2]) == 'pending' then return 2 end
  return 0
end
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], ARGV[2] .. ':lease', ARGV[5] .. ' ' .. (now_ms() + tonumber(ARGV[6])))
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
indexed(3)
return 1
"""
)

# KEYS: state. ARGV: field, lease ms. A piece found ``pending``: 0 when it is not (any more);
# N > 0 while its try's lease runs (N ms left); -1 when the lease ran out: its try stopped, and
# the piece is ``unknown`` now (one try only concludes it). A ``pending`` without a lease (an
# older release's try) is given one lease from now: that try may still be inside its POST.
_TAKEOVER = (
    _NOW
    + """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= 'pending' then return 0 end
local now = now_ms()
local lease = redis.call('HGET', KEYS[1], ARGV[1] .. ':lease')
local ends = lease and tonumber(string.match(lease, ' (%d+)$'))
if not ends then
  redis.call('HSET', KEYS[1], ARGV[1] .. ':lease', 'older ' .. (now + tonumber(ARGV[2])))
  return tonumber(ARGV[2])
end
if ends > now then return ends - now end
redis.call('HSET', KEYS[1], ARGV[1], 'unknown')
redis.call('HDEL', KEYS[1], ARGV[1] .. ':lease')
return -1
"""
)

# KEYS: state[, index]. ARGV: field, value, ttl. A piece's send done (its wamid, or ``unknown``
# after a timeout): the truth, whoever holds the lease; the lease ends. A state deleted meanwhile
# (an erasure during the POST) is created anew with its expiry, never without one, and in its
# conversation's index again (the erasure deleted that too): the send's post-send check, or the
# check run for it when its process stopped (``inflight``), finds it there.
_SETTLE = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HDEL', KEYS[1], ARGV[1] .. ':lease')
if redis.call('TTL', KEYS[1]) < 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  if #KEYS >= 2 then
    redis.call('SADD', KEYS[2], KEYS[1])
    redis.call('EXPIRE', KEYS[2], ARGV[3])
  end
end
return 1
"""

# KEYS: state. ARGV: field, token. A send that did not go (refused, never reached Meta) is
# released for a retry, only while it is still this try's: not when another try concluded it
# ``unknown`` after the lease ran out (it has gone past the piece).
_RELEASE = """
local lease = redis.call('HGET', KEYS[1], ARGV[1] .. ':lease')
if redis.call('HGET', KEYS[1], ARGV[1]) ~= 'pending' or not lease
  or string.sub(lease, 1, #ARGV[2] + 1) ~= ARGV[2] .. ' ' then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1], ARGV[1] .. ':lease')
return 1
"""


# KEYS: state[, index]. ARGV: ttl, field, value, ... The state as it was; the fields are set only
# when it has no ``started`` yet (a turn's first try notes what it began with, in the same round trip).
_BEGIN = (
    _INDEX
    + """
local before = redis.call('HGETALL', KEYS[1])
if redis.call('HEXISTS', KEYS[1], 'started') == 0 then
  for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  indexed(2)
end
return before
"""
)

# KEYS: state. ARGV: ttl, template_from and template_room as read ('' for none), then the new
# template_text, template_room, template_from. 1: pinned; 0: another try pinned another cut first.
_REPIN = """
if (redis.call('HGET', KEYS[1], 'template_from') or '') ~= ARGV[2]
  or (redis.call('HGET', KEYS[1], 'template_room') or '') ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], 'template_text', ARGV[4], 'template_room', ARGV[5], 'template_from', ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""


class _RedisPy:
    def __init__(self, redis) -> None:
        self.redis = redis

    async def execute(self, *args):
        return await self.redis.execute_command(*args)


def _one(index: str | None) -> list[str]:
    return [index] if index is not None else []


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class SendState:
    def __init__(self, redis, fast=None) -> None:
        self._r = fast if fast is not None else _RedisPy(redis)
        self._src = {
            "note": _NOTE,
            "claim": _CLAIM,
            "begin": _BEGIN,
            "repin": _REPIN,
            "takeover": _TAKEOVER,
            "settle": _SETTLE,
            "release": _RELEASE,
        }
        self._sha = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in self._src.items()}

    async def _script(self, name: str, keys: list[str], args: list):
        try:
            return await self._r.execute("EVALSHA", self._sha[name], len(keys), *keys, *args)
        except NoScriptError:
            return await self._r.execute("EVAL", self._src[name], len(keys), *keys, *args)

    async def get(self, key: str) -> dict[str, str]:
        raw = await self._r.execute("HGETALL", key)
        if isinstance(raw, dict):
            return {_s(k): _s(v) for k, v in raw.items()}
        return {_s(raw[i]): _s(raw[i + 1]) for i in range(0, len(raw or ()), 2)}

    async def begin(self, key: str, ttl: int, fields: dict[str, str], index: str | None = None) -> dict[str, str]:
        """The state; ``fields`` (with ``started``) are noted unless a try began already. ``index``:
        the conversation's index the key joins (``sender.index_key``)."""
        args: list = [ttl]
        for k, v in fields.items():
            args += [k, v]
        raw = await self._script("begin", [key, *_one(index)], args)
        return {_s(raw[i]): _s(raw[i + 1]) for i in range(0, len(raw or ()), 2)}

    async def note(self, key: str, ttl: int, fields: dict[str, str], index: str | None = None) -> None:
        args: list = [ttl]
        for k, v in fields.items():
            args += [k, v]
        await self._script("note", [key, *_one(index)], args)

    async def claim(
        self,
        key: str,
        ttl: int,
        field: str,
        value: str,
        pace_key: str,
        pace_limit: int,
        index: str | None = None,
        lease: tuple[str, int] | None = None,
    ) -> int:
        """``lease``: (token, ms) the claimed field is this try's for (a piece's send)."""
        token, ms = lease or ("", 0)
        keys = [key, pace_key, *_one(index)]
        return int(await self._script("claim", keys, [ttl, field, value, pace_limit, token, ms]))

    async def takeover(self, key: str, field: str, lease_ms: int) -> int:
        """A ``pending`` piece: 0 not pending now; N > 0 ms its try's lease still runs; -1 its try
        stopped and this call marked it ``unknown``."""
        return int(await self._script("takeover", [key], [field, lease_ms]))

    async def settle(self, key: str, field: str, value: str, ttl: int, index: str | None = None) -> None:
        """``index``: the conversation's (``sender.index_key``), joined again by a state created anew."""
        await self._script("settle", [key, *_one(index)], [field, value, ttl])

    async def release(self, key: str, field: str, token: str) -> bool:
        return bool(int(await self._script("release", [key], [field, token])))

    async def repin(self, key: str, ttl: int, was: tuple[str, str], text: str, room: str, start: str) -> bool:
        """A window template's cut pinned anew (text, room, first field index) unless the pinned
        (template_from, template_room) are no longer ``was``."""
        return bool(int(await self._script("repin", [key], [ttl, *was, text, room, start])))

    async def set(self, key: str, field: str, value: str) -> None:
        await self._r.execute("HSET", key, field, value)

    async def drop(self, key: str, field: str) -> None:
        await self._r.execute("HDEL", key, field)

    async def put(self, key: str, value: str, ttl: int) -> None:
        await self._r.execute("SET", key, value, "EX", ttl)

    async def index(self, index: str, key: str, ttl: int) -> None:
        """``key`` joins the set ``index``, which lives ``ttl`` seconds from now."""
        await self._r.execute("SADD", index, key)
        await self._r.execute("EXPIRE", index, ttl)

    async def read(self, key: str) -> str | None:
        value = await self._r.execute("GET", key)
        return _s(value) if value is not None else None
