"""Hiding the operator's tool secrets in what a tool answers, in every form a server echoes them.

A tool's ``${TOOL_*}`` header secrets go to its server; a server that echoes its request (a
debugging endpoint, an error page, a proxy) may give them back not only as sent but URL-encoded
(``%2F``, ``+`` for a space, twice-encoded ``%252F``), JSON-escaped (``\\/``, ``\\u002f``, the
backslashes doubled when JSON sits in JSON), HTML-escaped (``&#47;``), as ``\\x2f`` escapes, in
another letter case, in hexadecimal, or in base64 — standard or URL-safe, padded or not, at any
of the three alignments (``Authorization: Basic base64(user:secret)`` puts the secret at an
offset) — and any character of it may be written in any of these ways.

``redactor(secrets)`` builds one RE2 pattern for a set of secrets (cached: a tool's secrets
are the same from call to call; ``redactor_off_loop`` builds a large one in a worker thread) and
``Redactor.sub`` replaces every match in one pass, in time linear in the text (RE2 never
backtracks; more than ``GROUP_SECRETS`` secrets or ``GROUP_CHARS`` characters of them take a
pass per group, so RE2's DFA stays within its memory). ``Redactor.reach`` is the longest text
one match may span: a reader that cuts an answer reads that much past the cut, redacts, then
cuts, so a secret across the cut is found whole (runtime/http_tools.read_capped).
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections import OrderedDict

import re2

MARK = "[redacted]"
MIN_SECRET = 6  # shorter values are not hunted for in answers (they would mangle them)
MAX_SECRET = 4096  # longer values are hunted for by their first MAX_SECRET characters

_JSON_ESCAPES = {'"': '"', "\\": "\\\\", "/": "/", "\b": "b", "\f": "f", "\n": "n", "\r": "r", "\t": "t"}
_HTML_NAMED = {"&": "amp", "<": "lt", ">": "gt", '"': "quot", "'": "(?:apos|#0*39)"}
_BACKSLASHES = r"\\+"  # one, or doubled (and more) when escaped text is escaped again


def _char(c: str) -> str:
    """Every way one character of a secret may be written."""
    raw = c.encode("utf-8", "surrogatepass")
    ways = [re.escape(c)]
    if c == " ":
        ways.append(r"\+")
    ways.append("".join(f"%(?:25)*{b:02x}" for b in raw))  # URL-encoded, once or more
    ways.append("".join(f"{_BACKSLASHES}x{b:02x}" for b in raw))
    point = ord(c)
    if point > 0xFFFF:
        hi, lo = 0xD800 + ((point - 0x10000) >> 10), 0xDC00 + ((point - 0x10000) & 0x3FF)
        ways.append(f"{_BACKSLASHES}u{hi:04x}{_BACKSLASHES}u{lo:04x}")
    else:
        ways.append(f"{_BACKSLASHES}u{point:04x}")
    if c in _JSON_ESCAPES:
        ways.append(_BACKSLASHES + re.escape(_JSON_ESCAPES[c]))
    ways.append(f"&#0*{point};")
    ways.append(f"&#x0*{point:x};")
    if c in _HTML_NAMED:
        ways.append(f"&{_HTML_NAMED[c]};")
    return "(?:" + "|".join(ways) + ")"


def _base64_cores(data: bytes) -> list[str]:
    """The base64 characters that depend only on ``data``, for each of the three offsets it
    may start at within the encoded stream (the first and last characters also carry bits of
    what surrounds it)."""
    cores = []
    for offset in range(3):
        encoded = base64.b64encode(b"\x00" * offset + data).decode().rstrip("=")
        start = -(-8 * offset // 6)
        end = 8 * (offset + len(data)) // 6
        core = encoded[start:end]
        if len(core) >= 6:
            cores.append(core)
    return cores


def _base64_form(core: str) -> str:
    """A base64 core, standard or URL-safe alphabet, case-sensitive."""
    return "(?-i:" + re.escape(core).replace(r"\+", "[+-]").replace("/", "[/_]") + ")"


def forms(secret: str) -> list[str]:
    """The pattern alternatives that find ``secret`` in any of its written forms."""
    secret = secret[:MAX_SECRET]
    raw = secret.encode("utf-8", "surrogatepass")
    out = ["".join(_char(c) for c in secret), re.escape(raw.hex())]
    out += [_base64_form(core) for core in _base64_cores(raw)]
    return out


# One pattern covers at most this many secrets and characters of them: RE2's DFA stays within
# its memory (a 1 MB pass in a few ms); past it RE2 falls back to its NFA, linear still but a
# thousand times slower (32 secrets of 512 characters: 2.8 s per MB). More secrets: more passes.
GROUP_SECRETS = 8
GROUP_CHARS = 4096


def _groups(secrets: tuple[str, ...]) -> list[list[str]]:
    groups: list[list[str]] = []
    size = 0
    for secret in sorted((s[:MAX_SECRET] for s in secrets), key=len, reverse=True):
        if not groups or len(groups[-1]) >= GROUP_SECRETS or size + len(secret) > GROUP_CHARS:
            groups.append([])
            size = 0
        groups[-1].append(secret)
        size += len(secret)
    return groups


class Redactor:
    """Every written form of a set of secrets: ``sub`` replaces them with ``MARK``."""

    def __init__(self, secrets: tuple[str, ...]) -> None:
        self.secrets = secrets
        options = re2.Options()
        options.max_mem = 64 << 20
        options.log_errors = False  # RE2 quotes the pattern — the secrets — in its error messages
        self._patterns = [
            re2.compile("(?is)(?:" + "|".join(f for s in group for f in forms(s)) + ")", options)
            for group in _groups(secrets)
        ]
        # the longest text one match may span: each character written at its longest
        self.reach = max((len(s[:MAX_SECRET].encode("utf-8", "surrogatepass")) for s in secrets), default=0) * 16

    def sub(self, text: str) -> str:
        for pattern in self._patterns:
            if text:
                text = pattern.sub(MARK, text)
        return text

    def __call__(self, text: str) -> str:
        return self.sub(text)


_BUILT: OrderedDict[tuple[str, ...], Redactor] = OrderedDict()
_BUILT_MAX = 256  # secret sets (a tool's secrets are one set; they change only with the environment)


def _key(secrets) -> tuple[str, ...]:
    return tuple(sorted({s for s in secrets if isinstance(s, str) and len(s) >= MIN_SECRET}))


def _build(key: tuple[str, ...]) -> Redactor:
    found = _BUILT.get(key)
    if found is None:
        found = _BUILT[key] = Redactor(key)
        while len(_BUILT) > _BUILT_MAX:
            _BUILT.popitem(last=False)
    return found


def redactor(secrets) -> Redactor:
    """The redactor of a set of secrets (shorter ones than ``MIN_SECRET`` left out), built once."""
    return _build(_key(secrets))


async def redactor_off_loop(secrets) -> Redactor:
    """``redactor``, built in a worker thread the first time unless it is small: a tool with
    many long secrets (32 headers of 4 KB) takes seconds to compile, which must not stall the
    event loop."""
    key = _key(secrets)
    found = _BUILT.get(key)
    if found is not None:
        return found
    if sum(map(len, key)) <= 512:
        return _build(key)
    return await asyncio.to_thread(_build, key)


def redact(text: str, secrets) -> str:
    """``text`` with every written form of every secret replaced by ``[redacted]``."""
    return redactor(secrets).sub(text) if secrets else text
