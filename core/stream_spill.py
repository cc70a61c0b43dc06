"""Records on local disk until PostgreSQL takes them: the ledger's spool (policies/ledger.py) and
the streams' spills.

While PostgreSQL is away, entries keep arriving in the Redis streams, and a stream that only
grows fills Redis's memory — and with it every budget, rate limit and conversation of the
gateway. Past a length, ``core.stream_writer.StreamWriter`` moves batches of its own stream here
(each appended and fsynced before the entries are acknowledged and deleted), and writes the
files to PostgreSQL once it is back.

One file per process (``spill-<stream>-<pid>.jsonl``, one JSON object of the entry's fields per
line). ``append_lines`` never leaves half a line behind: a write cut short (a full disk) is cut
back before the error goes up, and a file that ends mid-line (a crash) gets its line ended before
anything is added. A process holds a lock on ``<stem>.lock`` for its life; a file is another's
to take over only when that lock can be taken (its process is gone, whatever pid now exists). A
process claims its own files, and those of processes that are gone, by renaming each to a work
file of its own (``<stem>.<token>.replaying``): one process gets each. A work file replayed in
part and then again writes some entries twice; every writer's insert ignores rows already there
(the ledger's request id, a run's request id, a message's conversation and seq).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson

_held: dict[Path, int] = {}  # lock files this process holds (for its life)


def append_lines(path: Path, lines: list[bytes]) -> None:
    """``lines`` added to the file and on disk (fsync; the directory too when the file is new)
    when this returns; on an error the file is as it was."""
    if not lines:
        return
    fresh = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        size = os.fstat(fd).st_size
        data = b"".join(line + b"\n" for line in lines)
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data  # a line a crash cut short is ended first (its own replay skips it)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)
    if fresh:
        sync_dir(path.parent)


def sync_dir(directory: Path) -> None:
    """A directory's entries on disk (a file created or renamed in it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def hold(directory: Path, stem: str) -> None:
    """This process's lock on ``<stem>.lock``, held until it exits."""
    path = directory / f"{stem}.lock"
    if path in _held:
        return
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # another process of this pid (another namespace) holds it: do not take its files
        os.close(fd)
        return
    _held[path] = fd


def _gone(directory: Path, stem: str, pid: int) -> bool:
    """Whether the process that wrote ``stem``'s files is gone: its lock can be taken (or, for a
    file of a release without locks, no process has its pid)."""
    lock = directory / f"{stem}.lock"
    if lock in _held:
        return False
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # (closing releases a lock taken here)
    with contextlib.suppress(FileNotFoundError):
        lock.unlink()
    return True


def claim(
    directory: Path, own: list[Path], stem: str, patterns: tuple[str, ...], owner_of: Callable[[str], tuple[str, int]]
) -> list[Path]:
    """Renames this process's files (``own``) and those matching ``patterns`` whose process is
    gone (``owner_of(name)``: its stem and pid) to work files of this process
    (``<stem>.<token>.replaying``: the rename is atomic, so one process gets each); returns this
    process's work files."""
    hold(directory, stem)
    gone = []
    for pattern in patterns:
        for path in directory.glob(pattern):
            try:
                owner, pid = owner_of(path.name)
            except (ValueError, IndexError):
                continue
            if owner != stem and _gone(directory, owner, pid):
                gone.append(path)
    renamed = False
    for path in [*own, *gone]:
        with contextlib.suppress(FileNotFoundError):  # (another process claimed it first)
            path.rename(directory / f"{stem}.{secrets.token_hex(4)}.replaying")
            renamed = True
    if renamed:  # the new names on disk before their records go to PostgreSQL and the files away
        sync_dir(directory)
    return sorted(directory.glob(f"{stem}.*.replaying"))


def line_chunks(path: Path, max_bytes: int, max_lines: int) -> Iterator[list[bytes]]:
    """A file's lines, a batch of at most ``max_lines`` and ``max_bytes`` at a time (or one
    line, when it alone is larger); read as it goes, never whole."""
    batch: list[bytes] = []
    size = 0
    with open(path, "rb") as f:
        for line in f:
            line = line.rstrip(b"\n")
            if not line.strip():
                continue
            if batch and (size + len(line) > max_bytes or len(batch) >= max_lines):
                yield batch
                batch, size = [], 0
            batch.append(line)
            size += len(line)
    if batch:
        yield batch


class SpillFile:
    def __init__(self, directory: Path, stream: str) -> None:
        self.directory = directory
        self.prefix = "spill-" + re.sub(r"[^A-Za-z0-9]+", "_", stream).strip("_") + "-"
        self.stem = f"{self.prefix}{os.getpid()}"
        self.path = directory / f"{self.stem}.jsonl"

    def append(self, records: list[dict]) -> None:
        """The entries' fields, on disk (fsync) when this returns."""
        self.directory.mkdir(parents=True, exist_ok=True)
        hold(self.directory, self.stem)
        append_lines(
            self.path,
            [orjson.dumps({k.decode(): v.decode("utf-8", "replace") for k, v in r.items()}) for r in records],
        )

    def claim(self) -> list[Path]:
        """This process's spill and those of processes that are gone, as work files of its own."""
        if not self.directory.exists():
            return []

        def owner_of(name: str) -> tuple[str, int]:
            pid = name[len(self.prefix) :].split(".", 1)[0]
            return f"{self.prefix}{pid}", int(pid)

        return claim(
            self.directory,
            [self.path],
            self.stem,
            (f"{self.prefix}*.jsonl", f"{self.prefix}*.replaying"),
            owner_of,
        )


def chunks(path: Path, max_bytes: int, max_lines: int) -> Iterator[list[dict]]:
    """A spill work file's entries (fields as bytes, as the stream gives them), in batches of
    at most ``max_lines`` entries and ``max_bytes``; a line a crash cut short is skipped."""
    for lines in line_chunks(path, max_bytes, max_lines):
        batch = []
        for line in lines:
            try:
                fields = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(fields, dict):
                batch.append({str(k).encode(): str(v).encode() for k, v in fields.items()})
        if batch:
            yield batch
