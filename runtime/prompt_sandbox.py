"""The sandbox prompt templates run in (``runtime.prompts`` renders with it): what a template may
use, checked at save and again when it is compiled (``check_template``, ``_checked``), and the
Jinja2 ``SandboxedEnvironment`` whose filters, methods, loops and operators are bounded in the
work one render may do (``_env``). Compiled templates are cached (``_template``): versions are
immutable."""

from __future__ import annotations

import functools
import itertools
from collections import OrderedDict
from typing import Any

from jinja2 import TemplateError, nodes, pass_eval_context
from jinja2.exceptions import SecurityError
from jinja2.meta import find_undeclared_variables
from jinja2.runtime import StrictUndefined
from jinja2.sandbox import SandboxedEnvironment
from jinja2.utils import _PassArg

from core.errors import InvalidRequest

MAX_TEMPLATE = 64 * 1024  # characters of one template
MAX_OUTPUT = 256 * 1024  # characters of one rendered prompt
MAX_ITEMS = 256  # items of an array or object value, and of range()
MAX_LOOP_DEPTH = 2
MAX_ITERATIONS = 1024  # loop iterations of one render, nested loops included
MAX_REFERENCES = 100  # variable references in one template
MAX_NODES = 2000  # syntax-tree nodes of one template (the library's use 17 to 38)
MAX_NUMBER_ARG = 10_000  # largest integer a method call or repetition may take

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
