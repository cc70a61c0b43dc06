"""The authenticate stage: bearer key → Identity, from an in-process cache.

A key is looked up in PostgreSQL once per process (then cached); revocations reach every
replica through Redis pub/sub. If the subscription drops, the whole cache is flushed on
reconnect, and a version counter polled in the background catches anything missed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time

import asyncpg

from gateway.background import stop_tasks
from gateway.errors import Unauthenticated
from gateway.pubsub import listen_forever
from gateway.types import Identity
from policies.keys import KEYS_VERSION, REVOKE_CHANNEL, find_active, hash_key

log = logging.getLogger("gateway.auth")

_NEGATIVE_TTL = 5.0
_NEGATIVE_MAX = 10_000
_VERSION_POLL = 5.0

MISSING_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)


def _redact(token: str) -> str:
    return f"{token[:6]}***{token[-4:]}" if len(token) > 12 else "***"


def _identity(row) -> Identity:
    from gateway.config import Limit

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
    )


class Authenticator:
    def __init__(self, pool: asyncpg.Pool, redis, master_key: str | None) -> None:
        self._pool = pool
        self._redis = redis
        self._master = hashlib.sha256(master_key.encode()).digest() if master_key else None
        self._cache: dict[str, Identity] = {}
        self._negative: dict[str, float] = {}
        self._pending: dict[str, asyncio.Future] = {}
        self._tasks: list[asyncio.Task] = []
        self._version: bytes | None = None
        self._epoch = 0  # bumped by every invalidation, so a lookup can tell it raced one
        self.master_identity = Identity(key_id="master", name="master", is_master=True)

    async def start(self) -> None:
        self._version = await self._redis.get(KEYS_VERSION)
        self._tasks = [
            asyncio.create_task(self._listen(), name="auth-revocations"),
            asyncio.create_task(self._poll_version(), name="auth-version"),
        ]

    async def stop(self) -> None:
        await stop_tasks(self._tasks)

    def invalidate(self, key_hash: str | None = None) -> None:
        self._epoch += 1
        if key_hash is None:
            self._cache.clear()
        else:
            self._cache.pop(key_hash, None)
        self._negative.clear()

    async def authenticate(self, authorization: bytes | None) -> Identity:
        if not authorization:
            raise Unauthenticated(MISSING_KEY, code=None)
        scheme, _, token = authorization.decode("latin-1").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated(MISSING_KEY, code=None)
        if self._master is not None and hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self._master):
            return self.master_identity
        key_hash = hash_key(token)
        ident = self._cache.get(key_hash)
        if ident is None:
            ident = await self._lookup(key_hash)
        if ident is not None and ident.expires_at is not None and ident.expires_at <= time.time():
            raise Unauthenticated(f"API key {_redact(token)} has expired.", code="expired_api_key")
        if ident is None:
            raise Unauthenticated(
                f"Incorrect API key provided: {_redact(token)}. Check the key, or create one "
                "with `gateway keys create`."
            )
        return ident

    async def _lookup(self, key_hash: str) -> Identity | None:
        now = time.monotonic()
        expires = self._negative.get(key_hash)
        if expires is not None and expires > now:
            return None
        pending = self._pending.get(key_hash)
        if pending is not None:  # one query per key, however many requests wait on it
            return await asyncio.shield(pending)
        fut = asyncio.get_running_loop().create_future()
        self._pending[key_hash] = fut
        epoch = self._epoch
        try:
            row = await find_active(self._pool, key_hash)
            ident = _identity(row) if row else None
            if ident is None:
                if len(self._negative) >= _NEGATIVE_MAX:
                    self._negative.clear()
                self._negative[key_hash] = now + _NEGATIVE_TTL
            elif epoch == self._epoch:  # no revocation raced the query
                self._cache[key_hash] = ident
            fut.set_result(ident)
            return ident
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved
            raise
        finally:
            del self._pending[key_hash]

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
