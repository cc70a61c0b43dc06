"""The blocking read's batch against its byte budget (core/stream_writer.py; an independent review found it)."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest
import redis.asyncio as aioredis

from tests.test_stream_writer import CLIENTS, MB, _empty, _sizes, _until, _writer


@pytest.mark.parametrize("client", CLIENTS)
def test_after_a_blocking_read_the_next_entry_is_sized_against_what_is_left(services, client):
    """The blocking read takes one entry of 0.9 MB; the script then takes its first entry
    unsized (``last`` is nil), so the batch holds two such entries: 1.8 MB for a 1 MB budget
    (neither the budget nor "its first entry when that alone is larger")."""

    async def main():
        stream = f"test:{{gw}}:sw-{uuid.uuid4().hex[:8]}"
        redis = aioredis.from_url(services[1])
        batches: list[list[dict]] = []

        async def write(conn, entries):
            batches.append(entries)

        async with asyncpg.create_pool(services[0], min_size=1, max_size=2) as pool:
            writer = _writer(redis, pool, client, services[1], stream, write, max_batch_bytes=MB, block_ms=2000)
            await writer.start()
            try:
                await asyncio.sleep(0.3)  # the writer waits in its blocking read
                pipe = redis.pipeline(transaction=False)
                for i in range(4):
                    pipe.xadd(stream, {"n": str(i), "blob": b"L" * (9 * MB // 10)})
                await pipe.execute()
                await _until(lambda: _empty(redis, stream), "every entry written", 30)
            finally:
                await writer.stop()
        assert max(_sizes(b) for b in batches) <= MB + 8, [_sizes(b) for b in batches]
        await redis.delete(stream)
        await redis.aclose()

    asyncio.run(main())
