"""The durable job queue (core.queue) against a real Valkey: at-least-once delivery, retries with
backoff, dead letters, claims from killed workers, per-key ordering across workers, dedupe, stats."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import textwrap
import uuid
from collections import defaultdict
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import generate_latest

from core.queue import Fatal, PayloadTooLarge, Queue, Retry, _digest

ROOT = Path(__file__).resolve().parents[1]
PATIENCE = 60.0  # a safety net so a broken queue fails the test instead of hanging it


def _name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


async def _until(predicate, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PATIENCE
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.02)


async def _until_stats(queue: Queue, predicate, what: str) -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PATIENCE
    while not predicate(stats := await queue.stats()):
        if loop.time() > deadline:
            raise AssertionError(f"gave up waiting for {what}: {stats}")
        await asyncio.sleep(0.02)
    return stats


class Worker:
    """A Queue.run in a task, stopped on exit."""

    def __init__(self, queue: Queue, handler, concurrency: int = 8, grace: float = 5.0) -> None:
        self.queue, self.handler, self.concurrency, self.grace = queue, handler, concurrency, grace

    async def __aenter__(self) -> Queue:
        self.task = asyncio.create_task(self.queue.run(self.handler, concurrency=self.concurrency))
        return self.queue

    async def __aexit__(self, *exc) -> None:
        await self.queue.stop(grace=self.grace)
        await asyncio.wait_for(self.task, 20)


def test_delivery_is_acknowledged_only_after_success(services):
    async def main():
        r = aioredis.from_url(services[1])
        name = _name()
        q = Queue(r, name, visibility_timeout=30)
        ids = [await q.enqueue({"n": i}) for i in range(3)]
        started, release, seen = asyncio.Event(), asyncio.Event(), []

        async def blocking(job):
            seen.append((job.id, job.attempt))
            started.set()
            await release.wait()

        # The first run is stopped (no grace) while its handler is mid-message: the message is not lost.
        async with Worker(q, blocking, concurrency=1, grace=0):
            await asyncio.wait_for(started.wait(), PATIENCE)
            s = await q.stats()
            assert s["pending"] == 1 and s["depth"] == 2  # read, not acknowledged
        assert seen == [(ids[0], 1)]
        assert (await q.stats())["pending"] == 0

        done = []

        async def ok(job):
            done.append((job.id, job.payload, job.attempt))

        async with Worker(Queue(r, name, visibility_timeout=30), ok):
            await _until(lambda: len(done) == 3, "three messages")
        # Handed back unchanged: same id, still the first attempt.
        assert sorted(done) == sorted([(ids[i], {"n": i}, 1) for i in range(3)])
        s = await q.stats()
        assert s == {"depth": 0, "pending": 0, "oldest_age_s": 0.0, "retries": 0, "dead_letters": 0, "delayed": 0}
        await r.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("ordered", [False, True])
def test_failures_retry_with_backoff_then_dead_letter(services, ordered):
    async def main():
        r = aioredis.from_url(services[1])
        q = Queue(r, _name(), max_retries=2, backoff_base=0.01, backoff_max=0.05, ordered=ordered)
        attempts, sequence = defaultdict(list), []

        async def handler(job):
            attempts[job.payload["kind"]].append(job.attempt)
            sequence.append(job.payload["kind"])
            if job.payload["kind"] == "boom":
                raise ValueError("boom " + "x" * 10_000)
            if job.payload["kind"] == "fatal":
                raise Fatal("unusable input")
            if job.payload["kind"] == "later" and len(attempts["later"]) < 3:
                raise Retry(0.01)

        for kind in ("boom", "fatal", "later"):
            await q.enqueue({"kind": kind}, key="conv")
        async with Worker(q, handler):
            await _until(lambda: len(attempts["boom"]) == 3 and len(attempts["later"]) == 3, "attempts")
            await _until_stats(q, lambda s: s["dead_letters"] == 2, "two dead letters")
        assert attempts["boom"] == [1, 2, 3]  # the first try and max_retries retries
        assert attempts["fatal"] == [1]  # dead at once
        assert attempts["later"] == [1, 1, 1]  # Retry is no failure: same attempt
        if ordered:  # one key: each message finished (dead or done) before the next began
            assert sequence == ["boom"] * 3 + ["fatal"] + ["later"] * 3
        dead = {d["payload"]["kind"]: d for d in await q.dead_letters(10)}
        assert set(dead) == {"boom", "fatal"}
        assert dead["boom"]["attempt"] == 3 and dead["boom"]["error"].startswith("ValueError: boom xxx")
        assert len(dead["boom"]["error"]) <= 2000  # truncated
        assert dead["fatal"]["error"] == "Fatal: unusable input" and dead["fatal"]["attempt"] == 1
        s = await q.stats()
        assert s["retries"] == 2 and s["dead_letters"] == 2 and s["depth"] == s["pending"] == s["delayed"] == 0
        # Backoff doubles per attempt, capped, with jitter within [half, whole] of the step.
        q2 = Queue(r, _name(), backoff_base=1.0, backoff_max=300.0)
        for attempt, step in ((1, 1), (2, 2), (3, 4), (10, 300), (100, 300)):
            for _ in range(20):
                assert step / 2 <= q2.backoff(attempt) <= step
        assert b"gateway_queue_jobs_total" in generate_latest()
        await r.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("ordered", [False, True])
def test_dead_letters_can_be_retried_and_dropped(services, ordered):
    async def main():
        r = aioredis.from_url(services[1])
        q = Queue(r, _name(), max_retries=0, ordered=ordered)
        healed, done = False, []

        async def handler(job):
            if not healed:
                raise RuntimeError("down")
            done.append((job.payload["n"], job.attempt))

        ids = [await q.enqueue({"n": n}, key="conv") for n in range(2)]
        async with Worker(q, handler):
            await _until_stats(q, lambda s: s["dead_letters"] == 2, "two dead letters")
        dead = await q.dead_letters(10)
        assert [d["job_id"] for d in dead] == ids and all(d["error"] == "RuntimeError: down" for d in dead)
        assert not await q.retry_dead("0-1") and not await q.retry_dead("not an id") and not await q.drop_dead("x")
        assert not await q.retry_dead("1-1\n") and not await q.drop_dead(f"1-{2**64}")  # no 500 from Redis
        healed = True
        assert await q.retry_dead(dead[0]["id"])
        assert not await q.retry_dead(dead[0]["id"])  # once
        assert await q.drop_dead(dead[1]["id"])
        assert await q.dead_letters(10) == []
        async with Worker(q, handler):
            await _until(lambda: done, "the retried message")
        assert done == [(0, 1)]  # a fresh attempt count; the dropped one never ran
        s = await q.stats()
        assert s["dead_letters"] == 0 and s["depth"] == 0 and s["pending"] == 0
        await r.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("ordered", [True, False])
def test_a_tagged_queues_dead_letters_are_dropped_by_their_tag_past_the_first_page(services, ordered):
    """A queue given ``dead_tag`` tags each dead letter as it dies; ``drop_dead_tagged`` drops
    those of some tags, reading the tags a page at a time (here behind 2,500 others' letters,
    past the first page), and a letter retried or dropped by its id leaves no tag behind."""
    from core.dead_tags import DEAD_TAGGED, TAG_SCAN

    async def main():
        r = aioredis.from_url(services[1])
        q = Queue(r, _name(), max_retries=0, ordered=ordered, dead_tag=lambda m: m["payload"].get("conv"))
        await r.set(f"{q.dead}:tags0:done", "1")  # (no older release's letters: tagged as they die)
        try:
            async with r.pipeline(transaction=False) as pipe:  # others' letters first, as the queue tags them
                for i in range(int(TAG_SCAN * 2.5)):
                    pipe.eval(DEAD_TAGGED, 2, q.dead, q.dead_tags, q.max_dead, f"other-{i}", "m", "{}", "failed_at", 0)
                await pipe.execute()

            async def handler(job):
                raise Fatal("unusable")

            for conv in ("erased", "erased", "kept", "retried"):
                await q.enqueue({"conv": conv, "words": f"words of {conv}"}, key=conv)
            async with Worker(q, handler):
                await _until_stats(q, lambda s: s["dead_letters"] == int(TAG_SCAN * 2.5) + 4, "four dead letters")
            letters = [(i, f[b"m"]) for i, f in await r.xrange(q.dead, "-", "+") if f[b"m"] != b"{}"]
            mine = {i.decode(): m for i, m in letters}
            assert len(mine) == 4
            retried = next(i for i, m in mine.items() if b'"retried"' in m)
            assert await q.retry_dead(retried)
            assert await q.drop_dead_tagged({"erased"}) == 2
            assert await q.drop_dead_tagged({"erased", "retried"}) == 0  # (the retried one is back on the queue)
            left = [orjson.loads(f[b"m"])["payload"]["conv"] for _, f in await r.xrange(q.dead) if f[b"m"] != b"{}"]
            assert left == ["kept"]
            assert await r.xlen(q.dead_tags) == await r.xlen(q.dead)  # the same letters, by the same ids
        finally:
            await r.delete(q.dead, q.dead_tags, f"{q.dead}:tags0:done")
            await r.aclose()

    asyncio.run(main())


def test_a_dead_letter_dropped_by_its_id_is_never_left_without_its_tag(services, monkeypatch):
    """``drop_dead`` removes a letter and its tag in two steps: stopped between them (a crash, a
    Redis error), the letter must not be left behind without its tag, or no erasure finds it."""
    import core.queue as queue_module
    from core.dead_tags import DEAD_TAGGED, forget

    async def main():
        r = aioredis.from_url(services[1])
        q = Queue(r, _name(), max_retries=0, dead_tag=lambda m: m["payload"].get("conv"))
        try:
            dead_id = (await r.eval(DEAD_TAGGED, 2, q.dead, q.dead_tags, q.max_dead, "erasable", "m", "{}")).decode()

            async def forget_then_stop(redis, dead, id):
                await forget(redis, dead, id)
                raise ConnectionError("stopped right after this step")

            monkeypatch.setattr(queue_module, "forget", forget_then_stop)
            with pytest.raises(ConnectionError):
                await q.drop_dead(dead_id)
            letters = {i.decode() for i, _ in await r.xrange(q.dead)}
            tags = {i.decode() for i, _ in await r.xrange(q.dead_tags)}
            assert letters <= tags, "a dead letter was left without its tag"
        finally:
            await r.delete(q.dead, q.dead_tags)
            await r.aclose()

    asyncio.run(main())


_VICTIM = textwrap.dedent(
    """
    import asyncio, sys
    import redis.asyncio as aioredis
    from core.queue import Queue

    url, name, ordered, log = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]

    async def handler(job):
        with open(log, "a") as f:
            f.write(job.id + "\\n")
        await asyncio.sleep(3600)  # SIGKILLed here, mid-message

    async def main():
        q = Queue(aioredis.from_url(url), name, consumer="victim", ordered=ordered, visibility_timeout=1.0)
        await q.run(handler, concurrency=1)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("ordered", [True, False])
def test_message_of_a_killed_worker_is_claimed_and_processed(services, tmp_path, ordered):
    async def main():
        r = aioredis.from_url(services[1])
        name = _name()
        q = Queue(r, name, ordered=ordered, visibility_timeout=1.0, backoff_base=0.01, backoff_max=0.05)
        conv = [await q.enqueue({"key": "conv", "n": n}, key="conv") for n in range(5)]
        script, log = tmp_path / "victim.py", tmp_path / "victim.log"
        script.write_text(_VICTIM)
        log.touch()
        victim = await asyncio.create_subprocess_exec(
            sys.executable, str(script), services[1], name, "1" if ordered else "0", str(log), cwd=ROOT
        )
        try:
            await _until(lambda: log.read_text().strip(), "the victim to start a message")
            assert log.read_text().split() == [conv[0]]
            _ = [await q.enqueue({"key": "other", "n": n}, key="other") for n in range(5)]
            done = []

            async def handler(job):
                done.append((job.payload["key"], job.payload["n"], job.attempt))

            async with Worker(q, handler):
                # The victim is alive and holds conv's first message: other messages flow; with
                # ordering, nothing of conv runs meanwhile.
                await _until(lambda: sum(k == "other" for k, _, _ in done) == 5, "the other key")
                if ordered:
                    assert not [d for d in done if d[0] == "conv"]
                os.kill(victim.pid, signal.SIGKILL)
                await asyncio.wait_for(victim.wait(), PATIENCE)
                await _until(lambda: len(done) == 10, "every message")
            assert [d for d in done if d[0] == "other"] == [("other", n, 1) for n in range(5)]
            conv_done = [(n, attempt) for k, n, attempt in done if k == "conv"]
            # The killed message ran again, counted as a failed attempt.
            assert (0, 2) in conv_done and sorted(conv_done) == [(0, 2), *((n, 1) for n in range(1, 5))]
            if ordered:
                assert conv_done == [(0, 2), *((n, 1) for n in range(1, 5))]  # in order, first included
            s = await q.stats()
            assert s["depth"] == s["pending"] == s["delayed"] == s["dead_letters"] == 0 and s["retries"] == 1
        finally:
            if victim.returncode is None:
                victim.kill()
                await victim.wait()
            await r.aclose()

    asyncio.run(main())


def test_per_key_order_holds_across_two_workers_while_keys_run_in_parallel(services):
    keys, per_key = 20, 20

    async def main():
        clients = [aioredis.from_url(services[1]) for _ in range(3)]
        name = _name()
        producer = Queue(clients[0], name, ordered=True)
        for n in range(per_key):
            for k in range(keys):
                await producer.enqueue({"k": k, "n": n}, key=f"conv-{k}")
        processed: dict[int, list[int]] = defaultdict(list)
        by_worker: dict[str, int] = defaultdict(int)
        active_keys: set[int] = set()
        overlaps: list[int] = []
        most_at_once = 0
        failed_once: set[tuple[int, int]] = set()

        def handler_for(worker: str):
            async def handler(job):
                nonlocal most_at_once
                k, n = job.payload["k"], job.payload["n"]
                if k in active_keys:
                    overlaps.append(k)
                active_keys.add(k)
                most_at_once = max(most_at_once, len(active_keys))
                try:
                    await asyncio.sleep(random.uniform(0.001, 0.01))
                    if n == 7 and (k, n) not in failed_once:  # a failure mid-sequence: retried in place
                        failed_once.add((k, n))
                        raise RuntimeError("transient")
                    processed[k].append(n)
                    by_worker[worker] += 1
                finally:
                    active_keys.discard(k)

            return handler

        workers = [
            Worker(
                Queue(c, name, ordered=True, consumer=f"w{i}", backoff_base=0.01, backoff_max=0.05),
                handler_for(f"w{i}"),
            )
            for i, c in enumerate(clients[1:])
        ]
        async with workers[0], workers[1]:
            await _until(lambda: sum(map(len, processed.values())) == keys * per_key, "every message")
        assert overlaps == []  # never two messages of one key at once
        assert {k: v for k, v in processed.items()} == {k: list(range(per_key)) for k in range(keys)}
        assert most_at_once > 1  # different keys ran at the same time
        assert by_worker["w0"] > 0 and by_worker["w1"] > 0  # both workers took part
        s = await producer.stats()
        assert s["depth"] == s["pending"] == s["delayed"] == 0 and s["retries"] == keys
        for c in clients:
            await c.aclose()

    asyncio.run(main())


def test_dedupe_makes_enqueue_idempotent_and_bad_input_stores_nothing(services):
    async def main():
        r = aioredis.from_url(services[1])
        for ordered in (False, True):
            q = Queue(r, _name(), ordered=ordered)
            a = await q.enqueue({"v": 1}, key="c", dedupe="wamid.1")
            assert await q.enqueue({"v": 2}, key="c", dedupe="wamid.1") == a
            b = await q.enqueue({"v": 3}, key="c", dedupe="wamid.2")
            assert b != a
            with pytest.raises(PayloadTooLarge):
                await q.enqueue({"v": "x" * 300_000})
            with pytest.raises(ValueError):
                await q.enqueue({"v": 1}, key="k" * 300)
            with pytest.raises(TypeError):
                await q.enqueue(["not", "a", "dict"])  # type: ignore[arg-type]
            assert (await q.stats())["depth"] == 2
            seen = []

            async def handler(job, seen=seen):
                seen.append(job.payload["v"])

            async with Worker(q, handler):
                await _until(lambda seen=seen: len(seen) == 2, "two messages")
            assert sorted(seen) == [1, 3]
            assert await q.enqueue({"v": 4}, dedupe="wamid.1") == a  # still within the window
        await r.aclose()

    asyncio.run(main())


def test_stats_report_depth_pending_delayed_and_age(services):
    async def main():
        r = aioredis.from_url(services[1])
        name = _name()
        q = Queue(r, name)
        release, started = asyncio.Event(), asyncio.Event()
        seen = []

        async def handler(job):
            seen.append(job.payload["n"])
            if job.payload["n"] == 0:
                started.set()
                await release.wait()
            elif job.payload["n"] == 1:
                raise Retry(3600)

        for n in range(3):
            await q.enqueue({"n": n})
        s = await q.stats()
        assert s["depth"] == 3 and s["pending"] == 0 and s["oldest_age_s"] >= 0
        async with Worker(q, handler, concurrency=1):
            await asyncio.wait_for(started.wait(), PATIENCE)
            s = await q.stats()
            assert s["pending"] == 1 and s["depth"] == 2
            release.set()
            await _until(lambda: len(seen) == 3, "three messages")
            await _until_stats(q, lambda s: not s["pending"], "no message in flight")
        s = await q.stats()
        assert s["delayed"] == 1 and s["depth"] == 0 and s["pending"] == 0 and s["retries"] == 0
        assert s["oldest_age_s"] >= 0
        text = generate_latest().decode()
        assert f'gateway_queue_messages{{queue="{name}",state="delayed"}} 1.0' in text
        await r.aclose()

    asyncio.run(main())


def test_a_live_worker_keeps_its_message_past_the_visibility_timeout(services):
    async def main():
        r = aioredis.from_url(services[1])
        name = _name()
        slow = Queue(r, name, consumer="slow", visibility_timeout=1.0)
        other = Queue(r, name, consumer="other", visibility_timeout=1.0)
        job_id = await slow.enqueue({"n": 1})
        started, release, runs = asyncio.Event(), asyncio.Event(), []

        async def long_handler(job):
            runs.append(("slow", job.id, job.attempt))
            started.set()
            await release.wait()

        async def handler(job):
            runs.append(("other", job.id, job.attempt))

        async with Worker(slow, long_handler), Worker(other, handler):
            await asyncio.wait_for(started.wait(), PATIENCE)
            # Several visibility timeouts pass while the handler runs; its worker renews its claim,
            # so the other worker's claim sweeps leave it alone.
            loop = asyncio.get_running_loop()
            until = loop.time() + 4 * slow.visibility_timeout
            while loop.time() < until:
                (entry,) = await r.xpending_range(slow.stream, slow.group, "-", "+", 10)
                assert _consumer(entry) == "slow" and entry["times_delivered"] == 1
                await asyncio.sleep(0.1)
            release.set()
            await _until_stats(slow, lambda s: s["pending"] == 0 and s["depth"] == 0, "the message done")
        assert runs == [("slow", job_id, 1)]
        assert (await slow.stats())["retries"] == 0
        await r.aclose()

    asyncio.run(main())


def _consumer(entry: dict) -> str:
    c = entry["consumer"]
    return c.decode() if isinstance(c, bytes) else c


def test_a_stalled_worker_loses_its_message_and_its_late_result_changes_nothing(services):
    async def main():
        r = aioredis.from_url(services[1])
        name = _name()
        opts = {"ordered": True, "visibility_timeout": 1.0, "backoff_base": 0.01, "backoff_max": 0.05}
        stalled = Queue(r, name, consumer="stalled", **opts)

        async def no_upkeep(handler) -> None:  # no renewals, as if its event loop were stuck
            return None

        stalled._maintain = no_upkeep
        other = Queue(r, name, consumer="other", **opts)
        await stalled.enqueue({"n": 0}, key="conv")
        await stalled.enqueue({"n": 1}, key="conv")
        started, release, runs = asyncio.Event(), asyncio.Event(), []

        async def stuck(job):
            runs.append(("stalled", job.payload["n"], job.attempt))
            started.set()
            await release.wait()

        async def handler(job):
            runs.append(("other", job.payload["n"], job.attempt))

        async with Worker(stalled, stuck, concurrency=1):
            await asyncio.wait_for(started.wait(), PATIENCE)
            async with Worker(other, handler):
                await _until(lambda: len(runs) == 3, "the other worker to take over")
                release.set()  # the stalled handler returns now: its acknowledgement must not count
                await _until_stats(other, lambda s: s["pending"] == 0 and s["depth"] == 0, "the queue empty")
        assert runs == [("stalled", 0, 1), ("other", 0, 2), ("other", 1, 1)]
        s = await other.stats()
        assert s["delayed"] == 0 and s["dead_letters"] == 0 and s["retries"] == 1
        assert await r.llen(f"{other.stream}:k:{_digest('conv')}") == 0  # both popped, once each
        await r.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("ordered,fast", [(False, False), (True, True)], ids=["plain", "ordered-pipelined"])
def test_entries_whose_read_answer_was_lost_are_handled_without_waiting_for_the_visibility_timeout(
    services, ordered, fast
):
    """A read the server answered but whose answer the worker lost (its connection timed out: a
    process paused past the socket timeout) leaves entries pending on the worker's own consumer
    with no handler; they are handled at the next start (or after the failed step), not claimed
    as failures a visibility timeout later."""
    from core.fastredis import PipelinedRedis

    async def main():
        r = aioredis.from_url(services[1])
        client = PipelinedRedis(services[1]) if fast else None
        name, consumer = _name(), f"c-{uuid.uuid4().hex[:6]}"
        q = Queue(r, name, consumer=consumer, visibility_timeout=600, ordered=ordered, fast=client)
        ids = [await q.enqueue({"n": i}, key=f"k{i}" if ordered else None) for i in range(3)]
        await r.xgroup_create(q.stream, q.group, id="0", mkstream=True)
        lost = await r.xreadgroup(q.group, consumer, {q.stream: ">"}, count=10)  # the answer nobody used
        assert sum(len(entries) for _, entries in lost) == 3
        done = []

        async def ok(job):
            done.append((job.id, job.attempt))

        async with Worker(q, ok):
            await asyncio.wait_for(_until(lambda: len(done) == 3, "the lost entries"), 20)
        assert sorted(done) == sorted((i, 1) for i in ids)  # first attempts: not counted as failures
        s = await q.stats()
        assert s["pending"] == 0 and s["depth"] == 0 and s["retries"] == 0
        if client is not None:
            await client.close()
        await r.aclose()

    asyncio.run(main())


def test_a_full_queue_is_a_503_to_retry_for_the_client_that_enqueued(services):
    """An upload whose ingestion job found the queue full (its depth bound, or an ordered key's
    backlog) answered the client with a generic 500. ``QueueFull`` is now an OpenAI-shaped 503
    ``queue_full`` with ``retry-after`` (the queue's name and depth stay in the log only)."""
    from core.errors import ServiceUnavailable
    from core.queue import KeyBacklogFull, QueueFull

    async def go():
        r = aioredis.from_url(services[1])
        queue = Queue(r, _name(), max_depth=1)
        ordered = Queue(r, _name(), ordered=True)
        try:
            await queue.enqueue({"n": 1})
            with pytest.raises(QueueFull) as full:
                await queue.enqueue({"n": 2})
            await ordered.enqueue({"n": 1}, key="k", max_per_key=1)
            with pytest.raises(KeyBacklogFull) as backlog:
                await ordered.enqueue({"n": 2}, key="k", max_per_key=1)
        finally:
            await r.aclose()
        for exc in (full.value, backlog.value):
            assert isinstance(exc, ServiceUnavailable) and exc.status == 503
            assert exc.payload()["error"]["code"] == "queue_full" and exc.headers["retry-after"] == "5"
            assert queue.name not in exc.payload()["error"]["message"] and str(exc)  # the detail: logs only
        assert queue.name in str(full.value)

    asyncio.run(go())
