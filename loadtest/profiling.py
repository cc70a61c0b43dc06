"""py-spy and /proc helpers for the benchmarks: CPU time and RSS of a server process, and a
sampled profile summarised as its hottest frames.

py-spy is a standalone (Rust) sampler that needs nothing of the gateway's environment, so it
lives in a venv of its own (``.venv-bench``, from loadtest/requirements-bench.txt, built by
``make bench``): the gateway's lock stays what the gateway runs with.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process (fields 14 and 15 of /proc/<pid>/stat), in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def tree_ticks(pid: int) -> int:
    """CPU ticks of a process and all its descendants (servers that fork their workers)."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            total += cpu_ticks(p)
            todo += children(p)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(c) for c in text]
    return found


def py_spy() -> str | None:
    for candidate in (ROOT / ".venv-bench" / "bin" / "py-spy", Path(sys.executable).parent / "py-spy"):
        if candidate.exists():
            return str(candidate)
    return shutil.which("py-spy")


def _frame(f: str) -> str:
    return re.sub(r":\d+\)$", ")", f).replace(str(ROOT) + "/", "")


def record(pid: int, out: Path, seconds: int, load) -> subprocess.Popen | None:
    """Starts py-spy on ``pid`` (raw folded stacks to ``out``), runs ``load()``, waits for it."""
    spy = py_spy()
    if spy is None:
        return None
    rec = subprocess.Popen(
        [spy, "record", "-p", str(pid), "-d", str(seconds), "-r", "250", "-f", "raw", "-o", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    load()
    try:
        rec.wait(seconds + 30)
    except subprocess.TimeoutExpired:
        rec.kill()
    return rec


def sample_counts(folded: Path) -> tuple[int, collections.Counter, collections.Counter] | None:
    """(samples, per frame: samples with it anywhere on the stack, samples with it on top) of a
    folded-stack file; None when it holds no sample."""
    if not folded.exists():
        return None
    inclusive: collections.Counter = collections.Counter()
    self_: collections.Counter = collections.Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_frame(f) for f in stack.split(";")]
        n = int(count)
        total += n
        for frame in set(frames):
            inclusive[frame] += n
        self_[frames[-1]] += n
    return (total, inclusive, self_) if total else None


def summarise(folded: Path, top: int = 15) -> dict | None:
    """The hottest frames of a folded-stack file: most often on top of the stack (self), and
    most often anywhere on it (inclusive), as shares of all samples."""
    counts = sample_counts(folded)
    if counts is None:
        return None
    total, inclusive, self_ = counts
    skip = ("<module>", "Runner.run", "cmd_serve", "Server.run", "asyncio_run", "_run_code", "main (", "run (uvicorn")
    incl = [(f, n) for f, n in inclusive.most_common(200) if not any(s in f for s in skip)]
    return {
        "samples": total,
        "self_pct": [(f, round(100 * n / total, 1)) for f, n in self_.most_common(top)],
        "inclusive_pct": [(f, round(100 * n / total, 1)) for f, n in incl[:top]],
    }


def profile(pid: int, tmp: Path, name: str, load, seconds: int, keep: Path | None = None) -> dict | None:
    out = tmp / f"spy-{name}.txt"
    rec = record(pid, out, seconds, load)
    if rec is None or rec.returncode != 0:
        return None
    if keep is not None and out.exists():
        # Folded stacks with line numbers: open in speedscope or feed to flamegraph.pl.
        keep.write_text(out.read_text())
    return summarise(out)
