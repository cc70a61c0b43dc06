"""The window of a conversation: which stored messages a turn is sent (``runtime.memory``).

The window is cut at turn boundaries only (a user message starts a turn): a tool call stays
with its result and an assistant message with the user message it answered, and a turn whose
tool steps would break OpenAI's rules is repaired (``_repair``). Redis keeps the window itself
beside the list, cut and encoded as one value (``stored_window``; ``_next_window`` encodes the
next one), so a load decodes one value and cuts nothing; without it a load decodes the list's
tail from the newest entry back, only while the window can still take a turn (``newest_window``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import orjson

from core.tokens import count_prompt
from runtime.types import MemorySettings

log = logging.getLogger("gateway.memory")

MAX_WINDOW_BYTES = 256 * 1024  # a larger window is not stored whole: loads cut the list instead
# A stored assistant message's mark: its tool calls are the client's own (the answer that called
# the client's tools, or an assistant message the client sent), stored so at the time of the
# turn. Every other tool call in memory is the agent's server-side step, whatever the agent's tools
# are now (renamed, removed, another version's), and the client's read of the conversation leaves
# it out (``gateway.conversations_api``); so are those of turns stored before the mark existed,
# which nothing proves the client's. The mark is never sent to a model (``for_model``) nor shown
# to the client.
CLIENT_SAW = "gateway_client_saw"
_KEPT = ("role", "content", "name", "tool_calls", "tool_call_id", "refusal", CLIENT_SAW)


def list_cap(settings: MemorySettings) -> int:
    """How many messages the Redis list keeps: room for the window with its tool steps."""
    return min(2000, max(64, settings.window_turns * 10))


def clean_message(message: dict) -> dict:
    """The parts of an OpenAI message worth sending back to a model."""
    return {k: message[k] for k in _KEPT if message.get(k) is not None}


def unmarked(message: dict) -> dict:
    """The message without ``CLIENT_SAW`` (itself when it has none)."""
    return {k: v for k, v in message.items() if k != CLIENT_SAW} if CLIENT_SAW in message else message


def client_saw(message: dict) -> dict:
    """A message as a turn stores it: an assistant message with tool calls marked ``CLIENT_SAW``
    (the caller passes only what the client saw: its own messages, the answer), any other
    without a mark (one a client sent is not its to set)."""
    if message.get("role") == "assistant" and message.get("tool_calls"):
        return message if message.get(CLIENT_SAW) is True else {**message, CLIENT_SAW: True}
    return unmarked(message)


def for_model(history: list[dict]) -> list[dict]:
    """The window as a model is sent it: without ``CLIENT_SAW`` (the same list when no message
    has it: one look per message; otherwise a copy with the same token counts, for
    ``Window.known``)."""
    if not any(CLIENT_SAW in m for m in history):
        return history
    if not isinstance(history, Window):
        return [unmarked(m) for m in history]
    out = Window(unmarked(m) for m in history)
    out.tokens = history.tokens
    out.seq = history.seq
    out.since = history.since
    return out


def message_tokens(message: dict) -> int:
    return count_prompt({"messages": [message]}) - 3


class Window(list):
    """The messages of a window, oldest first (a list); ``tokens[i]`` is the token count of
    ``self[i]`` as ``core.tokens.count_prompt`` counts a message, so a turn's prompt is counted
    without tokenizing its history again (``known``). ``seq`` is the number of the list's last
    message when the window was read (0: the list was empty; None: not known), the base of the
    next append's compare-and-set. ``since``: when the read found Redis holding nothing of the
    conversation, Redis's time then (µs): the append stores nothing if the conversation was
    erased since (its seq floor cannot tell: the erasure found nothing to count either)."""

    tokens: list[int]
    seq: int | None = None
    since: int | None = None  # Redis's time (µs) when the load found the conversation empty there
    # Known of a window this process stored (``extended``'s, held by ``runtime.memory_held``;
    # None: not known, and worked out again): ``joined`` its messages as the stored window holds
    # them (their exact JSON, joined by commas; ``sizes[i]`` the bytes of ``self[i]``'s), so the
    # next stored window is joined, not encoded again — one bytes object, not one per message (an
    # ``orjson.dumps`` result keeps a buffer of about 4 KB however short it is: held, a window of
    # tiny messages cost a hundred times its size); ``starts`` the indexes of its user messages
    # (where its turns start); ``last_tools`` whether its last turn holds a tool call or result.
    # Never changed once set: copies share them.
    joined: bytes | None = None
    sizes: list[int] | None = None
    starts: list[int] | None = None
    last_tools: bool | None = None

    def known(self) -> dict[int, tuple[dict, int]]:
        return {id(m): (m, t) for m, t in zip(self, self.tokens, strict=True)}


def window(entries: Iterable[tuple[int, dict]], settings: MemorySettings) -> Window:
    """The most recent whole turns of (tokens, message) entries, oldest first, within
    ``window_turns`` and ``window_tokens``. Messages before the first user message (their turn
    began before what is kept) are never sent."""
    return _cut(reversed(list(entries)), settings)


def _cut(newest_first: Iterable[tuple[int, dict]], settings: MemorySettings) -> Window:
    """``window`` over entries given newest first; it stops taking them once the window is full,
    so a lazy source (``newest_window``'s decoding) does no work for older ones. A turn counts
    against the token budget as it is sent (repaired)."""
    kept: list[tuple[list[dict], list[int]]] = []  # newest turn first
    messages: list[dict] = []  # the turn being read, newest message first
    counts: list[int] = []
    tools = False
    budget = settings.window_tokens
    for tokens, message in newest_first:
        role = message.get("role")
        messages.append(message)
        counts.append(int(tokens))
        if _has_tools(message):
            tools = True
        if role != "user":
            continue
        if len(kept) >= settings.window_turns:
            break
        messages.reverse()
        counts.reverse()
        if tools:  # the newest turn may end with a client's call whose result is on its way
            messages, counts = _repaired(messages, counts, last=not kept)
        total = sum(counts)
        if total > budget:
            break
        budget -= total
        kept.append((messages, counts))
        messages, counts, tools = [], [], False
    out = Window()
    out.tokens = []
    for turn, turn_counts in reversed(kept):
        out.extend(turn)
        out.tokens.extend(turn_counts)
    return out


def _has_tools(message: dict) -> bool:
    """A tool call or a tool result: the turn holding it may need ``_repair``."""
    return message.get("role") == "tool" or bool(message.get("tool_calls"))


def _repaired(turn: list[dict], counts: list[int], *, last: bool) -> tuple[list[dict], list[int]]:
    original = {id(m): t for m, t in zip(turn, counts, strict=True)}
    out = _repair(turn, last=last)
    return out, [original[id(m)] if id(m) in original else message_tokens(m) for m in out]


def _repair(turn: list[dict], *, last: bool) -> list[dict]:
    """A turn a model will accept: an assistant's tool calls are each answered by the tool
    messages right after it, and a tool message answers one of those calls, once (OpenAI's
    rule: a result elsewhere, or a call answered only further on, is refused). Except at the
    very end of the window: a client tool whose result the client is about to send."""
    out = []
    waiting: set = set()  # the calls of the assistant message just kept, not yet answered
    for index, message in enumerate(turn):
        if message.get("role") == "tool":
            if message.get("tool_call_id") in waiting:
                waiting.discard(message.get("tool_call_id"))
                out.append(message)
            continue
        waiting = set()
        calls = message.get("tool_calls") if message.get("role") == "assistant" else None
        if calls and not (last and index == len(turn) - 1):
            answered = set()
            for later in turn[index + 1 :]:
                if later.get("role") != "tool":
                    break
                answered.add(later.get("tool_call_id"))
            kept = []
            for c in calls:
                if isinstance(c, dict) and c.get("id") in answered:
                    answered.discard(c.get("id"))  # an id called twice is answered once
                    kept.append(c)
            if len(kept) != len(calls):
                message = {k: v for k, v in message.items() if k != "tool_calls"}
                if kept:
                    message["tool_calls"] = kept
                elif not message.get("content"):
                    continue
            calls = kept
        if calls:
            waiting = {c.get("id") for c in calls if isinstance(c, dict)}
        out.append(message)
    return out


def tail_size(settings: MemorySettings) -> int:
    """How many of the newest list entries a load reads: three messages a turn on average
    (user, tool call, tool result or answer), never more than the list keeps."""
    return min(list_cap(settings), max(16, settings.window_turns * 3))


def newest_window(raw: list[bytes], settings: MemorySettings) -> Window:
    """``window`` over stored entries (oldest first), decoding from the newest back and only
    while the window can still take a turn: the same messages, at a fraction of the work, since
    the list holds more than a window and the older entries would be cut anyway."""
    out = _cut(_decoded_newest_first(raw), settings)
    out.seq = _seq(raw[-1]) if raw else 0
    return out


def extended(base: Window, added: list[tuple[int, dict]], settings: MemorySettings) -> Window | None:
    """The window after a turn stored ``added`` ((tokens, message) pairs) behind ``base``: the
    same messages ``window`` cuts from the whole list, since a later turn can only push older
    ones out (``base`` holds every turn the new window can keep), so the oldest turns are dropped
    while the window is over its budgets; ``added`` may hold several turns (a client sends what
    it likes), which are cut one by one. None when ``added`` does not start a turn: it joins
    the last one, whose repair may have dropped a call that ``added`` answers (only the list
    has it); and None when ``base`` ends with a client's call left unanswered: it is dropped
    now, so an older turn ``base`` could not afford may fit (only the list has it)."""
    return _extend(base, added, settings)[0]


def _extend(base: Window, added: list[tuple[int, dict]], settings: MemorySettings) -> tuple[Window | None, int | None]:
    """``extended``, and where its messages from ``base`` begin when it is ``base[keep:]`` then
    ``added``'s messages as they came (else None: cut anew, or ``added`` repaired)."""
    if not added or added[0][1].get("role") != "user":
        return None, None
    if base and base[-1].get("tool_calls"):
        return None, None
    starts = base.starts
    if starts is None or base.last_tools is None:
        starts = [i for i, m in enumerate(base) if m.get("role") == "user"]
        last_tools = bool(starts) and any(_has_tools(m) for m in base[starts[-1] :])
    else:
        last_tools = base.last_tools
    several = any(m.get("role") == "user" for _, m in added[1:])  # a client may send several turns
    if several or last_tools:
        entries = [*zip(base.tokens, base, strict=True), *added]  # cut per turn, the last repaired anew
        entries.reverse()
        return _cut(entries, settings), None
    messages = [m for _, m in added]
    counts = [int(t) for t, _ in added]
    tools = any(_has_tools(m) for m in messages)
    if tools:
        messages, counts = _repaired(messages, counts, last=True)
    out = Window()
    out.tokens = []
    total = sum(counts)
    if settings.window_turns < 1 or total > settings.window_tokens:
        return out, None
    total += sum(base.tokens)
    turns = len(starts) + 1
    first = 0  # the oldest turn kept: drop from the front while over a budget
    while turns > settings.window_turns or total > settings.window_tokens:
        end = starts[first + 1] if first + 1 < len(starts) else len(base)
        total -= sum(base.tokens[starts[first] : end])
        turns -= 1
        first += 1
    keep = starts[first] if first < len(starts) else len(base)
    out.extend(base[keep:])
    out.extend(messages)
    out.tokens = [*base.tokens[keep:], *counts]
    out.starts = [i - keep for i in starts[first:]]
    out.starts.append(len(base) - keep)  # (``added`` is one turn here: its user message first)
    out.last_tools = tools and any(_has_tools(m) for m in messages)
    return out, None if tools else keep


_CUT_RULES = 2  # raised whenever the cut or the repair changes: windows cut before are not used


def fingerprint(settings: MemorySettings) -> str:
    """What a stored window was cut for (the rules, the settings): anything else makes it stale."""
    return f"{_CUT_RULES}/{settings.window_turns}/{settings.window_tokens}"


def stored_window(raw: bytes, settings: MemorySettings) -> Window | None:
    """The stored window (``…:w``), or None when it is unreadable or cut for other settings."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict) or data.get("c") != fingerprint(settings):
        return None
    messages, tokens, seq = data.get("m"), data.get("t"), data.get("n")
    if (
        not isinstance(messages, list)
        or not isinstance(tokens, list)
        or len(messages) != len(tokens)
        or type(seq) is not int
        # every message a dict and every count an int (not a bool), checked in C: ``all`` over a
        # generator cost a Python step per item, every turn
        or list(map(type, messages)).count(dict) != len(messages)
        or list(map(type, tokens)).count(int) != len(tokens)
    ):
        return None
    out = Window(messages)
    out.tokens = tokens
    out.seq = seq
    return out


def _seq(entry: bytes) -> int | None:
    head = entry[:32]
    if not head.startswith(b'{"s":'):
        return None
    digits = head[5:].split(b",", 1)[0]
    return int(digits) if digits.isdigit() else None


def _entry(raw: bytes) -> tuple[int, dict] | None:
    """(tokens, message) of one stored entry; None (logged) when it is unreadable."""
    try:
        decoded = orjson.loads(raw)
        tokens, message = int(decoded["t"]), decoded["m"]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        message = None
    if not isinstance(message, dict):
        log.warning("memory: an unreadable window entry was skipped")
        return None
    return tokens, message


def _decoded_newest_first(raw: list[bytes]) -> Iterator[tuple[int, dict]]:
    for entry in reversed(raw):
        if (decoded := _entry(entry)) is not None:
            yield decoded


def _decode(raw: list[bytes]) -> list[tuple[int, dict]]:
    """Every readable entry, oldest first (what ``newest_window`` must match: tests, bench)."""
    return [decoded for entry in raw if (decoded := _entry(entry)) is not None]


def _next_window(base: Window | None, added: list[tuple[int, dict]], settings: MemorySettings) -> list:
    """The append's (base seq, new window) arguments: the window after this turn, encoded after
    its ``"n":`` (the script adds the seq), or nothing to store (then the stored one is deleted)."""
    return next_stored(base, added, None, settings)[0]


def next_stored(
    base: Window | None, added: list[tuple[int, dict]], encoded: list[bytes] | None, settings: MemorySettings
) -> tuple[list, Window | None]:
    """``_next_window``'s arguments and the window they store (None: none; its ``joined`` set).
    ``encoded``: the JSON of ``added``'s messages, when the caller has it. The messages of ``base``
    when its ``joined`` is known, and of ``added`` with their JSON, are not encoded again: the
    stored window's messages are joined from their JSON (a repaired message is encoded anew)."""
    if base is None or base.seq is None:
        return ["", ""], None
    new, keep = _extend(base, added, settings)
    if new is None:
        return ["", ""], None
    joined: bytes | None
    if keep is not None and encoded is not None and base.joined is not None and len(base.sizes or ()) == len(base):
        cut = sum(base.sizes[:keep]) + keep  # (the messages dropped, each with its comma)
        added_json = b",".join(encoded)
        joined = base.joined[cut:] + b"," + added_json if cut < len(base.joined) else added_json
        sizes = [*base.sizes[keep:], *map(len, encoded)]
    elif base.joined is not None or base.starts is not None:  # (a window this process stored: the next may join)
        raw = [orjson.dumps(m) for m in new]
        joined, sizes = b",".join(raw), list(map(len, raw))
    else:  # (encoded whole, faster than message by message)
        joined = sizes = None
    messages = b"[%s]" % joined if joined is not None else orjson.dumps(new)
    body = b'"c":"%s","t":%s,"m":%s}' % (fingerprint(settings).encode(), orjson.dumps(new.tokens), messages)
    if len(body) > MAX_WINDOW_BYTES:
        return [base.seq, ""], None
    new.joined, new.sizes = joined, sizes
    return [base.seq, body], new
