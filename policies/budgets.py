"""Budgets: stored in PostgreSQL, cached in every process, counted in Redis per period."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from core.background import stop_task
from core.pubsub import listen_forever

log = logging.getLogger("gateway.budgets")

SCOPES = ("tenant", "key", "user", "agent", "workflow", "customer", "tag")
PERIODS = ("daily", "weekly", "monthly", "none")
ENFORCEMENTS = ("hard", "soft")
CHANGED = "gateway:budgets:changed"
NANO = 1_000_000_000  # budget counters are integer nano-USD
_KEYS_CACHE: dict[str, tuple[int, int, tuple[str, str, str, int]]] = {}  # id -> (second, limit, keys)


@dataclass(frozen=True, slots=True)
class Budget:
    """A limit in USD on one attribution scope of one tenant.

    ``enforcement`` ``hard`` (the default) admits a request only when its own reservation fits
    under the limit, so spend never passes it; ``soft`` admits while spend plus reservations is
    below the limit, so concurrent requests may overshoot by what they reserved. ``locked``
    budgets were set by the super-admin and cannot be changed by the tenant's admins.
    """

    id: str
    tenant: str
    scope: str
    scope_value: str
    limit_usd: float
    period: str
    thresholds: tuple[float, ...]
    webhook_url: str | None
    enforcement: str = "hard"
    locked: bool = False

    @property
    def limit_nano(self) -> int:
        return round(self.limit_usd * NANO)

    def window(self, now: datetime | None = None) -> tuple[str, datetime | None]:
        """(period id, when it ends) for the period containing ``now``."""
        now = now or datetime.now(UTC)
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        if self.period == "daily":
            return day.strftime("%Y%m%d"), day + timedelta(days=1)
        if self.period == "weekly":
            start = day - timedelta(days=day.weekday())
            return "w" + start.strftime("%Y%m%d"), start + timedelta(days=7)
        if self.period == "monthly":
            start = day.replace(day=1)
            end = (start + timedelta(days=32)).replace(day=1)
            return start.strftime("%Y%m"), end
        return "all", None

    def keys(self, now: datetime | None = None) -> tuple[str, str, str, int]:
        """(spent key, reserved key, alert key prefix, ttl seconds) for the current period (the
        alert prefix also names the limit)."""
        if now is None:  # per request: cached for the second, periods change at midnight
            second = int(time.time())
            cached = _KEYS_CACHE.get(self.id)
            if cached is not None and cached[0] == second and cached[1] == self.limit_nano:
                return cached[2]
            value = self.keys(datetime.fromtimestamp(second, UTC))
            _KEYS_CACHE[self.id] = (second, self.limit_nano, value)
            return value
        period, end = self.window(now)
        base = f"gw:{{gw}}:budget:{self.id}:{period}"
        ttl = int((end - (now or datetime.now(UTC))).total_seconds()) + 86400 if end else 400 * 86400
        # alerts fire once per period *and limit*: a raised (or lowered) limit has its own 50/80/100 %
        return f"{base}:spent", f"{base}:reserved", f"{base}:alert:{self.limit_nano}:", ttl


def _row(r: asyncpg.Record) -> Budget:
    return Budget(
        r["id"],
        r["tenant"],
        r["scope"],
        r["scope_value"],
        r["limit_usd"],
        r["period"],
        tuple(r["thresholds"]),
        r["webhook_url"],
        r["enforcement"],
        r["locked"],
    )


# ``tenant`` None is the super-admin's view (every tenant); otherwise rows of that tenant only.
# Tenant-scoped callers also run under row-level security (gateway.db.tenant_transaction).
async def list_budgets(
    conn, tenant: str | None = None, limit: int | None = None, after: str | None = None
) -> list[Budget]:
    """Every budget, oldest first; or with ``limit`` one page, newest first, of the budgets older
    than the budget ``after`` (a page's last id)."""
    if limit is None:
        rows = await conn.fetch(
            "SELECT * FROM budgets WHERE $1::text IS NULL OR tenant = $1 ORDER BY created_at", tenant
        )
    else:
        rows = await conn.fetch(
            """SELECT * FROM budgets WHERE ($1::text IS NULL OR tenant = $1)
                 AND ($2::text IS NULL OR (created_at, id) < (SELECT created_at, id FROM budgets WHERE id = $2))
               ORDER BY created_at DESC, id DESC LIMIT $3""",
            tenant,
            after,
            limit,
        )
    return [_row(r) for r in rows]


async def get_budget(conn, budget_id: str, tenant: str | None = None) -> Budget | None:
    row = await conn.fetchrow(
        "SELECT * FROM budgets WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)", budget_id, tenant
    )
    return _row(row) if row else None


async def create_budget(
    conn,
    tenant: str,
    scope: str,
    scope_value: str,
    limit_usd: float,
    period: str,
    thresholds: list[float],
    webhook_url: str | None,
    *,
    enforcement: str = "hard",
    locked: bool = False,
) -> Budget:
    row = await conn.fetchrow(
        """INSERT INTO budgets (id, tenant, scope, scope_value, limit_usd, period, thresholds, webhook_url,
                                enforcement, locked)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING *""",
        "bud_" + secrets.token_hex(8),
        tenant,
        scope,
        scope_value,
        limit_usd,
        period,
        sorted(thresholds),
        webhook_url,
        enforcement,
        locked,
    )
    return _row(row)


MUTABLE = ("limit_usd", "thresholds", "webhook_url", "enforcement")


async def update_budget(conn, budget_id: str, changes: dict, tenant: str | None = None) -> Budget | None:
    allowed = {k: v for k, v in changes.items() if k in MUTABLE}
    if not allowed:
        return await get_budget(conn, budget_id, tenant)
    sets = ", ".join(f"{k} = ${i + 3}" for i, k in enumerate(allowed))
    row = await conn.fetchrow(
        f"UPDATE budgets SET {sets} WHERE id = $1 AND ($2::text IS NULL OR tenant = $2) RETURNING *",
        budget_id,
        tenant,
        *allowed.values(),
    )
    return _row(row) if row else None


async def delete_budget(conn, budget_id: str, tenant: str | None = None) -> bool:
    deleted = await conn.fetchval(
        "DELETE FROM budgets WHERE id = $1 AND ($2::text IS NULL OR tenant = $2) RETURNING true", budget_id, tenant
    )
    return deleted is not None


class BudgetCache:
    """Every budget, indexed by (tenant, scope, value). A change announced by any replica names
    its budget, which alone is read again (``refresh``): a stream of changes costs every replica
    one small query each, never a reload of every tenant's budgets. Loaded whole at start and
    after a (re)subscription, when changes may have been missed. Attribution values come from
    the client, so they only ever match budgets of the caller's own tenant."""

    def __init__(self, pool: asyncpg.Pool, redis) -> None:
        self._pool = pool
        self._redis = redis
        self.by_scope: dict[tuple[str, str, str], list[Budget]] = {}
        self.by_id: dict[str, Budget] = {}
        self._task: asyncio.Task | None = None
        # Reads race: the listener, an admin change and the alert sender can each read budgets at
        # once, and a read that began earlier may answer later. Each read takes a ticket as its
        # query is sent; a read older than what is installed is not installed over it.
        self._ticket = 0
        self._loaded = 0  # the ticket of the whole load installed
        self._fresh: dict[str, tuple[int, Budget | None]] = {}  # rows read after it: (ticket, row)
        self._reading = 0  # reads in flight (``_fresh`` matters only while one is)

    def _next_ticket(self) -> int:
        self._ticket += 1
        return self._ticket

    async def _read(self, query):
        """(ticket, what ``query(conn)`` answers); ``_fresh`` is emptied once no read is left in
        flight, since nothing older can then come back."""
        self._reading += 1
        try:
            async with self._pool.acquire() as conn:
                ticket = self._next_ticket()
                return ticket, await query(conn)
        finally:
            self._reading -= 1

    def _settled(self) -> None:
        if not self._reading:
            self._fresh.clear()

    async def load(self) -> None:
        ticket, budgets = await self._read(list_budgets)
        try:
            self._install_all(ticket, budgets)
        finally:
            self._settled()

    def _install_all(self, ticket: int, budgets: list[Budget]) -> None:
        if ticket < self._loaded:
            return  # a later load is installed already
        index: dict[tuple[str, str, str], list[Budget]] = {}
        for b in budgets:
            index.setdefault((b.tenant, b.scope, b.scope_value), []).append(b)
        self.by_scope, self.by_id, self._loaded = index, {b.id: b for b in budgets}, ticket
        _KEYS_CACHE.clear()
        newer = {k: v for k, v in self._fresh.items() if v[0] > ticket}  # read while this load ran
        self._fresh = newer
        for budget_id, (_, row) in newer.items():
            self._install(budget_id, row)

    async def refresh(self, budget_id: str) -> None:
        """Reads one budget again: changed, created or deleted."""
        ticket, row = await self._read(lambda conn: conn.fetchrow("SELECT * FROM budgets WHERE id = $1", budget_id))
        try:
            seen = self._fresh.get(budget_id)
            if ticket < self._loaded or (seen is not None and ticket < seen[0]):
                return  # a read that began later is installed already
            budget = _row(row) if row is not None else None
            self._fresh[budget_id] = (ticket, budget)
            self._install(budget_id, budget)
        finally:
            self._settled()

    def _install(self, budget_id: str, b: Budget | None) -> None:
        self._drop(budget_id)
        if b is not None:
            self.by_id[b.id] = b
            self.by_scope.setdefault((b.tenant, b.scope, b.scope_value), []).append(b)

    def _drop(self, budget_id: str) -> None:
        _KEYS_CACHE.pop(budget_id, None)
        old = self.by_id.pop(budget_id, None)
        if old is not None:
            where = (old.tenant, old.scope, old.scope_value)
            rest = [b for b in self.by_scope.get(where, ()) if b.id != budget_id]
            if rest:
                self.by_scope[where] = rest
            else:
                self.by_scope.pop(where, None)

    async def start(self) -> None:
        await self.load()
        self._task = asyncio.create_task(self._listen(), name="budget-changes")

    async def _changed(self, data) -> None:
        name = data.decode() if isinstance(data, bytes) else str(data)
        await (self.refresh(name) if name.startswith("bud_") else self.load())

    async def _listen(self) -> None:
        await listen_forever(self._redis, CHANGED, self._changed, self.load)

    async def stop(self) -> None:
        await stop_task(self._task)

    def applicable(self, attribution: dict) -> list[Budget]:
        out: list[Budget] = []
        if not self.by_scope:
            return out
        tenant = attribution.get("tenant") or "default"
        for scope in SCOPES:
            if scope == "tag":
                for tag in attribution.get("tags") or ():
                    out.extend(self.by_scope.get((tenant, "tag", tag), ()))
                continue
            value = attribution.get(scope)
            if value:
                out.extend(self.by_scope.get((tenant, scope, value), ()))
        if len(out) > 1 and len({b.id for b in out}) < len(out):  # each budget once (one reservation each)
            out = list({b.id: b for b in out}.values())
        return out


async def announce_change(redis, budget_id: str | None = None) -> None:
    """Tells every replica a budget changed (``budget_id``: that one alone; None: reload all)."""
    await redis.publish(CHANGED, budget_id or "1")
