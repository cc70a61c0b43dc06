"""Prompt versions: which one a turn runs (``select``), rendering it with the request's variables
(``render``), checking a template before it is saved (``check_template``, ``check_variables``)
and comparing two versions (``diff``).

Templates are Jinja2, rendered in a ``SandboxedEnvironment`` with strict undefined (its bounded
environment and the checks at save: ``runtime.prompt_sandbox``). A variable's
value is data: it is inserted as text and never parsed as template code. Templates are written by
tenant admins and rendered on every turn of a shared gateway, so the work one render may do is
bounded, not just its access to Python internals:

- at save, a template is at most ``MAX_TEMPLATE`` characters and ``MAX_NODES`` syntax nodes
  (compiling costs time per node: a new version is compiled on a turn's path) and uses only
  output, ``if`` and ``for`` (no ``set``/``with``/macros/imports, no recursive loops, at most
  ``MAX_LOOP_DEPTH`` nested loops), filters from ``FILTERS``, and no attribute or key starting
  with ``_``;
- when rendering, values are type-checked and bounded (``MAX_VALUES_BYTES`` in all, arrays of at
  most ``MAX_ITEMS``), ``range`` is bounded, ``*``, ``**``, ``+`` and ``%`` refuse results that
  would be large (a list by its written-out size, nested lists included; ``MAX_WORK`` per
  render), methods are an allow-list with bounded numeric arguments, and the output is cut off
  with an error past ``MAX_OUTPUT``.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from typing import Any

import orjson
from jinja2 import TemplateError
from jinja2.exceptions import SecurityError, UndefinedError

from core.errors import InvalidRequest, NotFound
from runtime.prompt_sandbox import MAX_ITEMS, MAX_OUTPUT, _json_type, _template
from runtime.prompt_sandbox import MAX_REFERENCES as MAX_REFERENCES
from runtime.prompt_sandbox import MAX_TEMPLATE as MAX_TEMPLATE
from runtime.prompt_sandbox import check_template as check_template
from runtime.types import Agent, PromptVersion, Selection

MAX_VALUES_BYTES = 64 * 1024  # JSON size of all variable values of one render
MAX_VARIABLES = 100
MAX_DESCRIPTION = 1000
TYPES = ("string", "number", "integer", "boolean", "array", "object")
VARIABLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
LABEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def check_variables(variables: Any, used: set[str], param: str = "variables") -> dict:
    """The declared variables, normalised: {name: {"type", "required", "default"?, "description"?}}.
    A variable the template reads but that is not declared is declared as a required string."""
    if variables is None:
        variables = {}
    if not isinstance(variables, dict):
        raise InvalidRequest(f"'{param}' must be an object.", param=param, code="invalid_type")
    if len(variables) > MAX_VARIABLES:
        raise InvalidRequest(f"'{param}' may declare at most {MAX_VARIABLES}.", param=param, code="invalid_value")
    out: dict[str, dict] = {}
    for name, spec in variables.items():
        where = f"{param}.{str(name)[:64]}"
        if not VARIABLE_NAME.match(name):
            raise InvalidRequest(
                f"Variable name {name[:64]!r} must be a letter then letters, digits or _ (at most 64).",
                param=where,
                code="invalid_value",
            )
        if isinstance(spec, str):
            spec = {"type": spec}
        if not isinstance(spec, dict):
            raise InvalidRequest(f"'{where}' must be an object.", param=where, code="invalid_type")
        unknown = set(spec) - {"type", "required", "default", "description"}
        if unknown:
            bad = sorted(unknown)[0][:64]
            raise InvalidRequest(f"'{where}' has unknown field {bad!r}.", param=f"{where}.{bad}", code="invalid_value")
        kind = spec.get("type", "string")
        if kind not in TYPES:
            raise InvalidRequest(
                f"'{where}.type' must be one of {', '.join(TYPES)}.", param=f"{where}.type", code="invalid_value"
            )
        entry: dict = {"type": kind}
        if "default" in spec:
            _check_value(name, spec["default"], kind, param=f"{where}.default")
            entry["default"] = spec["default"]
        required = spec.get("required", "default" not in spec)
        if not isinstance(required, bool):
            raise InvalidRequest(f"'{where}.required' must be a boolean.", param=f"{where}.required")
        entry["required"] = required
        description = spec.get("description")
        if description is not None:
            if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
                raise InvalidRequest(
                    f"'{where}.description' must be a string of at most {MAX_DESCRIPTION} characters.",
                    param=f"{where}.description",
                )
            entry["description"] = description
        out[name] = entry
    for name in sorted(used - set(out)):
        out[name] = {"type": "string", "required": True}
    if len(orjson.dumps(out)) > MAX_VALUES_BYTES:
        raise InvalidRequest(f"'{param}' is too large.", param=param, code="invalid_value")
    return out


def check_defaults(defaults: dict, variables: dict, param: str = "defaults") -> None:
    """An agent's default values have the types its prompt's variables declare."""
    for name, value in defaults.items():
        spec = variables.get(name)
        if spec is not None and value is not None:
            _check_value(name, value, spec.get("type", "string"), param=f"{param}.{name[:64]}")


def check_label(label: Any, param: str = "label") -> str:
    if not isinstance(label, str) or not LABEL_NAME.match(label):
        raise InvalidRequest(
            "A label is 1-64 lowercase letters, digits, '_', '-' or '.', starting with a letter or digit.",
            param=param,
            code="invalid_value",
        )
    if label.isdigit():
        raise InvalidRequest("A label cannot be a number (numbers pin versions).", param=param, code="invalid_value")
    return label


# ---- selection ----------------------------------------------------------------------------------
def select(agent: Agent, selector: str | None, sticky_key: str, pinned: PromptVersion | None = None) -> Selection:
    """The prompt version a turn runs. ``selector``: None (the ``production`` label if set, else
    ``latest``), a version number (pinned), or a label. A label with several weighted variants
    picks one by a stable hash of (agent, label, sticky_key): one conversation, one arm.
    ``pinned``: the version a number names when the agent does not hold it (no label points at
    it; the registry read it on demand)."""
    if selector is None:
        selector = "production" if "production" in agent.labels else "latest"
    elif selector.isascii() and selector.isdigit():  # ('²' is a digit int() refuses)
        version = agent.versions.get(int(selector)) if len(selector) < 10 else None
        if version is None and pinned is not None and str(pinned.version) == selector.lstrip("0"):
            version = pinned
        if version is None:
            raise NotFound(
                f"Agent '{agent.name}' has no prompt version {selector[:16]}.", param="model", code="model_not_found"
            )
        return Selection(version=version, label=None, variant=None)
    target = agent.labels.get(selector)
    if not target:
        raise NotFound(f"Agent '{agent.name}' has no label '{selector[:64]}'.", param="model", code="model_not_found")
    if len(target) == 1:
        number = next(iter(target))
        variant = None
    else:
        number = pick(target, f"{agent.id}\x00{selector}\x00{sticky_key}")
        variant = str(number)
    version = agent.versions.get(number)
    if version is None:  # a label never points at a missing version; guard against a torn cache
        raise NotFound(f"Agent '{agent.name}' label '{selector}' is unavailable.", param="model")
    return Selection(version, selector, variant)  # (positional: keywords cost a dict per turn)


def pick(weights: dict[int, int], key: str) -> int:
    """A variant by weight, the same one for the same key: sha256 → uniform in [0, 1)."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64 * sum(weights.values())
    total = 0
    ordered = sorted(weights.items())
    for number, weight in ordered:
        total += weight
        if point < total:
            return number
    return ordered[-1][0]


# ---- rendering ----------------------------------------------------------------------------------
def render(version: PromptVersion, values: dict | None, defaults: dict | None) -> str:
    """The system prompt of a turn: the request's values over the agent's defaults over the
    variables' own defaults, each type-checked. Raises InvalidRequest (never a 500)."""
    values = values or {}
    if not isinstance(values, dict):
        raise InvalidRequest("'metadata.variables' must be an object.", param="metadata.variables")
    try:
        size = len(orjson.dumps(values, option=orjson.OPT_NON_STR_KEYS)) if values else 0
    except orjson.JSONEncodeError:  # nested past the encoder's depth limit (254 levels)
        raise InvalidRequest(
            "'metadata.variables' is nested too deeply.", param="metadata.variables", code="invalid_variable"
        ) from None
    if size > MAX_VALUES_BYTES:
        raise InvalidRequest(
            f"'metadata.variables' must be at most {MAX_VALUES_BYTES} bytes as JSON.",
            param="metadata.variables",
            code="invalid_variable",
        )
    defaults = defaults or {}
    context: dict[str, Any] = {}
    for name, spec in version.variables.items():
        kind = spec.get("type", "string")
        if name in values and values[name] is not None:
            value = values[name]
        elif name in defaults:
            value = defaults[name]
        elif "default" in spec:
            value = spec["default"]
        elif spec.get("required", True):
            raise InvalidRequest(
                f"Missing required variable '{name}' (metadata.variables.{name}).",
                param=f"metadata.variables.{name}",
                code="missing_variable",
            )
        else:
            context[name] = None
            continue
        context[name] = _check_value(name, value, kind)
    # Rendering is a pure function of the version and the checked values (the sandbox offers
    # nothing time- or chance-dependent): a conversation's turns render the same prompt, so it
    # is rendered once (bounded cache; a value that is not JSON is rendered every time).
    try:
        cache_key = (id(version), orjson.dumps(context, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS))
    except (orjson.JSONEncodeError, TypeError):
        cache_key = None
    found = _rendered.get(cache_key) if cache_key is not None else None
    if found is not None and found[0] is version:
        return found[1]
    text = _render(version, context)
    if cache_key is not None:
        global _rendered_chars
        if len(_rendered) >= _RENDERED_MAX or _rendered_chars + len(text) > _RENDERED_MAX_CHARS:
            _rendered.clear()
            _rendered_chars = 0
        _rendered[cache_key] = (version, text)
        _rendered_chars += len(text) + len(cache_key[1])
    return text


_RENDERED_MAX = 4096
_RENDERED_MAX_CHARS = 16 * 1024 * 1024  # rendered prompts held (up to 256 KB each)
_rendered_chars = 0
_rendered: dict[tuple[int, bytes], tuple[PromptVersion, str]] = {}


def _render(version: PromptVersion, context: dict) -> str:
    try:
        out: list[str] = []
        size = 0
        for chunk in _template(version.template).generate(context):
            size += len(chunk)
            if size > MAX_OUTPUT:
                raise InvalidRequest(
                    f"The rendered prompt exceeds {MAX_OUTPUT} characters.", param="model", code="prompt_too_large"
                )
            out.append(chunk)
    except InvalidRequest:
        raise
    except UndefinedError as exc:
        raise InvalidRequest(
            f"The prompt could not be rendered: {str(exc)[:200]}", param="metadata.variables", code="invalid_variable"
        ) from None
    except (SecurityError, TemplateError, TypeError, ValueError, ArithmeticError, LookupError) as exc:
        raise InvalidRequest(
            f"The prompt could not be rendered: {str(exc)[:200]}", param="model", code="prompt_render_failed"
        ) from None
    return "".join(out)


_PY_TYPES = {
    "string": str,
    "integer": int,
    "number": int | float,
    "boolean": bool,
    "array": list,
    "object": dict,
}


def _check_value(name: str, value: Any, kind: str, param: str | None = None) -> Any:
    param = param or f"metadata.variables.{name}"
    ok = isinstance(value, _PY_TYPES[kind])
    if ok and kind in ("integer", "number") and isinstance(value, bool):
        ok = False
    if ok and kind == "number" and isinstance(value, float) and value != value:  # NaN
        ok = False
    if not ok:
        raise InvalidRequest(
            f"Variable '{name}' must be of type {kind}, not {_json_type(value)}.", param=param, code="invalid_variable"
        )
    if kind in ("array", "object") and len(value) > MAX_ITEMS:
        raise InvalidRequest(
            f"Variable '{name}' may hold at most {MAX_ITEMS} items.", param=param, code="invalid_variable"
        )
    return value


# ---- diff ---------------------------------------------------------------------------------------
def diff(a: PromptVersion, b: PromptVersion) -> dict:
    """What changed from version ``a`` to ``b``: a unified diff of the templates and of the
    variables (as sorted, indented JSON), and which variables were added, removed or changed."""
    template = _unified(
        a.template.splitlines(keepends=True),
        b.template.splitlines(keepends=True),
        f"v{a.version}",
        f"v{b.version}",
    )
    va = orjson.dumps(a.variables, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()
    vb = orjson.dumps(b.variables, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()
    variables = _unified(
        va.splitlines(keepends=True),
        vb.splitlines(keepends=True),
        f"v{a.version}/variables",
        f"v{b.version}/variables",
    )
    return {
        "from": a.version,
        "to": b.version,
        "template": template,
        "variables": variables,
        "variables_added": sorted(set(b.variables) - set(a.variables)),
        "variables_removed": sorted(set(a.variables) - set(b.variables)),
        "variables_changed": sorted(n for n in set(a.variables) & set(b.variables) if a.variables[n] != b.variables[n]),
    }


MAX_DIFF_CELLS = 250_000  # lines of one side times lines of the other that difflib may compare
_CONTEXT = 3


def _unified(a: list[str], b: list[str], fromfile: str, tofile: str) -> str:
    """A unified diff of two lists of lines. difflib's line-by-line comparison costs up to
    quadratic time in the lines (tens of seconds for two 64 KB templates of short repeating
    lines); past ``MAX_DIFF_CELLS`` the diff is one hunk that replaces what lies between the
    common first and last lines (a correct diff, not a minimal one)."""
    if len(a) * len(b) <= MAX_DIFF_CELLS:
        return "".join(difflib.unified_diff(a, b, fromfile=fromfile, tofile=tofile))
    head = 0
    while head < min(len(a), len(b)) and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < min(len(a), len(b)) - head and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    if head == len(a) == len(b):
        return ""
    start = max(0, head - _CONTEXT)
    end_a, end_b = len(a) - tail + min(tail, _CONTEXT), len(b) - tail + min(tail, _CONTEXT)
    out = [f"--- {fromfile}\n", f"+++ {tofile}\n", f"@@ -{_range(start, end_a)} +{_range(start, end_b)} @@\n"]
    out += [f" {line}" for line in a[start:head]]
    out += [f"-{line}" for line in a[head : len(a) - tail]]
    out += [f"+{line}" for line in b[head : len(b) - tail]]
    out += [f" {line}" for line in a[len(a) - tail : end_a]]
    return "".join(out)


def _range(start: int, stop: int) -> str:
    """A hunk's range as difflib writes it (1-based; an empty range names the line before)."""
    length = stop - start
    if length == 1:
        return str(start + 1)
    return f"{start + 1 if length else start},{length}"
