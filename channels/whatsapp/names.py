"""Renaming what an older release named by a plain hash of a conversation (its id holds the
customer's number, and numbers are few enough to hash them all: such a name gives it back).

This release names a conversation's Redis keys, media folder and in-flight notes by a keyed hash
(``store.conversation_digest``) made from the name the older release gave it
(``store.digest_of(legacy)``), so that what it wrote is renamed without knowing the conversation
(an erased one's mark outlives every record of it). ``upgrade`` runs at the channel worker's start
(``WhatsApp.start_worker``), before it takes a job:

- the erasure marks (``erasure.erased_key``: the later mark kept where both exist), the send
  states' and aliases' indexes (``sender.index_key``, ``alias_index_key``: merged, the aliases'
  members renamed too) and the aliases (``sender.alias_key``), each in one script with its time
  to live: Redis's keys read by ``SCAN``, a page a round trip;
- the in-flight notes (``inflight.upgrade``);
- the media folders (``content.upgrade_folders``, in a thread).

Each step is idempotent and safe with several replicas starting at once (a key another renamed
first is gone: nothing to do). A pass over Redis that renamed nothing (the older release's
replicas all gone) marks the work done for a week (``DONE``): a scan reads the whole keyspace,
which a start does not do again and again for nothing. Until it has run (a replica of the older release still writing
during a rolling upgrade), what reads a mark reads both names (``erasure.mark_us``), and an
erasure deletes under both (``store.digests``), so nothing the older release wrote escapes an
erasure.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from channels.whatsapp import content, inflight, sender, store
from channels.whatsapp.erasure import erased_key_of
from core.erasure_key import RENAME_UNLESS_SET, is_legacy_name, same_key_as_deployment

log = logging.getLogger("channels.whatsapp")

PAGE = 1000  # keys scanned per round trip
# A pass over Redis that found nothing to rename (every replica of the older release gone) is
# not repeated at every start for a week: a scan reads the whole keyspace.
DONE = "gw:{gw}:wa:names:v1:done"
DONE_TTL = 7 * 86_400

_ERASED = erased_key_of("")
_INDEX = sender.index_key_of("")
_ALIASES = sender.alias_index_key_of("")
_ALIAS = sender.ALIAS_PREFIX

# KEYS: an older release's mark, ours. The later of the two stays under our name, with its time
# to live ("seconds.fraction", or an older release's float repr: compared as µs, exactly).
_MOVE_MARK = """
local function us(m)
  local s, f = string.match(m, '^(%d+)%.?(%d*)')
  if not s then return nil end
  return s, string.sub(f .. '000000', 1, 6)
end
local function later(a, b)
  local sa, fa = us(a)
  local sb, fb = us(b)
  if not sb then return true end
  if not sa then return false end
  if #sa ~= #sb then return #sa > #sb end
  if sa ~= sb then return sa > sb end
  return fa > fb
end
local old = redis.call('GET', KEYS[1])
if not old then return 0 end
local ours = redis.call('GET', KEYS[2])
if not ours or later(old, ours) then
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('SET', KEYS[2], old, 'PX', ttl) else redis.call('SET', KEYS[2], old) end
end
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS: an older release's set, ours. ARGV: pairs of a member's old name and ours. Merged into
# ours, its members renamed, the longer time to live kept.
_MOVE_SET = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local ttl = redis.call('PTTL', KEYS[1])
local theirs = redis.call('PTTL', KEYS[2])
redis.call('SUNIONSTORE', KEYS[2], KEYS[2], KEYS[1])
for i = 1, #ARGV, 2 do
  if redis.call('SREM', KEYS[2], ARGV[i]) == 1 then redis.call('SADD', KEYS[2], ARGV[i + 1]) end
end
if theirs > ttl then ttl = theirs end
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
redis.call('DEL', KEYS[1])
return 1
"""


@dataclass
class Upgraded:
    keys: int = 0
    notes: int = 0
    folders: int = 0


async def upgrade(redis, data_dir: Path) -> Upgraded:
    """Everything of the channel an older release named by a plain hash, renamed (see above)."""
    done = Upgraded()
    await same_key_as_deployment(redis)  # (a process with another key: said in the log)
    done.folders = await asyncio.to_thread(content.upgrade_folders, data_dir)  # (this data directory's)
    if await redis.exists(DONE):
        return done
    async for raw in redis.scan_iter(match="gw:{gw}:wa:*", count=PAGE):
        key = raw.decode() if isinstance(raw, bytes) else raw
        done.keys += await _rename(redis, key)
    done.notes = await inflight.upgrade(redis)
    if done.keys or done.notes:
        log.info("whatsapp names of an older release renamed: %s", done)
    else:
        await redis.set(DONE, "1", ex=DONE_TTL)
    return done


async def _rename(redis, key: str) -> int:
    for prefix, ours in ((_ERASED, store.digest_of), (_INDEX, store.digest_of), (_ALIASES, store.digest_of)):
        if key.startswith(prefix) and is_legacy_name(key[len(prefix) :]):
            new = prefix + ours(key[len(prefix) :])
            if prefix == _ERASED:
                return int(await redis.eval(_MOVE_MARK, 2, key, new))
            pairs = await _renamed_members(redis, key) if prefix == _ALIASES else []
            return int(await redis.eval(_MOVE_SET, 2, key, new, *pairs))
    if key.startswith(_ALIAS) and is_legacy_name(key[len(_ALIAS) :]):
        new = _ALIAS + sender.alias_name(key[len(_ALIAS) :])
        return int(await redis.eval(RENAME_UNLESS_SET, 2, key, new))
    return 0


async def _renamed_members(redis, index: str) -> list[str]:
    """An aliases index's members an older release named (its aliases, the other number's index),
    each with our name for it."""
    pairs: list[str] = []
    cursor = 0
    while True:
        cursor, members = await redis.sscan(index, cursor, count=PAGE)
        for raw in members:
            member = raw.decode() if isinstance(raw, bytes) else raw
            for prefix, ours in ((_ALIASES, store.digest_of), (_ALIAS, sender.alias_name)):
                if member.startswith(prefix) and is_legacy_name(member[len(prefix) :]):
                    pairs += [member, prefix + ours(member[len(prefix) :])]
        if not int(cursor):
            return pairs
