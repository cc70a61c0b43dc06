"""Agent benchmark (part of ``make bench``; alone: ``make bench ARGS="--only agents"``).

One gateway (1 worker, policies on, pinned to core 0), the mock provider and a real HTTP tool
server (loadtest/mock_tools.py) on core 1, with the load generators:

* Throughput (wrk): an agent turn with memory (prompt rendered with a variable, the
  conversation's window loaded from Redis, the turn stored) vs. the same client request proxied
  plainly to the agent's model group, in alternating rounds (median of the rounds' ratios).
  Two agent flavours: one fixed conversation id (wrk sends one body, so one conversation whose
  window grows to its cap and stays there: the model sees the whole window on every call), and
  a new conversation id per request (a wrk Lua ``request()``): Redis holds nothing, so every
  turn also reads PostgreSQL once (the memory's cache-miss reload) and the writer copies every
  turn into PostgreSQL in the background.
* Added p50 at a fixed 100 req/s (loadtest/latency_probe.py, targets alternating).
* A two-step tool turn (the model calls one http tool, the gateway calls the tool server, the
  model answers): its p50 at a low fixed rate against its parts measured in the same probe —
  the two model calls it makes sent plainly through the gateway and straight to the mock, and
  the tool server's endpoint called directly — and a few run records
  (``GET /admin/runs/{request_id}``) to show where the time goes.
* Gateway CPU time per request (utime + stime of the process, from /proc) for a fixed number of
  requests of each kind.

``python -m loadtest.bench_agents drive URL KEY BODY_FILE N CONCURRENCY`` sends N requests (the
CPU measurement's load generator; ``{n}`` in the body is replaced by a counter).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

MASTER = "sk-master-bench"
AGENT = "bench-support"
TOOL_AGENT = "bench-tools"
COMPANY = "Acme"
TEMPLATE = (
    "You are {{ company }}'s support assistant. Answer briefly and politely, and ask one question "
    "at a time.{% if vip %} The customer is a VIP.{% endif %}"
)
SYSTEM = f"You are {COMPANY}'s support assistant. Answer briefly and politely, and ask one question at a time."
VARIABLES = {"company": {"type": "string", "required": True}, "vip": {"type": "boolean", "default": False}}
USER = "Say hello to the benchmark, politely."
TOOL = {
    "name": "lookup_order",
    "description": "Look up an order by its id.",
    "parameters": {
        "type": "object",
        "properties": {"order_id": {"type": "string"}},
        "required": ["order_id"],
        "additionalProperties": False,
    },
}
DIRECTIVE = '[[mock:{"tool_calls_steps": [[{"name": "lookup_order", "arguments": {"order_id": "A1"}}]]}]]'
TOOL_USER = f"Where is my order A1? {DIRECTIVE}"
CPU_REQUESTS = 2000
TOOL_RUNS = 30
CPU_CONCURRENCY = 16


# ---- HTTP helpers -------------------------------------------------------------------------


def _call(url: str, body: dict | None, key: str, method: str = "POST") -> tuple[int, dict, dict]:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"null")


def _create_agent(url: str, body: dict) -> None:
    status, _, data = _call(f"{url}/admin/agents", body, MASTER)
    if status != 201:
        raise RuntimeError(f"creating agent {body['name']}: {status} {data}")


def _run_record(url: str, request_id: str) -> dict:
    deadline = time.monotonic() + 15
    while True:
        status, _, data = _call(f"{url}/admin/runs/{request_id}", None, MASTER, "GET")
        if status == 200:
            return data
        if time.monotonic() > deadline:
            raise RuntimeError(f"no run record for {request_id}: {status} {data}")
        time.sleep(0.1)


def _tool_runs(url: str, key: str, body: dict, n: int) -> list[dict]:
    """``n`` tool turns one at a time over one keep-alive connection, then their run records."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    payload = json.dumps(body)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    sent = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            conn.request("POST", "/v1/chat/completions", payload, headers)
            resp = conn.getresponse()
            resp.read()
            sent.append(((time.perf_counter() - t0) * 1000, resp.getheader("x-request-id")))
            time.sleep(0.02)
    finally:
        conn.close()
    out = []
    for wall, rid in sent:
        run = _run_record(url, rid)
        out.append({"client_ms": round(wall, 3), "latency_ms": run.get("latency_ms"), "steps": run["steps"]})
    return out


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)


def _quiet(pid: int, limit: float = 15.0) -> float:
    """Waits until the gateway is idle (at most one CPU tick in 0.5 s: the background writers
    have caught up with the load before); returns the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        before = _cpu_ticks(pid)
        time.sleep(0.5)
        if _cpu_ticks(pid) - before <= 1:
            break
    return round(time.monotonic() - start, 1)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---- wrk scripts --------------------------------------------------------------------------


def _lua(value: str) -> str:
    """A Lua string literal (JSON's escapes are Lua's for ASCII text)."""
    return json.dumps(value)


def _fixed_script(tmp: Path, name: str, body: dict, key: str) -> Path:
    path = tmp / f"wrk-{name}.lua"
    path.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {key}"\n'
        f"wrk.body = {_lua(json.dumps(body))}\n"
    )
    return path


def _varying_script(tmp: Path, name: str, body: dict, key: str, prefix: str, per_request: bool = True) -> Path:
    """A new conversation id per request: ``<prefix>-<thread>-<counter>`` (a fresh prefix per
    wrk run, so no round finds the conversations of an earlier one). ``per_request=False``: one
    conversation per wrk thread (``<prefix>-<thread>``); run with as many threads as connections,
    each conversation's turns arrive one after another, as a person's do."""
    marker = "@@CONVERSATION@@"
    text = json.dumps({**body, "metadata": {"conversation_id": marker}})
    head, tail = text.split(marker)
    suffix = 'tid .. "-" .. counter' if per_request else "tid"
    path = tmp / f"wrk-{name}.lua"
    path.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {key}"\n'
        f"head = {_lua(head + prefix + '-')}\n"
        f"tail = {_lua(tail)}\n"
        "tid = 0\n"
        "counter = 0\n"
        "function setup(thread)\n"
        "  tid = tid + 1\n"
        '  thread:set("tid", tid)\n'
        "end\n"
        "function request()\n"
        "  counter = counter + 1\n"
        f"  return wrk.format(nil, nil, nil, head .. {suffix} .. tail)\n"
        "end\n"
    )
    return path


# ---- the benchmark ------------------------------------------------------------------------


def _tool_server(stack) -> str:
    from loadtest.bench import _free_port, _wait

    port = _free_port()
    stack._spawn(
        ["taskset", "-c", "1", sys.executable, "-m", "loadtest.mock_tools", "--port", str(port)],
        "tools",
    )
    url = f"http://127.0.0.1:{port}"
    _wait(f"{url}/health")
    return url


def send_n(url: str, key: str, body_file: Path, n: int, conc: int) -> dict:
    """Exactly ``n`` requests from ``conc`` connections (this module's ``drive``, on core 1):
    {seconds, errors}."""
    out = subprocess.run(
        [
            "taskset",
            "-c",
            "1",
            sys.executable,
            "-m",
            "loadtest.bench_agents",
            "drive",
            url,
            key,
            str(body_file),
            str(n),
            str(conc),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout
    return json.loads(out)


def _cpu_per_request(pid: int, url: str, key: str, body_file: Path, n: int) -> dict:
    tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
    _quiet(pid)
    before = _cpu_ticks(pid)
    drive = send_n(url, key, body_file, n, CPU_CONCURRENCY)
    time.sleep(1.0)  # what the requests left for the background (ledger, memory writer) runs now
    after = _cpu_ticks(pid)
    return {
        "requests": n,
        "errors": drive["errors"],
        "seconds": round(drive["seconds"], 3),
        "cpu_s": round((after - before) * tick_us / 1e6, 3),
        "us_per_request": round((after - before) * tick_us / n, 1),
    }


RUN_PARTS = (
    "client round trip",
    "before and after the run (client − run latency)",
    "run latency (the turn, gateway clock)",
    "model step 1",
    "tool call (lookup_order)",
    "tools step overhead (all tools − the call)",
    "model step 2",
    "between steps (run latency − model steps − tools)",
)
WATCHED = (
    "prepare (gateway/agent_stage.py)",
    "render (runtime/prompts.py)",
    "Memory.load (runtime/memory.py)",
    "stored_window (runtime/memory.py)",
    "window (runtime/memory.py)",
    "recent (runtime/conversations.py)",
    "Memory.append (runtime/memory.py)",
    "run_turn (gateway/tools_loop.py)",
    "complete (gateway/pipeline.py)",
    "settle (gateway/pipeline.py)",
    "RunRecorder.record (runtime/runs.py)",
    "StreamWriter._run (core/stream_writer.py)",
    "wait_for (asyncio/tasks.py)",
    "Redis.execute_command (redis/asyncio/client.py)",
    "AsyncScript.__call__ (redis/commands/core.py)",
    "Connection.reset (asyncpg/connection.py)",
    "StreamWriter._commit (core/stream_writer.py)",
)


def profile(pid: int, tmp: Path, name: str, load, seconds: int = 5) -> dict | None:
    """py-spy (if installed) samples the gateway while ``load()`` runs: the share of samples in
    which the watched functions are on the stack, and the functions most often on top."""
    from loadtest import profiling

    out = tmp / f"spy-{name}.txt"
    rec = profiling.record(pid, out, seconds, load)
    counts = profiling.sample_counts(out) if rec is not None and rec.returncode == 0 else None
    if counts is None:
        return None
    total, inclusive, top = counts
    return {
        "samples": total,
        "inclusive_pct": {f: round(100 * inclusive[f] / total, 1) for f in WATCHED},
        "top_self_pct": {f: round(100 * n / total, 1) for f, n in top.most_common(8)},
    }


def memory_window_cost(repeat: int = 2000) -> dict:
    """In process: what ``Memory.load`` does with what LRANGE returns for the fixed conversation
    (the list's newest ``tail_size`` entries: ``newest_window`` decodes from the newest back and
    stops when the window is full), against decoding the whole tail and cutting it afterwards
    (``window``), and the floor: the decoding alone of the entries the window keeps."""
    import timeit

    import orjson

    from runtime.memory_window import (
        _decode,
        _next_window,
        list_cap,
        message_tokens,
        newest_window,
        stored_window,
        tail_size,
        window,
    )
    from runtime.types import MemorySettings

    settings = MemorySettings()
    raw = []
    for seq in range(list_cap(settings)):
        message = {"role": "user" if seq % 2 == 0 else "assistant", "content": USER}
        raw.append(orjson.dumps({"s": seq, "t": message_tokens(message), "m": message}))
    tail = raw[-tail_size(settings) :]
    base = newest_window(tail, settings)
    kept = len(base)
    turn = ({"role": "user", "content": USER}, {"role": "assistant", "content": USER})
    added = [(message_tokens(m), m) for m in turn]
    stored = b'{"n":%d,' % base.seq + _next_window(base, added, settings)[1]

    def per_call(fn) -> float:
        return round(min(timeit.repeat(fn, number=repeat, repeat=3)) / repeat * 1e6, 1)

    return {
        "list_messages": len(raw),
        "tail_messages": len(tail),
        "window_messages": kept,
        "load_us": per_call(lambda: newest_window(tail, settings)),
        "decode_all_then_cut_us": per_call(lambda: window(_decode(tail), settings)),
        "decode_kept_only_us": per_call(lambda: [orjson.loads(x) for x in tail[-kept:]]),
        "stored_load_us": per_call(lambda: stored_window(stored, settings)),
        "next_window_us": per_call(lambda: _next_window(base, added, settings)),
    }


def run(stack, tmp: Path, seconds: int, rounds: int, connections: int, bench_config, wrk, latency_at_rate) -> dict:
    res: dict = {"meta": {"seconds": seconds, "rounds": rounds, "connections": connections}}
    res["meta"]["loadavg_before"] = Path("/proc/loadavg").read_text().split()[0]
    url, proc = stack.gateway("gateway-agents", bench_config(stack.mock_url))
    tools_url = _tool_server(stack)
    key = stack.key
    chat = f"{url}/v1/chat/completions"
    mock_chat = f"{stack.mock_url}/v1/chat/completions"
    _create_agent(url, {"name": AGENT, "model": "bench", "template": TEMPLATE, "variables": VARIABLES})
    tool = {
        **TOOL,
        "kind": "http",
        "config": {
            "method": "GET",
            "url": f"{tools_url}/orders/{{order_id}}",
            "allowed_hosts": ["127.0.0.1"],
            "allow_private_networks": True,
        },
    }
    _create_agent(
        url, {"name": TOOL_AGENT, "model": "bench", "template": TEMPLATE, "variables": VARIABLES, "tools": [tool]}
    )
    res["meta"]["memory"] = "defaults (window 20 turns / 4000 tokens; a full window here is 40 messages)"

    plain = {"model": "bench", "messages": [{"role": "user", "content": USER}]}
    agent = {
        "model": f"agent:{AGENT}",
        "messages": [{"role": "user", "content": USER}],
        "variables": {"company": COMPANY},
    }
    fixed = {**agent, "metadata": {"conversation_id": f"bench-fixed-{uuid.uuid4().hex[:8]}"}}
    # Sanity: every kind answers 200 before anything is measured.
    for body in (plain, fixed, agent):
        status, _, data = _call(chat, body, key)
        if status != 200:
            raise RuntimeError(f"{body['model']}: {status} {data}")

    # 1. Throughput, alternating rounds.
    plain_script = _fixed_script(tmp, "plain", plain, key)
    fixed_script = _fixed_script(tmp, "agent-fixed", fixed, key)
    stateless_script = _fixed_script(tmp, "agent-stateless", agent, key)
    wrk(chat, fixed_script, 2, connections)  # warm-up; fills the fixed conversation's window
    # Like for like: a plain request carrying what the agent turn sends upstream: its system
    # prompt, a full window of history (20 turns: the user's message and the model's answer),
    # and the new message.
    import jinja2

    _, _, answer = _call(chat, plain, key)
    reply = answer["choices"][0]["message"]["content"]
    system = jinja2.Template(TEMPLATE).render(company=COMPANY)
    sent = [{"role": "system", "content": system}]
    sent += [m for _ in range(20) for m in ({"role": "user", "content": USER}, {"role": "assistant", "content": reply})]
    sent.append({"role": "user", "content": USER})
    history = {"model": "bench", "messages": sent}
    history_script = _fixed_script(tmp, "plain-history", history, key)
    res["meta"]["history_messages"] = len(sent)
    # Memory's own share: the agent without a conversation id, its client sending the same
    # history a full window holds (the turn a stateless client makes): the same prompt goes
    # upstream, with no memory load or store.
    client_history = {**agent, "messages": sent[1:]}
    client_history_script = _fixed_script(tmp, "agent-client-history", client_history, key)
    wrk(chat, plain_script, 1, connections)
    # Many conversations, each one's turns in order (one per wrk thread), their windows full.
    ordered_script = _varying_script(
        tmp, "agent-ordered", agent, key, f"bench-ordered-{uuid.uuid4().hex[:8]}", per_request=False
    )
    wrk(chat, ordered_script, 3, connections, threads=connections)  # warm-up: > 20 turns each
    res["rounds"] = []
    span = max(1, round(seconds * 0.3))
    res["meta"]["span"] = span
    for i in range(rounds):
        varying = _varying_script(tmp, f"agent-new-{i}", agent, key, f"bench-new-{uuid.uuid4().hex[:8]}")
        p = wrk(chat, plain_script, span, connections)
        f = wrk(chat, fixed_script, span, connections)
        v = wrk(chat, varying, span, connections)
        s = wrk(chat, stateless_script, span, connections)
        h = wrk(chat, history_script, span, connections)
        po = wrk(chat, plain_script, span, connections, threads=connections)
        o = wrk(chat, ordered_script, span, connections, threads=connections)
        ch = wrk(chat, client_history_script, span, connections, threads=connections)
        row = {
            "plain_threads": po,
            "agent_ordered": o,
            "ratio_ordered": o["rps"] / po["rps"],
            "agent_client_history": ch,
            "ratio_client_history": ch["rps"] / po["rps"],
            "ratio_ordered_vs_client_history": o["rps"] / ch["rps"],
            "plain_history": h,
            "ratio_fixed_vs_history": f["rps"] / h["rps"],
            "plain": p,
            "agent_fixed": f,
            "agent_new": v,
            "agent_stateless": s,
            "ratio_fixed": f["rps"] / p["rps"],
            "ratio_new": v["rps"] / p["rps"],
            "ratio_stateless": s["rps"] / p["rps"],
        }
        res["rounds"].append(row)
        print(
            f"agents round {i + 1}: plain {p['rps']:.0f}  agent (one conversation) {f['rps']:.0f} "
            f"({row['ratio_fixed']:.3f}×)  agent (new conversation each) {v['rps']:.0f} ({row['ratio_new']:.3f}×)"
            f"  agent (no conversation) {s['rps']:.0f} ({row['ratio_stateless']:.3f}×)"
            f"  agent ({connections} conversations in order) {o['rps']:.0f} ({row['ratio_ordered']:.3f}×)"
            f"  agent (history sent by the client) {ch['rps']:.0f} ({row['ratio_client_history']:.3f}×)"
            f"  non-2xx {p['non_2xx']}/{f['non_2xx']}/{v['non_2xx']}/{s['non_2xx']}",
            flush=True,
        )

    # 2. Added latency at a fixed 100 req/s.
    res["meta"]["quiet_s_after_throughput"] = _quiet(proc.pid)
    files = {}
    for name, body in (
        ("plain", plain),
        ("agent, one conversation", fixed),
        (
            "agent, new conversation each",
            {**agent, "metadata": {"conversation_id": f"lat-{uuid.uuid4().hex[:8]}-{{n}}"}},
        ),
        ("agent, no conversation", agent),
    ):
        files[name] = tmp / f"lat-{len(files)}.json"
        files[name].write_text(json.dumps(body))
    res["latency"] = latency_at_rate([(n, chat, key, str(f)) for n, f in files.items()], {}, seconds * 2, 100)
    print("agents latency at 100 req/s:", json.dumps(res["latency"]), flush=True)

    # 3. The two-step tool turn and its parts, alternating at a low rate.
    tools_spec = [{"type": "function", "function": TOOL}]
    tool_turn = {
        "model": f"agent:{TOOL_AGENT}",
        "messages": [{"role": "user", "content": TOOL_USER}],
        "variables": {"company": COMPANY},
    }
    status, _, answer = _call(chat, tool_turn, key)
    if status != 200 or answer["choices"][0]["finish_reason"] != "stop":
        raise RuntimeError(f"tool turn: {status} {answer}")
    _, _, tool_result = _call(f"{tools_url}/orders/A1", None, "x", "GET")
    step1 = {
        "model": "bench",
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TOOL_USER}],
        "tools": tools_spec,
    }
    call = {
        "id": "call_1_0",
        "type": "function",
        "function": {"name": "lookup_order", "arguments": '{"order_id":"A1"}'},
    }
    step2 = {
        **step1,
        "messages": [
            *step1["messages"],
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1_0", "content": json.dumps(tool_result)},
        ],
    }
    parts = [
        ("tool turn (agent)", chat, key, tool_turn),
        ("model call 1 via gateway", chat, key, step1),
        ("model call 2 via gateway", chat, key, step2),
        ("model call 1 direct", mock_chat, "bench-key", step1),
        ("model call 2 direct", mock_chat, "bench-key", step2),
        ("tool server direct", f"{tools_url}/orders/A1", "x", {}),
    ]
    targets = []
    for i, (name, target, k, body) in enumerate(parts):
        f = tmp / f"tool-{i}.json"
        f.write_text(json.dumps(body))
        targets.append((name, target, k, str(f)))
    tool_rate = 60  # 10 req/s per target
    _quiet(proc.pid)
    res["tool_rate"] = tool_rate
    res["tool"] = latency_at_rate(targets, {}, seconds * 2, tool_rate)
    print("agents tool turn:", json.dumps(res["tool"]), flush=True)
    res["tool_runs"] = _tool_runs(url, key, tool_turn, TOOL_RUNS)

    # Where an agent turn spends the gateway's CPU (py-spy, if installed).
    _quiet(proc.pid)
    res["profile_fixed"] = profile(proc.pid, tmp, "fixed", lambda: wrk(chat, fixed_script, 4, connections), 4)
    new_script = _varying_script(tmp, "agent-new-profile", agent, key, f"bench-prof-{uuid.uuid4().hex[:8]}")
    _quiet(proc.pid)
    res["profile_new"] = profile(proc.pid, tmp, "new", lambda: wrk(chat, new_script, 4, connections), 4)

    # 4. Gateway CPU per request.
    res["cpu"] = {}
    tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
    _quiet(proc.pid)
    before = _cpu_ticks(proc.pid)
    time.sleep(2.0)
    res["cpu_idle_us_per_s"] = round((_cpu_ticks(proc.pid) - before) * tick_us / 2.0, 1)
    cpu_bodies = {
        "plain": plain,
        "agent, one conversation": fixed,
        "agent, new conversation each": {
            **agent,
            "metadata": {"conversation_id": f"cpu-{uuid.uuid4().hex[:8]}-{{n}}"},
        },
        "agent, no conversation": agent,
        "agent, no conversation, the window's history sent by the client": client_history,
        f"agent, {CPU_CONCURRENCY} conversations in order": {
            **agent,
            "metadata": {"conversation_id": f"cpu-ordered-{uuid.uuid4().hex[:8]}-{{w}}"},
        },
        "tool turn (agent, 2 model calls + 1 tool call)": tool_turn,
        "model call 1 via gateway (plain, tools offered)": step1,
    }
    for name, body in cpu_bodies.items():
        f = tmp / f"cpu-{len(res['cpu'])}.json"
        f.write_text(json.dumps(body))
        n = CPU_REQUESTS if "tool" not in name else CPU_REQUESTS // 2
        if "in order" in name:  # each worker's conversation first gets a full window
            send_n(chat, key, f, CPU_CONCURRENCY * 22, CPU_CONCURRENCY)
        res["cpu"][name] = _cpu_per_request(proc.pid, chat, key, f, n)
        print(f"agents CPU {name}: {res['cpu'][name]}", flush=True)
    stack.stop_gateway(proc)
    res["memory_window"] = memory_window_cost()
    res["meta"]["loadavg_after"] = Path("/proc/loadavg").read_text().split()[0]
    return res


# ---- the report ---------------------------------------------------------------------------


def report(res: dict, date: str) -> str:
    rounds = res["rounds"]
    fixed = sorted(r["ratio_fixed"] for r in rounds)
    new = sorted(r["ratio_new"] for r in rounds)
    m = res["meta"]
    lat = res["latency"]
    lines = [
        f"# Agent benchmark ({date})",
        "",
        f'`make bench ARGS="--only agents"` on {os.cpu_count()} cores: one gateway worker (policies on: key auth, '
        "rate limit, budget, audit ledger) pinned to core 0; mock provider, tool server (loadtest/mock_tools.py), "
        "wrk and the probes, PostgreSQL and Valkey on core 1. The agent: a Jinja2 template with a variable "
        f"(`company`, from `variables`), memory {m['memory']}, model group `bench` (one mock deployment). "
        "The plain request: the same client message to `bench`. This machine is shared and noisy (1-minute "
        f"load average {m.get('loadavg_before')} before the run, {m.get('loadavg_after')} after it, this run's "
        "own load included): read the ratios, not the absolutes.",
        "",
        f"## Throughput (wrk -c {m['connections']}, {m['span']} s per row, {len(rounds)} alternating rounds)",
        "",
        "| round | plain req/s | agent, one conversation | ratio | agent, new conversation each | ratio "
        "| agent, no conversation | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(rounds, 1):
        lines.append(
            f"| {i} | {r['plain']['rps']:.0f} | {r['agent_fixed']['rps']:.0f} | {r['ratio_fixed']:.3f} "
            f"| {r['agent_new']['rps']:.0f} | {r['ratio_new']:.3f} "
            f"| {r['agent_stateless']['rps']:.0f} | {r['ratio_stateless']:.3f} |"
        )
    ordered_rows = [r for r in rounds if "ratio_ordered" in r]
    if ordered_rows:
        lines += [
            "",
            f"Many conversations, each one's turns in order (wrk -t {m['connections']} -c {m['connections']}: one "
            "conversation per wrk thread, its window full after the warm-up), against the plain request sent the "
            "same way in the same round:",
            "",
            "| round | plain req/s (same wrk threads) | agent, conversations in order | ratio "
            "| agent, history sent by the client (no memory) | ratio | in order vs. history sent |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for i, r in enumerate(ordered_rows, 1):
            ch = r.get("agent_client_history")
            lines.append(
                f"| {i} | {r['plain_threads']['rps']:.0f} | {r['agent_ordered']['rps']:.0f} "
                f"| {r['ratio_ordered']:.3f} "
                + (
                    f"| {ch['rps']:.0f} | {r['ratio_client_history']:.3f} "
                    f"| {r['ratio_ordered_vs_client_history']:.3f} |"
                    if ch
                    else "| | | |"
                )
            )
    ordered = sorted(r["ratio_ordered"] for r in ordered_rows)
    stateless = sorted(r["ratio_stateless"] for r in rounds)
    like = sorted(r["ratio_fixed_vs_history"] for r in rounds if "ratio_fixed_vs_history" in r)
    errors = sum(
        r[k]["non_2xx"]
        for r in rounds
        for k in (
            "plain",
            "agent_fixed",
            "agent_new",
            "agent_stateless",
            "agent_ordered",
            "plain_threads",
            "agent_client_history",
        )
        if k in r
    )
    lines += [
        "",
        f"**Agent turn with memory vs. the same request proxied plainly: {_median(fixed):.3f}× the throughput** "
        f"(median of {len(fixed)} rounds; goal ≥ 0.7×) with one conversation (its window full: the model sees "
        f"the stored turns on every call); **{_median(new):.3f}×** with a new conversation per request (an empty "
        "Redis window, so one PostgreSQL read per turn, and every turn copied to PostgreSQL in the background). "
        f"Without a conversation id (prompt rendered, no memory): **{_median(stateless):.3f}×**. "
        f"Non-2xx answers over all rounds: {errors}."
        + (
            f" **Many conversations, each in order** (the usual case: a person waits for the answer before "
            f"writing again; the stored window is used): **{_median(ordered):.3f}×**."
            if ordered
            else ""
        ),
        "",
        f"Like for like — the agent turn with one conversation vs. a plain request carrying the same "
        f"{res['meta'].get('history_messages', '?')} messages upstream (its system prompt and history): "
        f"**{like[len(like) // 2]:.3f}×** (median of {len(like)} rounds: {', '.join(f'{x:.2f}' for x in like)})."
        if like
        else "",
        "",
        *_memory_share(ordered_rows),
        "",
        "## Added latency at a fixed 100 req/s (targets alternating, one keep-alive connection each)",
        "",
        "| request | p50 ms | p90 ms | p99 ms | added p50 vs. plain | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    base = lat["plain"]["p50_ms"]
    for name, r in lat.items():
        lines.append(
            f"| {name} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | {r['p99_ms']:.3f} | {r['p50_ms'] - base:+.3f} "
            f"| {r['errors']} |"
        )
    t = res["tool"]
    turn = t["tool turn (agent)"]["p50_ms"]
    via = t["model call 1 via gateway"]["p50_ms"] + t["model call 2 via gateway"]["p50_ms"]
    direct = t["model call 1 direct"]["p50_ms"] + t["model call 2 direct"]["p50_ms"]
    tool = t["tool server direct"]["p50_ms"]
    lines += [
        "",
        f"**Added p50 of an agent turn: {lat['agent, one conversation']['p50_ms'] - base:+.3f} ms (one "
        f"conversation), {lat['agent, new conversation each']['p50_ms'] - base:+.3f} ms (new conversation "
        f"each), {lat['agent, no conversation']['p50_ms'] - base:+.3f} ms (no conversation)** (goal ≤ 2 ms; "
        f"{len(lat)} targets share the 100 req/s).",
        "",
        f"## A two-step tool turn ({res['tool_rate']} req/s over 6 targets, alternating)",
        "",
        "The model (mock) answers the first call with one call of an http tool (`lookup_order`, GET on the tool "
        "server), the gateway validates and runs it, appends the result and calls the model again, which "
        "answers with text. Its parts are measured in the same probe: the two model calls the turn makes, "
        "sent plainly through the gateway and straight to the mock, and the tool's endpoint called directly.",
        "",
        "| request | p50 ms | p90 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in t.items():
        lines.append(f"| {name} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | {r['p99_ms']:.3f} | {r['errors']} |")
    lines += [
        "",
        f"- Over its two model calls through the gateway and the tool server: {turn:.3f} − ({via:.3f} + "
        f"{tool:.3f}) = **{turn - via - tool:+.3f} ms** (the tool loop itself: the tool call's validation, "
        "HTTP client and result handling, the second step's admit and scrub, the run record).",
        f"- Over the raw parts (two model calls straight to the mock and the tool server): {turn:.3f} − "
        f"({direct:.3f} + {tool:.3f}) = **{turn - direct - tool:+.3f} ms** (everything the gateway adds to "
        "the turn, its two proxied calls included).",
        "- A difference of p50s taken from different requests is fragile on a shared machine (it swings by "
        "milliseconds between runs here); the run records below time the loop inside each turn.",
        "",
        f"Run records (`GET /admin/runs/{{request_id}}`) of {len(res['tool_runs'])} tool turns sent one at a "
        "time afterwards over one keep-alive connection (what the gateway's own clock saw):",
        "",
        "| part | median ms | min ms | max ms |",
        "|---|---:|---:|---:|",
    ]
    parts_ms: dict[str, list[float]] = {k: [] for k in RUN_PARTS}
    for r in res["tool_runs"]:
        steps = r["steps"]
        models = [s["duration_ms"] for s in steps if s["kind"] == "model"]
        tools = [s["duration_ms"] for s in steps if s["kind"] == "tool"]
        alls = [s["duration_ms"] for s in steps if s["kind"] == "tools"]
        if len(models) != 2 or not tools or not alls:
            continue
        latency = r["latency_ms"] or 0.0
        values = (
            r["client_ms"],
            r["client_ms"] - latency,
            latency,
            models[0],
            tools[0],
            alls[0] - tools[0],
            models[1],
            latency - sum(models) - sum(alls),
        )
        for k, v in zip(RUN_PARTS, values, strict=True):
            parts_ms[k].append(v)
    for k, values in parts_ms.items():
        if values:
            lines.append(f"| {k} | {_median(values):.3f} | {min(values):.3f} | {max(values):.3f} |")
    med = {k: _median(v) for k, v in parts_ms.items()}
    if parts_ms[RUN_PARTS[0]]:
        loop = med[RUN_PARTS[5]] + med[RUN_PARTS[7]]
        lines += [
            "",
            f"By the run records, the tool loop's own time (outside the model calls and the tool's HTTP call) is "
            f"{loop:.3f} ms per turn (median); the gateway's tool call took {med[RUN_PARTS[4]]:.3f} ms against "
            f"{t['tool server direct']['p50_ms']:.3f} ms for the endpoint called directly; the model steps "
            f"{med[RUN_PARTS[3]]:.3f} + {med[RUN_PARTS[6]]:.3f} ms against {direct:.3f} ms straight to the mock. "
            "A model step's duration covers routing, the upstream call and the response handling; `between "
            "steps` is the audit record of step 1, the tool messages appended, the second step's admit and "
            "scrub, the memory store and the run record; `before and after the run` is authentication, "
            "parsing, the agent stage (prompt rendered) and sending the response.",
        ]
    c = res["cpu"]
    p_us = c["plain"]["us_per_request"]
    lines += [
        "",
        f"## Gateway CPU per request ({CPU_REQUESTS} requests per kind, {CPU_CONCURRENCY} concurrent; "
        "tool turns: half as many)",
        "",
        "| request | CPU µs / request | vs. plain | errors | wall s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in c.items():
        lines.append(
            f"| {name} | {r['us_per_request']:.0f} | {r['us_per_request'] / p_us:.2f}× | {r['errors']} "
            f"| {r['seconds']:.2f} |"
        )
    lines += [
        "",
        f"utime + stime of the gateway process from /proc (10 ms ticks) before the requests and 1 s after the "
        f"last one (background work included); the idle gateway uses {res['cpu_idle_us_per_s']:.0f} µs of CPU "
        "per second.",
        "",
    ]
    lines += _where(res)
    return "\n".join(lines)


def _memory_share(rows: list[dict]) -> list[str]:
    """Memory's own share of a turn: conversations in order against the same agent turn whose
    client sends the window's history itself (no memory load or store, the same prompt upstream)."""
    rows = [r for r in rows if "ratio_client_history" in r]
    if not rows:
        return []
    sent = _median([r["ratio_client_history"] for r in rows])
    mine = _median([r["ratio_ordered_vs_client_history"] for r in rows])
    return [
        f"Memory's own share — the same agent turn without a conversation id, its client sending the "
        f"window's history itself (the same prompt upstream, no memory load or store): **{sent:.3f}×** the "
        f"plain request; conversations in order run at **{mine:.3f}×** that turn (median of {len(rows)} "
        "rounds). Taking memory's Redis work away entirely would at most lift the turn to the first figure.",
    ]


def _where(res: dict) -> list[str]:
    c = res["cpu"]
    plain = c["plain"]["us_per_request"]
    stateless = c["agent, no conversation"]["us_per_request"]
    fixed = c["agent, one conversation"]["us_per_request"]
    new = c["agent, new conversation each"]["us_per_request"]
    ordered = next((r["us_per_request"] for k, r in c.items() if "in order" in k), None)
    goal = plain / 0.7
    w = res["memory_window"]
    lines = [
        "## Where the time goes",
        "",
        f"- Gateway CPU per request: plain {plain:.0f} µs; the agent stage without memory (agent lookup, "
        f"prompt selected and rendered, run record) adds {stateless - plain:+.0f} µs; memory adds "
        f"{fixed - stateless:+.0f} µs more with one long conversation and {new - stateless:+.0f} µs with a new "
        f"conversation per request. At 0.7× the plain throughput a CPU-bound worker may spend {goal:.0f} µs "
        f"per agent turn: {fixed - goal:+.0f} µs from there (one conversation), {new - goal:+.0f} µs (new "
        f"conversation each), {stateless - goal:+.0f} µs (no conversation)"
        + (
            f"; conversations in order: memory adds {ordered - stateless:+.0f} µs, {ordered - goal:+.0f} µs from "
            "the 0.7× budget."
            if ordered is not None
            else "."
        ),
        *(
            [
                f"- The window's history sent by the client instead (no conversation id, no memory): "
                f"{history:.0f} µs, so carrying {res['meta'].get('history_messages', '?')} messages through the "
                f"turn costs {history - stateless:+.0f} µs and memory's load and store "
                f"{ordered - history:+.0f} µs (conversations in order)."
            ]
            if ordered is not None
            and (
                history := c.get("agent, no conversation, the window's history sent by the client", {}).get(
                    "us_per_request"
                )
            )
            else []
        ),
        "- One conversation under wrk -c 64 is 64 turns of one conversation at once: nearly every turn's "
        "window was read before another turn of it was stored, so the stored window's compare-and-set fails "
        "and loads cut the list; conversations whose turns come in order read the stored window.",
        f"- `Memory.load` reads the newest {w['tail_messages']} of the list's {w['list_messages']} messages "
        f"(LRANGE) and cuts the window ({w['window_messages']} messages here) while decoding from the newest "
        f"back: {w['load_us']:.0f} µs per load in process, against {w['decode_all_then_cut_us']:.0f} µs for "
        f"decoding the whole tail and cutting afterwards, and {w['decode_kept_only_us']:.0f} µs for the JSON "
        "decoding alone of the kept entries (the floor while history is decoded at all). The stored window "
        f"(one value): {w['stored_load_us']:.0f} µs to decode and check; storing the next one costs the "
        f"append {w['next_window_us']:.0f} µs (the turn added, the oldest dropped, encoded).",
    ]
    for key, what in (("profile_fixed", "the one-conversation agent"), ("profile_new", "a new conversation each")):
        prof = res.get(key)
        if not prof:
            continue
        watched = ", ".join(f"`{f.split(' ')[0]}` {p:.1f} %" for f, p in prof["inclusive_pct"].items() if p)
        top = ", ".join(f"`{f.split(' ')[0]}` {p:.1f} %" for f, p in prof["top_self_pct"].items())
        lines += [
            f"- py-spy on the gateway during wrk -c 64 on {what} ({prof['samples']} samples; share of samples "
            f"with the function on the stack): {watched}. Most often on top of the stack: {top}.",
        ]
    if not res.get("profile_fixed"):
        lines.append("- (py-spy is not installed: `.venv/bin/pip install py-spy` adds a profile here.)")
    lines.append("")
    return lines


# ---- the CPU measurement's load generator ---------------------------------------------------


async def _send_all(url: str, key: str, template: bytes, n: int, conc: int) -> dict:
    import aiohttp

    from loadtest.latency_probe import _body

    errors = 0
    counter = iter(range(n))
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    async def worker(session, w: int) -> None:
        nonlocal errors
        mine = template.replace(b"{w}", str(w).encode())  # one conversation per worker: turns in order
        for i in counter:
            async with session.post(url, data=_body(mine, i), headers=headers) as r:
                await r.read()
                errors += r.status != 200

    import asyncio

    start = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc)) as session:
        await asyncio.gather(*(worker(session, w) for w in range(conc)))
    return {"seconds": time.perf_counter() - start, "errors": errors}


def main() -> None:
    if len(sys.argv) == 7 and sys.argv[1] == "drive":
        import uvloop

        url, key, body_file, n, conc = sys.argv[2:]
        out = uvloop.run(_send_all(url, key, Path(body_file).read_bytes(), int(n), int(conc)))
        print(json.dumps(out))
        return
    print(__doc__)


if __name__ == "__main__":
    main()
