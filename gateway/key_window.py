"""A per-key allowance per minute for the side routes that are not model calls (feedback,
conversation reads): a fixed one-minute window in Redis shared by every replica, counted before
the request's body or data is read, so no key can turn a route into a flood of database writes or
reads. The allowance is the key's own rpm, else the default key limit, else ``DEFAULT_PER_MINUTE``.
"""

from __future__ import annotations

import asyncio
import time

from redis.exceptions import RedisError

from core.errors import RateLimited, ServiceUnavailable
from core.types import Identity

DEFAULT_PER_MINUTE = 600
_TIMEOUT_S = 2.0  # a Redis that drops packets must not hold these routes (or the admin API) for good


def per_minute(svc, ident: Identity) -> int:
    own = getattr(ident.limits, "rpm", 0) or 0
    return own or svc.config.limits.key.rpm or DEFAULT_PER_MINUTE


async def admit(svc, ident: Identity, route: str, what: str, allowance: int | None = None) -> None:
    """Counts one call of ``route`` (a fixed name) against the key's window; 429 with
    ``retry-after`` beyond it. ``what`` names the calls in the error message. ``allowance``:
    this many a minute for every window, whatever the keys' own rpm."""
    now = time.time()
    window = int(now // 60)
    # a minted key counts in its minters' windows too (Identity.shared_limits), as its model
    # calls do: minting many children never multiplies a key's allowance
    windows = [(ident.key_id, allowance or per_minute(svc, ident))]
    for minter, lim in getattr(ident, "shared_limits", ()) or ():
        own = (getattr(lim, "rpm", 0) or 0) or svc.config.limits.key.rpm or DEFAULT_PER_MINUTE
        windows.append((minter, allowance or own))
    try:
        async with asyncio.timeout(_TIMEOUT_S), svc.redis.pipeline(transaction=False) as pipe:
            for key_id, _ in windows:
                name = f"gw:{{gw}}:{route}:{key_id}:{window}"
                pipe.incr(name)
                pipe.expire(name, 120)
            counts = (await pipe.execute())[::2]
    except (RedisError, TimeoutError):  # as the model calls' limits do (policies.fail_open): serve, or a 503 to retry
        if svc.config.policies.fail_open:
            return
        raise ServiceUnavailable(
            f"The gateway cannot count {what.lower()} right now; try again shortly.",
            code="policy_store_unavailable",
            headers={"retry-after": "1"},
        ) from None
    over = [lim for (_, lim), count in zip(windows, counts, strict=True) if count > lim]
    if over:
        limit = min(over)
        err = RateLimited(f"{what} are limited to {limit} per minute for this key.", code="rate_limit_exceeded")
        err.headers["retry-after"] = str(max(1, int((window + 1) * 60 - now)))
        raise err
