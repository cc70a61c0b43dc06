"""The budget cache's reads race: the pub/sub listener, an admin change and the alert sender each
read budgets, and a read that began earlier can answer later. What it installs must be the
newest row read, whatever order the answers come back in (real PostgreSQL; only the order in
which the answers reach the cache is held back by the test)."""

from __future__ import annotations

import asyncio
import secrets

import asyncpg

from gateway.db import migrate
from policies import budgets


class _HeldPool:
    """The real pool, but a read started while ``hold`` is set waits for ``release`` before its
    answer reaches the cache (its query has run by then: it answers what it read)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.hold = False
        self.release = asyncio.Event()
        self.read = asyncio.Event()  # the held read's query has answered

    def acquire(self):
        held, outer = self.hold, self

        class _Conn:
            async def __aenter__(self):
                self.cm = outer.pool.acquire()
                self.conn = await self.cm.__aenter__()
                return _Wrapped(self.conn, held, outer)

            async def __aexit__(self, *exc):
                return await self.cm.__aexit__(*exc)

        return _Conn()


class _Wrapped:
    def __init__(self, conn, held: bool, pool: _HeldPool) -> None:
        self._conn, self._held, self._pool = conn, held, pool

    async def _after(self, result):
        if self._held:
            self._pool.read.set()
            await self._pool.release.wait()
        return result

    async def fetchrow(self, *args):
        return await self._after(await self._conn.fetchrow(*args))

    async def fetch(self, *args):
        return await self._after(await self._conn.fetch(*args))


async def _setup(database_url: str):
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await migrate(conn)
    tenant, bid = f"t-{secrets.token_hex(4)}", f"bud_{secrets.token_hex(8)}"
    await pool.execute(
        "INSERT INTO budgets (id, tenant, scope, scope_value, limit_usd, period) "
        "VALUES ($1, $2, 'customer', 'acme', 1, 'monthly')",
        bid,
        tenant,
    )
    return pool, tenant, bid


def test_an_older_refresh_answering_late_does_not_overwrite_a_newer_one(services):
    async def run() -> None:
        pool, _, bid = await _setup(services[0])
        held = _HeldPool(pool)
        cache = budgets.BudgetCache(held, None)
        try:
            await cache.refresh(bid)
            held.hold = True
            old = asyncio.create_task(cache.refresh(bid))  # reads limit 1, answers late
            await held.read.wait()
            held.hold = False
            await pool.execute("UPDATE budgets SET limit_usd = 5 WHERE id = $1", bid)
            await cache.refresh(bid)  # reads limit 5
            assert cache.by_id[bid].limit_usd == 5
            held.release.set()
            await old
            assert cache.by_id[bid].limit_usd == 5, "a stale read was installed over the newer one"
            assert not cache._fresh, "the rows kept for ordering outlived the reads in flight"
        finally:
            await pool.execute("DELETE FROM budgets WHERE id = $1", bid)
            await pool.close()

    asyncio.run(run())


def test_a_whole_load_answering_late_keeps_a_change_read_after_it_began(services):
    async def run() -> None:
        pool, tenant, bid = await _setup(services[0])
        held = _HeldPool(pool)
        cache = budgets.BudgetCache(held, None)
        try:
            await cache.load()
            held.hold = True
            load = asyncio.create_task(cache.load())  # a resubscription's reload: reads limit 1
            await held.read.wait()
            held.hold = False
            await pool.execute("UPDATE budgets SET limit_usd = 7 WHERE id = $1", bid)
            await cache.refresh(bid)  # the change's announcement, read while the load is in flight
            held.release.set()
            await load
            assert cache.by_id[bid].limit_usd == 7, "the late reload overwrote a newer change"
            assert [b.limit_usd for b in cache.applicable({"tenant": tenant, "customer": "acme"})] == [7]
            held.hold = True
            held.release.clear()
            held.read.clear()
            late = asyncio.create_task(cache.refresh(bid))  # reads limit 7, answers after a reload
            await held.read.wait()
            held.hold = False
            await pool.execute("DELETE FROM budgets WHERE id = $1", bid)
            await cache.load()  # the budget is gone
            held.release.set()
            await late
            assert bid not in cache.by_id, "a refresh older than the reload brought a deleted budget back"
            assert cache.applicable({"tenant": tenant, "customer": "acme"}) == []
        finally:
            await pool.execute("DELETE FROM budgets WHERE id = $1", bid)
            await pool.close()

    asyncio.run(run())
