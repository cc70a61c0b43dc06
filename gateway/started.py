"""The parts a start has started, in order: the one list both a failed start and the stop run (in
reverse), so a part added later cannot be forgotten by one of them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("gateway")

PART_STOP_S = 40.0  # the most one part's stop may take (the ledger's own grace is 30 s)


class Started:
    def __init__(self) -> None:
        self._stops: list[tuple[Callable[[], Any], str | None, bool]] = []

    def add(self, stop: Callable[[], Any], *, together: str | None = None, bounded: bool = True) -> None:
        """``stop`` (sync or async) undoes the part just started. Parts added one after another
        under the same ``together`` name are stopped at once (independent of each other, each
        waiting out a blocking read of its own). ``bounded=False``: a stop that bounds each of
        its own parts (``Services.stop``), which one bound over all of them would cut short, and
        with them every part after a hung one."""
        self._stops.append((stop, together, bounded))

    async def stop(self, *, bounded: bool = True) -> None:
        """Every part stopped, last started first, each whatever the others' stops raised (logged,
        not raised: after a failed start its error is the one reported). ``bounded``: a stop that
        hangs is left after ``PART_STOP_S``."""
        while self._stops:
            batch = [self._stops.pop()]
            together = batch[0][1]
            while together is not None and self._stops and self._stops[-1][1] == together:
                batch.append(self._stops.pop())
            await asyncio.gather(*(_quietly(s, PART_STOP_S if bounded and own else None) for s, _, own in batch))


async def _quietly(stop: Callable[[], Any], limit_s: float | None) -> None:
    try:
        async with asyncio.timeout(limit_s):
            result = stop()
            if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                await result
    except asyncio.CancelledError as exc:
        # A cancellation of this stop goes on up; one the part's stop raised of its own (a task
        # it awaited was cancelled elsewhere) is its failure, as any other: the rest still stop.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        _failed(stop, exc)
    except Exception as exc:
        _failed(stop, exc)


def _failed(stop: Callable[[], Any], exc: BaseException) -> None:
    log.warning("stopping %s: %s", getattr(stop, "__qualname__", repr(stop)), type(exc).__name__)
