"""Budgets: stored in PostgreSQL, cached in every process, counted in Redis per period."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from gateway.background import stop_task
from gateway.pubsub import listen_forever

log = logging.getLogger("gateway.budgets")

SCOPES = ("tenant", "key", "user", "agent", "workflow", "customer", "tag")
PERIODS = ("daily", "weekly", "monthly", "none")
CHANGED = "gateway:budgets:changed"
NANO = 1_000_000_000  # budget counters are integer nano-USD
_KEYS_CACHE: dict[str, tuple[int, tuple[str, str, str, int]]] = {}


@dataclass(frozen=True, slots=True)
class Budget:
    id: str
    scope: str
    scope_value: str
    limit_usd: float
    period: str
    thresholds: tuple[float, ...]
    webhook_url: str | None

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
        """(spent key, reserved key, alert key prefix, ttl seconds) for the current period."""
        if now is None:  # per request: cached for the second, periods change at midnight
            second = int(time.time())
            cached = _KEYS_CACHE.get(self.id)
            if cached is not None and cached[0] == second:
                return cached[1]
            value = self.keys(datetime.fromtimestamp(second, UTC))
            _KEYS_CACHE[self.id] = (second, value)
            return value
        period, end = self.window(now)
        base = f"gw:{{gw}}:budget:{self.id}:{period}"
        ttl = int((end - (now or datetime.now(UTC))).total_seconds()) + 86400 if end else 400 * 86400
        return f"{base}:spent", f"{base}:reserved", f"{base}:alert:", ttl


def _row(r: asyncpg.Record) -> Budget:
    return Budget(
        r["id"], r["scope"], r["scope_value"], r["limit_usd"], r["period"], tuple(r["thresholds"]), r["webhook_url"]
    )


async def list_budgets(conn) -> list[Budget]:
    rows = await conn.fetch("SELECT * FROM budgets ORDER BY created_at")
    return [_row(r) for r in rows]


async def get_budget(conn, budget_id: str) -> Budget | None:
    row = await conn.fetchrow("SELECT * FROM budgets WHERE id = $1", budget_id)
    return _row(row) if row else None


async def create_budget(
    conn, scope: str, scope_value: str, limit_usd: float, period: str, thresholds: list[float], webhook_url: str | None
) -> Budget:
    row = await conn.fetchrow(
        """INSERT INTO budgets (id, scope, scope_value, limit_usd, period, thresholds, webhook_url)
           VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *""",
        "bud_" + secrets.token_hex(8),
        scope,
        scope_value,
        limit_usd,
        period,
        sorted(thresholds),
        webhook_url,
    )
    return _row(row)


async def update_budget(conn, budget_id: str, changes: dict) -> Budget | None:
    allowed = {k: v for k, v in changes.items() if k in ("limit_usd", "thresholds", "webhook_url")}
    if not allowed:
        return await get_budget(conn, budget_id)
    sets = ", ".join(f"{k} = ${i + 2}" for i, k in enumerate(allowed))
    row = await conn.fetchrow(f"UPDATE budgets SET {sets} WHERE id = $1 RETURNING *", budget_id, *allowed.values())
    return _row(row) if row else None


async def delete_budget(conn, budget_id: str) -> bool:
    return await conn.fetchval("DELETE FROM budgets WHERE id = $1 RETURNING true", budget_id) is not None


class BudgetCache:
    """Every budget, indexed by scope; reloaded when any replica announces a change."""

    def __init__(self, pool: asyncpg.Pool, redis) -> None:
        self._pool = pool
        self._redis = redis
        self.by_scope: dict[tuple[str, str], list[Budget]] = {}
        self.by_id: dict[str, Budget] = {}
        self._task: asyncio.Task | None = None

    async def load(self) -> None:
        async with self._pool.acquire() as conn:
            budgets = await list_budgets(conn)
        index: dict[tuple[str, str], list[Budget]] = {}
        for b in budgets:
            index.setdefault((b.scope, b.scope_value), []).append(b)
        self.by_scope, self.by_id = index, {b.id: b for b in budgets}

    async def start(self) -> None:
        await self.load()
        self._task = asyncio.create_task(self._listen(), name="budget-changes")

    async def _listen(self) -> None:
        await listen_forever(self._redis, CHANGED, lambda _data: self.load(), self.load)

    async def stop(self) -> None:
        await stop_task(self._task)

    def applicable(self, attribution: dict) -> list[Budget]:
        out: list[Budget] = []
        if not self.by_scope:
            return out
        for scope in SCOPES:
            if scope == "tag":
                for tag in attribution.get("tags") or ():
                    out.extend(self.by_scope.get(("tag", tag), ()))
                continue
            value = attribution.get(scope)
            if value:
                out.extend(self.by_scope.get((scope, value), ()))
        return out


async def announce_change(redis) -> None:
    await redis.publish(CHANGED, "1")
