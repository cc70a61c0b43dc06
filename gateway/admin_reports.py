"""The admin reports that read many rows: ``/admin/spend``, an agent's experiments
(``GET /admin/agents/{name}/experiments``) and the escalation statistics
(``/admin/escalations/stats``).

Each aggregates as many ledger, run, feedback or escalation rows as its range holds, inside a
pooled connection (the pool is every tenant's: ten connections). Unbounded, ten of them from
one tenant admin held the pool for up to the driver's 30 s, and every tenant's requests that need
PostgreSQL waited. So each report's transaction:

- runs its statements under ``server.admin_report_timeout_s`` (PostgreSQL's
  ``statement_timeout``, for that transaction alone): past it, 503 ``report_timeout`` (narrow the
  range and ask again);
- is one of at most ``server.admin_reports_per_tenant`` such reports of its tenant (the
  super-admin's count as one tenant's) running at once in this process: past it, 429
  ``too_many_reports`` with ``retry-after`` before any connection is taken; and of at most
  ``server.admin_reports_total`` of every tenant's (each tenant's cap added up could still hold
  the pool), the same 429.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import asyncpg

from core.errors import RateLimited, ServiceUnavailable
from gateway.db import tenant_transaction

_TIMEOUT_SQL = "SELECT set_config('statement_timeout', $1, true)"


class Running:
    """The heavy reports running in this process, per tenant (None: the super-admin); or other
    work held to a per-tenant count the same way (``what``, its ``setting`` and 429 ``code``)."""

    def __init__(
        self, what: str = "admin reports", setting: str = "server.admin_reports_per_tenant", code="too_many_reports"
    ) -> None:
        self._by_tenant: dict[str | None, int] = {}
        self._total = 0
        self._what, self._setting, self._code = what, setting, code

    @contextlib.contextmanager
    def one(self, tenant: str | None, cap: int, total: int | None = None) -> Iterator[None]:
        """One more of the tenant's, within its ``cap`` and every tenant's ``total`` (None: no
        bound across tenants), else 429 at once."""
        n = self._by_tenant.get(tenant, 0)
        if n >= cap:
            raise RateLimited(
                f"This tenant has {cap} {self._what} running on this server ({self._setting}); retry when one is done.",
                code=self._code,
                headers={"retry-after": "1"},
            )
        if total is not None and self._total >= total:
            raise RateLimited(
                f"This server runs {total} {self._what} at once (server.admin_reports_total); retry when one is done.",
                code=self._code,
                headers={"retry-after": "1"},
            )
        self._by_tenant[tenant] = n + 1
        self._total += 1
        try:
            yield
        finally:
            self._total -= 1
            if self._by_tenant[tenant] <= 1:
                del self._by_tenant[tenant]
            else:
                self._by_tenant[tenant] -= 1


@contextlib.asynccontextmanager
async def transaction(
    running: Running, pool: asyncpg.Pool, wall: str | None, *, timeout_s: float, cap: int, total: int | None = None
) -> AsyncIterator[asyncpg.Connection]:
    """A tenant transaction (``wall``: its row-level-security tenant, None the super-admin) for a
    heavy report: admitted under the tenant's ``cap`` and every tenant's ``total``, each statement
    cut at ``timeout_s`` (or by the driver's own timeout, should that come first: the same 503)."""
    with running.one(wall, cap, total):
        try:
            async with tenant_transaction(pool, wall) as conn:
                await conn.execute(_TIMEOUT_SQL, f"{max(1, round(timeout_s * 1000))}ms")
                yield conn
        except (asyncpg.exceptions.QueryCanceledError, TimeoutError):
            raise ServiceUnavailable(
                f"The report took longer than {timeout_s:g} s (server.admin_report_timeout_s); "
                "narrow its range ('from', 'to') and ask again.",
                code="report_timeout",
            ) from None
