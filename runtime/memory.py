"""Conversation memory: the recent window in Redis, every message durably in PostgreSQL.

A conversation is (tenant, agent id, the caller's conversation id). Its recent messages are a
Redis list (entries ``{"s": seq, "t": tokens, "m": message}``) that expires after the agent's
``memory.ttl_s`` of silence; a counter beside it hands out message numbers (INCRBY), so two
replicas storing turns of one conversation at once never collide.

- ``load`` is one LRANGE. The window sent back is cut at turn boundaries only (a user message
  starts a turn): a tool call stays with its result and an assistant message with the user
  message it answered. When Redis holds nothing — a new conversation, or one expired or
  evicted — the window is read from PostgreSQL (the one PostgreSQL query an agent turn can
  make, on that cache miss only) and Redis is warmed again.
- ``append`` is one Lua call: number the messages, push them, trim to a hard cap, refresh the
  TTL, and append the turn to a Redis stream, all at once. A ``StreamWriter`` moves the
  stream into PostgreSQL in batches (ack after commit; a replayed batch inserts nothing twice,
  since (conversation, seq) is unique).

What a turn stores is the caller's choice (``append(messages)``); the agent stage should pass
the user message(s) of the turn, then the assistant and tool messages of its server-side tool
steps, then the final answer. Keeping the tool steps lets the next turn see what the tools
returned (no second lookup, no answer contradicting the first), and the human who takes a
conversation over sees the whole of it; the window cut keeps them with their turn. System and
developer messages are not stored: the agent's prompt supplies the system message afresh.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Iterable, Iterator

import asyncpg
import orjson
from redis.exceptions import NoScriptError, RedisError

from core.errors import InvalidRequest
from core.tokens import count_prompt
from runtime import conversations
from runtime.runs import StreamWriter
from runtime.types import Agent, MemorySettings

log = logging.getLogger("gateway.memory")

MEMORY_STREAM = "gw:{gw}:memory"
MEMORY_GROUP = "memory-writers"
MAX_CONVERSATION_ID = 256  # characters of the caller's conversation id
MAX_APPEND = 256  # messages stored by one turn
SEQ_GRACE_S = 86_400  # the seq counter outlives the window by this much
_KEPT = ("role", "content", "name", "tool_calls", "tool_call_id", "refusal")
_NOT_STORED = ("system", "developer")

# Number, push, trim, refresh, and queue for PostgreSQL, in one step. KEYS: window, seq,
# stream. ARGV: ttl, seq ttl, cap, the turn's stream record, then (tokens, message JSON) pairs.
_APPEND = """
local n = (#ARGV - 4) / 2
local last = redis.call('INCRBY', KEYS[2], n)
local first = last - n + 1
local items = {}
for i = 1, n do
  local seq = string.format('%d', first + i - 1)
  items[i] = '{"s":' .. seq .. ',"t":' .. ARGV[3 + 2 * i] .. ',"m":' .. ARGV[4 + 2 * i] .. '}'
end
redis.call('RPUSH', KEYS[1], unpack(items))
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[3]), -1)
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('XADD', KEYS[3], '*', 'r', ARGV[4], 's', first)
return first
"""

# Put back what PostgreSQL holds in front of whatever the list holds now (a turn stored
# meanwhile stays after it), and never let the counter fall below the stored seqs.
# KEYS: window, seq. ARGV: ttl, seq ttl, cap, max seq, then (seq, entry) pairs oldest first.
_REWARM = """
local head = redis.call('LINDEX', KEYS[1], 0)
local before = math.huge
if head then before = tonumber(cjson.decode(head)['s']) end
local pushed = 0
for i = #ARGV - 1, 5, -2 do
  if tonumber(ARGV[i]) < before then
    redis.call('LPUSH', KEYS[1], ARGV[i + 1])
    pushed = pushed + 1
  end
end
if pushed > 0 then
  redis.call('LTRIM', KEYS[1], -tonumber(ARGV[3]), -1)
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
local cur = tonumber(redis.call('GET', KEYS[2]) or '0')
if cur < tonumber(ARGV[4]) then redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[2]) end
return pushed
"""


class MemoryUnavailable(Exception):
    """Memory could not be read or stored; the turn answers without it. ``reason`` is short
    and safe to record (a store and an exception class, never content)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check_conversation_id(conversation_id: object, param: str = "metadata.conversation_id") -> str:
    if not isinstance(conversation_id, str) or not conversation_id or len(conversation_id) > MAX_CONVERSATION_ID:
        raise InvalidRequest(f"'{param}' must be a string of 1 to {MAX_CONVERSATION_ID} characters", param=param)
    if "\x00" in conversation_id:
        raise InvalidRequest(f"'{param}' must not contain NUL", param=param)
    return conversation_id


def keys(tenant: str, agent_id: str, conversation_id: str) -> tuple[str, str]:
    """The window list and seq counter of one conversation. Hashed: the caller's id is any text."""
    digest = hashlib.blake2b(f"{tenant}\x00{agent_id}\x00{conversation_id}".encode(), digest_size=16).hexdigest()
    return f"gw:{{gw}}:mem:{digest}", f"gw:{{gw}}:mem:{digest}:seq"


def list_cap(settings: MemorySettings) -> int:
    """How many messages the Redis list keeps: room for the window with its tool steps."""
    return min(2000, max(64, settings.window_turns * 10))


def clean_message(message: dict) -> dict:
    """The parts of an OpenAI message worth sending back to a model."""
    return {k: message[k] for k in _KEPT if message.get(k) is not None}


def message_tokens(message: dict) -> int:
    return count_prompt({"messages": [message]}) - 3


class Window(list):
    """The messages of a window, oldest first (a list); ``tokens[i]`` is the token count of
    ``self[i]`` as ``core.tokens.count_prompt`` counts a message, so a turn's prompt is counted
    without tokenizing its history again (``known``)."""

    tokens: list[int]

    def known(self) -> dict[int, tuple[dict, int]]:
        return {id(m): (m, t) for m, t in zip(self, self.tokens, strict=True)}


def window(entries: Iterable[tuple[int, dict]], settings: MemorySettings) -> Window:
    """The most recent whole turns of (tokens, message) entries, oldest first, within
    ``window_turns`` and ``window_tokens``. Messages before the first user message (their turn
    began before what is kept) are never sent."""
    return _cut(reversed(list(entries)), settings)


def _cut(newest_first: Iterable[tuple[int, dict]], settings: MemorySettings) -> Window:
    """``window`` over entries given newest first; it stops taking them once the window is full,
    so a lazy source (``newest_window``'s decoding) does no work for older ones."""
    kept: list[tuple[list[dict], list[int], bool]] = []  # newest turn first
    messages: list[dict] = []  # the turn being read, newest message first
    counts: list[int] = []
    tools = False
    budget = settings.window_tokens
    total = 0
    for tokens, message in newest_first:
        role = message.get("role")
        messages.append(message)
        counts.append(int(tokens))
        total += int(tokens)
        if role == "tool" or message.get("tool_calls"):
            tools = True
        if role != "user":
            continue
        if len(kept) >= settings.window_turns or total > budget:
            break
        budget -= total
        messages.reverse()
        counts.reverse()
        kept.append((messages, counts, tools))
        messages, counts, tools, total = [], [], False, 0
    out = Window()
    out.tokens = []
    last = len(kept) - 1
    for i, (turn, turn_counts, has_tools) in enumerate(reversed(kept)):
        if not has_tools:  # nothing to repair: no tool call or result in the turn
            out.extend(turn)
            out.tokens.extend(turn_counts)
            continue
        original = {id(m): t for m, t in zip(turn, turn_counts, strict=True)}
        for m in _repair(turn, last=i == last):
            out.append(m)
            out.tokens.append(original[id(m)] if id(m) in original else message_tokens(m))
    return out


def _repair(turn: list[dict], *, last: bool) -> list[dict]:
    """A turn a model will accept: tool messages answer a call made before them in the turn,
    and an assistant's tool calls are all answered (except at the very end of the window: a
    client tool whose result the client is about to send)."""
    answered = {m.get("tool_call_id") for m in turn if m.get("role") == "tool"}
    called: set = set()
    out = []
    for index, message in enumerate(turn):
        calls = message.get("tool_calls") if message.get("role") == "assistant" else None
        if calls and not (last and index == len(turn) - 1):
            kept = [c for c in calls if isinstance(c, dict) and c.get("id") in answered]
            if len(kept) != len(calls):
                message = {k: v for k, v in message.items() if k != "tool_calls"}
                if kept:
                    message["tool_calls"] = kept
                elif not message.get("content"):
                    continue
            calls = kept
        if calls:
            called.update(c.get("id") for c in calls if isinstance(c, dict))
        if message.get("role") == "tool" and message.get("tool_call_id") not in called:
            continue
        out.append(message)
    return out


def tail_size(settings: MemorySettings) -> int:
    """How many of the newest list entries a load reads: three messages a turn on average
    (user, tool call, tool result or answer), never more than the list keeps."""
    return min(list_cap(settings), max(16, settings.window_turns * 3))


def newest_window(raw: list[bytes], settings: MemorySettings) -> Window:
    """``window`` over stored entries (oldest first), decoding from the newest back and only
    while the window can still take a turn: the same messages, at a fraction of the work, since
    the list holds more than a window and the older entries would be cut anyway."""
    return _cut(_decoded_newest_first(raw), settings)


def _decoded_newest_first(raw: list[bytes]) -> Iterator[tuple[int, dict]]:
    for entry in reversed(raw):
        try:
            decoded = orjson.loads(entry)
            tokens, message = int(decoded["t"]), decoded["m"]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            message = None
        if not isinstance(message, dict):
            log.warning("memory: an unreadable window entry was skipped")
            continue
        yield tokens, message


def _decode(raw: list[bytes]) -> list[tuple[int, dict]]:
    out = []
    for entry in raw:
        try:
            decoded = orjson.loads(entry)
            out.append((int(decoded["t"]), decoded["m"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("memory: an unreadable window entry was skipped")
    return out


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
    ) -> None:
        self._pool = pool
        self._redis = redis
        # The two round trips of a turn (load, append) over the pipelined hiredis client when the
        # composition passes one (core.fastredis): redis-py's asyncio client cost more CPU per
        # call than the rest of the memory work together (make bench, --only agents).
        self._fast = fast
        self._append_sha: str | None = None
        self._timeout = timeout  # one Redis call on the request path
        self._db_timeout = db_timeout  # the reload from PostgreSQL on a cache miss
        self._append = redis.register_script(_APPEND)
        self._rewarm = redis.register_script(_REWARM)
        # ``reader``: the stream writer's own pipelined connection (it blocks on its reads)
        self.writer = StreamWriter(
            redis, pool, stream=MEMORY_STREAM, group=MEMORY_GROUP, write=conversations.write_turns, batch=batch,
            claim_idle=claim_idle, fast=reader,
        )  # fmt: skip

    async def start(self) -> None:
        if self._fast is not None:
            self._append_sha = await self._fast.script_load(_APPEND)
        await self.writer.start()

    async def _fast_append(self, keys: list[str], args: list) -> None:
        try:
            await self._fast.evalsha(self._append_sha, len(keys), *keys, *args, limit_s=self._timeout)
        except NoScriptError:  # the server restarted and forgot the script
            self._append_sha = await self._fast.script_load(_APPEND)
            await self._fast.evalsha(self._append_sha, len(keys), *keys, *args, limit_s=self._timeout)

    async def stop(self) -> None:
        """Writes what this process stored (and left pending) to PostgreSQL; bounded in time."""
        await self.writer.stop()

    async def load(self, tenant: str, agent: Agent, conversation_id: str) -> list[dict]:
        """The recent window of the conversation, oldest first, ready to follow the system prompt."""
        window_key, seq_key = keys(tenant, agent.id, conversation_id)
        # Only the tail the window can use: the list holds room for tool steps, but a turn is
        # read back only while it fits, so decoding all of it is wasted work.
        start = -tail_size(agent.memory)
        try:
            if self._fast is not None:  # its own per-call timer: no asyncio.timeout per call
                raw = await self._fast.execute("LRANGE", window_key, start, -1, limit_s=self._timeout)
            else:
                async with asyncio.timeout(self._timeout):
                    raw = await self._redis.lrange(window_key, start, -1)
        except (RedisError, OSError, TimeoutError) as exc:
            raise MemoryUnavailable(f"redis: {type(exc).__name__}") from None
        if raw:
            return newest_window(raw, agent.memory)
        return await self._reload(tenant, agent, conversation_id, window_key, seq_key)

    async def _reload(self, tenant: str, agent: Agent, conversation_id: str, window_key: str, seq_key: str):
        """Redis has nothing: a new conversation, or one whose window expired or was evicted."""
        cap = list_cap(agent.memory)
        try:
            rows = await asyncio.wait_for(
                conversations.recent(self._pool, tenant, agent.id, conversation_id, cap), self._db_timeout
            )
        except (asyncpg.PostgresError, OSError, TimeoutError, asyncpg.InterfaceError) as exc:
            raise MemoryUnavailable(f"database: {type(exc).__name__}") from None
        if not rows:
            return window((), agent.memory)
        entries = [(seq, message_tokens(message), message) for seq, message in rows]
        args: list = [agent.memory.ttl_s, agent.memory.ttl_s + SEQ_GRACE_S, cap, rows[-1][0]]
        for seq, tokens, message in entries:
            args += [seq, orjson.dumps({"s": seq, "t": tokens, "m": message})]
        try:
            await asyncio.wait_for(self._rewarm(keys=[window_key, seq_key], args=args), self._timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("memory: window read from PostgreSQL but not put back in Redis: %s", type(exc).__name__)
        return window(((t, m) for _, t, m in entries), agent.memory)

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
    ) -> None:
        """Stores one turn's messages, in order (one Redis round trip; PostgreSQL follows)."""
        stored = [clean_message(m) for m in messages if isinstance(m, dict) and m.get("role") not in _NOT_STORED]
        if len(stored) > MAX_APPEND:
            stored = stored[-MAX_APPEND:]
            while stored and stored[0].get("role") != "user":
                stored.pop(0)
            log.warning("memory: a turn of more than %d messages kept its last whole part", MAX_APPEND)
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
            "messages": stored,
        }
        args: list = [agent.memory.ttl_s, agent.memory.ttl_s + SEQ_GRACE_S, list_cap(agent.memory)]
        try:
            args.append(orjson.dumps(record))
            for message in stored:
                args += [message_tokens(message), orjson.dumps(message)]
        except (orjson.JSONEncodeError, TypeError) as exc:
            raise MemoryUnavailable(f"unstorable message: {type(exc).__name__}") from None
        window_key, seq_key = keys(tenant, agent.id, conversation_id)
        try:
            if self._fast is not None:
                await self._fast_append([window_key, seq_key, MEMORY_STREAM], args)
            else:
                async with asyncio.timeout(self._timeout):
                    await self._append(keys=[window_key, seq_key, MEMORY_STREAM], args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            raise MemoryUnavailable(f"redis: {type(exc).__name__}") from None

    async def history(self, tenant: str | None, agent_id: str, external_id: str, limit: int = 100) -> list[dict]:
        """What PostgreSQL holds of the conversation: its last ``limit`` messages, oldest first
        (``tenant`` None: the super-admin). Messages stored in the last moment may not be there yet."""
        return await conversations.history(self._pool, tenant, agent_id, external_id, max(1, min(limit, 1000)))

    async def conversation(self, tenant: str | None, agent_id: str, external_id: str) -> dict | None:
        return await conversations.conversation(self._pool, tenant, agent_id, external_id)

    async def flush(self) -> int:
        """Writes what the stream holds to PostgreSQL now (tests, shutdown)."""
        return await self.writer.drain()
