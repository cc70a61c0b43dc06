"""The tests' lock-holder helper (tests/pg_locks.py) against the embedded PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from tests.pg_locks import blocked_by

LOCK = "SELECT pg_advisory_xact_lock(hashtext($1))"


async def _until_waiting(dsn: str, pid: int) -> None:
    """Until ``pid`` waits on a lock, as a session of its own sees it (bounded: a hang guard)."""
    observer = await asyncpg.connect(dsn)
    try:
        for _ in range(1500):
            if await observer.fetchval("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid):
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"session {pid} never waited on a lock")
    finally:
        await observer.close()


def test_a_session_that_connected_after_the_holder_first_looked_is_counted(services):
    """The holder counts from inside its own transaction, where PostgreSQL keeps the first read
    of ``pg_stat_activity`` to the transaction's end: a session connected after that read (a
    gateway's pool opening a connection for the second request) was never counted, however long
    it waited, and a test waiting for it held its lock until the gateway's 30 s statement timeout
    answered the first request with a 500."""
    key = f"pg-locks-{uuid.uuid4().hex[:8]}"

    async def go() -> int:
        holder = await asyncpg.connect(services[0])
        waiter = None
        try:
            async with holder.transaction():
                await holder.execute(LOCK, key)
                assert await blocked_by(holder, holder.get_server_pid()) == 0  # (the first read)
                waiter = await asyncpg.connect(services[0])  # connected after it
                waiting = asyncio.create_task(waiter.execute(LOCK, key))
                await _until_waiting(services[0], waiter.get_server_pid())
                count = await blocked_by(holder, holder.get_server_pid())
            await waiting  # (granted at the holder's commit)
            return count
        finally:
            if waiter is not None:
                await waiter.close()
            await holder.close()

    assert asyncio.run(go()) == 1
