"""The agent registry's version poll ends when the registry stops, even when the cancellation
that stop sends is lost inside a call the poll makes (a replica's shutdown otherwise waits out
the 3 s grace of core/background.stop_task, and the task is left running)."""

from __future__ import annotations

import asyncio

from runtime.agent_registry import AgentRegistry


class LosesCancellation:
    """A Redis whose GET swallows the first cancellation that reaches it while it waits."""

    def __init__(self) -> None:
        self.gets = 0
        self.lost = 0
        self.waiting = asyncio.Event()

    async def get(self, key: str) -> bytes | None:
        self.gets += 1
        self.waiting.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if self.lost:
                raise
            self.lost += 1
        return None


def test_version_poll_ends_on_stop_even_when_its_cancellation_is_lost() -> None:
    async def go() -> tuple[bool, int, list[str]]:
        redis = LosesCancellation()
        registry = AgentRegistry(None, redis)
        poll = asyncio.create_task(registry._poll(), name="agent-version")
        registry._tasks = [poll]
        await asyncio.wait_for(redis.waiting.wait(), 10)  # the poll waits in its GET
        await registry.stop()
        done = poll.done()
        if not done:  # (without the fix) don't leave it running past the loop
            poll.cancel()
            await asyncio.gather(poll, return_exceptions=True)
        return done, redis.lost, [t.get_name() for t in registry._tasks]

    done, lost, left = asyncio.run(go())
    assert lost == 1  # the cancellation did reach the GET, which dropped it
    assert done, "the version poll kept running after stop()"
    assert left == []
