"""Applying the actions to findings: redact, mask, hash, pseudonymize (block is decided earlier).

The splice is done here rather than by Presidio's ``AnonymizerEngine``: that engine costs
≈ 85 µs for a short text with two findings, which for a conversation of 20 earlier turns adds
up to more than analysing the newest message. Findings are already free of overlaps.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections import Counter
from dataclasses import dataclass, field

PLACEHOLDER = re.compile(r"<([A-Z][A-Z0-9_]*?_\d{1,6})>")


@dataclass
class Vault:
    """One request's pseudonyms: the same value gets the same placeholder everywhere in it.

    Numbering follows first appearance in the request, so the same conversation prefix always
    yields the same placeholders (and upstream prompt caches keep working).
    """

    by_value: dict[tuple[str, str], str] = field(default_factory=dict)
    by_placeholder: dict[str, str] = field(default_factory=dict)
    _next: Counter = field(default_factory=Counter)

    def placeholder(self, label: str, value: str) -> str:
        key = (label, value)
        found = self.by_value.get(key)
        if found is None:
            self._next[label] += 1
            found = f"<{label}_{self._next[label]}>"
            self.by_value[key] = found
            self.by_placeholder[found[1:-1]] = value
        return found

    def __bool__(self) -> bool:
        return bool(self.by_placeholder)


def mask(value: str, keep: int) -> str:
    """Letters and digits become ``*`` except the last ``keep`` of them; separators stay."""
    alnum = sum(c.isalnum() for c in value)
    visible_from = alnum - keep
    out, seen = [], 0
    for c in value:
        if c.isalnum():
            out.append(c if seen >= visible_from else "*")
            seen += 1
        else:
            out.append(c)
    return "".join(out)


def hashed(label: str, value: str, secret: bytes) -> str:
    digest = hmac.new(secret, f"{label}:{value}".encode(), hashlib.sha256).hexdigest()[:16]
    return f"<{label}:{digest}>"


def apply(
    text: str,
    findings: list[tuple[int, int, str]],  # start, end, label
    actions: dict[str, str],  # label -> action
    vault: Vault,
    mask_keep: int,
    secret: bytes,
) -> str:
    out, pos = [], 0
    for start, end, label in findings:
        action = actions[label]
        value = text[start:end]
        if action == "pseudonymize":
            new = vault.placeholder(label, value)
        elif action == "redact":
            new = f"<{label}>"
        elif action == "mask":
            new = mask(value, mask_keep)
        elif action == "hash":
            new = hashed(label, value, secret)
        else:
            continue  # allow
        out.append(text[pos:start])
        out.append(new)
        pos = end
    out.append(text[pos:])
    return "".join(out)
