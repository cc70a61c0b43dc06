"""``make bench``: throughput, CPU and added latency of the gateway against a bare relay.

Runs, in one go and on this machine: the mock provider alone, a bare Starlette + aiohttp relay
(the least a Python relay can do; it also relays streams, as the bare streaming relay), the
gateway with its full policy path (key auth, rate limit, budget reservation and settlement,
audit ledger, access log, metrics) and with policies off, non-streaming and streaming; each
driven by wrk at concurrency 64, with the CPU time each server process spent per request (from
/proc). Then alternating rounds of relay and gateway (the ratios the hot path is judged by, as
medians), a fixed 100 req/s load (loadtest/latency_probe.py) for the latency the gateway adds
over the relay, py-spy summaries of the hottest frames (gateway plain and streaming, relay),
and an RSS leak check (every worker's RSS after N and after 10 N requests). The gateway and
the relay are pinned to core 0 (taskset), the mock provider, the load generators, PostgreSQL
and Valkey to core 1, so that each server's figures are its own.

``--peers`` adds LiteLLM's proxy and Portkey's gateway (loadtest/bench_peers.py).

Results go to loadtest/results/bench-latest.md (and .json); quote ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

from loadtest import bench_agents, bench_channels, bench_peers, bench_pii, bench_vapi, profiling

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "loadtest" / "results"
CHAT = {"model": "bench", "messages": [{"role": "user", "content": "Say hello to the benchmark, politely."}]}


def _ensure_tools() -> None:
    missing = [t for t in ("wrk", "taskset") if shutil.which(t) is None]
    if missing:
        print(f"installing {' '.join(missing)} from Debian packages ...", flush=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", *missing],
            check=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            stdout=subprocess.DEVNULL,
        )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} not ready")


def _admin_key(url: str, body: dict) -> str:
    req = urllib.request.Request(
        f"{url}/admin/keys",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": "Bearer sk-master-bench", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())["key"]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _wrk_script(tmp: Path, body: dict, key: str | None) -> Path:
    headers = 'wrk.headers["Content-Type"] = "application/json"\n'
    if key:
        headers += f'wrk.headers["Authorization"] = "Bearer {key}"\n'
    path = tmp / f"wrk-{abs(hash((json.dumps(body), key)))}.lua"
    path.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(json.dumps(body))}\n{headers}')
    return path


def _ms(value: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", value)
    number, unit = float(m.group(1)), m.group(2)
    return number / 1000 if unit == "us" else number * 1000 if unit == "s" else number


def wrk(url: str, script: Path, seconds: int, conns: int, pid: int | None = None, threads: int = 2) -> dict:
    """wrk from core 1; with ``pid``, also the CPU time that server process (and its children)
    spent per request (utime + stime from /proc over the run, divided by the requests wrk
    completed). ``threads == conns``: one connection per wrk thread."""
    before = profiling.tree_ticks(pid) if pid else 0
    out = subprocess.run(
        [
            "taskset",
            "-c",
            "1",
            "wrk",
            "-t",
            str(threads),
            "-c",
            str(conns),
            "-d",
            f"{seconds}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    after = profiling.tree_ticks(pid) if pid else 0
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": rps,
        "p50_ms": p50,
        "p99_ms": p99,
        "requests": requests,
        "cpu_us": round((after - before) * profiling.TICK_US / requests, 1) if pid and requests else None,
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else "",
    }


def latency_at_rate(targets: list[tuple[str, ...]], body: dict, seconds: int, rate: int) -> dict:
    """p50/p99 per target at a fixed total rate, requests alternating between the targets.
    A target is (name, url, key) or (name, url, key, body file)."""
    cmd = [
        "taskset",
        "-c",
        "1",
        sys.executable,
        "-m",
        "loadtest.latency_probe",
        "--body",
        json.dumps(body),
        "--rate",
        str(rate),
        "--seconds",
        str(seconds),
    ]
    for target in targets:
        cmd += ["--target", "=".join(target)]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout)


class Stack:
    """Embedded stores, the mock provider on core 1, one gateway worker on core 0."""

    def __init__(self, tmp: Path, chunks: int, stores_core: str = "1") -> None:
        from gateway.embedded import EmbeddedServices

        self.tmp = tmp
        self.services = EmbeddedServices(tmp / "data").start()
        # PostgreSQL and Valkey stand for servers of their own: keep them off the gateway's core.
        # (Backends PostgreSQL forks later inherit the postmaster's affinity.)
        for pidfile in (tmp / "data" / "valkey" / "valkey.pid", tmp / "data" / "pg" / "postmaster.pid"):
            pid = pidfile.read_text().split()[0]
            subprocess.run(["taskset", "-a", "-p", "-c", stores_core, pid], check=True, stdout=subprocess.DEVNULL)
        self.procs: list[subprocess.Popen] = []
        self.mock_port = _free_port()
        self.mock_url = f"http://127.0.0.1:{self.mock_port}"
        self._spawn(
            [
                "taskset",
                "-c",
                "1",
                sys.executable,
                "-m",
                "loadtest.mock_provider",
                "--port",
                str(self.mock_port),
                "--no-record",
                "--chunks",
                str(chunks),
            ],
            "mock",
        )
        _wait(f"{self.mock_url}/health")
        self.env = {
            **os.environ,
            "DATABASE_URL": self.services.database_url,
            "REDIS_URL": self.services.redis_url,
            "GATEWAY_MASTER_KEY": "sk-master-bench",
            "GATEWAY_DATA_DIR": str(tmp / "data"),
        }
        self.key = subprocess.run(
            [sys.executable, "-m", "gateway", "keys", "create", "--name", "bench"],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()[0]

    def _spawn(self, args: list[str], name: str, env: dict | None = None) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "wb")
        proc = subprocess.Popen(args, stdout=log, stderr=log, env=env or os.environ, cwd=ROOT)
        self.procs.append(proc)
        return proc

    def gateway(self, name: str, config: dict, workers: int = 1, cores: str = "0") -> tuple[str, subprocess.Popen]:
        import yaml

        port = _free_port()
        cfg = self.tmp / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(config))
        cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--port", str(port)]
        proc = self._spawn(["taskset", "-c", cores, *cmd, "--workers", str(workers)], name, self.env)
        url = f"http://127.0.0.1:{port}"
        _wait(f"{url}/readyz")
        return url, proc

    def bare_relay(self, client: str = "aiohttp") -> tuple[str, subprocess.Popen]:
        port = _free_port()
        proc = self._spawn(
            [
                "taskset",
                "-c",
                "0",
                sys.executable,
                "-m",
                "loadtest.bare_relay",
                "--port",
                str(port),
                "--upstream",
                f"{self.mock_url}/v1",
                "--client",
                client,
            ],
            f"bare-relay-{client}",
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{url}/", timeout=1)
            except urllib.error.HTTPError:
                return url, proc  # it answers (404 on /): up
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("bare relay did not start")

    def stop_gateway(self, proc: subprocess.Popen) -> None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            spy = shutil.which("py-spy") or str(ROOT / ".venv" / "bin" / "py-spy")
            dump = (
                subprocess.run([spy, "dump", "--pid", str(proc.pid)], capture_output=True, text=True).stdout
                if Path(spy).exists()
                else "(install py-spy for a stack dump)"
            )
            print("gateway did not stop within 30 s of SIGTERM:\n" + dump, flush=True)
            proc.kill()
            proc.wait()

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
        self.services.stop()


def bench_config(mock_url: str, policies: bool = True) -> dict:
    """``bench``: one deployment; ``bench10``: ten deployments (weighted routing over them)."""
    price = {"input_cost_per_token": 1.5e-7, "output_cost_per_token": 6e-7}
    return {
        "policies": {"enabled": policies},
        "providers": [{"name": "mock", "kind": "openai", "base_url": f"{mock_url}/v1", "api_keys": ["bench-key"]}],
        "models": [
            {"name": "bench", "deployments": [{"provider": "mock", "model": "mock-gpt", **price}]},
            {
                "name": "bench10",
                "deployments": [{"provider": "mock", "model": f"mock-gpt-{i}", "weight": 1 + i % 3} for i in range(10)],
            },
        ],
    }


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def leak_check(stack: Stack, tmp: Path, n: int, workers: int, conns: int) -> dict:
    """RSS of every worker after ``n`` requests and after ``10 n`` (the policy path, one key)."""
    url, proc = stack.gateway("gateway-leak", bench_config(stack.mock_url), workers=workers, cores="0,1")
    key = _admin_key(url, {"name": "bench-leak", "rpm": 10**9, "budget_usd": 10**6})
    pids = [proc.pid]
    if workers > 1:  # uvicorn's worker processes (not multiprocessing's resource tracker)
        pids = [c for c in profiling.children(proc.pid) if b"resource_tracker" not in _cmdline(c)]
    target = f"{url}/v1/chat/completions"
    body = tmp / "leak-body.json"
    body.write_bytes(json.dumps(CHAT).encode())
    idle = {pid: profiling.rss_mb(pid) for pid in pids}
    errors = bench_agents.send_n(target, key, body, n, conns)["errors"]
    first = {pid: profiling.rss_mb(pid) for pid in pids}
    errors += bench_agents.send_n(target, key, body, 9 * n, conns)["errors"]
    tenth = {pid: profiling.rss_mb(pid) for pid in pids}
    stack.stop_gateway(proc)
    return {
        "n": n,
        "errors": errors,
        "workers": [
            {
                "idle_mb": round(idle[p], 1),
                "after_n_mb": round(first[p], 1),
                "after_10n_mb": round(tenth[p], 1),
                "growth_pct": round(100 * (tenth[p] - first[p]) / first[p], 1),
            }
            for p in pids
        ],
    }


def run_leak(args: argparse.Namespace) -> dict:
    """The RSS leak check alone (N and 10 N requests through the policy path)."""
    _ensure_tools()
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-leak-"))
    stack = Stack(tmp, args.chunks, args.stores_core)
    try:
        leak = leak_check(stack, tmp, args.leak_n, args.leak_workers, args.connections)
    finally:
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)
    leak["date"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    leak["load_after"] = _uptime()
    return leak


def leak_report(leak: dict) -> str:
    lines = [
        f"# RSS leak check ({leak['date']}): {len(leak['workers'])} workers, policy path, "
        f"N = {leak['n']:,} then 10 N = {10 * leak['n']:,} requests, {leak.get('errors', 0)} errors",
        "",
        f"`python -m loadtest.bench --only leak --leak-n {leak['n']}`; load average after: {leak['load_after']}.",
        "",
        "| worker | idle MB | after N MB | after 10 N MB | growth N → 10 N |",
        "|---|---:|---:|---:|---:|",
    ]
    for i, w in enumerate(leak["workers"], 1):
        lines.append(f"| {i} | {w['idle_mb']} | {w['after_n_mb']} | {w['after_10n_mb']} | {w['growth_pct']:+.1f} % |")
    return "\n".join(lines) + "\n"


def _uptime() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run(args: argparse.Namespace) -> dict:
    _ensure_tools()
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    stack = Stack(tmp, args.chunks, args.stores_core)
    results: dict = {"rows": [], "rounds": [], "latency": {}, "meta": {"load_before": _uptime()}}
    try:
        url, proc = stack.gateway("gateway", bench_config(stack.mock_url))
        time.sleep(1)
        results["meta"]["idle_rss_mb"] = round(_rss_mb(proc.pid), 1)
        # A key that exercises the whole policy path: a rate limit and a budget to check, the
        # budget reserved and settled, the audit record written, on every request.
        stack.key = _admin_key(url, {"name": "bench-policies", "rpm": 10**9, "budget_usd": 10**6})
        off_url, off_proc = stack.gateway("gateway-policies-off", bench_config(stack.mock_url, policies=False))
        direct = _wrk_script(tmp, CHAT, "bench-key")
        via = _wrk_script(tmp, CHAT, stack.key)
        stream = _wrk_script(tmp, {**CHAT, "stream": True}, stack.key)
        via10 = _wrk_script(tmp, {**CHAT, "model": "bench10"}, stack.key)
        direct_stream = _wrk_script(tmp, {**CHAT, "stream": True}, "bench-key")
        # Warm-up, then measure.
        wrk(f"{url}/v1/chat/completions", via, 2, args.connections)
        wrk(f"{url}/v1/chat/completions", stream, 1, args.connections)
        bare, bare_proc = stack.bare_relay()
        chat = "/v1/chat/completions"
        rows = [
            ("mock provider direct (baseline)", f"{stack.mock_url}{chat}", direct, None),
            ("bare Starlette + aiohttp relay", f"{bare}{chat}", direct, bare_proc.pid),
            ("gateway, non-streaming", f"{url}{chat}", via, proc.pid),
            ("gateway, routing over 10 deployments", f"{url}{chat}", via10, proc.pid),
            ("gateway, policies off (no limits, budgets, ledger)", f"{off_url}{chat}", via, off_proc.pid),
            ("mock provider direct, streaming", f"{stack.mock_url}{chat}", direct_stream, None),
            ("bare streaming relay", f"{bare}{chat}", direct_stream, bare_proc.pid),
            ("gateway, streaming", f"{url}{chat}", stream, proc.pid),
        ]
        for name, target, script, pid in rows:
            r = wrk(target, script, args.seconds, args.connections, pid)
            results["rows"].append({"scenario": name, **r})
            cpu = f"  cpu {r['cpu_us']:6.0f} us/req" if r["cpu_us"] else ""
            print(
                f"{name:52} {r['rps']:7.0f} req/s  p50 {r['p50_ms']:6.2f} ms  non-2xx {r['non_2xx']}{cpu}", flush=True
            )
        # The ratios the hot path is judged by, robust to a noisy machine: relay and gateway
        # alternate in short rounds, and the median of the rounds' ratios is reported.
        half = max(1, args.seconds // 2)
        for i in range(args.rounds):
            rr = {
                "relay": wrk(f"{bare}{chat}", direct, half, args.connections, bare_proc.pid),
                "gateway": wrk(f"{url}{chat}", via, half, args.connections, proc.pid),
                "off": wrk(f"{off_url}{chat}", via, half, args.connections, off_proc.pid),
                "relay_stream": wrk(f"{bare}{chat}", direct_stream, half, args.connections, bare_proc.pid),
                "gateway_stream": wrk(f"{url}{chat}", stream, half, args.connections, proc.pid),
            }
            rr = {k: {"rps": v["rps"], "cpu_us": v["cpu_us"], "non_2xx": v["non_2xx"]} for k, v in rr.items()}
            results["rounds"].append(rr)
            print(
                f"round {i + 1}: policy path {rr['gateway']['rps'] / rr['relay']['rps']:.3f}x relay, "
                f"policies off {rr['off']['rps'] / rr['relay']['rps']:.3f}x, "
                f"streaming {rr['gateway_stream']['rps'] / rr['relay_stream']['rps']:.3f}x; cpu us "
                f"{rr['gateway']['cpu_us']} vs {rr['relay']['cpu_us']}, stream "
                f"{rr['gateway_stream']['cpu_us']} vs {rr['relay_stream']['cpu_us']}",
                flush=True,
            )
        results["latency"] = latency_at_rate(
            [
                ("direct", f"{stack.mock_url}{chat}", "bench-key"),
                ("bare relay", f"{bare}{chat}", "bench-key"),
                ("gateway, policies off", f"{off_url}{chat}", stack.key),
                ("gateway", f"{url}{chat}", stack.key),
            ],
            CHAT,
            args.seconds * 2,
            100,
        )
        results["meta"]["loaded_rss_mb"] = round(_rss_mb(proc.pid), 1)
        if profiling.py_spy() is not None:
            prof = {}
            for name, script, spy_path in (
                ("non-streaming", via, "flame-gateway.txt"),
                ("streaming", stream, "flame-gateway-stream.txt"),
            ):
                prof[name] = profiling.profile(
                    proc.pid,
                    tmp,
                    name,
                    lambda s=script: wrk(f"{url}{chat}", s, 6, args.connections),
                    5,
                    keep=RESULTS / spy_path if args.stores_core == "1" else None,
                )
            prof["relay"] = profiling.profile(
                bare_proc.pid,
                tmp,
                "relay",
                lambda: wrk(f"{bare}{chat}", direct, 6, args.connections),
                5,
                keep=RESULTS / "flame-relay.txt" if args.stores_core == "1" else None,
            )
            results["profile"] = prof
        stack.stop_gateway(proc)
        stack.stop_gateway(off_proc)
        if args.leak_n:
            results["leak"] = leak_check(stack, tmp, args.leak_n, args.leak_workers, args.connections)
            print(f"leak check: {results['leak']}", flush=True)
    finally:
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)
    results["meta"].update(
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        load_after=_uptime(),
        cpus=os.cpu_count(),
        python=platform.python_version(),
        connections=args.connections,
        seconds=args.seconds,
        chunks=args.chunks,
        stores_core=args.stores_core,
    )
    return results


def run_pii(args: argparse.Namespace) -> dict:
    _ensure_tools()
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-pii-"))
    stack = Stack(tmp, args.chunks)
    try:
        results = bench_pii.run(stack, tmp, args.seconds, bench_config, wrk, latency_at_rate)
    finally:
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)
    results["date"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return results


def run_agents(args: argparse.Namespace) -> dict:
    _ensure_tools()
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-agents-"))
    stack = Stack(tmp, args.chunks)
    try:
        results = bench_agents.run(
            stack, tmp, args.seconds, args.rounds, args.connections, bench_config, wrk, latency_at_rate
        )
    finally:
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)
    results["date"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return results


def run_channels(args: argparse.Namespace) -> dict:
    _ensure_tools()
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-channels-"))
    stack = Stack(tmp, args.chunks)
    try:
        results = bench_channels.run(
            stack, tmp, args.seconds, args.channel_rate, args.customers, args.statuses, args.channel_worker
        )
    finally:
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)
    results["date"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return results


def run_vapi(args: argparse.Namespace) -> dict:
    _ensure_tools()
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-vapi-"))
    stack = Stack(tmp, args.chunks)
    try:
        results = bench_vapi.run(stack, tmp)
    finally:
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)
    results["date"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return results


def _median(values: list[float]) -> float:
    values = sorted(v for v in values if v is not None)
    return values[len(values) // 2] if values else float("nan")


def report(results: dict) -> str:
    rows = {r["scenario"]: r for r in results["rows"]}
    base = rows["mock provider direct (baseline)"]["rps"]
    bare = rows["bare Starlette + aiohttp relay"]["rps"]
    bare_stream = rows["bare streaming relay"]["rps"]
    lat = results["latency"]
    m = results["meta"]
    lines = [
        f"# Gateway benchmark ({m['date']})",
        "",
        f"`make bench` on {m['cpus']} cores, Python {m['python']}: gateway (1 worker; virtual-key auth, rate limit, "
        f"budget, audit ledger and JSON access log on) and the bare relay pinned to core 0 (`taskset`); mock "
        f"provider and wrk on core 1, PostgreSQL and Valkey on core {m.get('stores_core', '1')}. "
        f"wrk -c {m['connections']} for {m['seconds']} s per "
        f"row; streamed replies carry {m['chunks']} content chunks. Load average (1, 5, 15 min) before the run "
        f"{m['load_before']}, after it {m['load_after']} (the machine is shared: read the ratios).",
        "",
        "CPU µs/request: utime + stime of the server process from /proc over the wrk run, divided by the "
        "requests completed (10 ms ticks; background work such as the ledger writer included).",
        "",
        "| scenario | req/s | p50 ms | p99 ms | non-2xx | CPU µs/req | vs. mock | vs. bare relay (same mode) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        ref = bare_stream if r["scenario"].endswith("streaming") and "non-" not in r["scenario"] else bare
        ref = bare_stream if r["scenario"] == "bare streaming relay" else ref
        cpu = f"{r['cpu_us']:.0f}" if r.get("cpu_us") else "—"
        lines.append(
            f"| {r['scenario']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['non_2xx']} | {cpu} "
            f"| {r['rps'] / base:.2f}× | {r['rps'] / ref:.2f}× |"
        )
    rounds = results.get("rounds") or []
    summary = hot_path_summary(results)
    if rounds:
        lines += [
            "",
            f"## The hot path against the bare relay ({len(rounds)} alternating rounds of "
            f"{max(1, m['seconds'] // 2)} s "
            "per target; medians of the per-round ratios)",
            "",
            "| round | relay req/s | gateway req/s | ratio | policies off | ratio | relay stream | gateway stream "
            "| ratio | CPU µs gw / relay | stream CPU µs gw / relay |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for i, rr in enumerate(rounds, 1):
            lines.append(
                f"| {i} | {rr['relay']['rps']:.0f} | {rr['gateway']['rps']:.0f} "
                f"| {rr['gateway']['rps'] / rr['relay']['rps']:.3f} | {rr['off']['rps']:.0f} "
                f"| {rr['off']['rps'] / rr['relay']['rps']:.3f} | {rr['relay_stream']['rps']:.0f} "
                f"| {rr['gateway_stream']['rps']:.0f} | {rr['gateway_stream']['rps'] / rr['relay_stream']['rps']:.3f} "
                f"| {rr['gateway']['cpu_us']:.0f} / {rr['relay']['cpu_us']:.0f} "
                f"| {rr['gateway_stream']['cpu_us']:.0f} / {rr['relay_stream']['cpu_us']:.0f} |"
            )
        lines += ["", "| measure | value | goal |", "|---|---:|---|"]
        lines += [f"| {k} | {v} | {g} |" for k, v, g in summary]
    lines += [
        "",
        "Latency at a fixed 100 req/s (one keep-alive connection per target, requests alternating between targets):",
        "",
        "| path | p50 ms | p90 ms | p99 ms | added p50 vs. direct | added p50 vs. bare relay |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in lat.items():
        added = r["p50_ms"] - lat["direct"]["p50_ms"]
        over = r["p50_ms"] - lat["bare relay"]["p50_ms"]
        lines.append(
            f"| {name} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | {r['p99_ms']:.3f} | {added:+.3f} | {over:+.3f} |"
        )
    lines += ["", f"Gateway RSS: idle {m['idle_rss_mb']} MB, after the load {m['loaded_rss_mb']} MB.", ""]
    leak = results.get("leak")
    if leak:
        lines += [
            f"## RSS leak check ({len(leak['workers'])} workers, policy path, N = {leak['n']:,} requests, "
            f"{leak.get('errors', 0)} errors)",
            "",
            "| worker | idle MB | after N MB | after 10 N MB | growth N → 10 N |",
            "|---|---:|---:|---:|---:|",
        ]
        for i, w in enumerate(leak["workers"], 1):
            lines.append(
                f"| {i} | {w['idle_mb']} | {w['after_n_mb']} | {w['after_10n_mb']} | {w['growth_pct']:+.1f} % |"
            )
        lines.append("")
    prof = results.get("profile") or {}
    for name, p in prof.items():
        if not p:
            continue
        lines += [
            f"## py-spy: {name} ({p['samples']} samples at 250 Hz under wrk -c {m['connections']})",
            "",
            "| most often on top of the stack (self) | % | most often on the stack (inclusive) | % |",
            "|---|---:|---|---:|",
        ]
        for (sf, sp), (inf, ip) in zip(p["self_pct"], p["inclusive_pct"], strict=False):
            lines.append(f"| `{sf}` | {sp} | `{inf}` | {ip} |")
        lines.append("")
    if prof:
        lines += [
            "Folded stacks (speedscope or flamegraph.pl): loadtest/results/flame-gateway.txt, "
            "flame-gateway-stream.txt, flame-relay.txt.",
            "",
        ]
    return "\n".join(lines)


def hot_path_summary(results: dict) -> list[tuple[str, str, str]]:
    rounds = results.get("rounds") or []
    if not rounds:
        return []
    lat = results["latency"]

    def ratio(a: str, b: str, field: str = "rps") -> float:
        return _median([rr[a][field] / rr[b][field] for rr in rounds if rr[a][field] and rr[b][field]])

    added = lat["gateway"]["p50_ms"] - lat["bare relay"]["p50_ms"]
    return [
        ("full policy path vs. bare relay, throughput", f"{ratio('gateway', 'relay'):.3f}×", "≥ 0.7×"),
        ("policies off vs. bare relay, throughput", f"{ratio('off', 'relay'):.3f}×", "≥ 0.85×"),
        ("streaming vs. bare streaming relay, throughput", f"{ratio('gateway_stream', 'relay_stream'):.3f}×", "≥ 0.7×"),
        ("added p50 over the bare relay at 100 req/s", f"{added:+.3f} ms", "≤ 0.5 ms"),
        (
            "CPU µs/request, gateway vs. relay",
            f"{_median([rr['gateway']['cpu_us'] for rr in rounds]):.0f} vs. "
            f"{_median([rr['relay']['cpu_us'] for rr in rounds]):.0f} ({ratio('gateway', 'relay', 'cpu_us'):.2f}×)",
            "—",
        ),
        (
            "CPU µs/request, streaming gateway vs. relay",
            f"{_median([rr['gateway_stream']['cpu_us'] for rr in rounds]):.0f} vs. "
            f"{_median([rr['relay_stream']['cpu_us'] for rr in rounds]):.0f} "
            f"({ratio('gateway_stream', 'relay_stream', 'cpu_us'):.2f}×)",
            "—",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="make bench")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument(
        "--only",
        choices=("core", "pii", "agents", "agent-ceiling", "vapi", "channels", "rag", "peers", "leak"),
        help="run one part only (leak: the RSS check alone, e.g. --leak-n 100000 for 100k → 1M)",
    )
    parser.add_argument(
        "--rag-chunks", type=int, default=20_000, help="knowledge-base chunks for the rag part (the goal: 100000)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="alternating on/off rounds for the policy ratio")
    parser.add_argument("--leak-n", type=int, default=10000, help="RSS after N and 10 N requests (0: skip)")
    parser.add_argument("--leak-workers", type=int, default=2)
    parser.add_argument("--peers", action="store_true", help="also LiteLLM's proxy and Portkey's gateway")
    parser.add_argument("--channel-rate", type=int, default=500, help="channels: offered WhatsApp messages/s")
    parser.add_argument("--customers", type=int, default=2000, help="channels: conversations the messages spread over")
    parser.add_argument("--statuses", action="store_true", help="channels: the Graph mock posts delivery statuses")
    parser.add_argument("--channel-worker", choices=("process", "inside"), default="process", help="channels")
    parser.add_argument(
        "--stores-core",
        default="1",
        help="core for PostgreSQL and Valkey (default 1, beside the load; 0: on the gateway's core, so the "
        "policy path pays for its stores there). Results of a run with another value go to "
        "bench-stores-core<N>.md",
    )
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.only == "leak":
        leak = run_leak(args)
        text = leak_report(leak)
        (RESULTS / f"leak-{leak['n'] // 1000}k.md").write_text(text)
        print("\n" + text)
        return
    if args.only in (None, "core"):
        results = run(args)
        text = report(results)
        name = "bench-latest" if args.stores_core == "1" else f"bench-stores-core{args.stores_core}"
        (RESULTS / f"{name}.md").write_text(text)
        (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2))
        print("\n" + text)
    if args.peers or args.only == "peers":
        results = bench_peers.run(args, Stack, bench_config, wrk, latency_at_rate, _admin_key)
        text = bench_peers.report(results)
        (RESULTS / "bench-peers-latest.md").write_text(text)
        (RESULTS / "bench-peers-latest.json").write_text(json.dumps(results, indent=2))
        print("\n" + text)
    if args.only in (None, "pii"):
        results = run_pii(args)
        text = bench_pii.report(results, results["date"])
        (RESULTS / "bench-pii-latest.md").write_text(text)
        (RESULTS / "bench-pii-latest.json").write_text(json.dumps(results, indent=2))
        print("\n" + text)
    if args.only in (None, "rag"):  # its own embedded PostgreSQL; writes bench-rag[-<N>k]-latest.md
        cmd = [sys.executable, "-m", "loadtest.bench_rag", "--chunks", str(args.rag_chunks)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        k = args.rag_chunks // 1000
        name = "bench-rag-latest.md" if args.rag_chunks == 100_000 else f"bench-rag-{k}k-latest.md"
        print("\n" + (RESULTS / name).read_text())
    if args.only in (None, "agents"):
        results = run_agents(args)
        text = bench_agents.report(results, results["date"])
        (RESULTS / "bench-agents-latest.md").write_text(text)
        (RESULTS / "bench-agents-latest.json").write_text(json.dumps(results, indent=2))
        print("\n" + text)
    if args.only == "agent-ceiling":  # not in the full run: a what-if measurement (issue #12's goal)
        cmd = [sys.executable, "-m", "loadtest.bench_agent_ceiling"]
        subprocess.run(cmd, check=True)
    if args.only in (None, "vapi"):
        results = run_vapi(args)
        text = bench_vapi.report(results, results["date"])
        (RESULTS / "bench-vapi-latest.md").write_text(text)
        (RESULTS / "bench-vapi-latest.json").write_text(json.dumps(results, indent=2))
        print("\n" + text)
    if args.only in (None, "channels"):
        results = run_channels(args)
        text = bench_channels.report(results, results["date"])
        (RESULTS / "bench-channels-latest.md").write_text(text)
        (RESULTS / "bench-channels-latest.json").write_text(json.dumps(results, indent=2))
        print("\n" + text)


if __name__ == "__main__":
    main()
