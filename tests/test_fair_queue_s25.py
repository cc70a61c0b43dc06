"""The fair queue hardened (core.fair_queue, core.queue) against a real Valkey: a worker SIGKILLed
between reading a key's token and taking its message, or in the middle of a message, has its work
claimed once its liveness runs out — not after the visibility timeout — while a live worker with a
long message keeps it; every key a script touches is declared; and the way back to a previous
release (jobs moved to the plain stream it reads)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from core.fair_queue import FairQueue
from tests.test_queue import PATIENCE, Worker, _name, _until

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
