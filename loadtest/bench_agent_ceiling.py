"""What an agent turn would cost without its parts (``make bench ARGS="--only agent-ceiling"``).

Issue #12's goal is an agent turn with memory at ≥ 0.7× the plain proxy's throughput: a
CPU-bound worker may then spend at most 1/0.7 ≈ 1.43× a plain request's work on the turn. This
bench asks how close the turn could come if parts of it cost nothing. The same gateway (one
worker on core 0, policies on; the stores, the mock provider and the load generator on core 1)
is started once as shipped and once per set of what-if stubs (loadtest/ceiling/sitecustomize.py:
memory's background writer; memory; memory with a fixed 40-message history still sent; memory
plus the run record and the confidence score), each time under callgrind
(loadtest/instructions.py: instructions per request, idle work taken off; a few % apart between
identical runs where CPU time on this machine is ±25 %), for three kinds: the plain request,
the agent turn with memory (16 conversations, each one's turns in order, windows full) and the
agent turn without a conversation id.

The stubs are a measurement, not a product option: they never ship in the gateway.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path

from loadtest import bench_agents as ba
from loadtest.instructions import CountedGateway, ensure_valgrind

CEILING = Path(__file__).resolve().parent / "ceiling"
VARIANTS = (
    ("as shipped", ""),
    ("memory's writer to PostgreSQL costs nothing", "memory-writer"),
    ("memory costs nothing", "memory"),
    ("memory costs nothing, its 40 messages still sent", "memory,history"),
    ("memory, run record and confidence score cost nothing", "memory,runs"),
)
KINDS = ("plain", "agent, conversations in order", "agent, no conversation")
GOAL = 1 / 0.7


def _bodies(tmp: Path) -> dict[str, Path]:
    plain = {"model": "bench", "messages": [{"role": "user", "content": ba.USER}]}
    agent = {
        "model": f"agent:{ba.AGENT}",
        "messages": [{"role": "user", "content": ba.USER}],
        "variables": {"company": ba.COMPANY},
    }
    ordered = {**agent, "metadata": {"conversation_id": f"ceiling-{uuid.uuid4().hex[:8]}-{{w}}"}}
    out = {}
    for i, (kind, body) in enumerate(zip(KINDS, (plain, ordered, agent), strict=True)):
        path = tmp / f"ceiling-{i}-{uuid.uuid4().hex[:6]}.json"
        path.write_text(json.dumps(body))
        out[kind] = path
    return out


def run_variant(stack, tmp: Path, name: str, stubs: str, n: int, bench_config) -> dict:
    env = {**stack.env, "PYTHONPATH": str(CEILING), "GW_BENCH_STUB": stubs}
    gw = CountedGateway(stack, stubs.replace(",", "-") or "shipped", bench_config(stack.mock_url), env)
    try:
        status, _, _ = ba._call(f"{gw.url}/admin/agents/{ba.AGENT}", None, ba.MASTER, "GET")
        if status == 404:  # (the first gateway creates it; the others share the database)
            agent = {"name": ba.AGENT, "model": "bench", "template": ba.TEMPLATE, "variables": ba.VARIABLES}
            ba._create_agent(gw.url, agent)
        files = _bodies(tmp)
        chat = f"{gw.url}/v1/chat/completions"
        for kind in KINDS:  # warm-up, not counted: > 20 turns in each of the 16 conversations
            ba.send_n(chat, stack.key, files[kind], 400 if kind == KINDS[1] else 200, 16)
        gw.instrument()
        counted = {kind: gw.count(stack.key, files[kind], n) for kind in KINDS}
    finally:
        gw.stop()
    failed = {k: v["errors"] for k, v in counted.items() if v["errors"]}
    if failed:  # (a stub that no longer fits what it replaces answers 500s: its count means nothing)
        raise RuntimeError(f"{name}: non-200 answers {failed}; see the gateway's log in {stack.tmp}")
    plain = counted["plain"]["instructions_per_request"]
    return {
        "name": name,
        "stubs": stubs,
        "counted": counted,
        "vs_plain": {k: round(v["instructions_per_request"] / plain, 2) for k, v in counted.items()},
        "errors": sum(v["errors"] for v in counted.values()),
        "idle_per_s": round(gw.idle_per_s),
    }


def run(stack, tmp: Path, n: int, bench_config, variants=VARIANTS) -> dict:
    res: dict = {"meta": {"requests": n}}
    res["variants"] = [run_variant(stack, tmp, name, stubs, n, bench_config) for name, stubs in variants]
    return res


def report(res: dict) -> list[str]:
    n = res["meta"]["requests"]
    lines = [
        f"# Agent turn ceiling ({res['date']})",
        "",
        f'`make bench ARGS="--only agent-ceiling"`: instructions the gateway executes per request '
        f"(callgrind, {n} requests per kind after a warm-up, 16 concurrent; background writers included, the idle "
        "process's own work taken off) with parts of "
        "an agent turn replaced by nothing (loadtest/ceiling/sitecustomize.py; a measurement, not a product option). "
        f"The goal (≥ 0.7× the plain throughput) allows ≤ {GOAL:.2f}× the plain request's work.",
        "",
        "| gateway | plain | agent, conversations in order | × plain | agent, no conversation | × plain | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for v in res["variants"]:
        c, r = v["counted"], v["vs_plain"]
        ir = [f"{c[k]['instructions_per_request'] / 1e6:.2f} M" for k in KINDS]
        lines.append(
            f"| {v['name']} | {ir[0]} | {ir[1]} | {r[KINDS[1]]:.2f}× | {ir[2]} | {r[KINDS[2]]:.2f}× | {v['errors']} |"
        )
    lines.append("")
    return lines


def main() -> None:
    import argparse

    from loadtest import bench

    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_agent_ceiling")
    parser.add_argument("--requests", type=int, default=600, help="requests counted per kind")
    parser.add_argument(
        "--shipped-only",
        action="store_true",
        help="the gateway as shipped only (to compare two checkouts' counts; results not written)",
    )
    args = parser.parse_args()
    bench._ensure_tools()
    ensure_valgrind()
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-ceiling-"))
    stack = bench.Stack(tmp, 8)
    try:
        res = run(stack, tmp, args.requests, bench.bench_config, VARIANTS[:1] if args.shipped_only else VARIANTS)
    finally:
        stack.close()
    shutil.rmtree(tmp, ignore_errors=True)  # (kept when it failed: the gateways' logs)
    res["date"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join(report(res))
    if args.shipped_only:
        print(text)
        return
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    (bench.RESULTS / "bench-agent-ceiling-latest.md").write_text(text)
    (bench.RESULTS / "bench-agent-ceiling-latest.json").write_text(json.dumps(res, indent=2))
    print(text)


if __name__ == "__main__":
    main()
