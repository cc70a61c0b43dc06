"""``Idempotency-Key`` on ``POST /v1/chat/completions``: a request repeated with the same key gets
the first one's answer again instead of a second model call.

A client that may send a request twice (a channel worker that died between the gateway's answer
and its own acknowledgement, an SDK retrying after a timeout) names it with a header
``Idempotency-Key`` (or ``x-gateway-idempotency-key``): 1-255 printable ASCII characters. The
key is scoped to the caller's API key: the Redis key is a hash of the API key's id and the
client's value (the client's value is never a key by itself, and two API keys never share one).

- The first request claims the key (``SET NX`` of an in-progress marker holding a hash of the
  request body; it lasts ``server.idempotency_lock_s``, so a process that died mid-request frees
  it) and runs through the pipeline as any other.
- On a 2xx answer the response (status, headers, body) is stored for
  ``server.idempotency_ttl_s`` — before its last byte goes to the client, so a client that heard
  the end always finds it stored. Anything else (4xx, 5xx, a broken stream, an answer over
  ``MAX_STORED_BYTES``) releases the key: a retry runs again. A tenant's stored answers together
  hold at most ``server.idempotency_max_bytes_per_tenant`` of Redis (default 256 MB): storing
  past it deletes that tenant's oldest answers first (their retries run again, as after the ttl);
  Redis's memory, which budgets and rate limits need, is not one busy client's to fill.
- A repeat with the same key and the same body (the same JSON, whatever its layout) gets the stored response with
  ``x-gateway-idempotent-replay: true``: no model call, no budget, no memory, no ledger record;
  it counts in the caller's requests-per-minute windows (key, minting keys, tenant) like any request.
- A repeat while the first is in progress: 409 (``idempotency_key_in_use``, ``retry-after: 1``).
  A request running longer than its claim loses it: a repeat then claims the key and runs, and
  the first one's answer is not stored over the repeat's claim (compare-and-set), so every
  replay gets one answer.
- The same key with another body, or other ``x-gateway-*`` headers: 422 naming the header
  (``idempotency_key_reused``).

Streaming (``"stream": true``) works the same way: the completed stream's events are stored as
they were sent (only when it ended with ``data: [DONE]``) and a replay sends them again, as a
stream. Without the header nothing here runs: no Redis round trip is added to a request.
"""

from __future__ import annotations

import hashlib
import logging
import secrets

import orjson
from prometheus_client import Counter

from core import http, queued_proof
from core.errors import GatewayError, InvalidRequest, ServiceUnavailable
from core.fastredis import PipelinedRedis
from core.metrics import _Children

log = logging.getLogger("gateway")

HEADERS = {b"idempotency-key": "Idempotency-Key", b"x-gateway-idempotency-key": "x-gateway-idempotency-key"}
MAX_KEY_CHARS = 255
MAX_STORED_BYTES = 4 * 1024 * 1024  # a longer answer is not kept (the key is released)
REPLAY_HEADER = (b"x-gateway-idempotent-replay", b"true")
_QUEUED = queued_proof.HEADER.encode()
_DONE = b"data: [DONE]\n\n"
# not stored: they are the request's own (a replay gets fresh ones) or computed again
_SKIP = frozenset({b"x-request-id", b"x-client-request-id", b"content-length", b"retry-after"})

OUTCOMES = Counter(
    "gateway_idempotency_total",
    "Chat requests with an Idempotency-Key by outcome: stored, replayed, in_progress, mismatch, released, "
    "claim_lost, over_bound; and stored answers evicted for a tenant's byte bound (evicted)",
    ["outcome"],
)
_outcomes = _Children(OUTCOMES)

# KEYS: the key. ARGV: the marker this request set. Deletes the key only while it holds it.
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_RELEASE_SHA = hashlib.sha1(_RELEASE.encode()).hexdigest()
# KEYS: the key, the tenant's index of stored answers (a sorted set: "<bytes>:<key>" scored by
# its expiry on Redis's clock), the tenant's byte count, optionally the agent conversation's index
# (the same members, scored alike, for its erasure: ``forget_conversation``). ARGV: the marker this request set, the
# answer, its ttl, the tenant's byte bound.
# Stores the answer while the key holds the marker, or nothing (the claim expired and no one took
# it: the answer is still the only one): a request that outlived its claim
# (``idempotency_lock_s``) while a repeat claimed the key again must not overwrite what the
# repeat holds. The tenant's stored answers are bounded in bytes: expired ones leave the index
# (at most 100 a call), then the oldest live ones are deleted (at most 100) until the new one
# fits; if it still does not, it is not stored (-1) and the key is released by the caller. One
# larger than the bound is refused before anything is evicted. The count and the index expire
# together, and the count is 0 without an index (no bytes counted for answers no longer in it).
# Returns the number of answers evicted (0 or more), -1, or nil.
_STORE = """
local v = redis.call('GET', KEYS[1])
if v ~= ARGV[1] and v then return false end
local size, ttl, cap = #ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
if size > cap then return -1 end
local now = tonumber(redis.call('TIME')[1])
local used = 0
if redis.call('EXISTS', KEYS[2]) == 1 then used = tonumber(redis.call('GET', KEYS[3]) or '0') end
local function forget(member)
  used = used - tonumber(string.match(member, '^(%d+):'))
  redis.call('ZREM', KEYS[2], member)
end
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 100)) do forget(member) end
-- the index and the count live as long as the longest-lived answer in them (another process
-- may store with a shorter ttl)
local function keep(name)
  if redis.call('TTL', name) < ttl then redis.call('EXPIRE', name, ttl) end
end
local evicted = 0
while used + size > cap and evicted < 100 do
  local found = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  local oldest = found[1]
  if not oldest then break end
  local key = string.sub(oldest, #string.match(oldest, '^%d+:') + 1)
  -- an expired entry's key, if it holds an answer, holds a newer one (the key used again)
  if tonumber(found[2]) > now and redis.call('GETRANGE', key, 0, 0) == 'D' then redis.call('DEL', key) end
  forget(oldest)
  evicted = evicted + 1
end
if used < 0 then used = 0 end
if used + size > cap then
  redis.call('SET', KEYS[3], used, 'KEEPTTL')
  keep(KEYS[3])
  keep(KEYS[2])
  return -1
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ttl)
local member = size .. ':' .. KEYS[1]
if not redis.call('ZSCORE', KEYS[2], member) then used = used + size end
redis.call('ZADD', KEYS[2], now + ttl, member)
keep(KEYS[2])
redis.call('SET', KEYS[3], used, 'KEEPTTL')
keep(KEYS[3])
if KEYS[4] then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  redis.call('ZADD', KEYS[4], now + ttl, member)
  local over = redis.call('ZCARD', KEYS[4]) - MAX_CONVERSATION_ANSWERS
  if over > 0 then redis.call('ZREMRANGEBYRANK', KEYS[4], 0, over - 1) end
  keep(KEYS[4])
end
return evicted
"""
# An agent conversation's index holds the answers stored for it that have not expired (scored by
# expiry, like the tenant's), at most this many (the newest): a client sending a conversation's
# turns with fresh keys grew it without end, and an erasure read it whole in one script.
MAX_CONVERSATION_ANSWERS = 10_000
_STORE = _STORE.replace("MAX_CONVERSATION_ANSWERS", str(MAX_CONVERSATION_ANSWERS))
_STORE_SHA = hashlib.sha1(_STORE.encode()).hexdigest()

# An agent conversation erased: its stored answers deleted, and their bytes taken off the
# tenant's count. KEYS: the conversation's index, the tenant's index, the tenant's byte count.
# Returns the number of answers deleted.
_FORGET_CONVERSATION = """
local used = tonumber(redis.call('GET', KEYS[3]) or '0')
local dropped = 0
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(redis.call('TIME')[1]))
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local prefix = string.match(member, '^%d+:')
  if prefix then
    local key = string.sub(member, #prefix + 1)
    if redis.call('ZREM', KEYS[2], member) == 1 then used = used - tonumber(string.sub(prefix, 1, -2)) end
    if redis.call('GETRANGE', key, 0, 0) == 'D' then dropped = dropped + redis.call('DEL', key) end
  end
end
if used < 0 then used = 0 end
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('SET', KEYS[3], used, 'KEEPTTL') end
redis.call('DEL', KEYS[1])
return dropped
"""
_FORGET_CONVERSATION_SHA = hashlib.sha1(_FORGET_CONVERSATION.encode()).hexdigest()


def _tenant_key(tenant: str) -> str:
    return "gw:{gw}:idem-tenant:" + hashlib.sha256(tenant.encode()).hexdigest()[:32]


def conversation_index(tenant: str, agent: str, conversation_id: str) -> str:
    """The set of an agent conversation's stored answers (hashed: the id is the caller's)."""
    digest = hashlib.sha256(f"{tenant}\0{agent}\0{conversation_id}".encode("utf-8", "surrogatepass")).hexdigest()
    return "gw:{gw}:idem-conv:" + digest[:32]


def _agent_conversation(raw: bytes, scope: dict) -> tuple[str, str] | None:
    """(agent name, conversation id) of an agent turn's body (``model`` ``agent:<name>[@…]``, the
    id in ``x-gateway-conversation`` (the last one sent) or ``metadata.conversation_id``, as the
    agent stage reads them), else None. Unchecked: it only names an index an erasure will look up."""
    if b'"agent:' not in raw:
        return None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model, str) or not model.startswith("agent:"):
        return None
    header = {k: v for k, v in scope["headers"] if k == b"x-gateway-conversation"}.get(b"x-gateway-conversation")
    meta = body.get("metadata")
    conversation = (
        header.decode("latin-1") if header else meta.get("conversation_id") if isinstance(meta, dict) else None
    )
    if not isinstance(conversation, str) or not conversation:
        return None
    return model[len("agent:") :].partition("@")[0], conversation


class KeyInUse(GatewayError):
    status = 409
    type = "invalid_request_error"
    default_code = "idempotency_key_in_use"


class KeyReused(GatewayError):
    status = 422
    type = "invalid_request_error"
    default_code = "idempotency_key_reused"


def requested(scope: dict) -> tuple[str, bytes] | None:
    """(header name, value) when the request carries an idempotency key; one pass over headers."""
    found = None
    for name, value in scope["headers"]:
        if name in HEADERS:
            if found is not None and found[1] != value:
                raise InvalidRequest(
                    "Idempotency-Key and x-gateway-idempotency-key disagree; send one.", param="Idempotency-Key"
                )
            found = (HEADERS[name], value)
    return found


def _check(name: str, value: bytes) -> bytes:
    value = value.strip()
    if not 0 < len(value) <= MAX_KEY_CHARS or not all(0x20 <= c < 0x7F for c in value):
        raise InvalidRequest(
            f"The {name} header must be 1-{MAX_KEY_CHARS} printable ASCII characters.",
            param=name,
            code="invalid_idempotency_key",
        )
    return value


def _body_digest(raw: bytes, scope: dict | None = None) -> str:
    """The body's JSON in a canonical form (key order, spacing), so a client library that lays
    out the same request differently still matches; bytes as they are when it is not JSON.
    With the request's ``x-gateway-*`` headers (sorted; not the idempotency key's own): they
    shape the answer as the body does (the conversation whose memory an agent reads, routing
    constraints, attribution), so a request that differs only in them is another request. Not
    ``x-gateway-queued-at`` (``core.queued_proof``): it answers or refuses the turn, shaping
    nothing, and a turn first tried by a worker that sent none (before an upgrade) is the same."""
    try:
        raw = orjson.dumps(orjson.loads(raw), option=orjson.OPT_SORT_KEYS)
    except orjson.JSONDecodeError:
        pass
    digest = hashlib.sha256(raw)
    if scope is not None:
        shaping = sorted(
            (name, value)
            for name, value in scope["headers"]
            if name.startswith(b"x-gateway-") and name not in HEADERS and name != _QUEUED
        )
        for name, value in shaping:  # none: the digest of the body alone
            digest.update(b"\0%s\0%s" % (name, value))
    return digest.hexdigest()


class Idempotency:
    """One per process: its own pipelined Redis connection (opened on first use)."""

    def __init__(self, redis_url: str, server_config) -> None:
        self._redis = PipelinedRedis(redis_url, timeout=5)
        self._config = server_config

    async def close(self) -> None:
        await self._redis.close()

    async def run(self, svc, header: tuple[str, bytes], scope, receive, send, rid: str, crid, pipeline) -> None:
        """Runs ``pipeline(receive, send)`` at most once per (API key, idempotency key)."""
        name, value = header
        try:
            ident = await svc.auth.authenticate_scope(scope)
        except GatewayError:  # refused (and audited) as any request is; nothing claimed
            await pipeline(receive, send)
            return
        value = _check(name, value)
        raw = await http.read_body(scope, receive, svc.config.server.max_body_bytes)
        digest = _body_digest(raw, scope)
        key = "gw:{gw}:idem:" + hashlib.sha256(ident.key_id.encode() + b"\0" + value).hexdigest()
        tenant = _tenant_key(ident.tenant)
        turn = _agent_conversation(raw, scope)
        index = conversation_index(ident.tenant, *turn) if turn is not None else None
        marker = b"P" + orjson.dumps({"h": digest, "t": secrets.token_hex(8)})
        lock = max(1, int(self._config.idempotency_lock_s))
        try:
            existing = await self._redis.execute("SET", key, marker, "NX", "GET", "EX", lock)
        except Exception as exc:
            log.warning("idempotency key not claimed: %s", type(exc).__name__)
            raise ServiceUnavailable("Idempotency keys cannot be checked right now; retry later.") from None
        if existing is not None:
            await self._answer_repeat(existing, digest, name, send, rid, crid, lambda: svc.policies.admit_replay(ident))
            return

        sent = False

        async def replay_receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        recorder = _Recorder(self, key, tenant, marker, send, index)
        try:
            await pipeline(replay_receive, recorder.send)
        except BaseException:
            if not recorder.finished:
                await self._release(key, marker)
            raise
        if not recorder.finished:  # the pipeline returned without a last body message
            await self._release(key, marker)

    async def _answer_repeat(self, existing: bytes, digest: str, name: str, send, rid: str, crid, admit) -> None:
        kind, rest = existing[:1], existing[1:]
        if kind == b"P":
            meta = orjson.loads(rest)
            if meta.get("h") != digest:
                _outcomes.get("mismatch").inc()
                raise KeyReused(f"This {name} was used with another request body.", param=name)
            _outcomes.get("in_progress").inc()
            message = f"A request with this {name} is still in progress; retry later."
            raise KeyInUse(message, param=name, headers={"retry-after": "1"})
        head, _, body = rest.partition(b"\n")
        meta = orjson.loads(head)
        if meta.get("h") != digest:
            _outcomes.get("mismatch").inc()
            raise KeyReused(f"This {name} was used with another request body.", param=name)
        await admit()  # a replay counts in the caller's request windows (429 when full), costs nothing
        _outcomes.get("replayed").inc()
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in meta["hd"]]
        headers.append((b"x-request-id", rid.encode()))
        if crid is not None:
            headers.append((b"x-client-request-id", crid.encode()))
        if not meta.get("stream"):
            headers.append((b"content-length", str(len(body)).encode()))
        headers.append(REPLAY_HEADER)
        await send({"type": "http.response.start", "status": int(meta["s"]), "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _store(
        self,
        key: str,
        tenant: str,
        marker: bytes,
        digest: str,
        status: int,
        headers: list,
        stream: bool,
        body: bytes,
        index: str | None = None,
    ) -> None:
        meta = {
            "h": digest,
            "s": status,
            "stream": stream,
            "hd": [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers if k.lower() not in _SKIP],
        }
        value = b"D" + orjson.dumps(meta) + b"\n" + body
        ttl = max(1, int(self._config.idempotency_ttl_s))
        keys = (
            (3, key, tenant + ":index", tenant + ":bytes")
            if index is None
            else (4, key, tenant + ":index", tenant + ":bytes", index)
        )
        args = (marker, value, ttl, int(self._config.idempotency_max_bytes_per_tenant) or 2**53)  # 0: no bound
        try:
            stored = await self._redis.run_script(_STORE, _STORE_SHA, *keys, *args)
        except Exception as exc:  # the claim expires on its own; the answer still goes out
            log.warning("idempotent response not stored: %s", type(exc).__name__)
            return
        if stored is None:  # the claim had expired and was taken again: that request's answer stands
            log.warning("idempotent response not stored: its claim expired (server.idempotency_lock_s)")
            _outcomes.get("claim_lost").inc()
            return
        if stored == -1:  # the tenant's stored answers are at their bound, even after evicting
            log.warning("idempotent response not stored: the tenant's stored answers are at their bound")
            _outcomes.get("over_bound").inc()
            await self._release(key, marker)
            return
        if stored:
            _outcomes.get("evicted").inc(stored)
        _outcomes.get("stored").inc()

    async def forget_conversation(self, tenant: str, agent: str, conversation_id: str) -> int:
        """Deletes the answers stored for replays of an agent conversation's turns (its erasure);
        the number deleted. A turn in flight stores its answer when it ends."""
        keys = (
            conversation_index(tenant, agent, conversation_id),
            *(_tenant_key(tenant) + s for s in (":index", ":bytes")),
        )
        return int(await self._redis.run_script(_FORGET_CONVERSATION, _FORGET_CONVERSATION_SHA, 3, *keys) or 0)

    async def _release(self, key: str, marker: bytes) -> None:
        _outcomes.get("released").inc()
        try:
            await self._redis.run_script(_RELEASE, _RELEASE_SHA, 1, key, marker)
        except Exception as exc:  # the claim expires on its own (idempotency_lock_s)
            log.warning("idempotency key not released: %s", type(exc).__name__)


class _Recorder:
    """Passes the response through, keeping a copy; at its last message stores it (2xx, complete,
    small enough) or releases the key, before the client gets that last message."""

    def __init__(self, owner: Idempotency, key: str, tenant: str, marker: bytes, send, index: str | None = None):
        self.owner = owner
        self.key = key
        self.tenant = tenant
        self.marker = marker
        self.index = index  # the agent conversation's index of stored answers (None: not an agent turn)
        self._send = send
        self.status = 0
        self.headers: list = []
        self.stream = False
        self.chunks: list[bytes] = []
        self.size = 0
        self.finished = False

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            self.headers = list(message.get("headers") or ())
            self.stream = any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in self.headers)
        elif message["type"] == "http.response.body":
            body = message.get("body", b"")
            if body and self.size <= MAX_STORED_BYTES:
                self.chunks.append(body)
                self.size += len(body)
            if not message.get("more_body", False) and not self.finished:
                self.finished = True
                await self._finish()
        await self._send(message)

    async def _finish(self) -> None:
        body = b"".join(self.chunks)
        ok = 200 <= self.status < 300 and self.size <= MAX_STORED_BYTES
        if ok and self.stream:
            ok = body.endswith(_DONE)
        if ok:
            digest = orjson.loads(self.marker[1:])["h"]
            await self.owner._store(
                self.key, self.tenant, self.marker, digest, self.status, self.headers, self.stream, body, self.index
            )
        else:
            await self.owner._release(self.key, self.marker)
