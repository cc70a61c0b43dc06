"""Server-sent events: framing of upstream streams and encoding of our own events."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson

DONE = b"data: [DONE]\n\n"


def data_event(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


# The longest event an upstream may send: one that never ends (a line without end, no blank
# line ever) is cut off here instead of being buffered until the request's total timeout.
MAX_EVENT_BYTES = 16 * 1024 * 1024


class EventTooLarge(ValueError):
    """An event grew past the splitter's bound without ending."""


class EventSplitter:
    """Cuts a byte stream into complete SSE events (each ending in a blank line).

    Linear in what is fed: bytes of an unfinished event are kept as they came and joined once,
    when the blank line that ends it arrives (only the last three bytes are looked at again,
    for a boundary cut between two reads). An event longer than ``limit`` raises
    ``EventTooLarge``."""

    __slots__ = ("_parts", "_size", "_tail", "limit")

    def __init__(self, limit: int = MAX_EVENT_BYTES) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self._tail = b""  # the last bytes of the unfinished event, as received
        self.limit = limit

    def feed(self, data: bytes) -> list[bytes]:
        if self._parts:
            probe = self._tail + data
            if b"\r" in probe:
                probe = probe.replace(b"\r\n", b"\n")
            if b"\n\n" not in probe:  # the event goes on: keep the piece, join nothing
                self._parts.append(data)
                self._size += len(data)
                self._tail = (self._tail + data)[-3:]
                if self._size > self.limit:
                    raise EventTooLarge(f"an event longer than {self.limit} bytes")
                return []
            self._parts.append(data)
            buf = b"".join(self._parts)
        else:
            buf = data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        parts = buf.split(b"\n\n")
        rest = parts.pop()
        self._parts = [rest] if rest else []
        self._size = len(rest)
        self._tail = rest[-3:]
        if self._size > self.limit:
            raise EventTooLarge(f"an event longer than {self.limit} bytes")
        return [p + b"\n\n" for p in parts if p]

    @property
    def rest(self) -> bytes:
        rest = b"".join(self._parts)
        return rest.replace(b"\r\n", b"\n") if b"\r" in rest else rest


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
