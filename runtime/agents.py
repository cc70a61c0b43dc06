"""Agents in PostgreSQL: building an ``Agent`` from its rows, checking what the admin API and the
CLI send, and the store functions that change agents, versions and labels. A writer then
``announce``s the change: every replica's registry (``runtime.agent_registry``, which holds every
active agent in process so a turn reads no database) reloads it at once.

The store functions take a connection inside the caller's transaction (tenant-walled for tenant
admins) and raise ``InvalidRequest`` / ``NotFound`` naming the field; bad input changes nothing.
"""

from __future__ import annotations

import logging
import re
import secrets
from typing import Any

import orjson

from core.errors import InvalidRequest, NotFound
from runtime import experiments, prompts
from runtime.prompt_versions import (
    LABELLED_SQL,
    ONE_SQL,
    Quota,
    check_room,
    latest_number,
    size_of,
    stored_size,
)
from runtime.types import Agent, MemorySettings, PromptVersion

log = logging.getLogger("gateway.agents")

CHANGED = "gateway:agents:changed"
VERSION_KEY = "gateway:agents:version"
ALL = "*"

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
MAX_STEPS = 20
MAX_FALLBACK = 4000
MAX_DESCRIPTION = 2000
MAX_NOTE = 2000
MAX_KNOWLEDGE_BASES = 32
MAX_VARIANTS = 10
MAX_LABELS = 64  # labels of one agent (each may keep a version in every replica's memory)
MAX_WEIGHT = 10_000
SETTINGS = (
    "defaults", "tools", "builtins", "memory", "max_steps", "fallback_message", "knowledge_bases", "retrieval",
    "escalation",
)  # fmt: skip


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(8)


def _json(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


# ---- building agents from rows ------------------------------------------------------------------
def version_from_row(row) -> PromptVersion:
    created = row["created_at"]
    return PromptVersion(
        version=row["version"],
        template=row["template"],
        variables=_json(row["variables"]) or {},
        note=row["note"],
        created_at=created.timestamp() if hasattr(created, "timestamp") else float(created or 0),
    )


def agent_from_rows(
    row, versions: dict[int, PromptVersion], labels: dict[str, dict[int, int]], previous: Agent | None = None
) -> Agent:
    """The agent of its rows. ``previous``: the same agent as loaded before, whose parsed tools
    are kept when its tools did not change (a reload parses only what changed: 64 tools took
    ~30 ms to parse)."""
    settings = _json(row["settings"]) or {}
    tools: tuple = ()
    if previous is not None and settings.get("tools") and _same_json(previous.settings.get("tools"), settings["tools"]):
        tools = previous.tools
    elif settings.get("tools"):
        from runtime.tools import ToolConfigError, parse_tools

        try:
            tools = parse_tools(settings["tools"], stored=True)
        except ToolConfigError as exc:  # stored before a check got stricter: serve without them
            log.error("agent %s: tools not loaded: %s", row["id"], exc)
    memory = settings.get("memory") or {}
    return Agent(
        id=row["id"],
        tenant=row["tenant"],
        name=row["name"],
        model=row["model"],
        description=row["description"] or "",
        defaults=settings.get("defaults") or {},
        max_steps=int(settings.get("max_steps") or 5),
        fallback_message=settings.get("fallback_message"),
        tools=tools,
        builtins=tuple(settings.get("builtins") or ()),
        memory=MemorySettings(**{k: v for k, v in memory.items() if k in MemorySettings.__slots__}),
        knowledge_bases=tuple(settings.get("knowledge_bases") or ()),
        labels=labels,
        versions=versions,
        settings=settings,
    )


def _same_json(a: Any, b: Any) -> bool:
    """``a`` and ``b`` are the same JSON: Python's ``==`` takes ``true`` for ``1`` and ``1.0``
    (``{"const": true} == {"const": 1}``), which a JSON schema does not. Unsorted: both come from
    jsonb, which orders keys the same way (another order only costs a parse); sorting made the
    comparison as slow as ``==`` (~55 ms for 1.6 MB of tools, ~25 ms unsorted)."""
    try:
        return orjson.dumps(a) == orjson.dumps(b)
    except (TypeError, orjson.JSONEncodeError):
        return False


def target_from_json(value: Any) -> dict[int, int]:
    return {int(k): int(v) for k, v in (_json(value) or {}).items()}


def held_bytes(agent: Agent) -> int:
    return sum(size_of(v) for v in agent.versions.values())


async def announce(redis, agent_id: str | None = None) -> int:
    """Tell every replica an agent changed (``None``: reload everything). Returns how many
    processes heard the message; the version counter reaches the rest within a second."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.incr(VERSION_KEY)
        pipe.publish(CHANGED, agent_id or ALL)
        _, reached = await pipe.execute()
    return reached


# ---- checking input -----------------------------------------------------------------------------
def check_name(name: Any, param: str = "name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidRequest(
            "An agent name is 1-64 characters: lowercase letters, digits, '-' and '_', starting with a "
            "letter or digit.",
            param=param,
            code="invalid_value",
        )
    return name


def check_settings(data: dict, base: dict | None = None) -> dict:
    """The agent's settings from admin input (only the keys given replace ``base``'s)."""
    out = dict(base or {})
    if "defaults" in data:
        defaults = data["defaults"] if data["defaults"] is not None else {}
        if not isinstance(defaults, dict):
            raise InvalidRequest("'defaults' must be an object.", param="defaults", code="invalid_type")
        if len(orjson.dumps(defaults)) > prompts.MAX_VALUES_BYTES:
            raise InvalidRequest("'defaults' is too large.", param="defaults", code="invalid_value")
        out["defaults"] = defaults
    if "tools" in data:
        tools = data["tools"] or []
        from runtime.tools import ToolConfigError, parse_tools

        try:
            parse_tools(tools)
        except ToolConfigError as exc:
            raise InvalidRequest(f"Invalid tool: {exc}", param=exc.field, code="invalid_tool") from None
        out["tools"] = tools
    if "builtins" in data:
        from runtime.tools import BUILTINS

        builtins = data["builtins"] or []
        if not isinstance(builtins, list) or not all(isinstance(b, str) for b in builtins):
            raise InvalidRequest("'builtins' must be an array of names.", param="builtins", code="invalid_type")
        for b in builtins:
            if b not in BUILTINS:
                raise InvalidRequest(
                    f"Unknown built-in tool {b[:64]!r}; known: {', '.join(BUILTINS)}.",
                    param="builtins",
                    code="invalid_value",
                )
        out["builtins"] = sorted(set(builtins))
    if "memory" in data:
        out["memory"] = _check_memory(data["memory"])
    if "max_steps" in data:
        steps = data["max_steps"]
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
            raise InvalidRequest(
                f"'max_steps' must be an integer from 1 to {MAX_STEPS}.", param="max_steps", code="invalid_value"
            )
        out["max_steps"] = steps
    if "fallback_message" in data:
        msg = data["fallback_message"]
        if msg is not None and (
            not isinstance(msg, str) or not msg.strip() or len(msg) > MAX_FALLBACK or "\x00" in msg
        ):
            raise InvalidRequest(
                f"'fallback_message' must be a non-empty string of at most {MAX_FALLBACK} characters.",
                param="fallback_message",
                code="invalid_value",
            )
        out["fallback_message"] = msg
    if "knowledge_bases" in data:
        kbs = data["knowledge_bases"] or []
        if (
            not isinstance(kbs, list)
            or len(kbs) > MAX_KNOWLEDGE_BASES
            or not all(isinstance(k, str) and 0 < len(k) <= 128 and "\x00" not in k for k in kbs)
        ):
            raise InvalidRequest(
                f"'knowledge_bases' must be an array of at most {MAX_KNOWLEDGE_BASES} names.",
                param="knowledge_bases",
                code="invalid_value",
            )
        out["knowledge_bases"] = kbs
    if "retrieval" in data:  # knowledge-base search per turn (gateway/grounding.py's defaults otherwise)
        out["retrieval"] = _check_retrieval(data["retrieval"])
    if "escalation" in data:  # human in the loop: threshold, team, messages, rules (runtime/hitl)
        from runtime.hitl import settings as hitl_settings

        out["escalation"] = hitl_settings.check(data["escalation"])
    return out


_MEMORY_BOUNDS = {
    "window_turns": (1, 200),
    "window_tokens": (100, 200_000),
    "ttl_s": (60, 90 * 86400),
    "retention_days": (0, 3650),
}


def _check_memory(value: Any) -> dict:
    return _check_bounded(value, "memory", _MEMORY_BOUNDS)


# top_k, max_context_tokens: integers; threshold: a similarity from 0 to 1
_RETRIEVAL_BOUNDS = {"top_k": (1, 50), "max_context_tokens": (100, 100_000), "threshold": (0.0, 1.0)}


def _check_retrieval(value: Any) -> dict:
    return _check_bounded(value, "retrieval", _RETRIEVAL_BOUNDS)


def _check_bounded(value: Any, name: str, bounds: dict[str, tuple]) -> dict:
    """An object of known numeric fields, each within its (low, high): integers, or any number
    where the bounds are floats."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"'{name}' must be an object.", param=name, code="invalid_type")
    out = {}
    for key, v in value.items():
        limits = bounds.get(key)
        if limits is None:
            raise InvalidRequest(
                f"'{name}' has unknown field {str(key)[:64]!r}; known: {', '.join(bounds)}.",
                param=f"{name}.{str(key)[:64]}",
                code="invalid_value",
            )
        real = isinstance(limits[0], float)
        if not isinstance(v, int | float if real else int) or isinstance(v, bool) or not limits[0] <= v <= limits[1]:
            raise InvalidRequest(
                f"'{name}.{key}' must be {'a number' if real else 'an integer'} from {limits[0]} to {limits[1]}.",
                param=f"{name}.{key}",
                code="invalid_value",
            )
        out[key] = v
    return out


def check_note(note: Any) -> str | None:
    if note is None:
        return None
    if not isinstance(note, str) or len(note) > MAX_NOTE or "\x00" in note:
        raise InvalidRequest(f"'note' must be a string of at most {MAX_NOTE} characters.", param="note")
    return note


def check_target(value: Any, param: str = "variants") -> dict[int, int]:
    """Weighted variants {"7": 50, "8": 50}: version numbers to positive integer weights."""
    if not isinstance(value, dict) or not value or len(value) > MAX_VARIANTS:
        raise InvalidRequest(f"'{param}' must be an object of 1 to {MAX_VARIANTS} versions and weights.", param=param)
    out: dict[int, int] = {}
    for key, weight in value.items():
        if not isinstance(key, str) or not (key.isascii() and key.isdigit()) or len(key) > 9 or int(key) < 1:
            raise InvalidRequest(f"'{param}' keys must be version numbers.", param=param, code="invalid_value")
        if not isinstance(weight, int) or isinstance(weight, bool) or not 1 <= weight <= MAX_WEIGHT:
            raise InvalidRequest(
                f"'{param}.{key}' must be a positive integer weight (at most {MAX_WEIGHT}).",
                param=f"{param}.{key}",
                code="invalid_value",
            )
        out[int(key)] = weight
    return out


# ---- the store ----------------------------------------------------------------------------------
# (ids $1 joined, not ``= ANY($1)``: see LABELLED_SQL)
AGENTS_SQL = """SELECT a.id, a.tenant, a.name, a.model, a.description, a.settings
                FROM unnest($1::text[]) AS want(id) JOIN agents a ON a.id = want.id WHERE a.archived_at IS NULL"""
LABELS_SQL = """SELECT l.agent_id, l.label, l.target
                FROM unnest($1::text[]) AS want(id) JOIN prompt_labels l ON l.agent_id = want.id"""


async def load_agent(conn, agent_id: str) -> Agent | None:
    """One active agent with its labels and the versions they point at (admin reads and the
    registry's reloads; ``load_version`` reads any other)."""
    found = await read_agents(conn, [agent_id])
    return agent_from_rows(*found[0]) if found else None


AgentRows = tuple[Any, dict[int, PromptVersion], dict[str, dict[int, int]]]


async def read_agents(conn, ids: list[str]) -> list[AgentRows]:
    """The active agents of ``ids`` as rows: each agent's row, the versions its labels point at,
    and its labels."""
    rows = await conn.fetch(AGENTS_SQL, ids)
    versions: dict[str, dict[int, PromptVersion]] = {}
    for r in await conn.fetch(LABELLED_SQL, ids):
        versions.setdefault(r["agent_id"], {})[r["version"]] = version_from_row(r)
    labels: dict[str, dict[str, dict[int, int]]] = {}
    for r in await conn.fetch(LABELS_SQL, ids):
        labels.setdefault(r["agent_id"], {})[r["label"]] = target_from_json(r["target"])
    return [(r, versions.get(r["id"], {}), labels.get(r["id"], {})) for r in rows]


async def load_version(conn, agent: Agent, number: int) -> PromptVersion | None:
    """One version of an agent, from memory when a label holds it, else from PostgreSQL."""
    found = agent.versions.get(number)
    if found is not None:
        return found
    row = await conn.fetchrow(ONE_SQL, agent.id, number)
    return version_from_row(row) if row is not None else None


async def find_agents(conn, name: str, tenant: str | None) -> list[Agent]:
    """Active agents named ``name`` (in ``tenant``, or in any tenant when None)."""
    ids = await conn.fetch(
        """SELECT id FROM agents WHERE name = $1 AND archived_at IS NULL AND ($2::text IS NULL OR tenant = $2)
           ORDER BY tenant""",
        name,
        tenant,
    )
    out = []
    for r in ids:
        agent = await load_agent(conn, r["id"])
        if agent is not None:
            out.append(agent)
    return out


async def list_agents(conn, tenant: str | None) -> list[dict]:
    rows = await conn.fetch(
        """SELECT a.id, a.tenant, a.name, a.model, a.description, a.settings, a.created_at, a.updated_at,
                  (SELECT max(version) FROM prompt_versions v WHERE v.agent_id = a.id) AS latest_version,
                  (SELECT jsonb_object_agg(label, target) FROM prompt_labels l WHERE l.agent_id = a.id) AS labels
           FROM agents a WHERE a.archived_at IS NULL AND ($1::text IS NULL OR a.tenant = $1)
           ORDER BY a.tenant, a.name LIMIT 10000""",
        tenant,
    )
    return [
        {
            "id": r["id"],
            "object": "agent",
            "tenant": r["tenant"],
            "name": r["name"],
            "model": r["model"],
            "description": r["description"],
            "latest_version": r["latest_version"],
            "labels": {k: _public_target(target_from_json(v)) for k, v in (_json(r["labels"]) or {}).items()},
            "created_at": r["created_at"],
            "updated_at": r["updated_at"],
        }
        for r in rows
    ]


async def create_agent(
    conn,
    *,
    tenant: str,
    name: str,
    model: str,
    description: str,
    settings: dict,
    template: str,
    variables: dict,
    note: str | None = None,
    created_by: str | None = None,
    quota: Quota | None = None,
) -> str:
    """A new agent with version 1, labelled ``latest`` and ``production``. Returns its id.
    ``quota``: the tenant's bounds on stored prompt versions and active agents (None: unbounded,
    the CLI's)."""
    await check_room(conn, tenant, stored_size(template, variables, note), quota)
    await check_agent_room(conn, tenant, settings, quota, replacing=None)
    exists = await conn.fetchval(
        "SELECT true FROM agents WHERE tenant = $1 AND name = $2 AND archived_at IS NULL", tenant, name
    )
    if exists:
        raise InvalidRequest(f"An agent named {name!r} exists already.", param="name", code="agent_exists")
    agent_id = new_id("agt_")
    try:
        async with conn.transaction():
            await conn.execute(
                """INSERT INTO agents (id, tenant, name, model, description, settings)
                   VALUES ($1, $2, $3, $4, $5, $6::jsonb)""",
                agent_id,
                tenant,
                name,
                model,
                description,
                _dumps(settings),
            )
    except Exception as exc:
        if getattr(exc, "sqlstate", None) == "23505":
            raise InvalidRequest(
                f"An agent named {name!r} exists already.", param="name", code="agent_exists"
            ) from None
        raise
    await _insert_version(conn, agent_id, tenant, 1, template, variables, note, created_by)
    await _put_label(conn, agent_id, tenant, "latest", {1: 1})
    await _put_label(conn, agent_id, tenant, "production", {1: 1})
    return agent_id


_AGENTS_USED_SQL = """
SELECT count(*) AS agents, coalesce(sum(octet_length(settings::text)), 0) AS bytes
FROM agents WHERE tenant = $1 AND archived_at IS NULL AND id <> $2
"""


async def check_agent_room(conn, tenant: str, settings: dict, quota: Quota | None, *, replacing: str | None) -> None:
    """Refuse an agent (a new one, or ``replacing``'s new settings) past the tenant's bounds on
    active agents and their settings' bytes. Counted under a per-tenant lock held to the end of
    the caller's transaction, so racing creates cannot pass together."""
    if quota is None or (quota.max_agents is None and quota.max_settings_bytes is None):
        return
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('gateway-agents:' || $1))", tenant)
    used = await conn.fetchrow(_AGENTS_USED_SQL, tenant, replacing or "")
    if replacing is None and quota.max_agents is not None and used["agents"] + 1 > quota.max_agents:
        raise InvalidRequest(
            f"This tenant has {used['agents']} active agents, the most it may "
            f"(policies.max_agents_per_tenant = {quota.max_agents}); archive one, or the operator may raise it.",
            param="name",
            code="too_many_agents",
        )
    adding = len(_dumps(settings).encode())
    if quota.max_settings_bytes is not None and used["bytes"] + adding > quota.max_settings_bytes:
        raise InvalidRequest(
            f"This agent's settings ({adding} bytes) would take the tenant's active agents past "
            f"{quota.max_settings_bytes} bytes of settings (policies.max_agent_settings_bytes_per_tenant; "
            f"{used['bytes']} used by its other agents); the operator may raise it.",
            param=_largest(settings),
            code="agent_storage_exceeded",
        )


def _largest(settings: dict) -> str:
    """The settings field that takes the most room (what a 400 names)."""
    if not settings:
        return "tools"
    return max(settings, key=lambda k: len(_dumps(settings[k])))


async def lock_agent(conn, agent: Agent) -> Agent:
    """``agent`` read again under its row's lock, held to the end of the caller's transaction: a
    change that writes back settings it read (``update_agent``) has a racing change's committed."""
    locked = await conn.fetchval("SELECT id FROM agents WHERE id = $1 AND archived_at IS NULL FOR UPDATE", agent.id)
    current = await load_agent(conn, agent.id) if locked is not None else None
    if current is None:
        raise NotFound(f"No agent named {agent.name!r}.", param="name")
    return current


async def update_agent(
    conn, agent: Agent, model: str | None, description: str | None, settings: dict, quota: Quota | None = None
) -> None:
    await check_agent_room(conn, agent.tenant, settings, quota, replacing=agent.id)
    await conn.execute(
        """UPDATE agents SET model = coalesce($2, model), description = coalesce($3, description),
                             settings = $4::jsonb, updated_at = now()
           WHERE id = $1 AND archived_at IS NULL""",
        agent.id,
        model,
        description,
        _dumps(settings),
    )


async def archive_agent(conn, agent: Agent) -> None:
    await conn.execute("UPDATE agents SET archived_at = now(), updated_at = now() WHERE id = $1", agent.id)
    await conn.execute("UPDATE experiments SET stopped_at = now() WHERE agent_id = $1 AND stopped_at IS NULL", agent.id)


async def save_version(
    conn,
    agent: Agent,
    template: str,
    variables: dict,
    note: str | None = None,
    created_by: str | None = None,
    labels: list[str] | tuple = (),
    quota: Quota | None = None,
) -> PromptVersion:
    """The next version (the agent row is locked while it is numbered); ``latest`` and the
    given labels move to it. ``quota``: the tenant's bound on stored prompt versions."""
    locked = await conn.fetchval("SELECT id FROM agents WHERE id = $1 AND archived_at IS NULL FOR UPDATE", agent.id)
    if locked is None:
        raise NotFound(f"No agent named {agent.name!r}.", param="name")
    await check_room(conn, agent.tenant, stored_size(template, variables, note), quota)
    number = await conn.fetchval(
        "SELECT coalesce(max(version), 0) + 1 FROM prompt_versions WHERE agent_id = $1", agent.id
    )
    row = await _insert_version(conn, agent.id, agent.tenant, number, template, variables, note, created_by)
    for label in ("latest", *labels):
        await set_label(conn, agent, label, {number: 1}, known={number})
    await conn.execute("UPDATE agents SET updated_at = now() WHERE id = $1", agent.id)
    return version_from_row(row)


async def _insert_version(conn, agent_id, tenant, number, template, variables, note, created_by):
    return await conn.fetchrow(
        """INSERT INTO prompt_versions (agent_id, tenant, version, template, variables, note, created_by)
           VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7)
           RETURNING version, template, variables, note, created_at""",
        agent_id,
        tenant,
        number,
        template,
        _dumps(variables),
        note,
        created_by,
    )


async def _put_label(conn, agent_id: str, tenant: str, label: str, target: dict[int, int]) -> None:
    await conn.execute(
        """INSERT INTO prompt_labels (agent_id, tenant, label, target) VALUES ($1, $2, $3, $4::jsonb)
           ON CONFLICT (agent_id, label) DO UPDATE SET target = excluded.target, updated_at = now()""",
        agent_id,
        tenant,
        label,
        _dumps(_public_target(target)),
    )


async def set_label(
    conn,
    agent: Agent,
    label: str,
    target: dict[int, int],
    *,
    primary_metric: str | None = None,
    known: set[int] | None = None,
) -> str | None:
    """Point ``label`` at one version or at weighted variants. Several variants start an
    experiment on the label (ending the one running there); one version ends it. Returns the
    id of the experiment started, if any."""
    prompts.check_label(label)
    existing = set(known or ()) | set(
        await conn.fetchval(
            "SELECT coalesce(array_agg(version), '{}') FROM prompt_versions WHERE agent_id = $1 AND version = ANY($2)",
            agent.id,
            list(target),
        )
    )
    missing = sorted(set(target) - existing)
    if missing:
        raise NotFound(f"Agent {agent.name!r} has no prompt version {missing[0]}.", param="version")
    await conn.execute("SELECT 1 FROM agents WHERE id = $1 FOR UPDATE", agent.id)  # racing new labels count once
    labels = await conn.fetchval(
        "SELECT count(*) FILTER (WHERE label <> $2) FROM prompt_labels WHERE agent_id = $1", agent.id, label
    )
    if labels >= MAX_LABELS:
        raise InvalidRequest(
            f"Agent {agent.name!r} has {MAX_LABELS} labels, the most it may have.",
            param="label",
            code="too_many_labels",
        )
    await _put_label(conn, agent.id, agent.tenant, label, target)
    current = await experiments.running(conn, agent.id, label)
    if current is not None and len(target) > 1 and _json(current["variants"]) == _public_target(target):
        return current["id"]  # the same arms again: the experiment goes on
    await experiments.end_running(conn, agent.id, label)
    if len(target) > 1:
        return await experiments.start(
            conn, agent.tenant, agent.id, label, _public_target(target), primary_metric or experiments.DEFAULT_METRIC
        )
    return None


async def list_versions(conn, agent: Agent) -> list[dict]:
    rows = await conn.fetch(
        """SELECT version, note, created_at, created_by, length(template) AS template_chars, variables
           FROM prompt_versions WHERE agent_id = $1 ORDER BY version DESC LIMIT 1000""",
        agent.id,
    )
    by_version: dict[int, list[str]] = {}
    for label, target in agent.labels.items():
        for number in target:
            by_version.setdefault(number, []).append(label)
    return [
        {
            "version": r["version"],
            "note": r["note"],
            "created_at": r["created_at"],
            "created_by": r["created_by"],
            "template_chars": r["template_chars"],
            "variables": _json(r["variables"]),
            "labels": sorted(by_version.get(r["version"], [])),
        }
        for r in rows
    ]


def _public_target(target: dict[int, int]) -> dict[str, int]:
    return {str(k): v for k, v in sorted(target.items())}


def describe(agent: Agent) -> dict:
    """An agent as the admin API shows it."""
    settings = {k: agent.settings[k] for k in SETTINGS if k in agent.settings}
    return {
        "id": agent.id,
        "object": "agent",
        "tenant": agent.tenant,
        "name": agent.name,
        "model": agent.model,
        "description": agent.description,
        **settings,
        "max_steps": agent.max_steps,
        "latest_version": latest_number(agent) or None,
        "labels": {k: _public_target(v) for k, v in sorted(agent.labels.items())},
    }
