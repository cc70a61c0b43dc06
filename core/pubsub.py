"""Listening on a Redis pub/sub channel for as long as the process runs.

Used for what every replica must hear at once: key revocations, health events, budget
changes. A dropped subscription is re-established with backoff, and ``on_subscribed`` runs
after every (re)subscription so the listener can catch up on what it missed meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Callable

log = logging.getLogger("gateway.pubsub")


async def _call(fn: Callable, *args) -> None:
    result = fn(*args)
    if inspect.isawaitable(result):
        await result


async def listen_forever(redis, channel: str, on_message: Callable, on_subscribed: Callable | None = None) -> None:
    backoff = 0.1
    while True:
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            if on_subscribed is not None:
                await _call(on_subscribed)
            backoff = 0.1
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    await _call(on_message, message["data"])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("subscription to %s lost: %s", channel, exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
