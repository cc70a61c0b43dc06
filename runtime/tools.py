"""Server-side tools: what an agent declares (``parse_tools``) and how the gateway runs the calls
a model makes to them (``ToolRunner``).

Three kinds:

- ``http``: a request to a URL template (``https://api.example.com/orders/{order_id}``). The
  ``{arg}`` placeholders sit in the path or query only (never the scheme, host or port), are
  filled from the call's arguments and URL-encoded; the host must be one of the tool's
  ``allowed_hosts``. Header values may name environment variables (``${TOOL_WEATHER_KEY}``):
  the name is checked when the tool is parsed, the value read when a call runs, so the stored
  config holds the template and never the secret. Only variables whose names start with
  ``TOOL_`` may be named (a tool must not be able to send the gateway's own secrets, such as
  its database URL, to a host its author controls), only the master key may name them (the
  admin API refuses a tenant admin's: the environment is shared by every tenant), and their
  values are redacted from what the tool answers (``redact``), in every form a server may echo
  them in (URL-encoded, JSON-escaped, base64, hex, another case: runtime/redaction.py).
- ``mcp``: a tool of an MCP server spoken to over streamable HTTP (``runtime.mcp``).
- ``builtin``: one of ``BUILTINS``, whose behaviour the composition supplies as handlers.

Calls never raise into the caller: arguments that are not JSON or fail the schema come back as a
``ToolResult`` with status ``invalid`` and a sentence naming the field (the model can repair its
call); a failing tool comes back with status ``error`` or ``timeout`` and a short reason that
names no secret and no internal address. Every outbound connection goes through
``core.netguard``: only public addresses are reachable unless the operator's policy (the
runner's ``guard``) or the tool's own ``allow_private_networks`` / ``allowed_networks`` allow
more; a tool's config can never open metadata, link-local, multicast or reserved addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import ipaddress
import itertools
import logging
import os
import re
import time
import traceback
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import orjson
import re2
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import SchemaError, ValidationError
from yarl import URL

from core import netguard
from runtime.http_tools import PLACEHOLDER_RE, ToolCallFailed, call_http, fill_url
from runtime.mcp import MCPError, MCPPool
from runtime.redaction import MIN_SECRET, redactor, redactor_off_loop
from runtime.tool_slots import ToolSlots
from runtime.types import Agent, ToolResult, ToolSpec

log = logging.getLogger("gateway.tools")

KINDS = ("http", "mcp", "builtin")
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
ARG_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]{0,63}$")
ENV_RE = re.compile(r"\$\{([^}]*)\}")
ENV_NAME_RE = re.compile(r"^TOOL_[A-Z0-9_]{1,96}$")
HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$")
# Headers the runner sets itself (or that would change how the request is framed).
RESERVED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer"})

MAX_TOOLS = 64
MAX_DESCRIPTION = 4096
MAX_SCHEMA_BYTES = 32 * 1024
MAX_URL_LENGTH = 2048
MAX_HEADERS = 32
MAX_HEADER_VALUE = 4096
MAX_ALLOWED_HOSTS = 32
MAX_TIMEOUT_S = 60.0
MAX_RETRIES = 5
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_RESPONSE_BYTES = 64 * 1024
MAX_RESPONSE_BYTES = 1024 * 1024

Handler = Callable[[dict, dict], Awaitable[str]]


MAX_PARALLEL_PER_TURN = 4


def _maybe(semaphore):
    return semaphore if semaphore is not None else contextlib.nullcontext()


class ToolConfigError(ValueError):
    """A tool declaration is wrong. ``field`` names where (``tools[2].config.url``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _builtin(name: str, description: str, properties: dict, required: list[str]) -> ToolSpec:
    schema = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    return ToolSpec(name=name, description=description, parameters=schema, kind="builtin")


BUILTINS: dict[str, ToolSpec] = {
    spec.name: spec
    for spec in (
        _builtin(
            "knowledge_search",
            "Search the knowledge base for passages relevant to a query.",
            {
                "query": {"type": "string", "minLength": 1, "maxLength": 2000},
                "top_k": {"type": "integer", "minimum": 1, "maximum": 20},
            },
            ["query"],
        ),
        _builtin(
            "escalate_to_human",
            "Hand the conversation to a human agent.",
            {
                "reason": {"type": "string", "minLength": 1, "maxLength": 2000},
                "urgency": {"type": "string", "enum": ["low", "normal", "high"]},
            },
            ["reason"],
        ),
        _builtin(
            "end_conversation",
            "End the conversation.",
            {"summary": {"type": "string", "maxLength": 4000}},
            [],
        ),
    )
}


# --- parsing -----------------------------------------------------------------------------------


def parse_tools(specs: list[dict], *, stored: bool = False) -> tuple[ToolSpec, ...]:
    """Validate an agent's declared tools (the admin API's ``tools`` list) into ToolSpecs.

    Each entry: ``{"name", "description", "parameters", "kind", "config"}``; a builtin needs only
    ``{"kind": "builtin", "name": <one of BUILTINS>}``. Raises ToolConfigError naming the field.
    ``stored``: tools read back from the database, whose schemas were bounded and checked against
    the metaschema when saved (the costly part, not done again).
    """
    if specs is None:
        return ()
    if not isinstance(specs, list):
        raise ToolConfigError("tools", "must be a list")
    if len(specs) > MAX_TOOLS:
        raise ToolConfigError("tools", f"at most {MAX_TOOLS} tools")
    nodes = 0  # checking a schema costs ~0.5 ms a subschema: an agent's tools are bounded together
    for i, spec in enumerate(specs if not stored else ()):
        nodes += _schema_nodes(spec.get("parameters") if isinstance(spec, dict) else None)
        if nodes > MAX_AGENT_SCHEMA_NODES:
            raise ToolConfigError(
                f"tools[{i}].parameters",
                f"the tools' schemas together must have at most {MAX_AGENT_SCHEMA_NODES} subschemas",
            )
    out: list[ToolSpec] = []
    seen: set[str] = set()
    for i, spec in enumerate(specs):
        where = f"tools[{i}]"
        tool = _parse_one(spec, where, stored)
        if tool.name in seen:
            raise ToolConfigError(f"{where}.name", f"duplicate tool name {tool.name!r}")
        seen.add(tool.name)
        out.append(tool)
    return tuple(out)


def _parse_one(spec: dict, where: str, stored: bool = False) -> ToolSpec:
    if not isinstance(spec, dict):
        raise ToolConfigError(where, "must be an object")
    unknown = set(spec) - {"name", "description", "parameters", "kind", "config", "type"}
    if unknown:
        raise ToolConfigError(f"{where}.{sorted(unknown)[0]}", "unknown field")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ToolConfigError(f"{where}.kind", f"must be one of {', '.join(KINDS)}")
    name = spec.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ToolConfigError(f"{where}.name", "must be 1-64 characters of letters, digits, '_' or '-'")
    if kind == "builtin":
        if name not in BUILTINS:
            raise ToolConfigError(f"{where}.name", f"unknown builtin; one of {', '.join(BUILTINS)}")
        if spec.get("config"):
            raise ToolConfigError(f"{where}.config", "a builtin takes no config")
        return BUILTINS[name]
    description = spec.get("description", "")
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
        raise ToolConfigError(f"{where}.description", f"must be a string of at most {MAX_DESCRIPTION} characters")
    if kind == "mcp" and "parameters" not in spec:
        parameters: dict = {"type": "object"}
    else:
        parameters = _parse_schema(spec.get("parameters"), f"{where}.parameters", stored)
    config = spec.get("config")
    if not isinstance(config, dict):
        raise ToolConfigError(f"{where}.config", "must be an object")
    if kind == "http":
        config = _parse_http(config, parameters, f"{where}.config")
    else:
        config = _parse_mcp(config, name, f"{where}.config")
    return ToolSpec(name=name, description=description, parameters=parameters, kind=kind, config=config)


def _parse_schema(schema, where: str, stored: bool = False) -> dict:
    if not isinstance(schema, dict):
        raise ToolConfigError(where, "must be a JSON schema object")
    try:
        size = len(orjson.dumps(schema))
    except TypeError:
        raise ToolConfigError(where, "must be JSON") from None
    if size > MAX_SCHEMA_BYTES:
        raise ToolConfigError(where, f"must be at most {MAX_SCHEMA_BYTES} bytes as JSON")
    if not stored and _schema_nodes(schema) > MAX_SCHEMA_NODES:
        raise ToolConfigError(where, f"must have at most {MAX_SCHEMA_NODES} subschemas")
    try:
        if not stored:
            Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        path = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in exc.path)
        raise ToolConfigError(where + path, f"is not a valid JSON schema: {_short(exc.message)}") from None
    if schema.get("type") != "object":
        raise ToolConfigError(f"{where}.type", 'must be "object" (a tool takes named arguments)')
    for key in ("$ref", "$dynamicRef"):
        if _has_remote_ref(schema, key):
            raise ToolConfigError(where, f"{key} may point only inside the schema ('#...')")
    _check_patterns(schema, where)
    return schema


# Checking a schema against the 2020-12 metaschema costs ~0.35-0.55 ms a subschema on the event
# loop (30 KB of ``allOf: [{}, {}, ...]``: 3.7 s). A schema is bounded in subschemas, an agent's
# tools together too, and checked when it is saved, not again at every load of the agent (each
# replica's reload of every agent, which any agent's change sets off).
MAX_SCHEMA_NODES = 1024
MAX_AGENT_SCHEMA_NODES = 2048


def _schema_nodes(schema) -> int:
    """The objects and booleans in ``schema`` (what the metaschema check walks as subschemas),
    counted iteratively; counting stops past MAX_AGENT_SCHEMA_NODES."""
    count = 0
    stack = [schema]
    while stack and count <= MAX_AGENT_SCHEMA_NODES:
        node = stack.pop()
        if isinstance(node, dict):
            count += 1
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, bool):
            count += 1
    return count


def _check_patterns(node, where: str, names: bool = False) -> None:
    """Arguments come from the model: every ``pattern`` must run on RE2 (linear time), and
    ``patternProperties`` (matched by Python's backtracking engine) is refused. ``names``: the
    keys of ``node`` are property names, not keywords."""
    if isinstance(node, dict):
        for key, value in node.items():
            if names:
                _check_patterns(value, f"{where}.{key}")
                continue
            if key == "patternProperties":
                raise ToolConfigError(f"{where}.patternProperties", "is not supported (use properties)")
            if key == "pattern" and isinstance(value, str) and _re2_pattern(value) is None:
                raise ToolConfigError(
                    f"{where}.pattern", "must be an RE2 regular expression (no look-arounds or back-references)"
                )
            _check_patterns(value, f"{where}.{key}", names=key in ("properties", "$defs", "definitions"))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_patterns(value, f"{where}[{i}]")


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


_WORK: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("tool_validation_work", default=None)


def _counted(keyword, cost: int = 1, sized=None):
    """``keyword`` charging ``cost`` to the validation under way (``_WORK``) each time it runs.
    A ``$ref`` (or ``allOf``, ``anyOf`` ...) may make one subschema be evaluated far more often
    than the schema's size suggests: 2 KB of ``$defs`` whose every level refers twice to the next
    cost 2**30 evaluations of one ``{}``. Counting what runs bounds that, whatever the shape.
    ``sized(instance, left)``: what one evaluation costs beyond ``cost`` for a keyword that reads
    the whole instance (``_SIZED``)."""

    def charged(validator, value, instance, schema):
        work = _WORK.get()
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
    return _count_values(instance, left) - 1 if isinstance(instance, dict | list) else 0


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


def _has_remote_ref(node, key: str) -> bool:
    if isinstance(node, dict):
        ref = node.get(key)
        if isinstance(ref, str) and not ref.startswith("#"):
            return True
        return any(_has_remote_ref(v, key) for v in node.values())
    if isinstance(node, list):
        return any(_has_remote_ref(v, key) for v in node)
    return False


def _number(config: dict, key: str, where: str, default, lo, hi, integer: bool = False):
    value = config.get(key, default)
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise ToolConfigError(f"{where}.{key}", f"must be {kind} from {lo} to {hi}")
    return value


def _parse_headers(headers, where: str) -> dict[str, str]:
    if headers is None:
        return {}
    if not isinstance(headers, dict) or len(headers) > MAX_HEADERS:
        raise ToolConfigError(where, f"must be an object of at most {MAX_HEADERS} headers")
    out: dict[str, str] = {}
    for key, value in headers.items():
        if not isinstance(key, str) or not HEADER_NAME_RE.match(key):
            raise ToolConfigError(where, f"{str(key)[:64]!r} is not a valid header name")
        if key.lower() in RESERVED_HEADERS:
            raise ToolConfigError(f"{where}.{key}", "is set by the gateway")
        if not isinstance(value, str) or len(value) > MAX_HEADER_VALUE:
            raise ToolConfigError(f"{where}.{key}", f"must be a string of at most {MAX_HEADER_VALUE} characters")
        if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in value):
            raise ToolConfigError(f"{where}.{key}", "must not contain control characters")
        for env in ENV_RE.findall(value):
            if not ENV_NAME_RE.match(env):
                raise ToolConfigError(
                    f"{where}.{key}", f"${{{env[:64]}}}: only environment variables named TOOL_* may be used"
                )
            if env not in os.environ:
                raise ToolConfigError(f"{where}.{key}", f"environment variable {env} is not set")
        out[key] = value
    return out


NETWORK_KEYS = ("allow_private_networks", "allowed_networks")
MAX_NETWORKS = 16
# What a tool's own config can never open: metadata services, link-local, unspecified,
# multicast and reserved space, and the IPv6 forms that wrap IPv4 addresses (whose inner
# address could be any of those). Only the operator's policy (ToolRunner's guard) can.
_NEVER_FOR_TOOLS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "169.254.0.0/16",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "100.100.100.200/32",
        "::/128",
        "fe80::/10",
        "ff00::/8",
        "::ffff:0:0/96",
        "64:ff9b::/96",
        "2002::/16",
        "fd00:ec2::254/128",
    )
)


def _parse_networks(config: dict, where: str) -> dict:
    """A tool's own widening of the default network policy: ``allow_private_networks`` (loopback,
    RFC 1918, CGNAT, unique local) and ``allowed_networks`` (CIDRs, never overlapping metadata,
    link-local, multicast or reserved space)."""
    out: dict = {}
    if "allow_private_networks" in config:
        flag = config["allow_private_networks"]
        if not isinstance(flag, bool):
            raise ToolConfigError(f"{where}.allow_private_networks", "must be true or false")
        out["allow_private_networks"] = flag
    if "allowed_networks" in config:
        nets = config["allowed_networks"]
        if not isinstance(nets, list) or len(nets) > MAX_NETWORKS:
            raise ToolConfigError(f"{where}.allowed_networks", f"must be a list of at most {MAX_NETWORKS} CIDRs")
        parsed = []
        for j, text in enumerate(nets):
            try:
                net = ipaddress.ip_network(text, strict=False) if isinstance(text, str) else None
            except ValueError:
                net = None
            if net is None:
                raise ToolConfigError(f"{where}.allowed_networks[{j}]", "must be a CIDR such as 10.0.0.0/8")
            if any(net.version == bad.version and net.overlaps(bad) for bad in _NEVER_FOR_TOOLS):
                raise ToolConfigError(
                    f"{where}.allowed_networks[{j}]",
                    "overlaps metadata, link-local, multicast or reserved addresses, which a tool cannot allow",
                )
            parsed.append(str(net))
        out["allowed_networks"] = parsed
    return out


def tool_policy(base: netguard.NetworkPolicy, config: dict) -> netguard.NetworkPolicy:
    """The network policy a tool's calls run under: the operator's, widened by the tool's own
    ``allow_private_networks`` / ``allowed_networks`` (which never reach metadata or link-local)."""
    private = bool(config.get("allow_private_networks"))
    nets = config.get("allowed_networks") or ()
    if not private and not nets:
        return base
    extra = tuple(ipaddress.ip_network(n) for n in nets)
    return netguard.NetworkPolicy(base.allow_private or private, base.allowed + extra)


def resolve_headers(headers: dict[str, str]) -> dict[str, str]:
    """Header templates with their ``${TOOL_*}`` variables read from the environment now.
    Raises KeyError naming the variable when one has gone missing."""

    def env(match: re.Match) -> str:
        return os.environ[match.group(1)]

    return {k: ENV_RE.sub(env, v) if "${" in v else v for k, v in headers.items()}


def env_secrets(headers: dict[str, str]) -> list[str]:
    """The values the header templates' ``${TOOL_*}`` variables hold now (what ``redact`` hides)."""
    names = {name for v in headers.values() if "${" in v for name in ENV_RE.findall(v)}
    return [value for name in names if len(value := os.environ.get(name, "")) >= MIN_SECRET]


def redact(text: str, secrets: list[str]) -> str:
    """``text`` with every secret in it replaced, in any form it is written in: a tool that
    echoes its request (a debugging endpoint, an error page) must not hand the operator's key to
    the model, and so the client (runtime/redaction.py)."""
    return redactor(secrets).sub(text) if secrets else text


def _parse_hosts(hosts, where: str, required: bool) -> list[str]:
    if hosts is None and not required:
        return []
    if not isinstance(hosts, list) or not hosts or len(hosts) > MAX_ALLOWED_HOSTS:
        raise ToolConfigError(where, f"must be a list of 1 to {MAX_ALLOWED_HOSTS} host names")
    out = []
    for j, host in enumerate(hosts):
        if not isinstance(host, str) or not 0 < len(host) <= 253 or any(c in host for c in "/:@?#{} \t"):
            raise ToolConfigError(f"{where}[{j}]", "must be a host name (no scheme, port or path)")
        out.append(host.rstrip(".").lower())
    return out


def host_allowed(host: str, allowed: list[str]) -> bool:
    """``host`` is listed, or matches a ``*.example.com`` entry (a subdomain, not the bare domain)."""
    host = host.rstrip(".").lower()
    for entry in allowed:
        if entry.startswith("*."):
            if host.endswith(entry[1:]) and len(host) > len(entry) - 1:
                return True
        elif host == entry:
            return True
    return False


def _split_template(url: str, where: str) -> tuple[str, str]:
    """The URL template's fixed origin (scheme://host[:port]) and the rest (path and query)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        raise ToolConfigError(where, "must be an http:// or https:// URL")
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    if "{" in authority or "}" in authority:
        raise ToolConfigError(where, "placeholders may appear only in the path or query, not the host")
    if "#" in tail:
        raise ToolConfigError(where, "must not have a fragment")
    return f"{scheme.lower()}://{authority}", tail


def _parse_http(config: dict, parameters: dict, where: str) -> dict:
    allowed_keys = {
        "method",
        "url",
        "headers",
        "timeout_s",
        "retries",
        "allowed_hosts",
        "max_response_bytes",
        *NETWORK_KEYS,
    }
    unknown = set(config) - allowed_keys
    if unknown:
        raise ToolConfigError(f"{where}.{sorted(unknown)[0]}", "unknown field")
    method = config.get("method", "GET")
    if not isinstance(method, str) or method.upper() not in METHODS:
        raise ToolConfigError(f"{where}.method", f"must be one of {', '.join(METHODS)}")
    url = config.get("url")
    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
        raise ToolConfigError(f"{where}.url", f"must be a URL of at most {MAX_URL_LENGTH} characters")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise ToolConfigError(f"{where}.url", "must not contain whitespace or control characters")
    origin, tail = _split_template(url, f"{where}.url")
    names = PLACEHOLDER_RE.findall(tail)
    if tail.count("{") != len(names) or tail.count("}") != len(names):
        raise ToolConfigError(f"{where}.url", "has an unbalanced '{' or '}'")
    properties = parameters.get("properties") or {}
    for arg in names:
        if not ARG_NAME_RE.match(arg):
            raise ToolConfigError(f"{where}.url", f"placeholder {{{arg[:64]}}} is not an argument name")
        if arg not in properties:
            raise ToolConfigError(f"{where}.url", f"placeholder {{{arg}}} is not a property of parameters")
    try:
        parsed = URL(origin + PLACEHOLDER_RE.sub("x", tail))
        host = parsed.host
        parsed.port  # noqa: B018 - raises on an out-of-range port
    except (ValueError, TypeError):
        raise ToolConfigError(f"{where}.url", "is not a valid URL") from None
    if not host:
        raise ToolConfigError(f"{where}.url", "has no host")
    if parsed.user or parsed.password:
        raise ToolConfigError(f"{where}.url", "must not carry credentials (use headers)")
    allowed_hosts = _parse_hosts(config.get("allowed_hosts"), f"{where}.allowed_hosts", required=True)
    if not host_allowed(host, allowed_hosts):
        raise ToolConfigError(f"{where}.url", f"host {host!r} is not in allowed_hosts")
    return {
        "method": method.upper(),
        "url": url,
        "headers": _parse_headers(config.get("headers"), f"{where}.headers"),
        "timeout_s": float(_number(config, "timeout_s", where, DEFAULT_TIMEOUT_S, 0.1, MAX_TIMEOUT_S)),
        "retries": _number(config, "retries", where, 0, 0, MAX_RETRIES, integer=True),
        "allowed_hosts": allowed_hosts,
        "max_response_bytes": _number(
            config, "max_response_bytes", where, DEFAULT_RESPONSE_BYTES, 1, MAX_RESPONSE_BYTES, integer=True
        ),
        **_parse_networks(config, where),
    }


def _parse_mcp(config: dict, name: str, where: str) -> dict:
    unknown = set(config) - {
        "url",
        "tool",
        "timeout_s",
        "headers",
        "allowed_hosts",
        "max_response_bytes",
        *NETWORK_KEYS,
    }
    if unknown:
        raise ToolConfigError(f"{where}.{sorted(unknown)[0]}", "unknown field")
    url = config.get("url")
    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
        raise ToolConfigError(f"{where}.url", f"must be a URL of at most {MAX_URL_LENGTH} characters")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url) or "{" in url:
        raise ToolConfigError(f"{where}.url", "must be a plain URL (no whitespace, control characters or placeholders)")
    try:
        parsed = URL(url)
        host = parsed.host
        parsed.port  # noqa: B018
    except (ValueError, TypeError):
        raise ToolConfigError(f"{where}.url", "is not a valid URL") from None
    if parsed.scheme not in ("http", "https") or not host:
        raise ToolConfigError(f"{where}.url", "must be an http:// or https:// URL with a host")
    if parsed.user or parsed.password or parsed.fragment:
        raise ToolConfigError(f"{where}.url", "must not carry credentials or a fragment")
    allowed_hosts = _parse_hosts(config.get("allowed_hosts"), f"{where}.allowed_hosts", required=False)
    if allowed_hosts and not host_allowed(host, allowed_hosts):
        raise ToolConfigError(f"{where}.url", f"host {host!r} is not in allowed_hosts")
    tool = config.get("tool", name)
    if not isinstance(tool, str) or not 0 < len(tool) <= 128:
        raise ToolConfigError(f"{where}.tool", "must be the tool's name on the server (1-128 characters)")
    return {
        "url": url,
        "tool": tool,
        "headers": _parse_headers(config.get("headers"), f"{where}.headers"),
        "timeout_s": float(_number(config, "timeout_s", where, DEFAULT_TIMEOUT_S, 0.1, MAX_TIMEOUT_S)),
        "allowed_hosts": allowed_hosts or [host.rstrip(".").lower()],
        "max_response_bytes": _number(
            config, "max_response_bytes", where, DEFAULT_RESPONSE_BYTES, 1, MAX_RESPONSE_BYTES, integer=True
        ),
        **_parse_networks(config, where),
    }


def public_tool(spec: ToolSpec) -> dict:
    """A tool as the admin API shows it: a header value is shown only when it takes its secret
    from a ``${TOOL_*}`` reference; a literal value (perhaps a secret typed in) shows as ``***``."""
    config = dict(spec.config)
    if "headers" in config:
        config["headers"] = {k: v if ENV_RE.search(v) else "***" for k, v in config["headers"].items()}
    out = {"name": spec.name, "kind": spec.kind, "description": spec.description, "parameters": spec.parameters}
    if spec.kind != "builtin":
        out["config"] = config
    return out


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def agent_tools(agent: Agent) -> dict[str, ToolSpec]:
    """Every server-side tool of ``agent`` by name: its declared tools and enabled builtins."""
    tools = {t.name: t for t in agent.tools}
    for name in agent.builtins:
        if name in BUILTINS and name not in tools:
            tools[name] = BUILTINS[name]
    return tools


# --- running ------------------------------------------------------------------------------------

MAX_CALLS_PER_TURN = 32
MAX_SESSIONS = 64
MAX_ARGUMENTS_BYTES = 64 * 1024
MAX_ARGUMENTS_DEPTH = 32
MAX_VALIDATION_WORK = 100_000  # argument values times subschemas, per request: ~1.5 s at worst
# keywords run, per request (a $ref counted as five): what $ref fan-out really costs, ~0.5 s at worst
MAX_KEYWORD_EVALUATIONS = 100_000
MAX_SCHEMA_ERRORS = 100  # schema errors gathered for one call (20,000 bad items made 80,000 in 1.2 s)
DEFAULT_RESULT_CHARS = 32 * 1024


def validation_budget() -> list[int]:
    """What validating tool calls' arguments may cost one request, all its steps together (a
    step per ``max_steps``, up to 20, each with a whole budget, made ~14 s of a replica's event
    loop): [argument values times subschemas, keyword evaluations], spent as they are used."""
    return [MAX_VALIDATION_WORK, MAX_KEYWORD_EVALUATIONS]


@dataclass(slots=True)
class _Call:
    id: str
    name: str
    raw: object


class ToolRunner:
    """Runs the server-side tool calls of a model turn.

    ``guard`` is the operator's ``core.netguard.NetworkPolicy`` (or any settings object with
    ``allowed_networks`` / ``allow_private_networks``): by default tools reach public addresses
    only. A tool's own ``allow_private_networks`` / ``allowed_networks`` widen it for that tool
    (never to metadata or link-local addresses). ``builtin_handlers`` maps a builtin's name to
    ``async handler(arguments, context) -> str``; without one the builtins answer by default
    (see ``BUILTINS``).
    """

    def __init__(
        self,
        *,
        guard=None,
        builtin_handlers: dict[str, Handler] | None = None,
        max_concurrency: int = 16,
        max_result_chars: int = DEFAULT_RESULT_CHARS,
        user_agent: str = "ai-gateway-tools/1",
    ) -> None:
        self.policy = netguard.NetworkPolicy.of(guard)
        self.handlers = dict(builtin_handlers or {})
        self._slots = ToolSlots(max_concurrency)  # shared by the tenants (runtime.tool_slots)
        self._max_concurrency = max_concurrency
        self._max_result_chars = max_result_chars
        self._user_agent = user_agent
        self._started = False
        # one HTTP session (its own guarded connector and connection pool) per network policy:
        # a pooled connection must never serve a tool whose policy would not have allowed it
        self._sessions: OrderedDict[netguard.NetworkPolicy, tuple[aiohttp.ClientSession, MCPPool]] = OrderedDict()
        self._validators: OrderedDict[bytes, tuple] = OrderedDict()  # schema -> (validator, its size)

    async def start(self) -> None:
        self._started = True
        self._client(self.policy)

    async def stop(self) -> None:
        self._started = False
        sessions = list(self._sessions.values())
        self._sessions.clear()
        for http, _ in sessions:
            await http.close()

    def _client(self, policy: netguard.NetworkPolicy) -> tuple[aiohttp.ClientSession, MCPPool]:
        if not self._started:
            raise RuntimeError("ToolRunner.start() was not awaited")
        found = self._sessions.get(policy)
        if found is not None:
            self._sessions.move_to_end(policy)
            return found
        connector = netguard.guarded_connector(policy, limit=self._max_concurrency * 4, limit_per_host=0)
        http = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            headers={"user-agent": self._user_agent},
        )
        found = self._sessions[policy] = (http, MCPPool(http))
        while len(self._sessions) > MAX_SESSIONS:
            _, (old, _) = self._sessions.popitem(last=False)
            # calls in flight on it end within MAX_TIMEOUT_S per attempt; close after that
            asyncio.get_running_loop().call_later(
                MAX_TIMEOUT_S * (MAX_RETRIES + 1), lambda s=old: asyncio.ensure_future(s.close())
            )
        return found

    # what the model sees

    def openai_tools(self, agent: Agent) -> list[dict]:
        """The agent's server-side tools as OpenAI ``tools[]`` entries."""
        return [tool.openai() for tool in agent_tools(agent).values()]

    def is_server_tool(self, agent: Agent, name: str) -> bool:
        return name in agent_tools(agent)

    # running

    async def run(
        self, agent: Agent, calls: list[dict], *, deadline: float, context: dict, budget: list[int] | None = None
    ) -> list[ToolResult]:
        """One ToolResult per call, in order. ``calls`` are OpenAI ``tool_calls[]`` entries;
        ``deadline`` is a ``time.monotonic()`` instant no call outlives; ``context`` is passed to
        builtin handlers (tenant, agent, conversation and request ids, ...); ``budget``
        (``validation_budget()``): the validation work the calls may spend, shared by every step
        of one request (else the calls of this step only get a whole one)."""
        tools = agent_tools(agent)
        # One turn, or one tenant, cannot hold every slot of this process: a slow tool of one
        # tenant must not make the others' calls wait out their deadlines (``ToolSlots``).
        turn_slots = asyncio.Semaphore(MAX_PARALLEL_PER_TURN)
        jobs = []
        budget = budget if budget is not None else validation_budget()  # shared by the calls
        for index, raw in enumerate(calls):
            call = _read_call(raw, index)
            if index >= MAX_CALLS_PER_TURN:
                jobs.append(_done(call, "error", f"too many tool calls in one turn (at most {MAX_CALLS_PER_TURN})"))
            else:
                jobs.append(self._one(tools.get(call.name), call, deadline, context, turn_slots, agent.tenant, budget))
        return list(await asyncio.gather(*jobs))

    async def _one(
        self,
        tool: ToolSpec | None,
        call: _Call,
        deadline: float,
        context: dict,
        turn_slots=None,
        tenant: str = "",
        budget: list[int] | None = None,
    ) -> ToolResult:
        started = time.monotonic()
        if tool is None:
            return _result(call, "invalid", f"unknown tool {call.name[:64]!r}", started)
        arguments = None
        try:
            arguments, problem = self._arguments(tool, call.raw, budget)
            if problem is not None:
                return _result(call, "invalid", problem, started, arguments)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return _result(call, "timeout", "no time was left to run the tool", started, arguments)
            async with asyncio.timeout(remaining):  # the wait for a slot counts too
                async with _maybe(turn_slots), self._slots.slot(tenant):
                    if tool.kind == "builtin":
                        return await self._builtin(tool, call, arguments, deadline, context, started)
                    if tool.kind == "http":
                        text = await self._http_call(tool, arguments, deadline)
                    else:
                        text = await self._mcp_call(tool, arguments, deadline, tenant)
        except ToolCallFailed as exc:
            return _result(call, exc.status, self._cap(exc.message), started, arguments)
        except TimeoutError:
            return _result(call, "timeout", "the tool did not answer in time", started, arguments)
        except RecursionError:
            return _result(call, "invalid", "arguments are nested too deeply", started, None)
        except Exception as exc:  # a tool must never fail the turn
            hide = redactor(env_secrets(tool.config.get("headers") or {}))  # an error may quote them
            log.error("tool %s failed:\n%s", tool.name, hide("".join(traceback.format_exception(exc))))
            return _result(call, "error", "the tool failed", started, arguments)
        return _result(call, "ok", self._cap(text), started, arguments)

    def _arguments(self, tool: ToolSpec, raw, budget: list[int] | None = None) -> tuple[dict | None, str | None]:
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            raw = "{}"
        if isinstance(raw, str):
            if len(raw) > MAX_ARGUMENTS_BYTES:
                return None, f"arguments are too long (at most {MAX_ARGUMENTS_BYTES} bytes)"
            try:
                raw = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                return None, f"arguments are not valid JSON ({_short(str(exc), 120)}); send a JSON object"
        if not isinstance(raw, dict):
            return None, "arguments must be a JSON object"
        if _depth(raw) > MAX_ARGUMENTS_DEPTH:
            return None, f"arguments are nested too deeply (at most {MAX_ARGUMENTS_DEPTH} levels)"
        validator, subschemas = self._validator(tool.parameters)
        # Validation costs up to a subschema per value, ~10-15 us each (an anyOf of 1,400 consts
        # over 500 items took 8 s): the calls of a turn share MAX_VALIDATION_WORK of it.
        budget = budget if budget is not None else validation_budget()
        allowed = budget[0] // max(1, subschemas)
        values = _count_values(raw, allowed)
        if values > allowed:
            return None, f"arguments are too large for this tool (at most {allowed} values in this turn)"
        budget[0] -= values * subschemas
        # ... and what is evaluated, counted as it is (budget[1]: keyword evaluations of the turn)
        work = [budget[1]]
        token = _WORK.set(work)
        try:
            found = itertools.islice(validator.iter_errors(raw), MAX_SCHEMA_ERRORS)
            errors = sorted(found, key=lambda e: (len(e.path), str(e.path)))  # (one per bad item: bounded)
        except ValidationTooCostly:
            return None, "arguments are too costly to check against this tool's schema in this turn"
        finally:
            budget[1] = max(0, work[0])
            _WORK.reset(token)
        if errors:
            return raw, _schema_error(errors[0], len(errors))
        return raw, None

    def _validator(self, schema: dict):
        key = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)
        found = self._validators.get(key)
        if found is None:
            found = self._validators[key] = (ArgumentValidator(schema), _count_subschemas(schema))
            if len(self._validators) > 1024:
                self._validators.popitem(last=False)
        else:
            self._validators.move_to_end(key)
        return found

    async def _builtin(self, tool, call, arguments, deadline, context, started) -> ToolResult:
        handler = self.handlers.get(tool.name)
        escalate = tool.name == "escalate_to_human"
        end = tool.name == "end_conversation"
        if handler is None:
            if tool.name == "knowledge_search":
                return _result(call, "error", "no knowledge base attached", started, arguments)
            text = (
                "Escalated to a human agent; they will take over the conversation."
                if escalate
                else "The conversation has ended."
            )
            return _result(call, "ok", text, started, arguments, escalate=escalate, end=end)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                text = await handler(arguments, context)
        except TimeoutError:
            return _result(call, "timeout", "the tool did not answer in time", started, arguments)
        except Exception:
            log.exception("builtin %s failed", tool.name)
            return _result(call, "error", "the tool failed", started, arguments)
        content = text if isinstance(text, str) else orjson.dumps(text).decode()
        return _result(call, "ok", self._cap(content), started, arguments, escalate=escalate, end=end)

    async def _http_call(self, tool: ToolSpec, arguments: dict, deadline: float) -> str:
        policy = tool_policy(self.policy, tool.config)
        http, _ = self._client(policy)
        try:
            headers = resolve_headers(tool.config.get("headers") or {})
        except KeyError:
            raise ToolCallFailed("error", "the tool is misconfigured (a secret it needs is not set)") from None
        hide = await redactor_off_loop(env_secrets(tool.config.get("headers") or {}))
        try:  # the answer is redacted as it is read (a secret across the size cap is found whole)
            return await call_http(http, tool, arguments, headers, policy=policy, deadline=deadline, redact=hide)
        except ValueError as exc:  # a dot-segment argument
            raise ToolCallFailed("error", _short(str(exc))) from None
        except ToolCallFailed as exc:  # its message may quote the tool's answer
            raise ToolCallFailed(exc.status, hide(exc.message)) from None

    async def _mcp_call(self, tool: ToolSpec, arguments: dict, deadline: float, tenant: str | None = None) -> str:
        config = tool.config
        policy = tool_policy(self.policy, config)
        _, pool = self._client(policy)
        problem = netguard.url_problem(config["url"], policy)
        if problem is not None:
            raise ToolCallFailed("error", "the tool's address is not reachable from the gateway (network policy)")
        try:
            headers = resolve_headers(config.get("headers") or {})
        except KeyError:
            raise ToolCallFailed("error", "the tool is misconfigured (a secret it needs is not set)") from None
        timeout = min(float(config["timeout_s"]), deadline - time.monotonic())
        if timeout <= 0:
            raise ToolCallFailed("timeout", "the tool did not answer in time")
        client = pool.client(config["url"], headers, owner=tenant)
        hide = await redactor_off_loop(env_secrets(config.get("headers") or {}))
        try:
            text, is_error = await client.call_tool(config["tool"], arguments, timeout_s=timeout)
        except TimeoutError:
            raise ToolCallFailed("timeout", "the tool did not answer in time") from None
        except MCPError as exc:
            if netguard.refused_cause(exc) is not None:
                raise ToolCallFailed(
                    "error", "the tool's address is not reachable from the gateway (network policy)"
                ) from None
            message = hide(str(exc))
            raise ToolCallFailed("error", f"the MCP tool failed: {_short(message)}") from None
        text = hide(text)  # whole, then capped
        cap = int(config.get("max_response_bytes", DEFAULT_RESPONSE_BYTES))
        if len(text.encode()) > cap:
            text = text.encode()[:cap].decode(errors="ignore") + f"\n[truncated: the answer exceeded {cap} bytes]"
        if is_error:
            raise ToolCallFailed("error", text or "the tool reported an error")
        return text

    async def list_mcp_tools(
        self, url: str, headers: dict[str, str] | None = None, *, network: dict | None = None, timeout_s: float = 10.0
    ) -> list[dict]:
        """The tools an MCP server offers (for an admin filling in ``parameters``). ``network``:
        a tool config's ``allow_private_networks`` / ``allowed_networks`` (as parse_tools left
        them). Raises MCPError or TimeoutError; the URL is checked against the policy first."""
        policy = tool_policy(self.policy, network or {})
        _, pool = self._client(policy)
        problem = netguard.url_problem(url, policy)
        if problem is not None:
            raise MCPError("the server's address is not reachable from the gateway (network policy)")
        return await pool.client(url, resolve_headers(headers or {})).list_tools(timeout_s=timeout_s)

    def _cap(self, text: str) -> str:
        limit = self._max_result_chars
        if len(text) <= limit:
            return text
        return text[:limit] + f"\n[truncated: {len(text) - limit} more characters]"


def _count_values(value, limit: int) -> int:
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


def _count_subschemas(schema) -> int:
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


def _depth(value) -> int:
    """How deeply ``value`` nests lists and objects (iteratively: no recursion limit to hit)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, level)
            if level > MAX_ARGUMENTS_DEPTH:
                break
            stack.extend((child, level + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def _read_call(raw, index: int) -> _Call:
    if not isinstance(raw, dict):
        return _Call(f"call_{index}", "", None)
    function = raw.get("function") if isinstance(raw.get("function"), dict) else {}
    ident = raw.get("id") if isinstance(raw.get("id"), str) else f"call_{index}"
    name = function.get("name") if isinstance(function.get("name"), str) else ""
    return _Call(ident, name, function.get("arguments"))


def _result(call: _Call, status: str, content: str, started: float, arguments=None, **flags) -> ToolResult:
    return ToolResult(
        tool_call_id=call.id,
        name=call.name,
        content=content,
        status=status,
        duration_ms=round((time.monotonic() - started) * 1000, 3),
        arguments=arguments,
        **flags,
    )


async def _done(call: _Call, status: str, content: str) -> ToolResult:
    return _result(call, status, content, time.monotonic())


def _schema_error(error, count: int) -> str:
    """One schema error as a sentence the model can act on, naming the field."""
    path = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "required" and isinstance(error.validator_value, list):
        instance = error.instance if isinstance(error.instance, dict) else {}
        missing = [r for r in error.validator_value if r not in instance]
        field = ".".join(filter(None, [path, str(missing[0]) if missing else ""]))
        text = f"missing required argument '{field}'"
    elif error.validator == "additionalProperties" and isinstance(error.instance, dict):
        props = error.schema.get("properties") or {}
        extra = [k for k in error.instance if k not in props]
        field = ".".join(filter(None, [path, str(extra[0]) if extra else ""]))
        text = f"unexpected argument '{field}'"
    else:
        text = f"argument '{path or '(arguments)'}': {_short(error.message, 200)}"
    more = f" (and {count - 1} more problems)" if count > 1 else ""
    if count >= MAX_SCHEMA_ERRORS:
        more = f" (and at least {count - 1} more problems)"
    return f"invalid arguments: {text}{more}; fix the arguments and call the tool again"


__all__ = [
    "BUILTINS",
    "ToolConfigError",
    "ToolRunner",
    "agent_tools",
    "fill_url",
    "host_allowed",
    "parse_tools",
    "public_tool",
    "resolve_headers",
]
