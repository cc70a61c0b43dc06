"""``make bench ARGS=--peers``: the gateway beside LiteLLM's proxy and Portkey's gateway.

Same machine, same mock provider, same load: every server (ours and the peers) is pinned to
core 0, the mock and wrk to core 1, and they take turns in alternating rounds. The peers are
installed on first use from pinned files: LiteLLM's proxy into its own venv
(loadtest/peers/requirements-litellm.txt → loadtest/.peers/litellm), Portkey's gateway with
``npm ci`` (loadtest/peers/package*.json → loadtest/.peers/portkey). A peer that cannot be
installed or started is reported with the reason, and the rest still runs.

Each peer runs as it ships, with its defaults and no database: LiteLLM with a master key and no
virtual keys or spend tracking (those need its PostgreSQL), Portkey's open-source gateway (no keys, no
budgets). The gateway is measured twice: with its full policy path (key auth, rate limit,
budget, audit ledger) and with policies off, which is the closest to what the peers do.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

from loadtest import profiling

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "loadtest" / "peers"
INSTALL = ROOT / "loadtest" / ".peers"
LITELLM_KEY = "sk-litellm-bench-7f3a9c2e5b1d4f60"
CHAT = {"model": "bench", "messages": [{"role": "user", "content": "Say hello to the benchmark, politely."}]}


def _install_litellm() -> Path:
    venv = INSTALL / "litellm"
    stamp = venv / ".installed"
    req = PEERS / "requirements-litellm.txt"
    if not stamp.exists() or stamp.stat().st_mtime < req.stat().st_mtime:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", "-r", str(req)],
            check=True,
            capture_output=True,
        )
        stamp.touch()
    return venv / "bin" / "litellm"


def _install_portkey() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "nodejs", "npm"],
            check=True,
            capture_output=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    target = INSTALL / "portkey"
    target.mkdir(parents=True, exist_ok=True)
    script = target / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
    lock = PEERS / "package-lock.json"
    stamp = target / ".installed"
    if not script.exists() or not stamp.exists() or stamp.stat().st_mtime < lock.stat().st_mtime:
        for name in ("package.json", "package-lock.json"):
            shutil.copy(PEERS / name, target / name)
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=target, check=True, capture_output=True)
        stamp.touch()
    return script


def _wait_port(url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not come up within {timeout:.0f} s")


def _script(tmp: Path, name: str, body: dict, headers: dict[str, str]) -> Path:
    path = tmp / f"wrk-peer-{name}.lua"
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(json.dumps(body))}"]
    lines += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _start_litellm(stack, tmp: Path) -> tuple[str, subprocess.Popen]:
    from loadtest.bench import _free_port

    exe = _install_litellm()
    cfg = tmp / "litellm.yaml"
    cfg.write_text(
        json.dumps(
            {
                "model_list": [
                    {
                        "model_name": "bench",
                        "litellm_params": {
                            "model": "openai/mock-gpt",
                            "api_base": f"{stack.mock_url}/v1",
                            "api_key": "bench-key",
                        },
                    }
                ],
                "litellm_settings": {"drop_params": True, "telemetry": False},
            }
        )
    )
    port = _free_port()
    # Its proxy refuses to start without a master key; with no database that key is the one
    # credential it checks (no virtual keys, budgets or spend logs: those need its PostgreSQL).
    env = {
        **os.environ,
        "LITELLM_MASTER_KEY": LITELLM_KEY,
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "NO_DOCS": "True",
    }
    env.pop("DATABASE_URL", None)
    proc = stack._spawn(
        ["taskset", "-c", "0", str(exe), "--config", str(cfg), "--port", str(port), "--num_workers", "1"],
        "litellm",
        env,
    )
    url = f"http://127.0.0.1:{port}"
    _wait_port(f"{url}/health/liveliness", 180)
    return url, proc


def _start_portkey(stack, tmp: Path) -> tuple[str, subprocess.Popen]:
    from loadtest.bench import _free_port

    script = _install_portkey()
    port = _free_port()
    proc = stack._spawn(
        ["taskset", "-c", "0", "node", str(script), f"--port={port}", "--headless"],
        "portkey",
        {**os.environ, "NODE_ENV": "production"},
    )
    url = f"http://127.0.0.1:{port}"
    _wait_port(f"{url}/", 60)
    return url, proc


def run(args, Stack, bench_config, wrk, latency_at_rate, admin_key) -> dict:
    from loadtest.bench import _ensure_tools, _uptime

    _ensure_tools()
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-peers-"))
    stack = Stack(tmp, args.chunks)
    res: dict = {"servers": {}, "rounds": [], "failed": {}, "load_before": _uptime()}
    try:
        url, proc = stack.gateway("gateway", bench_config(stack.mock_url))
        key = admin_key(url, {"name": "bench-policies", "rpm": 10**9, "budget_usd": 10**6})
        off_url, off_proc = stack.gateway("gateway-off", bench_config(stack.mock_url, policies=False))
        auth = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        servers = {
            "gateway (full policy path)": (f"{url}/v1/chat/completions", proc.pid, auth),
            "gateway (policies off)": (f"{off_url}/v1/chat/completions", off_proc.pid, auth),
        }
        plain = {"Content-Type": "application/json", "Authorization": "Bearer bench-key"}
        for name, start, headers in (
            ("LiteLLM proxy 1.106.2", _start_litellm, {**plain, "Authorization": f"Bearer {LITELLM_KEY}"}),
            (
                "Portkey gateway 1.15.2",
                _start_portkey,
                {**plain, "x-portkey-provider": "openai", "x-portkey-custom-host": f"{stack.mock_url}/v1"},
            ),
        ):
            try:
                purl, pproc = start(stack, tmp)
                servers[name] = (f"{purl}/v1/chat/completions", pproc.pid, headers)
            except Exception as exc:  # reported, not fatal: the others still run
                log = tmp / ("litellm.log" if "LiteLLM" in name else "portkey.log")
                tail = log.read_text(errors="replace")[-600:] if log.exists() else ""
                res["failed"][name] = f"{type(exc).__name__}: {exc} {tail}".strip()
                print(f"{name}: could not run: {res['failed'][name]}", flush=True)
        scripts = {}
        for name, (target, _pid, headers) in servers.items():
            for mode, body in (("plain", CHAT), ("stream", {**CHAT, "stream": True})):
                script = scripts[(name, mode)] = _script(tmp, f"{len(scripts)}", body, headers)
                check = wrk(target, script, 3, 4)  # warm-up, and a check that it answers 200
                if check["non_2xx"]:
                    res["failed"].setdefault(name, f"{mode}: {check['non_2xx']} non-2xx answers in the warm-up")
        for i in range(args.rounds):
            rr: dict = {}
            for name, (target, pid, _) in servers.items():
                for mode in ("plain", "stream"):
                    before = profiling.tree_ticks(pid)
                    r = wrk(target, scripts[(name, mode)], max(1, args.seconds // 2), args.connections)
                    ticks = profiling.tree_ticks(pid) - before
                    rr[f"{name}|{mode}"] = {
                        "rps": r["rps"],
                        "p50_ms": r["p50_ms"],
                        "non_2xx": r["non_2xx"],
                        "cpu_us": round(ticks * profiling.TICK_US / r["requests"], 1) if r["requests"] else None,
                    }
            res["rounds"].append(rr)
            print(f"peers round {i + 1}: " + ", ".join(f"{k} {v['rps']:.0f}" for k, v in rr.items()), flush=True)
        targets = []
        for name, (target, _, headers) in servers.items():
            bearer = headers["Authorization"].removeprefix("Bearer ")
            if "Portkey" not in name:  # the probe sends only the key; Portkey needs its headers
                targets.append((name, target, bearer))
        res["latency"] = latency_at_rate(targets, CHAT, args.seconds * 2, 100) if targets else {}
        res["servers"] = {name: {"url": target} for name, (target, _, _) in servers.items()}
    finally:
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)
    res["date"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    res["load_after"] = _uptime()
    res["seconds"] = max(1, args.seconds // 2)
    res["connections"] = args.connections
    return res


def _median(values: list[float]) -> float:
    values = sorted(v for v in values if v is not None)
    return values[len(values) // 2] if values else float("nan")


def report(res: dict) -> str:
    rounds = res["rounds"]
    names = list(res["servers"])
    ours = "gateway (full policy path)"
    lines = [
        f"# Peers benchmark ({res['date']})",
        "",
        f"`make bench ARGS=--peers`: each server pinned to core 0 (taskset), the mock provider and wrk on core 1; "
        f"wrk -c {res['connections']} for {res['seconds']} s per server and mode, {len(rounds)} alternating rounds "
        f"(medians below). Non-streaming and streaming (8 content chunks). CPU µs/request: utime + stime of the "
        f"server's processes from /proc over its run. Load average before {res['load_before']}, after "
        f"{res['load_after']} (a shared 2-core machine: read the ratios).",
        "",
        "| server | req/s | CPU µs/req | non-2xx | stream req/s | stream CPU µs/req | stream non-2xx "
        "| gateway's throughput ÷ theirs | their CPU/req ÷ gateway's |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def med(name: str, mode: str, field: str) -> float:
        return _median([rr[f"{name}|{mode}"][field] for rr in rounds if f"{name}|{mode}" in rr])

    def ratio(a: str, b: str, mode: str, field: str) -> float:
        return _median(
            [rr[f"{a}|{mode}"][field] / rr[f"{b}|{mode}"][field] for rr in rounds if rr[f"{b}|{mode}"][field]]
        )

    def errors(name: str, mode: str) -> int:
        return sum(rr[f"{name}|{mode}"]["non_2xx"] for rr in rounds if f"{name}|{mode}" in rr)

    for name in names:
        cells = []
        for mode in ("plain", "stream"):
            if errors(name, mode):  # a mode that fails is no figure to compare with
                cells.append("fails")
            else:
                cells.append(f"{ratio(ours, name, mode, 'rps'):.2f}× / {ratio(name, ours, mode, 'cpu_us'):.2f}×")
        lines.append(
            f"| {name} | {med(name, 'plain', 'rps'):.0f} | {med(name, 'plain', 'cpu_us'):.0f} "
            f"| {errors(name, 'plain')} | {med(name, 'stream', 'rps'):.0f} | {med(name, 'stream', 'cpu_us'):.0f} "
            f"| {errors(name, 'stream')} | {cells[0].split(' / ')[0]} (stream {cells[1].split(' / ')[0]}) "
            f"| {cells[0].split(' / ')[-1]} (stream {cells[1].split(' / ')[-1]}) |"
        )
    lines += [
        "",
        "A server whose answers in a mode are not 2xx (`fails`) is not compared in that mode; its req/s "
        "there counts error answers.",
        "",
    ]
    lat = res.get("latency") or {}
    if lat:
        lines += [
            "Latency at a fixed 100 req/s (one keep-alive connection per target, alternating):",
            "",
            "| server | p50 ms | p90 ms | p99 ms |",
            "|---|---:|---:|---:|",
        ]
        lines += [f"| {n} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | {r['p99_ms']:.3f} |" for n, r in lat.items()]
        lines.append("")
    for name, why in res.get("failed", {}).items():
        lines.append(f"- **{name}** failed in part: {why}")
    if any("Portkey" in n for n in res.get("failed", {})):
        lines.append(
            "  Portkey's streamed answers fail here: its gateway appends headers to the `Response` that Node's "
            "built-in fetch returned, whose headers are immutable (`TypeError: immutable` in `updateHeaders`, "
            "Node 20), and answers 500 `Something went wrong`; its non-streamed answers work and are measured. "
            "Not in the latency probe: it needs its provider headers, which the probe does not send."
        )
    return "\n".join(lines) + "\n"
