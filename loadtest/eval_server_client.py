"""The server and upstream-client evaluation behind the gateway's choices (issue #16).

One run, same machine, same mock provider, alternating rounds, every server pinned to core 0:

- ASGI server: the gateway under uvicorn (httptools + uvloop, what ``gateway serve`` runs)
  and under Granian (Rust, ``--interface asgi --loop uvloop``), both with the h1 client;
- upstream HTTP client: the gateway with core/h1.py (the default) and with aiohttp
  (``GATEWAY_UPSTREAM_CLIENT=aiohttp``), and the bare relay with aiohttp, httpx and httpcore.

Granian is not in the gateway's lock (it was not adopted): it is installed for this run only,
pinned, into loadtest/.peers/granian. Results: loadtest/results/eval-server-client.md.

    .venv/bin/python -m loadtest.eval_server_client [--seconds 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from loadtest.bench import (
    CHAT,
    RESULTS,
    ROOT,
    Stack,
    _admin_key,
    _ensure_tools,
    _free_port,
    _median,
    _uptime,
    _wait,
    _wrk_script,
    bench_config,
    wrk,
)

GRANIAN = "granian==2.8.7"
GRANIAN_DIR = ROOT / "loadtest" / ".peers" / "granian"


def _granian(stack: Stack, cfg_url_env: dict, tmp: Path) -> tuple[str, subprocess.Popen]:
    if not (GRANIAN_DIR / "granian").exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--target", str(GRANIAN_DIR), GRANIAN],
            check=True,
            capture_output=True,
        )
    port = _free_port()
    env = {**cfg_url_env, "PYTHONPATH": str(GRANIAN_DIR)}
    args = [
        "taskset",
        "-c",
        "0",
        sys.executable,
        "-m",
        "granian",
        "--interface",
        "asgi",
        "--factory",
        "--loop",
        "uvloop",
        "--http",
        "1",
        "--no-ws",
        "--workers",
        "1",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "gateway.app:create_app",
    ]
    proc = stack._spawn(args, "granian", env)
    url = f"http://127.0.0.1:{port}"
    _wait(f"{url}/readyz")
    return url, proc


def run(seconds: int, rounds: int) -> dict:
    _ensure_tools()
    tmp = Path(tempfile.mkdtemp(prefix="gw-eval-"))
    stack = Stack(tmp, 8)
    res: dict = {"rounds": [], "load_before": _uptime()}
    try:
        cfg = bench_config(stack.mock_url)
        url, proc = stack.gateway("gateway-h1", cfg)
        key = _admin_key(url, {"name": "bench-policies", "rpm": 10**9, "budget_usd": 10**6})
        os.environ["GATEWAY_UPSTREAM_CLIENT"] = "aiohttp"
        stack.env["GATEWAY_UPSTREAM_CLIENT"] = "aiohttp"
        aio_url, aio_proc = stack.gateway("gateway-aiohttp", cfg)
        del os.environ["GATEWAY_UPSTREAM_CLIENT"]
        del stack.env["GATEWAY_UPSTREAM_CLIENT"]
        gran_env = {**stack.env, "GATEWAY_CONFIG": str(tmp / "gateway-h1.yaml"), "GATEWAY_LOG_LEVEL": "WARNING"}
        try:
            gran_url, gran_proc = _granian(stack, gran_env, tmp)
        except Exception as exc:
            res["granian_failed"] = f"{type(exc).__name__}: {exc}"
            gran_url = gran_proc = None
        relays = {c: stack.bare_relay(c) for c in ("aiohttp", "httpx", "httpcore")}
        via = _wrk_script(tmp, CHAT, key)
        stream = _wrk_script(tmp, {**CHAT, "stream": True}, key)
        direct = _wrk_script(tmp, CHAT, "bench-key")
        direct_stream = _wrk_script(tmp, {**CHAT, "stream": True}, "bench-key")
        chat = "/v1/chat/completions"
        targets = {
            "gateway, uvicorn, h1 client": (url, proc, via, stream),
            "gateway, uvicorn, aiohttp client": (aio_url, aio_proc, via, stream),
        }
        if gran_url is not None:
            targets["gateway, Granian, h1 client"] = (gran_url, gran_proc, via, stream)
        for client, (rurl, rproc) in relays.items():
            targets[f"bare relay, {client}"] = (rurl, rproc, direct, direct_stream)
        for turl, _, s1, s2 in targets.values():  # warm-up
            wrk(f"{turl}{chat}", s1, 1, 64)
            wrk(f"{turl}{chat}", s2, 1, 64)
        for i in range(rounds):
            rr = {}
            for name, (turl, tproc, s1, s2) in targets.items():
                for mode, script in (("plain", s1), ("stream", s2)):
                    r = wrk(f"{turl}{chat}", script, seconds, 64, tproc.pid)
                    rr[f"{name}|{mode}"] = {"rps": r["rps"], "cpu_us": r["cpu_us"], "non_2xx": r["non_2xx"]}
            res["rounds"].append(rr)
            print(f"round {i + 1}: " + ", ".join(f"{k} {v['rps']:.0f}/{v['cpu_us']}" for k, v in rr.items()))
        res["targets"] = list(targets)
    finally:
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)
    res["date"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    res["load_after"] = _uptime()
    res["seconds"] = seconds
    return res


def report(res: dict) -> str:
    rounds = res["rounds"]
    lines = [
        f"# ASGI server and upstream HTTP client evaluation ({res['date']})",
        "",
        "`.venv/bin/python -m loadtest.eval_server_client`: every server pinned to core 0, mock and wrk on core 1, "
        f"wrk -c 64 for {res['seconds']} s per target and mode, {len(rounds)} alternating rounds (medians). The "
        "gateway runs its full policy path (key auth, rate limit, budget, audit ledger). CPU µs/request: utime + "
        f"stime of the server process over its run. Load average before {res['load_before']}, after "
        f"{res['load_after']} (a shared 2-core machine: read the ratios and the CPU figures).",
        "",
        "| target | req/s | CPU µs/req | stream req/s | stream CPU µs/req | non-2xx |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in res["targets"]:
        cells = []
        for mode in ("plain", "stream"):
            for field in ("rps", "cpu_us"):
                cells.append(f"{_median([rr[f'{name}|{mode}'][field] for rr in rounds]):.0f}")
        errors = sum(rr[f"{name}|{m}"]["non_2xx"] for rr in rounds for m in ("plain", "stream"))
        lines.append(f"| {name} | {' | '.join(cells)} | {errors} |")

    def cpu(name: str, mode: str) -> float:
        return _median([rr[f"{name}|{mode}"]["cpu_us"] for rr in rounds])

    uv, aio, gr = "gateway, uvicorn, h1 client", "gateway, uvicorn, aiohttp client", "gateway, Granian, h1 client"
    lines += [
        "",
        "Decisions (CPU per request is the steady figure here; req/s swings with the machine's load):",
        "",
        f"- **Upstream client: core/h1.py, adopted.** The gateway spends {cpu(uv, 'plain'):.0f} µs per request "
        f"with it against {cpu(aio, 'plain'):.0f} µs with aiohttp ({cpu(uv, 'plain') / cpu(aio, 'plain'):.2f}×), "
        f"streaming {cpu(uv, 'stream'):.0f} against {cpu(aio, 'stream'):.0f} µs "
        f"({cpu(uv, 'stream') / cpu(aio, 'stream'):.2f}×); the HTTP-surface, SDK, upstream-fault, routing, "
        "agent and security test files pass with it "
        "(GATEWAY_UPSTREAM_CLIENT=aiohttp keeps the old client). httpx and httpcore cost several times "
        "aiohttp's CPU in the bare relay and were not tried in the gateway.",
    ]
    if gr in res["targets"]:
        lines.append(
            f"- **ASGI server: uvicorn kept, Granian a candidate.** Granian runs the gateway unchanged at "
            f"{cpu(gr, 'plain'):.0f} µs per request against uvicorn's {cpu(uv, 'plain'):.0f} "
            f"({cpu(gr, 'plain') / cpu(uv, 'plain'):.2f}×; streaming {cpu(gr, 'stream') / cpu(uv, 'stream'):.2f}×). "
            "Not adopted in this change: `gateway serve` would need its worker management, SIGTERM drain, "
            "Prometheus multiprocess directory and the streaming tests (first byte, cancellation, "
            "back-pressure) re-verified under it, and the gain is a few percent of CPU."
        )
    if res.get("granian_failed"):
        lines += ["", f"Granian could not run the gateway: {res['granian_failed']}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    res = run(a.seconds, a.rounds)
    text = report(res)
    (RESULTS / "eval-server-client.md").write_text(text)
    (RESULTS / "eval-server-client.json").write_text(json.dumps(res, indent=2))
    print(text)


if __name__ == "__main__":
    main()
