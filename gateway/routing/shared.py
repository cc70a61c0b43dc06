"""Health shared across replicas through Redis.

When a replica cools a key down, takes it out of rotation or opens a circuit, it stores the
event under a key that expires with it and publishes it; every replica applies what it hears,
and a replica that starts later reads what is still in force. Requests never wait on this:
publishing is a background task, and the request path reads only local state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import orjson

from core.background import stop_task
from core.pubsub import listen_forever
from gateway.routing.router import Router

log = logging.getLogger("gateway.routing")
CHANNEL = "gateway:health"
PREFIX = "gateway:health:"


class SharedHealth:
    def __init__(self, redis, router: Router) -> None:
        self._redis = redis
        self._router = router
        self._tasks: set[asyncio.Task] = set()
        self._listener: asyncio.Task | None = None

    def publish(self, event: dict) -> None:
        task = asyncio.get_running_loop().create_task(self._send(event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, event: dict) -> None:
        ttl_ms = int((float(event["until"]) - time.time()) * 1000)
        if ttl_ms <= 0:
            return
        name = PREFIX + ":".join(str(event.get(k, "")) for k in ("t", "p", "k", "d"))
        data = orjson.dumps(event)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.set(name, data, px=ttl_ms)
                pipe.publish(CHANNEL, data)
                await pipe.execute()
        except Exception as exc:  # health sharing is best effort; the local state already holds
            log.warning("could not share a health event: %s", exc)

    async def start(self) -> None:
        await self._load()
        self._listener = asyncio.create_task(self._listen(), name="routing-health")

    async def _load(self) -> None:
        async for name in self._redis.scan_iter(match=PREFIX + "*", count=500):
            data = await self._redis.get(name)
            if data:
                with contextlib.suppress(ValueError):
                    self._router.apply(orjson.loads(data))

    async def _listen(self) -> None:
        def event(data) -> None:
            with contextlib.suppress(ValueError):
                self._router.apply(orjson.loads(data))

        await listen_forever(self._redis, CHANNEL, event, self._load)  # catch up after each subscription

    async def stop(self) -> None:
        await stop_task(self._listener)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
