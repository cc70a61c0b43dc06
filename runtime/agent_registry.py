"""The agent registry: every active agent of every tenant, with its prompt versions and labels,
held in process so an agent turn reads no database (``AgentRegistry.get``).

Writers (the admin API, the CLI) change PostgreSQL through ``runtime.agents``' store functions,
then ``announce``: a pub/sub message reloads that agent in every replica at once, and a version
counter polled every second catches a replica that missed the message (a dropped subscription),
so a moved label reaches every replica within about a second.
"""

from __future__ import annotations

import asyncio
import logging
import time

from core.background import pause, stop_tasks
from core.metrics import AGENT_PROMPT_BYTES
from core.pubsub import listen_forever
from core.tokens import warm as warm_tokenizer
from runtime.agents import (
    ALL,
    CHANGED,
    VERSION_KEY,
    AgentRows,
    agent_from_rows,
    held_bytes,
    read_agents,
    version_from_row,
)
from runtime.prompt_versions import (
    VersionCache,
)
from runtime.types import Agent, PromptVersion

log = logging.getLogger("gateway.agents")

POLL_S = 1.0
# A registry reloads everything at least this often, whatever the version says: a change
# committed but never announced (its writer killed, or Redis failing, between the commit and the
# announcement; SQL by hand) or a message lost after a late one leaves the version equal to
# Redis's and the agent stale, which the poll alone never sees (with no later change, for good).
# A full reload reads one short mark per agent and builds only what changed: ``reload``.
CATCH_UP_RELOAD_S = 60.0


# ---- what a reload reads ------------------------------------------------------------------------
# A mark per active agent that moves whenever anything the agent is built from does, whoever
# wrote it (the admin API, the CLI, SQL by hand): a row's ``xmin`` is the transaction that wrote
# it, so a write to the agent's row, or a label added, moved or removed (the list of its labels'
# xmins changes), gives a new mark. Prompt versions never change or go (a trigger refuses it) and
# every path that saves one moves ``latest`` with it; the newest number is in the mark all the
# same, for a label written by hand before the version it names. A row written again with the
# same content has a new xmin: that agent is built again for nothing, never missed.
# An xmin is unique only within one history of one cluster: a restore from a backup (or a promoted
# standby that missed the last transactions) hands the lost writes' ids out again, and ids wrap
# around after 2**32 transactions; a write to the same row with the id a replica held gave back
# its mark, and the replica served the lost content for good. Each row's ``updated_at`` (every
# store write sets it to its transaction's start) is in the mark with its xmin for that (SQL by
# hand that leaves ``updated_at`` as it was is told apart by its xmin alone).
_STAMP = "(extract(epoch FROM {0}.updated_at) * 1000000)::bigint::text"
_MARK = f"""a.xmin::text || ':' || {_STAMP.format("a")}
    || '/' || coalesce((SELECT string_agg(l.xmin::text || ':' || {_STAMP.format("l")}, ',' ORDER BY l.label)
                        FROM prompt_labels l WHERE l.agent_id = a.id), '')
    || '/' || coalesce((SELECT max(v.version) FROM prompt_versions v WHERE v.agent_id = a.id), 0)"""
MARKS_SQL = f"SELECT a.id, {_MARK} AS mark FROM agents a WHERE a.archived_at IS NULL"
MARK_SQL = f"SELECT {_MARK} AS mark FROM agents a WHERE a.id = $1 AND a.archived_at IS NULL"


# ---- the registry -------------------------------------------------------------------------------
class AgentRegistry:
    """Active agents by (tenant, name), in memory. ``get`` does no I/O. An agent holds the
    prompt versions its labels point at; ``pinned`` reads an older one on demand
    (runtime/prompt_versions.py)."""

    def __init__(self, pool, redis, *, cache_bytes: int | None = None) -> None:
        self._pool = pool
        self._redis = redis
        self.pinned_versions = VersionCache(
            pool, cache_bytes if cache_bytes is not None else 32 * 1024 * 1024, from_row=version_from_row
        )
        self._agents: dict[str, dict[str, Agent]] = {}
        self._by_id: dict[str, Agent] = {}
        self._marks: dict[str, str] = {}  # agent id -> its mark (MARKS_SQL) when it was built
        self._version: bytes | None = None
        self._reload_by: float | None = None  # the next full reload owed (monotonic)
        self._labelled_bytes = 0  # of the versions the agents hold (the gauge's value)
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self._stopping = asyncio.Event()

    def get(self, tenant: str, name: str) -> Agent | None:
        return self._agents.get(tenant, {}).get(name)

    def for_tenant(self, tenant: str) -> list[Agent]:
        return sorted(self._agents.get(tenant, {}).values(), key=lambda a: a.name)

    def by_id(self, agent_id: str) -> Agent | None:
        return self._by_id.get(agent_id)

    async def pinned(self, agent: Agent, selector: str | None) -> PromptVersion | None:
        """A version pinned by number (``agent:x@7``) that no label keeps in memory, read on
        demand; None when ``selector`` is not such a number (``prompts.select`` decides)."""
        return await self.pinned_versions.pinned(agent, selector)

    def held(self) -> tuple[int, int]:
        """(versions, bytes) of prompt versions this registry holds in memory."""
        versions = sum(len(agent.versions) for agent in self._by_id.values())
        return versions + len(self.pinned_versions), self._labelled_bytes + self.pinned_versions.bytes

    async def start(self) -> None:
        self._stopping.clear()
        await self.reload()
        self._tasks = [
            asyncio.create_task(listen_forever(self._redis, CHANGED, self._changed, self.reload), name="agent-changes"),
            asyncio.create_task(self._poll(), name="agent-version"),
        ]

    async def stop(self) -> None:
        # The poll also ends on the flag: a cancellation lost inside a call it makes (seen in the
        # suite: the task was found still polling) kept it going, and every shutdown that hit it
        # waited out stop_tasks' 3 s grace.
        self._stopping.set()
        await stop_tasks(self._tasks)
        self._tasks = []

    async def reload(self) -> None:
        """Every active agent, read in one consistent snapshot. Only the agents whose mark moved
        since this registry built them (``MARKS_SQL``), or that are new, are read and built again;
        the ones gone are dropped and the rest stay as they are (the same objects): a reload that
        finds one agent changed costs one agent's work and one short mark per other agent, not a
        read and a build of every agent of every tenant on the event loop."""
        async with self._lock:
            version = await self._read_version()
            async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
                marks = {r["id"]: r["mark"] for r in await conn.fetch(MARKS_SQL)}
                stale = [agent_id for agent_id, mark in marks.items() if self._marks.get(agent_id) != mark]
                found = await read_agents(conn, stale) if stale else []
            gone = [agent_id for agent_id in self._by_id if agent_id not in marks]
            self._replace([*gone, *stale], found, marks)
            self._reload_by = time.monotonic() + CATCH_UP_RELOAD_S
            if version is not None:
                self._version = version
            AGENT_PROMPT_BYTES.labels("labelled").set(self._labelled_bytes)
            self._warm()

    async def reload_agent(self, agent_id: str) -> None:
        async with self._lock:
            async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
                mark = await conn.fetchval(MARK_SQL, agent_id)
                found = await read_agents(conn, [agent_id]) if mark is not None else []
            self._replace([agent_id], found, {agent_id: mark})
            AGENT_PROMPT_BYTES.labels("labelled").set(self._labelled_bytes)
            self._warm()

    def _replace(self, ids: list[str], found: list[AgentRows], marks: dict[str, str]) -> None:
        """Drops the agents ``ids`` and holds those built from ``found`` (their rows, read in the
        snapshot ``marks`` come from), each with its mark; the held bytes move by theirs alone."""
        built: list[Agent] = []
        for row, versions, labels in found:
            try:
                built.append(agent_from_rows(row, versions, labels, self._by_id.get(row["id"])))
            except Exception as exc:  # one bad row must not keep every other agent from loading
                log.error("agent %s not loaded: %s", row["id"], exc)  # (no mark: the next reload tries again)
        for agent_id in ids:
            old = self._by_id.pop(agent_id, None)
            self._marks.pop(agent_id, None)
            if old is None:
                continue
            names = self._agents.get(old.tenant)
            if names is not None and names.get(old.name) is old:  # (its name may be another's now)
                del names[old.name]
                if not names:
                    del self._agents[old.tenant]
            self._labelled_bytes -= held_bytes(old)
        for agent in built:
            self._agents.setdefault(agent.tenant, {})[agent.name] = agent
            self._by_id[agent.id] = agent
            self._marks[agent.id] = marks[agent.id]
            self._labelled_bytes += held_bytes(agent)

    def _warm(self) -> None:
        """A replica with an agent to serve loads the tokenizer now, in a thread (an agent turn
        counts the messages it stores), not on the event loop in its first turn."""
        if self._by_id:
            warm_tokenizer()

    async def _changed(self, data) -> None:
        agent_id = data.decode() if isinstance(data, bytes) else str(data)
        try:
            if agent_id == ALL or not agent_id.startswith("agt_"):
                await self.reload()
            else:
                known, now = self._version, await self._read_version()
                await self.reload_agent(agent_id)
                # This change was the only one since the registry's version: it is caught up, and
                # the poll need not read every agent of every tenant again (it did after each change).
                # (What the version cannot tell, the next full reload sees: CATCH_UP_RELOAD_S.)
                if _next_version(known, now) and self._version is known:
                    self._version = now
        except Exception as exc:  # the version poll retries
            log.warning("agent reload failed: %s", exc)
            self._version = None

    async def _read_version(self) -> bytes | None:
        try:
            return await self._redis.get(VERSION_KEY)
        except Exception:
            return None

    async def _poll(self) -> None:
        while True:
            await pause(self._stopping, POLL_S)
            if self._stopping.is_set():
                return
            try:
                try:
                    version = await self._redis.get(VERSION_KEY)
                except Exception as exc:  # no version to compare: PostgreSQL's agents still come, when owed
                    log.warning("agent registry poll: Redis unreachable: %s", exc)
                    version = self._version
                owed = self._reload_by is not None and time.monotonic() >= self._reload_by
                if version != self._version or owed:
                    await self.reload()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("agent registry poll failed: %s", exc)


def _next_version(known: bytes | None, now: bytes | None) -> bool:
    """``now`` is the version right after ``known`` (one change apart)."""
    try:
        return known is not None and now is not None and int(now) == int(known) + 1
    except ValueError:
        return False
