"""What the confidence step adds to an agent turn (issue #15: at most 0.5 ms p50, no judge call).

Times ``gateway.hitl_stage.after_answer`` — the step exactly as the tools loop runs it after the
answer is known: the signals gathered from the turn (question, earlier questions from a
20-turn history, retrieval sources, tool steps), the score, the run-record fields and the
metric — on turns that do not escalate (escalating is a rare turn that opens a row in
PostgreSQL). Three flavours: a plain turn, a grounded turn with five sources and tool steps,
and a turn whose 120 token log-probabilities are scored (the response parsed once more).

The held check on the request path — one Redis GET issued as a task beside the memory read — is
timed against a real (embedded) Valkey: the memory read alone vs. the memory read with the check
beside it, alternating, on the pipelined client the turn uses (``--redis-rounds 0`` skips it).

    .venv/bin/python -m loadtest.bench_hitl [--turns 20000] [--redis-rounds 5000]

Writes loadtest/results/hitl-confidence.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from pathlib import Path

import orjson

from core.types import RequestContext
from gateway import hitl_stage
from runtime.types import Agent, PromptVersion, Selection, Turn

RESULTS = Path(__file__).resolve().parent / "results" / "hitl-confidence.json"

QUESTION = (
    "Hi, I ordered a pair of running shoes last Tuesday, order 88213, and the tracking page still says "
    "label created. Can you tell me when it will arrive and whether I can still change the size?"
)
ANSWER = " ".join(["Thanks for your patience. Your order 88213 left our warehouse this morning and should arrive"] * 6)


def _turn(flavour: str) -> tuple[RequestContext, bytes, dict]:
    settings = {"escalation": {"enabled": True, "threshold": 0.4, "logprobs": flavour == "logprobs"}}
    kbs = ("kb_1",) if flavour != "plain" else ()
    agent = Agent(id="agt_bench", tenant="t", name="bench", model="m", settings=settings, knowledge_bases=kbs)
    version = PromptVersion(version=1, template="You are helpful.")
    history = []
    for i in range(20):
        history += [
            {"role": "user", "content": f"Earlier question number {i} about shipping times and returns policy"},
            {"role": "assistant", "content": ANSWER[:300]},
        ]
    new = [{"role": "user", "content": QUESTION}]
    turn = Turn(
        agent=agent,
        selection=Selection(version=version, label="production", variant=None),
        conversation_id="c-1",
        variables={"customer_name": "Ana"},
        new_messages=new,
        history=history,
    )
    if flavour == "grounded":
        turn.citations = [
            {
                "source": i,
                "document_id": f"doc_{i}",
                "knowledge_base_id": "kb_1",
                "section": "Shipping",
                "similarity": s,
            }
            for i, s in enumerate((0.82, 0.77, 0.71, 0.66, 0.61), 1)
        ]
        turn.steps = [
            {"step": 1, "kind": "model", "status": 200},
            {"step": 1, "kind": "tool", "name": "order_status", "status": "ok"},
            {"step": 2, "kind": "model", "status": 200},
        ]
    ctx = RequestContext(request_id="r", endpoint="chat", body={}, started=0.0)
    ctx.body["messages"] = [{"role": "system", "content": "You are helpful."}, *history, *new]
    ctx.agent = turn
    choice = {"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}
    if flavour == "logprobs":
        choice["logprobs"] = {"content": [{"token": w, "logprob": -0.05, "top_logprobs": []} for w in ANSWER.split()]}
    raw = orjson.dumps({"id": "x", "object": "chat.completion", "choices": [choice]})
    return ctx, raw, choice["message"]


async def _time(flavour: str, turns: int) -> dict:
    samples = []
    for _ in range(turns):
        ctx, raw, message = _turn(flavour)
        t0 = time.perf_counter()
        await hitl_stage.after_answer(None, ctx, raw, message)
        hitl_stage.record(ctx.agent)
        samples.append((time.perf_counter() - t0) * 1000)
        assert ctx.agent.escalation_id is None
    samples.sort()
    return {
        "turns": turns,
        "p50_ms": round(statistics.median(samples), 4),
        "p90_ms": round(samples[int(len(samples) * 0.9)], 4),
        "p99_ms": round(samples[int(len(samples) * 0.99)], 4),
        "mean_ms": round(statistics.fmean(samples), 4),
        "score": ctx.agent.confidence.score,
        "reasons": ctx.agent.confidence.reasons,
    }


async def _held_check(url: str, rounds: int) -> dict:
    """p50 of a memory-window read alone vs. with the held check's GET beside it."""
    import redis.asyncio as aioredis

    from core.fastredis import PipelinedRedis
    from runtime.hitl.held import Holds

    memory, fast = PipelinedRedis(url), PipelinedRedis(url)
    client = aioredis.from_url(url)
    holds = Holds(client, fast)
    window = "bench:hitl:window"
    await client.delete(window)
    await client.rpush(
        window, *[orjson.dumps({"s": i, "t": 20, "m": {"role": "user", "content": ANSWER}}) for i in range(40)]
    )
    alone, both = [], []
    for i in range(rounds * 2):
        t0 = time.perf_counter()
        if i % 2:
            check = asyncio.ensure_future(holds.get("t", "agt_bench", "c-1"))
            await memory.execute("LRANGE", window, -60, -1)
            assert await check is None
            both.append((time.perf_counter() - t0) * 1000)
        else:
            await memory.execute("LRANGE", window, -60, -1)
            alone.append((time.perf_counter() - t0) * 1000)
    await client.delete(window)
    await client.aclose()
    await memory.close()
    await fast.close()
    p50a, p50b = statistics.median(alone), statistics.median(both)
    return {
        "rounds": rounds,
        "memory_read_p50_ms": round(p50a, 4),
        "memory_read_with_held_check_p50_ms": round(p50b, 4),
        "added_p50_ms": round(p50b - p50a, 4),
    }


def _redis_url(tmp: Path) -> tuple[str, object]:
    from gateway.embedded import EmbeddedServices

    services = EmbeddedServices(tmp).start(postgres=False)
    return services.redis_url, services


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=20000)
    parser.add_argument("--redis-rounds", type=int, default=5000)
    args = parser.parse_args(argv)
    out = {
        "what": "added time of the confidence step per agent turn (gateway.hitl_stage.after_answer), no judge",
        "target": "p50 <= 0.5 ms",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "results": {f: asyncio.run(_time(f, args.turns)) for f in ("plain", "grounded", "logprobs")},
    }
    if args.redis_rounds:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="bench-hitl-") as tmp:
            url, services = _redis_url(Path(tmp))
            try:
                out["held_check"] = asyncio.run(_held_check(url, args.redis_rounds))
            finally:
                services.stop()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    for flavour, r in out["results"].items():
        print(f"{flavour:9s} p50 {r['p50_ms']:.4f} ms  p90 {r['p90_ms']:.4f} ms  p99 {r['p99_ms']:.4f} ms")
    if "held_check" in out:
        h = out["held_check"]
        print(
            f"held check: memory read p50 {h['memory_read_p50_ms']:.4f} ms, with the check beside it "
            f"{h['memory_read_with_held_check_p50_ms']:.4f} ms (added {h['added_p50_ms']:.4f} ms)"
        )


if __name__ == "__main__":
    main()
