"""What an agent declares as its server-side tools: ``parse_tools`` checks each declaration
(``http``, ``mcp``, ``builtin``; see ``runtime.tools`` for how each kind runs) into a ``ToolSpec``,
naming the field of anything wrong (``ToolConfigError``), before it is stored.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re

import orjson
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from yarl import URL

from core import netguard
from runtime.http_tools import PLACEHOLDER_RE
from runtime.redaction import MIN_SECRET, redactor
from runtime.tool_validation import _re2_pattern
from runtime.tool_validation import shortened as _short
from runtime.types import Agent, ToolSpec

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


def agent_tools(agent: Agent) -> dict[str, ToolSpec]:
    """Every server-side tool of ``agent`` by name: its declared tools and enabled builtins."""
    tools = {t.name: t for t in agent.tools}
    for name in agent.builtins:
        if name in BUILTINS and name not in tools:
            tools[name] = BUILTINS[name]
    return tools
