"""Stopping background tasks at shutdown without hanging on them.

A task cancelled inside a blocking redis-py call (``XREADGROUP … BLOCK``, a pub/sub read) can
fail to finish: the client's clean-up after the cancellation waits on the connection it was
reading from. Shutdown must not wait on that (SIGTERM would then end in SIGKILL), so a task
that does not finish within ``grace`` seconds after its cancellation is logged and left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger("gateway")


async def stop_task(task: asyncio.Task | None, grace: float = 3.0) -> None:
    if task is None or task.done():
        return
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=grace)
    if not done:
        where = " <- ".join(
            f"{f.f_code.co_name} ({f.f_code.co_filename}:{f.f_lineno})" for f in task.get_stack(limit=8)
        )
        log.warning(
            "background task %s did not stop within %.0f s of its cancellation; left behind at %s",
            task.get_name(),
            grace,
            where,
        )
    elif not task.cancelled() and task.exception() is not None:
        log.debug("background task %s ended with %r", task.get_name(), task.exception())


async def stop_tasks(tasks, grace: float = 3.0) -> None:
    await asyncio.gather(*(stop_task(t, grace) for t in tasks))


async def pause(stopping: asyncio.Event, seconds: float) -> None:
    """Sleeps ``seconds``, or less if ``stopping`` is set meanwhile (a loop's wait that shutdown
    need not sit out)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)
