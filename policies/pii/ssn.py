"""US Social Security numbers, without the areas the SSA never issues.

Presidio's ``UsSsnRecognizer`` drops areas 000 and 666, groups 00 and serials 0000, but not
areas 900-999: the SSA never assigns them (SSA POMS RM 10201.035); numbers of that shape are
Individual Taxpayer Identification Numbers ("ITIN 912-78-1234") or made up.
"""

from __future__ import annotations

from presidio_analyzer.predefined_recognizers import UsSsnRecognizer


class SsnRecognizer(UsSsnRecognizer):
    def invalidate_result(self, pattern_text: str) -> bool:
        digits = "".join(c for c in pattern_text if c.isdigit())
        return super().invalidate_result(pattern_text) or digits[:1] == "9"
