"""Email addresses Presidio's ``EmailRecognizer`` does not read: written to be read by people,
or encoded, but an address all the same.

* obfuscated against harvesters: ``jane [at] example [dot] org``, ``k.tanaka(at)example.jp``,
  ``maria.lopez at gmail dot com`` — whoever reads them can write to the person, so a scrubber
  must hide them. The plain-word form (`` at `` … `` dot ``) is taken only when the local part
  could not be an English word ("look at this dot com" is a sentence): it holds a dot, an
  underscore, a plus, a hyphen or a digit;
* percent-encoded in a URL: ``?email=ana.costa%40example.pt``;
* with a quoted local part (RFC 5322 §3.4.1): ``"john smith"@example.org``.

Each pattern is a chain of bounded character classes with one way to match: linear in the text.
"""

from __future__ import annotations

import re

from presidio_analyzer import AnalysisExplanation, EntityRecognizer, RecognizerResult

_LOCAL = r"[^\W_](?:[\w.+'-]{0,62}[^\W_])?"  # letters of any script, digits, . + ' - _
_LABEL = r"[^\W_](?:[\w-]{0,61}[^\W_])?"
_TLD = r"[^\W\d_]{2,24}"
_AT = r"\s{0,2}[\[({<]\s{0,2}(?i:at)\s{0,2}[\])}>]\s{0,2}"
_DOT = r"(?:\.|\s{0,2}[\[({<]\s{0,2}(?i:dot)\s{0,2}[\])}>]\s{0,2})"
_NOT_AFTER = r"(?![\w@-])(?!\.[^\W_])"

# (a cheap test that a text may hold the shape, the pattern)
PATTERNS = (
    # jane [at] example [dot] org, k.tanaka(at)example.jp
    (
        re.compile(r"(?i:at)\s?[\])}>]"),
        re.compile(rf"(?<![\w.+'-]){_LOCAL}{_AT}(?:{_LABEL}{_DOT})+{_TLD}{_NOT_AFTER}"),
    ),
    # maria.lopez at gmail dot com: a local part no English word could be
    (
        re.compile(r"\s(?i:dot)\s"),
        re.compile(
            rf"(?<![\w.+'-])(?=[\w'-]*[.+_\d-])[^\W_][\w.+'-]{{0,62}}[^\W_]\s(?i:at)\s(?:{_LABEL}\s(?i:dot)\s)+"
            rf"{_TLD}{_NOT_AFTER}"
        ),
    ),
    # ana.costa%40example.pt
    (re.compile("%40"), re.compile(rf"(?<![\w.+'%-]){_LOCAL}%40(?:{_LABEL}\.)+{_TLD}{_NOT_AFTER}")),
    # "john smith"@example.org
    (re.compile('"@'), re.compile(rf'"[^"\\\r\n]{{1,64}}"@(?:{_LABEL}\.)+{_TLD}{_NOT_AFTER}')),
)


def find(text: str) -> list[tuple[int, int]]:
    return [m.span() for hint, p in PATTERNS if hint.search(text) for m in p.finditer(text)]


class WrittenEmailRecognizer(EntityRecognizer):
    def __init__(self) -> None:
        super().__init__(supported_entities=["EMAIL_ADDRESS"], name="WrittenEmailRecognizer")

    def load(self) -> None:
        pass

    def analyze(self, text: str, entities: list[str], nlp_artifacts=None) -> list[RecognizerResult]:
        return [
            RecognizerResult(
                "EMAIL_ADDRESS",
                a,
                b,
                EntityRecognizer.MAX_SCORE,
                analysis_explanation=AnalysisExplanation(
                    self.name, EntityRecognizer.MAX_SCORE, textual_explanation="written-out address"
                ),
                recognition_metadata={
                    RecognizerResult.RECOGNIZER_NAME_KEY: self.name,
                    RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: self.id,
                },
            )
            for a, b in find(text)
        ]
