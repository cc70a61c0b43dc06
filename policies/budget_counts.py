"""What a page of budgets has counted in Redis in their current periods, read in one round trip.

The admin API shows each budget with its spend, its reservations, the admission credit the
replicas hold under it (``policies.credit``: the live lease keys of the period's set) and the
alert thresholds fired. Read budget by budget that was two to three round trips each (a page of
1,000 budgets: up to 3,000); here one script reads them all (``COUNTS``, keys passed as
arguments and sharing the ``{gw}`` hash tag, as ``policies.scripts``'s do; it writes nothing).

COUNTS
    ARGV: [spent_key, reserved_key, leases_key, n_alerts, alert_key * n_alerts] * n_budget
    Returns, per budget, {spent, reserved, {lease value...}, {alert value...}}: a missing key is
    nil; a lease key that expired (still in the set) is left out.
"""

from __future__ import annotations

from dataclasses import dataclass

from policies.budgets import NANO, Budget
from policies.credit import leases_key

COUNTS = """
local out, i = {}, 1
while i <= #ARGV do
  local n = tonumber(ARGV[i+3])
  local leases = {}
  for _, k in ipairs(redis.call('SMEMBERS', ARGV[i+2])) do
    local v = redis.call('GET', k)
    if v then leases[#leases+1] = v end
  end
  local alerts = {}
  for j = 1, n do alerts[j] = redis.call('GET', ARGV[i+3+j]) end
  out[#out+1] = {redis.call('GET', ARGV[i]), redis.call('GET', ARGV[i+1]), leases, alerts}
  i = i + 4 + n
end
return out
"""


@dataclass(frozen=True, slots=True)
class Counted:
    """A budget's current period as Redis counts it, in nano-USD."""

    spent: int
    reserved: int
    leased: int
    alerts_fired: tuple[float, ...]  # the thresholds fired, in the budget's order


def _thresholds(b: Budget) -> list[str]:
    return [f"{t:g}" for t in b.thresholds]


async def read(redis, budgets: list[Budget]) -> list[Counted]:
    """The budgets' counts, in order, in one round trip (``redis``: redis-py's asyncio client).
    Raises the client's ``RedisError`` when Redis cannot answer."""
    if not budgets:
        return []
    argv: list[str] = []
    for b in budgets:
        spent_key, reserved_key, alert_prefix, _ = b.keys()
        thresholds = _thresholds(b)
        argv += [spent_key, reserved_key, leases_key(reserved_key), str(len(thresholds))]
        argv += [alert_prefix + t for t in thresholds]
    rows = await redis.eval(COUNTS, 0, *argv)
    out = []
    for b, (spent, reserved, leases, alerts) in zip(budgets, rows, strict=True):
        fired = tuple(float(t) for t, v in zip(_thresholds(b), alerts, strict=True) if v is not None)
        out.append(Counted(int(spent or 0), int(reserved or 0), sum(int(v) for v in leases), fired))
    return out


def usd(nano: int) -> float:
    return nano / NANO
