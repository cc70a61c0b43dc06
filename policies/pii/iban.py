"""IBANs followed by other numbers.

Presidio's ``IbanRecognizer`` reads up to six groups of four after the country code and, when
that fails validation, retries only without its last one or two optional groups: an IBAN
followed by a number ("ES9121000418450200051332 2024-05-01", "DE89 3704 … 00 1500 EUR") is
lost. And it reads upper case only, where people typing on a phone write "it60x0542811101000000123456".
This subclass keeps Presidio's findings and, for candidates it left alone, in either case, tries
every shorter cut at a group boundary, longest first, with Presidio's own validation (country
format and mod-97 check digits) of the upper-cased cut.
"""

from __future__ import annotations

import re

from presidio_analyzer import AnalysisExplanation, EntityRecognizer, RecognizerResult
from presidio_analyzer.predefined_recognizers import IbanRecognizer

_CANDIDATE = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{2}\d{2}(?:[ -]?[A-Za-z0-9]{1,4}){2,12}")
_GROUP = re.compile(r"[A-Za-z0-9]+")


class GreedySafeIbanRecognizer(IbanRecognizer):
    def analyze(self, text: str, entities: list[str], nlp_artifacts=None, regex_flags=None) -> list[RecognizerResult]:
        results = super().analyze(text, entities, nlp_artifacts, regex_flags)
        taken = [(r.start, r.end) for r in results]
        for m in _CANDIDATE.finditer(text):
            if any(a < m.end() and m.start() < b for a, b in taken):
                continue
            s = m.group()
            for g in reversed(list(_GROUP.finditer(s))):
                if self.validate_result(s[: g.end()].upper()):
                    results.append(
                        RecognizerResult(
                            self.supported_entities[0],
                            m.start(),
                            m.start() + g.end(),
                            EntityRecognizer.MAX_SCORE,
                            analysis_explanation=AnalysisExplanation(
                                self.name,
                                EntityRecognizer.MAX_SCORE,
                                textual_explanation="IBAN cut at a group boundary",
                            ),
                            recognition_metadata={
                                RecognizerResult.RECOGNIZER_NAME_KEY: self.name,
                                RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: self.id,
                            },
                        )
                    )
                    break
        return results
