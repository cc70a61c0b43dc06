"""JSON-lines logging. Every line about a request carries its ``request_id``."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import traceback

import orjson


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = "".join(traceback.format_exception(*record.exc_info))[-4000:]
        return orjson.dumps(entry, default=str).decode()


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access", "asyncio", "LiteLLM", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


class AccessLog:
    """Access-log lines, written without the logging machinery since they come per request.

    Lines are gathered and written in one system call per event-loop turn (or every 256
    lines), not one each; ``flush`` runs at shutdown.
    """

    def __init__(self, stream=None) -> None:
        self._stream = stream
        self._lines: list[bytes] = []
        self._scheduled = False

    def write(self, fields: dict) -> None:
        fields["ts"] = round(time.time(), 6)
        self._lines.append(orjson.dumps(fields, default=str) + b"\n")
        if len(self._lines) >= 256:
            self.flush()
        elif not self._scheduled:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
                self._scheduled = True
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        self._scheduled = False
        if self._lines:
            data, self._lines = b"".join(self._lines), []
            stream = self._stream or sys.stderr.buffer
            stream.write(data)
            stream.flush()


access_log = AccessLog()
