"""Chaos check of the fair queue (core/fair_queue.py) on a real Valkey: consumer processes SIGKILLed
at random while handlers fail at random (jobs keyed by tenant, then by one of three knowledge
bases); nothing may be lost, and no job may run twice except
where a killed worker's run is repeated (at-least-once).

    .venv/bin/python -m loadtest.chaos_fair_queue [--jobs 400] [--tenants 6] [--consumers 3]
        [--kills 12] [--fail-rate 0.15] [--work-ms 300] [--seed 1] [--out loadtest/results/chaos-fair-queue.md]

``$REDIS_URL``, else an embedded Valkey in a temporary directory. Every handler run writes
``start``/``ok``/``fail`` records (Redis time) to a list; the parent records each kill's time. A
violation is a job finished twice where the earlier finisher was not killed afterwards, or two
runs of one job overlapping while the earlier runner was alive (a live consumer's job taken).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path

import redis.asyncio as aioredis

from core.fair_queue import FairQueue

ROOT = Path(__file__).resolve().parents[1]
OPTS = {"visibility_timeout": 30.0, "liveness_ttl": 1.0, "backoff_base": 0.05, "backoff_max": 0.5, "max_retries": 12}


def _tenant(payload: dict) -> str:
    return payload["tenant"]


def _kb(payload: dict) -> str:
    return payload["kb"]


async def consume(url: str, name: str, log: str, fail_rate: float, seed: int, work_ms: float) -> None:
    """One consumer process: a FairQueue run (two handlers) whose handler takes up to ``work_ms``
    and fails at random."""
    r = aioredis.from_url(url)
    q = FairQueue(r, name, key_of=_tenant, sub_key_of=_kb, **OPTS)
    rnd = random.Random(seed)

    async def note(kind: str, job) -> None:
        seconds, micros = await r.time()
        await r.rpush(log, f"{int(seconds) * 1_000_000 + int(micros)} {kind} {job.id} {q.consumer} {job.attempt}")

    async def handler(job):
        await note("start", job)
        await asyncio.sleep(rnd.uniform(0.1, 1.0) * work_ms / 1000)
        if rnd.random() < fail_rate:
            await note("fail", job)
            raise RuntimeError("chaos")
        await note("ok", job)

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(q.stop(5.0)))
    await r.rpush(f"{log}:consumers", f"{os.getpid()} {q.consumer}")
    await q.run(handler, concurrency=2)


async def main(args) -> dict:
    url = os.environ["REDIS_URL"]
    r = aioredis.from_url(url)
    name, log = f"chaos-{uuid.uuid4().hex[:8]}", f"chaos:{uuid.uuid4().hex[:8]}"
    rnd = random.Random(args.seed)
    q = FairQueue(r, name, key_of=_tenant, sub_key_of=_kb, **OPTS)
    weights = [2**i for i in range(args.tenants, 0, -1)]  # skewed: the first tenant uploads most
    ids = []
    for _ in range(args.jobs):
        tenant = rnd.choices(range(args.tenants), weights)[0]
        ids.append(await q.enqueue({"tenant": f"t{tenant}", "kb": f"kb{rnd.randrange(3)}"}))
    try:
        return await _chaos(args, r, q, name, log, ids, rnd, url)
    finally:
        await r.aclose()


async def _chaos(args, r, q, name, log, ids, rnd, url) -> dict:
    procs: dict[int, asyncio.subprocess.Process] = {}
    kills: dict[int, float] = {}  # pid -> Redis time (µs) of its SIGKILL

    async def spawn(n: int) -> None:
        p = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "loadtest.chaos_fair_queue",
            "--consume",
            url,
            name,
            log,
            str(args.fail_rate),
            str(n),
            str(args.work_ms),
            cwd=ROOT,
        )
        procs[p.pid] = p

    try:
        return await _run(args, r, q, log, ids, rnd, procs, kills, spawn)
    finally:
        for proc in procs.values():
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def _run(args, r, q, log, ids, rnd, procs, kills, spawn) -> dict:
    started = time.monotonic()
    for n in range(args.consumers):
        await spawn(n)
    spawned, killed = args.consumers, 0
    while True:
        await asyncio.sleep(rnd.uniform(0.3, 1.5))
        live = await r.zcard(q.live)
        if live == 0 or time.monotonic() - started > args.timeout:
            break
        if killed < args.kills:
            pid = rnd.choice([p for p, proc in procs.items() if proc.returncode is None])
            seconds, micros = await r.time()
            os.kill(pid, signal.SIGKILL)
            kills[pid] = int(seconds) * 1_000_000 + int(micros)
            await procs[pid].wait()
            killed += 1
            await spawn(spawned)
            spawned += 1
    elapsed = time.monotonic() - started
    stats = await q.stats()
    for proc in procs.values():
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs.values():
        await proc.wait()
    taken_left = await r.hlen(q.taken)

    consumer_pid = {}
    for line in await r.lrange(f"{log}:consumers", 0, -1):
        pid, consumer = line.decode().split()
        consumer_pid[consumer] = int(pid)
    runs = defaultdict(list)  # job -> [(t, kind, consumer, attempt)]
    counts = defaultdict(int)
    for line in await r.lrange(log, 0, -1):
        t, kind, job, consumer, attempt = line.decode().split()
        runs[job].append((int(t), kind, consumer, int(attempt)))
        counts[kind] += 1

    def kill_time(consumer: str) -> int | None:
        return kills.get(consumer_pid.get(consumer, -1))

    lost = [j for j in ids if not any(kind == "ok" for _, kind, _, _ in runs.get(j, ()))]
    twice_killed, twice_live, overlaps = 0, 0, 0
    for events in runs.values():
        events.sort()
        # finished twice: allowed only when the earlier finisher was killed after finishing and
        # before the job started again (killed between its handler's end and the acknowledgement)
        for i, (t, kind, consumer, _) in enumerate(events):
            if kind != "ok":
                continue
            later = [e for e in events[i + 1 :] if e[1] == "start"]
            if not any(e[1] == "ok" for e in events[i + 1 :]):
                continue
            k = kill_time(consumer)
            if k is not None and t <= k <= later[0][0]:
                twice_killed += 1
            else:
                twice_live += 1
        # a run starting while another consumer's run of the same job is open and that consumer
        # is alive: a live consumer's job was taken from it
        open_runs: dict[str, int] = {}
        for t, kind, consumer, _ in events:
            if kind == "start":
                for other in list(open_runs):
                    k = kill_time(other)
                    if k is not None and k <= t:
                        del open_runs[other]
                    elif other != consumer:
                        overlaps += 1
                open_runs[consumer] = t
            else:
                open_runs.pop(consumer, None)
    # how long a killed worker's unfinished runs waited: from its kill to the job's next start
    takeovers = []
    for events in runs.values():
        for i, (t, kind, consumer, _) in enumerate(events):
            k = kill_time(consumer)
            if kind != "start" or k is None or k < t:
                continue
            ended = [e for e in events[i + 1 :] if e[2] == consumer and e[1] != "start" and e[0] <= k]
            nxt = [e for e in events[i + 1 :] if e[1] == "start" and e[0] >= k]
            if not ended and nxt:
                takeovers.append((nxt[0][0] - k) / 1e6)
    takeovers.sort()
    result = {
        "jobs": args.jobs,
        "tenants": args.tenants,
        "consumers": args.consumers,
        "kills": killed,
        "fail_rate": args.fail_rate,
        "handler_runs": counts["start"],
        "handler_failures": counts["fail"],
        "retries": stats["retries"],
        "dead_letters": stats["dead_letters"],
        "lost": len(lost),
        "finished_twice_after_a_kill": twice_killed,
        "finished_twice_by_live_consumers": twice_live,
        "overlapping_runs_of_live_consumers": overlaps,
        "runs_cut_by_a_kill": len(takeovers),
        "takeover_s_median": round(takeovers[len(takeovers) // 2], 2) if takeovers else None,
        "takeover_s_max": round(takeovers[-1], 2) if takeovers else None,
        "left_unfinished": stats["depth"] + stats["pending"] + stats["delayed"],
        "taken_left": taken_left,
        "seconds": round(elapsed, 1),
    }
    await r.delete(log, f"{log}:consumers")
    return result


def cli() -> None:
    if sys.argv[1:2] == ["--consume"]:
        url, name, log, fail_rate, n, work_ms = sys.argv[2:8]
        asyncio.run(consume(url, name, log, float(fail_rate), int(n), float(work_ms)))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--tenants", type=int, default=6)
    parser.add_argument("--consumers", type=int, default=3)
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--fail-rate", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--work-ms", type=float, default=300.0, help="a handler takes 10-100 %% of it")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--out")
    args = parser.parse_args()
    services, scratch = None, None
    if not os.environ.get("REDIS_URL"):
        from gateway.embedded import EmbeddedServices

        scratch = tempfile.mkdtemp(prefix="chaos-fq-")
        services = EmbeddedServices(Path(scratch)).start(postgres=False, valkey=True)
        os.environ["REDIS_URL"] = services.redis_url
    try:
        result = asyncio.run(main(args))
    finally:
        if services:
            services.stop()
            shutil.rmtree(scratch, ignore_errors=True)
    lines = [f"| {k} | {v} |" for k, v in result.items()]
    text = "| measure | value |\n| --- | --- |\n" + "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(
            "# Fair queue chaos check\n\n`.venv/bin/python -m loadtest.chaos_fair_queue "
            + " ".join(sys.argv[1:])
            + "`\n\n"
            + text
        )
    ok = not (
        result["lost"] or result["finished_twice_by_live_consumers"] or result["overlapping_runs_of_live_consumers"]
    )
    sys.exit(0 if ok and not result["left_unfinished"] and not result["taken_left"] else 1)


if __name__ == "__main__":
    cli()
