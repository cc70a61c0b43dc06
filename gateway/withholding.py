"""What an agent turn sends instead of its own steps' content when PII scrubbing refuses it.

Once a turn's tools have run (a search, an order, a refund), failing the turn makes the client
retry it and run their side effects again. So a PII refusal naming what the turn's own steps put
into the body — a tool result, or the model's tool-call message (its content and the calls'
arguments) — withholds that content (never sent unchecked) and the body is scrubbed again, at
every scrub of the turn: the step's (``tools_loop``) and a fallback group's with another policy
(``pipeline.body_for``). A refusal naming anything else (the client's own messages) stands.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import TypeVar

from core.errors import GatewayError
from core.types import RequestContext

T = TypeVar("T")

# What the model reads instead of a tool result too costly to check for personal data (one
# request's PII bounds: pii.max_analysed_chars, pii.max_phone_checks).
WITHHELD = (
    "The tool ran, but its result was withheld: it holds more text or numbers than the gateway may "
    "check for personal data in one request. Tell the user the result could not be shown."
)
# ... instead of a tool result holding personal data the serving model's policy blocks.
WITHHELD_BLOCKED = (
    "The tool ran, but its result was withheld: it holds personal data that policy forbids sending "
    "to this model. Tell the user the result could not be shown."
)
_TEXTS = {"pii_too_much_to_check": WITHHELD, "pii_blocked": WITHHELD_BLOCKED}
ARGUMENTS = "{}"  # a tool call's arguments, withheld (the call itself stays: its result answers it)
_NAMED = re.compile(r"^messages\[(\d+)\]\.(content|tool_calls\[(\d+)\]\.function\.arguments)")


async def scrubbed(ctx: RequestContext, own: list[dict], scrub: Callable[[], Awaitable[T]]) -> T:
    """``scrub()`` (of ``ctx.body``), withholding the content of ``own`` (messages of the turn's
    steps, the very dicts in ``ctx.body["messages"]``) that a refusal names, then scrubbing again.
    Each scrub may spend a whole request's PII budget before it is refused: after a second
    refusal, all of ``own`` not yet withheld is withheld unchecked (three scrubs at most, however
    many results the model asked for)."""
    refused = 0
    while True:
        try:
            return await scrub()
        except GatewayError as err:
            message, part = _named(ctx, err, own)
            if message is None or refused >= 2:
                raise
            refused += 1
            if refused == 1:
                _withhold(ctx, own, message, part, err.code)
            else:
                for m in own:
                    _withhold(ctx, own, m, "content" if m.get("role") == "tool" else "all", err.code)


def _named(ctx: RequestContext, err: GatewayError, own: list[dict]) -> tuple[dict | None, str]:
    """The message of ``own`` a PII refusal names, and which part of it ("content" or a call's
    index), else ``(None, "")``."""
    found = _NAMED.match(err.param or "") if err.code in _TEXTS else None
    messages = ctx.body.get("messages") or []
    index = int(found.group(1)) if found is not None else -1
    message = messages[index] if 0 <= index < len(messages) else None
    if message is None or not any(message is m for m in own):
        # A bound names the text with the most to check (characters), or the one being checked
        # when the phone-number checks ran out — not the one that crossed it: the client's text
        # was checked without the steps' (or is past the bound alone, refused once own is withheld).
        return _largest(own) if err.code == "pii_too_much_to_check" else (None, "")
    if message.get("role") == "tool":
        return (message, "content") if found.group(2) == "content" else (None, "")
    if message.get("role") != "assistant":
        return None, ""
    return message, "content" if found.group(3) is None else found.group(3)


def _largest(own: list[dict]) -> tuple[dict | None, str]:
    """The longest part of ``own`` not yet withheld (a tool result, an assistant message's content
    or one call's arguments), else ``(None, "")``."""
    best: tuple[int, dict | None, str] = (0, None, "")
    for m in own:
        if m.get("role") == "tool":
            text = m.get("content")
            if isinstance(text, str) and text not in (WITHHELD, WITHHELD_BLOCKED) and len(text) > best[0]:
                best = (len(text), m, "content")
        elif m.get("role") == "assistant":
            text = m.get("content")
            if isinstance(text, str) and len(text) > best[0]:
                best = (len(text), m, "content")
            for i, call in enumerate(m.get("tool_calls") or ()):
                fn = call.get("function") if isinstance(call, dict) else None
                args = fn.get("arguments") if isinstance(fn, dict) else None
                if isinstance(args, str) and args != ARGUMENTS and len(args) > best[0]:
                    best = (len(args), m, str(i))
    return best[1], best[2]


def _withhold(ctx: RequestContext, own: list[dict], message: dict, part: str, code: str | None) -> None:
    """Withholds one part of ``message`` in place (the same dict is remembered with the turn:
    withheld there too), and says so in the run record."""
    if message.get("role") == "tool":
        if message.get("content") in (WITHHELD, WITHHELD_BLOCKED):
            return
        message["content"] = _TEXTS.get(code or "", WITHHELD)
        _note(ctx, _tool_name(own, message.get("tool_call_id")), "result", code)
        return
    if message.get("role") != "assistant":
        return
    calls = [c for c in message.get("tool_calls") or () if isinstance(c, dict)]
    if part in ("content", "all") and message.get("content"):
        message["content"] = None  # (a tool-call message needs no text)
        _note(ctx, None, "content", code)
    for i, call in enumerate(calls):
        fn = call.get("function")
        if part in (str(i), "all") and isinstance(fn, dict) and fn.get("arguments") not in (None, ARGUMENTS):
            fn["arguments"] = ARGUMENTS
            _note(ctx, fn.get("name"), "arguments", code)


def _note(ctx: RequestContext, name: str | None, part: str, code: str | None) -> None:
    ctx.agent.steps.append(
        {"step": ctx.step, "kind": "scrub", "name": name, "part": part, "status": "withheld", "error": code}
    )


def _tool_name(own: list[dict], call_id: str | None) -> str | None:
    for message in own:
        for call in message.get("tool_calls") or ():
            if isinstance(call, dict) and call.get("id") == call_id:
                return (call.get("function") or {}).get("name")
    return None
