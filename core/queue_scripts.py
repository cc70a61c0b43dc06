"""The Lua scripts of the durable queue (``core.queue``; ``core.fair_queue`` builds on them): each
one round trip, atomic in Redis, over keys that share one hash tag. Keys and arguments are
documented beside each script; the key layout in ``core.queue``'s docstring."""

from __future__ import annotations

# A new message's stored form gets Redis's time (µs, field ``redis_us``), what every process
# compares with the same clock (an erasure's mark: channels/whatsapp/erasure.py). Spliced into the
# JSON object's end (``_pack`` makes it: a non-empty object, this field not in it) as digits, so
# the payload is not decoded and encoded again. Retries and dead-letter retries keep the message
# as it was first stored, the stamp with it.
STAMP = """
local function stamped(packed)
  local t = redis.call('TIME')
  return string.sub(packed, 1, -2) .. ',"redis_us":' .. t[1] .. string.format('%06d', tonumber(t[2])) .. '}'
end
"""

OWNED = """
local function owned(stream, group, consumer, id)
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  return #p > 0 and p[1][2] == consumer
end
"""

# KEYS: stream, live, dedupe, list. ARGV: id, packed, enqueued_ms, dedupe_ttl, ordered, keyhash, max_depth,
# max_per_key (ordered: unfinished messages of one key; 0: no limit)
ENQUEUE = (
    STAMP
    + """
if ARGV[4] ~= '0' then
  local existing = redis.call('GET', KEYS[3])
  if existing then return {0, existing} end
end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[7]) then return {-1, ''} end
if ARGV[5] == '1' and tonumber(ARGV[8] or '0') > 0 and redis.call('LLEN', KEYS[4]) >= tonumber(ARGV[8]) then
  return {-2, ''}
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
local m = stamped(ARGV[2])
if ARGV[5] == '1' then
  if redis.call('RPUSH', KEYS[4], m) == 1 then redis.call('XADD', KEYS[1], '*', 'k', ARGV[6]) end
else
  redis.call('XADD', KEYS[1], '*', 'm', m)
end
if ARGV[4] ~= '0' then redis.call('SET', KEYS[3], ARGV[1], 'EX', ARGV[4]) end
return {1, ARGV[1]}
"""
)

# KEYS: stream, live, delayed, dead, counters, list, dead letters' tags
# ARGV: group, consumer, entry_id, mode (done|retry|dead), job_id, packed, due_ms, ordered, keyhash,
#       failed_at, dead_max, count_retry, absorbed (ordered, done: messages behind the head also done),
#       tagged ('1': the dead letter's tag goes beside it, both trimmed exactly), the tag
FINISH = (
    OWNED
    + """
if not owned(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
local ordered = ARGV[8] == '1'
local head_is_job = false
if ordered then
  local head = redis.call('LINDEX', KEYS[6], 0)
  head_is_job = head and cjson.decode(head)['id'] == ARGV[5]
end
if ARGV[4] == 'retry' and (head_is_job or not ordered) then
  if ordered then
    redis.call('LSET', KEYS[6], 0, ARGV[6])
    redis.call('ZADD', KEYS[3], ARGV[7], 'k:' .. ARGV[9])
  else
    redis.call('ZADD', KEYS[3], ARGV[7], ARGV[6])
  end
  if ARGV[12] == '1' then redis.call('HINCRBY', KEYS[5], 'retries', 1) end
  return 1
end
if ARGV[4] == 'dead' then
  if ARGV[14] == '1' then
    local id = redis.call('XADD', KEYS[4], 'MAXLEN', ARGV[11], '*', 'm', ARGV[6], 'failed_at', ARGV[10])
    redis.call('XADD', KEYS[7], 'MAXLEN', ARGV[11], id, 't', ARGV[15])
  else
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[11], '*', 'm', ARGV[6], 'failed_at', ARGV[10])
  end
  redis.call('HINCRBY', KEYS[5], 'dead', 1)
end
redis.call('ZREM', KEYS[2], ARGV[5])
if ordered then
  if head_is_job then
    redis.call('LPOP', KEYS[6])
    for _ = 1, tonumber(ARGV[13] or '0') do  -- messages behind the head the handler took with it
      local m = redis.call('LPOP', KEYS[6])
      if not m then break end
      redis.call('ZREM', KEYS[2], cjson.decode(m)['id'])
    end
  end
  if redis.call('LLEN', KEYS[6]) > 0 then redis.call('XADD', KEYS[1], '*', 'k', ARGV[9]) end
end
return 1
"""
)

# KEYS: delayed, stream. ARGV: now_ms, limit
MOVE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, m in ipairs(due) do
  redis.call('ZREM', KEYS[1], m)
  if string.sub(m, 1, 2) == 'k:' then
    redis.call('XADD', KEYS[2], '*', 'k', string.sub(m, 3))
  else
    redis.call('XADD', KEYS[2], '*', 'm', m)
  end
end
return #due
"""

# KEYS: stream. ARGV: group, consumer, entry ids... Returns the ids this consumer no longer owns.
RENEW = (
    OWNED
    + """
local lost = {}
for i = 3, #ARGV do
  if owned(KEYS[1], ARGV[1], ARGV[2], ARGV[i]) then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    table.insert(lost, ARGV[i])
  end
end
return lost
"""
)

NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: consumers. ARGV: consumer, ttl_ms. Returns 1 when the consumer was alive until now, 0 when
# it was not (absent: just started, or reaped; expired): then it may have lost entries.
BEAT = (
    NOW
    + """
local before = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
if before and tonumber(before) >= now then return 1 end
return 0
"""
)

# KEYS: stream, consumers. ARGV: group, claimer, limit. Claims the pending entries of consumers
# whose liveness ran out (all of them, or ``limit`` per consumer) and forgets those left with
# none; returns the claimed entries.
REAP = (
    NOW
    + """
local out = {}
for _, c in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. now, 'LIMIT', 0, 10)) do
  if c ~= ARGV[2] then
    local ids = {}
    for _, p in ipairs(redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', ARGV[3], c)) do
      table.insert(ids, p[1])
    end
    if #ids > 0 then
      for _, e in ipairs(redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(ids))) do
        table.insert(out, e)
      end
    end
    if #ids < tonumber(ARGV[3]) then
      redis.call('ZREM', KEYS[2], c)
      redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], c)
    end
  end
end
return out
"""
)

# KEYS: dead, stream, live, list. ARGV: dead_id, ordered, keyhash, packed, job_id, now_ms
REVIVE = """
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[5])
if ARGV[2] == '1' then
  if redis.call('RPUSH', KEYS[4], ARGV[4]) == 1 then redis.call('XADD', KEYS[2], '*', 'k', ARGV[3]) end
else
  redis.call('XADD', KEYS[2], '*', 'm', ARGV[4])
end
return 1
"""
