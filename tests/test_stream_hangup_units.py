"""``core.hangup.Hangup`` without HTTP: the interleavings of a client's disconnect with the wait
it cuts short, each set up with events (no sleeps of some length)."""

from __future__ import annotations

import asyncio

import pytest

from core.hangup import Hangup
from core.http import ClientGone


def _client():
    left = asyncio.Event()

    async def receive() -> dict:
        await left.wait()
        return {"type": "http.disconnect"}

    return left, receive


def test_stream_hangup_cancels_the_wait_and_leaves_no_cancel_behind():
    async def run():
        left, receive = _client()
        hangup = Hangup(receive)
        upstream = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(left.set)
        with pytest.raises(ClientGone):
            await hangup.until(upstream)
        assert upstream.cancelled()  # the upstream read let go
        await asyncio.sleep(0)  # no cancel left pending for the next await (a settlement)
        assert asyncio.current_task().cancelling() == 0
        hangup.close()

    asyncio.run(run())


def test_stream_hangup_outside_a_wait_cancels_nothing_and_ends_the_next_one():
    async def run():
        left, receive = _client()
        hangup = Hangup(receive)
        left.set()
        await asyncio.wait({hangup._watch})  # the client left while the gateway was not waiting on the provider
        assert hangup.gone
        assert asyncio.current_task().cancelling() == 0

        async def upstream() -> int:
            return 1

        with pytest.raises(ClientGone):
            await hangup.until(upstream())  # (closed, never awaited: no warning)
        hangup.close()

    asyncio.run(run())


def test_stream_hangup_a_wait_that_swallows_the_cancel_hands_its_result_to_discard():
    """A wait that turns the cancel into a result of its own: the result is discarded (a stream
    opened as the client left is closed), and the cancel is taken back."""

    async def run():
        left, receive = _client()
        hangup = Hangup(receive)
        discarded = []

        async def stubborn() -> str:
            try:
                await asyncio.get_running_loop().create_future()
            except asyncio.CancelledError:
                return "opened"
            return "never"

        async def discard(result: str) -> None:
            discarded.append(result)

        asyncio.get_running_loop().call_soon(left.set)
        with pytest.raises(ClientGone):
            await hangup.until(stubborn(), discard=discard)
        assert discarded == ["opened"]
        await asyncio.sleep(0)
        assert asyncio.current_task().cancelling() == 0
        hangup.close()

    asyncio.run(run())


def test_stream_hangup_a_cancel_of_someone_else_is_not_taken_for_a_hangup():
    async def run():
        _, receive = _client()

        async def request() -> None:
            hangup = Hangup(receive)
            try:
                await hangup.until(asyncio.get_running_loop().create_future())
            finally:
                hangup.close()

        task = asyncio.ensure_future(request())
        await asyncio.sleep(0)
        task.cancel()  # a shutdown
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())


def test_a_delayed_watcher_costs_a_quick_answer_no_task_and_no_receive():
    """``after``: an answer that comes before the timer fires never starts the watcher (no task,
    the client's ``receive`` never read); ``close`` cancels the timer."""

    async def run():
        reads = 0

        async def receive() -> dict:
            nonlocal reads
            reads += 1
            await asyncio.Event().wait()
            return {"type": "http.disconnect"}

        hangup = Hangup(receive, after=3600)

        async def upstream() -> int:
            return 7

        assert await hangup.until(upstream()) == 7
        timer = hangup._timer
        hangup.close()
        assert hangup._watch is None and reads == 0
        assert timer is not None and timer.cancelled()

    asyncio.run(run())


def test_a_delayed_watcher_once_started_cancels_the_wait_it_arms():
    """The timer fired (here: ``start``, its callback, called) while the provider is silent: a
    hang-up then cuts the wait as an immediate watcher does, and the timer is gone."""

    async def run():
        left, receive = _client()
        hangup = Hangup(receive, after=3600)
        upstream = asyncio.get_running_loop().create_future()
        timer = hangup._timer
        loop = asyncio.get_running_loop()
        loop.call_soon(hangup.start)
        loop.call_soon(left.set)
        with pytest.raises(ClientGone):
            await hangup.until(upstream)
        assert upstream.cancelled() and hangup.gone
        assert hangup._timer is None
        timer.cancel()  # (the real timer would find the watcher started: start is idempotent)
        hangup.start()
        hangup.close()

    asyncio.run(run())
