"""Resident memory of a PII analysis worker under requests full of distinct tokens.

spaCy keeps every distinct word it has read in its vocabulary and string store, so a worker's
memory grows with every new IP address, identifier or made-up word it is sent. This sends
``--requests`` analysis calls, each ≈ 128 KiB of distinct IPv4 addresses with ports (the most
``pii.max_analysed_chars`` lets one request send; a bare dotted quad is read by its shape, one
word for all of them, since the s31 change, and no longer grows the vocabulary), through a real worker pool
(``analysis.Analyzer`` with one worker process, no cache), and reads the worker's resident
memory (``VmRSS`` of ``/proc/<pid>/status``, whatever process serves) after every call: once
with no bound (the behaviour before ``pii.worker_max_growth_mb``), once with the bound.

``python -m loadtest.bench_pii_worker_memory [--requests N] [--bound MB]`` prints a Markdown
table (Linux only: it reads ``/proc``).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time

from loadtest import pii_corpus

ADDRESSES = 6000  # ≈ 128 KiB of "a.b.c.d:port, " per request


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _text(rnd: random.Random) -> str:
    return ", ".join(
        f"{rnd.randint(1, 223)}.{rnd.randint(0, 255)}.{rnd.randint(0, 255)}.{rnd.randint(1, 254)}"
        f":{rnd.randint(1024, 65535)}"
        for _ in range(ADDRESSES)
    )


async def run(data_dir: str, requests: int, bound: float | None, every: int) -> list[dict]:
    from policies.pii.analysis import Analyzer

    spec = pii_corpus.spec(data_dir)
    analyzer = Analyzer(workers=1, cache_size=0, timeout=120, max_growth_mb=bound)
    await analyzer.start([spec])
    pool = analyzer._pool
    rows = []
    try:
        await analyzer.find(spec, ["warm-up 10.0.0.1 a@example.org"])
        rnd = random.Random(1)
        pids = {pool.workers[0].proc.pid}
        rows.append({"requests": 0, "rss_mb": _rss_mb(pool.workers[0].proc.pid), "recycled": 0, "workers": 1})
        for i in range(1, requests + 1):
            (found,) = await analyzer.find(spec, [_text(rnd)])
            assert len(found) > ADDRESSES * 0.9, len(found)  # analysed, not refused
            pid = pool.workers[0].proc.pid
            pids.add(pid)
            if i % every == 0 or i == requests:
                rows.append({"requests": i, "rss_mb": _rss_mb(pid), "recycled": pool.recycled, "workers": len(pids)})
                print(rows[-1], flush=True)
    finally:
        await analyzer.close()
    return rows


def report(before: list[dict], after: list[dict], bound: float, date: str) -> str:
    lines = [
        f"# PII worker memory under distinct tokens ({date})",
        "",
        f"Resident memory (MB) of the worker process serving the calls, after N analysis calls of {ADDRESSES:,}",
        "distinct IPv4 addresses with ports each (≈ 128 KiB, the default `pii.max_analysed_chars`), one worker,",
        "no cache. Before: no bound (as before `pii.worker_max_growth_mb`); after: the bound",
        f"`pii.worker_max_growth_mb: {bound:.0f}`. Every call was analysed (all addresses found).",
        "",
        "| calls | RSS before | RSS after | recycled (after) | worker processes used (after) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for b, a in zip(before, after, strict=True):
        lines.append(f"| {b['requests']} | {b['rss_mb']:.1f} | {a['rss_mb']:.1f} | {a['recycled']} | {a['workers']} |")
    peak_b = max(r["rss_mb"] for r in before)
    peak_a = max(r["rss_mb"] for r in after)
    lines += [
        "",
        f"Peak: {peak_b:.1f} MB before, {peak_a:.1f} MB after (start {before[0]['rss_mb']:.1f} MB).",
        "",
        "Command: `.venv/bin/python -m loadtest.bench_pii_worker_memory "
        f"--requests {before[-1]['requests']} --bound {bound:.0f}`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--bound", type=float, default=256)
    parser.add_argument("--every", type=int, default=10)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gw-bench-pii-mem-") as tmp:
        before = asyncio.run(run(tmp, args.requests, None, args.every))
        after = asyncio.run(run(tmp, args.requests, args.bound, args.every))
    print(report(before, after, args.bound, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
