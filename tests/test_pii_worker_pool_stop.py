"""The PII worker pool's stop while a replacement worker is starting: the replacement's task is
cancelled and awaited, then every worker is stopped, so no worker process, socket or task of
the pool outlives the stop. Before, the stop cancelled the task without awaiting it: it returned while
the task was still ending (reaping the process it had spawned), and a task that lost its
cancellation (Python 3.11's ``wait_for`` returns a finished result instead of raising) went on to
start a worker process after the stop."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from policies.pii import workers


def _fds() -> set[str]:
    """This process's open file descriptors, each as what it points to."""
    return {os.readlink(f) for f in Path("/proc/self/fd").iterdir() if f.exists()}


def _children() -> set[int]:
    """This process's child processes."""
    out: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        out |= {int(p) for p in (task / "children").read_text().split()}
    return out


@pytest.mark.parametrize(
    "honours_cancel", [True, False, "second"], ids=["cancelled", "cancel-lost", "first-cancel-lost-then-waits"]
)
def test_stop_while_a_replacement_starts_leaves_no_worker_process_nor_task(monkeypatch, honours_cancel):
    """("first-cancel-lost-then-waits" failed before the stop cancelled again: a task whose first
    cancellation was lost and that then waited on was left running past the stop's bound.)"""
    real_spawn = asyncio.create_subprocess_exec

    async def main() -> tuple[list[str], set[int], set[str]]:
        before, fds = _children(), _fds()
        pool = workers.WorkerPool(1)
        await pool.start([])
        worker = pool.workers[0]
        await asyncio.wait_for(worker.ready.wait(), 60)
        spawned = asyncio.Event()

        async def held_spawn(*args, **kwargs):
            """The replacement's process spawned, its start held there until the stop comes."""
            proc = await real_spawn(*args, **kwargs)
            spawned.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                if honours_cancel is True:  # what asyncio's own spawn does when cancelled: kill, then reap
                    proc.kill()
                    await proc.wait()
                    raise
            if honours_cancel == "second":  # the first cancellation lost, then waiting on again
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    proc.kill()
                    await proc.wait()
                    raise
            return proc

        monkeypatch.setattr(workers.asyncio, "create_subprocess_exec", held_spawn)
        worker.kill()  # a call's timeout: the worker killed and a replacement started in the background
        pool._replace(worker)
        await asyncio.wait_for(spawned.wait(), 60)
        await pool.stop()
        tasks_left = [repr(t) for t in pool._tasks if not t.done()]
        children_left = _children() - before
        fds_left = _fds() - fds
        # what the old stop left behind is cleaned up here, not left to other tests
        for t in pool._tasks:
            t.cancel()
        await asyncio.gather(*pool._tasks, return_exceptions=True)
        await pool.stop()
        return tasks_left, children_left, fds_left

    tasks_left, children_left, fds_left = asyncio.run(main())
    assert (tasks_left, children_left, fds_left) == ([], set(), set())
