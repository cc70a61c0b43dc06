"""Instructions per request: a gateway run under callgrind (valgrind), counted per kind of request.

CPU time per request on this shared 2-core machine moves by ±25 % between identical runs (other
tenants, the SMT sibling); the number of instructions the gateway executes for the same requests
moves by a few %. Counted here: the gateway starts under ``valgrind --tool=callgrind`` with
instrumentation off (start-up runs a few times slower than native, not fifty), is warmed up,
then instrumented; for each kind, the counters are zeroed, ``n`` requests are sent (16
concurrent, ``bench_agents``'s driver), ``SETTLE_S`` pass (its background writers finish what
the requests left), and the counters are dumped. Everything the process runs is counted: every thread, the event
loop, the background writers. What the process does with no request at all (its timers, liveness
beats, blocking reads: ~5 M instructions a second here, per second of the window, where a request
under callgrind takes tens of milliseconds) is measured once, idle, and taken off each count in
proportion to its window's length.

An instruction count is a proxy for CPU time, not a measure of it: it does not see cache misses
or branch mispredictions. Compare counts of one build's kinds, or of two builds, on this machine;
quote CPU time from the CPU benches.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from loadtest import bench_agents as ba

# After the last reply, the background writers finish what the requests left (a batch lingers
# 0.2 s; a few hundred entries take well under a second of callgrind's time).
SETTLE_S = 5.0


def ensure_valgrind() -> None:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("installing valgrind from Debian packages ...", flush=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "valgrind"],
            check=True,
            env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            stdout=subprocess.DEVNULL,
        )


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True)


def _total(path: Path) -> int | None:
    """The dump's instruction total: its last line, ``totals:`` (None until it is written whole)."""
    for line in reversed(path.read_text(errors="replace").splitlines()):
        if line.startswith("totals:"):
            return int(line.split()[1])
    return None


class CountedGateway:
    """A gateway (one worker, pinned to ``cores``) under callgrind, from ``stack`` (loadtest.bench)."""

    def __init__(self, stack, name: str, config: dict, env: dict | None = None, cores: str = "0") -> None:
        import yaml

        from loadtest.bench import _free_port, _wait

        self.stack = stack
        self.dir = stack.tmp / f"callgrind-{name}"
        self.dir.mkdir()
        port = _free_port()
        cfg = self.dir / "gateway.yaml"
        cfg.write_text(yaml.safe_dump(config))
        cmd = [
            "taskset", "-c", cores, "valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={self.dir}/out.%p",
            sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--port", str(port), "--workers", "1",
        ]  # fmt: skip
        self.proc = stack._spawn(cmd, f"gateway-{name}", env or stack.env)
        self.url = f"http://127.0.0.1:{port}"
        _wait(f"{self.url}/readyz", timeout=600)
        self.pid = str(self.proc.pid)
        self.idle_per_s = 0.0

    def instrument(self, idle_s: float = 10.0) -> None:
        """Counting on (after the warm-up: what start-up and first calls cost is not counted),
        then the idle rate measured (instructions a second with no request)."""
        _control("-i", "on", self.pid)
        time.sleep(SETTLE_S)
        _control("-z", self.pid)
        started = time.monotonic()
        time.sleep(idle_s)
        self.idle_per_s = self._dump() / (time.monotonic() - started)

    def count(self, key: str, body_file: Path, n: int, conc: int = 16) -> dict:
        """Instructions per request of ``n`` requests of one kind (background work included, the
        idle rate over the window taken off)."""
        _control("-z", self.pid)
        started = time.monotonic()
        sent = ba.send_n(f"{self.url}/v1/chat/completions", key, body_file, n, conc)
        time.sleep(SETTLE_S)  # (never looks idle under callgrind: its own timers cost ~10 % of a core)
        total = self._dump()
        window = time.monotonic() - started
        return {
            "requests": n,
            "errors": sent["errors"],
            "window_s": round(window, 1),
            "instructions_per_request": round((total - self.idle_per_s * window) / n),
            "raw_per_request": round(total / n),
        }

    def _dump(self) -> int:
        """Writes the counters out (and zeroes them); their total."""
        before = set(self.dir.glob("out.*"))
        _control("-d", self.pid)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # (the dump, written whole: its totals line is its last)
            new = set(self.dir.glob("out.*")) - before
            total = _total(max(new, key=lambda p: p.stat().st_mtime)) if new else None
            if total is not None:
                return total
            time.sleep(0.1)
        raise RuntimeError("callgrind wrote no whole dump within 30 s")

    def stop(self) -> None:
        self.stack.stop_gateway(self.proc)
