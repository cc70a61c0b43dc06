"""Stopping background tasks at shutdown without hanging on them.

A task cancelled inside a blocking redis-py call (``XREADGROUP … BLOCK``, a pub/sub read) can
fail to finish: the client's clean-up after the cancellation waits on the connection it was
reading from. Shutdown must not wait on that (SIGTERM would then end in SIGKILL), so a task
that does not finish within ``grace`` seconds after its cancellation is logged and left behind.

redis-py (8.1) also *loses* a cancellation now and then: it sends every command through
``asyncio.wait_for(…, socket_timeout)`` (5 s by default), and Python 3.11's ``wait_for`` returns
the inner result instead of raising when the cancellation comes as the send completes (fixed in
3.12, where ``wait_for`` is ``asyncio.timeout``). A loop of script calls cancelled at random
moments lost 461 cancellations over 300 tasks (/tmp probe, embedded Valkey). Seen in a full run:
a stopped queue worker's liveness beat went on renewing its liveness, so its pending entries were
not claimed early and ``gateway queue downgrade`` saw it running for the whole 60 s the test
waited. So a task still running once ``grace`` has passed is cancelled again, every
``RECANCEL_S``, for up to ``grace`` more: a task that cleans up on its cancellation keeps the
whole first ``grace`` for it, as before, and a task that lost its cancellation gets another at its next wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger("gateway")

RECANCEL_S = 0.1  # how often a task that outlived its first cancellation is cancelled again


async def stop_task(task: asyncio.Task | None, grace: float = 3.0) -> None:
    if task is None or task.done():
        return
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=grace)
    loop = asyncio.get_running_loop()
    until = loop.time() + grace
    while not done and loop.time() < until:  # its cancellation was lost (or its clean-up overran)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=min(RECANCEL_S, max(0.0, until - loop.time())))
    if not done:
        where = " <- ".join(
            f"{f.f_code.co_name} ({f.f_code.co_filename}:{f.f_lineno})" for f in task.get_stack(limit=8)
        )
        log.warning(
            "background task %s did not stop within %.0f s of its cancellation; left behind at %s",
            task.get_name(),
            2 * grace,
            where,
        )
    elif not task.cancelled() and task.exception() is not None:
        log.debug("background task %s ended with %r", task.get_name(), task.exception())


async def stop_tasks(tasks, grace: float = 3.0) -> None:
    await asyncio.gather(*(stop_task(t, grace) for t in tasks))


async def pause(stopping: asyncio.Event, seconds: float) -> None:
    """Sleeps ``seconds``, or less if ``stopping`` is set meanwhile (a loop's wait that shutdown
    need not sit out). A cancellation is never lost here (``asyncio.timeout``, not 3.11's
    ``wait_for``, which returned instead of raising when ``stopping`` was set as it came)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stopping.wait()


class Periodic:
    """``work()`` every ``every`` seconds in a task of its own (the first run one interval after
    ``start``), until ``stop``; a run that raises is logged (class name only) and the next one
    tries again."""

    def __init__(self, name: str, every: float, work, logger: logging.Logger | None = None) -> None:
        self.name = name
        self.every = every
        self._work = work
        self._log = logger or log
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self.name)

    async def _run(self) -> None:
        while not self._stopping.is_set():
            await pause(self._stopping, self.every)
            if self._stopping.is_set():
                return
            try:
                await self._work()
            except Exception as exc:  # the next run tries again
                self._log.warning("%s failed: %s", self.name, type(exc).__name__)

    async def stop(self) -> None:
        self._stopping.set()
        await stop_task(self._task)
        self._task = None
