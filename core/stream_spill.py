"""A stream's backlog on local disk: while PostgreSQL is away, entries keep arriving in the Redis
stream, and a stream that only grows fills Redis's memory — and with it every budget, rate
limit and conversation of the gateway. Past a length, ``core.stream_writer.StreamWriter`` moves
batches of its own stream here (each appended and fsynced before the entries are acknowledged
and deleted), and writes the files to PostgreSQL once it is back.

One file per process (``spill-<stream>-<pid>.jsonl``, one JSON object of the entry's fields per
line). A process claims its own file, and those of processes that died, by renaming each to a
work file of its own (``….<token>.replaying``): one process gets each. A work file replayed in
part and then again writes some entries twice; every writer's insert ignores rows already there
(the ledger's request id, a run's request id, a message's conversation and seq).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson


class SpillFile:
    def __init__(self, directory: Path, stream: str) -> None:
        self.directory = directory
        self.prefix = "spill-" + re.sub(r"[^A-Za-z0-9]+", "_", stream).strip("_") + "-"
        self.path = directory / f"{self.prefix}{os.getpid()}.jsonl"

    def append(self, records: list[dict]) -> None:
        """The entries' fields, on disk (fsync) when this returns."""
        lines = [orjson.dumps({k.decode(): v.decode("utf-8", "replace") for k, v in r.items()}) for r in records]
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            f.write(b"".join(line + b"\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())

    def claim(self) -> list[Path]:
        """This process's spill and those of processes that are gone, as work files of its own."""
        return claim(
            self.directory,
            [self.path],
            f"{self.prefix}{os.getpid()}",
            (f"{self.prefix}*.jsonl", f"{self.prefix}*.replaying"),
            lambda name: int(name[len(self.prefix) :].split(".", 1)[0]),
        )


def claim(
    directory: Path, own: list[Path], stem: str, patterns: tuple[str, ...], pid_of: Callable[[str], int]
) -> list[Path]:
    """Renames this process's files (``own``) and those matching ``patterns`` whose process
    (``pid_of(name)``) is gone to work files of this process (``<stem>.<token>.replaying``: the
    rename is atomic, so one process gets each); returns this process's work files."""
    gone = []
    for pattern in patterns:
        for path in directory.glob(pattern):
            try:
                os.kill(pid_of(path.name), 0)
            except ProcessLookupError:
                gone.append(path)
            except (ValueError, IndexError, PermissionError):
                continue
    for path in [*own, *gone]:
        with contextlib.suppress(FileNotFoundError):  # (another process claimed it first)
            path.rename(directory / f"{stem}.{secrets.token_hex(4)}.replaying")
    return sorted(directory.glob(f"{stem}.*.replaying"))


def chunks(path: Path, max_bytes: int) -> Iterator[list[dict]]:
    """A work file's entries (fields as bytes, as the stream gives them), a batch of at most
    ``max_bytes`` of lines at a time (or one line, when it alone is larger)."""
    batch: list[dict] = []
    size = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                fields = orjson.loads(line)
            except orjson.JSONDecodeError:  # a line torn by a crash while it was written
                continue
            if not isinstance(fields, dict):
                continue
            if batch and size + len(line) > max_bytes:
                yield batch
                batch, size = [], 0
            batch.append({str(k).encode(): str(v).encode() for k, v in fields.items()})
            size += len(line)
    if batch:
        yield batch
