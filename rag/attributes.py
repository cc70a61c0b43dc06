"""Attributes of documents (OpenAI's vector-store file ``attributes``) and search filters on them.

Attributes: at most 16 pairs; keys are strings of up to 64 characters; values are strings of up
to 512 characters, booleans or finite numbers.

A filter is OpenAI's: a comparison ``{"key", "type": eq|ne|gt|gte|lt|lte|in|nin, "value"}`` or
a compound ``{"type": and|or, "filters": [...]}``. ``compile_filter`` turns one into a SQL
condition on a jsonb column in which every key and value is a *parameter* (``$n``), never text
spliced into the statement, and bounds the work: at most ``MAX_NODES`` nodes, ``MAX_DEPTH``
levels, ``MAX_IN`` values in a list. Semantics: a comparison on a key a document lacks is false
(``ne`` and ``nin``: true); ``gt``/``gte``/``lt``/``lte`` compare numbers with numbers and strings
with strings (a number never compares with a string); ``eq`` on 1 matches 1.0.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

MAX_PAIRS = 16
MAX_KEY = 64
MAX_VALUE = 512
MAX_NODES = 64
MAX_DEPTH = 5
MAX_IN = 100
COMPARISONS = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "nin")
COMPOUNDS = ("and", "or")
_ORDER = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


class InvalidAttributes(ValueError):
    """Invalid attributes or filter: ``param`` names the field, the message is safe to show."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


def _scalar(value: Any, *, allow_bool: bool = True) -> bool:
    if isinstance(value, bool):
        return allow_bool
    if isinstance(value, int | float):
        return math.isfinite(value)
    return isinstance(value, str) and len(value) <= MAX_VALUE and "\x00" not in value


def check_attributes(raw: Any, param: str = "attributes", *, max_value: int = MAX_VALUE) -> dict[str, Any]:
    """The attributes (or metadata, ``max_value`` for its strings) as a clean dict."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidAttributes(param, f"'{param}' must be an object.")
    if len(raw) > MAX_PAIRS:
        raise InvalidAttributes(param, f"'{param}' may have at most {MAX_PAIRS} keys.")
    out = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not key or len(key) > MAX_KEY or "\x00" in key:
            raise InvalidAttributes(param, f"Keys of '{param}' must be strings of 1 to {MAX_KEY} characters.")
        if isinstance(value, str) and len(value) > max_value:
            raise InvalidAttributes(f"{param}.{key}", f"'{param}.{key}' must be at most {max_value} characters.")
        if not _scalar(value):
            raise InvalidAttributes(f"{param}.{key}", f"'{param}.{key}' must be a string, a number or a boolean.")
        out[key] = value
    return out


def compile_filter(flt: Any, args: list, column: str = "attributes", param: str = "filters") -> str:
    """A SQL boolean expression for ``flt`` over the jsonb ``column`` (code, not client text);
    the values it needs are appended to ``args`` and referenced as ``$n``."""
    nodes = [0]
    return _compile(flt, args, column, param, 1, nodes)


def _compile(flt: Any, args: list, column: str, param: str, depth: int, nodes: list[int]) -> str:
    nodes[0] += 1
    if nodes[0] > MAX_NODES:
        raise InvalidAttributes(param, f"The filter has more than {MAX_NODES} parts.")
    if depth > MAX_DEPTH:
        raise InvalidAttributes(param, f"The filter nests deeper than {MAX_DEPTH} levels.")
    if not isinstance(flt, dict):
        raise InvalidAttributes(param, f"'{param}' must be an object.")
    kind = flt.get("type")
    if kind in COMPOUNDS:
        extra = sorted(set(flt) - {"type", "filters"})
        if extra:
            raise InvalidAttributes(
                f"{param}.{str(extra[0])[:64]}", f"Unknown parameter '{param}.{str(extra[0])[:64]}'."
            )
        parts = flt.get("filters")
        if not isinstance(parts, list) or not parts:
            raise InvalidAttributes(f"{param}.filters", f"'{param}.filters' must be a non-empty array.")
        sql = [_compile(p, args, column, f"{param}.filters[{i}]", depth + 1, nodes) for i, p in enumerate(parts)]
        return "(" + f" {kind.upper()} ".join(sql) + ")"
    if kind not in COMPARISONS:
        raise InvalidAttributes(f"{param}.type", f"'{param}.type' must be one of {', '.join(COMPARISONS + COMPOUNDS)}.")
    extra = sorted(set(flt) - {"type", "key", "value"})
    if extra:
        raise InvalidAttributes(f"{param}.{str(extra[0])[:64]}", f"Unknown parameter '{param}.{str(extra[0])[:64]}'.")
    key = flt.get("key")
    if not isinstance(key, str) or not key or len(key) > MAX_KEY or "\x00" in key:
        raise InvalidAttributes(f"{param}.key", f"'{param}.key' must be a string of 1 to {MAX_KEY} characters.")
    value = flt.get("value")
    if kind in ("in", "nin"):
        if not isinstance(value, list) or not value or len(value) > MAX_IN:
            raise InvalidAttributes(f"{param}.value", f"'{param}.value' must be an array of 1 to {MAX_IN} values.")
        if not all(_scalar(v, allow_bool=False) for v in value):
            raise InvalidAttributes(f"{param}.value", f"'{param}.value' must hold strings and numbers.")
    elif kind in _ORDER:
        if not _scalar(value, allow_bool=False):
            raise InvalidAttributes(f"{param}.value", f"'{param}.value' must be a number or a string for '{kind}'.")
    elif not _scalar(value):
        raise InvalidAttributes(f"{param}.value", f"'{param}.value' must be a string, a number or a boolean.")
    args.append(key)
    k = f"${len(args)}::text"
    args.append(orjson.dumps(value).decode())
    v = f"${len(args)}::jsonb"
    field = f"({column} -> {k})"
    if kind == "eq":
        return f"({field} = {v})"
    if kind == "ne":
        return f"({field} IS DISTINCT FROM {v})"
    if kind == "in":
        return f"coalesce({v} @> jsonb_build_array({field}), false)"
    if kind == "nin":
        return f"NOT coalesce({v} @> jsonb_build_array({field}), false)"
    return f"(jsonb_typeof({field}) = jsonb_typeof({v}) AND {field} {_ORDER[kind]} {v})"
