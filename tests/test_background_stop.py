"""A background task whose cancellation is lost is cancelled again (core.background.stop_task).

redis-py loses a cancellation that lands inside a call now and then: the call ends, and the task
goes on. Seen in a full run (tests/test_fair_queue_s25.py's downgrade test): a stopped worker's
liveness beat survived ``stop_task`` ("did not stop within 2 s … left behind at _beat") and went
on renewing the consumer's liveness, so the queue showed it running for as long as the test
waited (60 s), and its pending entries were not claimed early as a departed consumer's are.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from core.background import stop_task
from core.queue import Queue
from tests.test_queue import PATIENCE, Worker, _name


class _LosesOneCancellation:
    """Wraps an awaitable call; once ``armed``, its next call waits and swallows the first
    cancellation that reaches it (as redis-py now and then does), then returns."""

    def __init__(self, call) -> None:
        self.call = call
        self.armed = False
        self.lost = 0
        self.waiting = asyncio.Event()

    async def __call__(self, *args, **kwargs):
        if self.armed and not self.lost:
            self.waiting.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.lost += 1
            return 1
        return await self.call(*args, **kwargs)


def test_a_task_that_loses_its_first_cancellation_is_stopped() -> None:
    async def go() -> tuple[bool, list[str]]:
        steps: list[str] = []

        async def loop_like_a_beat() -> None:
            while True:
                try:
                    await asyncio.sleep(3600)  # (a redis-py call that drops the cancellation)
                except asyncio.CancelledError:
                    if not steps:
                        steps.append("lost")
                        continue
                    steps.append("cancelled")
                    raise

        task = asyncio.create_task(loop_like_a_beat())
        await asyncio.sleep(0)
        await stop_task(task, grace=0.2)
        done = task.done()
        if not done:  # (without the fix) don't leave it running past the loop
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return done, steps

    done, steps = asyncio.run(go())
    assert steps[0] == "lost"
    assert done, "the task kept running after stop_task"
    assert steps == ["lost", "cancelled"]


def test_a_stopped_workers_liveness_ends_even_when_its_beat_lost_the_cancellation(services) -> None:
    async def go() -> tuple[int, int]:
        r = aioredis.from_url(services[1])
        q = Queue(r, _name(), liveness_ttl=0.5)
        beat = _LosesOneCancellation(q._beat_script)
        q._beat_script = beat
        async with Worker(q, lambda job: None, concurrency=1):
            beat.armed = True
            await asyncio.wait_for(beat.waiting.wait(), PATIENCE)  # the beat waits in its call
        # The worker has stopped: its liveness is over (a departed consumer's is 0), and nothing
        # renews it. Watched for 8 beat intervals: a beat still going renews it every ttl / 4.
        alive_seen = 0
        for _ in range(20):
            seconds, micros = await r.time()
            now_ms = int(seconds) * 1000 + int(micros) // 1000
            score = await r.zscore(q.consumers, q.consumer)
            alive_seen += score is not None and score >= now_ms
            await asyncio.sleep(q.liveness_ttl / 10)
        await r.aclose()
        return beat.lost, alive_seen

    lost, alive_seen = asyncio.run(go())
    assert lost == 1  # the stop's cancellation did reach the beat's call, which dropped it
    assert alive_seen == 0, "the stopped worker is still announced alive"


def test_pause_never_loses_a_cancellation():
    """A loop's pause cancelled as its ``stopping`` event is set (a shutdown does both) raises the
    cancellation, whatever the order of the two within a few loop iterations; 3.11's ``wait_for``
    returned instead, and the loop went on. It still returns on its own when its time is up."""
    from core.background import pause

    async def trial(before_set: int, before_cancel: int) -> str:
        stopping = asyncio.Event()
        task = asyncio.create_task(pause(stopping, 10))
        for _ in range(before_set):
            await asyncio.sleep(0)
        stopping.set()
        for _ in range(before_cancel):
            await asyncio.sleep(0)
        if task.done():
            return "returned first"
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled"
        return "cancellation lost"

    async def main() -> list[str]:
        outcomes = [await trial(a, b) for a in range(4) for b in range(4)]
        await asyncio.wait_for(pause(asyncio.Event(), 0.01), 5)  # times out quietly
        return outcomes

    outcomes = asyncio.run(main())
    assert "cancellation lost" not in outcomes
    assert "cancelled" in outcomes
