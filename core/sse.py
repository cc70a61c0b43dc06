"""Server-sent events: framing of upstream streams and encoding of our own events."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson

DONE = b"data: [DONE]\n\n"


def data_event(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class EventSplitter:
    """Cuts a byte stream into complete SSE events (each ending in a blank line)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf + data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        parts = buf.split(b"\n\n")
        self._buf = parts.pop()
        return [p + b"\n\n" for p in parts if p]

    @property
    def rest(self) -> bytes:
        return self._buf


def parse_event(raw: bytes) -> tuple[str | None, bytes]:
    """(event name, joined data) of one complete event."""
    name = None
    data: list[bytes] = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data:"):
            data.append(line[5:].lstrip(b" ") if line[5:6] == b" " else line[5:])
        elif line.startswith(b"event:"):
            name = line[6:].strip().decode()
    return name, b"\n".join(data)


async def iter_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[str | None, bytes]]:
    splitter = EventSplitter()
    async for chunk in chunks:
        for raw in splitter.feed(chunk):
            yield parse_event(raw)
