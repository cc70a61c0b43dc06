"""Server-side tools: what an agent declares (``parse_tools``, in ``runtime.tool_config``) and how
the gateway runs the calls a model makes to them (``ToolRunner``, here; the arguments are checked
against the tool's schema in bounded work by ``runtime.tool_validation``).

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
import itertools
import logging
import time
import traceback
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import orjson

from core import netguard
from runtime.http_tools import ToolCallFailed, call_http, fill_url
from runtime.mcp import MCPError, MCPPool
from runtime.redaction import redactor, redactor_off_loop
from runtime.tool_config import (
    BUILTINS,
    DEFAULT_RESPONSE_BYTES,
    ENV_RE,
    MAX_RETRIES,
    MAX_TIMEOUT_S,
    ToolConfigError,
    agent_tools,
    env_secrets,
    host_allowed,
    parse_tools,
    public_tool,
    resolve_headers,
    tool_policy,
)
from runtime.tool_slots import ToolSlots
from runtime.tool_validation import VALIDATION_WORK as _WORK
from runtime.tool_validation import ArgumentValidator, ValidationTooCostly
from runtime.tool_validation import count_subschemas as _count_subschemas
from runtime.tool_validation import count_values as _count_values
from runtime.tool_validation import shortened as _short
from runtime.types import Agent, ToolResult, ToolSpec

log = logging.getLogger("gateway.tools")


Handler = Callable[[dict, dict], Awaitable[str]]


MAX_PARALLEL_PER_TURN = 4


def _maybe(semaphore):
    return semaphore if semaphore is not None else contextlib.nullcontext()


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
    "ENV_RE",
    "ToolConfigError",
    "ToolRunner",
    "agent_tools",
    "fill_url",
    "host_allowed",
    "parse_tools",
    "public_tool",
    "resolve_headers",
]
