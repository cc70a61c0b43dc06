"""Reading providers' rate-limit headers: what is left on a key, and when it resets."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from datetime import datetime

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(value: str) -> float | None:
    """OpenAI-style durations: ``1s``, ``6m0s``, ``60ms``, ``1h2m3.5s``."""
    total, found = 0.0, False
    for number, unit in _DURATION.findall(value):
        found = True
        total += float(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    if found:
        return total
    try:
        return float(value)
    except ValueError:
        return None


# The furthest a reset is believed: a provider (or whatever answers at its address) naming one
# centuries away would retire the key for good.
MAX_RESET = 3600.0


def _reset_at(value: str | None, now: float) -> float | None:
    if not value:
        return None
    if "T" in value and "-" in value:  # Anthropic: RFC 3339 timestamp
        try:
            at = datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except (ValueError, OverflowError):
            return None
        return min(at, now + MAX_RESET)
    seconds = parse_duration(value)
    if seconds is None or seconds != seconds:
        return None
    return now + min(max(seconds, 0.0), MAX_RESET)


def _int(value: str | None) -> int | None:
    try:
        return int(float(value)) if value is not None else None
    except ValueError:
        return None


def read(headers: Mapping[str, str]) -> tuple[int | None, int | None, int | None, float | None]:
    """(remaining requests, request limit, remaining tokens, reset time) from a response."""
    now = time.time()
    remaining = _int(headers.get("x-ratelimit-remaining-requests"))
    if remaining is not None:
        return (
            remaining,
            _int(headers.get("x-ratelimit-limit-requests")),
            _int(headers.get("x-ratelimit-remaining-tokens")),
            _reset_at(headers.get("x-ratelimit-reset-requests"), now),
        )
    remaining = _int(headers.get("anthropic-ratelimit-requests-remaining"))
    if remaining is not None:
        return (
            remaining,
            _int(headers.get("anthropic-ratelimit-requests-limit")),
            _int(headers.get("anthropic-ratelimit-tokens-remaining")),
            _reset_at(headers.get("anthropic-ratelimit-requests-reset"), now),
        )
    return None, None, None, None
