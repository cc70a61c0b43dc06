"""What of an agent's prompt versions a replica holds in memory, and what a tenant may store.

Every save is an immutable version, and a tenant admin may save them in a loop: a replica that
held every version of every agent of every tenant grew without bound (about 19 MB per 100
versions of 60 KB, in every replica). So:

- the registry holds only the versions a label points at (``latest``, ``production``, any other
  label, every arm of an experiment) — what a turn that names no version, or a label, runs;
- a version pinned by number (``agent:support@7``) that no label points at is read from
  PostgreSQL on demand (``VersionCache``): at most ``MAX_LOADS`` reads at once per replica, and
  ``MAX_LOADS_PER_TENANT`` of them a tenant's (its others wait for its own, never for another
  tenant's slots), at most ``MAX_QUEUED_PER_TENANT`` in flight or waiting per tenant (past it:
  429), each with a timeout, concurrent requests for one version sharing one read, and the
  versions read kept in an LRU bounded in bytes (``policies.prompt_cache_bytes``). Versions are numbered
  1..latest without gaps and never change or disappear, so a number past ``latest`` is refused
  without a read and a cached version never goes stale;
- what a tenant stores is bounded (``policies.max_prompt_versions_per_tenant`` and
  ``policies.max_prompt_bytes_per_tenant``, counted over its active agents): a save past either
  is refused with a 400 naming ``template``, and nothing is stored.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass

import orjson

from core.errors import InvalidRequest, RateLimited, ServiceUnavailable
from core.metrics import AGENT_PROMPT_BYTES
from runtime.types import Agent, PromptVersion

log = logging.getLogger("gateway.agents")

MAX_LOADS = 4  # PostgreSQL reads of pinned versions in flight at once, per replica
# Reads one tenant may have in flight at once, per replica: a read comes before the turn is
# admitted (its prompt is part of what is admitted), so a tenant's key pinning many versions
# that fall out of the cache at once would otherwise hold every slot, and other tenants' pinned
# turns would wait out LOAD_TIMEOUT_S. A tenant's further reads wait for its own two (a few
# turns pinning a few old versions at once are ordinary traffic, and VAPI's custom LLM does not
# retry a 429), up to MAX_QUEUED_PER_TENANT in flight or waiting; past that: 429, retry.
MAX_LOADS_PER_TENANT = 2
MAX_QUEUED_PER_TENANT = 16
LOAD_TIMEOUT_S = 5.0
DEFAULT_CACHE_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_VERSIONS = 5000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024

# The versions the labels of the active agents of ids $1 point at. (A join on the ids, not
# ``= ANY($1)``: before the tables' first ANALYZE that filter was planned as a search of the whole
# array for every label row, 4 s for 2,000 agents.)
LABELLED_SQL = """
SELECT DISTINCT ON (v.agent_id, v.version)
       v.agent_id, v.version, v.template, v.variables, v.note, v.created_at
FROM unnest($1::text[]) AS want(id)
JOIN prompt_labels l ON l.agent_id = want.id
JOIN agents a ON a.id = l.agent_id AND a.archived_at IS NULL
CROSS JOIN LATERAL jsonb_object_keys(l.target) AS k(version)
JOIN prompt_versions v ON v.agent_id = l.agent_id AND v.version = k.version::int
ORDER BY v.agent_id, v.version
"""

ONE_SQL = """SELECT version, template, variables, note, created_at FROM prompt_versions
             WHERE agent_id = $1 AND version = $2"""


def size_of(version: PromptVersion) -> int:
    """What a version costs held in memory, roughly: its text (UTF-8) and variables (as JSON)."""
    return (
        len(version.template.encode("utf-8", "surrogatepass"))
        + len(orjson.dumps(version.variables))
        + len((version.note or "").encode("utf-8", "surrogatepass"))
        + 200  # the object and its fields
    )


def latest_number(agent: Agent) -> int:
    """The newest version's number (the ``latest`` label always points at it)."""
    latest = agent.labels.get("latest")
    if latest:
        return max(latest)
    return max(agent.versions) if agent.versions else 0


# ---- pinned versions, on demand ---------------------------------------------------------------
class VersionCache:
    """Pinned versions that no label points at: read on demand, LRU-bounded in bytes."""

    def __init__(self, pool, max_bytes: int = DEFAULT_CACHE_BYTES, *, from_row) -> None:
        self._pool = pool
        self.max_bytes = max_bytes
        self._from_row = from_row
        self._held: OrderedDict[tuple[str, int], tuple[PromptVersion, int]] = OrderedDict()
        self._bytes = 0
        self._loading: dict[tuple[str, int], asyncio.Task] = {}
        self._slots = asyncio.Semaphore(MAX_LOADS)
        self._tenant_loads: dict[str, int] = {}  # reads in flight or waiting, per tenant
        self._tenant_slots: dict[str, asyncio.Semaphore] = {}  # a tenant's MAX_LOADS_PER_TENANT
        self.reads = 0  # PostgreSQL reads done (tests and the benchmark read it)

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._held)

    async def pinned(self, agent: Agent, selector: str | None) -> PromptVersion | None:
        """The version ``selector`` pins when it is a number the registry does not hold (None
        otherwise: ``prompts.select`` answers from the agent, or refuses with a 404)."""
        if selector is None or not (selector.isascii() and selector.isdigit()) or len(selector) >= 10:
            return None
        number = int(selector)
        if number in agent.versions or not 1 <= number <= latest_number(agent):
            return None
        key = (agent.id, number)
        found = self._held.get(key)
        if found is not None:
            self._held.move_to_end(key)
            return found[0]
        task = self._loading.get(key)
        if task is None:  # a turn waiting on a read already begun adds no work
            tenant = agent.tenant
            loads = self._tenant_loads.get(tenant, 0)
            if loads >= MAX_QUEUED_PER_TENANT:
                raise RateLimited(
                    "Too many pinned prompt versions are being read for this tenant at once; try again.",
                    param="model",
                    code="too_many_pinned_versions",
                    headers={"retry-after": "1"},
                )
            self._tenant_loads[tenant] = loads + 1
            slots = self._tenant_slots.setdefault(tenant, asyncio.Semaphore(MAX_LOADS_PER_TENANT))
            task = asyncio.create_task(self._load(key, slots), name="prompt-version-load")
            self._loading[key] = task
            task.add_done_callback(lambda _t, key=key, tenant=tenant: self._loaded(key, tenant))
        return await asyncio.shield(task)

    def _loaded(self, key: tuple[str, int], tenant: str) -> None:
        self._loading.pop(key, None)
        left = self._tenant_loads.get(tenant, 1) - 1
        if left > 0:
            self._tenant_loads[tenant] = left
        else:  # none left: its slots go too (no read of its holds them)
            self._tenant_loads.pop(tenant, None)
            self._tenant_slots.pop(tenant, None)

    async def _load(self, key: tuple[str, int], tenant_slots: asyncio.Semaphore) -> PromptVersion | None:
        try:
            async with asyncio.timeout(LOAD_TIMEOUT_S):
                async with tenant_slots, self._slots, self._pool.acquire() as conn:
                    row = await conn.fetchrow(ONE_SQL, *key)
                    self.reads += 1
        except Exception as exc:
            log.warning("prompt version could not be loaded: %s", type(exc).__name__)
            raise ServiceUnavailable(
                "The pinned prompt version could not be loaded just now; try again.", param="model"
            ) from None
        if row is None:
            return None
        version = self._from_row(row)
        self._keep(key, version)
        return version

    def _keep(self, key: tuple[str, int], version: PromptVersion) -> None:
        size = size_of(version)
        if size > self.max_bytes:
            return
        self._held[key] = (version, size)
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, (_, dropped) = self._held.popitem(last=False)
            self._bytes -= dropped
        AGENT_PROMPT_BYTES.labels("pinned").set(self._bytes)


# ---- what a tenant may store ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Quota:
    max_versions: int = DEFAULT_MAX_VERSIONS
    max_bytes: int = DEFAULT_MAX_BYTES
    max_agents: int | None = None  # active agents of the tenant (None: unbounded)
    max_settings_bytes: int | None = None  # their settings' bytes together (None: unbounded)


def stored_size(template: str, variables: dict, note: str | None) -> int:
    """A version's size as the quota counts it (the same sum as ``_USED_SQL``, near enough)."""
    return (
        len(template.encode("utf-8", "surrogatepass"))
        + len(orjson.dumps(variables))
        + len((note or "").encode("utf-8", "surrogatepass"))
    )


_USED_SQL = """
SELECT count(*) AS versions,
       coalesce(sum(octet_length(v.template) + octet_length(v.variables::text) + coalesce(octet_length(v.note), 0)), 0)
           AS bytes
FROM prompt_versions v
WHERE v.tenant = $1
"""  # archived agents' versions too: versions are immutable and kept, so archiving frees nothing


async def check_room(conn, tenant: str, adding: int, quota: Quota | None) -> None:
    """Refuse one more version of ``adding`` bytes past the tenant's quota. Counted under a
    per-tenant lock held to the end of the caller's transaction, so racing saves cannot pass."""
    if quota is None:
        return
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('gateway-prompt-versions:' || $1))", tenant)
    used = await conn.fetchrow(_USED_SQL, tenant)
    if used["versions"] + 1 > quota.max_versions:
        raise InvalidRequest(
            f"This tenant stores {used['versions']} prompt versions, the most it may "
            f"(policies.max_prompt_versions_per_tenant = {quota.max_versions}, archived agents' "
            "included: versions are kept for good); the operator may raise it.",
            param="template",
            code="too_many_prompt_versions",
        )
    if used["bytes"] + adding > quota.max_bytes:
        raise InvalidRequest(
            f"This version ({adding} bytes) would take the tenant's prompt versions past "
            f"{quota.max_bytes} bytes (policies.max_prompt_bytes_per_tenant; {used['bytes']} used, archived "
            "agents' included: versions are kept for good); the operator may raise it.",
            param="template",
            code="prompt_storage_exceeded",
        )
