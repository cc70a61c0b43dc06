"""What one conversation erasure costs where it reads most: the feedback delete
(``runtime.conversations.DELETE_FEEDBACK``) for a tenant of N runs and N feedback rows, with and
without the index of migration 0014 (``runs_tenant_agent_conversation``), and the memory
dead-letter drop (``StreamWriter.drop_dead_tagged``) over a full dead-letter stream of
``DEAD_MAX`` turns of 20 KB. Median of a few rounds, each delete rolled back. Valkey and
PostgreSQL are the embedded servers (a scratch data directory).

    .venv/bin/python -m loadtest.bench_erasure [N]

writes ``loadtest/results/bench-erasure-latest.{json,md}``.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

from core.dead_tags import DEAD_TAGGED
from core.stream_writer import DEAD_MAX, StreamWriter
from gateway.db import migrate
from gateway.embedded import EmbeddedServices
from runtime import conversations
from runtime.memory import conversation_tag

RESULTS = Path(__file__).parent / "results"
ROUNDS = 7
INDEX = """CREATE INDEX runs_tenant_agent_conversation ON runs (tenant, agent_id, conversation_id)
           INCLUDE (request_id) WHERE conversation_id IS NOT NULL"""
# the statement before this release's index and ARRAY rewrite, for comparison
_BEFORE = """
WITH gone AS (
    DELETE FROM feedback f
    WHERE f.tenant = $1 AND (f.agent_id = ANY($2::text[]) OR f.agent_id IS NULL)
      AND (f.conversation_id = ANY($3::text[])
           OR f.request_id IN (SELECT r.request_id FROM runs r
                               WHERE r.tenant = $1 AND r.agent_id = ANY($2::text[])
                                 AND r.conversation_id = ANY($3::text[])))
    RETURNING 1)
SELECT count(*) FROM gone
"""


async def _delete_ms(conn: asyncpg.Connection, sql: str) -> tuple[float, int]:
    times, deleted = [], 0
    for _ in range(ROUNDS):
        tx = conn.transaction()
        await tx.start()
        started = time.perf_counter()
        deleted = await conn.fetchval(sql, "big", ["agt_1"], ["c-77"])
        times.append((time.perf_counter() - started) * 1000)
        await tx.rollback()
    return statistics.median(times), deleted


async def feedback(database_url: str, n: int) -> dict:
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn)
        await conn.execute(
            """INSERT INTO runs (request_id, tenant, agent_id, conversation_id)
               SELECT 'req_' || i, 'big', 'agt_1', 'c-' || (i % ($1 / 5)) FROM generate_series(1, $1) i""",
            n,
        )
        await conn.execute(
            """INSERT INTO feedback (tenant, request_id, conversation_id, agent_id, score)
               SELECT 'big', CASE WHEN i % 2 = 0 THEN 'req_' || i END,
                      CASE WHEN i % 2 = 1 THEN 'c-' || (i % ($1 / 5)) END, 'agt_1', 0.5
               FROM generate_series(1, $1) i""",
            n,
        )
        await conn.execute("ANALYZE runs")
        await conn.execute("ANALYZE feedback")
        out = {"rows": n}
        out["this_release_ms"], out["deleted"] = await _delete_ms(conn, conversations.DELETE_FEEDBACK)
        await conn.execute("DROP INDEX runs_tenant_agent_conversation")
        out["before_ms"], _ = await _delete_ms(conn, _BEFORE)
        started = time.perf_counter()
        await conn.execute(INDEX)
        out["index_build_s"] = round(time.perf_counter() - started, 2)
        return out
    finally:
        await conn.close()


async def dead_letters(redis_url: str) -> dict:
    r = aioredis.from_url(redis_url)
    stream = "gw:{gw}:bench-erasure"
    keys = [f"{stream}:dead", f"{stream}:dead:tags"]
    try:
        await r.delete(*keys)
        record = b"x" * 20_000
        pipe = r.pipeline(transaction=False)
        for i in range(DEAD_MAX):
            tag = conversation_tag("t", "a", f"c{i}")
            pipe.eval(DEAD_TAGGED, 2, *keys, DEAD_MAX, tag, "r", record, "error", "22P02")
        await pipe.execute()
        writer = StreamWriter(r, None, stream=stream, group="g", write=None)
        times = []
        for i in range(ROUNDS):
            started = time.perf_counter()
            dropped = await writer.drop_dead_tagged({conversation_tag("t", "a", f"c{i * 997}")})
            times.append((time.perf_counter() - started) * 1000)
            assert dropped == 1
        return {"dead_letters": DEAD_MAX, "record_bytes": len(record), "drop_ms": statistics.median(times)}
    finally:
        await r.delete(*keys)
        await r.aclose()


async def main(n: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-erasure-") as tmp:
        svc = EmbeddedServices(Path(tmp)).start()
        try:
            return {"feedback": await feedback(svc.database_url, n), "dead_letters": await dead_letters(svc.redis_url)}
        finally:
            svc.stop()


def report(out: dict) -> str:
    f, d = out["feedback"], out["dead_letters"]
    return "\n".join(
        [
            "# One conversation erasure: where it reads most",
            "",
            f"Feedback delete, a tenant of {f['rows']:,} runs and {f['rows']:,} feedback rows "
            f"(median of {ROUNDS}, rolled back; {f['deleted']} rows deleted):",
            "",
            "| statement | ms |",
            "| --- | --- |",
            f"| before (no runs index, `IN (SELECT …)`) | {f['before_ms']:.2f} |",
            f"| this release (`runs_tenant_agent_conversation`, `= ANY(ARRAY(…))`) | {f['this_release_ms']:.2f} |",
            "",
            f"Building the index on {f['rows']:,} runs: {f['index_build_s']} s (writes to runs wait meanwhile).",
            "",
            f"Memory dead letters: dropping one conversation's from {d['dead_letters']:,} dead letters of "
            f"{d['record_bytes']:,} bytes: {d['drop_ms']:.2f} ms (tags read 1,000 a call).",
            "",
        ]
    )


if __name__ == "__main__":
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    result = asyncio.run(main(rows))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench-erasure-latest.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "bench-erasure-latest.md").write_text(report(result))
    print(report(result))
