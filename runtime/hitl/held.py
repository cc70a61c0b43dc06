"""Which conversations a person holds (Redis), and the live feed of queue changes (pub/sub).

A held conversation is one Redis key (named by a keyed hash of the tenant, the agent and the
conversation id: the id is any text, and a channel's holds the customer's number) whose value is
the escalation's id. An agent turn checks it with one GET, beside
its memory read — never a PostgreSQL query. The key is set when an escalation opens and removed
when it is resolved; the SLA sweeper puts back keys of open escalations Redis lost (restart
without persistence), so a hold survives that too, a sweep later.

The feed: every change to the queue is published on one channel; each process subscribes once
and fans events out to its console connections (bounded queues: a slow console loses events,
never memory). Events carry ids, states, teams and priorities, never message content.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time

import orjson

from core.background import stop_task
from core.erasure_key import RENAME_UNLESS_SET, is_legacy_name, name_hash, same_key_as_deployment
from core.pubsub import listen_forever

log = logging.getLogger("gateway.hitl")

FEED_CHANNEL = "gw:hitl:feed"
HELD_TTL_S = 90 * 86400
MAX_SUBSCRIBER_BACKLOG = 1000
# Open console streams per process, and per tenant of them (the super-admin's count as one tenant):
# each holds a queue of up to MAX_SUBSCRIBER_BACKLOG events, so their number is bounded too.
MAX_SUBSCRIBERS = 256
MAX_SUBSCRIBERS_PER_TENANT = 32


class FeedFull(Exception):
    """Too many console streams are open (in this process, or of this tenant)."""


# Delete the key only if it still names this escalation (a newer one may hold it).
_CLEAR = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


HELD_PREFIX = "gw:{gw}:hitl:held:"


def held_key(tenant: str, agent_id: str, conversation_id: str) -> str:
    """The hold's key: named by a keyed hash (a channel's conversation id holds the customer's
    number, which a plain hash gives back), made from the name an older release gave it
    (``legacy_held_key``) so that ``upgrade`` renames those without knowing the conversation."""
    return HELD_PREFIX + held_name(_legacy(tenant, agent_id, conversation_id))


def legacy_held_key(tenant: str, agent_id: str, conversation_id: str) -> str:
    """The hold's key as an older release named it (a plain hash): released, never read."""
    return HELD_PREFIX + _legacy(tenant, agent_id, conversation_id)


def _legacy(tenant: str, agent_id: str, conversation_id: str) -> str:
    return hashlib.blake2b(f"{tenant}\x00{agent_id}\x00{conversation_id}".encode(), digest_size=16).hexdigest()


def held_name(legacy: str) -> str:
    """The name ``held_key`` gives the hold an older release named ``legacy``."""
    return name_hash("gw-hitl-held", legacy)


UPGRADE_PAGE = 1000  # keys scanned per round trip by ``upgrade``
UPGRADE_DONE = "gw:{gw}:hitl:held-upgraded:v1"  # a pass renamed nothing: none made for a week


async def upgrade(redis) -> int:
    """The holds an older release named by a plain hash, renamed (``RENAME_UNLESS_SET``: their
    time to live kept), a page of keys at a time; at the start, before turns are served. Safe with
    several processes at once. Best effort: a hold of an open escalation left under its old name is
    put back under ours by the sweeper's repair (``sla.Sweeper``: from PostgreSQL), and ``release``
    releases both. How many were renamed."""
    renamed = 0
    try:
        await same_key_as_deployment(redis)  # (a process with another key: said in the log)
        if await redis.exists(UPGRADE_DONE):
            return 0
        async for key in redis.scan_iter(match=HELD_PREFIX + "*", count=UPGRADE_PAGE):
            name = (key.decode() if isinstance(key, bytes) else key)[len(HELD_PREFIX) :]
            if is_legacy_name(name):
                renamed += int(
                    await redis.eval(RENAME_UNLESS_SET, 2, HELD_PREFIX + name, HELD_PREFIX + held_name(name))
                )
        if not renamed:  # (no replica of the older release left writing them: not scanned again for a week)
            await redis.set(UPGRADE_DONE, "1", ex=7 * 86400)
    except Exception as exc:
        log.warning("holds not renamed yet (%s): released under both names meanwhile", type(exc).__name__)
    return renamed


class Holds:
    def __init__(self, redis, fast=None, timeout: float = 0.5) -> None:
        self._redis = redis
        self._fast = fast  # core.fastredis.PipelinedRedis: the turn's GET rides its pipeline
        self._timeout = timeout
        self._clear = redis.register_script(_CLEAR)

    async def get(self, tenant: str, agent_id: str, conversation_id: str) -> str | None:
        """The escalation holding the conversation, or None (also when Redis cannot answer:
        the turn then goes to the model, and says so in the log)."""
        key = held_key(tenant, agent_id, conversation_id)
        try:
            async with asyncio.timeout(self._timeout):
                if self._fast is not None:
                    value = await self._fast.execute("GET", key)
                else:
                    value = await self._redis.get(key)
        except Exception as exc:
            log.warning("held check failed (%s); the turn goes to the model", type(exc).__name__)
            return None
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    async def hold(self, tenant: str, agent_id: str, conversation_id: str, escalation_id: str) -> None:
        await self._redis.set(held_key(tenant, agent_id, conversation_id), escalation_id, ex=HELD_TTL_S)

    async def hold_many(self, rows, only_missing: bool = False) -> None:
        """(tenant, agent_id, conversation_id, escalation_id) of open escalations: keys put back."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for tenant, agent_id, conversation_id, escalation_id in rows:
                key = held_key(tenant, agent_id, conversation_id)
                pipe.set(key, escalation_id, ex=HELD_TTL_S, nx=only_missing)
                pipe.delete(legacy_held_key(tenant, agent_id, conversation_id))  # (put back under ours)
            await pipe.execute()

    async def release(self, tenant: str, agent_id: str, conversation_id: str, escalation_id: str) -> None:
        """The hold, if it still names this escalation (under the name an older release gave it
        too: ``upgrade`` may not have renamed it yet)."""
        await self._clear(keys=[held_key(tenant, agent_id, conversation_id)], args=[escalation_id])
        await self._clear(keys=[legacy_held_key(tenant, agent_id, conversation_id)], args=[escalation_id])


PENDING_KEY = "gw:{gw}:hitl:pending"
MAX_PENDING = 10_000


async def spool(redis, esc: dict) -> None:
    """An escalation PostgreSQL could not take on its turn, kept for the sweeper to open (the
    newest MAX_PENDING; the conversation is held once it is open). Stamped ``spooled_at`` (unix
    seconds, Redis's clock, as an erasure's ``erased_at``): the sweeper does not open it once its
    conversation was erased after that, or after its turn loaded the conversation (``since``, when
    the turn knows it: ``escalations.erased_since_time``; ``sla.Sweeper.open_spooled``)."""
    seconds, micros = await redis.time()
    esc = {**esc, "spooled_at": int(seconds) + int(micros) / 1_000_000}
    async with redis.pipeline(transaction=False) as pipe:
        pipe.rpush(PENDING_KEY, orjson.dumps(esc, default=str))
        pipe.ltrim(PENDING_KEY, -MAX_PENDING, -1)
        await pipe.execute()


async def unspool(redis) -> dict | None:
    """The oldest spooled escalation (popped: of several sweepers, one gets each)."""
    raw = await redis.lpop(PENDING_KEY)
    return orjson.loads(raw) if raw is not None else None


async def respool(redis, esc: dict) -> None:
    await redis.lpush(PENDING_KEY, orjson.dumps(esc, default=str))


DROP_PAGE = 100  # spooled escalations read per round trip when an erasure looks for its own


async def drop_spooled(redis, tenant: str, agent_ids: list[str], conversation_id: str) -> int:
    """Drops the spooled escalations of the tenant's conversation (of these agents): they keep its
    id and the customer's words, and the sweeper would open them after the erasure (one whose turn
    had no window, ``seq`` None, passes its ``erased_after`` check). Read a page at a time: a page
    starts after the last entry kept, found again by value (``LPOS``), as sweepers pop the list's
    head meanwhile; an entry a sweeper popped is its to check. The number dropped."""
    agents = set(agent_ids)
    dropped = 0
    after: bytes | None = None
    for _ in range(MAX_PENDING // DROP_PAGE + 2):  # (a list of MAX_PENDING at most; bounded anyway)
        start = 0
        if after is not None:
            pos = await redis.lpos(PENDING_KEY, after)
            start = pos + 1 if pos is not None else 0  # (popped: what was before it is gone too)
        page = await redis.lrange(PENDING_KEY, start, start + DROP_PAGE - 1)
        for raw in page:
            try:
                esc = orjson.loads(raw)
            except orjson.JSONDecodeError:
                esc = None
            if (
                isinstance(esc, dict)
                and esc.get("tenant") == tenant
                and isinstance(esc.get("agent_id"), str)
                and esc["agent_id"] in agents
                and esc.get("conversation_id") == conversation_id
            ):
                dropped += await redis.lrem(PENDING_KEY, 1, raw)
            else:
                after = raw
        if len(page) < DROP_PAGE:
            break
    return dropped


async def publish(redis, tenant: str, kind: str, row: dict | None = None, **extra) -> None:
    """One queue change for every replica's consoles (best effort: the queue is in PostgreSQL)."""
    event = {"type": kind, "tenant": tenant, "ts": time.time(), **extra}
    if row is not None:
        for k in ("id", "agent", "status", "team", "urgency", "base_priority", "claimed_by", "customer_messages"):
            if k in row:
                event[k] = row[k]
    try:
        await redis.publish(FEED_CHANNEL, orjson.dumps(event, default=str))
    except Exception as exc:
        log.warning("escalation feed publish failed: %s", type(exc).__name__)


class Feed:
    """This process's one subscription to the feed, fanned out to local subscribers."""

    def __init__(self, redis) -> None:
        self._redis = redis
        self._subscribers: dict[int, tuple[str | None, asyncio.Queue]] = {}
        self._task: asyncio.Task | None = None
        self.ready = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(
            listen_forever(self._redis, FEED_CHANNEL, self._on, self.ready.set), name="escalation-feed"
        )

    async def stop(self) -> None:
        await stop_task(self._task)
        self.close_streams()

    def close_streams(self) -> None:
        """Ends every console's stream (the process is stopping: they reconnect to another)."""
        for _, queue in list(self._subscribers.values()):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)

    def _on(self, data) -> None:
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        for tenant, queue in list(self._subscribers.values()):
            if tenant is not None and event.get("tenant") != tenant:
                continue
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(event)

    def has_room(self, tenant: str | None) -> bool:
        if len(self._subscribers) >= MAX_SUBSCRIBERS:
            return False
        return sum(1 for t, _ in self._subscribers.values() if t == tenant) < MAX_SUBSCRIBERS_PER_TENANT

    @contextlib.contextmanager
    def subscribe(self, tenant: str | None):
        """A queue of the events ``tenant`` may see (None: every tenant's, for the super-admin); a
        None in it means the process is stopping. ``FeedFull`` when no room is left."""
        if not self.has_room(tenant):
            raise FeedFull
        queue: asyncio.Queue = asyncio.Queue(MAX_SUBSCRIBER_BACKLOG)
        self._subscribers[id(queue)] = (tenant, queue)
        try:
            yield queue
        finally:
            self._subscribers.pop(id(queue), None)
