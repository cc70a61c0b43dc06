"""SLAs of the escalation queue, and the sweeper every replica runs.

Each urgency has two SLAs: time to the first human response and time to resolution (fixed on
the escalation when it opens, from ``hitl.sla`` of the config). When 80 % of one has elapsed a
warning fires, when all of it has a breach fires — exactly once each across replicas: the alert
is claimed by a conditional UPDATE (``first_warned_at IS NULL`` → now), so of several replicas
sweeping at once only one gets the row back and raises the alert. The alert itself goes through
``emit`` (the composition passes the budget alerts' mechanism: log line, metric, signed webhook).

The same sweep puts expired leases back in the queue and, now and then, puts back the Redis
hold keys of open escalations (Redis restarted without its data).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg

from core.background import pause, stop_task
from runtime.hitl import escalations, held
from runtime.memory import erased_after

log = logging.getLogger("gateway.hitl")

WARN_FRACTION = 0.8
HOLD_TIMEOUT_S = 5.0  # a spooled escalation's hold, written before its commit


@dataclass(frozen=True, slots=True)
class Sla:
    first_response_s: int
    resolution_s: int


DEFAULT_SLAS = {
    "urgent": Sla(300, 3600),
    "high": Sla(900, 4 * 3600),
    "normal": Sla(3600, 24 * 3600),
    "low": Sla(4 * 3600, 72 * 3600),
}

# (alert type, which SLA, column set once, the SLA's seconds column, fraction, extra condition)
_CHECKS = (
    ("escalation.sla_warning", "first_response", "first_warned_at", "sla_first_s", WARN_FRACTION,
     "first_response_at IS NULL"),
    ("escalation.sla_breach", "first_response", "first_breached_at", "sla_first_s", 1.0, "first_response_at IS NULL"),
    ("escalation.sla_warning", "resolution", "resolve_warned_at", "sla_resolve_s", WARN_FRACTION, "true"),
    ("escalation.sla_breach", "resolution", "resolve_breached_at", "sla_resolve_s", 1.0, "true"),
)  # fmt: skip


def _sql(column: str, seconds: str, fraction: float, extra: str) -> str:
    return f"""UPDATE escalations SET {column} = now()
               WHERE status <> 'resolved' AND {column} IS NULL AND {extra}
                 AND now() >= created_at + make_interval(secs => {seconds} * {fraction!r})
               RETURNING id, tenant, agent, team, urgency, {seconds} AS sla_seconds,
                         extract(epoch FROM now() - created_at) AS elapsed"""


Emit = Callable[[dict], Awaitable[None]]


class Sweeper:
    def __init__(
        self,
        pool,
        redis,
        holds: held.Holds,
        emit: Emit,
        *,
        interval: float = 5.0,
        repair_every: int = 60,
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._holds = holds
        self._emit = emit
        self._interval = interval
        self._repair_every = max(1, repair_every)
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._sweeps = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="escalation-sweeper")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=3)
        await stop_task(self._task)

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("escalation sweep failed: %s", exc)
            await pause(self._stopping, self._interval)

    async def open_spooled(self, limit: int = 100) -> int:
        """Escalations their turn could not write (PostgreSQL failed then) opened now, and their
        conversations held; one that fails again goes back to the front of the spool."""
        opened = 0
        for _ in range(limit):
            esc = await held.unspool(self._redis)
            if esc is None:
                break
            try:
                if await erased_after(
                    self._redis, esc["tenant"], esc["agent_id"], esc["conversation_id"], esc.get("seq")
                ):
                    # its turn loaded the conversation before it was erased: its words are not kept
                    log.info("spooled escalation %s dropped: its conversation was erased", esc.get("id"))
                    continue
                async with self._pool.acquire() as conn, conn.transaction():
                    # (an erasure since its turn loaded the conversation, or since it was spooled)
                    row = await escalations.open_unless_erased(conn, esc, escalations.erased_since_time(esc))
                    if row is not None:
                        # held before the commit, under the erasure's lock (shared): an erasure
                        # waiting for it resolves the escalation and releases the hold after it
                        # (held after the commit, the hold could follow that release and stay)
                        async with asyncio.timeout(HOLD_TIMEOUT_S):  # (erasures wait meanwhile)
                            await self._holds.hold(esc["tenant"], esc["agent_id"], esc["conversation_id"], row[0]["id"])
                if row is None:
                    log.info("spooled escalation %s dropped: its conversation was erased", esc.get("id"))
                    continue
                row, created = row
            except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, KeyError, TypeError) as exc:
                # this one will never go in: dropped, not retried for ever ahead of the others
                log.error("spooled escalation %s dropped: %s", esc.get("id"), type(exc).__name__)
                continue
            except Exception:
                await held.respool(self._redis, esc)  # PostgreSQL cannot take it yet: next sweep
                raise
            await held.publish(self._redis, esc["tenant"], "opened" if created else "customer_message", row)
            opened += 1
        return opened

    async def sweep(self) -> list[dict]:
        """One pass: spooled escalations opened, SLA alerts claimed and raised, expired leases
        returned to the queue."""
        try:
            await self.open_spooled()
        except Exception as exc:  # Redis or PostgreSQL down: the spool waits; the SLAs are swept anyway
            log.warning("spooled escalations not opened yet: %s", type(exc).__name__)
        fired: list[dict] = []
        async with self._pool.acquire() as conn:
            for kind, which, column, seconds, fraction, extra in _CHECKS:
                for r in await conn.fetch(_sql(column, seconds, fraction, extra)):
                    fired.append(
                        {
                            "type": kind,
                            "sla": which,
                            "escalation_id": r["id"],
                            "tenant": r["tenant"],
                            "agent": r["agent"],
                            "team": r["team"],
                            "urgency": r["urgency"],
                            "sla_seconds": r["sla_seconds"],
                            "elapsed_seconds": round(float(r["elapsed"]), 3),
                        }
                    )
            expired = await escalations.expire_leases(conn)
            repair = self._sweeps % self._repair_every == 0
            holds = await escalations.open_holds(conn) if repair else []
        self._sweeps += 1
        for alert in fired:
            try:
                await self._emit(alert)
            except Exception as exc:  # claimed already: logged, never raised twice
                log.error("escalation SLA alert not sent: %s", exc)
        for row in expired:
            await held.publish(self._redis, row["tenant"], "lease_expired", row)
        if holds:
            await self._repair(holds)
        return fired

    async def _repair(self, holds: list[tuple]) -> None:
        """Hold keys of open escalations put back where missing (NX); an escalation resolved
        meanwhile (its key released before this SET) is released again after a re-check: by the
        conversation the hold was put back for (one an erasure resolved holds the erasure's tag
        as its conversation now, and the hold's key is the id's). An escalation resolved after the
        re-check was resolved after this SET: whoever resolved it releases the hold after."""
        await self._holds.hold_many(holds, only_missing=True)
        async with self._pool.acquire() as conn:
            closed = await conn.fetch(
                "SELECT id FROM escalations WHERE id = ANY($1) AND status = 'resolved'", [h[3] for h in holds]
            )
        gone = {r["id"] for r in closed}
        for tenant, agent_id, conversation_id, escalation_id in holds:
            if escalation_id in gone:
                await self._holds.release(tenant, agent_id, conversation_id, escalation_id)
