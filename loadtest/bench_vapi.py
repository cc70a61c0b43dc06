"""VAPI time-to-first-token benchmark (part of ``make bench``; alone: ``make bench ARGS="--only vapi"``).

What the caller hears first is the first token, so this measures what the VAPI channel and the
agent runtime add to the model's own first token. The mock LLM is started with an injected
first-token latency (``--ttft-ms``, default 50 ms, like a fast hosted model) and the gateway
(one worker, policies on) is pinned to core 0; the mock and this load generator to core 1.

Simulated calls (loadtest/vapi_sim.py: VAPI's wire format, the whole transcript each turn, the
``call`` / ``customer`` / ``phoneNumber`` objects, ``stream: true``) are played one turn at a
time, the targets alternating turn by turn so drift hits them alike:

* ``mock direct``: the same streamed request straight to the mock (the model's own TTFT);
* ``gateway, plain``: the model group through ``/v1`` (no agent);
* ``gateway, agent``: ``agent:<name>`` through ``/v1`` with the call's conversation id (prompt
  rendered, memory loaded and stored: the agent runtime alone);
* ``VAPI channel``: ``/channels/vapi/{account}/chat/completions`` (credential check, call
  mapping, the adapter's own HTTP call to the gateway, the relay) — what VAPI would see.

Reported: p50 / p90 / p99 TTFT per target and the added p50 over the mock (goal: the channel
adds ≤ 20 ms p50).
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
import uuid

import aiohttp
import orjson

from loadtest.vapi_sim import VapiCall, percentile

AGENT = "bench-voice"
TOKEN = "bench-vapi-server-token-0001"
TEMPLATE = (
    "You are Acme's phone assistant. Answer in one short sentence."
    "{% if caller_number %} Caller: {{ caller_number }}.{% endif %}"
)
VARIABLES = {"caller_number": {"type": "string", "required": False}}
TARGETS = ("mock direct", "gateway, plain", "gateway, agent", "VAPI channel")
UTTERANCES = (
    "Hi, I would like to check my appointment.",
    "It is under the name Smith.",
    "Can I move it to Friday afternoon?",
    "Great, thank you very much.",
    "Goodbye.",
)


def bench_config(mock_url: str, key: str) -> dict:
    return {
        "providers": [{"name": "mock", "kind": "openai", "base_url": f"{mock_url}/v1", "api_keys": ["bench-key"]}],
        "models": [{"name": "voice", "deployments": [{"provider": "mock", "model": "mock-gpt"}]}],
        "channels": {
            "vapi": {
                "bench": {
                    "tenant": "default",
                    "api_key": key,
                    "public_url": "https://gateway.example.com",
                    "auth": {"bearer_token": TOKEN},
                    "phone_numbers": {"pn_bench": AGENT},
                    "default_agent": AGENT,
                }
            }
        },
    }


async def _ttft(session: aiohttp.ClientSession, url: str, headers: dict, body: dict) -> tuple[float | None, float]:
    """(time to the first non-empty content delta, time to the end of the stream), ms — measured
    the same way for every target (and as VapiCall.say measures the channel)."""
    started = time.perf_counter()
    async with session.post(url, data=orjson.dumps(body), headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: {resp.status} {(await resp.read())[:300]!r}")
        first = None
        buf = b""
        async for data in resp.content.iter_any():
            if first is not None:
                continue
            buf += data
            while first is None and b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                payload = event.partition(b"data:")[2].strip()
                if not payload or payload == b"[DONE]":
                    continue
                for choice in orjson.loads(payload).get("choices") or ():
                    if (choice.get("delta") or {}).get("content"):
                        first = (time.perf_counter() - started) * 1000
        return first, (time.perf_counter() - started) * 1000


async def _drive(gateway: str, mock: str, key: str, calls: int) -> dict[str, dict[str, list[float]]]:
    samples: dict[str, dict[str, list[float]]] = {"ttft": {t: [] for t in TARGETS}, "total": {t: [] for t in TARGETS}}
    json_headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=8)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(calls):
            vapi = VapiCall(
                session,
                f"{gateway}/channels/vapi/bench",
                {"Authorization": f"Bearer {TOKEN}"},
                phone_number_id="pn_bench",
                follow_assistant=False,
            )
            conv = f"bench-{uuid.uuid4().hex}"
            history: list[dict] = []  # the plain and agent targets' own transcript
            for text in UTTERANCES:
                turn = [{"role": "user", "content": text}]
                plain = {"model": "voice", "messages": [*history, *turn], "stream": True}
                agent = {
                    "model": f"agent:{AGENT}",
                    "messages": turn,
                    "stream": True,
                    "metadata": {"conversation_id": conv},
                    "variables": {"caller_number": "+14155550123"},
                }
                direct = {**plain, "model": "mock-gpt"}
                auth = {**json_headers, "Authorization": f"Bearer {key}"}
                results = {
                    "mock direct": await _ttft(
                        session, f"{mock}/v1/chat/completions", {**json_headers, "Authorization": "Bearer b"}, direct
                    ),
                    "gateway, plain": await _ttft(session, f"{gateway}/v1/chat/completions", auth, plain),
                    "gateway, agent": await _ttft(session, f"{gateway}/v1/chat/completions", auth, agent),
                }
                said = await vapi.say(text)
                if said.status != 200:
                    raise RuntimeError(f"VAPI channel: {said.status} {said.answer[:300]}")
                results["VAPI channel"] = (said.ttft_ms, said.total_ms)
                for name, (first, total) in results.items():
                    if first is not None:
                        samples["ttft"][name].append(first)
                    samples["total"][name].append(total)
                history += [*turn, {"role": "assistant", "content": said.answer}]
    return samples


def run(stack, tmp, calls: int = 40, ttft_ms: float = 50.0, chunk_ms: float = 10.0) -> dict:
    from loadtest.bench import _free_port, _wait

    port = _free_port()
    mock = f"http://127.0.0.1:{port}"
    stack._spawn(
        [
            "taskset", "-c", "1", sys.executable, "-m", "loadtest.mock_provider",
            "--port", str(port), "--no-record", "--ttft-ms", str(ttft_ms), "--chunks", "8", "--chunk-ms", str(chunk_ms),
        ],
        "mock-ttft",
    )  # fmt: skip
    _wait(f"{mock}/health")
    url, _ = stack.gateway("gateway-vapi", bench_config(mock, stack.key))
    status = _create_agent(url)
    if status != 201:
        raise RuntimeError(f"creating the bench agent: {status}")
    # the load generator runs on core 1, off the gateway's core
    drive = ["taskset", "-c", "1", sys.executable, "-m", "loadtest.bench_vapi", "drive", url, mock, stack.key]
    subprocess.run([*drive, "3"], check=True, stdout=subprocess.DEVNULL)  # warm-up: connections, caches
    out = subprocess.run([*drive, str(calls)], check=True, capture_output=True, text=True)
    samples = orjson.loads(out.stdout.strip().splitlines()[-1])
    out = {}
    for name, values in samples["ttft"].items():
        out[name] = {
            "n": len(values),
            "p50_ms": round(statistics.median(values), 3),
            "p90_ms": round(percentile(values, 90), 3),
            "p99_ms": round(percentile(values, 99), 3),
            "whole_p50_ms": round(statistics.median(samples["total"][name]), 3),
        }
    return {
        "ttft": out,
        "calls": calls,
        "turns_per_call": len(UTTERANCES),
        "mock_ttft_ms": ttft_ms,
        "mock_chunk_ms": chunk_ms,
    }


def _create_agent(url: str) -> int:
    import json
    import urllib.error
    import urllib.request

    body = {"name": AGENT, "model": "voice", "template": TEMPLATE, "variables": VARIABLES}
    req = urllib.request.Request(
        f"{url}/admin/agents",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": "Bearer sk-master-bench", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    time.sleep(0.5)  # the registry's pub/sub reload
    return status


def report(results: dict, date: str) -> str:
    ttft = results["ttft"]
    base = ttft["mock direct"]["p50_ms"]
    added = ttft["VAPI channel"]["p50_ms"] - base
    lines = [
        f"# VAPI time to first token ({date})",
        "",
        f"{results['calls']} simulated calls × {results['turns_per_call']} turns (loadtest/vapi_sim.py), one turn at "
        f"a time, targets alternating; mock LLM with {results['mock_ttft_ms']:g} ms injected first-token latency "
        f"and 8 chunks {results['mock_chunk_ms']:g} ms apart (so a relay that buffered would show a first token "
        "as late as the whole answer). "
        "Gateway: 1 worker, policies on, pinned to core 0; mock and load generator on core 1.",
        "",
        "| target | turns | TTFT p50 ms | p90 ms | p99 ms | added p50 vs. mock | whole answer p50 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in TARGETS:
        r = ttft[name]
        lines.append(
            f"| {name} | {r['n']} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} "
            f"| {r['p50_ms'] - base:+.2f} | {r['whole_p50_ms']:.2f} |"
        )
    verdict = "meets" if added <= 20 else "misses"
    lines += [
        "",
        f"**The VAPI channel plus the agent runtime add {added:.2f} ms p50 to the model's first token** "
        f"({verdict} the goal of ≤ 20 ms). Of that, the agent runtime (prompt rendering, memory load; the "
        "turn is stored after the first token) is "
        f"{ttft['gateway, agent']['p50_ms'] - ttft['gateway, plain']['p50_ms']:+.2f} ms over a plain request and "
        f"the channel (credential, call mapping, its own HTTP call to the gateway, the relay) "
        f"{ttft['VAPI channel']['p50_ms'] - ttft['gateway, agent']['p50_ms']:+.2f} ms over the agent request.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m loadtest.bench_vapi drive GATEWAY_URL MOCK_URL KEY CALLS``: plays the calls
    and prints the TTFT samples per target as one JSON line."""
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 5 or args[0] != "drive":
        raise SystemExit(main.__doc__)
    _, gateway, mock, key, calls = args
    print(orjson.dumps(asyncio.run(_drive(gateway, mock, key, int(calls)))).decode())


if __name__ == "__main__":
    main()
