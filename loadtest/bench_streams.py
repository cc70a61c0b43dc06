"""CPU of the run/memory stream path in process, redis-py against ``core.fastredis``.

For N stream entries the size of a run record: the CPU this process spends appending them
(``RunRecorder``'s flush, batches of ``FLUSH_BATCH``) and reading and acknowledging them
(``StreamWriter.drain``, batches of 500, the PostgreSQL write a no-op so only the stream calls
count), per entry, median of a few rounds. Valkey and PostgreSQL are the embedded servers, in
processes of their own, so their CPU is not counted.

    .venv/bin/python -m loadtest.bench_streams [N]

writes ``loadtest/results/bench-streams-latest.{json,md}``.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

from core.fastredis import PipelinedRedis
from core.stream_writer import StreamWriter
from gateway.embedded import EmbeddedServices
from runtime.runs import FLUSH_BATCH, RUNS_STREAM, RunRecorder, encode_run

RESULTS = Path(__file__).parent / "results"
ROUNDS = 5


async def _nothing(conn, entries) -> None:
    return None


def _runs(n: int) -> list[bytes]:
    step = {"step": 1, "kind": "model", "name": "gpt-mock", "duration_ms": 12.5, "status": "ok", "tokens": 20}
    return [
        encode_run({"request_id": f"req_{uuid.uuid4().hex}", "tenant": "acme", "agent": "support", "steps": [step] * 3})
        for _ in range(n)
    ]


def _cpu_us(started: float, n: int) -> float:
    return round((time.process_time() - started) * 1e6 / n, 2)


async def _round(pool, redis_url: str, runs: list[bytes], client: str) -> tuple[float, float]:
    """(append, read+ack) µs per entry; the bench's own Valkey, so the runs stream is its alone."""
    redis = aioredis.from_url(redis_url)
    fast = PipelinedRedis(redis_url) if client == "fastredis" else None
    reader = PipelinedRedis(redis_url, timeout=10) if client == "fastredis" else None
    recorder = RunRecorder(pool, redis, fast=fast)
    writer = StreamWriter(redis, pool, stream=RUNS_STREAM, group="bench", write=_nothing, fast=reader)
    await redis.delete(RUNS_STREAM)
    await writer._ensure_group()
    try:
        started = time.process_time()
        for i in range(0, len(runs), FLUSH_BATCH):  # what RunRecorder's flusher does per batch
            await recorder._append(runs[i : i + FLUSH_BATCH])
        append = _cpu_us(started, len(runs))
        started = time.process_time()
        moved = await writer.drain()
        read_ack = _cpu_us(started, len(runs))
        assert moved == len(runs) and await redis.xlen(RUNS_STREAM) == 0
        return append, read_ack
    finally:
        await redis.aclose()
        for c in (fast, reader):
            if c is not None:
                await c.close()


async def main(n: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-streams-") as tmp:
        svc = EmbeddedServices(Path(tmp)).start()
        try:
            pool = await asyncpg.create_pool(svc.database_url, min_size=1, max_size=2)
            runs = _runs(n)
            out: dict = {"entries": n, "entry_bytes": len(runs[0]), "rounds": ROUNDS}
            rounds: dict = {"redis-py": [], "fastredis": []}
            for _ in range(ROUNDS):  # alternating, so a noisy moment hits both
                for client in rounds:
                    rounds[client].append(await _round(pool, svc.redis_url, runs, client))
            for client, got in rounds.items():
                out[client] = {
                    "append_us_per_entry": statistics.median(a for a, _ in got),
                    "read_ack_us_per_entry": statistics.median(r for _, r in got),
                }
            await pool.close()
            return out
        finally:
            svc.stop()


def report(out: dict) -> str:
    lines = [
        f"# Stream path CPU in process: {out['entries']} entries of {out['entry_bytes']} bytes, "
        f"median of {out['rounds']} rounds",
        "",
        "| client | append µs/entry | read+ack µs/entry |",
        "| --- | --- | --- |",
    ]
    for client in ("redis-py", "fastredis"):
        r = out[client]
        lines.append(f"| {client} | {r['append_us_per_entry']} | {r['read_ack_us_per_entry']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    result = asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench-streams-latest.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "bench-streams-latest.md").write_text(report(result))
    print(report(result))
