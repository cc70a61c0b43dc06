"""PostgreSQL access: the connection pool and the versioned migrations."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import asyncpg

from core.errors import ServiceUnavailable

log = logging.getLogger("gateway.db")

T = TypeVar("T")

# A transaction PostgreSQL aborted to break a deadlock, or for a serialization failure, did nothing:
# it may be run again whole (``retried``).
ABORTED = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)
TRIES = 3
# A statement PostgreSQL did not finish in time (the driver's ``COMMAND_TIMEOUT_S``, a
# ``statement_timeout``, a ``lock_timeout``), or aborted (``ABORTED``): typically one that waited
# on another transaction's locks. The database was busy, the request was not wrong: an API
# answers it as "try again" (503), not as an error of its own (500).
BUSY = (
    TimeoutError,
    asyncpg.exceptions.QueryCanceledError,
    asyncpg.exceptions.LockNotAvailableError,
    *ABORTED,
)


def busy_error() -> ServiceUnavailable:
    """What an API answers a ``BUSY`` failure: 503 ``database_busy``, try again."""
    return ServiceUnavailable(
        "The database did not finish this call in time (it was busy, e.g. with another change of the "
        "same rows); try again.",
        code="database_busy",
        headers={"retry-after": "1"},
    )


# How long the driver waits for one statement (lock waits included) before it cancels it.
COMMAND_TIMEOUT_S = 30.0

# Any constant works; it only has to be the same in every replica.
_MIGRATION_LOCK = 0x6761_7465_7761_79


def migration_files() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every numbered SQL file, in order."""
    folder = importlib.resources.files("gateway") / "migrations"
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append((version, entry.name, entry.read_text()))
    return sorted(found)


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply pending migrations, each in its own transaction; safe with concurrent replicas."""
    applied: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in migration_files():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)
            applied.append(name)
            log.info("applied migration %s", name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    return applied


async def connect_pool(url: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    return await asyncpg.create_pool(url, min_size=min_size, max_size=max_size, command_timeout=COMMAND_TIMEOUT_S)


@contextlib.asynccontextmanager
async def tenant_transaction(pool: asyncpg.Pool, tenant: str | None) -> AsyncIterator[asyncpg.Connection]:
    """A transaction that sees only ``tenant``'s rows, whatever its queries forget to filter:
    it runs as the role ``gateway_tenant`` under row-level security (migration 0004), with the
    tenant set for this transaction alone. ``tenant`` None is the super-admin: every row."""
    async with pool.acquire() as conn, conn.transaction():
        if tenant is not None:
            await conn.execute(_SCOPE_SQL, tenant)
        yield conn


_SCOPE_SQL = "SELECT set_config('gateway.tenant', $1, true), set_config('role', 'gateway_tenant', true)"


async def retried(transaction: Callable[[], Awaitable[T]], tries: int = TRIES) -> T:
    """``transaction()`` (one whole transaction, begun and committed inside it, with no other
    effect) run again when PostgreSQL aborted it (``ABORTED``: the other side of the deadlock
    then holds nothing of it), at most ``tries`` times with a short jittered pause between; the
    last abort is raised (the caller's to answer as "try again")."""
    for attempt in range(1, tries + 1):
        try:
            return await transaction()
        except ABORTED as exc:
            if attempt == tries:
                raise
            log.warning("transaction aborted (%s), tried again", type(exc).__name__)
            await asyncio.sleep(random.uniform(0.01, 0.05) * attempt)
    raise AssertionError("unreachable")
