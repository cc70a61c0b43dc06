"""Putting original values back where the model answered with pseudonyms.

Non-streamed: the message content and tool-call arguments of every choice. Streamed: deltas
arrive in pieces, and a placeholder may be split across chunks (``<EMA`` + ``IL_1>``), so each
text field of each choice (content, and each tool call's arguments) keeps back a tail that
could still become a placeholder, and releases it with the next piece or at the end.
Arguments are JSON text: values are put back JSON-escaped.
"""

from __future__ import annotations

import re

import orjson

from policies.pii.anonymize import PLACEHOLDER, Vault

_MAX_PLACEHOLDER = 48
_PARTIAL = re.compile(r"<[A-Z0-9_]*$")


def _sub(text: str, vault: Vault, json: bool) -> str:
    if "<" not in text:
        return text

    def value(m: re.Match) -> str:
        original = vault.by_placeholder.get(m.group(1))
        if original is None:
            return m.group(0)
        return orjson.dumps(original).decode()[1:-1] if json else original

    return PLACEHOLDER.sub(value, text)


def restore_message(message: dict, vault: Vault) -> None:
    if isinstance(message.get("content"), str):
        message["content"] = _sub(message["content"], vault, False)
    for call in message.get("tool_calls") or ():
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
            fn["arguments"] = _sub(fn["arguments"], vault, True)
    fc = message.get("function_call")
    if isinstance(fc, dict) and isinstance(fc.get("arguments"), str):
        fc["arguments"] = _sub(fc["arguments"], vault, True)


def restore_body(raw: bytes, vault: Vault) -> bytes:
    """A non-streamed chat completion with pseudonyms replaced (unchanged if none appear)."""
    if b"<" not in raw:
        return raw
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw
    for choice in data.get("choices") or () if isinstance(data, dict) else ():
        if isinstance(choice, dict) and isinstance(choice.get("message"), dict):
            restore_message(choice["message"], vault)
    return orjson.dumps(data)


class _Field:
    __slots__ = ("held", "json")

    def __init__(self, json: bool) -> None:
        self.held = ""
        self.json = json

    def feed(self, piece: str, vault: Vault) -> str:
        text = self.held + piece
        self.held = ""
        tail = _PARTIAL.search(text[-_MAX_PLACEHOLDER:])
        if tail is not None:
            cut = len(text) - (len(text[-_MAX_PLACEHOLDER:]) - tail.start())
            text, self.held = text[:cut], text[cut:]
        return _sub(text, vault, self.json)

    def flush(self, vault: Vault) -> str:
        text, self.held = self.held, ""
        return _sub(text, vault, self.json)


class StreamRestorer:
    """Rewrites SSE chunks of a chat completion stream, event by event."""

    def __init__(self, vault: Vault) -> None:
        self.vault = vault
        self.fields: dict[tuple, _Field] = {}

    def _field(self, key: tuple, json: bool) -> _Field:
        f = self.fields.get(key)
        if f is None:
            f = self.fields[key] = _Field(json)
        return f

    def chunk(self, chunk: bytes) -> bytes:
        out = []
        for event in chunk.split(b"\n\n"):
            if not event:
                continue
            out.append(self._event(event))
        return b"".join(out)

    def _event(self, event: bytes) -> bytes:
        if not event.startswith(b"data: ") or event.startswith(b"data: [DONE]"):
            return event + b"\n\n"
        try:
            data = orjson.loads(event[6:])
        except orjson.JSONDecodeError:
            return event + b"\n\n"
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            return event + b"\n\n"
        before: list[dict] = []  # held text released ahead of a choice's final chunk
        for choice in data["choices"]:
            if not isinstance(choice, dict):
                continue
            idx = choice.get("index", 0)
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self._delta(idx, delta)
            if choice.get("finish_reason"):
                flushed = self._flush(idx)
                if flushed:
                    before.append({**data, "choices": [{"index": idx, "delta": flushed, "finish_reason": None}]})
        prefix = b"".join(b"data: " + orjson.dumps(d) + b"\n\n" for d in before)
        return prefix + b"data: " + orjson.dumps(data) + b"\n\n"

    def _delta(self, idx: int, delta: dict) -> None:
        if isinstance(delta.get("content"), str):
            delta["content"] = self._field((idx, "content"), False).feed(delta["content"], self.vault)
        for call in delta.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                key = (idx, "tool", call.get("index", 0))
                fn["arguments"] = self._field(key, True).feed(fn["arguments"], self.vault)
        fc = delta.get("function_call")
        if isinstance(fc, dict) and isinstance(fc.get("arguments"), str):
            fc["arguments"] = self._field((idx, "function"), True).feed(fc["arguments"], self.vault)

    def _flush(self, idx: int) -> dict:
        delta: dict = {}
        for key, f in self.fields.items():
            if key[0] != idx or not f.held:
                continue
            text = f.flush(self.vault)
            if key[1] == "content":
                delta["content"] = text
            elif key[1] == "tool":
                delta.setdefault("tool_calls", []).append({"index": key[2], "function": {"arguments": text}})
            else:
                delta["function_call"] = {"arguments": text}
        return delta

    def tail(self) -> bytes:
        """What is still held when a stream ends without a finish_reason (it broke off)."""
        out = b""
        for idx in sorted({k[0] for k, f in self.fields.items() if f.held}):
            delta = self._flush(idx)
            if delta:
                out += (
                    b"data: "
                    + orjson.dumps(
                        {
                            "object": "chat.completion.chunk",
                            "choices": [{"index": idx, "delta": delta, "finish_reason": None}],
                        }
                    )
                    + b"\n\n"
                )
        return out
