"""The fair queue (core.fair_queue) against a real Valkey: keys take turns (a late key is not stuck
behind a busy one, where a plain queue makes it wait for everything before it), one key alone
still fills every worker, a retried message does not hold its key, a killed worker's message is
claimed, dead letters come back in turn, stats count every part, and what a previous release
queued on the plain queue of the same name is drained — also while an old replica still runs."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from pathlib import Path

import orjson
import redis.asyncio as aioredis

from core.fair_queue import FairQueue
from core.queue import Queue, Retry
from tests.test_queue import PATIENCE, Worker, _name, _until, _until_stats

ROOT = Path(__file__).resolve().parents[1]


def _by_owner(payload: dict) -> str | None:
    return payload.get("owner")


def test_a_late_key_is_served_next_where_a_plain_queue_serves_it_last(services):
    async def main():
        r = aioredis.from_url(services[1])
        order: dict[str, list[str]] = {}
        for kind, q in (("plain", Queue(r, _name())), ("fair", FairQueue(r, _name(), key_of=_by_owner))):
            for n in range(30):
                await q.enqueue({"owner": "a", "n": n})
            await q.enqueue({"owner": "b", "n": 0})
            seen = order[kind] = []

            async def handler(job, seen=seen):
                seen.append(job.payload["owner"])

            async with Worker(q, handler, concurrency=1):
                await _until(lambda seen=seen: len(seen) == 31, f"every {kind} message")
            assert (await q.stats())["depth"] == 0
        assert order["plain"].index("b") == 30  # behind all of a's
        assert order["fair"].index("b") == 1  # a's first, then b's turn
        await r.aclose()

    asyncio.run(main())


def test_one_key_alone_uses_every_worker(services):
    async def main():
        r = aioredis.from_url(services[1])
        q = FairQueue(r, _name(), key_of=_by_owner)
        for n in range(6):
            await q.enqueue({"owner": "a", "n": n})
        running, most, release, done = set(), [0], asyncio.Event(), []

        async def handler(job):
            running.add(job.id)
            most[0] = max(most[0], len(running))
            if len(running) == 3:
                release.set()
            await release.wait()
            running.discard(job.id)
            done.append(job.payload["n"])

        async with Worker(q, handler, concurrency=3):
            await _until(lambda: len(done) == 6, "every message")
        assert most[0] == 3 and sorted(done) == list(range(6))
        await r.aclose()

    asyncio.run(main())


def test_a_message_waiting_for_its_retry_does_not_hold_its_key(services):
    async def main():
        r = aioredis.from_url(services[1])
        q = FairQueue(r, _name(), key_of=_by_owner)
        for n in range(3):
            await q.enqueue({"owner": "a", "n": n})
        done = []

        async def handler(job):
            if job.payload["n"] == 0 and job.attempt == 1 and not job.payload.get("again"):
                if not any(d == "deferred" for d in done):
                    done.append("deferred")
                    raise Retry(3600)  # an hour away: a held key would stop here
            done.append((job.payload["n"], job.attempt))

        async with Worker(q, handler, concurrency=1):
            await _until(lambda: (1, 1) in done and (2, 1) in done, "the key's other messages")
            s = await _until_stats(q, lambda s: s["delayed"] == 1, "the deferred message delayed")
            assert s["depth"] == 0 and s["pending"] == 0
            # its time comes: it goes back to the front of its key's list
            (member,) = await r.zrange(q.delayed, 0, -1)
            await r.zadd(q.delayed, {member: 0})
            await _until(lambda: (0, 1) in done, "the deferred message")
        assert done == ["deferred", (1, 1), (2, 1), (0, 1)]
        s = await q.stats()
        assert s["depth"] == s["pending"] == s["delayed"] == s["dead_letters"] == 0
        await r.aclose()

    asyncio.run(main())


_VICTIM = textwrap.dedent(
    """
    import asyncio, sys
    import redis.asyncio as aioredis
    from core.fair_queue import FairQueue

    url, name, log = sys.argv[1], sys.argv[2], sys.argv[3]

    async def handler(job):
        with open(log, "a") as f:
            f.write(job.id + "\\n")
        await asyncio.sleep(3600)  # SIGKILLed here, mid-message

    async def main():
        q = FairQueue(aioredis.from_url(url), name, consumer="victim", visibility_timeout=1.0)
        await q.run(handler, concurrency=1)

    asyncio.run(main())
    """
)


def test_message_of_a_killed_worker_is_claimed_and_its_key_keeps_flowing(services, tmp_path):
    async def main():
        r = aioredis.from_url(services[1])
        name = _name()
        q = FairQueue(r, name, key_of=_by_owner, visibility_timeout=1.0, backoff_base=0.01, backoff_max=0.05)
        ids = [await q.enqueue({"owner": "a", "n": n}) for n in range(4)]
        script, log = tmp_path / "victim.py", tmp_path / "victim.log"
        script.write_text(_VICTIM)
        log.touch()
        victim = await asyncio.create_subprocess_exec(
            sys.executable, str(script), services[1], name, str(log), cwd=ROOT
        )
        try:
            await _until(lambda: log.read_text().strip(), "the victim to start a message")
            assert log.read_text().split() == [ids[0]]
            done = []

            async def handler(job):
                done.append((job.payload["n"], job.attempt))

            async with Worker(q, handler):
                # the victim holds a's first message; a's others are not held behind it
                await _until(lambda: len(done) == 3, "the key's other messages")
                assert sorted(done) == [(1, 1), (2, 1), (3, 1)]
                os.kill(victim.pid, signal.SIGKILL)
                await asyncio.wait_for(victim.wait(), PATIENCE)
                await _until(lambda: len(done) == 4, "the killed worker's message")
            assert done[-1] == (0, 2)  # the same message, counted as a failed attempt
            s = await q.stats()
            assert s["depth"] == s["pending"] == s["delayed"] == s["dead_letters"] == 0 and s["retries"] == 1
            assert await r.hlen(q.taken) == 0
        finally:
            if victim.returncode is None:
                victim.kill()
                await victim.wait()
            await r.aclose()

    asyncio.run(main())


def test_dead_letters_come_back_in_turn_and_stats_count_them(services):
    async def main():
        r = aioredis.from_url(services[1])
        q = FairQueue(r, _name(), key_of=_by_owner, max_retries=1, backoff_base=0.01, backoff_max=0.02)
        healed, done = False, []

        async def handler(job):
            if not healed:
                raise RuntimeError("down")
            done.append((job.payload["n"], job.attempt, job.key))

        for n in range(2):
            await q.enqueue({"owner": "a", "n": n})
        s = await q.stats()
        assert s["depth"] == 2 and s["pending"] == 0 and s["delayed"] == 0
        async with Worker(q, handler):
            s = await _until_stats(q, lambda s: s["dead_letters"] == 2, "two dead letters")
        assert s["retries"] == 2 and s["depth"] == s["pending"] == s["delayed"] == 0
        dead = sorted(await q.dead_letters(10), key=lambda d: d["payload"]["n"])
        assert [d["payload"]["n"] for d in dead] == [0, 1] and dead[0]["key"] == "a" and dead[0]["attempt"] == 2
        healed = True
        assert not await q.retry_dead("0-1") and not await q.retry_dead("nope")
        assert await q.retry_dead(dead[0]["id"]) and not await q.retry_dead(dead[0]["id"])
        assert (await q.stats())["depth"] == 1
        async with Worker(q, handler):
            await _until(lambda: done, "the retried message")
        assert done == [(0, 1, "a")]
        s = await q.stats()
        assert s["dead_letters"] == 1 and s["depth"] == s["pending"] == 0
        await r.aclose()

    asyncio.run(main())


def test_what_a_previous_release_queued_is_drained_also_beside_an_old_replica(services):
    async def main():
        r = aioredis.from_url(services[1])
        name = _name()
        old = Queue(r, name, max_retries=0)  # the previous release: a plain queue of the same name
        legacy = [await old.enqueue({"owner": "a", "n": n}) for n in range(3)]
        # a message the old release was retrying (in its delayed set), and one it gave up on, as
        # its scripts leave them
        retrying = {"id": "r1", "payload": {"owner": "a", "n": 3}, "key": None, "attempt": 2, "enqueued_at": 1.0}
        await r.zadd(old.live, {"r1": 1000})
        await r.zadd(old.delayed, {orjson.dumps(retrying): 0})
        gave_up = {**retrying, "id": "d1", "payload": {"owner": "a", "n": 4}, "error": "RuntimeError: down"}
        await r.xadd(old.dead, {"m": orjson.dumps(gave_up), "failed_at": "2.0"})
        new = FairQueue(r, name, key_of=_by_owner, max_retries=0)
        await new.enqueue({"owner": "b", "n": 0})
        s = await new.stats()
        assert s["depth"] == 4 and s["delayed"] == 1 and s["dead_letters"] == 1  # both releases' messages
        done, seen_by_old = [], []

        async def handler(job):
            done.append(job.payload["n"] if job.payload["owner"] == "a" else "b")

        async def old_handler(job):
            seen_by_old.append(job.payload)
            done.append(job.payload["n"])

        old_replica = Queue(r, name, max_retries=0)
        async with Worker(new, handler, concurrency=2), Worker(old_replica, old_handler, concurrency=1):
            await _until(lambda: len(done) == 5, "the old and new messages")
            (letter,) = await new.dead_letters(10)
            assert await new.retry_dead(letter["id"])  # an old dead letter, put back under its owner's key
            await _until(lambda: len(done) == 6, "the old dead letter")
            # an old replica still enqueues: the new release drains that too
            await old_replica.enqueue({"owner": "a", "n": 5})
            await new.enqueue({"owner": "b", "n": 1})
            await _until(lambda: len(done) == 8, "messages of both releases queued meanwhile")
        assert sorted(d for d in done if d != "b") == [0, 1, 2, 3, 4, 5] and done.count("b") == 2
        assert all(p["owner"] == "a" for p in seen_by_old)  # an old replica never sees a new message
        s = await new.stats()
        assert s["depth"] == s["pending"] == s["delayed"] == s["dead_letters"] == 0
        assert len(legacy) == 3
        await r.aclose()

    asyncio.run(main())
