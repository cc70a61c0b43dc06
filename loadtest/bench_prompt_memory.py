"""What the agent registry holds in a replica's memory for one agent with N saved prompt versions.

``python -m loadtest.bench_prompt_memory [--versions 100] [--chars 61440] [--out FILE]``

Saves N versions of ``--chars`` characters (through the store functions the admin API uses,
on the embedded PostgreSQL and Valkey of a scratch data directory, or DATABASE_URL / REDIS_URL),
then loads a registry and reports the prompt versions it holds and the Python heap it took
(tracemalloc, around ``AgentRegistry.reload``). Runs against any checkout: with one from before
runtime/prompt_versions.py (PYTHONPATH=that checkout) it reports what the old registry held.
Where the registry has them, it also times reading a pinned old version on demand (first read
and cached).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path


async def run(versions: int, chars: int) -> dict:
    import asyncpg
    import redis.asyncio as aioredis

    from gateway.db import migrate
    from gateway.embedded import resolve_urls
    from runtime import agents as store

    try:
        from runtime.agent_registry import AgentRegistry
    except ImportError:  # a checkout from before the registry had its own module
        from runtime.agents import AgentRegistry

    data_dir = Path(tempfile.mkdtemp(prefix="bench-prompt-memory-"))
    database_url, redis_url, services = resolve_urls(data_dir)
    try:
        conn = await asyncpg.connect(database_url)
        await migrate(conn)
        tenant = "bench-" + uuid.uuid4().hex[:8]
        body = ("Answer as the support assistant of {{ company }}. " * (chars // 50 + 1))[:chars]
        async with conn.transaction():
            agent_id = await store.create_agent(
                conn,
                tenant=tenant,
                name="memory",
                model="m",
                description="",
                settings={},
                template="v1 " + body,
                variables={"company": {"type": "string", "required": True}},
            )
        agent = await store.load_agent(conn, agent_id)
        for n in range(2, versions + 1):
            async with conn.transaction():
                await store.save_version(conn, agent, f"v{n} " + body, agent.versions[1].variables)
        await conn.close()

        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
        redis = aioredis.from_url(redis_url)
        try:
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            reg = AgentRegistry(pool, redis)
            await reg.reload()
            heap = tracemalloc.get_traced_memory()[0] - before
            tracemalloc.stop()
            loaded = reg.get(tenant, "memory")
            held_chars = sum(len(v.template) for v in loaded.versions.values())
            out = {
                "versions_saved": versions,
                "template_chars": chars,
                "versions_held": len(loaded.versions),
                "template_chars_held": held_chars,
                "heap_bytes_after_reload": heap,
            }
            if hasattr(reg, "pinned"):
                middle = str(max(2, versions // 2))
                started = time.perf_counter()
                first = await reg.pinned(loaded, middle)
                first_ms = (time.perf_counter() - started) * 1000
                started = time.perf_counter()
                for _ in range(100):
                    await reg.pinned(loaded, middle)
                cached_us = (time.perf_counter() - started) / 100 * 1e6
                out.update(
                    pinned_version=first.version if first else None,
                    pinned_first_read_ms=round(first_ms, 2),
                    pinned_cached_us=round(cached_us, 2),
                    pinned_reads=reg.pinned_versions.reads,
                )
            return out
        finally:
            await redis.aclose()
            await pool.close()
    finally:
        if services is not None:
            services.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(prog="bench_prompt_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--versions", type=int, default=100)
    p.add_argument("--chars", type=int, default=60 * 1024)
    p.add_argument("--out", type=Path)
    opts = p.parse_args()
    os.environ.setdefault("GATEWAY_LOG_LEVEL", "warning")
    result = asyncio.run(run(opts.versions, opts.chars))
    text = json.dumps(result, indent=2)
    print(text)
    if opts.out:
        opts.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
