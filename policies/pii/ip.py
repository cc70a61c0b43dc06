"""IP addresses: Presidio's recognizer, with its per-match costs where they belong.

* Presidio validates every match with ``ipaddress.ip_interface`` (≈ 30 µs, a third of the cost
  of a found address in a text dense with them). A plain dotted quad whose octets have no
  leading zero is valid; that is decided here, and everything else (prefix lengths, IPv6,
  leading zeros, which ``ipaddress`` refuses) still goes to ``ipaddress``.
* Four of its five patterns (IPv6, and IPv4 inside IPv6) cannot match without a colon, but the
  IPv6 one tries its dozen alternatives at every hex digit of the text: 4.5 ms per 4 KiB of
  dotted quads, more than the rest of the recognizer. They run only on the words (runs of
  non-space characters) that hold a colon. A match never holds a space, and a space after a
  word looks to their look-arounds as the end of the text does; what they look at before a
  word is still the text's: the same matches are found.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import regex
from presidio_analyzer import Pattern
from presidio_analyzer.predefined_recognizers import IpRecognizer

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_PLAIN_QUAD = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}")
_WS = re.compile(r"\s")
_LAST_WS = re.compile(r"\s(?=\S*\Z)")


def words_with_colon(text: str) -> Iterator[tuple[int, int]]:
    """(start, end) of each word of ``text`` holding a colon, in order; linear in the text."""
    pos, n = 0, len(text)
    while (colon := text.find(":", pos)) >= 0:
        before = _LAST_WS.search(text, pos, colon)
        after = _WS.search(text, colon)
        end = after.start() if after is not None else n
        yield (before.end() if before is not None else pos), end
        pos = end


def _regions(text: str, gap: int = 256) -> Iterator[tuple[int, int]]:
    """The words holding a colon, those less than ``gap`` apart joined (with the words between
    them) into one region: a search costs a few microseconds to start."""
    region: list[int] | None = None
    for start, end in words_with_colon(text):
        if region is not None and start - region[1] < gap:
            region[1] = end
            continue
        if region is not None:
            yield region[0], region[1]
        region = [start, end]
    if region is not None:
        yield region[0], region[1]


class _InWordsWithColon:
    """A compiled pattern that needs a colon, searched only in the words that hold one."""

    def __init__(self, compiled) -> None:
        self.compiled = compiled

    def finditer(self, text: str, timeout: float | None = None) -> Iterator:
        for start, end in _regions(text):
            yield from self.compiled.finditer(text, start, end, timeout=timeout)


# Presidio's patterns that match nothing without a colon (each alternative of each holds one)
NEED_A_COLON = frozenset({"IPv4_mapped", "IPv4_embedded", "IPv6", "IPv6_unspecified"})


class FastIpRecognizer(IpRecognizer):
    def __init__(self) -> None:
        # copies: the class's patterns are shared, and these get compiled differently
        super().__init__(patterns=[Pattern(p.name, p.regex, p.score) for p in IpRecognizer.PATTERNS])

    def analyze(self, text: str, entities: list[str], nlp_artifacts=None, regex_flags=None) -> list:
        flags = regex_flags if regex_flags else self.global_regex_flags
        for pattern in self.patterns:
            if pattern.name in NEED_A_COLON and (
                not isinstance(pattern.compiled_regex, _InWordsWithColon) or pattern.compiled_with_flags != flags
            ):
                pattern.compiled_regex = _InWordsWithColon(regex.compile(pattern.regex, flags=flags))
                pattern.compiled_with_flags = flags
        return super().analyze(text, entities, nlp_artifacts, regex_flags)

    def invalidate_result(self, pattern_text: str) -> bool:
        if _PLAIN_QUAD.fullmatch(pattern_text):
            return False
        return bool(super().invalidate_result(pattern_text))
