"""The fair queue hardened (core.fair_queue, core.queue) against a real Valkey: a worker SIGKILLed
between reading a key's token and taking its message, or in the middle of a message, has its work
claimed once its liveness runs out — not after the visibility timeout — while a live worker with a
long message keeps it; every key a script touches is declared; and the way back to a previous
release (jobs moved to the plain stream it reads)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import textwrap
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from core.fair_queue import FairQueue
from core.queue import Fatal, Queue, Retry, _digest
from tests.test_queue import PATIENCE, Worker, _name, _until, _until_stats

ROOT = Path(__file__).resolve().parents[1]
HOUR = 3600.0  # a visibility timeout no test waits for: only liveness can hand the work over


def _by_owner(payload: dict) -> str | None:
    return payload.get("owner")


_VICTIM = textwrap.dedent(
    """
    import asyncio, sys
    import redis.asyncio as aioredis
    from core.fair_queue import FairQueue

    url, name, log, where = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]

    def note(text):
        with open(log, "a") as f:
            f.write(text + "\\n")

    class Victim(FairQueue):
        async def _take_entry(self, fields, entry_id):
            if where == "before-take":  # the token is read (pending on this consumer), nothing taken
                note("read")
                await asyncio.sleep(3600)  # SIGKILLed here
            return await super()._take_entry(fields, entry_id)

    async def handler(job):
        note(job.id)
        await asyncio.sleep(3600)  # SIGKILLed here, mid-message

    async def main():
        q = Victim(aioredis.from_url(url), name, consumer="victim", visibility_timeout=3600.0, liveness_ttl=0.5)
        await q.run(handler, concurrency=1)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("where", ["before-take", "in-handler"])
def test_a_killed_workers_key_and_message_are_taken_over_once_its_liveness_runs_out(services, tmp_path, where):
    """Before: a worker killed between reading a key's token and taking the key's head left the
    token pending on a dead consumer, and the key (a tenant) stalled for the visibility timeout
    (60 s by default) while other workers sat idle; a message it had started waited as long."""

    async def main():
        r = aioredis.from_url(services[1])
        name = _name()
        q = FairQueue(
            r, name, key_of=_by_owner, visibility_timeout=HOUR, liveness_ttl=0.5, backoff_base=0.01, backoff_max=0.02
        )
        ids = [await q.enqueue({"owner": "a", "n": n}) for n in range(3)]
        script, log = tmp_path / "victim.py", tmp_path / "victim.log"
        script.write_text(_VICTIM)
        log.touch()
        victim = await asyncio.create_subprocess_exec(
            sys.executable, str(script), services[1], name, str(log), where, cwd=ROOT
        )
        try:
            await _until(lambda: log.read_text().strip(), "the victim to read a's token")
            assert log.read_text().split() == (["read"] if where == "before-take" else [ids[0]])
            await q.enqueue({"owner": "b", "n": 0})
            done = []

            async def handler(job):
                done.append((job.payload["owner"], job.payload["n"], job.attempt))

            async with Worker(q, handler):
                await _until(lambda: ("b", 0, 1) in done, "b's message")
                os.kill(victim.pid, signal.SIGKILL)
                await asyncio.wait_for(victim.wait(), PATIENCE)
                await _until(lambda: len(done) == 4, "a's messages, taken over from the killed worker")
            a = sorted(d for d in done if d[0] == "a")
            if where == "before-take":  # nothing of a's had started: no attempt is counted
                assert a == [("a", 0, 1), ("a", 1, 1), ("a", 2, 1)]
            else:  # the started message counts as a failed attempt; the others were never held
                assert a == [("a", 0, 2), ("a", 1, 1), ("a", 2, 1)]
            s = await q.stats()
            assert s["depth"] == s["pending"] == s["delayed"] == s["dead_letters"] == 0
            assert await r.hlen(q.taken) == 0
            assert await r.zscore(q.consumers, "victim") is None  # the dead consumer is forgotten
            assert "victim" not in [c["name"].decode() for c in await r.xinfo_consumers(q.stream, q.group)]
        finally:
            if victim.returncode is None:
                victim.kill()
                await victim.wait()
            await r.aclose()

    asyncio.run(main())


def test_a_live_worker_keeps_a_message_that_runs_many_times_its_liveness(services):
    """The other side: liveness is renewed on its own task, so a long message is never handed to a
    second worker while its first one is alive (no duplicate processing by live consumers)."""

    async def main():
        r = aioredis.from_url(services[1])
        name = _name()
        opts = {"key_of": _by_owner, "visibility_timeout": HOUR, "liveness_ttl": 0.3}
        busy, idle = FairQueue(r, name, consumer="busy", **opts), FairQueue(r, name, consumer="idle", **opts)
        runs, started = [], asyncio.Event()

        async def slow(job):
            runs.append(("busy", job.payload["n"], job.attempt))
            started.set()
            for _ in range(20):  # ~2 s: about seven liveness periods, each checked by the idle worker
                await asyncio.sleep(0.1)

        async def handler(job):
            runs.append(("idle", job.payload["n"], job.attempt))

        await busy.enqueue({"owner": "a", "n": 0})
        async with Worker(busy, slow, concurrency=1):
            await asyncio.wait_for(started.wait(), PATIENCE)
            async with Worker(idle, handler):
                await _until(lambda: len(runs) == 1 and not busy._inflight, "the long message to finish")
                await idle.enqueue({"owner": "a", "n": 1})
                await _until(lambda: len(runs) == 2, "the next message")
        assert runs[0] == ("busy", 0, 1) and runs[1][1:] == (1, 1)
        s = await idle.stats()
        assert s["retries"] == 0 and s["depth"] == s["pending"] == s["delayed"] == 0
        await r.aclose()

    asyncio.run(main())


class _Monitor:
    """Every command the real server runs, as its MONITOR reports it (a script's own commands on
    lines of client ``lua``, right after the EVAL/EVALSHA line that ran them)."""

    def __init__(self, url: str) -> None:
        self.url, self.lines = url, []

    async def __aenter__(self) -> _Monitor:
        self.client = aioredis.from_url(self.url)
        self.conn = self.client.connection_pool.make_connection()
        await self.conn.connect()
        await self.conn.send_command("MONITOR")
        assert _s(await self.conn.read_response()) == "OK"
        self.task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        while True:
            self.lines.append(await self.conn.read_response())

    async def __aexit__(self, *exc) -> None:
        marker = f"monitor-end-{os.getpid()}"
        await self.client.get(marker)
        await _until(lambda: any(marker.encode() in line for line in self.lines[-20:]), "the monitor to catch up")
        self.task.cancel()
        await self.conn.disconnect()
        await self.client.aclose()

    async def undeclared(self, r) -> list[str]:
        """Keys a script's command touched that its EVAL/EVALSHA did not name in KEYS."""
        found, declared = [], None
        for line in self.lines:
            head, _, rest = line.partition(b"] ")
            args = [_unquote(a) for a in re.findall(rb'"((?:[^"\\]|\\.)*)"', rest)]
            if not args:
                continue
            if not head.endswith(b" lua"):
                script = args[0].upper() in (b"EVAL", b"EVALSHA")
                declared = {_s(k) for k in args[3 : 3 + int(args[2])]} if script else None
                continue
            try:
                keys = [_s(k) for k in await r.command_getkeys(*args)]
            except ResponseError:  # no key (TIME)
                keys = []
            found += [f"{_s(args[0])} {k}" for k in keys if declared is None or k not in declared]
        return found


async def _take_one(r, q: FairQueue) -> tuple[str, dict, str]:
    """What a worker does on reading a token: (entry id, the message it took, its key's hash)."""
    ((_, [(entry_id, fields)]),) = await r.xreadgroup(q.group, q.consumer, {q.stream: ">"}, count=1)
    msg, keyhash, _ = await q._take_entry(fields, _s(entry_id))
    return _s(entry_id), msg, keyhash


def _unquote(text: bytes) -> bytes:
    return text.decode("latin1").encode("latin1").decode("unicode_escape").encode("latin1")


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def test_every_key_a_queue_script_touches_is_named_in_its_keys(services):
    """Before: the fair queue's move of due retries built each tenant's list key inside Lua. One
    hash tag keeps them in one slot, but a server that checks a script's keys against what it
    declared (Dragonfly by default; strict cluster proxies) refuses it, and every retry stalls.
    Now every script of the fair, ordered and plain queues (enqueue, take, finish in each mode,
    retries moved back, dead letters revived, liveness, a departed consumer reaped) names every
    key it touches: checked on the real server's MONITOR."""

    async def main():
        r = aioredis.from_url(services[1])
        opts = {"visibility_timeout": HOUR, "liveness_ttl": 0.3, "backoff_base": 0.01, "backoff_max": 0.02}
        queues = [
            FairQueue(r, _name(), key_of=_by_owner, max_retries=1, **opts),
            Queue(r, _name(), ordered=True, max_retries=1, **opts),
            Queue(r, _name(), max_retries=1, **opts),
        ]
        async with _Monitor(services[1]) as monitor:
            for q in queues:
                done = []

                async def handler(job, done=done):
                    n = job.payload["n"]
                    if n == 1 and job.attempt == 1:
                        raise RuntimeError("once")  # retried: delayed, then moved back
                    if n == 2 and "deferred" not in done:
                        done.append("deferred")
                        raise Retry(0)
                    if n == 3:
                        raise Fatal("never")  # a dead letter, revived below
                    done.append(n)

                for n in range(4):
                    await q.enqueue({"owner": "a", "n": n}, key="a", dedupe=f"d{n}")
                async with Worker(q, handler):
                    await _until(lambda done=done: {0, 1, 2} <= set(done), "the messages")
                    await _until_stats(q, lambda s: s["dead_letters"] == 1, "the dead letter")
                    (letter,) = await q.dead_letters(10)
                    assert await q.retry_dead(letter["id"])
                    await _until_stats(
                        q, lambda s: s["dead_letters"] == 1 and s["depth"] == s["pending"] == 0, "it dead again"
                    )
                # a consumer gone with an entry pending: reaped by the next worker
                await q.enqueue({"owner": "b", "n": 0}, key="b")
                await q._ensure_group()
                await r.xreadgroup(q.group, "gone", {q.stream: ">"}, count=1)
                await r.zadd(q.consumers, {"gone": 0})
                async with Worker(q, handler):
                    await _until_stats(
                        q, lambda s: s["pending"] == s["depth"] == s["delayed"] == 0, "the reaped entry done"
                    )
                if isinstance(q, FairQueue):  # the way back: queued, delayed and taken messages moved
                    for n in (9, 10, 11):
                        await q.enqueue({"owner": "a", "n": n})
                    await q._finish_entry(*(await _take_one(r, q)), "retry", 0.0, False, 0)
                    await _take_one(r, q)
                    assert await q.downgrade() == {"queued": 1, "delayed": 1, "in_flight": 1}
        assert await monitor.undeclared(r) == []
        await r.aclose()

    asyncio.run(main())


async def _cli(redis_url: str, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        *args,
        cwd=ROOT,
        env={**os.environ, "REDIS_URL": redis_url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), PATIENCE)
    return proc.returncode, out.decode()


def test_downgrade_moves_every_job_to_the_plain_stream_a_previous_release_reads(services, tmp_path):
    """Before: rolling back to the release before the fair queue stranded every document queued
    per tenant (that release reads only the plain stream). Now `gateway queue downgrade <name>`
    moves them there — queued ones in order, retries with their due time, what a killed worker
    had taken — refusing while a consumer of this release is alive, and the previous release's
    plain consumer then processes each exactly once."""

    async def main():
        r = aioredis.from_url(services[1])
        name = _name()
        q = FairQueue(r, name, key_of=_by_owner, visibility_timeout=HOUR, liveness_ttl=0.5, backoff_base=3600.0)

        async def failing(job):
            raise RuntimeError("down")

        await q.enqueue({"owner": "c", "n": 0})
        async with Worker(q, failing):
            await _until_stats(q, lambda s: s["delayed"] == 1, "c's message waiting for its retry")
        for owner, count in (("a", 4), ("b", 2)):
            for n in range(count):
                await q.enqueue({"owner": owner, "n": n})
        script, log = tmp_path / "victim.py", tmp_path / "victim.log"
        script.write_text(_VICTIM)
        log.touch()
        victim = await asyncio.create_subprocess_exec(
            sys.executable, str(script), services[1], name, str(log), "in-handler", cwd=ROOT
        )
        try:
            await _until(lambda: log.read_text().strip(), "the victim to take a's first message")
            code, out = await _cli(services[1], "queue", "downgrade", name)
            assert code == 1 and "still running" in out, out  # a live consumer: nothing moved
            assert await r.xlen(f"gw:{{gw}}:q:{name}") == 0 and await r.hlen(q.taken) == 1
            os.kill(victim.pid, signal.SIGKILL)
            await asyncio.wait_for(victim.wait(), PATIENCE)
        finally:
            if victim.returncode is None:
                victim.kill()
                await victim.wait()
        for _ in range(int(PATIENCE * 10)):  # the killed worker's liveness runs out
            if not await q.running():
                break
            await asyncio.sleep(0.1)
        code, out = await _cli(services[1], "queue", "downgrade", name)
        assert code == 0, out
        assert "moved 5 queued, 1 waiting for a retry and 1 taken by stopped workers" in out
        assert await r.hlen(q.taken) == 0 and await r.zcard(q.delayed) == 0 and not await r.exists(q.stream)
        assert [k async for k in r.scan_iter(match=f"{q._fair}:k:*")] == []

        old = Queue(r, name)  # the previous release: a plain queue of the same name
        (member,) = await r.zrange(old.delayed, 0, -1)
        await r.zadd(old.delayed, {member: 0})  # c's retry comes due
        done = []

        async def handler(job):
            done.append((job.payload["owner"], job.payload["n"], job.attempt))

        async with Worker(old, handler, concurrency=1):
            await _until(lambda: len(done) == 7, "every job, by the previous release")
        assert sorted(done) == [
            ("a", 0, 1),
            ("a", 1, 1),
            ("a", 2, 1),
            ("a", 3, 1),
            ("b", 0, 1),
            ("b", 1, 1),
            ("c", 0, 2),
        ]
        assert [d for d in done if d[0] == "a" and d[1] > 0] == [("a", 1, 1), ("a", 2, 1), ("a", 3, 1)]  # in order
        s = await old.stats()
        assert s["depth"] == s["pending"] == s["delayed"] == 0
        code, out = await _cli(services[1], "queue", "downgrade", name)  # again: nothing left to move
        assert code == 0 and "moved 0 queued, 0 waiting for a retry and 0 taken" in out, out
        await r.aclose()

    asyncio.run(main())


def _by_kb(payload: dict) -> str | None:
    return payload.get("kb")


def test_a_knowledge_bases_one_document_is_not_stuck_behind_another_kbs_many_of_the_same_tenant(services):
    """Before: within a tenant's turns its documents went in arrival order, so one knowledge base
    of 30 documents made another knowledge base's one document of the same tenant wait for all
    30. Now (``sub_key_of``) a tenant's turns go round its knowledge bases."""

    async def main():
        r = aioredis.from_url(services[1])
        order: dict[str, list[str]] = {}
        for kind, sub in (("tenant only", None), ("tenant then kb", _by_kb)):
            q = FairQueue(r, _name(), key_of=_by_owner, sub_key_of=sub)
            for n in range(30):
                await q.enqueue({"owner": "a", "kb": "big", "n": n})
            await q.enqueue({"owner": "a", "kb": "small", "n": 0})
            seen = order[kind] = []

            async def handler(job, seen=seen):
                seen.append(job.payload["kb"])

            async with Worker(q, handler, concurrency=1):
                await _until(lambda seen=seen: len(seen) == 31, f"every message ({kind})")
        assert order["tenant only"].index("small") == 30  # behind all of the big one's
        assert order["tenant then kb"].index("small") <= 1  # the next of the tenant's turns
        await r.aclose()

    asyncio.run(main())


def test_tenants_take_turns_and_within_a_tenant_its_knowledge_bases_do(services):
    async def main():
        r = aioredis.from_url(services[1])
        q = FairQueue(r, _name(), key_of=_by_owner, sub_key_of=_by_kb)
        for n in range(6):
            await q.enqueue({"owner": "a", "kb": "a1", "n": n})
        for n in range(6):
            await q.enqueue({"owner": "a", "kb": "a2", "n": n})
        for n in range(4):
            await q.enqueue({"owner": "b", "kb": "b1", "n": n})
        seen = []

        async def handler(job):
            seen.append((job.payload["owner"], job.payload["kb"], job.payload["n"]))

        async with Worker(q, handler, concurrency=1):
            await _until(lambda: len(seen) == 16, "every message")
        assert [o for o, _, _ in seen[:8]] == ["a", "b"] * 4  # tenants in turn while both wait
        a_kbs = [kb for o, kb, _ in seen if o == "a"]
        assert all(a_kbs[i] != a_kbs[i + 1] for i in range(11)), a_kbs  # a's knowledge bases in turn
        for kb in ("a1", "a2", "b1"):  # and each knowledge base's documents in arrival order
            ns = [n for _, k, n in seen if k == kb]
            assert ns == sorted(ns), (kb, ns)
        s = await q.stats()
        assert s["depth"] == s["pending"] == s["delayed"] == 0
        assert [k async for k in r.scan_iter(match=f"{q._fair}:[zrk]:*")] == []  # nothing left behind
        await r.aclose()

    asyncio.run(main())


def test_what_the_previous_layout_left_waiting_is_still_served(services):
    """A replica of the release before knowledge bases took turns kept a key's messages in a
    list (and a retry's member without a sub-key): they are still taken, in turn."""

    async def main():
        r = aioredis.from_url(services[1])
        q = FairQueue(r, _name(), key_of=_by_owner, sub_key_of=_by_kb)
        await q._ensure_group()
        keyhash = _digest("a")
        old = [
            {
                "id": f"old{n}",
                "payload": {"owner": "a", "kb": "k", "n": n},
                "key": "a",
                "attempt": 1,
                "enqueued_at": 1.0,
            }
            for n in range(4)
        ]
        for msg in old[:3]:  # as that release's enqueue left them: the list, one token, the live set
            await r.rpush(q._list_key(keyhash), orjson.dumps(msg))
            await r.zadd(q.live, {msg["id"]: 1000})
        await r.xadd(q.stream, {"k": keyhash})
        await r.zadd(q.delayed, {keyhash.encode() + orjson.dumps(old[3]): 0})  # its retry, due
        await r.zadd(q.live, {"old3": 1000})
        await q.enqueue({"owner": "a", "kb": "new", "n": 9})
        seen = []

        async def handler(job):
            seen.append(job.id)

        async with Worker(q, handler, concurrency=1):
            await _until(lambda: len(seen) == 5, "the old and the new messages")
        assert len(set(seen)) == 5 and {"old0", "old1", "old2", "old3"} <= set(seen)  # each once
        s = await q.stats()
        assert s["depth"] == s["pending"] == s["delayed"] == 0
        await r.aclose()

    asyncio.run(main())


def test_a_stalled_consumer_whose_liveness_lapsed_cancels_what_it_lost(services):
    """A consumer whose liveness lapses while alive (its Redis calls stuck past ``liveness_ttl``)
    loses its entries to a live worker; when it comes back, its next beat finds it had lapsed and
    cancels the handler of the entry it lost, so the message is not worked on by two live
    consumers from then on, and the late one's result could not count anyway."""

    async def main():
        r = aioredis.from_url(services[1])
        name = _name()
        opts = {"key_of": _by_owner, "visibility_timeout": HOUR, "liveness_ttl": 0.4}
        stalled, other = FairQueue(r, name, consumer="stalled", **opts), FairQueue(r, name, consumer="other", **opts)
        unstall, started, runs = asyncio.Event(), asyncio.Event(), []
        beat = stalled._beat_script

        async def stuck_beat(**kw):
            if started.is_set():
                await unstall.wait()  # its liveness is not renewed meanwhile
            return await beat(**kw)

        stalled._beat_script = stuck_beat

        async def slow(job):
            runs.append(("stalled", job.attempt, "start"))
            started.set()
            try:
                await asyncio.sleep(HOUR)
            except asyncio.CancelledError:
                runs.append(("stalled", job.attempt, "cancelled"))
                raise

        async def handler(job):
            runs.append(("other", job.attempt, "done"))

        await stalled.enqueue({"owner": "a", "n": 0})
        async with Worker(stalled, slow, concurrency=1):
            await asyncio.wait_for(started.wait(), PATIENCE)
            async with Worker(other, handler):
                await _until(lambda: ("other", 2, "done") in runs, "the live worker to take the message over")
                unstall.set()
                await _until(lambda: ("stalled", 1, "cancelled") in runs, "the stalled handler cancelled")
        assert runs == [("stalled", 1, "start"), ("other", 2, "done"), ("stalled", 1, "cancelled")]
        s = await other.stats()
        assert s["depth"] == s["pending"] == s["delayed"] == 0 and s["retries"] == 1
        await r.aclose()

    asyncio.run(main())
