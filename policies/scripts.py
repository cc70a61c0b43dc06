"""The two Lua scripts of the request path: one round trip before the call, one after.

All keys share the ``{gw}`` hash tag, so both scripts also run on Redis Cluster (one slot).
Money is counted in integer nano-USD so Redis can add it exactly.

ADMIT (before the call)
    ARGV: now_ms, n_rate, [base, limit, window_ms, cost, lease] * n_rate,
          n_budget, [spent_key, reserved_key, limit, estimate, ttl_s, alert_prefix, thresholds_csv,
          budget_id, hard, leases_key, own_lease_key, lease, own_outstanding] * n_budget,
          lease_ttl_ms, lease_headroom, alert_stream, member, hold_ms[, floor]
    Rate limits are sliding windows (the previous fixed window weighted by how much of it is
    still inside the sliding one, plus the current window). A ``cost`` of 0 only checks (tokens
    per minute are added after the call, when they are known).
    A *hard* budget admits a request only when its own reservation fits: spent + reserved +
    estimate <= limit, so spend never passes the limit however many requests run at once. A
    *soft* budget admits while spent + reserved is below the limit (parallel requests may
    overshoot by the reservations in flight). Either then reserves the request's estimate.
    A reservation (``estimate`` in ``reserved_key``) is also a member ``<estimate>:<member>`` of
    ``reserved_key:exp`` scored by the end of its hold (``hold_ms``, ``policies.reservation_hold_s``,
    after admission, on Redis's clock; ``member`` is the gateway's request id and step): SETTLE
    releases it, and a reservation whose request never settles (its replica was SIGKILLed, or
    Redis was away when it settled) is released by the next ADMIT of the budget once its hold
    is over — and noted in ``reserved_key:gone`` for a spooled settlement (SETTLE_LATE) —
    instead of holding budget until the period ends (for ever, for a budget without a period).
    Refusal kinds: ``budget`` (used up), ``short`` (a hard budget whose remainder is less than
    the request's estimate), ``reserved`` (a hard budget whose remainder is held by requests in
    flight: retrying soon may succeed), ``oversized`` (the request alone could cost more than
    the whole limit).
    A ``budget`` or ``short`` refusal fires, once as in SETTLE, the thresholds up to 100 % that
    spend has reached, and the highest of them (a hard budget's spend stops short of the limit)
    once spend passed every lower threshold or what is left cannot pay even for the request's
    prompt (``floor``, nano-USD): one large request refused early fires nothing. A ``reserved``
    or ``oversized`` refusal fires nothing.
    Leases (admission credit, policies/credit.py): a request may ask for ``lease`` more requests
    of a rate limit, or ``lease`` nano-USD more of a budget, to admit later requests from in
    process. A rate lease is counted in the window at once; it is granted only when it fits
    under the limit. A budget lease is granted only when the budget's headroom after this
    request is at least ``lease_headroom`` times the lease; the request's estimate and the lease
    then live in the process's own lease key (``own_lease_key``, expiring after
    ``lease_ttl_ms`` unless its process renews it) instead of ``reserved_key``. Every budget
    check counts the live lease keys of the budget's set (``leases_key``; dead ones leave it)
    beside spend and reservations, so leases never let spend pass a hard limit; the caller's
    own key is counted as ``own_outstanding`` (its leased requests in flight, which it knows
    exactly), and set to that (plus the request and the lease when one is granted). A process
    has one such ADMIT on its way per lease key at a time; its other ADMITs meanwhile pass no
    ``own_lease_key`` and count its key as Redis has it, like any other.
    Returns {1, granted lease per rate limit..., granted lease per budget...} or
    {0, kind, index, retry_after_ms, [budget_id, threshold, spent] * fired}.

SETTLE (after the call)
    ARGV: now_ms, member, n_budget, [spent_key, reserved_key, estimate, actual, limit, ttl_s, alert_prefix,
          thresholds_csv, budget_id] * n_budget, n_tokens, [base, window_ms, tokens] * n_tokens,
          ledger_stream, record_json, alert_stream
    Releases reservations (each once: only while it is a member of ``reserved_key:exp``), adds
    the real cost, fires each alert threshold at most once per budget and period (SET NX), and
    appends the audit record to the ledger stream (field ``r``, with ``t``: Redis's time, the clock
    the ledger's writer compares with an erasure's).
    Returns the list of alerts fired, as {budget_id, threshold, spent} triples.
"""

from __future__ import annotations

ADMIT = """
local now = tonumber(ARGV[1])
local i = 2
local n_rate = tonumber(ARGV[i]); i = i + 1
local incr = {}
local grants = {}
for r = 1, n_rate do
  local base, limit, window, cost = ARGV[i], tonumber(ARGV[i+1]), tonumber(ARGV[i+2]), tonumber(ARGV[i+3])
  local lease = tonumber(ARGV[i+4])
  i = i + 5
  local slot = math.floor(now / window)
  local cur_key = base .. ':' .. slot
  local cur = tonumber(redis.call('GET', cur_key) or '0')
  local prev = tonumber(redis.call('GET', base .. ':' .. (slot - 1)) or '0')
  local into = (now % window) / window
  local used = prev * (1 - into) + cur
  if used + cost > limit or (cost == 0 and used >= limit) then
    return {0, 'rate', r, window - (now % window)}
  end
  local grant = 0
  if cost > 0 and lease > 0 and used + cost + lease <= limit then grant = lease end
  table.insert(grants, grant)
  if cost + grant > 0 then table.insert(incr, {cur_key, cost + grant, window}) end
end
local n_budget = tonumber(ARGV[i]); i = i + 1
local lease_ttl = ARGV[i + n_budget * 13]
local headroom = tonumber(ARGV[i + n_budget * 13 + 1])
local alert_stream = ARGV[i + n_budget * 13 + 2]
local member, hold_ms = ARGV[i + n_budget * 13 + 3], tonumber(ARGV[i + n_budget * 13 + 4])
local floor = tonumber(ARGV[i + n_budget * 13 + 5] or '')  -- the request's prompt alone (nil: its estimate)
-- holds run on Redis's clock, one for every replica (a replica's clock running ahead must not
-- release the others' reservations)
local clock = 0
if n_budget > 0 then
  local t = redis.call('TIME')
  clock = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local reserve = {}
for b = 1, n_budget do
  local spent_key, reserved_key = ARGV[i], ARGV[i+1]
  local limit, estimate, ttl = tonumber(ARGV[i+2]), tonumber(ARGV[i+3]), tonumber(ARGV[i+4])
  local estimate_text = ARGV[i+3]  -- (as sent: a reservation's name never goes through a float)
  local alert_prefix, thresholds, budget_id = ARGV[i+5], ARGV[i+6], ARGV[i+7]
  local hard = ARGV[i+8] == '1'
  local leases_key, own_key = ARGV[i+9], ARGV[i+10]
  local lease, own = tonumber(ARGV[i+11]), tonumber(ARGV[i+12])
  i = i + 13
  -- reservations past their hold (a replica that died with them in flight) are released first
  -- (each also noted in ``:gone``, so a settlement spooled while Redis was away still counts)
  local due = redis.call('ZRANGEBYSCORE', reserved_key .. ':exp', '-inf', clock, 'LIMIT', 0, 100)
  if #due > 0 then
    local freed = 0
    for _, m in ipairs(due) do
      freed = freed + (tonumber(string.match(m, '^([^:]+):')) or 0)
      redis.call('ZADD', reserved_key .. ':gone', clock, m)
    end
    redis.call('ZREM', reserved_key .. ':exp', unpack(due))
    if redis.call('DECRBY', reserved_key, freed) < 0 then redis.call('SET', reserved_key, 0, 'EX', ttl) end
    redis.call('ZREMRANGEBYSCORE', reserved_key .. ':gone', '-inf', clock - 2592000000)  -- 30 days
    redis.call('EXPIRE', reserved_key .. ':gone', ttl)
  end
  local spent = tonumber(redis.call('GET', spent_key) or '0')
  local held = tonumber(redis.call('GET', reserved_key) or '0') + own
  for _, k in ipairs(redis.call('SMEMBERS', leases_key)) do
    if k ~= own_key then
      local v = redis.call('GET', k)
      if v then held = held + tonumber(v) else redis.call('SREM', leases_key, k) end
    end
  end
  local kind = nil
  if spent >= limit then
    kind = 'budget'
  elseif hard then
    if estimate > limit then
      kind = 'oversized'
    elseif spent + estimate > limit then
      kind = 'short'
    elseif spent + held + estimate > limit then
      kind = 'reserved'
    end
  elseif spent + held >= limit then
    kind = 'budget'
  end
  if kind then
    local retry = ttl * 1000
    if kind == 'reserved' then retry = 1000 end
    local out = {0, kind, b, retry}
    if kind == 'budget' or kind == 'short' then
      -- the highest threshold up to 100 % means "used up": fired once spend passed every lower
      -- threshold, or when what is left cannot pay even for the request's prompt; lower ones
      -- only once spend reached them (one large request refused early fires nothing)
      local top, below = -1, 0
      for t in string.gmatch(thresholds, '[^,]+') do
        local v = tonumber(t)
        if v <= 1 and v > top then top = v end
      end
      for t in string.gmatch(thresholds, '[^,]+') do
        local v = tonumber(t)
        if v < top and v > below then below = v end
      end
      local used_up = spent >= below * limit or spent + (floor or estimate) > limit
      for t in string.gmatch(thresholds, '[^,]+') do
        local v = tonumber(t)
        if v <= 1 and (spent >= v * limit or (v == top and used_up))
            and redis.call('SET', alert_prefix .. t, spent, 'NX', 'EX', ttl) then
          redis.call('XADD', alert_stream, '*', 'budget', budget_id, 'threshold', t, 'spent', tostring(spent))
          table.insert(out, budget_id)
          table.insert(out, t)
          table.insert(out, tostring(spent))
        end
      end
    end
    return out
  end
  local grant = 0
  if lease > 0 and own_key ~= '' and limit - (spent + held + estimate) >= headroom * lease then grant = lease end
  table.insert(grants, grant)
  table.insert(reserve, {reserved_key, estimate, ttl, grant, leases_key, own_key, own, estimate_text})
end
for _, x in ipairs(incr) do
  redis.call('INCRBY', x[1], x[2])
  redis.call('PEXPIRE', x[1], x[3] * 2)
end
for _, x in ipairs(reserve) do
  local mine = x[7]
  if x[4] > 0 then
    mine = mine + x[2] + x[4]
  elseif x[2] > 0 then
    redis.call('INCRBY', x[1], x[2])
    redis.call('EXPIRE', x[1], x[3])
    redis.call('ZADD', x[1] .. ':exp', clock + hold_ms, x[8] .. ':' .. member)
    redis.call('EXPIRE', x[1] .. ':exp', x[3])
  end
  if x[6] ~= '' then  -- the caller's lease key: exactly what it holds now (credit it gave up dropped)
    if mine > 0 then
      redis.call('SET', x[6], mine, 'PX', lease_ttl)
      redis.call('SADD', x[5], x[6])
      redis.call('PEXPIRE', x[5], lease_ttl * 12)
    else
      redis.call('DEL', x[6])
    end
  end
end
table.insert(grants, 1, 1)
return grants
"""

SETTLE = """
local now = tonumber(ARGV[1])
local member = ARGV[2]
local i = 3
local fired = {}
local n_budget = tonumber(ARGV[i]); i = i + 1
for b = 1, n_budget do
  local spent_key, reserved_key = ARGV[i], ARGV[i+1]
  local estimate, actual, limit = tonumber(ARGV[i+2]), tonumber(ARGV[i+3]), tonumber(ARGV[i+4])
  local estimate_text = ARGV[i+2]
  local ttl, alert_prefix, thresholds, budget_id = tonumber(ARGV[i+5]), ARGV[i+6], ARGV[i+7], ARGV[i+8]
  i = i + 9
  -- released once: not when ADMIT released it already, its hold over
  if estimate > 0 then
    if redis.call('ZREM', reserved_key .. ':exp', estimate_text .. ':' .. member) == 1 then
      local left = redis.call('DECRBY', reserved_key, estimate)
      if left < 0 then redis.call('SET', reserved_key, 0, 'EX', ttl) end
    else  -- it outlived its hold: released already, and settled now
      redis.call('ZREM', reserved_key .. ':gone', estimate_text .. ':' .. member)
    end
  end
  local spent = redis.call('INCRBY', spent_key, actual)
  redis.call('EXPIRE', spent_key, ttl)
  for t in string.gmatch(thresholds, '[^,]+') do
    if spent >= tonumber(t) * limit then
      if redis.call('SET', alert_prefix .. t, spent, 'NX', 'EX', ttl) then
        table.insert(fired, budget_id)
        table.insert(fired, t)
        table.insert(fired, tostring(spent))
      end
    end
  end
end
local n_tokens = tonumber(ARGV[i]); i = i + 1
for t = 1, n_tokens do
  local base, window, tokens = ARGV[i], tonumber(ARGV[i+1]), tonumber(ARGV[i+2])
  i = i + 3
  if tokens > 0 then
    local key = base .. ':' .. math.floor(now / window)
    redis.call('INCRBY', key, tokens)
    redis.call('PEXPIRE', key, window * 2)
  end
end
local ledger, record, alerts = ARGV[i], ARGV[i+1], ARGV[i+2]
-- 't': Redis's time, what the ledger's writer compares with an erasure's (a replica's clock may be off)
local rt = redis.call('TIME')
redis.call('XADD', ledger, '*', 'r', record, 't', rt[1] .. '.' .. string.format('%06d', tonumber(rt[2])))
for a = 1, #fired, 3 do
  redis.call('XADD', alerts, '*', 'budget', fired[a], 'threshold', fired[a+1], 'spent', fired[a+2])
end
return fired
"""

# Admission credit's renewer (policies/credit.py): ARGV lease_ttl_ms, [own_lease_key, leases_key,
# need] * n — each lease key set to what its process still needs, or deleted when that is 0.
RENEW = """
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV, 3 do
  local key, leases, need = ARGV[i], ARGV[i+1], tonumber(ARGV[i+2])
  if need > 0 then
    redis.call('SET', key, need, 'PX', ttl)
    redis.call('SADD', leases, key)
    redis.call('PEXPIRE', leases, ttl * 12)
  else
    redis.call('DEL', key)
  end
end
return 1
"""

# Spend that happened outside a request (a channel's telephony, reported after the call): added
# to each applicable budget's period counter, alerts fired as SETTLE fires them. No reservation
# to release, no token windows, no ledger record (the caller writes its own, once).
CHARGE = """
local n_budget = tonumber(ARGV[1])
local i = 2
local fired = {}
for b = 1, n_budget do
  local spent_key, actual, limit = ARGV[i], tonumber(ARGV[i+1]), tonumber(ARGV[i+2])
  local ttl, alert_prefix, thresholds, budget_id = tonumber(ARGV[i+3]), ARGV[i+4], ARGV[i+5], ARGV[i+6]
  i = i + 7
  local spent = redis.call('INCRBY', spent_key, actual)
  redis.call('EXPIRE', spent_key, ttl)
  for t in string.gmatch(thresholds, '[^,]+') do
    if spent >= tonumber(t) * limit then
      if redis.call('SET', alert_prefix .. t, spent, 'NX', 'EX', ttl) then
        table.insert(fired, budget_id)
        table.insert(fired, t)
        table.insert(fired, tostring(spent))
      end
    end
  end
end
local alerts = ARGV[i]
for a = 1, #fired, 3 do
  redis.call('XADD', alerts, '*', 'budget', fired[a], 'threshold', fired[a+1], 'spent', fired[a+2])
end
return fired
"""

# A settle that Redis did not take (policies/ledger.py: its record was spooled to disk, with what
# SETTLE would have done), applied when the spool is replayed. ARGV: n, then per settlement:
# member, n_budget, [spent_key, reserved_key, held, actual, ttl_s] * n_budget. Each settlement
# is applied once however often it is replayed (``gw:{gw}:late:<member>``, SET NX). A
# reservation (``held`` > 0) is released and its cost counted while it is a member of
# ``reserved_key:exp``; its cost is counted when ADMIT released it at the end of its hold (a
# member of ``:gone``); neither: SETTLE ran after all (its reply was lost), nothing to do. A
# leased request's (``held`` 0) cost is counted: SETTLE's failure cannot say whether Redis ran
# it, and counting twice errs on the budget's side. A reservation the admit may have made (its
# reply was lost: ``held`` is the estimate's negative) is released while it is a member of
# ``reserved_key:exp`` (else it would hold the budget until its hold ended), its cost counted
# either way, as a leased request's.
SETTLE_LATE = """
local i = 2
for s = 1, tonumber(ARGV[1]) do
  local member, n_budget = ARGV[i], tonumber(ARGV[i+1])
  i = i + 2
  local fresh = redis.call('SET', 'gw:{gw}:late:' .. member, 1, 'NX', 'EX', 604800)
  for b = 1, n_budget do
    local spent_key, reserved_key = ARGV[i], ARGV[i+1]
    local held, actual, ttl = tonumber(ARGV[i+2]), tonumber(ARGV[i+3]), tonumber(ARGV[i+4])
    local name = ARGV[i+2] .. ':' .. member
    i = i + 5
    local count = fresh
    if fresh and held > 0 then
      if redis.call('ZREM', reserved_key .. ':exp', name) == 1 then
        if redis.call('DECRBY', reserved_key, held) < 0 then redis.call('SET', reserved_key, 0, 'EX', ttl) end
      else
        count = redis.call('ZREM', reserved_key .. ':gone', name) == 1
      end
    elseif fresh and held < 0 then
      name = string.sub(name, 2)  -- (the estimate as the admit named it)
      if redis.call('ZREM', reserved_key .. ':exp', name) == 1 then
        if redis.call('DECRBY', reserved_key, -held) < 0 then redis.call('SET', reserved_key, 0, 'EX', ttl) end
      else
        redis.call('ZREM', reserved_key .. ':gone', name)
      end
    end
    if count and actual > 0 then
      redis.call('INCRBY', spent_key, actual)
      redis.call('EXPIRE', spent_key, ttl)
    end
  end
end
return 1
"""
