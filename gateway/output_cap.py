"""A relayed stream held to the output its hard budget reserved.

A hard budget admits a chat request for its prompt plus its ``max_completion_tokens`` /
``max_tokens`` (the gateway's default when it named none), so its spend can never pass the
limit — as long as the provider stops there. One that ignores the limit streams on, and the
settlement charges what it reports: past the reservation, past the limit. ``OutputCap`` counts
what is relayed and says when the next chunk would take the output past what was reserved;
the relay then ends the stream as OpenAI ends one cut at ``max_tokens`` (``ending``).

Counting is cheap while far from the limit: a text's UTF-8 bytes bound its tokens (a
byte-level BPE token is at least one byte), so tiktoken runs only on the text gathered since its
last count, and only when that bound no longer fits: a few counts per stream, each text counted
once. Only requests under a hard budget are counted at all (``for_request``).
"""

from __future__ import annotations

import dataclasses
import time

import orjson

from core.sse import DONE, data_event
from core.tokens import count_text
from core.types import RequestContext, Usage
from gateway.usage import _answer_parts


class OutputCap:
    __slots__ = ("_bound", "_pending", "counted", "finished", "indices", "limit", "meta")

    def __init__(self, limit: int) -> None:
        self.limit = limit  # output tokens reserved (every choice's)
        self.counted = 0  # tokens of the text counted so far
        self._pending: list[str] = []  # text relayed since, not yet counted
        self._bound = 0  # its UTF-8 bytes: at least its tokens
        self.indices: set[int] = set()  # the choices seen
        self.finished: set[int] = set()  # those whose last chunk (a finish_reason) was relayed
        self.meta: dict = {}  # the stream's id, created and model, for the chunks it ends with

    @classmethod
    def for_request(cls, ctx: RequestContext) -> OutputCap | None:
        """A cap when a hard budget reserved the request's output, else None (nothing counted)."""
        budgets = ctx.extra.get("budgets")
        if not budgets or not ctx.extra.get("reserved_nano") or ctx.max_output <= 0:
            return None
        if not any(b.enforcement == "hard" for b in budgets):
            return None
        n = ctx.body.get("n") if isinstance(ctx.body, dict) else None
        choices = n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1
        return cls(ctx.max_output * choices)

    def take(self, chunk: bytes) -> bytes | None:
        """Takes in a chunk about to be relayed (one read: it may hold many events). None when
        it fits whole; else the part of it that fits (its first events, maybe none), after which
        the stream is to end."""
        pos = 0
        for event in chunk.split(b"\n\n"):
            start, pos = pos, pos + len(event) + 2
            if not event.startswith(b"data: {"):
                continue
            try:
                data = orjson.loads(event[6:])
            except orjson.JSONDecodeError:
                continue
            if isinstance(data, dict) and self._over(data):
                return chunk[:start]
        return None

    def _over(self, data: dict) -> bool:
        ended: list[int] = []  # choices this event ends (once it is relayed: not when it is over)
        choices = data.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            index = choice.get("index", 0) if isinstance(choice, dict) else None
            if type(index) is int and len(self.indices) < 128:
                self.indices.add(index)
                if choice.get("finish_reason"):
                    ended.append(index)
        if "id" not in self.meta:
            self.meta = {k: data[k] for k in ("id", "created", "model") if isinstance(data.get(k), str | int)}
        if self._adds_past_limit(data):
            return True
        self.finished.update(ended)
        return False

    def _adds_past_limit(self, data: dict) -> bool:
        parts: list[str] = []
        _answer_parts(data, "delta", parts)
        if not parts:
            return False
        text = "".join(parts)
        self._pending.append(text)
        self._bound += len(text.encode())
        if self.counted + self._bound <= self.limit:
            return False
        total = self.counted + count_text("".join(self._pending))
        self._pending.clear()
        self._bound = 0
        if total > self.limit:
            return True
        self.counted = total
        return False

    def ending(self, ctx: RequestContext, usage: Usage | None) -> bytes:
        """What ends the stream cut at the limit: the last chunk, ``finish_reason: "length"``, of
        each choice not ended already (one that was has its own), the usage chunk when the client
        asked for it, ``[DONE]``."""
        base = {
            "id": self.meta.get("id") or ctx.request_id,
            "object": "chat.completion.chunk",
            "created": self.meta.get("created") or int(time.time()),
            "model": self.meta.get("model") or ctx.model,
        }
        out = [
            data_event({**base, "choices": [{"index": i, "delta": {}, "logprobs": None, "finish_reason": "length"}]})
            for i in sorted(self.indices - self.finished if self.indices else {0})
        ]
        if usage is not None:
            out.append(data_event({**base, "choices": [], "usage": usage.to_openai()}))
        out.append(DONE)
        return b"".join(out)

    def charged(self, usage: Usage) -> Usage:
        """The usage of a stream cut here: its output at most what was reserved (what was relayed
        is within it; a count of the whole text may differ from the sum of its parts' counts)."""
        if usage.completion_tokens <= self.limit:
            return usage
        return dataclasses.replace(usage, completion_tokens=self.limit)
