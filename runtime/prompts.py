"""Prompt versions: which one a turn runs (``select``), rendering it with the request's variables
(``render``), checking a template before it is saved (``check_template``, ``check_variables``)
and comparing two versions (``diff``).

Templates are Jinja2, rendered in a ``SandboxedEnvironment`` with strict undefined. A variable's
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
import functools
import hashlib
import itertools
import re
from collections import OrderedDict
from typing import Any

import orjson
from jinja2 import TemplateError, nodes, pass_eval_context
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.meta import find_undeclared_variables
from jinja2.runtime import StrictUndefined
from jinja2.sandbox import SandboxedEnvironment
from jinja2.utils import _PassArg

from core.errors import InvalidRequest, NotFound
from runtime.types import Agent, PromptVersion, Selection

MAX_TEMPLATE = 64 * 1024  # characters of one template
MAX_OUTPUT = 256 * 1024  # characters of one rendered prompt
MAX_VALUES_BYTES = 64 * 1024  # JSON size of all variable values of one render
MAX_ITEMS = 256  # items of an array or object value, and of range()
MAX_LOOP_DEPTH = 2
MAX_ITERATIONS = 1024  # loop iterations of one render, nested loops included
MAX_REFERENCES = 100  # variable references in one template
MAX_NODES = 2000  # syntax-tree nodes of one template (the library's use 17 to 38)
MAX_NUMBER_ARG = 10_000  # largest integer a method call or repetition may take
MAX_VARIABLES = 100
MAX_DESCRIPTION = 1000
TYPES = ("string", "number", "integer", "boolean", "array", "object")
VARIABLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
LABEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")

# Filters whose output is bounded by their input (no padding, repetition or replacement).
FILTERS = frozenset(
    {
        "abs", "capitalize", "count", "d", "default", "dictsort", "e", "escape", "first", "float",
        "int", "items", "join", "last", "length", "list", "lower", "max", "min", "reverse", "round",
        "sort", "string", "striptags", "sum", "title", "tojson", "trim", "truncate", "unique",
        "upper", "urlencode", "wordcount", "selectattr", "rejectattr",
    }
)  # fmt: skip
# Methods of values (str, list, dict) a template may call.
METHODS = frozenset(
    {
        "lower", "upper", "title", "capitalize", "strip", "lstrip", "rstrip", "startswith", "endswith",
        "split", "splitlines", "isdigit", "isalpha", "isalnum", "isspace", "islower", "isupper",
        "count", "find", "index", "get", "keys", "values", "items",
    }
)  # fmt: skip
_ALLOWED_NODES = (
    nodes.Template, nodes.Output, nodes.TemplateData, nodes.If, nodes.For, nodes.Name, nodes.Const,
    nodes.Getattr, nodes.Getitem, nodes.Slice, nodes.Filter, nodes.Test, nodes.Call, nodes.Keyword,
    nodes.Compare, nodes.Operand, nodes.And, nodes.Or, nodes.Not, nodes.Neg, nodes.Pos, nodes.CondExpr,
    nodes.List, nodes.Tuple, nodes.Dict, nodes.Pair, nodes.Concat, nodes.Add, nodes.Sub, nodes.Mul,
    nodes.Div, nodes.FloorDiv, nodes.Mod, nodes.Pow, nodes.Continue, nodes.Break,
)  # fmt: skip


def _bounded_range(*args: int) -> range:
    r = range(*args)
    if len(r) > MAX_ITEMS:
        raise SecurityError(f"range() of more than {MAX_ITEMS} items")
    return r


def _size(value: Any) -> int:
    return len(value) if isinstance(value, str | list | tuple | dict) else 0


MAX_INT_BITS = 256  # integers in prompt arithmetic: far more than any count or price needs


class _Env(SandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "-", "%", "//"})

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        for value in (left, right):  # big-integer arithmetic would hold the event loop
            if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
                raise SecurityError("number too large")
        if operator == "%" and isinstance(left, str):
            raise SecurityError("string formatting with % is not allowed in prompts")
        if operator == "**" and (not _small_number(left, 10**18) or not _small_number(right, 64)):
            raise SecurityError("exponent too large")
        if operator == "*":
            sized, count = (left, right) if _size(left) else (right, left)
            if _size(sized) and (not _small_number(count, MAX_NUMBER_ARG) or _size(sized) * count > MAX_OUTPUT):
                raise SecurityError("repetition too large")
            if isinstance(sized, list | tuple):  # [[x] * 3000] * 3000 is 9 million items
                _spend(context, _weight(sized, MAX_OUTPUT) * count)
        if operator == "+" and _size(left) + _size(right) > MAX_OUTPUT:
            raise SecurityError("value too large")
        if operator == "+" and isinstance(left, list | tuple) and isinstance(right, list | tuple):
            _spend(context, _weight(left, MAX_OUTPUT) + _weight(right, MAX_OUTPUT))
        result = super().call_binop(context, operator, left, right)
        if isinstance(result, int) and result.bit_length() > MAX_INT_BITS:
            raise SecurityError("number too large")
        return result

    def call(__self, __context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        if __obj is not _bounded_range and __obj is not dict:
            owner = getattr(__obj, "__self__", None)
            name = getattr(__obj, "__name__", "")
            if not isinstance(owner, str | list | dict) or name not in METHODS:
                raise SecurityError(f"calling {name or 'this'} is not allowed in prompts")
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, int) and not _small_number(arg, MAX_NUMBER_ARG):
                raise SecurityError("number argument too large")
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str) or (isinstance(owner, list) and getattr(__obj, "__name__", "") in ("count", "index")):
            _charge(__context.eval_ctx, len(owner))  # what the method walks through (see _bounded_filter)
        return super().call(__context, __obj, *args, **kwargs)


MAX_WORK = 4 * MAX_OUTPUT  # written-out size of every list ``*`` and ``+`` build in one render


def _weight(value: Any, limit: int) -> int:
    """How large ``value`` is written out (``tojson``, ``string``): the characters of its strings
    and one per item, a list that appears twice counted twice. Each distinct list is visited
    once (iteratively: no recursion limit); counting stops a little past ``limit``."""
    if not isinstance(value, list | tuple | dict):
        return len(value) if isinstance(value, str) else 1
    memo: dict[int, int] = {}
    stack: list[tuple[Any, bool]] = [(value, False)]
    while stack:
        node, ready = stack.pop()
        if id(node) in memo:
            continue
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        if not ready:
            stack.append((node, True))
            stack.extend((c, False) for c in children if isinstance(c, list | tuple | dict) and id(c) not in memo)
            continue
        total = len(node)
        for child in children:
            if isinstance(child, list | tuple | dict):
                total += memo[id(child)]
            else:
                total += len(child) if isinstance(child, str) else 1
            if total > limit:
                break
        memo[id(node)] = min(total, limit + 1)
    return memo[id(value)]


def _spend(context, weight: int) -> None:
    """Counts a list built by ``*`` or ``+`` against the render's budget: one result no larger
    than MAX_OUTPUT written out, all of them together no more than MAX_WORK."""
    if weight > MAX_OUTPUT:
        raise SecurityError("value too large")
    eval_ctx = context.eval_ctx
    done = getattr(eval_ctx, "gateway_work", 0) + weight
    if done > MAX_WORK:
        raise SecurityError("the prompt builds too much")
    eval_ctx.gateway_work = done


def _small_number(value: Any, limit: int) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and abs(value) <= limit


def _finalize(value: Any) -> Any:
    return "" if value is None else value


@pass_eval_context
def _loop_items(eval_ctx, value: Any) -> list:
    """What every ``for`` iterates (added by ``_bound_loops``): at most MAX_ITEMS items, and at
    most MAX_ITERATIONS in one render however the loops nest."""
    if value is None or isinstance(value, int | float):
        raise TypeError(f"cannot loop over {_json_type(value)}")
    items = list(itertools.islice(iter(value), MAX_ITEMS + 1))
    if len(items) > MAX_ITEMS:
        raise SecurityError(f"a loop over more than {MAX_ITEMS} items")
    done = getattr(eval_ctx, "gateway_iterations", 0) + len(items)
    if done > MAX_ITERATIONS:
        raise SecurityError(f"more than {MAX_ITERATIONS} loop iterations")
    eval_ctx.gateway_iterations = done
    return items


def _bounded_join(eval_ctx, value: Any, d: str = "", attribute: Any = None) -> str:
    items = list(value)
    if attribute is None and sum(len(str(v)) for v in items) + len(d) * len(items) > MAX_OUTPUT:
        raise SecurityError("joined value too large")
    return _join(eval_ctx, items, d, attribute)


# A filter's numeric arguments are bounded: ``5|round(-100000000)`` computes 10**100000000 and
# ``[[1]]|tojson(indent=30000000)`` writes gigabytes. What a filter walks through counts against
# the render's MAX_WORK (``x|list|unique`` of a 40 KB value, 768 times in two loops, took 30 s);
# these filters take constant time or are counted by what they write.
_FILTER_NUMBER_LIMITS = {"round": 100, "tojson": 8}
_UNCOUNTED = frozenset({"length", "count", "first", "last", "d", "default", "int", "float", "abs", "round", "tojson"})


def _charge(eval_ctx, units: int) -> None:
    done = getattr(eval_ctx, "gateway_work", 0) + units
    if done > MAX_WORK:
        raise SecurityError("the prompt builds too much")
    eval_ctx.gateway_work = done


def _bounded_filter(name: str, f):
    limit = _FILTER_NUMBER_LIMITS.get(name, MAX_OUTPUT)
    passed = _PassArg.from_obj(f)

    def bounded(context, value: Any, *args: Any, **kwargs: Any) -> Any:
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, bool) or arg is None:
                continue
            if name == "tojson" and not isinstance(arg, int):
                raise SecurityError("tojson's indent must be a number")
            if isinstance(arg, int | float) and not abs(arg) <= limit:
                raise SecurityError(f"{name}: a number argument may be at most {limit}")
        eval_ctx = context.eval_ctx
        if name not in _UNCOUNTED:
            _charge(eval_ctx, _weight(value, MAX_WORK))
        if passed is _PassArg.context:
            result = f(context, value, *args, **kwargs)
        elif passed is _PassArg.eval_context:
            result = f(eval_ctx, value, *args, **kwargs)
        elif passed is _PassArg.environment:
            result = f(context.environment, value, *args, **kwargs)
        else:
            result = f(value, *args, **kwargs)
        if name == "tojson":
            _charge(eval_ctx, len(result))
        return result

    functools.update_wrapper(bounded, f)
    bounded.jinja_pass_arg = _PassArg.context  # type: ignore[attr-defined]
    return bounded


_env = _Env(undefined=StrictUndefined, autoescape=False, finalize=_finalize, keep_trailing_newline=True)
_env.globals.clear()
_env.globals.update(range=_bounded_range, dict=dict)
_join = _env.filters["join"]
_filters = {name: f for name, f in _env.filters.items() if name in FILTERS}
_filters["join"] = pass_eval_context(_bounded_join)
_env.filters = {name: _bounded_filter(name, f) for name, f in _filters.items()}
_env.filters["_loop_items"] = _loop_items

_compiled: OrderedDict[str, Any] = OrderedDict()
_COMPILED_MAX = 2048
_COMPILED_MAX_CHARS = 8 * 1024 * 1024  # of the sources held (the compiled code is a few times that)
_compiled_chars = 0


def _template(source: str):
    """The compiled template of a source (versions are immutable: compiled once, LRU-bounded
    in number and in size)."""
    global _compiled_chars
    tpl = _compiled.get(source)
    if tpl is None:
        tpl = _env.from_string(_checked(source))
        _compiled[source] = tpl
        _compiled_chars += len(source)
        while len(_compiled) > 1 and (len(_compiled) > _COMPILED_MAX or _compiled_chars > _COMPILED_MAX_CHARS):
            dropped, _ = _compiled.popitem(last=False)
            _compiled_chars -= len(dropped)
    else:
        _compiled.move_to_end(source)
    return tpl


# ---- checks at save ---------------------------------------------------------------------------
def check_template(template: Any, param: str = "template") -> set[str]:
    """Refuse a template that is too large, does not parse, or uses what prompts may not use.
    Returns the names of the variables it reads."""
    if not isinstance(template, str) or not template.strip():
        raise InvalidRequest(f"'{param}' must be a non-empty string.", param=param, code="invalid_type")
    if len(template) > MAX_TEMPLATE:
        raise InvalidRequest(
            f"'{param}' must be at most {MAX_TEMPLATE} characters.", param=param, code="template_too_large"
        )
    if "\x00" in template:
        raise InvalidRequest(f"'{param}' must not contain NUL characters.", param=param, code="invalid_value")
    try:
        ast = _env.parse(template)
    except (TemplateError, RecursionError, SyntaxError) as exc:
        detail = str(exc)[:200] if isinstance(exc, TemplateError) else "nested too deeply"
        raise InvalidRequest(
            f"'{param}' is not a valid template: {detail}", param=param, code="invalid_template"
        ) from None
    try:
        _check_ast(ast)
        return set(find_undeclared_variables(ast)) - set(_env.globals)
    except SecurityError as exc:
        raise InvalidRequest(f"'{param}' is refused: {exc}", param=param, code="unsafe_template") from None
    except RecursionError:
        raise InvalidRequest(
            f"'{param}' is not a valid template: nested too deeply", param=param, code="invalid_template"
        ) from None


def _checked(source: str) -> nodes.Template:
    """The template's syntax tree, checked again (whatever stored it) and with its loops bounded."""
    ast = _env.parse(source)
    _check_ast(ast)
    for loop in ast.find_all(nodes.For):
        loop.iter = nodes.Filter(loop.iter, "_loop_items", [], [], None, None, lineno=loop.lineno)
    return ast


def _check_ast(ast: nodes.Template) -> None:
    _walk(ast, 0)
    if sum(1 for _ in ast.find_all(nodes.Node)) > MAX_NODES:  # compiling costs ~20 µs a node
        raise SecurityError(f"at most {MAX_NODES} template elements (tags, expressions, values) in one prompt")
    references = sum(1 for n in ast.find_all(nodes.Name) if n.ctx == "load")
    if references > MAX_REFERENCES:
        raise SecurityError(f"at most {MAX_REFERENCES} variable references in one template")


def _walk(node: nodes.Node, depth: int) -> None:
    if not isinstance(node, _ALLOWED_NODES):
        raise SecurityError(f"{type(node).__name__.lower()} blocks are not allowed in prompts")
    if isinstance(node, nodes.For):
        if node.recursive:
            raise SecurityError("recursive loops are not allowed in prompts")
        depth += 1
        if depth > MAX_LOOP_DEPTH:
            raise SecurityError(f"at most {MAX_LOOP_DEPTH} nested loops")
    elif isinstance(node, nodes.Getattr) and node.attr.startswith("_"):
        raise SecurityError(f"attribute {node.attr[:64]!r} is not accessible")
    elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and str(node.arg.value).startswith("_"):
        raise SecurityError(f"key {str(node.arg.value)[:64]!r} is not accessible")
    elif isinstance(node, nodes.Filter) and node.name not in FILTERS:
        raise SecurityError(f"filter {node.name[:64]!r} is not allowed; allowed: {', '.join(sorted(FILTERS))}")
    elif isinstance(node, nodes.Call):
        if isinstance(node.node, nodes.Getattr):
            if node.node.attr not in METHODS:
                raise SecurityError(f"method {node.node.attr[:64]!r} is not allowed")
        elif not (isinstance(node.node, nodes.Name) and node.node.name in _env.globals):
            raise SecurityError("only range(), dict() and methods of values may be called")
    for child in node.iter_child_nodes():
        _walk(child, depth)


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
    return Selection(version=version, label=selector, variant=variant)


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


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


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
