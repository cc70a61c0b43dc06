"""``make loadtest``: run loadtest/locustfile.py headless against a running gateway, then write a
summary (requests, failures, p50/p95/p99, req/s per name) to loadtest/results/locust-latest.md,
beside the final statistics in locust's CSV format (locust-latest_stats.csv, _failures.csv,
written by the locustfile when locust quits).

    make loadtest ARGS="--users 20 --spawn-rate 5 --run-time 30s"
    make loadtest ARGS="--host http://127.0.0.1:9000 --name locust-3-replicas -- --processes 2"
    python -m loadtest.locust_summary --from-csv loadtest/results/locust-latest   # summary only

The gateway is ``--host``, else ``$GATEWAY_URL``, else http://127.0.0.1:8000; the virtual key is
``$GATEWAY_API_KEY``. Arguments after ``--`` go to locust unchanged. Runs in the venv of
loadtest/requirements-locust.txt (.venv-locust); uses only the standard library itself. Exit
status: locust's (1 when any request failed).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "loadtest" / "results"
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"


def _num(row: dict, key: str) -> float:
    try:
        return float(row.get(key) or 0)
    except ValueError:  # "N/A" for names without samples
        return 0.0


def summarize(prefix: Path, meta: dict[str, str]) -> str:
    """Markdown for locust's ``<prefix>_stats.csv`` (and ``_failures.csv``)."""
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    lines = [f"# Locust load test ({meta.get('when', '')})", ""]
    described = ", ".join(f"{k}: {v}" for k, v in meta.items() if k not in ("when", "note") and v)
    if described:
        lines += [described + ".", ""]
    if meta.get("note"):
        lines += [meta["note"], ""]
    lines += [
        "| type | name | requests | failures | p50 ms | p95 ms | p99 ms | max ms | req/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    http = {"requests": 0, "failures": 0, "rps": 0.0}
    for row in rows:
        if row["Name"] == "Aggregated":  # locust's, which counts the SSE timings as requests too
            continue
        if row["Type"] != "SSE":
            http["requests"] += int(_num(row, "Request Count"))
            http["failures"] += int(_num(row, "Failure Count"))
            http["rps"] += _num(row, "Requests/s")
        lines.append(
            f"| {row['Type']} | {row['Name']} | {int(_num(row, 'Request Count'))} | {int(_num(row, 'Failure Count'))} "
            f"| {_num(row, '50%'):.0f} | {_num(row, '95%'):.0f} | {_num(row, '99%'):.0f} "
            f"| {_num(row, 'Max Response Time'):.0f} | {_num(row, 'Requests/s'):.1f} |"
        )
    lines.append(f"| | **all HTTP requests** | {http['requests']} | {http['failures']} | | | | | {http['rps']:.1f} |")
    lines += [
        "",
        "Percentiles are locust's (bucketed: exact below 100 ms, then rounded to two significant "
        'digits). "chat stream (headers)" is the time to the response headers; "chat stream: first '
        'token" (SSE) the time to the first content delta; "chat stream: complete" the whole stream. '
        "The SSE rows are reported by the locustfile, not timed by locust's HTTP client.",
    ]
    failures_path = Path(f"{prefix}_failures.csv")
    if failures_path.exists():
        with open(failures_path, newline="") as f:
            failures = list(csv.DictReader(f))
        if failures:
            lines += ["", "## Failures", "", "| name | error | count |", "|---|---|---:|"]
            for row in failures:
                error = row["Error"].replace("|", "\\|").replace("\n", " ")[:300]
                lines.append(f"| {row['Name']} | {error} | {row['Occurrences']} |")
    return "\n".join(lines) + "\n"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip()
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(prog="make loadtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default=os.environ.get("GATEWAY_URL", "http://127.0.0.1:8000"))
    p.add_argument("--users", "-u", type=int, default=20)
    p.add_argument("--spawn-rate", "-r", type=float, default=5)
    p.add_argument("--run-time", "-t", default="30s")
    p.add_argument("--name", default="locust-latest", help="results file stem under loadtest/results/")
    p.add_argument("--note", default="", help="a sentence for the summary (what was measured, on what)")
    p.add_argument("--from-csv", type=Path, help="only summarize existing CSV with this prefix")
    args = p.parse_args(argv)

    meta = {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "target": args.host,
        "users": str(args.users),
        "spawn rate": f"{args.spawn_rate:g}/s",
        "duration": args.run_time,
        "weights": os.environ.get("LOCUST_WEIGHTS", "") or "chat=5,stream=3,embed=2,agent=0",
        "think time": f"{os.environ.get('LOCUST_WAIT_MIN', '0.5')}-{os.environ.get('LOCUST_WAIT_MAX', '2')} s",
        "machine": f"{os.cpu_count()} cores, Python {platform.python_version()}",
        "commit": _git_commit(),
        "note": args.note,
    }
    if args.from_csv:
        out = args.from_csv.with_suffix(".md")
        out.write_text(summarize(args.from_csv, {"when": meta["when"], "note": args.note}))
        print(f"wrote {out}")
        return 0
    if not os.environ.get("GATEWAY_API_KEY"):
        print("set GATEWAY_API_KEY to a virtual key (.venv/bin/gateway keys create --name locust)", file=sys.stderr)
        return 2
    RESULTS.mkdir(parents=True, exist_ok=True)
    prefix = RESULTS / args.name
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        args.host,
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.spawn_rate),
        "--run-time",
        args.run_time,
        "--only-summary",
        "--stop-timeout",
        "30",
        *extra,
    ]
    print("$ " + " ".join(cmd), flush=True)
    stats = Path(f"{prefix}_stats.csv")
    stats.unlink(missing_ok=True)
    code = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "LOCUST_RESULTS_PREFIX": str(prefix)}).returncode
    if not stats.exists():
        print("locust wrote no statistics", file=sys.stderr)
        return code or 1
    out = prefix.with_suffix(".md")
    out.write_text(summarize(prefix, meta))
    print(f"wrote {out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
