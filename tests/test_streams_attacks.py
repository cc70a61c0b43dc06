"""Attacks on the pipelined Redis client (core.fastredis) and the stream writers that ride it
(runtime.runs): replies matched to the wrong caller, stalls, lost entries (real Valkey and
PostgreSQL)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis
import uvloop
from redis.exceptions import RedisError

from core.fastredis import PipelinedRedis

LOOPS = {"asyncio": asyncio.run, "uvloop": uvloop.run}


@pytest.mark.parametrize("loop", LOOPS)
def test_attack_connection_killed_under_load_never_hands_a_reply_to_another_caller(services, loop):
    """Redis drops the connection (a restart, CLIENT KILL, a failover) while callers keep coming:
    a command buffered when the loss is noticed must die with that connection, not be sent first
    on the next one, where its reply would go to the next caller — another request's admit or
    settle result, another tenant's memory window."""

    async def main():
        fast = PipelinedRedis(services[1], timeout=2)
        killer = aioredis.from_url(services[1])
        me = await killer.client_id()
        wrong: list[tuple[str, object]] = []
        answered = 0
        stopping = False

        async def call(token: str) -> None:
            nonlocal answered
            try:
                got = await fast.execute("ECHO", token)
            except (RedisError, OSError):
                return  # refused outright: fine, the caller retries or degrades
            answered += 1
            if got != token.encode():
                wrong.append((token, got))

        async def callers() -> None:  # a new caller every turn of the loop, as requests come
            tasks: set[asyncio.Task] = set()
            for i in range(10**9):
                if stopping:
                    break
                task = asyncio.create_task(call(f"{uuid.uuid4().hex[:6]}-{i}"))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                await asyncio.sleep(0)
            await asyncio.gather(*tasks)

        running = asyncio.create_task(callers())
        try:
            for _ in range(25):
                await asyncio.sleep(0.02)
                ids = [c["id"] for c in await killer.client_list() if int(c["id"]) != me]
                if ids:
                    await killer.execute_command("CLIENT", "KILL", "ID", *ids)
        finally:
            stopping = True
            await running
            await fast.close()
            await killer.aclose()
        assert answered > 0
        assert wrong == []

    LOOPS[loop](main())
