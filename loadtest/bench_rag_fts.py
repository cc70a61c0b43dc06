"""The full-text stage alone at 100,000 chunks: ``kb_fts_candidates`` as the tenant role, for
the bench's Zipf-skewed three-word queries, by how many matches are ranked (``p_scan``) and
with PostgreSQL's ``gin_fuzzy_search_limit`` (``python -m loadtest.bench_rag_fts``).

Vectors are 8-dimensional (the stage reads none), so setting up takes a fraction of
loadtest/bench_rag.py's time. Prints one line per configuration and round."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import asyncpg

from gateway.db import migrate
from loadtest.bench_rag import TENANT, Corpus, _configure, ingest, pct
from rag import store

SCOPE = "SELECT set_config('gateway.tenant', $1, true), set_config('role', 'gateway_tenant', true)"
CONFIGS = (("p_scan 1000", 0, 1000), ("p_scan 200", 0, 200), ("p_scan 200, gin_fuzzy_search_limit 2000", 2000, 200))


async def main(chunks: int, queries: int, rounds: int) -> None:
    corpus = Corpus(chunks, 8, 500)
    _, texts = corpus.queries(queries)
    with tempfile.TemporaryDirectory(prefix="bench-fts-") as tmp:
        svc = await _configure(Path(tmp) / "data")
        try:
            conn = await asyncpg.connect(svc.database_url)
            await migrate(conn)
            await store.ensure_vector_index(conn, 8)
            kb = await store.create_kb(conn, TENANT, "fts", embedding_model="m", dims=8)
            pool = await asyncpg.create_pool(svc.database_url, min_size=1, max_size=2)
            await ingest(pool, kb.id, corpus, 0, chunks, 100)
            await pool.close()
            await conn.execute("VACUUM ANALYZE kb_chunks")
            for _ in range(rounds):
                for label, fuzzy, scan in CONFIGS:
                    times = []
                    for text in texts:
                        async with conn.transaction():
                            await conn.execute(SCOPE, TENANT)
                            if fuzzy:
                                await conn.execute(f"SET LOCAL gin_fuzzy_search_limit = {int(fuzzy)}")
                            t0 = time.perf_counter()
                            await conn.fetch(
                                "SELECT * FROM kb_fts_candidates($1, $2, $3, 40, $4, NULL)", TENANT, [kb.id], text, scan
                            )
                            times.append((time.perf_counter() - t0) * 1000)
                    print(
                        f"{label}: p50 {statistics.median(times):.2f} ms, p90 {pct(times, 90):.2f} ms, "
                        f"p99 {pct(times, 99):.2f} ms",
                        flush=True,
                    )
            await conn.close()
        finally:
            svc.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    asyncio.run(main(args.chunks, args.queries, args.rounds))
