"""PII scrubbing benchmark (part of ``make bench``; alone: ``make bench ARGS="--only pii"``).

* Added latency of a 200-word new message with personal data in it: the same gateway, one model
  group under the default PII policy and one under an empty policy, requests alternating at a
  fixed rate; every message is new (a counter in it), so nothing comes from the cache.
* A conversation of 20 earlier turns plus the same new message: the earlier turns are cached,
  so the added cost should be no more than the newest message's.
* Event-loop stall: p50/p99 of PII-free requests while a load of PII requests is in flight,
  with analysis in a worker process (``pii.workers: 1``) and in the serving process (``0``).
* The scrub stage alone, in process, for the 200-word message (p50 over fresh messages).
* Adversarial texts (issue #11, item 2): analysis time of 64 KB with no whitespace, all
  digits, all ``@`` (and other hostile shapes) against a normal text of the same length, with
  analysis in a worker as the gateway runs it, and the longest event-loop lag seen meanwhile.
  Alone: ``python -m loadtest.bench_pii`` (writes ``loadtest/results/bench-pii-adversarial.*``).
* Precision and recall over the labelled corpora (``loadtest/pii_corpus.py``).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from loadtest import pii_corpus

FILLER = (
    "Hello support team, I am writing about my recent order because the parcel arrived damaged and two of "
    "the items were missing from the box. I have attached photos of the packaging and the receipt. Could you "
    "please arrange a replacement or a refund as soon as possible? I was told on the phone last week that "
    "someone would call me back within two working days, but nobody did. I have been a customer for many "
    "years and I have always been happy with the service, so this was a disappointment. "
)
PII_TAIL = (
    "You can reach me at maria.gonzalez@example.com or on +44 20 7946 0958 in the evenings. For the refund, "
    "use my account DE89 3704 0044 0532 0130 00, or the card ending in the number 4111 1111 1111 1111. "
)


def message(words: int = 200) -> str:
    """About ``words`` words: prose with four entities and a per-request counter (``{n}``)."""
    base = (PII_TAIL + "Reference ref-{n}. ").split()
    filler = FILLER.split()
    need = max(0, words - len(base))
    return " ".join((filler * (need // len(filler) + 1))[:need] + base)


def conversation(turns: int = 20) -> list[dict]:
    out = [{"role": "system", "content": "You are a helpful support agent for an online shop."}]
    for t in range(turns):
        out.append(
            {
                "role": "user",
                "content": f"Turn {t}: my number is +1 202 555 01{t:02d} and my mail is user{t}@example.org",
            }
        )
        out.append({"role": "assistant", "content": f"Thank you, noted for turn {t}. Anything else?"})
    return out


def pii_config() -> dict:
    return {
        "workers": 1,
        "policies": {
            "default": {
                "entities": {
                    "email": "pseudonymize",
                    "phone": "pseudonymize",
                    "credit_card": "mask",
                    "iban": "redact",
                    "us_ssn": "redact",
                    "ip_address": "pseudonymize",
                }
            },
            "open": {"entities": {}},
        },
        "models": {"bench-open": "open"},
    }


def _wrk_varying(tmp: Path, body: dict, key: str) -> Path:
    """A wrk script whose every request is new: ``{n}`` becomes thread id + counter."""
    path = tmp / "wrk-pii-varying.lua"
    path.write_text(
        f"""
local template = {json.dumps(json.dumps(body))}
local counter = 0
local id = 0
local threads = 0
function setup(thread) threads = threads + 1; thread:set("tid", threads) end
function init(args) id = tid end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
request = function()
  counter = counter + 1
  local body = string.gsub(template, "{{n}}", tostring(id) .. "x" .. tostring(counter))
  return wrk.format(nil, nil, nil, body)
end
"""
    )
    return path


async def _stage_p50(workers: int, data_dir: Path, samples: int = 200) -> dict:
    from core.config import parse_config
    from policies.pii.scrub import Scrubber, ScrubState

    cfg = parse_config(
        {
            "providers": [{"name": "p", "kind": "openai", "base_url": "http://x", "api_keys": ["k"]}],
            "models": [{"name": "m", "deployments": [{"provider": "p", "model": "m"}]}],
            "pii": {**pii_config(), "workers": workers, "models": {}},
        }
    )
    scrubber = Scrubber(cfg.pii, data_dir)
    await scrubber.start()
    policy = scrubber.policy_for(None, "m")
    template = message()
    out = {}
    try:
        await scrubber.scrub(
            {"messages": [{"role": "user", "content": "warm-up a@b.org"}]}, "chat", policy, ScrubState()
        )
        for label, turns in (("new message", 0), ("20 turns + new message", 20)):
            history = conversation(turns) if turns else []
            times = []
            for i in range(samples):
                body = {"messages": [*history, {"role": "user", "content": template.replace("{n}", f"{label[:2]}{i}")}]}
                t0 = time.perf_counter()
                await scrubber.scrub(body, "chat", policy, ScrubState())
                times.append((time.perf_counter() - t0) * 1000)
            out[label] = round(statistics.median(times), 3)
    finally:
        await scrubber.close()
    return out


ADVERSARIAL_BYTES = 65536
ADVERSARIAL_LIMIT = 10.0  # times the normal text of the same length (issue #11, item 2)


def adversarial_texts(n: int = ADVERSARIAL_BYTES) -> dict[str, str]:
    """Texts of ``n`` characters: two normal ones, then the hostile shapes."""
    normal, i = [], 0
    while sum(len(t) + 1 for t in normal) < n:
        normal.append(message().replace("{n}", str(i)))
        i += 1
    plain = (FILLER * (n // len(FILLER) + 1))[:n]

    def fill(unit: str) -> str:
        return (unit * (n // len(unit) + 1))[:n]

    return {
        "normal: prose with personal data": " ".join(normal)[:n],
        "normal: prose without": plain,
        "no whitespace": fill("abc.def@ghi-"),
        "all digits": "7" * n,
        "all @": "@" * n,
        "digit groups (4111 4111 …)": fill("4111 "),
        "a…a@ runs of 1000": fill("a" * 1000 + "@"),
        "digits and dashes": fill("1-"),
    }


async def _adversarial(data_dir: Path, rounds: int) -> dict:
    """Median time of ``Analyzer.find`` per text (worker process, no cache: every round a new
    text, its first character changed), and the longest event-loop lag while it ran."""
    from policies.pii.analysis import Analyzer, Spec

    spec = Spec(
        ("CREDIT_CARD", "EMAIL_ADDRESS", "IBAN_CODE", "IP_ADDRESS", "PHONE_NUMBER", "US_SSN"),
        ("US", "GB", "DE", "FR"),
        0.4,
        (),
        None,
        str(data_dir),
    )
    analyzer = Analyzer(workers=1, cache_size=0, timeout=120)
    await analyzer.start([spec])
    out: dict = {}
    try:
        await analyzer.find(spec, ["warm-up a@b.org"])
        for name, text in adversarial_texts().items():
            times, lags = [], []
            for r in range(rounds):
                lag = [0.0]
                done = asyncio.Event()

                async def ticker(lag=lag, done=done) -> None:
                    while not done.is_set():
                        t = time.perf_counter()
                        await asyncio.sleep(0.001)
                        lag[0] = max(lag[0], time.perf_counter() - t - 0.001)

                tick = asyncio.create_task(ticker())
                await asyncio.sleep(0.005)
                variant = chr(ord("!") + r % 90) + text[1:]  # new to the cache, same shape
                t0 = time.perf_counter()
                await analyzer.find(spec, [variant])
                times.append((time.perf_counter() - t0) * 1000)
                done.set()
                await tick
                lags.append(lag[0] * 1000)
            out[name] = {"ms_p50": round(statistics.median(times), 2), "loop_lag_max_ms": round(max(lags), 2)}
    finally:
        await analyzer.close()
    base = out["normal: prose with personal data"]["ms_p50"]
    for r in out.values():
        r["vs_normal"] = round(r["ms_p50"] / base, 2)
    return out


def adversarial(data_dir: Path, rounds: int = 7) -> dict:
    return asyncio.run(_adversarial(data_dir, rounds))


def adversarial_report(res: dict, date: str) -> str:
    lines = [
        f"# PII scrubbing of adversarial texts ({date})",
        "",
        f"Analysis of one {ADVERSARIAL_BYTES // 1024} KB text, as the gateway runs it (pre-filter and Presidio in "
        "a worker process, IPC included, no cache), median of 7 rounds; and the longest event-loop lag "
        "(a 1 ms ticker in the serving process) while it ran. Issue #11, item 2: hostile texts must stay "
        f"within {ADVERSARIAL_LIMIT:.0f}x a normal text of the same length. Before the fix, 8 KB of `@` "
        "took 2.25 s in the pre-filter alone, on the event loop (16 KB: 14 s in the issue; 64 KB: minutes).",
        "",
        "| text | ms p50 | vs normal | within limit | longest loop lag ms |",
        "|---|---:|---:|:-:|---:|",
    ]
    for name, r in res.items():
        ok = "yes" if r["vs_normal"] <= ADVERSARIAL_LIMIT else "**no**"
        lines.append(f"| {name} | {r['ms_p50']:.2f} | {r['vs_normal']:.2f}x | {ok} | {r['loop_lag_max_ms']:.2f} |")
    lines += [
        "",
        "Command: `.venv/bin/python -m loadtest.bench_pii` (also part of `make bench`).",
        "",
    ]
    return "\n".join(lines)


def _post(url: str, body: dict, key: str) -> None:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        resp.read()


def _log_p50(path: Path, field: str) -> float | None:
    values = []
    for line in path.read_text(errors="replace").splitlines():
        if f'"{field}"' in line:
            try:
                values.append(json.loads(line)[field])
            except (ValueError, KeyError):
                continue
    return round(statistics.median(values), 3) if values else None


def _into(out: dict, wrk, url: str, script: Path, seconds: int) -> None:
    out.update(wrk(url, script, seconds, 4))


def run(stack, tmp: Path, seconds: int, bench_config, wrk, latency_at_rate) -> dict:
    res: dict = {}
    cfg = bench_config(stack.mock_url, policies=False)
    cfg["models"].append({"name": "bench-open", "deployments": [{"provider": "mock", "model": "mock-gpt"}]})
    url, proc = stack.gateway("gateway-pii", {**cfg, "pii": pii_config()})
    inline_url, inline_proc = stack.gateway("gateway-pii-inline", {**cfg, "pii": {**pii_config(), "workers": 0}})
    for target in (url, inline_url):  # returns once Presidio is loaded (worker, or in process)
        _post(
            f"{target}/v1/chat/completions",
            {"model": "bench", "messages": [{"role": "user", "content": "a@b.org"}]},
            stack.key,
        )
    single = {"model": "bench", "messages": [{"role": "user", "content": message()}]}
    conv = {"model": "bench", "messages": [*conversation(), {"role": "user", "content": message()}]}
    files = {}
    for name, body in (
        ("pii-single", single),
        ("open-single", {**single, "model": "bench-open"}),
        ("pii-conv", conv),
        ("open-conv", {**conv, "model": "bench-open"}),
    ):
        files[name] = tmp / f"{name}.json"
        files[name].write_text(json.dumps(body))
    chat = f"{url}/v1/chat/completions"
    key = stack.key
    res["added"] = latency_at_rate(
        [(n, chat, key, str(files[n])) for n in ("open-single", "pii-single", "open-conv", "pii-conv")],
        {},
        seconds * 2,
        40,
    )
    # The same requests as the gateway saw them: time in the scrub stage (access log, pii_ms).
    res["stage_in_gateway_p50_ms"] = _log_p50(tmp / "gateway-pii.log", "pii_ms")
    # Event-loop stall: PII-free probes at 50 req/s, alone and beside a PII load (wrk, 4 connections).
    clean = {"model": "bench-open", "messages": [{"role": "user", "content": "What are your opening hours?"}]}
    stall = {}
    for label, target in (("pii.workers: 1", url), ("pii.workers: 0 (in the serving process)", inline_url)):
        probe = [("clean", f"{target}/v1/chat/completions", key)]
        alone = latency_at_rate(probe, clean, seconds, 50)["clean"]
        load: dict = {}
        script = _wrk_varying(tmp, single, key)
        t = threading.Thread(target=_into, args=(load, wrk, f"{target}/v1/chat/completions", script, seconds + 2))
        t.start()
        time.sleep(1)
        busy = latency_at_rate(probe, clean, seconds, 50)["clean"]
        t.join()
        stall[label] = {"alone": alone, "beside_pii_load": busy, "pii_load_rps": load.get("rps")}
    res["stall"] = stall
    stack.stop_gateway(proc)
    stack.stop_gateway(inline_proc)
    res["stage"] = {w: asyncio.run(_stage_p50(w, tmp / "data")) for w in (1, 0)}
    res["adversarial"] = adversarial(tmp / "data")
    corpus = asyncio.run(pii_corpus.evaluate(str(tmp / "data")))
    res["corpus"] = {k: v for k, v in corpus.items() if k != "errors"}
    res["corpus_report"] = pii_corpus.report(corpus)
    for path in (pii_corpus.HELDOUT, pii_corpus.FRESH):
        held = asyncio.run(pii_corpus.evaluate_heldout(str(tmp / "data"), path))
        res.setdefault("heldout", {})[path.name] = {k: v for k, v in held.items() if k != "errors"}
        res.setdefault("heldout_report", {})[path.name] = pii_corpus.heldout_report(held, path)
    res["words"] = len(message().split())
    return res


def report(res: dict, date: str) -> str:
    a = res["added"]
    single = a["pii-single"]["p50_ms"] - a["open-single"]["p50_ms"]
    conv = a["pii-conv"]["p50_ms"] - a["open-conv"]["p50_ms"]
    lines = [
        f"# PII scrubbing benchmark ({date})",
        "",
        f"Gateway (1 worker, pinned to core 0; its PII analysis process inherits that core) with the default "
        f"PII policy (email, phone pseudonymized, card masked, IBAN and SSN redacted, IPs pseudonymized) vs. "
        f"the same gateway's model group under an empty policy. New message: {res['words']} words with an "
        f"email, a phone number, an IBAN and a card number, new on every request.",
        "",
        "Latency at a fixed 40 req/s, targets alternating:",
        "",
        "| request | p50 ms | p90 ms | p99 ms |",
        "|---|---:|---:|---:|",
    ]
    for name, r in a.items():
        lines.append(f"| {name} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | {r['p99_ms']:.3f} |")
    lines += [
        "",
        f"**Added p50, 200-word new message: {single:+.3f} ms.** "
        f"With 20 earlier turns (cached) before it: {conv:+.3f} ms "
        f"(the earlier turns add {conv - single:+.3f} ms). Inside the gateway, the scrub stage of the PII "
        f"requests above (both kinds) took {res.get('stage_in_gateway_p50_ms')} ms p50 (access log `pii_ms`; the "
        "analysis worker shares the gateway's core here).",
        "",
        "The scrub stage alone, in process (p50 over 200 fresh messages):",
        "",
        "| analysis | new message ms | 20 turns + new message ms |",
        "|---|---:|---:|",
    ]
    for w, r in res["stage"].items():
        where = "worker process (IPC included)" if w else "in the serving process"
        lines.append(f"| {where} | {r['new message']:.3f} | {r['20 turns + new message']:.3f} |")
    lines += [
        "",
        "PII-free requests (50 req/s) alone and while 4 connections keep PII requests in flight:",
        "",
        "| analysis | alone p50 / p99 ms | beside PII load p50 / p99 ms | PII load req/s |",
        "|---|---:|---:|---:|",
    ]
    for label, s in res["stall"].items():
        lines.append(
            f"| {label} | {s['alone']['p50_ms']:.2f} / {s['alone']['p99_ms']:.2f} "
            f"| {s['beside_pii_load']['p50_ms']:.2f} / {s['beside_pii_load']['p99_ms']:.2f} "
            f"| {s['pii_load_rps'] or 0:.0f} |"
        )
    if "adversarial" in res:
        lines += ["", adversarial_report(res["adversarial"], date).split("\n", 2)[2]]
    lines += ["", "Detection quality over the corpus written beside the code:", "", res["corpus_report"], ""]
    for name, text in (res.get("heldout_report") or {}).items():
        lines += [f"Over the held-out corpus `{name}` (coverage scoring, see `loadtest/pii_corpus.py`):", "", text, ""]
    return "\n".join(lines)


def main() -> int:
    """The adversarial part alone: writes loadtest/results/bench-pii-adversarial.{md,json}."""
    results = Path(__file__).resolve().parent / "results"
    with tempfile.TemporaryDirectory(prefix="gw-bench-pii-adv-") as tmp:
        res = adversarial(Path(tmp))
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = adversarial_report(res, date)
    (results / "bench-pii-adversarial.md").write_text(text)
    (results / "bench-pii-adversarial.json").write_text(json.dumps({"date": date, "results": res}, indent=2))
    print(text)
    worst = max(r["vs_normal"] for r in res.values())
    return 0 if worst <= ADVERSARIAL_LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
