"""What one full reload of the agent registry costs with N agents stored, when nothing changed and
when one agent changed, on this checkout's code and on another git ref's (``main`` by default),
in one run against the same database.

``python -m loadtest.bench_agent_reload [--agents 2000] [--tools 16] [--rounds 5] [--ref main] [--out FILE]``

Stores N agents of ``--tools`` small HTTP tools each (1,000 a tenant), through the store
functions the admin API uses, on the embedded PostgreSQL and Valkey of a scratch data directory.
Then, for each code (``--ref`` extracted with ``git archive`` into a scratch directory, and this
checkout), a process of its own loads a registry (the first reload) and times ``--rounds`` full
reloads with nothing changed, and ``--rounds`` each after one agent's description changed: the
wall time, the process's CPU time (the event loop's share: asyncpg decoding the rows and the
Python building the agents; PostgreSQL runs elsewhere) and the agents built (``agent_from_rows``
calls). Medians.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tools(count: int) -> list[dict]:
    config = {"url": "https://tools.invalid/x", "allowed_hosts": ["tools.invalid"], "method": "POST"}
    parameters = {"type": "object", "properties": {"q": {"type": "string"}, "n": {"type": "integer"}}}
    return [
        {"name": f"tool_{i}", "kind": "http", "description": "a tool", "parameters": parameters, "config": config}
        for i in range(count)
    ]


async def store_agents(database_url: str, agents: int, tool_count: int) -> None:
    import asyncpg

    from gateway.db import migrate
    from runtime import agents as store

    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn)
        settings = {"tools": tools(tool_count)}
        for start in range(0, agents, 100):
            async with conn.transaction():
                for i in range(start, min(agents, start + 100)):
                    await store.create_agent(
                        conn,
                        tenant=f"bench-{i // 1000}",
                        name=f"agent-{i}",
                        model="m",
                        description="",
                        settings=settings,
                        template=f"You are agent {i}. Answer briefly.",
                        variables={},
                    )
    finally:
        await conn.close()


async def child(database_url: str, redis_url: str, rounds: int) -> dict:
    """Run in a process whose ``runtime`` is the code measured (PYTHONPATH)."""
    import asyncpg
    import redis.asyncio as aioredis

    import runtime.agent_registry as agent_registry
    import runtime.agents as agents
    from core.tokens import wait_warm

    built = [0]
    build = agent_registry.agent_from_rows

    def counted(*args, **kwargs):
        built[0] += 1
        return build(*args, **kwargs)

    agent_registry.agent_from_rows = counted
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    redis = aioredis.from_url(redis_url)

    async def timed() -> tuple[float, float, int]:
        built[0] = 0
        wall, cpu = time.perf_counter(), time.process_time()
        await registry.reload()
        return (time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000, built[0]

    try:
        registry = agent_registry.AgentRegistry(pool, redis)
        first = await timed()
        await asyncio.to_thread(wait_warm)  # (the tokenizer loads in a thread of its own once)
        unchanged = [await timed() for _ in range(rounds)]
        one = []
        for n in range(rounds):
            async with pool.acquire() as conn:
                await conn.execute(
                    """UPDATE agents SET description = $1
                       WHERE id = (SELECT min(id) FROM agents WHERE archived_at IS NULL)""",
                    f"round {n}",
                )
            one.append(await timed())
        held = len(registry._by_id)
        return {
            "code": agents.__file__,
            "agents_held": held,
            "first": first,
            "unchanged": unchanged,
            "one_changed": one,
        }
    finally:
        await redis.aclose()
        await pool.close()


def extract(ref: str, into: Path) -> Path:
    """The tree of ``ref`` (read from git; nothing in the checkout changes)."""
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", ref], capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as archive:
        archive.extractall(into, filter="data")
    return into


def measure(code: Path, database_url: str, redis_url: str, rounds: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "GATEWAY_LOG_LEVEL": "warning"}
    args = [sys.executable, str(Path(__file__).resolve()), "--child", database_url, redis_url, "--rounds", str(rounds)]
    out = subprocess.run(args, env=env, cwd=code, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def median(runs: list, field: int) -> float:
    return round(statistics.median(r[field] for r in runs), 2)


def report(opts, results: dict[str, dict]) -> str:
    lines = [
        "# One full reload of the agent registry: before and after incremental reloads",
        "",
        f"`python -m loadtest.bench_agent_reload --agents {opts.agents} --tools {opts.tools} "
        f"--rounds {opts.rounds} --ref {opts.ref}` ({time.strftime('%Y-%m-%d')}); embedded PostgreSQL "
        "and Valkey, both codes in one run against the same database. Medians of the rounds; CPU is the "
        "gateway process's (the event loop's share), wall includes PostgreSQL's.",
        "",
        "| code | agents held | first reload wall ms | nothing changed: wall ms | CPU ms | built "
        "| one changed: wall ms | CPU ms | built |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        u, o = r["unchanged"], r["one_changed"]
        lines.append(
            f"| {name} | {r['agents_held']} | {r['first'][0]:.1f} | {median(u, 0)} | {median(u, 1)} "
            f"| {median(u, 2):.0f} | {median(o, 0)} | {median(o, 1)} | {median(o, 2):.0f} |"
        )
    lines += [
        "",
        "What a full reload does on each: main reads every active agent's row, labels and labelled "
        "versions, builds every agent again (its parsed tools kept when unchanged: a JSON comparison) "
        "and sums the bytes of every held version; this checkout reads one short mark per active agent "
        "(agents.xmin, its labels' xmins, its newest version number) and reads and builds only the "
        "agents whose mark moved. The first reload (at start) builds everything on both. Wall times "
        "on a shared host (other test runs beside it) are noisy; CPU and agents built are the steadier figures.",
    ]
    old, new = results[opts.ref], results["this checkout"]
    for label, key in (("nothing changed", "unchanged"), ("one changed", "one_changed")):
        lines.append("")
        lines.append(
            f"- {label}: wall {median(old[key], 0) / max(median(new[key], 0), 0.01):.1f}x less, "
            f"CPU {median(old[key], 1) / max(median(new[key], 1), 0.01):.1f}x less "
            f"({opts.ref} / this checkout)."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(prog="bench_agent_reload", description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", type=int, default=2000)
    p.add_argument("--tools", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--ref", default="main")
    p.add_argument("--out", type=Path, default=ROOT / "loadtest" / "results" / "bench-agent-reload-latest.md")
    p.add_argument("--child", nargs=2, metavar=("DATABASE_URL", "REDIS_URL"), help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.child:
        print(json.dumps(asyncio.run(child(*opts.child, opts.rounds))))
        return
    os.environ.setdefault("GATEWAY_LOG_LEVEL", "warning")
    from gateway.embedded import resolve_urls

    scratch = Path(tempfile.mkdtemp(prefix="bench-agent-reload-"))
    database_url, redis_url, services = resolve_urls(scratch / "data")
    try:
        asyncio.run(store_agents(database_url, opts.agents, opts.tools))
        old = extract(opts.ref, scratch / "ref")
        results = {
            opts.ref: measure(old, database_url, redis_url, opts.rounds),
            "this checkout": measure(ROOT, database_url, redis_url, opts.rounds),
        }
    finally:
        if services is not None:
            services.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    text = report(opts, results)
    print(text)
    print(json.dumps(results))
    opts.out.write_text(text)


if __name__ == "__main__":
    main()
