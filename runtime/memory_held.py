"""The stored windows a process holds decoded (``runtime.memory``'s cache), so a load whose
stored window is still the one held decodes nothing.

An entry is the window this process last stored or read of one conversation, keyed by the
conversation's Redis window key (tenant, agent and conversation hashed in it: no two share an
entry), with its ``tag`` (``n/x``: the seq of the turn that stored it and that turn's stream
entry id) and the settings it was cut for. Redis decides whether it is still good: ``load``
sends the held tag and the script answers a marker only while the stored window is that one
(another replica's turn, an erasure, an eviction or an expiry changes or deletes it). Not the
``n`` alone: a seq is handed out again once the counter is gone and PostgreSQL holds nothing (an
erased conversation written to again a day later starts at 1), a stream entry id is not. Bounded by
entries and by the bytes of the windows held (their stored JSON, and ``PER_MESSAGE`` a message
for its decoded dict and strings: a window of tiny messages costs far more than its JSON), the
least recently used going first.

A window handed out from here is a new list (and token list) each time; its messages are the
held dicts themselves, read-only as every loaded window's are (the agent stage sends them on,
the next append stores them).
"""

from __future__ import annotations

from collections import OrderedDict

from runtime.memory_window import Window

MAX_HELD = 4096  # conversations
MAX_HELD_BYTES = 64 * 1024 * 1024  # of the held windows' stored JSON and their messages' PER_MESSAGE
PER_MESSAGE = 512  # what a decoded message costs besides its JSON (its dict, its strings, its count)


class _Held:
    __slots__ = ("fingerprint", "joined", "last_tools", "messages", "n", "size", "sizes", "starts", "tag", "tokens")

    def __init__(self, n: int, tag: str, fingerprint: str, window: Window, size: int) -> None:
        self.n = n
        self.tag = tag
        self.fingerprint = fingerprint
        self.messages = list(window)
        self.tokens = list(window.tokens)
        self.joined = window.joined
        self.sizes = window.sizes
        self.starts = window.starts
        self.last_tools = window.last_tools
        self.size = size


class HeldWindows:
    def __init__(self, max_entries: int = MAX_HELD, max_bytes: int = MAX_HELD_BYTES) -> None:
        self._entries: OrderedDict[str, _Held] = OrderedDict()
        self._bytes = 0
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self.hits = 0  # windows handed out without a decode (tests)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, fingerprint: str) -> _Held | None:
        """The window held for ``key``, if it was cut for these settings."""
        held = self._entries.get(key)
        return held if held is not None and held.fingerprint == fingerprint else None

    def window(self, key: str, held: _Held) -> Window:
        """A copy of ``held`` (``get``'s), which Redis said is still the stored window."""
        if self._entries.get(key) is held:
            self._entries.move_to_end(key)
        out = Window(held.messages)
        out.tokens = list(held.tokens)
        out.seq = held.n
        out.joined = held.joined
        out.sizes = held.sizes
        out.starts = held.starts
        out.last_tools = held.last_tools
        self.hits += 1
        return out

    def put(self, key: str, n: int, tag: str, fingerprint: str, window: Window, size: int) -> None:
        """Holds ``window`` as the stored window ``n`` of ``key`` (``tag``: its ``n/x``; ``size``:
        its stored bytes)."""
        self.drop(key)
        size += PER_MESSAGE * len(window)
        if size > self._max_bytes:
            return
        self._entries[key] = _Held(n, tag, fingerprint, window, size)
        self._bytes += size
        while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
            _, oldest = self._entries.popitem(last=False)
            self._bytes -= oldest.size

    def drop(self, key: str) -> None:
        held = self._entries.pop(key, None)
        if held is not None:
            self._bytes -= held.size
