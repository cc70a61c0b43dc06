"""What people type for digits and separators, folded one character to one to ASCII.

A number pasted from a PDF is grouped with no-break or thin spaces ("4111 1111 …"), one typed
with a Japanese or Chinese input method has full-width digits and dashes ("０９０－１２３４"),
and word processors turn "-" into "‐", "–" or "−". The recognizers' patterns and checks
(Luhn, libphonenumber's grouping) read ASCII digits and separators; ``fold(text)`` gives them
the same text with those characters replaced, each by exactly one character, so every offset
found in the folded text is an offset in the original.

Scripts written without spaces (Chinese, Japanese, Korean) put digits right after a letter
("携帯は090-1234-5678です"): ``WORD`` is the word character the patterns must not find glued to
either side of a number, those scripts' letters left out.
"""

from __future__ import annotations

_TABLE = {0xFF10 + i: ord("0") + i for i in range(10)}  # full-width digits
_TABLE.update({c: ord(" ") for c in (0x00A0, 0x2007, 0x2009, 0x200A, 0x202F, 0x3000)})  # no-break, thin, ideographic
_TABLE.update({c: ord("-") for c in (0x2010, 0x2011, 0x2012, 0x2013, 0x2014, 0x2212, 0xFE63, 0xFF0D)})  # dashes, minus
_TABLE.update({0xFF08: ord("("), 0xFF09: ord(")"), 0xFF0E: ord("."), 0xFF0F: ord("/"), 0xFF0B: ord("+")})

# Characters of the scripts written without spaces between words: kana, CJK ideographs, hangul,
# and the full-width forms' letters and punctuation.
CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uff01-\uffef"
WORD = rf"[^\W{CJK}]"  # a word character that is not one of theirs


def fold(text: str) -> str:
    """``text`` with full-width digits, Unicode spaces and dashes as ASCII, offsets unchanged."""
    return text if text.isascii() else text.translate(_TABLE)
