"""Virtual API keys in PostgreSQL: create (the key is shown once), list, revoke, look up.

Only the SHA-256 of a key is stored. Keys carry 256 bits of randomness, so a fast hash is
enough: there is nothing to brute-force that a slow hash would protect.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

KEY_PREFIX = "sk-gw-"
REVOKE_CHANNEL = "gateway:keys:revoked"
KEYS_VERSION = "gateway:keys:version"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def display_prefix(key: str) -> str:
    return f"{key[:10]}…{key[-4:]}"


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    name: str
    tenant: str
    key_prefix: str
    created_at: datetime
    revoked_at: datetime | None
    settings: dict = field(default_factory=dict)  # scopes, models, limits, expires_at, ...


async def create_key(
    conn: asyncpg.Connection,
    name: str,
    tenant: str = "default",
    require_tags: list[str] | None = None,
    extra: dict | None = None,
) -> tuple[str, KeyRecord]:
    """Returns the plaintext key (to show once) and its stored record. ``extra`` holds settings:
    scopes, models, limits {rpm, tpm}, expires_at (Unix time)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    metadata = dict(extra or {})
    if require_tags:
        metadata["require_tags"] = sorted(set(require_tags))
    row = await conn.fetchrow(
        """INSERT INTO api_keys (id, name, tenant, key_hash, key_prefix, metadata)
           VALUES ($1, $2, $3, $4, $5, $6::jsonb)
           RETURNING id, name, tenant, key_prefix, created_at, revoked_at""",
        "key_" + secrets.token_hex(8),
        name,
        tenant,
        hash_key(key),
        display_prefix(key),
        json.dumps(metadata),
    )
    return key, KeyRecord(**dict(row))


# ``tenant`` None is the super-admin's view; otherwise only that tenant's keys (the admin API
# also runs these under row-level security, so the filter is not the only wall).
async def list_keys(
    conn: asyncpg.Connection,
    *,
    include_revoked: bool = False,
    tenant: str | None = None,
    limit: int | None = None,
    after: str | None = None,
) -> list[KeyRecord]:
    """Every key, oldest first; or with ``limit`` one page, newest first, of the keys older than
    the key ``after`` (a page's last id)."""
    if limit is None:
        rows = await conn.fetch(
            """SELECT id, name, tenant, key_prefix, created_at, revoked_at, metadata FROM api_keys
               WHERE ($1 OR revoked_at IS NULL) AND ($2::text IS NULL OR tenant = $2) ORDER BY created_at""",
            include_revoked,
            tenant,
        )
    else:
        rows = await conn.fetch(
            """SELECT id, name, tenant, key_prefix, created_at, revoked_at, metadata FROM api_keys
               WHERE ($1 OR revoked_at IS NULL) AND ($2::text IS NULL OR tenant = $2)
                 AND ($3::text IS NULL OR (created_at, id) < (SELECT created_at, id FROM api_keys WHERE id = $3))
               ORDER BY created_at DESC, id DESC LIMIT $4""",
            include_revoked,
            tenant,
            after,
            limit,
        )
    return [KeyRecord(**{k: v for k, v in r.items() if k != "metadata"}, settings=_settings(r)) for r in rows]


def _settings(row) -> dict:
    meta = row["metadata"]
    return (json.loads(meta) if isinstance(meta, str) else meta) or {}


async def key_tenant(conn: asyncpg.Connection, key_id: str) -> str | None:
    return await conn.fetchval("SELECT tenant FROM api_keys WHERE id = $1", key_id)


async def revoke_key(conn: asyncpg.Connection, key_id: str, tenant: str | None = None) -> str | None:
    """Marks the key revoked, and every key minted from it (``revoke_tree``); returns its hash
    (for cache invalidation) or None if unknown."""
    revoked = await revoke_tree(conn, key_id, tenant)
    return revoked[0][1] if revoked else None


# A key minted by a tenant admin names its minter (``minted_by``, policies/minting.py; keys minted
# before that name their ancestors in ``shared_limits``): never wider than its minter, it does not
# outlive it either.
_REVOKE_TREE = """
WITH RECURSIVE tree(id) AS (
    SELECT id FROM api_keys WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)
  UNION
    SELECT k.id FROM api_keys k JOIN tree t
      ON k.metadata->>'minted_by' = t.id
      OR k.metadata->'shared_limits' @> jsonb_build_array(jsonb_build_object('key', t.id))
)
UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now())
WHERE id IN (SELECT id FROM tree) RETURNING id, key_hash"""


async def revoke_tree(conn: asyncpg.Connection, key_id: str, tenant: str | None = None) -> list[tuple[str, str]]:
    """Revokes the key and every key minted from it, however deep; (id, hash) of each, the
    named key first; empty if unknown."""
    rows = [(r["id"], r["key_hash"]) for r in await conn.fetch(_REVOKE_TREE, key_id, tenant)]
    return sorted(rows, key=lambda r: r[0] != key_id)


async def find_active(conn: asyncpg.Connection | asyncpg.Pool, key_hash: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT id, name, tenant, metadata FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
        key_hash,
    )


async def announce_revocation(redis, key_hash: str, *more: str) -> int:
    """Tells every gateway replica to drop the keys from its cache; returns listeners reached."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.incr(KEYS_VERSION)
        for h in (key_hash, *more):
            pipe.publish(REVOKE_CHANNEL, h)
        _, receivers, *_ = await pipe.execute()
    return int(receivers)
