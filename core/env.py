"""Tuning read from the environment (worker knobs that are not part of the config file)."""

from __future__ import annotations

import os

_OFF = ("0", "false", "no", "off")


def env_float(name: str, default: float) -> float:
    """A non-negative number from ``name``; ``default`` when unset, unreadable or negative."""
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value >= 0 else default


def env_on(name: str) -> bool:
    """A switch that is on unless ``name`` says 0, false, no or off."""
    return os.environ.get(name, "1").strip().lower() not in _OFF
