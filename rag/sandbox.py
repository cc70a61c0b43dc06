"""Extraction of hostile files with a bound on time and memory.

pypdf and python-docx have no time limit: a crafted PDF (deep object graphs, huge content
streams, decompression bombs) can spin a parser for minutes or grow it by gigabytes, and a
thread cannot be stopped. So PDF, DOCX and HTML files are read in a child process (``python -m
rag.sandbox FILE NAME TYPE``) with an address-space limit and a CPU-time limit, killed at the
deadline; the sections come back as JSON on stdout. HTML too: CPython's html.parser rescans the
rest of the input for every unterminated tag (``<a `` repeated: 60 KB ~30 s), quadratic in a
file of up to 20 MB. Plain text, Markdown and CSV run in a thread: their readers are linear
and ``extract`` already caps their size.

A child killed at the deadline or by its limits fails the document with ``timeout`` or
``too_large`` — final answers like any other extraction failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path

from rag.extract import Document, ExtractionError, Section, detect_type, extract

TIMEOUT = 60.0  # seconds of wall time per document
MEMORY = 1024 * 1024 * 1024  # bytes of address space for the child
MAX_OUTPUT = 64 * 1024 * 1024  # the JSON of a document's sections (extract caps text at 5 M chars)
SANDBOXED = ("pdf", "docx", "html")


# What the child may see of the environment: enough to start Python and import our packages.
# Never the gateway's secrets (master key, provider keys, database and Redis URLs): the child
# parses hostile files, so whatever it can read, a parser exploit could read.
_PASSED_ENV = ("PATH", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "TZ")


def child_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def _head(path: Path) -> bytes:
    with path.open("rb") as fh:
        return fh.read(4096)


def _limits(memory: int, cpu_seconds: int) -> None:  # pragma: no cover - runs in the child
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))


async def extract_bounded(
    path: Path,
    filename: str,
    content_type: str | None = None,
    *,
    deadline: float = TIMEOUT,
    memory: int = MEMORY,
) -> Document:
    """``rag.extract.extract``, in a child process with limits for PDF and DOCX; ``deadline``
    in seconds of wall time."""
    path = Path(path)
    head = await asyncio.to_thread(_head, path)
    if not head.strip() or detect_type(head, filename, content_type) not in SANDBOXED:
        return await asyncio.to_thread(extract, path, filename, content_type)
    cpu = max(1, int(deadline) + 1)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "rag.sandbox",
        str(path),
        filename,
        content_type or "",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        preexec_fn=lambda: _limits(memory, cpu),
        env=child_env(),
        limit=MAX_OUTPUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), deadline)
    except (TimeoutError, ValueError):  # ValueError: more output than MAX_OUTPUT
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise ExtractionError(
            "timeout", f"{filename!r} took longer than {deadline:g} s to read; split it or save it again."
        ) from None
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    try:
        result = json.loads(out)
    except ValueError:
        code = proc.returncode
        if code is not None and code < 0:  # killed by a signal: the CPU or memory limit
            raise ExtractionError(
                "too_large", f"{filename!r} needs more time or memory to read than a document may use."
            ) from None
        raise RuntimeError(f"the extraction process failed (exit {code})") from None
    if "error" in result:
        code, message = result["error"]
        raise ExtractionError(code, message)
    return [Section(tuple(p), text, kind) for p, text, kind in result["sections"]]


def _main(argv: list[str]) -> int:  # pragma: no cover - runs in the child
    path, filename, content_type = argv[0], argv[1], argv[2] or None
    try:
        sections = extract(Path(path), filename, content_type)
    except ExtractionError as exc:
        out = {"error": [exc.code, exc.message]}
    except MemoryError:
        out = {"error": ["too_large", f"{filename!r} needs more memory to read than a document may use."]}
    else:
        out = {"sections": [[list(s.path), s.text, s.kind] for s in sections]}
    sys.stdout.write(json.dumps(out))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main(sys.argv[1:]))
