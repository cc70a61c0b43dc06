"""gateway/started.py: the list of started parts that both a failed start and the stop run."""

from __future__ import annotations

import asyncio

from gateway.started import Started


def test_parts_stop_last_started_first_each_whatever_another_raised():
    stopped: list[str] = []

    def part(name: str, fails: bool = False):
        async def stop() -> None:
            stopped.append(name)
            if fails:
                raise RuntimeError(f"{name} did not stop")

        return stop

    async def go() -> None:
        started = Started()
        started.add(part("pool"))
        started.add(lambda: stopped.append("sync"))  # (a sync close)
        started.add(part("ledger", fails=True))
        started.add(part("hitl"))
        await started.stop()
        await started.stop()  # (once: the list is emptied)

    asyncio.run(go())
    assert stopped == ["hitl", "ledger", "sync", "pool"]


def test_parts_started_together_are_stopped_at_once():
    """Readers each waiting out a blocking read on their stop: the group's stops overlap."""
    events: list[str] = []

    def reader(name: str):
        async def stop() -> None:
            events.append(f"{name} begins")
            await asyncio.sleep(0)
            events.append(f"{name} ends")

        return stop

    async def go() -> None:
        started = Started()
        started.add(reader("pool"))
        started.add(reader("alerts"), together="readers")
        started.add(reader("memory"), together="readers")
        started.add(reader("ledger"))
        await started.stop()

    asyncio.run(go())
    assert events[:2] == ["ledger begins", "ledger ends"]
    assert set(events[2:4]) == {"memory begins", "alerts begins"}
    assert events[-2:] == ["pool begins", "pool ends"]


def test_a_cancellation_of_the_stop_itself_goes_up():
    """A part's own ``CancelledError`` is its failure (the others still stop), but the stop being
    cancelled is not swallowed: the cancelled caller sees its cancellation."""
    stopped: list[str] = []
    hanging = asyncio.Event()

    async def raises() -> None:
        stopped.append("raises")
        raise asyncio.CancelledError()

    async def hangs() -> None:
        hanging.set()
        await asyncio.Event().wait()

    async def go() -> str:
        started = Started()
        started.add(lambda: stopped.append("pool"))
        started.add(hangs)
        started.add(raises)
        task = asyncio.create_task(started.stop(bounded=False))
        await asyncio.wait_for(hanging.wait(), 10)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled"
        return "not cancelled"

    assert asyncio.run(go()) == "cancelled"
    assert stopped == ["raises"]
