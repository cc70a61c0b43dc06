"""Which sessions wait behind a test's own lock holder (for tests that make two transactions
interleave by holding a lock until the others wait on it).

The holder asks from inside the transaction that holds its lock, and PostgreSQL keeps a
transaction's first read of ``pg_stat_activity`` to its end: a session that connected after it
(a gateway's pool opening a connection for the second request) was never in the list, so never
counted however long it waited. Each count reads it afresh (``pg_stat_clear_snapshot``)."""

from __future__ import annotations

import asyncpg

# Sessions blocked by ``$1`` (a backend pid), directly or behind another session it blocks (a
# row lock taken by a session that then waits on the holder's advisory lock). Counting every
# session of the database that waits on some lock also counted the background writers of the
# tests' shared gateway (the ledger's, memory's), which wait on locks of their own.
_BLOCKED_BY = """WITH RECURSIVE behind(pid) AS (
    SELECT a.pid FROM pg_stat_activity a WHERE $1 = ANY (pg_blocking_pids(a.pid))
  UNION
    SELECT a.pid FROM pg_stat_activity a JOIN behind b ON b.pid = ANY (pg_blocking_pids(a.pid))
)
SELECT count(*) FROM behind"""


async def blocked_by(conn: asyncpg.Connection, holder_pid: int) -> int:
    """How many sessions wait, directly or not, on a lock ``holder_pid``'s session holds."""
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    return await conn.fetchval(_BLOCKED_BY, holder_pid)
