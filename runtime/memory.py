"""Conversation memory: the recent window in Redis, every message durably in PostgreSQL.

A conversation is (tenant, agent id, the caller's conversation id). Its recent messages are a
Redis list (entries ``{"s": seq, "t": tokens, "m": message}``) that expires after the agent's
``memory.ttl_s`` of silence; a counter beside it hands out message numbers (INCRBY), so two
replicas storing turns of one conversation at once never collide.

- ``load`` is one round trip. The window sent back is cut at turn boundaries only (a user
  message starts a turn): a tool call stays with its result and an assistant message with the
  user message it answered. Beside the list, Redis keeps the window itself, cut and encoded as
  one value (``…:w``, ``{"n": last seq, "x": its stream entry id, "c": settings, "t": tokens,
  "m": messages}``): a load
  decodes that one value and cuts nothing, while its ``n`` is still the list's last message.
  Without it (another writer's turn, a settings change, a window over ``MAX_WINDOW_BYTES``, a
  list evicted alone) the load reads the list's tail and cuts it. A process holds the stored
  windows it last stored or read, decoded (``runtime.memory_held``, bounded): the load tells
  the script the ``n`` and ``x`` it holds, and while the stored window is still that one (an
  entry id is never handed out twice; a seq is, once an erased conversation's counter is gone)
  the script answers a marker instead of it — after the erasure check, as
  always — and nothing is sent or decoded. When Redis
  holds nothing — a new conversation, or one expired or evicted — the window is read from
  PostgreSQL (the one PostgreSQL query an agent turn can make, on that cache miss only) and
  Redis is warmed again.
- ``append`` is one Lua call: number the messages, push them, trim to a hard cap, refresh the
  TTL, append the turn to a Redis stream, and store the new window — only if the list's last
  message is still the one the turn's window was loaded with (``Window.seq``); else the stored
  window is deleted, since it would miss a turn stored meanwhile (a compare-and-set). A seq is
  never handed out twice, even when Redis lost the counter (see ``_APPEND``). A
  ``StreamWriter`` moves the stream into PostgreSQL in batches (ack after commit; a replayed
  batch inserts nothing twice, since (conversation, seq) is unique).

What a turn stores is the caller's choice (``append(messages)``); the agent stage should pass
the user message(s) of the turn, then the assistant and tool messages of its server-side tool
steps, then the final answer. Keeping the tool steps lets the next turn see what the tools
returned (no second lookup, no answer contradicting the first), and the human who takes a
conversation over sees the whole of it; the window cut keeps them with their turn. System and
developer messages are not stored: the agent's prompt supplies the system message afresh.

The window's cut and its encoding are ``runtime.memory_window``'s; the Lua scripts
``runtime.memory_scripts``'.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import re
import time
from pathlib import Path

import asyncpg
import orjson
from redis.exceptions import NoScriptError, RedisError

from core.erasure_key import mark_micros
from core.errors import InvalidRequest
from core.stream_writer import StreamWriter
from runtime import conversations
from runtime.memory_held import HeldWindows
from runtime.memory_scripts import APPEND as _APPEND
from runtime.memory_scripts import FORGET as _FORGET
from runtime.memory_scripts import LOAD as _LOAD
from runtime.memory_scripts import REWARM as _REWARM
from runtime.memory_window import (
    Window,
    _next_window,  # noqa: F401  (the bench's)
    clean_message,
    fingerprint,
    list_cap,
    message_tokens,
    newest_window,
    next_stored,
    stored_window,
    tail_size,
    window,
)
from runtime.types import Agent

log = logging.getLogger("gateway.memory")

MEMORY_STREAM = "gw:{gw}:memory"
MEMORY_GROUP = "memory-writers"
MAX_CONVERSATION_ID = 256  # characters of the caller's conversation id
MAX_APPEND = 256  # messages stored by one turn
COUNT_ON_LOOP_BYTES = 16 * 1024  # a turn's messages larger than this are tokenized off the event loop
SEQ_GRACE_S = 86_400  # the seq counter outlives the window by this much
ERASED_MARK_S = 60  # an erased conversation's window is not re-warmed from a read older than this
ERASED_SEQ_MIN_S = 3600  # a turn that loaded an erased conversation is not stored for at least this long
HOLDING_PAGE = 500  # agents whose Redis state of one conversation ``holding`` asks for per round trip
_NOT_STORED = ("system", "developer")


class Erased(Exception):
    """The turn was queued before its conversation's erasure (``erased``: the mark is at or after
    its queue time): it is the erased conversation's, and nothing of it is read or stored."""


class MemoryUnavailable(Exception):
    """Memory could not be read or stored; the turn answers without it. ``reason`` is short
    and safe to record (a store and an exception class, never content)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ErasureUnknown(MemoryUnavailable):
    """``load`` with ``erased``: Redis failed before the erasure mark was read, so whether the
    conversation was erased since the turn was queued is unknown (the turn is not answered)."""


def check_conversation_id(conversation_id: object, param: str = "metadata.conversation_id") -> str:
    if not isinstance(conversation_id, str) or not conversation_id or len(conversation_id) > MAX_CONVERSATION_ID:
        raise InvalidRequest(f"'{param}' must be a string of 1 to {MAX_CONVERSATION_ID} characters", param=param)
    if "\x00" in conversation_id:
        raise InvalidRequest(f"'{param}' must not contain NUL", param=param)
    return conversation_id


def conversation_tag(tenant: str, agent_id: str, conversation_id: str) -> str:
    """One conversation, hashed (the caller's id is any text, and may be personal data)."""
    return hashlib.blake2b(f"{tenant}\x00{agent_id}\x00{conversation_id}".encode(), digest_size=16).hexdigest()


_HELD_TAG = re.compile(rb'\{"n":(\d+),"x":"(\d+-\d+)"')


def _held_tag(raw: bytes) -> str | None:
    """A stored window's ``n/x`` (``runtime.memory_held``), None when it has no ``x``."""
    found = _HELD_TAG.match(raw)
    return None if found is None else f"{found[1].decode()}/{found[2].decode()}"


@functools.lru_cache(maxsize=4096)  # (a turn asks twice: load, append; a conversation's turns follow)
def keys(tenant: str, agent_id: str, conversation_id: str) -> tuple[str, str]:
    """The window list and seq counter of one conversation. Hashed: the caller's id is any text.
    (The stored window is the list's key and ``:w``.)"""
    digest = conversation_tag(tenant, agent_id, conversation_id)
    return f"gw:{{gw}}:mem:{digest}", f"gw:{{gw}}:mem:{digest}:seq"


def dead_tag(record: dict) -> str | None:
    """The conversation of a turn the memory writer moved to the dead letters (its stream entry's
    fields), by which an erasure or a retention finds it; None when the turn is unreadable. The
    record may come cut (``StreamWriter._tag_older_dead``): its conversation comes before its
    messages (``append``'s record), so what precedes them is read alone then."""
    raw = record.get(b"r")
    if not isinstance(raw, bytes):
        return None
    for text in (raw, raw.split(b',"messages":', 1)[0] + b"}"):
        try:
            turn = orjson.loads(text)
            return conversation_tag(turn["tenant"], turn["agent_id"], turn["external_id"])
        except (KeyError, TypeError, orjson.JSONDecodeError):
            continue
    return None


def _bounded(stored: list[dict]) -> list[dict]:
    """A turn of more than ``MAX_APPEND`` messages (a long tools loop): its user messages up to the
    first other one (what the customer said starts the turn: a window keeps turns from a user
    message on), then its newest messages from an assistant message on, within ``MAX_APPEND``.
    Tool steps in the middle are dropped; a result whose call was dropped is cut at load
    (``_repair``), so the model never sees an unanswered call or a stray result."""
    head: list[dict] = []
    for message in stored:
        if message.get("role") != "user" or len(head) >= MAX_APPEND // 2:
            break
        head.append(message)
    tail = stored[len(head) :][-(MAX_APPEND - len(head)) :]
    while tail and tail[0].get("role") != "assistant":
        tail.pop(0)
    return [*head, *tail] if head else tail


def erasure_mark(tenant: str, agent_id: str, conversation_id: str) -> str:
    """The Redis key of the conversation's last erasure time ("seconds.µs", Redis's clock, kept
    ``ERASED_SEQ_MIN_S`` at least): the mark ``append``'s ``erased`` takes for a conversation no
    channel marks (an API client's)."""
    return f"{keys(tenant, agent_id, conversation_id)[0]}:erased:at"


async def erasure_mark_us(redis, tenant: str, agent_id: str, conversation_id: str) -> int | None:
    """``erasure_mark``'s time in µs; None: not erased lately."""
    mark = await redis.get(erasure_mark(tenant, agent_id, conversation_id))
    return None if mark is None else mark_micros(mark)


async def erased_after(redis, tenant: str, agent_id: str, conversation_id: str, seq: object) -> bool:
    """Whether the conversation was erased after a turn loaded its window ending at ``seq``
    (``Window.seq``; 0, None or no number: an empty or unknown window, never): what the turn
    brings (an escalation, a spooled one) would keep the erased conversation's words."""
    if type(seq) is not int or seq <= 0:
        return False
    window_key, _ = keys(tenant, agent_id, conversation_id)
    erased = await redis.get(f"{window_key}:erased:seq")
    return erased is not None and seq <= int(erased)


class Memory:
    def __init__(
        self,
        pool: asyncpg.Pool,
        redis,
        *,
        timeout: float = 1.0,
        db_timeout: float = 2.0,
        batch: int = 500,
        claim_idle: float = 15.0,
        fast=None,
        reader=None,
        spill_dir: Path | None = None,
    ) -> None:
        self._pool = pool
        self._redis = redis
        # The two round trips of a turn (load, append) over the pipelined hiredis client when the
        # composition passes one (core.fastredis; ``stop`` closes it): redis-py's asyncio client
        # cost more CPU per call than the rest of the memory work together (make bench, agents).
        self._fast = fast
        self._append_sha: str | None = None
        self._load_sha: str | None = None
        self._timeout = timeout  # one Redis call on the request path
        self._db_timeout = db_timeout  # the reload from PostgreSQL on a cache miss
        self._append = redis.register_script(_APPEND)
        self._load = redis.register_script(_LOAD)
        self._rewarm = redis.register_script(_REWARM)
        self._forget = redis.register_script(_FORGET)
        # the stored windows this process last stored or read, per conversation (``memory_held``)
        self.held = HeldWindows()
        # ``reader``: the stream writer's own pipelined connection (it blocks on its reads)
        self.writer = StreamWriter(
            redis, pool, stream=MEMORY_STREAM, group=MEMORY_GROUP, write=conversations.write_turns, batch=batch,
            claim_idle=claim_idle, fast=reader, spill_dir=spill_dir, dead_tag=dead_tag,
        )  # fmt: skip

    async def start(self) -> None:
        """Loads the scripts, starts the writer; a start that fails closes the pipelined client
        (its stop is not run: only parts that started are stopped)."""
        try:
            if self._fast is not None:
                self._append_sha = await self._fast.script_load(_APPEND)
                self._load_sha = await self._fast.script_load(_LOAD)
            await self.writer.start()
        except BaseException:
            if self._fast is not None:
                await self._fast.close()
            raise

    async def _script(self, name: str, keys: list[str], args: list):
        """``_APPEND`` or ``_LOAD`` over the pipelined client (one call, its own timer), else
        redis-py's script object under a timeout."""
        if self._fast is None:
            async with asyncio.timeout(self._timeout):
                return await (self._append if name == "append" else self._load)(keys=keys, args=args)
        attr, source = ("_append_sha", _APPEND) if name == "append" else ("_load_sha", _LOAD)
        try:
            return await self._fast.evalsha(getattr(self, attr), len(keys), *keys, *args, limit_s=self._timeout)
        except NoScriptError:  # the server restarted and forgot the script
            setattr(self, attr, await self._fast.script_load(source))
            return await self._fast.evalsha(getattr(self, attr), len(keys), *keys, *args, limit_s=self._timeout)

    async def stop(self) -> None:
        """Writes what this process stored (and left pending) to PostgreSQL; bounded in time."""
        await self.writer.stop()
        if self._fast is not None:
            await self._fast.close()

    async def load(
        self, tenant: str, agent: Agent, conversation_id: str, *, erased: tuple[str, int] | None = None
    ) -> list[dict]:
        """The recent window of the conversation, oldest first, ready to follow the system prompt.
        ``erased``: (the Redis key of the conversation's erasure mark, "seconds.µs" on Redis's
        clock; the turn's queue time, µs on that clock), read in the same round trip: ``Erased``
        when the mark is at or after the queue time."""
        window_key, seq_key = keys(tenant, agent.id, conversation_id)
        # The stored window, else only the tail the window can use: the list holds room for
        # tool steps, but a turn is read back only while it fits, so decoding all of it is
        # wasted work.
        start = -tail_size(agent.memory)
        cut_for = fingerprint(agent.memory)
        held = self.held.get(window_key, cut_for)
        script_keys = [window_key, f"{window_key}:w"]
        args: list = [start, "", "" if held is None else held.tag]
        if erased is not None:
            script_keys.append(erased[0])
            args[1] = erased[1]
        try:
            raw = await self._script("load", script_keys, args)
        except (RedisError, OSError, TimeoutError) as exc:
            cls = MemoryUnavailable if erased is None else ErasureUnknown
            raise cls(f"redis: {type(exc).__name__}") from None
        try:
            if raw == -3:
                self.held.drop(window_key)
                raise Erased()
            if raw == -4 and held is not None:  # the stored window is still the one held
                return self.held.window(window_key, held)
            if isinstance(raw, bytes):
                stored = stored_window(raw, agent.memory)
                if stored is not None:
                    tag = _held_tag(raw)
                    if tag is not None:
                        self.held.put(window_key, stored.seq, tag, cut_for, stored, len(raw))
                    else:  # (an older release's, without its entry id: not told apart, not held)
                        self.held.drop(window_key)
                    return stored
                raw = await self._list_tail(window_key, start)  # cut for other settings: rare
        except (RedisError, OSError, TimeoutError) as exc:
            raise MemoryUnavailable(f"redis: {type(exc).__name__}") from None
        self.held.drop(window_key)
        if raw and type(raw) is not int:
            return newest_window(raw, agent.memory)
        since = raw if type(raw) is int else None  # (nothing in Redis: the read's time)
        return await self._reload(tenant, agent, conversation_id, window_key, seq_key, since)

    async def _list_tail(self, window_key: str, start: int) -> list[bytes]:
        if self._fast is not None:
            return await self._fast.execute("LRANGE", window_key, start, -1, limit_s=self._timeout)
        async with asyncio.timeout(self._timeout):
            return await self._redis.lrange(window_key, start, -1)

    async def _reload(
        self, tenant: str, agent: Agent, conversation_id: str, window_key: str, seq_key: str, since: int | None
    ) -> Window:
        """Redis has nothing: a new conversation, or one whose window expired or was evicted.
        ``since``: Redis's time when it had nothing (``Window.since``)."""
        cap = list_cap(agent.memory)
        try:
            rows = await asyncio.wait_for(
                conversations.recent(self._pool, tenant, agent.id, conversation_id, cap), self._db_timeout
            )
        except (asyncpg.PostgresError, OSError, TimeoutError, asyncpg.InterfaceError) as exc:
            raise MemoryUnavailable(f"database: {type(exc).__name__}") from None
        if not rows:
            empty = window((), agent.memory)
            empty.seq = 0
            empty.since = since
            return empty
        entries = [(seq, message_tokens(message), message) for seq, message in rows]
        args: list = [agent.memory.ttl_s, agent.memory.ttl_s + SEQ_GRACE_S, cap, rows[-1][0]]
        for seq, tokens, message in entries:
            args += [seq, orjson.dumps({"s": seq, "t": tokens, "m": message})]
        try:
            rewarm = self._rewarm(keys=[window_key, seq_key, f"{window_key}:erased"], args=args)
            await asyncio.wait_for(rewarm, self._timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("memory: window read from PostgreSQL but not put back in Redis: %s", type(exc).__name__)
        out = window(((t, m) for _, t, m in entries), agent.memory)
        out.seq = rows[-1][0]  # the list's last, unless a turn was stored meanwhile (then no match)
        out.since = since
        return out

    async def append(
        self,
        tenant: str,
        agent: Agent,
        conversation_id: str,
        messages: list[dict],
        *,
        request_id: str,
        prompt_version: int,
        variant: str | None,
        base: Window | None = None,
        erased: tuple[str, int] | None = None,
    ) -> None:
        """Stores one turn's messages, in order (one Redis round trip; PostgreSQL follows).
        ``base``: the window the turn was answered with (``load``'s); with it the new window is
        stored too, unless another turn was stored since ``base`` was read. ``erased``: as
        ``load``'s; a turn whose conversation was erased since it was queued stores nothing
        (``Erased``): an erasure that came while it was answered, its first turn too. Without it,
        a turn whose ``base`` found the conversation empty (``Window.since``) is held to the
        conversation's own erasure time the same way; ``erasure_mark`` names that mark for a
        caller with a time of its own (a person's reply)."""
        stored = [clean_message(m) for m in messages if isinstance(m, dict) and m.get("role") not in _NOT_STORED]
        if len(stored) > MAX_APPEND:
            stored = _bounded(stored)
            log.warning("memory: a turn of more than %d messages kept its user messages and its end", MAX_APPEND)
        if not stored:
            return
        record = {
            "tenant": tenant,
            "agent_id": agent.id,
            "external_id": conversation_id,
            "request_id": request_id,
            "prompt_version": prompt_version,
            "variant": variant,
            "ts": time.time(),
        }
        args: list = [agent.memory.ttl_s, agent.memory.ttl_s + SEQ_GRACE_S, list_cap(agent.memory)]
        pairs: list = []
        try:
            encoded = [orjson.dumps(m) for m in stored]
            # the record, its messages last (``dead_tag`` reads what precedes them): joined, not encoded again
            args.append(b'%s,"messages":[%s]}' % (orjson.dumps(record)[:-1], b",".join(encoded)))
            if sum(map(len, encoded)) <= COUNT_ON_LOOP_BYTES:
                counts = [message_tokens(m) for m in stored]
            else:  # (a large message takes long to tokenize: ~0.5 s for 6 MB)
                counts = await asyncio.to_thread(lambda: [message_tokens(m) for m in stored])
            counted = list(zip(counts, stored, strict=True))
            for tokens, raw in zip(counts, encoded, strict=True):
                pairs += [tokens, raw]
            window_args, new_window = next_stored(base, counted, encoded, agent.memory)
            args += window_args
        except (orjson.JSONEncodeError, TypeError) as exc:
            raise MemoryUnavailable(f"unstorable message: {type(exc).__name__}") from None
        window_key, seq_key = keys(tenant, agent.id, conversation_id)
        script_keys = [window_key, seq_key, MEMORY_STREAM, f"{window_key}:w", f"{window_key}:erased:seq"]
        queued: object = ""
        if erased is not None:
            script_keys.append(erased[0])
            queued = erased[1]
        elif base is not None and base.since is not None:  # (it found the conversation empty: a first turn)
            script_keys.append(f"{window_key}:erased:at")
            queued = base.since
        # The window's seq is a floor: the conversation had reached it when the turn began.
        floor = base.seq if base is not None and base.seq is not None else ""
        self.held.drop(window_key)  # (whatever happens now, the stored window is this turn's or none)
        try:
            first = await self._script("append", script_keys, [*args, floor, queued, *pairs])
            if first == -1:  # no counter, no list: PostgreSQL knows how far the seqs went
                floor = await self._stored_seq(tenant, agent.id, conversation_id)
                first = await self._script("append", script_keys, [*args, floor, queued, *pairs])
        except (RedisError, OSError, TimeoutError) as exc:
            raise MemoryUnavailable(f"redis: {type(exc).__name__}") from None
        if type(first) is list:  # (first seq, whether the new window was stored, the stream entry id)
            first, kept, entry = int(first[0]), first[1] == 1, first[2]
            if kept and new_window is not None:
                last = first + len(stored) - 1
                tag = f"{last}/{entry.decode() if isinstance(entry, bytes) else entry}"
                self.held.put(window_key, last, tag, fingerprint(agent.memory), new_window, len(window_args[1]))
        if first == -3:
            log.info("memory: a turn queued before its conversation's erasure was not stored")
            raise Erased()
        if first == -2:
            log.info("memory: a turn that loaded a conversation erased since was not stored")

    async def _stored_seq(self, tenant: str, agent_id: str, conversation_id: str) -> int:
        try:
            return await asyncio.wait_for(
                conversations.last_seq(self._pool, tenant, agent_id, conversation_id), self._db_timeout
            )
        except (asyncpg.PostgresError, OSError, TimeoutError, asyncpg.InterfaceError) as exc:
            raise MemoryUnavailable(f"database: {type(exc).__name__}") from None

    async def forget_recent(self, tenant: str, agent_id: str, conversation_id: str) -> tuple[int, float]:
        """Drops what Redis holds of the conversation (its window and stored window), for
        ``ERASED_MARK_S`` keeps a reload that began before this from putting it back, and keeps a
        turn that loaded the conversation before this from storing itself after it (for as long
        as the seq counter lives, ``ERASED_SEQ_MIN_S`` at least). Returns the number of messages
        Redis had handed out since the last erasure (0: none) and Redis's clock then (unix
        seconds: turns stored before it are stamped earlier)."""
        window_key, seq_key = keys(tenant, agent_id, conversation_id)
        self.held.drop(window_key)  # (another process's is dropped by Redis: its stored window is gone)
        forget_keys = [
            window_key,
            seq_key,
            f"{window_key}:w",
            f"{window_key}:erased",
            f"{window_key}:erased:seq",
            f"{window_key}:erased:at",
        ]
        async with asyncio.timeout(self._timeout * 5):
            last, sec, usec = await self._forget(keys=forget_keys, args=[ERASED_MARK_S, ERASED_SEQ_MIN_S])
        return int(last or 0), int(sec) + int(usec) / 1e6

    async def erased_since(
        self, tenant: str, agent_id: str, conversation_id: str, seq: int | None, *, strict: bool = False
    ) -> bool:
        """``erased_after`` (below) under this memory's timeout; Redis away: False (what asks
        goes on as it did before erasures were known), or raised when ``strict`` (what asks
        must then count every erasure)."""
        try:
            async with asyncio.timeout(self._timeout):
                return await erased_after(self._redis, tenant, agent_id, conversation_id, seq)
        except (RedisError, OSError, TimeoutError):
            if strict:
                raise
            return False

    async def holding(self, tenant: str, agent_ids: list[str], conversation_id: str) -> list[str]:
        """Those of the agents that Redis holds the conversation of (its window, or the seq counter
        a turn stored in the last ``memory.ttl_s`` + ``SEQ_GRACE_S`` left): an agent whose turn
        is still on its way to PostgreSQL is known here before it is there. A page of agents per
        round trip."""
        found: list[str] = []
        for i in range(0, len(agent_ids), HOLDING_PAGE):
            page = agent_ids[i : i + HOLDING_PAGE]
            async with asyncio.timeout(self._timeout * 5):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for agent_id in page:
                        pipe.exists(*keys(tenant, agent_id, conversation_id))
                    counts = await pipe.execute()
            found += [agent_id for agent_id, n in zip(page, counts, strict=True) if n]
        return found

    async def forget_many(self, tenant: str, agent_id: str, conversation_ids: list[str]) -> None:
        """``forget_recent`` of several conversations of one agent (a retention's batch: in the
        background, one short call after the other)."""
        for conversation_id in conversation_ids:
            await self.forget_recent(tenant, agent_id, conversation_id)

    async def drop_dead_letters(self, tenant: str, conversations_of: list[tuple[str, str]]) -> int:
        """Drops the memory dead letters (turns PostgreSQL refused, kept whole for a retry) of the
        (agent id, conversation id) pairs; the number dropped."""
        tags = {conversation_tag(tenant, agent_id, c) for agent_id, c in conversations_of}
        async with asyncio.timeout(self._timeout * 30):
            return await self.writer.drop_dead_tagged(tags)

    async def history(self, tenant: str | None, agent_id: str, external_id: str, limit: int = 100) -> list[dict]:
        """What PostgreSQL holds of the conversation: its last ``limit`` messages, oldest first
        (``tenant`` None: the super-admin). Messages stored in the last moment may not be there yet."""
        return await conversations.history(self._pool, tenant, agent_id, external_id, max(1, min(limit, 1000)))

    async def conversation(self, tenant: str | None, agent_id: str, external_id: str) -> dict | None:
        return await conversations.conversation(self._pool, tenant, agent_id, external_id)

    async def flush(self) -> int:
        """Writes what the stream holds to PostgreSQL now (tests, shutdown)."""
        return await self.writer.drain()
