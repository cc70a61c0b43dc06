"""Offline token counting with tiktoken, using the BPE files bundled in litellm's package."""

from __future__ import annotations

import os
import threading
from functools import lru_cache

from core.prices import tokenizer_dir

_PER_MESSAGE = 3  # role and separators, as OpenAI counts them
_PER_IMAGE = 85  # a low-detail image tile; a floor, not an exact figure

# Loading the encoding costs ~0.5 s of CPU and ~80 MB: done once, by whichever comes first, the
# first count or ``warm``'s thread; a count that comes while the thread loads waits for it.
_LOAD_LOCK = threading.Lock()
_WARM_LOCK = threading.Lock()  # (never held while loading: ``warm`` never waits for a load)
_loaded = None
_warming: threading.Thread | None = None


def _encoding():
    global _loaded
    if _loaded is not None:
        return _loaded
    with _LOAD_LOCK:
        if _loaded is None:
            if "TIKTOKEN_CACHE_DIR" not in os.environ:
                folder = tokenizer_dir()
                if folder is not None:
                    os.environ["TIKTOKEN_CACHE_DIR"] = str(folder)
            import tiktoken

            _loaded = tiktoken.get_encoding("o200k_base")
    return _loaded


def loaded() -> bool:
    """Whether the encoding is in memory (a count costs no load)."""
    return _loaded is not None


def warm() -> None:
    """Loads the encoding in a thread of its own, once, and returns at once: a replica that will
    count tokens (it serves agents, whose memory counts every stored message) loads it before its
    first turn instead of on the event loop in the middle of one (~0.5 s during which every
    request in flight waited)."""
    global _warming
    if _loaded is not None or _warming is not None:
        return
    with _WARM_LOCK:
        if _warming is None:
            _warming = threading.Thread(target=_warm, name="tokenizer-warm", daemon=True)
            _warming.start()


def wait_warm(timeout: float = 30.0) -> None:
    """Blocks until ``warm``'s load (if one was started) ends (a start-up waits for it in a thread
    before the replica takes traffic; later warm-ups never block readiness)."""
    thread = _warming
    if thread is not None:
        thread.join(timeout)


def _warm() -> None:
    try:
        _encoding()
    except Exception:  # (the first count raises it again, where it is reported)
        pass


def count_text(text: str) -> int:
    return len(_encoding().encode(text, disallowed_special=()))


def _json_text(value) -> str:
    """A field as text: a string as is, anything else as its JSON (never Python's ``str`` of a
    client's object, which walks it in Python)."""
    if isinstance(value, str):
        return value
    import orjson

    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:  # (not what a parsed body holds)
        return ""


def _call_tokens(fn) -> int:
    if not isinstance(fn, dict):
        return 0
    return count_text(_json_text(fn.get("name", ""))) + count_text(_json_text(fn.get("arguments", "")))


def count_prompt(body: dict, known: dict[int, tuple[dict, int]] | None = None) -> int:
    """Prompt tokens of a chat request: messages (text and refusal parts, an assistant's
    ``refusal``, tool calls and the legacy ``function_call``), tool and legacy ``functions``
    definitions, images. Every text a provider bills as prompt is counted: a hard budget's
    reservation is this count. ``known`` maps the ``id()`` of messages already counted (an
    agent's stored history) to (the message, its count as this function counts a message,
    ``_PER_MESSAGE`` included): those are not tokenized again. The message is kept beside its id
    so a recycled id never takes another's count."""
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
                    kind = part.get("type")
                    if kind == "text" and isinstance(part.get("text"), str):
                        total += count_text(part["text"])
                    elif kind == "refusal" and isinstance(part.get("refusal"), str):
                        total += count_text(part["refusal"])
                    elif kind == "image_url":
                        total += _PER_IMAGE
        if isinstance(msg.get("refusal"), str):
            total += count_text(msg["refusal"])
        for call in msg.get("tool_calls") or []:
            total += _call_tokens(call.get("function") if isinstance(call, dict) else None)
        total += _call_tokens(msg.get("function_call"))
    for name in ("tools", "functions"):
        if body.get(name):
            total += count_text(_json_text(body[name]))
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
