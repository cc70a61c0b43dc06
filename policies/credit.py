"""Admission credit: a replica admits requests in process from a small lease of a large
remaining budget or rate limit, so most requests make one Redis round trip (settle) instead of
two.

How it stays exact across replicas (policies/scripts.py, ADMIT):

- A **rate-limit lease** is a number of requests counted in the limit's window when it is
  taken: the window never holds more than the limit, whoever admits from it. Credit is used only
  in the minute it was counted in; what is left when the minute turns is lost (counted, unused).
- A **budget lease** is a reservation in the process's own lease key, which every budget check
  (every replica's) counts beside spend and the per-request reservations: a hard budget's
  spend still cannot pass its limit. The key's value is the process's credit plus the estimates
  of its leased requests in flight; a renewer refreshes it every ``RENEW_S`` and lets it shrink
  as requests settle, and it expires ``LEASE_TTL_MS`` after the last refresh — a replica that
  dies stops holding budget within seconds. Credit is usable for ``LEASE_S``.
- Leases are granted only when there is room: a budget's headroom after the request must be at
  least ``HEADROOM`` times the lease, and a rate lease must fit under the limit. Near a limit
  every request goes to Redis, as without credit. (``policies.lease_requests``, default 32, and
  ``policies.lease_headroom``, default 64, set the sizes.)
- A request under a tokens-per-minute limit always goes to Redis (its check needs the window's
  current count).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid

from core.background import stop_task
from core.metrics import ADMITTED_FROM_CREDIT
from policies.scripts import RENEW

log = logging.getLogger("gateway.policies")

LEASE_S = 1.0  # credit is usable this long after it was granted
LEASE_TTL_MS = 5_000  # a lease key not refreshed for this long is gone (its replica died)
RENEW_S = 0.5


def leases_key(reserved_key: str) -> str:
    """The budget period's set of lease keys (every replica's, counted by every budget check)."""
    return f"{reserved_key}:leases"


class BudgetCredit:
    """This process's lease of one budget period."""

    __slots__ = ("expires", "leases_key", "limit", "outstanding", "pending", "remaining")

    def __init__(self, leases_key: str) -> None:
        self.leases_key = leases_key  # the budget period's set of lease keys
        self.remaining = 0  # nano-USD still to admit from, until ``expires``
        self.outstanding = 0  # estimates of leased requests admitted and not settled yet
        self.expires = 0.0
        self.limit = 0  # the budget's limit the credit was granted under (a changed one lends none)
        # The ADMIT on its way that may grant a new lease: its estimate plus the lease it asks
        # for, counted by the renewer until its answer is back (whichever of the two commands
        # Redis runs first, the key never holds less than the grant).
        self.pending = 0


class Credit:
    """The credit this process holds (one per PolicyEngine)."""

    def __init__(self, redis, lease_requests: int = 32, headroom: int = 64) -> None:
        self._redis = redis
        self.lease_requests = lease_requests
        self.headroom = headroom
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # (rate key base, the limit it was granted under) -> [minute slot, requests left]; a window
        # counted under two limits (a minted key's recorded share of its minter's) has two credits
        self.rates: dict[tuple[str, int], list[int]] = {}
        self.budgets: dict[str, BudgetCredit] = {}  # own lease key -> credit
        self.local_admits = 0  # requests admitted without a round trip (metrics, tests)
        self._task: asyncio.Task | None = None

    def has_rate(self, base: str, slot: int, limit: int) -> bool:
        c = self.rates.get((base, limit))
        return c is not None and c[0] == slot and c[1] > 0

    def rate_lease(self, limit: int) -> int:
        """Requests to ask for beside this one: none for limits too small to share (each request
        then checks with Redis)."""
        return min(self.lease_requests, limit // (2 * self.lease_requests))

    def lease_keys(self, reserved_key: str) -> tuple[str, str]:
        """(the budget period's set of lease keys, this process's lease key)."""
        return leases_key(reserved_key), f"{reserved_key}:lease:{self.owner}"

    def take(self, slot: int, rates: list[tuple[str, int]], leases: list[tuple[str, int]], estimate: int) -> bool:
        """Admits one request from credit when every limit has some, granted under the limit
        that applies now ((rate key base, limit), (own lease key, budget limit)); consumes it."""
        now = time.monotonic()
        for base, limit in rates:
            if not self.has_rate(base, slot, limit):
                return False
        for key, limit in leases:
            c = self.budgets.get(key)
            if c is None or c.expires < now or c.remaining < estimate or c.limit != limit:
                return False
        for rate in rates:
            self.rates[rate][1] -= 1
        for key, _ in leases:
            c = self.budgets[key]
            c.remaining -= estimate
            c.outstanding += estimate
        self.local_admits += 1
        ADMITTED_FROM_CREDIT.inc()
        return True

    def asking_now(self, key: str) -> bool:
        """An ADMIT that may grant a lease under ``key`` is on its way (one at a time: the
        process's other ADMITs meanwhile count the key as Redis has it, which that ADMIT sets)."""
        c = self.budgets.get(key)
        return c is not None and c.pending > 0

    def asking(self, leases_key: str, key: str, asked: int) -> int:
        """Before an ADMIT that may grant a lease under ``key``, for a request of estimate plus
        lease = ``asked``: what this process holds there, its leased requests in flight (the
        script counts it instead of the key's stale value, and sets the key to it). Unused
        credit is given up: the answer brings a fresh lease, or none. Pair with ``answered``."""
        c = self.budgets.get(key)
        if c is None:
            c = self.budgets[key] = BudgetCredit(leases_key)
        c.remaining = 0
        c.pending += asked
        return c.outstanding

    def answered(self, key: str, granted: int, estimate: int, asked: int, limit: int = 0) -> None:
        """The ADMIT is back: ``granted`` nano-USD of credit under the budget's ``limit``, the
        request's ``estimate`` held in the lease (both 0 when no lease was granted or the request
        was refused)."""
        c = self.budgets[key]
        c.pending -= asked
        if granted > 0:
            c.remaining = granted
            c.limit = limit
            c.outstanding += estimate
            c.expires = time.monotonic() + LEASE_S

    def granted_rate(self, base: str, slot: int, requests: int, limit: int) -> None:
        """Added to what is left of the minute's credit (all of it is counted in the window)."""
        c = self.rates.get((base, limit))
        self.rates[base, limit] = [slot, requests + (c[1] if c is not None and c[0] == slot else 0)]

    def settled(self, key: str, estimate: int) -> None:
        """A leased request settled: its estimate leaves the lease (Redis hears at the next renewal;
        until then the lease counts it twice, beside its spend, which errs on the strict side)."""
        c = self.budgets.get(key)
        if c is not None:
            c.outstanding = max(0, c.outstanding - estimate)

    def start(self) -> None:
        self._task = asyncio.create_task(self._renew_loop(), name="admission-credit")

    async def stop(self) -> None:
        if self._task is not None:
            await stop_task(self._task)
            self._task = None
        with contextlib.suppress(Exception):  # what is in flight has settled; give the rest back
            await self.renew(give_up=True)

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(RENEW_S)
            try:
                await self.renew()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the leases expire on their own; requests go to Redis
                log.warning("admission credit not renewed: %s", type(exc).__name__)

    async def renew(self, give_up: bool = False) -> None:
        """Refreshes every lease key to what this process still needs (credit, requests in flight,
        and what ADMITs on their way may be granted), drops expired credit, and deletes keys of
        leases no longer needed.

        The values are computed and the one command that sets them is queued in the same step
        (no await between), so an ADMIT queued after it is run after it by Redis, and one queued
        before it is in ``pending``: a grant is never overwritten by a smaller value, nor its
        key deleted."""
        now = time.monotonic()
        slot = int(time.time() * 1000) // 60_000
        for base in [b for b, c in self.rates.items() if c[0] != slot]:
            del self.rates[base]
        argv: list = []
        for key, c in list(self.budgets.items()):
            if give_up or c.expires < now:
                c.remaining = 0
            need = c.remaining + c.outstanding + c.pending
            if need <= 0:
                del self.budgets[key]
            # (back in the set too, should a replica have dropped it while the key was away)
            argv += [key, c.leases_key, need]
        if argv:
            await self._redis.execute("EVAL", RENEW, 0, LEASE_TTL_MS, *argv)
