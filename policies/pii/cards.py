"""Payment card numbers of every current scheme, by issuer range, length, grouping and Luhn.

Presidio's ``CreditCardRecognizer`` knows numbers starting with 1, 3, 4, 5[0-5] or 6 and at
most 17 digits: Mastercard's 2-series (2221-2720), Mir (2200-2204), 19-digit UnionPay and
Visa, Troy, UzCard, Humo, ... are missed, and any 3-4 digit grouping is accepted, so an EAN
written ``4006-381-333-931`` or an order number ``4567890-1234567`` passes when its digits
happen to pass Luhn (one in ten do).

Here a candidate is a run of digit groups, each separated by one space, dash or dot, the same
one throughout the sub-run tried (a card then a date, "4012888888881881 2024-05-01", is two)
unless the sub-run is printed in fours ("4242-4242 4242-4242").
Every sub-run of whole groups is tried, longest first, and accepted when:

* its digits start with an issuer range of a scheme below and have one of that scheme's lengths;
* it is written the way cards are printed: contiguous, in fours (the last group 1-4 digits),
  or 4-6-5 / 4-6-4 (Amex, Diners, UATP);
* it passes the Luhn check;
* for lengths only legacy or rare cards use (13-digit Visa, 12-15 digit Maestro, UATP), a card
  word (card, visa, cvv, ...) stands within a few words before it.

IMEIs (15 digits, Luhn-valid by design) fall outside every scheme's lengths for their ranges.
"""

from __future__ import annotations

import re

from presidio_analyzer import AnalysisExplanation, EntityRecognizer, RecognizerResult

from policies.pii.fold import WORD, fold

# (scheme, issuer ranges as (low, high) over the first len(str(low)) digits, lengths, weak lengths)
# Weak lengths need a card word nearby. Sources: ISO/IEC 7812 registrations as published by the
# schemes (Visa, Mastercard, Amex, Discover Global Network, JCB, UnionPay, Mir, RuPay, ...).
_ANY = tuple(range(12, 20))
SCHEMES: tuple[tuple[str, tuple[tuple[int, int], ...], tuple[int, ...], tuple[int, ...]], ...] = (
    ("visa", ((4, 4),), (16, 19), (13,)),
    ("mastercard", ((51, 55), (2221, 2720)), (16,), ()),
    ("amex", ((34, 34), (37, 37)), (15,), ()),
    ("discover", ((6011, 6011), (644, 649), (65, 65), (622126, 622925)), (16, 17, 18, 19), ()),
    ("jcb", ((3528, 3589),), (16, 17, 18, 19), ()),
    ("diners", ((300, 305), (3095, 3095), (36, 36), (38, 39)), (14, 15, 16, 17, 18, 19), ()),
    ("unionpay", ((62, 62), (81, 81)), (16, 17, 18, 19), ()),
    ("maestro", ((50, 50), (56, 69)), (16, 17, 18, 19), (12, 13, 14, 15)),
    ("mir", ((2200, 2204),), (16, 17, 18, 19), ()),
    ("borica", ((2205, 2205),), (16,), ()),
    ("rupay", ((60, 60), (65, 65), (81, 82), (508, 508), (353, 353), (356, 356)), (16,), ()),
    ("troy", ((9792, 9792), (65, 65)), (16,), ()),
    ("verve", ((506099, 506198), (507865, 507964), (650002, 650027)), (16, 18, 19), ()),
    ("dankort", ((5019, 5019),), (16,), ()),
    ("interpayment", ((636, 636),), (16, 17, 18, 19), ()),
    ("instapayment", ((637, 639),), (16,), ()),
    ("hipercard", ((606282, 606282), (3841, 3841)), (16, 19), ()),
    ("uzcard", ((8600, 8600),), (16,), ()),
    ("humo", ((9860, 9860),), (16,), ()),
    ("lankapay", ((357111, 357111),), (16,), ()),
    ("uatp", ((1, 1),), (), (15,)),
)

CONTEXT = (
    "card", "credit", "debit", "visa", "mastercard", "master card", "amex", "american express",
    "discover", "jcb", "diners", "maestro", "unionpay", "union pay", "mir", "rupay", "troy",
    "verve", "elo", "hipercard", "dankort", "cc", "cvv", "cvc", "exp", "expiry", "pan", "karte",
    "kreditkarte", "carte", "tarjeta", "cartão", "карта", "卡", "カード", "uatp",
)  # fmt: skip
_CONTEXT = re.compile(r"(?<![^\W\d_])(?:" + "|".join(map(re.escape, CONTEXT)) + r")(?![^\W\d_])", re.IGNORECASE)
_CONTEXT_REACH = 40  # characters before a weak candidate searched for a card word

# A run of digit groups separated by a space, a dash or a dot: not glued to letters, digits or
# another group on either side. The run may end before a last group glued to a decimal point
# ("… 00009 2.4.1": the card, then a version). A comma may stand before or after it, as in a
# CSV row ("1001,4012888888881881,123,09/26"), but not as a thousands separator: a group of
# three digits after a comma and a digit, or a comma and three digits after a group shorter than
# four ("1,234", "5,000").
_RUN = re.compile(
    r"(?<![./\d_-])(?:(?<!\d,)|(?!\d{{3}}(?!\d)))(?<!\d[ .-])\d++(?:(?: - |[ .-])\d++)*(?!{WORD})(?![./]\d)"
    r"(?:(?<=\d{4})|(?!,\d{3}(?!\d)))"
)
# A run glued to letters is part of a code ("ABC4111111111111111"), unless the letters are a card
# word ("amex378282246310005", "VISA4111 1111 1111 1111").
_LETTER = re.compile(WORD)
_GLUED = re.compile(r"(?<![^\W\d_])(?:" + "|".join(map(re.escape, CONTEXT)) + r")\Z", re.IGNORECASE)
_GLUED_REACH = max(map(len, CONTEXT))
_GROUP = re.compile(r"\d+")
_MAX_GROUPS = 8  # a card has at most 8 groups (19 digits in 4-4-4-4-3 is 5)


def _scheme(digits: str) -> tuple[str, bool] | None:
    """(scheme, weak) when ``digits`` start with an issuer range at a length the scheme issues."""
    n = len(digits)
    for name, ranges, lengths, weak in SCHEMES:
        if n not in lengths and n not in weak:
            continue
        for low, high in ranges:
            width = len(str(low))
            if low <= int(digits[:width]) <= high:
                return name, n not in lengths
    return None


def luhn(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = ord(c) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _printed(sizes: list[int]) -> bool:
    """Grouped the way card numbers are printed."""
    if len(sizes) == 1:
        return True
    if all(s == 4 for s in sizes[:-1]) and 1 <= sizes[-1] <= 4:
        return True
    return sizes in ([4, 6, 5], [4, 6, 4])


def _fours_alone(seps: list[str], sizes: list[int], i: int, j: int) -> bool:
    """Groups ``i`` to ``j - 1``, joined by mixed separators, read as one card: three or more
    groups of four (the last 1-4), printed as a card is whatever joins them ("4242-4242
    4242-4242") — unless a separator it uses joins it to a group beyond, which would cut a run
    in two ("PIN 6476 4012-8888-8888-1881" is a number, then a card)."""
    if len(sizes) < 3 or not all(s == 4 for s in sizes[:-1]) or not 1 <= sizes[-1] <= 4:
        return False
    inside = set(seps[i : j - 1])
    return not ((i > 0 and seps[i - 1] in inside) or (j - 1 < len(seps) and seps[j - 1] in inside))


def _cuts_token(seps: list[str], i: int, j: int) -> bool:
    """Groups ``i`` to ``j - 1`` joined by spaces, taking a group that is dash-joined to the one
    beyond: "4111 1111 1111 1111 219-09-9999" is a card, then an SSN — not a 19-digit card
    ending in 219 (it passes Luhn) that hides the SSN."""
    if j - i < 2 or seps[i] != " ":
        return False
    return (j - 1 < len(seps) and seps[j - 1] == "-") or (i > 0 and seps[i - 1] == "-")


def find(text: str) -> list[tuple[int, int, str]]:
    """(start, end, scheme) of each card number in ``text``. Linear: from each group, only the
    sub-runs of 12 to 19 digits (at most ``_MAX_GROUPS`` groups) are tried."""
    text = fold(text)  # full-width digits, no-break spaces, Unicode dashes: as ASCII, same offsets
    out: list[tuple[int, int, str]] = []
    for run in _RUN.finditer(text):
        s = run.group()
        if len(s) < 12:
            continue
        at = run.start()
        if at and _LETTER.match(text, at - 1) and not _GLUED.search(text, max(0, at - _GLUED_REACH), at):
            continue
        groups = [(g.start(), g.end()) for g in _GROUP.finditer(s)]
        seps = [s[b : groups[k + 1][0]] for k, (_, b) in enumerate(groups[:-1])]  # after each group but the last
        ends = [0]  # digits before each group
        for a, b in groups:
            ends.append(ends[-1] + b - a)
        i = 0
        while i < len(groups):
            hit = cut = None
            for j in range(min(len(groups), i + _MAX_GROUPS), i, -1):  # longest first
                total = ends[j] - ends[i]
                if total < 12:
                    break
                if total > 19:
                    continue
                sizes = [b - a for a, b in groups[i:j]]
                if not _printed(sizes):
                    continue
                if len(set(seps[i : j - 1])) > 1 and not _fours_alone(seps, sizes, i, j):
                    continue  # mixed separators: "4012888888881881 2024-05-01" is a card, then a date
                digits = "".join(s[a:b] for a, b in groups[i:j])
                found = _scheme(digits)
                if found is None or not luhn(digits):
                    continue
                start, end = run.start() + groups[i][0], run.start() + groups[j - 1][1]
                if found[1] and not _CONTEXT.search(text, max(0, start - _CONTEXT_REACH), start):
                    continue
                if cut is None and _cuts_token(seps, i, j):
                    cut = (start, end, found[0], j)  # taken only if no shorter reading is a card
                    continue
                hit = (start, end, found[0], j)
                break
            hit = hit or cut
            if hit is None:
                i += 1
                continue
            out.append(hit[:3])
            i = hit[3]
    return out


class CardRecognizer(EntityRecognizer):
    def __init__(self) -> None:
        super().__init__(supported_entities=["CREDIT_CARD"], name="CardRecognizer", context=list(CONTEXT))

    def load(self) -> None:
        pass

    def analyze(self, text: str, entities: list[str], nlp_artifacts=None) -> list[RecognizerResult]:
        return [
            RecognizerResult(
                "CREDIT_CARD",
                a,
                b,
                EntityRecognizer.MAX_SCORE,
                analysis_explanation=AnalysisExplanation(
                    self.name, EntityRecognizer.MAX_SCORE, textual_explanation=f"{scheme} range, Luhn"
                ),
                recognition_metadata={
                    RecognizerResult.RECOGNIZER_NAME_KEY: self.name,
                    RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: self.id,
                },
            )
            for a, b, scheme in find(text)
        ]
