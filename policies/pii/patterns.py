"""Custom recognizer patterns, run in linear time or under a timeout.

A pattern from config meets text from clients: with a backtracking engine, ``(\\w+)+@`` over a
long word takes exponential time. Patterns RE2 can compile (no look-arounds, no
back-references) run on RE2, whose time is linear in the text. The others run on the
``regex`` module with a timeout; a timeout raises ``PatternTimeout``, which fails the
analysis (the request is refused, never sent unscrubbed), unlike Presidio's own
``PatternRecognizer``, which logs a timed-out pattern and skips it.

RE2's ``\\d``, ``\\w`` and ``\\b`` are ASCII-only, where Python's are Unicode-aware.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import regex

log = logging.getLogger("gateway.pii")

TIMEOUT_S = 1.0  # per scan of one text, for patterns RE2 cannot run


class PatternTimeout(RuntimeError):
    pass


class CustomPattern:
    """One compiled custom pattern: ``spans(text)`` yields (start, end) of each match."""

    def __init__(self, pattern: str, ignore_case: bool) -> None:
        self.pattern = pattern
        self.linear = False
        self._re2 = None
        try:
            import re2

            options = re2.Options()
            options.log_errors = False
            options.case_sensitive = not ignore_case
            self._re2 = re2.compile(pattern, options)
            self.linear = True
        except Exception:  # not RE2 syntax (look-arounds, back-references), or RE2 missing
            log.warning(
                "PII pattern %r cannot run on RE2 (linear time); it runs with a %.1f s timeout instead",
                pattern,
                TIMEOUT_S,
            )
        self._regex = regex.compile(pattern, regex.IGNORECASE if ignore_case else 0)

    def spans(self, text: str) -> Iterator[tuple[int, int]]:
        if self._re2 is not None:
            for m in self._re2.finditer(text):
                if m.end() > m.start():
                    yield m.start(), m.end()
            return
        try:
            for m in self._regex.finditer(text, timeout=TIMEOUT_S):
                if m.end() > m.start():
                    yield m.start(), m.end()
        except TimeoutError:
            raise PatternTimeout(f"custom PII pattern timed out after {TIMEOUT_S} s") from None
