"""Analysis worker processes, spoken to over a socket pair from the event loop.

``concurrent.futures.ProcessPoolExecutor`` costs ≈ 2 ms per call here: its feeder and
management threads take the GIL from the event loop on every hop. These workers are plain
processes (``python -m policies.pii.workers FD``) reading length-prefixed pickled requests
from a socket; the serving process writes and reads them with asyncio streams, so a call
costs two small socket writes and no thread. A worker that dies fails its pending calls
(the request is refused, never sent unscrubbed) and is started again.

Every call has a timeout. A worker that exceeds it is killed and replaced at once, and the call
fails with ``AnalysisTimeout`` (the request gets 503 ``pii_unavailable``). Other calls that
were queued on the killed worker are innocent: each is sent once more, to a live worker. A
call's time starts when its worker is ready (Presidio loaded, which takes seconds), so a
replacement still loading is never killed for being slow.

A worker's memory grows with what it has read: spaCy keeps every distinct word of every text in
its vocabulary and string store for the life of the process (75,000 distinct IP addresses: +41
MB), so a stream of texts full of distinct tokens would grow every worker until it is killed.
Each answer carries the worker's resident memory; once it has grown by more than
``max_growth_mb`` since the worker was ready, the worker is recycled between calls, never in
the middle of one: a fresh worker is started and, once it is ready, takes the old one's place;
the old one answers the calls already sent to it and is then stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import socket
import struct
import sys
from pathlib import Path

from core import metrics
from core.background import stop_tasks

log = logging.getLogger("gateway.pii")
_HEADER = struct.Struct("!Q")
_READY = -1  # the call id of the answer a worker gives once its warm-up is done
STARTUP_S = 120.0  # a worker not ready after this long is replaced
STOP_S = 10.0  # the pool's stop waits this long for the replacements it cancelled
_ROOT = Path(__file__).resolve().parents[2]


def rss_mb() -> float:
    """This process's resident memory in MB (its peak where ``/proc`` is missing)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KB elsewhere
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class WorkerDied(RuntimeError):
    pass


class WorkerReplaced(WorkerDied):
    """The worker was killed for another call's timeout: this call may be sent again."""


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.pending: dict[int, asyncio.Future] = {}
        self.task: asyncio.Task | None = None
        self.killed = False  # by the pool, for a call's timeout
        self.ready = asyncio.Event()  # warm-up done (or the worker gone)
        self.busy_until = 0.0  # the latest deadline of the calls sent to it (it answers in order)
        self.ready_mb: float | None = None  # resident memory when it was ready, and now (MB)
        self.rss_mb = 0.0
        self.retiring = False  # grown past the bound: a replacement is on its way
        self.answered = asyncio.Event()  # set at each answer, and when it exits

    def grown_past(self, limit_mb: float) -> bool:
        return self.ready_mb is not None and self.rss_mb - self.ready_mb > limit_mb

    async def start(self, warm: list) -> None:
        parent, child = socket.socketpair()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "policies.pii.workers",
            str(child.fileno()),
            pass_fds=[child.fileno()],
            cwd=_ROOT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))},
        )
        child.close()
        self.killed = False
        self.ready = asyncio.Event()
        self.busy_until = 0.0
        self.ready_mb, self.rss_mb, self.retiring = None, 0.0, False
        self.reader, self.writer = await asyncio.open_connection(sock=parent)
        self.task = asyncio.create_task(self._read())
        for spec in warm:
            self.send(0, ("warm", spec))
        self.send(_READY, ("ready",))

    def send(self, call_id: int, payload: tuple) -> None:
        data = pickle.dumps((call_id, payload), protocol=pickle.HIGHEST_PROTOCOL)
        self.writer.write(_HEADER.pack(len(data)) + data)

    async def _read(self) -> None:
        try:
            while True:
                (size,) = _HEADER.unpack(await self.reader.readexactly(_HEADER.size))
                call_id, ok, value, self.rss_mb = pickle.loads(await self.reader.readexactly(size))
                if call_id == _READY:
                    self.ready_mb = self.rss_mb
                    self.ready.set()
                    continue
                fut = self.pending.pop(call_id, None)
                self.answered.set()
                if fut is None or fut.done():
                    continue
                if ok:
                    fut.set_result(value)
                elif isinstance(value, tuple) and value[0] == "TooMuchToCheck":
                    from policies.pii.analysis import TooMuchToCheck

                    fut.set_exception(TooMuchToCheck(*value[1:]))
                else:
                    fut.set_exception(RuntimeError(value))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self.ready.set()  # wakes callers waiting for it: they find it gone
            self.answered.set()
            error = WorkerReplaced if self.killed else WorkerDied
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(error("PII analysis worker exited"))
            self.pending.clear()

    @property
    def alive(self) -> bool:
        return self.task is not None and not self.task.done() and not self.killed

    def kill(self) -> None:
        """Now, whatever it is doing (a call's timeout passed)."""
        self.killed = True
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    async def stop(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.proc is not None:
            with contextlib.suppress(Exception):
                self.proc.terminate()
                await asyncio.wait_for(self.proc.wait(), 5)
        if self.task is not None:
            self.task.cancel()  # its pending calls fail (and are cleared) before a restart reuses them
            await asyncio.wait({self.task}, timeout=5)


class WorkerPool:
    def __init__(self, size: int, max_growth_mb: float | None = None) -> None:
        self.workers = [_Worker(i) for i in range(size)]
        self.max_growth_mb = max_growth_mb  # a worker grown by more than this is recycled; None: never
        self.recycled = 0  # workers recycled for their memory
        self._ids = itertools.count(1)
        self._warm: list = []
        self._lock = asyncio.Lock()  # one restart at a time
        self._tasks: set[asyncio.Task] = set()  # replacements under way
        self._spare: set[_Worker] = set()  # workers outside ``workers``: recycling's new and old ones

    async def start(self, warm: list) -> None:
        self._warm = warm
        try:
            for w in self.workers:
                await w.start(warm)
        except BaseException:  # the workers already spawned are stopped (reaped), not left behind
            await self.stop()
            raise

    async def call(
        self, spec, items: list, budget_s: float, max_chars: int | None = None, max_checks: int | None = None
    ) -> list:
        """``analysis.analyze_items(spec, items, max_chars, max_checks)`` in a worker, within ``budget_s`` seconds."""
        from policies.pii.analysis import AnalysisTimeout

        loop = asyncio.get_running_loop()
        for attempt in (1, 2):
            worker = min(self.workers, key=lambda w: (not w.alive, len(w.pending)))
            if not worker.alive:
                await self._restart(worker)
            if not worker.ready.is_set():
                try:
                    await asyncio.wait_for(worker.ready.wait(), STARTUP_S)
                except TimeoutError:
                    worker.kill()
                    self._replace(worker)
                    raise AnalysisTimeout(f"PII analysis worker not ready after {STARTUP_S:.0f} s") from None
                if not worker.alive:
                    raise WorkerDied("PII analysis worker exited while starting")
            # A worker answers in order: a call's time starts when the calls ahead of it are done
            # or out of time, so a slow call is blamed on itself, never on one queued behind it.
            deadline = max(loop.time(), worker.busy_until) + budget_s
            worker.busy_until = deadline
            call_id = next(self._ids)
            fut = loop.create_future()
            worker.pending[call_id] = fut
            worker.send(call_id, ("analyze", spec, items, max_chars, max_checks))
            try:
                async with asyncio.timeout_at(deadline):
                    await worker.writer.drain()
                    return await fut
            except TimeoutError:
                worker.pending.pop(call_id, None)
                log.error("PII analysis worker %d exceeded %.1f s; replacing it", worker.index, budget_s)
                worker.kill()
                self._replace(worker)
                raise AnalysisTimeout(f"PII analysis took longer than {budget_s:.1f} s") from None
            except WorkerReplaced:
                if attempt == 2:
                    raise
            finally:  # answered or refused, the texts it read stay in its memory
                self._recycle_if_grown(worker)
        raise AssertionError("unreachable")

    def _recycle_if_grown(self, worker: _Worker) -> None:
        if self.max_growth_mb is None or worker.retiring or not worker.alive or worker not in self.workers:
            return
        if worker.grown_past(self.max_growth_mb):
            worker.retiring = True
            self._background(self._recycle(worker))

    async def _recycle(self, old: _Worker) -> None:
        """A fresh worker in ``old``'s place once it is ready; ``old`` stopped once it has
        answered the calls sent to it (each still under its own deadline)."""
        grown = old.rss_mb - (old.ready_mb or 0.0)
        new = _Worker(old.index)
        self._spare.add(new)
        try:
            async with self._lock:
                await new.start(self._warm)
            await asyncio.wait_for(new.ready.wait(), STARTUP_S)
            if not new.alive:
                raise WorkerDied("exited while starting")
        except (TimeoutError, OSError, WorkerDied) as exc:
            log.error("PII analysis worker %d: its replacement did not start (%s); keeping it", old.index, exc)
            old.retiring = False  # tried again after its next call
            self._spare.discard(new)
            await new.stop()
            return
        self._spare.discard(new)
        if not old.retiring or old not in self.workers:  # replaced meanwhile (a timeout): not needed
            await new.stop()
            return
        self.workers[self.workers.index(old)] = new
        self._spare.add(old)
        self.recycled += 1
        metrics.PII_WORKER_RECYCLES.inc()
        log.warning(
            "PII analysis worker %d grew by %.0f MB (bound %.0f MB); replaced by a fresh one",
            old.index,
            grown,
            self.max_growth_mb,
        )
        # Its calls end answered, or timed out (it is killed), or failed (it died).
        while old.pending and old.task is not None and not old.task.done():
            old.answered.clear()
            await old.answered.wait()
        self._spare.discard(old)
        await old.stop()

    def _replace(self, worker: _Worker) -> None:
        self._background(self._restart(worker))

    def _background(self, coro) -> None:
        """A replacement or a recycling under way (kept in ``_tasks``: ``stop`` cancels them)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _restart(self, worker: _Worker) -> None:
        async with self._lock:
            if worker not in self.workers:  # recycled, then killed for a call's timeout: not replaced
                self._spare.discard(worker)
                await worker.stop()
                return
            if worker.alive:
                return
            if not worker.killed:
                log.error("PII analysis worker %d is gone; starting a new one", worker.index)
            await worker.stop()
            await worker.start(self._warm)

    async def stop(self) -> None:
        """The replacements and recyclings under way cancelled and awaited (bounded), then every
        worker stopped: a worker one of them was starting is stopped too, not left running."""
        tasks = list(self._tasks)
        if tasks:  # cancelled again while one goes on (its cancellation lost: 3.11's wait_for)
            await stop_tasks(tasks, grace=STOP_S / 2)
            pending = [t for t in tasks if not t.done()]
            if pending:
                log.error(
                    "PII analysis workers: %d replacement(s) still running %.0f s after the stop", len(pending), STOP_S
                )
        for w in [*self.workers, *self._spare]:
            await w.stop()


def _serve(fd: int) -> None:
    """The worker's loop: read a request, analyse, answer. Exits when the socket closes."""
    from policies.pii.analysis import TooMuchToCheck, analyze_items, warm

    sock = socket.socket(fileno=fd)
    stream = sock.makefile("rb")

    def answer(call_id: int, ok: bool, value) -> None:
        if call_id == 0:
            return
        data = pickle.dumps((call_id, ok, value, rss_mb()), protocol=pickle.HIGHEST_PROTOCOL)
        sock.sendall(_HEADER.pack(len(data)) + data)

    while True:
        header = stream.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return
        (size,) = _HEADER.unpack(header)
        call_id, payload = pickle.loads(stream.read(size))
        try:
            if payload[0] == "warm":
                warm(payload[1])
                continue
            if payload[0] == "ready":
                answer(call_id, True, None)
                continue
            answer(call_id, True, analyze_items(payload[1], payload[2], *payload[3:]))
        except TooMuchToCheck as exc:  # the request's own size: refused as such, not as a failure
            answer(call_id, False, ("TooMuchToCheck", exc.chars, exc.budget, exc.setting, exc.item))
        except Exception as exc:  # reported to the caller, who refuses the request
            answer(call_id, False, f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the gateway decides
    _serve(int(sys.argv[1]))
