"""Offline token counting with tiktoken, using the BPE files bundled in litellm's package."""

from __future__ import annotations

import os
from functools import cache, lru_cache

from core.prices import tokenizer_dir

_PER_MESSAGE = 3  # role and separators, as OpenAI counts them
_PER_IMAGE = 85  # a low-detail image tile; a floor, not an exact figure


@cache
def _encoding():
    if "TIKTOKEN_CACHE_DIR" not in os.environ:
        folder = tokenizer_dir()
        if folder is not None:
            os.environ["TIKTOKEN_CACHE_DIR"] = str(folder)
    import tiktoken

    return tiktoken.get_encoding("o200k_base")


def count_text(text: str) -> int:
    return len(_encoding().encode(text, disallowed_special=()))


def count_prompt(body: dict, known: dict[int, tuple[dict, int]] | None = None) -> int:
    """Prompt tokens of a chat request: messages, tool definitions, images. ``known`` maps the
    ``id()`` of messages already counted (an agent's stored history) to (the message, its count
    as this function counts a message, ``_PER_MESSAGE`` included): those are not tokenized
    again. The message is kept beside its id so a recycled id never takes another's count."""
    total = 3
    for msg in body.get("messages") or []:
        if not isinstance(msg, dict):
            continue
        if known:
            counted = known.get(id(msg))
            if counted is not None and counted[0] is msg:
                total += counted[1]
                continue
        total += _PER_MESSAGE
        content = msg.get("content")
        if isinstance(content, str):
            total += count_text(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict):
                    if part.get("type") == "text" and isinstance(part.get("text"), str):
                        total += count_text(part["text"])
                    elif part.get("type") == "image_url":
                        total += _PER_IMAGE
        for call in msg.get("tool_calls") or []:
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                total += count_text(str(fn.get("name", ""))) + count_text(str(fn.get("arguments", "")))
    tools = body.get("tools")
    if tools:
        import orjson

        total += count_text(orjson.dumps(tools).decode())
    return total


@lru_cache(maxsize=256)
def _count_cached(text: str) -> int:
    return count_text(text)


def count_text_cached(text: str) -> int:
    """``count_text`` for a text that recurs (an agent's rendered system prompt): remembered for
    the 256 most recent texts of up to 16 KB (so the cache holds at most 4 MB of them)."""
    return _count_cached(text) if len(text) <= 16_384 else count_text(text)


def approx_prompt(body: dict) -> int:
    """A quick upper-leaning estimate without tokenizing (about 3 characters a token, which
    overestimates English): good enough to reserve budget for, on the hot path."""
    chars = 0
    messages = body.get("messages") or ()
    for msg in messages:
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict):
                    chars += len(part.get("text") or "") if part.get("type") == "text" else 255
    inp = body.get("input")
    if isinstance(inp, str):
        chars += len(inp)
    elif isinstance(inp, list):
        chars += sum(len(t) if isinstance(t, str) else 4 * len(t) if isinstance(t, list) else 4 for t in inp)
    if body.get("tools"):
        chars += len(str(body["tools"]))
    return chars // 3 + _PER_MESSAGE * len(messages) + 3
