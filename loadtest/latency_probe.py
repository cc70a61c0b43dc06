"""Added latency at a fixed request rate, measured with microsecond resolution.

Requests go out on a fixed schedule (open loop) over one keep-alive connection per target,
alternating between the targets, so machine noise hits every target alike. Prints JSON with
p50/p90/p99 in milliseconds per target. A target may bring its own body (``name=url=key=file``);
``{n}`` in a body is replaced by a per-request counter, so every request is new to caches.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import aiohttp


def _body(template: bytes, n: int) -> bytes:
    return template.replace(b"{n}", str(n).encode()) if b"{n}" in template else template


async def probe(targets: list[tuple[str, str, str, bytes]], rate: float, seconds: float) -> dict:
    samples: dict[str, list[float]] = {name: [] for name, *_ in targets}
    errors: dict[str, int] = {name: 0 for name, *_ in targets}
    sessions = {name: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for name, *_ in targets}
    try:
        for name, url, key, body in targets:  # warm the connections (and whatever is cached)
            async with sessions[name].post(
                url,
                data=_body(body, -1),
                headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            ) as r:
                await r.read()
        interval = 1.0 / rate
        start = time.perf_counter()
        n = int(rate * seconds)
        for i in range(n):
            name, url, key, body = targets[i % len(targets)]
            due = start + i * interval
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            t0 = time.perf_counter()
            async with sessions[name].post(
                url, data=_body(body, i), headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            ) as r:
                await r.read()
                ok = r.status == 200
            if ok:
                samples[name].append((time.perf_counter() - t0) * 1000)
            else:
                errors[name] += 1
    finally:
        for s in sessions.values():
            await s.close()
    out = {}
    for name, values in samples.items():
        values.sort()
        q = statistics.quantiles(values, n=100)
        out[name] = {
            "p50_ms": round(q[49], 3),
            "p90_ms": round(q[89], 3),
            "p99_ms": round(q[98], 3),
            "n": len(values),
            "errors": errors[name],
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--target", action="append", required=True, help="name=url=key[=body file]")
    p.add_argument("--body", required=True)
    p.add_argument("--rate", type=float, default=100)
    p.add_argument("--seconds", type=float, default=10)
    a = p.parse_args()
    targets = []
    for t in a.target:
        name, url, key, *file = t.split("=", 3)
        targets.append((name, url, key, open(file[0], "rb").read() if file else a.body.encode()))
    import uvloop

    print(json.dumps(uvloop.run(probe(targets, a.rate, a.seconds))))


if __name__ == "__main__":
    main()
