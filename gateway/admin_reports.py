"""The admin reports that read many rows: ``/admin/spend``, an agent's experiments
(``GET /admin/agents/{name}/experiments``) and the escalation statistics
(``/admin/escalations/stats``).

Each aggregates as many ledger, run, feedback or escalation rows as its range holds, inside a
pooled connection (the pool is every tenant's: ten connections). Unbounded, ten of them from
one tenant admin held the pool for up to the driver's 30 s, and every tenant's requests that need
PostgreSQL waited. So each report's transaction (and an experiment's stop, which builds its
report in the transaction that stops it):

- is answered within ``server.admin_report_timeout_s`` as a whole (its connection's wait and all
  its statements: an experiments report runs up to four of them per experiment, each under the
  same bound once), PostgreSQL's ``statement_timeout`` cutting any one statement at it too: past
  it, the statement running is cancelled, the transaction rolled back (an experiment's stop
  changes nothing), 503 ``report_timeout`` (narrow the range and ask again);
- is one of at most ``server.admin_reports_per_tenant`` such reports of its tenant (the
  super-admin's count as one tenant's) running at once across every replica: past it, 429
  ``too_many_reports`` with ``retry-after`` before any connection is taken; and of at most
  ``server.admin_reports_total`` of every tenant's (each tenant's cap added up could still hold
  the pool), the same 429.

The caps hold across replicas (they share one PostgreSQL): each report holds a slot in Redis
(``_ACQUIRE``: a sorted set per tenant and one of every tenant's, each holder a member whose score
is its lease's end on Redis's clock), renewed while it runs and removed when it ends; a replica
that dies holding slots frees them when their leases (``LEASE_S``) run out. Each process also
keeps its own count under the same caps. With Redis unreachable, that count alone admits
(logged): the caps then hold per process, as they did before — a report or an erasure is not
refused for want of Redis, and PostgreSQL still sees at most replicas × cap of them, each cut at
its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator

import asyncpg
import orjson
from redis.exceptions import RedisError

from core.errors import RateLimited, ServiceUnavailable
from gateway.db import tenant_transaction

log = logging.getLogger("gateway.admin")

_TIMEOUT_SQL = "SELECT set_config('statement_timeout', $1, true)"

LEASE_S = 30.0  # a slot's lease, renewed every third of it while its holder runs

# KEYS: the tenant's holders, every tenant's; ARGV: holder, lease (ms), cap, total (-1: none).
# 0 admitted, 1 the tenant's cap is full, 2 every tenant's. Expired leases (a dead replica's) go.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 1 end
local total = tonumber(ARGV[4])
if total >= 0 and redis.call('ZCARD', KEYS[2]) >= total then return 2 end
local lease = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
redis.call('ZADD', KEYS[2], now + lease, ARGV[1])
redis.call('PEXPIRE', KEYS[1], lease * 2)
redis.call('PEXPIRE', KEYS[2], lease * 2)
return 0
"""
# KEYS as above; ARGV: holder, lease (ms). The holder's lease renewed (only where it still holds).
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + lease, ARGV[1])
  redis.call('PEXPIRE', key, lease * 2)
end
return 0
"""
_REDIS_DOWN = (RedisError, OSError, TimeoutError)


class Running:
    """The heavy reports running, per tenant (None: the super-admin), across replicas through Redis
    and in this process; or other work held to a per-tenant count the same way (``what``, its
    ``setting`` and 429 ``code``, which also names its slots in Redis)."""

    def __init__(
        self, what: str = "admin reports", setting: str = "server.admin_reports_per_tenant", code="too_many_reports"
    ) -> None:
        self._by_tenant: dict[str | None, int] = {}
        self._total = 0
        self._what, self._setting, self._code = what, setting, code

    def _refused(self, tenant_cap: int | None, total: int | None) -> RateLimited:
        if tenant_cap is not None:
            text = f"This tenant has {tenant_cap} {self._what} running ({self._setting}); retry when one is done."
        else:
            text = (
                f"The gateway runs {total} {self._what} at once (server.admin_reports_total); retry when one is done."
            )
        return RateLimited(text, code=self._code, headers={"retry-after": "1"})

    def keys(self, tenant: str | None) -> list[str]:
        """The Redis sorted sets of the tenant's slots and of every tenant's."""
        base = f"gw:{{gw}}:caps:{self._code}"
        return [f"{base}:t:{orjson.dumps(tenant).decode()}", f"{base}:all"]

    @contextlib.asynccontextmanager
    async def one(self, tenant: str | None, cap: int, total: int | None = None, redis=None) -> AsyncIterator[None]:
        """One more of the tenant's, within its ``cap`` and every tenant's ``total`` (None: no
        bound across tenants) — in this process, and across replicas through ``redis`` (None:
        this process only) — else 429 at once."""
        n = self._by_tenant.get(tenant, 0)
        if n >= cap:
            raise self._refused(cap, None)
        if total is not None and self._total >= total:
            raise self._refused(None, total)
        self._by_tenant[tenant] = n + 1
        self._total += 1
        try:
            async with self._shared(redis, tenant, cap, total):
                yield
        finally:
            self._total -= 1
            if self._by_tenant[tenant] <= 1:
                del self._by_tenant[tenant]
            else:
                self._by_tenant[tenant] -= 1

    @contextlib.asynccontextmanager
    async def _shared(self, redis, tenant: str | None, cap: int, total: int | None) -> AsyncIterator[None]:
        if redis is None:
            yield
            return
        keys, holder, lease_ms = self.keys(tenant), secrets.token_hex(12), int(LEASE_S * 1000)
        try:
            got = await redis.eval(_ACQUIRE, 2, *keys, holder, lease_ms, cap, -1 if total is None else total)
        except _REDIS_DOWN as exc:
            log.warning("%s admitted by this process's count alone: Redis %s", self._what, type(exc).__name__)
            yield
            return
        if int(got) == 1:
            raise self._refused(cap, None)
        if int(got) == 2:
            raise self._refused(None, total)
        renewing = asyncio.create_task(self._renew(redis, keys, holder, lease_ms))
        try:
            yield
        finally:
            renewing.cancel()
            try:
                async with redis.pipeline(transaction=False) as pipe:
                    for key in keys:
                        pipe.zrem(key, holder)
                    await pipe.execute()
            except _REDIS_DOWN as exc:  # (its lease runs out)
                log.warning("%s slot not freed: Redis %s", self._what, type(exc).__name__)

    @staticmethod
    async def _renew(redis, keys: list[str], holder: str, lease_ms: int) -> None:
        while True:
            await asyncio.sleep(lease_ms / 3000)
            with contextlib.suppress(*_REDIS_DOWN):
                await redis.eval(_RENEW, len(keys), *keys, holder, lease_ms)


@contextlib.asynccontextmanager
async def transaction(
    running: Running,
    pool: asyncpg.Pool,
    wall: str | None,
    *,
    timeout_s: float,
    cap: int,
    total: int | None = None,
    redis=None,
) -> AsyncIterator[asyncpg.Connection]:
    """A tenant transaction (``wall``: its row-level-security tenant, None the super-admin) for a
    heavy report: admitted under the tenant's ``cap`` and every tenant's ``total`` (across
    replicas through ``redis``), the whole of it cut ``timeout_s`` after it was asked for (or by
    the driver's own timeout, should that come first: the same 503)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with running.one(wall, cap, total, redis):
        try:
            # (the whole answer, its connection's wait and every statement of it, within timeout_s:
            # past it the statement running is cancelled and the transaction rolled back)
            async with asyncio.timeout_at(deadline), tenant_transaction(pool, wall) as conn:
                await conn.execute(_TIMEOUT_SQL, f"{max(1, round(timeout_s * 1000))}ms")
                yield conn
        except (asyncpg.exceptions.QueryCanceledError, TimeoutError):
            raise ServiceUnavailable(
                f"The report took longer than {timeout_s:g} s (server.admin_report_timeout_s); "
                "narrow its range ('from', 'to') and ask again.",
                code="report_timeout",
            ) from None
