"""WhatsApp channel benchmark (part of ``make bench``; alone: ``make bench ARGS="--only channels"``).

End to end on this machine: signed webhooks (Meta's wire format) → the gateway's webhook →
the durable ``wa-inbound`` queue (ordered per conversation) → the channel worker → an agent turn
with memory through the gateway's own ``/v1/chat/completions`` (the mock LLM answers) → mark as
read and the reply through the mock Graph API (loadtest/mock_graph.py), which records each send.

One gateway process (1 uvicorn worker, the channel worker inside, policies on) pinned to core 0;
the mock LLM, the mock Graph API, PostgreSQL, Valkey and this load generator on core 1.

* **Fixed rate**: ``--channel-rate`` messages/s (default 500) for ``--seconds``, open loop, spread
  over ``--customers`` conversations; webhook latency (p50/p99, the answer Meta waits for) and
  end-to-end latency (webhook sent → reply received by the Graph mock), and whether the
  answered rate kept up with the offered one.
* **Saturation**: a backlog of messages posted as fast as the webhook takes them; the rate at
  which the channel drains it (answered messages / time) is the sustained capacity.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import orjson

MASTER = "sk-master-bench"
SECRET = "bench-app-secret-0123"
TOKEN = "bench-graph-token"
PNID = "1000001"


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def _admin(url: str, method: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(
        f"{url}{path}",
        data=orjson.dumps(body) if body is not None else None,
        method=method,
        headers={"Authorization": f"Bearer {MASTER}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return orjson.loads(resp.read())


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return orjson.loads(resp.read())


def _notification(wa_id: str, body: str) -> bytes:
    msg = {
        "from": wa_id,
        "id": f"wamid.BENCH{uuid.uuid4().hex}",
        "timestamp": str(int(time.time())),
        "type": "text",
        "text": {"body": body},
    }
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550000000", "phone_number_id": PNID},
        "contacts": [{"profile": {"name": f"Customer {wa_id[-4:]}"}, "wa_id": wa_id}],
        "messages": [msg],
    }
    doc = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "W", "changes": [{"field": "messages", "value": value}]}],
    }
    return orjson.dumps(doc)


async def _post_all(url: str, n: int, rate: float | None, customers: int, tag: str, conns: int = 128) -> tuple:
    """Posts n signed notifications (at ``rate`` per second, or as fast as they are taken);
    returns ({message n: post time}, webhook latencies in ms, failures)."""
    import aiohttp

    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    failures = 0
    sem = asyncio.Semaphore(conns)
    connector = aiohttp.TCPConnector(limit=conns)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> None:
            nonlocal failures
            raw = _notification(str(10**11 + i % customers), f"{tag} {i}")
            sig = "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
            async with sem:
                t0 = time.perf_counter()
                sent_at[i] = time.time()
                try:
                    async with session.post(
                        url, data=raw, headers={"Content-Type": "application/json", "X-Hub-Signature-256": sig}
                    ) as resp:
                        await resp.read()
                        ok = resp.status == 200
                except aiohttp.ClientError:
                    ok = False
                latencies.append((time.perf_counter() - t0) * 1000)
                failures += 0 if ok else 1

        start = time.perf_counter()
        tasks = []
        for i in range(n):
            if rate:
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return sent_at, latencies, failures


def _answers(graph_url: str, tag: str) -> dict[int, float]:
    out = {}
    for s in _get(f"{graph_url}/_mock/sent")["sent"]:
        text = s.get("text") or ""
        if text.startswith(f"echo: {tag} "):
            out[int(text.rsplit(" ", 1)[1])] = s["ts"]
    return out


def _sent_count(graph_url: str) -> int:
    return int(_get(f"{graph_url}/_mock/stats").get("sent", 0))


def _wait_answers(graph_url: str, tag: str, n: int, timeout: float, before: int) -> dict[int, float]:
    """Polls the mock's counter (cheap) until ``n`` more sends arrived, then reads the records
    once (reading them all on every poll would load the core the worker runs on)."""
    deadline = time.monotonic() + timeout
    while _sent_count(graph_url) < before + n and time.monotonic() < deadline:
        time.sleep(0.2)
    return _answers(graph_url, tag)


def _cpu_s(pid: int | None) -> float:
    """utime + stime of a process, in seconds (0 when it is not running)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _phase(
    gw_url: str, graph_url: str, n: int, rate: float | None, customers: int, tag: str, pids: dict[str, int | None]
) -> dict:
    webhook = f"{gw_url}/channels/whatsapp/bench"
    cpu0 = {name: _cpu_s(pid) for name, pid in pids.items()}
    before = _sent_count(graph_url)
    t0 = time.time()
    sent_at, lat, failures = asyncio.run(_post_all(webhook, n, rate, customers, tag))
    posted = time.time()
    answers = _wait_answers(graph_url, tag, n - failures, timeout=max(60.0, n / 50), before=before)
    e2e = [(answers[i] - sent_at[i]) * 1000 for i in answers if i in sent_at]
    last = max(answers.values()) if answers else posted
    cpu = {name: _cpu_s(pid) - cpu0[name] for name, pid in pids.items()}
    return {
        "cpu_ms_per_message": {
            name: round(v * 1000 / max(len(answers), 1), 3) for name, v in cpu.items() if pids[name]
        },
        "messages": n,
        "offered_rate": rate,
        "ingress_rate": round(n / max(posted - t0, 1e-9), 1),
        "answered": len(answers),
        "webhook_failures": failures,
        "answered_rate": round(len(answers) / max(last - t0, 1e-9), 1),
        "webhook_p50_ms": round(statistics.median(lat), 2),
        "webhook_p99_ms": round(_pct(lat, 99), 2),
        "e2e_p50_ms": round(_pct(e2e, 50), 1),
        "e2e_p99_ms": round(_pct(e2e, 99), 1),
        "drain_s": round(last - posted, 2),
    }


def _webhook_only(gw_url: str, graph_url: str, n: int, rate: int, customers: int, gw_pid: int, worker_pid: int) -> dict:
    """Webhook latency and the gateway's CPU per message for the webhook alone: the worker is
    stopped (SIGSTOP) while the messages are posted, then resumed and the backlog drained."""
    import signal

    before = _sent_count(graph_url)
    os.kill(worker_pid, signal.SIGSTOP)
    try:
        cpu0 = _cpu_s(gw_pid)
        t0 = time.time()
        _, lat, failures = asyncio.run(_post_all(f"{gw_url}/channels/whatsapp/bench", n, rate, customers, "only"))
        elapsed = time.time() - t0
        cpu = _cpu_s(gw_pid) - cpu0
    finally:
        os.kill(worker_pid, signal.SIGCONT)
    _wait_answers(graph_url, "only", n - failures, timeout=max(60.0, n / 50), before=before)
    return {
        "messages": n,
        "offered_rate": rate,
        "ingress_rate": round(n / max(elapsed, 1e-9), 1),
        "webhook_failures": failures,
        "webhook_p50_ms": round(statistics.median(lat), 2),
        "webhook_p99_ms": round(_pct(lat, 99), 2),
        "gateway_cpu_ms_per_message": round(cpu * 1000 / n, 3),
    }


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def run(
    stack, tmp: Path, seconds: int, rate: int, customers: int, statuses: bool = False, worker: str = "process"
) -> dict:
    """``worker``: ``inside`` (the gateway process consumes the queue, as ``gateway serve`` does by
    default) or ``process`` (a ``gateway channels worker`` of its own, pinned to core 1)."""
    from loadtest.bench import _free_port, _wait  # (bench imports this module)

    graph_port = _free_port()
    graph_url = f"http://127.0.0.1:{graph_port}"
    stack._spawn(
        [
            "taskset",
            "-c",
            "1",
            sys.executable,
            "-m",
            "loadtest.mock_graph",
            "--port",
            str(graph_port),
            "--token",
            TOKEN,
        ],
        "mock-graph",
    )
    _wait(f"{graph_url}/health")
    key = subprocess.run(
        [sys.executable, "-m", "gateway", "keys", "create", "--name", "whatsapp", "--tenant", "bench"],
        env=stack.env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[0]
    config = {
        "providers": [
            {"name": "mock", "kind": "openai", "base_url": f"{stack.mock_url}/v1", "api_keys": ["bench-key"]}
        ],
        "models": [{"name": "bench", "deployments": [{"provider": "mock", "model": "mock-gpt"}]}],
        "channels": {
            "whatsapp": {
                "bench": {
                    "tenant": "bench",
                    "agent": "wa-bench",
                    "app_secret": SECRET,
                    "verify_token": "bench-verify-token",
                    "access_token": TOKEN,
                    "api_key": key,
                    "graph_base_url": graph_url,
                    "pacing_per_second": 10000,
                }
            }
        },
    }
    os.environ["GATEWAY_WA_CONCURRENCY"] = os.environ.get("GATEWAY_WA_CONCURRENCY", "32")
    stack.env["GATEWAY_WA_CONCURRENCY"] = os.environ["GATEWAY_WA_CONCURRENCY"]
    stack.env["GATEWAY_CHANNEL_WORKER"] = "1" if worker == "inside" else "0"
    try:
        gw_url, proc = stack.gateway("gateway-channels", config)
    except RuntimeError:
        print((tmp / "gateway-channels.log").read_text()[-3000:], file=sys.stderr)
        raise
    worker_proc = None
    if worker == "process":
        worker_proc = stack._spawn(
            [
                "taskset",
                "-c",
                "1",
                sys.executable,
                "-m",
                "gateway",
                "channels",
                "worker",
                "--config",
                str(tmp / "gateway-channels.yaml"),
            ],
            "channel-worker",
            {**stack.env, "GATEWAY_URL": gw_url},
        )
        deadline = time.monotonic() + 60
        while "channel worker running" not in (tmp / "channel-worker.log").read_text():
            if time.monotonic() > deadline or worker_proc.poll() is not None:
                raise RuntimeError("channel worker did not start:\n" + (tmp / "channel-worker.log").read_text()[-3000:])
            time.sleep(0.1)
    pids = {"gateway": proc.pid, "worker": worker_proc.pid if worker_proc else None}
    if statuses:
        _get_post(
            f"{graph_url}/_mock/config",
            {"statuses": True, "app_secret": SECRET, "webhook_url": f"{gw_url}/channels/whatsapp/bench"},
        )
    _admin(
        gw_url,
        "POST",
        "/admin/agents",
        {
            "name": "wa-bench",
            "tenant": "bench",
            "model": "bench",
            "template": "You are Acme's WhatsApp assistant talking to {{ customer_name }}. Answer briefly.",
            "variables": {"customer_name": {"type": "string", "required": False}},
        },
    )
    load_before = _load()
    n = rate * seconds
    warm = _phase(gw_url, graph_url, 200, 200, customers, "warm", pids)
    webhook_only = None
    if worker_proc is not None:  # the webhook alone at the offered rate: the worker paused meanwhile
        webhook_only = _webhook_only(gw_url, graph_url, n, rate, customers, proc.pid, worker_proc.pid)
    saturation = _phase(gw_url, graph_url, n, None, customers, "burst", pids)
    fixed = _phase(gw_url, graph_url, n, rate, customers, "fixed", pids)
    sustainable = max(10, int(saturation["answered_rate"] * 0.7))
    below = _phase(gw_url, graph_url, sustainable * seconds, sustainable, customers, "below", pids)
    if worker_proc is not None:
        stack.stop_gateway(worker_proc)
    stack.stop_gateway(proc)
    return {
        "warmup": warm,
        "webhook_only": webhook_only,
        "below_capacity": below,
        "fixed": fixed,
        "saturation": saturation,
        "meta": {
            "seconds": seconds,
            "rate": rate,
            "customers": customers,
            "statuses": statuses,
            "worker": worker,
            "load_before": load_before,
            "load_after": _load(),
            "cpus": os.cpu_count(),
        },
    }


def _get_post(url: str, body: dict) -> None:
    req = urllib.request.Request(
        url, data=orjson.dumps(body), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10):
        pass


def report(results: dict, date: str) -> str:
    m = results["meta"]
    lines = [
        f"# WhatsApp channel benchmark ({date})",
        "",
        f'`make bench ARGS="--only channels"` on {m["cpus"]} cores (shared with other work: load average '
        f"{m['load_before']} before, {m['load_after']} after). Signed webhooks → gateway webhook → `wa-inbound` "
        "queue → channel worker → agent turn with memory over the gateway's HTTP API (mock LLM) → mark-as-read "
        "and the reply through the mock Graph API. Gateway (1 worker) on core 0; mocks, PostgreSQL, Valkey and "
        "the load generator on core 1; the channel worker "
        + ("inside the gateway process" if m.get("worker") == "inside" else "a process of its own on core 1")
        + f". {m['customers']} conversations; delivery-status webhooks {'on' if m['statuses'] else 'off'}.",
        "",
        "| phase | messages | offered msg/s | ingress msg/s | answered msg/s | webhook p50 ms | webhook p99 ms "
        "| end-to-end p50 ms | end-to-end p99 ms | drain after last post s | CPU ms/msg |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("saturation", "fixed", "below_capacity"):
        r = results[name]
        offered = f"{r['offered_rate']:.0f}" if r["offered_rate"] else "as fast as taken"
        lines.append(
            f"| {name} | {r['answered']}/{r['messages']} | {offered} | {r['ingress_rate']:.0f} "
            f"| {r['answered_rate']:.0f} "
            f"| {r['webhook_p50_ms']:.2f} | {r['webhook_p99_ms']:.2f} | {r['e2e_p50_ms']:.0f} | {r['e2e_p99_ms']:.0f} "
            f"| {r['drain_s']:.1f} | {', '.join(f'{k} {v:.2f}' for k, v in r['cpu_ms_per_message'].items())} |"
        )
    sat = results["saturation"]["answered_rate"]
    only = results.get("webhook_only")
    if only:
        lines += [
            "",
            f"The webhook alone (worker paused) at {only['offered_rate']} msg/s offered: ingress "
            f"{only['ingress_rate']:.0f} msg/s, p50 {only['webhook_p50_ms']:.2f} ms, "
            f"**p99 {only['webhook_p99_ms']:.2f} ms**, {only['gateway_cpu_ms_per_message']:.3f} ms of gateway CPU "
            f"per message, {only['webhook_failures']} failures.",
        ]
    cpu = results["saturation"]["cpu_ms_per_message"]
    if cpu:
        per_core = ", ".join(f"{k} ≈ {1000 / v:.0f} msg/s" for k, v in cpu.items() if v)
        lines += [
            "",
            f"CPU per message at saturation: {', '.join(f'{k} {v:.2f} ms' for k, v in cpu.items())} — so one "
            f"free core per process would carry {per_core} (an estimate from CPU time; the mocks, PostgreSQL "
            "and Valkey need their share too). The measured rates above are what this shared machine gave.",
        ]
    lines += [
        "",
        f"Sustained end-to-end capacity (saturation drain rate): **{sat:.0f} messages/s** (goal ≥ 500); webhook p99 "
        f"at the fixed rate: **{results['fixed']['webhook_p99_ms']:.1f} ms** (goal < 50 ms).",
        "",
    ]
    return "\n".join(lines)
