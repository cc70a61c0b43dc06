"""Validating a model's tool-call arguments against a tool's JSON schema in bounded work.

jsonschema's own ``pattern``, ``uniqueItems`` and ``enum`` run in backtracking or quadratic time
on what a model may send; here they run on RE2, in linear time and by set lookups. Every keyword
evaluation is charged to the request's budget (``_counted``), so ``$ref`` fan-out cannot make a
small schema cost seconds of the event loop (``ArgumentValidator``; the runner, ``runtime.tools``,
sets the budget per request).
"""

from __future__ import annotations

import contextvars
import functools

import re2
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError


def shortened(text: str, limit: int = 200) -> str:
    """``text`` on one line, cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


_short = shortened


@functools.lru_cache(maxsize=1024)
def _re2_pattern(pattern: str):
    options = re2.Options()
    options.log_errors = False
    try:
        return re2.compile(pattern, options)
    except Exception:  # re2.error: not RE2 syntax
        return None


def _pattern_keyword(validator, pattern, instance, schema):
    """JSON schema ``pattern`` on RE2 (parse_tools made sure every pattern compiles there)."""
    if not validator.is_type(instance, "string"):
        return
    compiled = _re2_pattern(pattern)
    if compiled is None or not compiled.search(instance):
        yield ValidationError(f"{_short(repr(instance), 80)} does not match {pattern!r}")


def _unique_items_keyword(validator, unique, instance, schema):
    """JSON schema ``uniqueItems`` in linear time: jsonschema compares unhashable items pairwise,
    ~25 s for 5,500 distinct objects (which a model's arguments may hold)."""
    if not unique or not validator.is_type(instance, "array"):
        return
    seen: set = set()
    for item in instance:
        key = _canonical(item)
        if key in seen:
            yield ValidationError(f"{_short(repr(instance), 80)} has non-unique elements")
            return
        seen.add(key)


_ENUM_SETS: dict[int, tuple[list, frozenset]] = {}


def _enum_keyword(validator, enums, instance, schema):
    """JSON schema ``enum`` by a set lookup: jsonschema compares an array's every item with every
    value listed (a 4,000-value enum and 9,000 items: 2 s; 30,000 items of 1: 13 s)."""
    found = _ENUM_SETS.get(id(enums))
    if found is None or found[0] is not enums:
        if len(_ENUM_SETS) > 4096:
            _ENUM_SETS.clear()
        found = _ENUM_SETS[id(enums)] = (enums, frozenset(_canonical(e) for e in enums))
    if _canonical(instance) not in found[1]:
        yield ValidationError(f"{_short(repr(instance), 80)} is not one of {_short(repr(enums[:20]), 80)}")


def _canonical(value):
    """A hashable form equal for equal JSON values (1 and 1.0 alike, true and 1 not)."""
    if isinstance(value, bool) or value is None:
        return ("c", value)
    if isinstance(value, int | float):
        return ("n", int(value) if isinstance(value, float) and value.is_integer() else value)
    if isinstance(value, str):
        return ("s", value)
    if isinstance(value, dict):
        return ("o", frozenset((k, _canonical(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return ("a", tuple(_canonical(v) for v in value))
    return ("x", repr(value))


class ValidationTooCostly(Exception):
    """A call's validation ran out of the turn's keyword evaluations (``_counted``)."""


VALIDATION_WORK: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("tool_validation_work", default=None)


def _counted(keyword, cost: int = 1, sized=None):
    """``keyword`` charging ``cost`` to the validation under way (``VALIDATION_WORK``) each time it runs.
    A ``$ref`` (or ``allOf``, ``anyOf`` ...) may make one subschema be evaluated far more often
    than the schema's size suggests: 2 KB of ``$defs`` whose every level refers twice to the next
    cost 2**30 evaluations of one ``{}``. Counting what runs bounds that, whatever the shape.
    ``sized(instance, left)``: what one evaluation costs beyond ``cost`` for a keyword that reads
    the whole instance (``_SIZED``)."""

    def charged(validator, value, instance, schema):
        work = VALIDATION_WORK.get()
        if work is not None:
            work[0] -= cost
            if sized is not None and work[0] >= 0:
                work[0] -= sized(instance, work[0])
            if work[0] < 0:
                raise ValidationTooCostly
        return keyword(validator, value, instance, schema)

    return charged


# A reference costs about five other keywords (its lookup and a new validator: ~25 us against ~5);
# a dynamic one walks the dynamic scope too.
_REFERENCE_COST = {"$ref": 5, "$dynamicRef": 25}
PATTERN_CHARS_PER_UNIT = 256  # RE2 reads ~70 chars a microsecond: a unit (~5 us) per 256 chars


def _values_beyond_one(instance, left: int) -> int:
    return count_values(instance, left) - 1 if isinstance(instance, dict | list) else 0


def _chars(instance, left: int) -> int:
    return len(instance) // PATTERN_CHARS_PER_UNIT if isinstance(instance, str) else 0


# Keywords whose one evaluation reads the whole instance: an ``enum`` of one 2,200-item array,
# evaluated 8,192 times through ``$ref`` fan-out (98,000 units counted as one each), held the
# event loop 11 s; a ``pattern`` over a 60 KB string the same way, 7 s. They cost its size too.
_SIZED = {"enum": _values_beyond_one, "const": _values_beyond_one, "uniqueItems": _values_beyond_one, "pattern": _chars}


_KEYWORDS = {
    **Draft202012Validator.VALIDATORS,
    "pattern": _pattern_keyword,
    "uniqueItems": _unique_items_keyword,
    "enum": _enum_keyword,
}
ArgumentValidator = validators.extend(
    Draft202012Validator, {k: _counted(v, _REFERENCE_COST.get(k, 1), _SIZED.get(k)) for k, v in _KEYWORDS.items()}
)


def count_values(value, limit: int) -> int:
    """How many values (objects, arrays and scalars) ``value`` holds; counting stops past ``limit``."""
    count = 0
    stack = [value]
    while stack and count <= limit:
        node = stack.pop()
        count += 1
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return count


def count_subschemas(schema) -> int:
    """How many objects (subschemas, and the odd object value) a schema holds."""
    count = 0
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            count += 1
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return count
