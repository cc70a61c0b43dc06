"""What one tenant can make the knowledge-base layer hold and do, whichever API it comes through
(the OpenAI Vector Stores API, gateway/openai_vector_stores.py; the admin API, gateway/admin_kb.py):

- at most ``MAX_KNOWLEDGE_BASES`` knowledge bases, vector stores included;
- at most ``MAX_FILES_PER_STORE`` documents in one knowledge base;
- in its vector stores, across all of them, at most ``policies.max_attached_files_per_tenant``
  attached files holding ``policies.max_attached_bytes_per_tenant`` bytes. A file counts once
  toward the storage quota (gateway/storage_quota.py: its bytes are on the disk once), but each
  store it is attached to holds a document of its own, its chunks and their embedding work: so
  here it counts once per store, by the file's bytes, as OpenAI bills each store's
  ``usage_bytes``. Without it one file could be attached to 1,000 stores × 10,000 files;
- its newest ``MAX_BATCHES_PER_TENANT`` file batches (a batch is a view of its files' statuses;
  the files of a forgotten batch stay attached).

Documents are checked under the tenant's storage lock (``storage_quota.lock``), held to the end
of the caller's transaction, and counted once per transaction (``Room``): concurrent requests on
any replica count after each other's inserts, and a batch of 500 files counts once.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from core.errors import InvalidRequest
from gateway import storage_quota
from gateway.openai_common import serialize

MAX_KNOWLEDGE_BASES = 1000
MAX_FILES_PER_STORE = 10_000
MAX_BATCHES_PER_TENANT = 1000
DEFAULT_MAX_ATTACHED_FILES = 100_000
DEFAULT_MAX_ATTACHED_BYTES = 10 * 2**30


@dataclass(frozen=True, slots=True)
class Limits:
    max_files_per_store: int = MAX_FILES_PER_STORE
    max_attached_files: int = DEFAULT_MAX_ATTACHED_FILES
    max_attached_bytes: int = DEFAULT_MAX_ATTACHED_BYTES


def of(svc) -> Limits:
    policies = svc.config.policies
    return Limits(
        max_attached_files=policies.max_attached_files_per_tenant,
        max_attached_bytes=policies.max_attached_bytes_per_tenant,
    )


async def lock_kbs(conn: asyncpg.Connection, tenant: str) -> None:
    """The tenant's knowledge-base lock, to the end of the transaction (what creates one holds)."""
    await serialize(conn, f"knowledge_bases:{tenant}")


async def check_room_for_kb(conn: asyncpg.Connection, tenant: str) -> None:
    """Refuses one more knowledge base past ``MAX_KNOWLEDGE_BASES``; the tenant's lock is held to
    the end of the transaction, so concurrent creates cannot overshoot."""
    await lock_kbs(conn, tenant)
    count = await conn.fetchval("SELECT count(*) FROM knowledge_bases WHERE tenant = $1", tenant)
    if count >= MAX_KNOWLEDGE_BASES:
        raise InvalidRequest(
            f"This tenant has {MAX_KNOWLEDGE_BASES:,} knowledge bases and vector stores, the limit; delete some first.",
            code="too_many_stores",
        )


@dataclass(slots=True)
class Room:
    """What a transaction may still add to one knowledge base, counted once when it is taken."""

    limits: Limits
    in_store: int
    attached: int
    attached_bytes: int

    attaching: bool

    @classmethod
    async def take(
        cls, conn: asyncpg.Connection, tenant: str, kb_id: str, limits: Limits, *, attaching: bool = True
    ) -> Room:
        """Takes the tenant's storage lock (to the end of the transaction), then counts
        (``attaching``: the tenant's attached files too, for ``add(attached=True)``)."""
        await storage_quota.lock(conn, tenant)
        in_store = await conn.fetchval(
            "SELECT count(*) FROM kb_documents WHERE tenant = $1 AND kb_id = $2 AND replaced_by IS NULL", tenant, kb_id
        )
        attached, attached_bytes = 0, 0
        if attaching:
            row = await conn.fetchrow(
                """SELECT count(*) AS n, coalesce(sum(bytes), 0)::bigint AS bytes FROM kb_documents
                   WHERE tenant = $1 AND file_id IS NOT NULL""",
                tenant,
            )
            attached, attached_bytes = int(row["n"]), int(row["bytes"])
        return cls(limits, int(in_store), attached, attached_bytes, attaching)

    def add(self, size: int, param: str, *, attached: bool) -> None:
        """One more document of ``size`` bytes (``attached``: a file attached to a vector store),
        already inserted in this transaction: a refusal rolls it back with the rest."""
        self.in_store += 1
        if self.in_store > self.limits.max_files_per_store:
            raise InvalidRequest(
                f"The vector store (knowledge base) has {self.limits.max_files_per_store:,} files, the limit.",
                param=param,
                code="too_many_files",
            )
        if not attached:
            return
        if not self.attaching:
            raise RuntimeError("Room.take(attaching=False) does not count attached files")
        self.attached += 1
        self.attached_bytes += size
        if self.attached > self.limits.max_attached_files or self.attached_bytes > self.limits.max_attached_bytes:
            raise InvalidRequest(
                f"This tenant's vector stores hold their limit of attached files ({self.limits.max_attached_files:,} "
                f"files, {self.limits.max_attached_bytes:,} bytes, a file counting once in each store it is in: "
                "policies.max_attached_files_per_tenant, policies.max_attached_bytes_per_tenant); "
                "remove some from a vector store first.",
                param=param,
                code="too_many_attached_files",
            )


async def keep_newest_batches(conn: asyncpg.Connection, tenant: str) -> None:
    """Forgets the tenant's file batches past its newest ``MAX_BATCHES_PER_TENANT`` (call under
    the tenant's storage lock, after inserting one)."""
    await conn.execute(
        """DELETE FROM kb_file_batches WHERE tenant = $1 AND id IN (
               SELECT id FROM kb_file_batches WHERE tenant = $1
               ORDER BY created_at DESC, id DESC OFFSET $2)""",
        tenant,
        MAX_BATCHES_PER_TENANT,
    )
