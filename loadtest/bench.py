"""``make bench``: throughput and added latency of the gateway against the mock provider.

Runs, in one go and on this machine: the mock provider alone (the baseline), a bare
Starlette + aiohttp relay (the least a Python relay can do), the gateway non-streaming and
streaming (one worker, key authentication on), each driven by wrk at concurrency 64; then a
fixed 100 req/s load (loadtest/latency_probe.py) direct, through the bare relay and through the
gateway, to measure the latency the gateway adds; and the gateway's idle RSS. The gateway and
the bare relay are pinned to core 0, the mock provider and the load generators to core 1.

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

from loadtest import bench_agents, bench_pii

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


def wrk(url: str, script: Path, seconds: int, conns: int) -> dict:
    out = subprocess.run(
        [
            "taskset",
            "-c",
            "1",
            "wrk",
            "-t",
            "2",
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
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": rps,
        "p50_ms": p50,
        "p99_ms": p99,
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

    def __init__(self, tmp: Path, chunks: int) -> None:
        from gateway.embedded import EmbeddedServices

        self.tmp = tmp
        self.services = EmbeddedServices(tmp / "data").start()
        # PostgreSQL and Valkey stand for servers of their own: keep them off the gateway's core.
        # (Backends PostgreSQL forks later inherit the postmaster's affinity.)
        for pidfile in (tmp / "data" / "valkey" / "valkey.pid", tmp / "data" / "pg" / "postmaster.pid"):
            pid = pidfile.read_text().split()[0]
            subprocess.run(["taskset", "-a", "-p", "-c", "1", pid], check=True, stdout=subprocess.DEVNULL)
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

    def gateway(self, name: str, config: dict) -> tuple[str, subprocess.Popen]:
        import yaml

        port = _free_port()
        cfg = self.tmp / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(config))
        proc = self._spawn(
            ["taskset", "-c", "0", sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--port", str(port)],
            name,
            self.env,
        )
        url = f"http://127.0.0.1:{port}"
        _wait(f"{url}/readyz")
        return url, proc

    def bare_relay(self) -> str:
        port = _free_port()
        self._spawn(
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
            ],
            "bare-relay",
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{url}/", timeout=1)
            except urllib.error.HTTPError:
                return url  # it answers (404 on /): up
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


def run(args: argparse.Namespace) -> dict:
    _ensure_tools()
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    stack = Stack(tmp, args.chunks)
    results: dict = {"rows": [], "latency": {}, "meta": {}}
    try:
        url, proc = stack.gateway("gateway", bench_config(stack.mock_url))
        time.sleep(1)
        results["meta"]["idle_rss_mb"] = round(_rss_mb(proc.pid), 1)
        # A key that exercises the whole policy path: a rate limit and a budget to check, the
        # budget reserved and settled, the audit record written, on every request.
        stack.key = _admin_key(url, {"name": "bench-policies", "rpm": 10**9, "budget_usd": 10**6})
        off_url, _ = stack.gateway("gateway-policies-off", bench_config(stack.mock_url, policies=False))
        direct = _wrk_script(tmp, CHAT, "bench-key")
        via = _wrk_script(tmp, CHAT, stack.key)
        stream = _wrk_script(tmp, {**CHAT, "stream": True}, stack.key)
        via10 = _wrk_script(tmp, {**CHAT, "model": "bench10"}, stack.key)
        direct_stream = _wrk_script(tmp, {**CHAT, "stream": True}, "bench-key")
        # Warm-up, then measure.
        wrk(f"{url}/v1/chat/completions", via, 2, args.connections)
        bare = stack.bare_relay()
        rows = [
            ("mock provider direct (baseline)", f"{stack.mock_url}/v1/chat/completions", direct),
            ("bare Starlette + aiohttp relay", f"{bare}/v1/chat/completions", direct),
            ("gateway, non-streaming", f"{url}/v1/chat/completions", via),
            ("gateway, routing over 10 deployments", f"{url}/v1/chat/completions", via10),
            ("gateway, policies off (no limits, budgets, ledger)", f"{off_url}/v1/chat/completions", via),
            ("mock provider direct, streaming", f"{stack.mock_url}/v1/chat/completions", direct_stream),
            ("gateway, streaming", f"{url}/v1/chat/completions", stream),
        ]
        for name, target, script in rows:
            r = wrk(target, script, args.seconds, args.connections)
            results["rows"].append({"scenario": name, **r})
            print(
                f"{name:40} {r['rps']:9.0f} req/s  p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms"
                f"  non-2xx {r['non_2xx']}",
                flush=True,
            )
        # The ratio the policy path is judged by, robust to a noisy machine: on and off
        # alternate in short rounds, and the median of the rounds' ratios is reported.
        rounds = []
        for _ in range(args.rounds):
            on = wrk(f"{url}/v1/chat/completions", via, args.seconds // 2 or 1, args.connections)["rps"]
            off = wrk(f"{off_url}/v1/chat/completions", via, args.seconds // 2 or 1, args.connections)["rps"]
            rounds.append({"on": on, "off": off, "ratio": on / off})
            print(f"policy path round: on {on:.0f} off {off:.0f} ratio {on / off:.3f}", flush=True)
        results["policy_rounds"] = rounds
        results["latency"] = latency_at_rate(
            [
                ("direct", f"{stack.mock_url}/v1/chat/completions", "bench-key"),
                ("bare relay", f"{bare}/v1/chat/completions", "bench-key"),
                ("gateway, policies off", f"{off_url}/v1/chat/completions", stack.key),
                ("gateway", f"{url}/v1/chat/completions", stack.key),
            ],
            CHAT,
            args.seconds * 2,
            100,
        )
        results["meta"]["loaded_rss_mb"] = round(_rss_mb(proc.pid), 1)
        stack.stop_gateway(proc)
    finally:
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)
    results["meta"].update(
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        cpus=os.cpu_count(),
        python=platform.python_version(),
        connections=args.connections,
        seconds=args.seconds,
        chunks=args.chunks,
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


def report(results: dict) -> str:
    rows = {r["scenario"]: r for r in results["rows"]}
    base = rows["mock provider direct (baseline)"]["rps"]
    bare = rows["bare Starlette + aiohttp relay"]["rps"]
    lat = results["latency"]
    m = results["meta"]
    lines = [
        f"# Gateway benchmark ({m['date']})",
        "",
        f"`make bench` on {m['cpus']} cores, Python {m['python']}: gateway (1 worker; virtual-key auth, rate limit, "
        f"budget, audit ledger and JSON access log on) and the bare relay pinned to core 0; mock provider, "
        f"load generators, PostgreSQL and Valkey on core 1. wrk -c {m['connections']} for {m['seconds']} s per "
        f"row; streamed replies carry {m['chunks']} content chunks.",
        "",
        "| scenario | req/s | p50 ms | p99 ms | non-2xx | vs. mock | vs. bare relay |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['scenario']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['non_2xx']} "
            f"| {r['rps'] / base:.2f}× | {r['rps'] / bare:.2f}× |"
        )
    single = rows["gateway, non-streaming"]["rps"]
    ten = rows["gateway, routing over 10 deployments"]["rps"]
    off = rows["gateway, policies off (no limits, budgets, ledger)"]["rps"]
    ratios = sorted(r["ratio"] for r in results.get("policy_rounds", []))
    median = ratios[len(ratios) // 2] if ratios else single / off
    lines += [
        "",
        f"**Full policy path (auth + rate limit + budget reservation and settlement + audit ledger) vs. the same "
        f"gateway with policies off: {median:.3f}× the throughput** (median of {len(ratios)} alternating rounds: "
        f"{', '.join(f'{r:.2f}' for r in ratios)}; the single rows above give {single / off:.3f}×).",
        "",
        f"Routing over 10 deployments vs. one: {ten / single:.3f}× the throughput "
        f"({(1 - ten / single) * 100:+.1f} % cost).",
        "",
        "Latency at a fixed 100 req/s (one keep-alive connection per target, requests alternating between targets):",
        "",
        "| path | p50 ms | p90 ms | p99 ms | added p50 vs. direct |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in lat.items():
        added = r["p50_ms"] - lat["direct"]["p50_ms"]
        lines.append(f"| {name} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | {r['p99_ms']:.3f} | {added:+.3f} |")
    lines += [
        "",
        f"Gateway RSS: idle {m['idle_rss_mb']} MB, after the load {m['loaded_rss_mb']} MB "
        "(no litellm provider configured).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="make bench")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--only", choices=("core", "pii", "agents", "rag"), help="run one part only")
    parser.add_argument(
        "--rag-chunks", type=int, default=20_000, help="knowledge-base chunks for the rag part (the goal: 100000)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="alternating on/off rounds for the policy ratio")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "core"):
        results = run(args)
        text = report(results)
        (RESULTS / "bench-latest.md").write_text(text)
        (RESULTS / "bench-latest.json").write_text(json.dumps(results, indent=2))
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


if __name__ == "__main__":
    main()
