"""The authenticate stage: bearer key → Identity, from an in-process cache.

A key is looked up in PostgreSQL once (then cached); revocations reach every replica through
Redis pub/sub. If the subscription drops, the whole cache is flushed on reconnect, and a version
counter polled in the background catches anything missed.

A process can still miss a revocation (Redis down, a publish that failed), so a cached identity
has a bounded lifetime, ``server.key_cache_ttl`` (60 s by default): a key in use is looked up
again in the background shortly before that, and a key whose lifetime ran out is looked up
before it is served again. Key settings changed in the database (models, allowed_ips, ...)
take effect within the same bound.

When PostgreSQL cannot be reached for that look-up, the cached identity keeps working for
``server.key_cache_grace`` seconds more (300 s by default: a database blip must not take down
every key that happened to expire during it, and revocations still arrive by pub/sub meanwhile);
after that the key's requests are refused with 503 ``key_store_unavailable`` until the database
answers. A key not in the cache is refused with the same 503 while the database is down: it
cannot be checked, so it is not served.

Unauthenticated load is bounded: unknown keys are remembered for a while (a negative cache with
LRU eviction and a TTL, never dropped wholesale because it grew), and failed look-ups are limited
per client address (IPv6: per /64) — beyond ``server.failed_auth_burst`` at
``server.failed_auth_per_minute`` an address gets 429 without a database query. Known keys
(cached) never count and are never refused by it, and one address's failures never limit
another's, so an attacker cannot lock a legitimate key out from elsewhere.

``authenticate_scope`` adds the IP allow-lists: the key's own (``allowed_ips`` in its metadata)
and its tenant's (``tenants.<name>.allowed_ips``), both of which must admit the client address
(X-Forwarded-For believed only from ``server.trusted_proxies``); refusal is 403 ``ip_not_allowed``.
The master key is the super-admin, of no tenant: tenant lists do not apply to it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import time
from collections import OrderedDict
from ipaddress import ip_network

import asyncpg

from core.background import stop_tasks
from core.errors import PermissionDenied, RateLimited, ServiceUnavailable, Unauthenticated
from core.http import Address, address_in, client_address, header, parse_networks
from core.pubsub import listen_forever
from core.types import Identity
from policies.keys import KEYS_VERSION, REVOKE_CHANNEL, find_active, hash_key

log = logging.getLogger("gateway.auth")

_NEGATIVE_TTL = 60.0  # keys are random: an unknown one does not become valid, short of creation
_NEGATIVE_MAX = 50_000
_VERSION_POLL = 5.0
_REFRESH_AHEAD = 0.8  # a key in use is looked up again in the background at 80 % of its lifetime
_LOOKUP_TIMEOUT = 5.0  # seconds for one key look-up in PostgreSQL
_DOWN_RETRY = 1.0  # after a failed look-up, the database is not asked again for this long
_MAX_TOKEN = 4096  # longer bearer tokens are refused unhashed (keys are ~50 characters)
_MAX_ADDRESSES = 100_000  # client addresses whose failures are remembered (LRU)
_NOWHERE = (ip_network("255.255.255.255/32"),)  # a key's unreadable allow-list admits nobody

MISSING_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)


def _redact(token: str) -> str:
    return f"{token[:6]}***{token[-4:]}" if len(token) > 12 else "***"


def _allowed_ips(key_id: str, values) -> tuple:
    if not values:
        return ()
    if not isinstance(values, list):
        values = [values]
    nets = []
    for value in values:
        try:
            nets.extend(parse_networks([value]))
        except ValueError:
            log.error("key %s: ignoring an unreadable allowed_ips entry", key_id)
    return tuple(nets) or _NOWHERE  # fail closed: never "any address" by accident


def _identity(row) -> Identity:
    from core.config import Limit

    meta = row["metadata"]
    if isinstance(meta, str):
        meta = json.loads(meta)
    meta = meta or {}
    limits = meta.get("limits")
    return Identity(
        key_id=row["id"],
        name=row["name"],
        tenant=row["tenant"],
        require_tags=frozenset(meta.get("require_tags") or ()),
        limits=Limit(**limits) if isinstance(limits, dict) else None,
        models=frozenset(meta.get("models") or ()),
        scopes=frozenset(meta.get("scopes") or ()),
        expires_at=meta.get("expires_at"),
        pii_policy=meta.get("pii_policy"),
        allowed_ips=_allowed_ips(row["id"], meta.get("allowed_ips")),
        attribution=meta.get("attribution") or None,
        shared_limits=_shared_limits(meta.get("shared_limits")),
    )


def _shared_limits(value) -> tuple:
    """((key id, config.Limit or None: the default key limit), ...) from the metadata minting
    wrote; unreadable entries skipped."""
    from core.config import Limit

    out = []
    for item in value if isinstance(value, list) else ():
        if isinstance(item, dict) and isinstance(item.get("key"), str):
            if item.get("default") is True:  # the default key limit, as configured when served
                out.append((item["key"], None))
                continue
            rpm, tpm = item.get("rpm") or 0, item.get("tpm") or 0
            if isinstance(rpm, int) and isinstance(tpm, int) and (rpm > 0 or tpm > 0):
                out.append((item["key"], Limit(rpm=rpm, tpm=tpm)))
    return tuple(out)


class _Cached:
    """A cached identity and its lifetime (monotonic seconds)."""

    __slots__ = ("check_at", "fresh_until", "ident", "stale_until", "warned")

    def __init__(self, ident: Identity, now: float, ttl: float, grace: float) -> None:
        self.ident = ident
        self.check_at = now + ttl * _REFRESH_AHEAD  # before this: served without a second look
        self.fresh_until = now + ttl
        self.stale_until = now + ttl + grace  # the database unreachable: served until this
        self.warned = False


class FailedAuthLimiter:
    """Failed authentications per client address, in process: a GCRA (one float per address),
    so ``burst`` failures pass at once and then one per ``60 / per_minute`` seconds. Addresses
    are remembered LRU up to a bound; IPv6 addresses count per /64 (one customer's subnet)."""

    def __init__(self, per_minute: int, burst: int, max_addresses: int = _MAX_ADDRESSES) -> None:
        self.enabled = per_minute > 0
        self._interval = 60.0 / per_minute if per_minute else 0.0
        self._tolerance = self._interval * (burst - 1)
        self._max = max_addresses
        self._tat: OrderedDict[object, float] = OrderedDict()

    @staticmethod
    def bucket(addr: Address | None) -> object:
        if addr is None:
            return "unknown"
        return addr if addr.version == 4 else addr.packed[:8]

    def retry_after(self, bucket: object) -> float:
        """Seconds until this address may fail again; 0 when it may now."""
        tat = self._tat.get(bucket)
        if tat is None:
            return 0.0
        wait = tat - self._tolerance - time.monotonic()
        return wait if wait > 0 else 0.0

    def failed(self, bucket: object) -> None:
        now = time.monotonic()
        tat = self._tat.get(bucket, now)
        self._tat[bucket] = (tat if tat > now else now) + self._interval
        self._tat.move_to_end(bucket)
        if len(self._tat) > self._max:
            self._tat.popitem(last=False)


class Authenticator:
    def __init__(self, pool: asyncpg.Pool, redis, master_key: str | None, config=None) -> None:
        from core.config import Config

        config = config or Config()
        server = config.server
        self._pool = pool
        self._redis = redis
        self._master = hashlib.sha256(master_key.encode()).digest() if master_key else None
        self._ttl = server.key_cache_ttl
        self._grace = server.key_cache_grace
        self._trusted = parse_networks(server.trusted_proxies)
        self._tenant_ips = {name: parse_networks(t.allowed_ips) for name, t in config.tenants.items() if t.allowed_ips}
        self.limiter = FailedAuthLimiter(server.failed_auth_per_minute, server.failed_auth_burst)
        self._cache: dict[str, _Cached] = {}
        self._negative: OrderedDict[str, float] = OrderedDict()
        self._pending: dict[str, asyncio.Future] = {}
        self._refreshing: set[asyncio.Task] = set()
        self._tasks: list[asyncio.Task] = []
        self._version: bytes | None = None
        self._epoch = 0  # bumped by every invalidation, so a lookup can tell it raced one
        self._down_until = 0.0  # monotonic: the last look-up failed; do not ask again before this
        self.master_identity = Identity(key_id="master", name="master", is_master=True)

    def client_address(self, scope: dict) -> str | None:
        """The caller's address as logs record it (X-Forwarded-For from trusted proxies only)."""
        addr = client_address(scope, self._trusted)
        return str(addr) if addr is not None else None

    async def start(self) -> None:
        self._version = await self._redis.get(KEYS_VERSION)
        self._tasks = [
            asyncio.create_task(self._listen(), name="auth-revocations"),
            asyncio.create_task(self._poll_version(), name="auth-version"),
        ]

    async def stop(self) -> None:
        await stop_tasks([*self._tasks, *self._refreshing])

    def invalidate(self, key_hash: str | None = None) -> None:
        self._epoch += 1
        if key_hash is None:
            self._cache.clear()
        else:
            self._cache.pop(key_hash, None)

    # ---- the stage ---------------------------------------------------------------------------
    async def authenticate_scope(self, scope: dict) -> Identity:
        """The caller's identity for an HTTP request (the API and the admin API alike): its bearer
        key, then the key's and its tenant's IP allow-lists against the client address."""
        ident = await self.authenticate(header(scope, b"authorization"), scope)
        if ident.allowed_ips or (self._tenant_ips and not ident.is_master and ident.tenant in self._tenant_ips):
            self.check_address(ident, scope)
        return ident

    def check_address(self, ident: Identity, scope: dict) -> None:
        addr = client_address(scope, self._trusted)
        for nets in (ident.allowed_ips, () if ident.is_master else self._tenant_ips.get(ident.tenant, ())):
            if nets and (addr is None or not address_in(addr, nets)):
                where = f"address {addr}" if addr is not None else "an unknown address"
                raise PermissionDenied(f"This API key may not be used from {where}.", code="ip_not_allowed")

    async def authenticate(self, authorization: bytes | None, scope: dict | None = None) -> Identity:
        """The identity of a bearer key. ``scope`` (the HTTP request) gives the client address
        that failed look-ups are counted against; without it they are not limited."""
        if not authorization:
            raise Unauthenticated(MISSING_KEY, code=None)
        scheme, _, token = authorization.decode("latin-1").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated(MISSING_KEY, code=None)
        if len(token) > _MAX_TOKEN:
            raise Unauthenticated("Incorrect API key provided: the key is far too long.")
        if self._master is not None and hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self._master):
            return self.master_identity
        key_hash = hash_key(token)
        entry = self._cache.get(key_hash)
        if entry is None:
            ident = await self._lookup(key_hash, scope)
        elif time.monotonic() < entry.check_at:
            ident = entry.ident
        else:
            ident = await self._recheck(key_hash, entry)
        if ident is not None and ident.expires_at is not None and ident.expires_at <= time.time():
            raise Unauthenticated(f"API key {_redact(token)} has expired.", code="expired_api_key")
        if ident is None:
            raise Unauthenticated(
                f"Incorrect API key provided: {_redact(token)}. Check the key, or create one "
                "with `gateway keys create`."
            )
        return ident

    # ---- look-ups ------------------------------------------------------------------------------
    async def _lookup(self, key_hash: str, scope: dict | None) -> Identity | None:
        """A key not in the cache: unknown (negative cache), or asked of PostgreSQL — unless its
        address failed too often already."""
        now = time.monotonic()
        expires = self._negative.get(key_hash)
        if expires is not None:
            if expires > now:
                self._negative.move_to_end(key_hash)
                return None
            del self._negative[key_hash]
        pending = self._pending.get(key_hash)
        if pending is not None:  # one query per key, however many requests wait on it
            return await asyncio.shield(pending)
        bucket = None
        if scope is not None and self.limiter.enabled:
            bucket = self.limiter.bucket(client_address(scope, self._trusted))
            wait = self.limiter.retry_after(bucket)
            if wait > 0:
                retry = str(max(1, math.ceil(wait)))
                raise RateLimited(
                    f"Too many failed authentication attempts from your address. Retry after {retry} s.",
                    code="too_many_failed_authentications",
                    headers={"retry-after": retry},
                )
        ident = await self._fetch(key_hash)
        if ident is None and bucket is not None:
            self.limiter.failed(bucket)
        return ident

    async def _recheck(self, key_hash: str, entry: _Cached) -> Identity | None:
        """A cached key near or past the end of its lifetime."""
        now = time.monotonic()
        if now < entry.fresh_until:  # still fresh: look it up again in the background
            entry.check_at = entry.fresh_until
            if key_hash not in self._pending:
                task = asyncio.create_task(self._refresh(key_hash), name="auth-refresh")
                self._refreshing.add(task)
                task.add_done_callback(self._refreshing.discard)
            return entry.ident
        try:
            return await self._fetch(key_hash)
        except ServiceUnavailable:
            if now >= entry.stale_until:
                raise
            # Within the grace: serve what we knew, and ask the database again a little later.
            entry.check_at = min(now + _DOWN_RETRY, entry.stale_until)
            if not entry.warned:
                entry.warned = True
                log.warning(
                    "key store unreachable; serving a cached key for up to %.0f s more",
                    entry.stale_until - now,
                    extra={"fields": {"key_id": entry.ident.key_id}},
                )
            return entry.ident

    async def _refresh(self, key_hash: str) -> None:
        try:
            await self._fetch(key_hash)
        except ServiceUnavailable:
            pass  # the look-up at the end of the lifetime tries again (and applies the grace)

    async def _fetch(self, key_hash: str) -> Identity | None:
        """One PostgreSQL query per key however many requests wait on it; updates the caches.
        Raises ServiceUnavailable when the database cannot answer."""
        pending = self._pending.get(key_hash)
        if pending is not None:
            return await asyncio.shield(pending)
        if time.monotonic() < self._down_until:
            raise _store_unavailable()
        fut = asyncio.get_running_loop().create_future()
        self._pending[key_hash] = fut
        epoch = self._epoch
        try:
            try:
                row = await asyncio.wait_for(find_active(self._pool, key_hash), _LOOKUP_TIMEOUT)
            except Exception as exc:  # unreachable, timed out, refused: the key cannot be checked
                self._down_until = time.monotonic() + _DOWN_RETRY
                log.warning("key look-up failed: %s", type(exc).__name__)
                raise _store_unavailable() from None
            ident = _identity(row) if row else None
            now = time.monotonic()
            if ident is None:
                self._cache.pop(key_hash, None)
                self._negative[key_hash] = now + _NEGATIVE_TTL
                self._negative.move_to_end(key_hash)
                if len(self._negative) > _NEGATIVE_MAX:
                    self._negative.popitem(last=False)
            elif epoch == self._epoch:  # no revocation raced the query
                self._cache[key_hash] = _Cached(ident, now, self._ttl, self._grace)
            fut.set_result(ident)
            return ident
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved
            raise
        finally:
            del self._pending[key_hash]

    # ---- revocations -------------------------------------------------------------------------
    async def _listen(self) -> None:
        def revoked(data) -> None:
            self.invalidate(data.decode() if isinstance(data, bytes) else data)

        # after a (re)subscription anything may have been missed: start from an empty cache
        await listen_forever(self._redis, REVOKE_CHANNEL, revoked, self.invalidate)

    async def _poll_version(self) -> None:
        while True:
            await asyncio.sleep(_VERSION_POLL)
            try:
                version = await self._redis.get(KEYS_VERSION)
            except asyncio.CancelledError:
                raise
            except Exception:
                continue
            if version != self._version:
                self._version = version
                self.invalidate()


def _store_unavailable() -> ServiceUnavailable:
    return ServiceUnavailable(
        "The gateway cannot check API keys right now; try again shortly.",
        code="key_store_unavailable",
        headers={"retry-after": "1"},
    )
