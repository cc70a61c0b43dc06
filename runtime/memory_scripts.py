"""The Lua scripts of conversation memory (``runtime.memory``): one round trip each, atomic in
Redis. ``Memory`` loads ``APPEND`` and ``LOAD`` into its pipelined client and calls the others
through redis-py; their keys and arguments are documented beside each."""

from __future__ import annotations


# A turn queued (``queued``: µs on Redis's clock) at or before its conversation's erasure mark
# (``key``: "seconds.µs", Redis's time; an unreadable mark counts as erased) is the erased
# conversation's: the script answers -3 and reads or stores nothing (``Erased``).
def _erased_since(key: str, queued: str) -> str:
    return f"""  local mark = redis.call('GET', {key})
  if mark then
    local s, f = string.match(mark, '^(%d+)%.?(%d*)$')
    if not s or tonumber(s) * 1000000 + tonumber(string.sub(f .. '000000', 1, 6)) >= tonumber({queued}) then
      return -3
    end
  end"""


# Number, push, trim, refresh, queue for PostgreSQL and store the new window, in one step.
# KEYS: list, seq, stream, stored window, the last seq erased, and the conversation's erasure mark
# (optional: ``Memory.append``'s ``erased``). ARGV: ttl, seq ttl, cap, the turn's stream record, the
# seq the turn's window was loaded at ('' unknown), the new window after its "n" ('' none), the
# lowest seq the conversation may have reached ('' unknown), the turn's queue time ('' unknown),
# then (tokens, message JSON) pairs. Answers {first seq, 1 when the new window was stored else 0,
# the turn's stream entry id} (the window's ``n`` is then the turn's last seq, its ``x`` that id),
# or -1, -2, -3 (below). The id tells the stored window apart where its ``n`` cannot: a seq
# repeats once the counter is gone and PostgreSQL holds nothing (an erased conversation whose
# counter expired or was evicted starts again at 1), an entry id does not.
# A seq is never handed out twice: a counter gone (evicted, or expired after the list) starts
# again from the list's last seq, else from the floor; with neither the script stores nothing
# and answers -1, and the caller asks PostgreSQL for the floor (messages.seq is unique there, so
# a reused seq would drop the message).
# A turn whose window held messages of the conversation up to its erasure (its floor at most the
# last seq erased: it loaded the conversation before the erasure and answered after it) stores
# nothing and answers -2: the customer's words sent before the erasure, and an answer written
# from the erased history, are not the erased conversation's first turn again. Seqs go on after
# an erasure (the counter stays), so the turns after it are told apart from those before it.
APPEND = """
if KEYS[6] and ARGV[8] ~= '' then
-- erased since queued
end
local n = (#ARGV - 8) / 2
local erased = tonumber(redis.call('GET', KEYS[5]) or '0')
if erased > 0 and ARGV[7] ~= '' and tonumber(ARGV[7]) > 0 and tonumber(ARGV[7]) <= erased then return -2 end
local prev = redis.call('LINDEX', KEYS[1], -1)
local prev_seq = '0'
if prev then prev_seq = string.match(prev, '^{"s":(%d+)') or '' end
if not redis.call('GET', KEYS[2]) then
  if prev and prev_seq ~= '' then
    redis.call('SET', KEYS[2], prev_seq)
  elseif ARGV[7] ~= '' then
    redis.call('SET', KEYS[2], math.max(tonumber(ARGV[7]), erased))
  else
    return -1
  end
end
local last = redis.call('INCRBY', KEYS[2], n)
local first = last - n + 1
local items = {}
for i = 1, n do
  local seq = string.format('%d', first + i - 1)
  items[i] = '{"s":' .. seq .. ',"t":' .. ARGV[7 + 2 * i] .. ',"m":' .. ARGV[8 + 2 * i] .. '}'
end
redis.call('RPUSH', KEYS[1], unpack(items))
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[3]), -1)
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
local now = redis.call('TIME')
local stamp = now[1] .. '.' .. string.format('%06d', now[2])
local id = redis.call('XADD', KEYS[3], '*', 'r', ARGV[4], 's', first, 't', stamp)
if ARGV[5] ~= '' and ARGV[6] ~= '' and prev_seq == ARGV[5] then
  redis.call('SET', KEYS[4], '{"n":' .. string.format('%d', last) .. ',"x":"' .. id .. '",' .. ARGV[6], 'EX', ARGV[1])
  return {first, 1, id}
end
redis.call('DEL', KEYS[4])
return {first, 0, id}
"""
APPEND = APPEND.replace("-- erased since queued", _erased_since("KEYS[6]", "ARGV[8]"))

# The stored window when there is one and it ends at the list's last message, else the list's
# tail: a list evicted without its window, or a writer that does not keep the window (a replica
# of an older release), leaves a stored window that is not the list's. KEYS: list, stored window,
# and the conversation's erasure mark (optional: ``Memory.load``'s ``erased``). ARGV: the tail's
# start (negative), the turn's queue time (with the mark; else ''), the ``n`` and ``x`` of the
# stored window the caller holds already ("n/x"; '' none: ``Memory``'s cache of the windows it
# stored or read). When the stored window is still that one, -4 instead of it: the caller decodes
# nothing (the erasure mark is read first all the same). A stored window's ``n`` is the seq of the
# turn that stored it and its ``x`` that turn's stream entry id: a seq can be handed out again
# (the counter gone, PostgreSQL erased), an entry id cannot. A window without ``x`` (an older
# release's) is never held.
# When the list is empty (a new conversation, or one expired, evicted or erased), Redis's time
# instead (µs): the turn's store is refused if the conversation is erased after it (``APPEND``
# with the conversation's own erasure mark, ``:erased:at``), as no seq floor can tell then.
LOAD = """
if KEYS[3] then
-- erased since queued
end
local w = redis.call('GET', KEYS[2])
if w then
  local n = string.match(w, '^{"n":(%d+)')
  local last = redis.call('LINDEX', KEYS[1], -1)
  if n and last and string.match(last, '^{"s":(%d+)') == n then
    local x = string.match(w, '^{"n":%d+,"x":"(%d+%-%d+)"')
    if x and ARGV[3] == n .. '/' .. x then return -4 end
    return w
  end
end
local tail = redis.call('LRANGE', KEYS[1], ARGV[1], -1)
if #tail > 0 then return tail end
local now = redis.call('TIME')
return tonumber(now[1]) * 1000000 + tonumber(now[2])
"""
LOAD = LOAD.replace("-- erased since queued", _erased_since("KEYS[3]", "ARGV[2]"))

# Put back what PostgreSQL holds in front of whatever the list holds now (a turn stored
# meanwhile stays after it), and never let the counter fall below the stored seqs. Nothing when
# the conversation was erased a moment ago: the read may have begun before the erasure.
# KEYS: window, seq, erased mark. ARGV: ttl, seq ttl, cap, max seq, then (seq, entry) pairs oldest first.
REWARM = """
if KEYS[3] and redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local head = redis.call('LINDEX', KEYS[1], 0)
local before = math.huge
if head then before = tonumber(cjson.decode(head)['s']) end
local pushed = 0
for i = #ARGV - 1, 5, -2 do
  if tonumber(ARGV[i]) < before then
    redis.call('LPUSH', KEYS[1], ARGV[i + 1])
    pushed = pushed + 1
  end
end
if pushed > 0 then
  redis.call('LTRIM', KEYS[1], -tonumber(ARGV[3]), -1)
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
local cur = tonumber(redis.call('GET', KEYS[2]) or '0')
if cur < tonumber(ARGV[4]) then redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[2]) end
return pushed
"""


# An erasure: the messages handed out since the previous erasure and Redis's clock, then the
# window and stored window gone, the mark that keeps a reload begun before it from warming them
# again, and the last seq erased (``APPEND`` stores no turn that loaded up to it; kept as long as
# the counter, which stays: seqs go on), and the erasure's time (``:erased:at``, "seconds.µs",
# kept as long: ``APPEND`` stores no turn that found the conversation empty before it).
# KEYS: window, seq, stored window, mark, last seq erased, the erasure's time.
# ARGV: the mark's ttl, the least ttl of the last seq erased. The clock is the one ``APPEND``
# stamps each turn's stream entry with (``t``): the erasure and the turns it skips are compared on
# one clock, whatever the gateways' clocks say.
FORGET = """
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
local before = tonumber(redis.call('GET', KEYS[5]) or '0')
local now = redis.call('TIME')
redis.call('SET', KEYS[4], '1', 'EX', ARGV[1])
redis.call('DEL', KEYS[1], KEYS[3])
local keep = math.max(tonumber(ARGV[2]), redis.call('TTL', KEYS[2]))
if last > 0 then
  redis.call('SET', KEYS[5], string.format('%d', math.max(last, before)), 'EX', keep)
end
redis.call('SET', KEYS[6], now[1] .. '.' .. string.format('%06d', tonumber(now[2])), 'EX', keep)
return {string.format('%d', math.max(last - before, 0)), now[1], now[2]}
"""
