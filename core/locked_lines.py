"""A file of lines that processes append to and one may rewrite (the ledger's refused spooled
records, ``ledger-dead.jsonl``, rewritten by an erasure).

Appending and rewriting hold the same exclusive ``flock`` on ``<file>.lock`` (a file that is
never replaced, so every process locks the same one; several processes may share a data
directory). A rewrite writes a new file beside the old one and renames it over it: a line
appended to the old file after it was read and before the rename would be lost without the
lock; with it, an append waits for the rename and goes to the new file. A rewrite killed before
its rename leaves its new file; the next one removes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

from core.stream_spill import append_lines, sync_dir


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """The file's lock, held (blocking until it is free) for the block."""
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # (releases the lock)


def append(path: Path, lines: list[bytes]) -> None:
    """``append_lines`` under the file's lock."""
    if lines:
        with locked(path):
            append_lines(path, lines)


def append_new(path: Path, lines: list[bytes], key_of: Callable[[bytes], object]) -> int:
    """``lines`` under the file's lock, but those whose key (``key_of(line)``) a line of the file
    has already, or an earlier one of ``lines``: a batch appended again adds nothing. Reads the
    file line by line (a file of rare lines: records refused while Redis was away). The number
    appended."""
    if not lines:
        return 0
    keys = [key_of(line) for line in lines]
    wanted = set(keys)
    with locked(path):
        seen: set = set()
        with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
            for raw in f:
                key = key_of(raw.rstrip(b"\n"))
                if key in wanted:
                    seen.add(key)
        fresh = []
        for line, key in zip(lines, keys, strict=True):
            if key not in seen:
                seen.add(key)
                fresh.append(line)
        append_lines(path, fresh)
    return len(fresh)


def rewrite(path: Path, change: Callable[[bytes], bytes | None]) -> int:
    """Passes each line (without its newline) to ``change``, which returns the line to keep in
    its place, or None to keep it as it is. Under the file's lock; the file is replaced whole
    (a new file, fsynced, renamed over it) only when a line changed, and the new file is written
    from the first line that does (a rewrite that changes none writes nothing). The number
    changed."""
    if not path.exists():
        return 0
    with locked(path):
        _drop_leftovers(path)
        try:
            src = open(path, "rb")  # (closed by the with below, whatever happens in it)
        except FileNotFoundError:
            return 0
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        changed, kept, out = 0, 0, None  # kept: the bytes before the first changed line
        try:
            with src:
                for raw in src:
                    line = raw.rstrip(b"\n")
                    new = change(line) if line.strip() else None
                    if new is not None and new != line:
                        if out is None:
                            out = open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
                            _copy_head(path, kept, out)
                        changed += 1
                        line = new
                    if out is not None:
                        out.write(line + b"\n")
                    else:
                        kept += len(raw)
            if out is not None:
                out.flush()
                os.fsync(out.fileno())
                out.close()
                os.replace(tmp, path)
                sync_dir(path.parent)
        finally:
            if out is not None:
                out.close()
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
    return changed


def _copy_head(path: Path, size: int, out) -> None:
    """The file's first ``size`` bytes (whole lines, kept as they are) into ``out``."""
    with open(path, "rb") as head:
        while size > 0:
            chunk = head.read(min(size, 1 << 20))
            if not chunk:
                break
            out.write(chunk)
            size -= len(chunk)


def _drop_leftovers(path: Path) -> None:
    """New files of rewrites killed before their rename (under the lock: no rewrite in progress
    has one then). Each is a copy of the file, which a later rewrite would not change."""
    for leftover in path.parent.glob(f"{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
