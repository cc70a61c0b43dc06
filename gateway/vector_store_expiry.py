"""Expired vector stores are emptied in the background.

A vector store with ``expires_after`` expires ``days`` after its ``last_active_at``; from then on
it is read-only (gateway/openai_vector_store_objects.py refuses searches and new files). This
sweep deletes what it holds — its documents, their chunks (and full-text terms, by cascade) and
the documents' bytes on disk — and keeps the store itself, which reads back with status
``expired`` and empty file counts until its owner deletes it, as OpenAI shows an expired store.
Uploaded files (``/v1/files``) are objects of their own and stay. A store that an active agent
lists in its ``knowledge_bases`` is in use (its turns search it) and is not emptied.

Every replica runs it, every ``GATEWAY_KB_SWEEP_INTERVAL`` seconds (default 300): it is
idempotent (an emptied store is no longer a candidate) and replicas do not repeat each other's
work (each store is emptied in its own transaction holding its row ``FOR UPDATE SKIP LOCKED``,
re-checked there: another replica's sweep, or a delete, in flight is skipped).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import asyncpg

from core.background import Periodic
from gateway.db import tenant_transaction
from rag import ingest

log = logging.getLogger("gateway.kb")

INTERVAL_ENV = "GATEWAY_KB_SWEEP_INTERVAL"
DEFAULT_INTERVAL = 300.0
BATCH = 50  # stores per sweep; the next sweep takes the rest

# A store an agent of its tenant grounds on is in use, whatever its last_active_at says: an
# agent's turns search it without writing last_active_at (no PostgreSQL write on the hot path),
# so without this clause the sweep would empty the knowledge of a live agent.
_EXPIRED = """knowledge_bases k
WHERE k.expires_after_days IS NOT NULL
  AND coalesce(k.last_active_at, k.created_at) + make_interval(days => k.expires_after_days) <= now()
  AND EXISTS (SELECT 1 FROM kb_documents d WHERE d.kb_id = k.id AND d.tenant = k.tenant)
  AND NOT EXISTS (SELECT 1 FROM agents a WHERE a.tenant = k.tenant AND a.archived_at IS NULL
                  AND a.settings -> 'knowledge_bases' ? k.id)"""


def interval() -> float:
    try:
        value = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL))
    except ValueError:
        return DEFAULT_INTERVAL
    return value if value > 0 else DEFAULT_INTERVAL


async def empty_store(pool: asyncpg.Pool, data_dir: Path, tenant: str, kb_id: str) -> int:
    """Empties one expired store (0 when it is not expired any more, already empty, or locked by
    another sweep); the number of documents deleted."""
    async with tenant_transaction(pool, tenant) as conn:
        locked = await conn.fetchval(
            f"SELECT k.id FROM {_EXPIRED} AND k.id = $1 AND k.tenant = $2 FOR UPDATE OF k SKIP LOCKED", kb_id, tenant
        )
        if locked is None:
            return 0
        await conn.execute("DELETE FROM kb_chunks WHERE kb_id = $1 AND tenant = $2", kb_id, tenant)
        docs = await conn.fetch("DELETE FROM kb_documents WHERE kb_id = $1 AND tenant = $2 RETURNING id", kb_id, tenant)
    for doc in docs:
        with contextlib.suppress(OSError):
            ingest.document_path(data_dir, tenant, doc["id"]).unlink()
    return len(docs)


async def sweep(pool: asyncpg.Pool, data_dir: Path) -> list[str]:
    """One sweep over every tenant: the ids of the stores this call emptied."""
    async with tenant_transaction(pool, None) as conn:
        rows = await conn.fetch(f"SELECT k.id, k.tenant FROM {_EXPIRED} ORDER BY k.id LIMIT {BATCH}")
    emptied = []
    for r in rows:
        if await empty_store(pool, data_dir, r["tenant"], r["id"]):
            emptied.append(r["id"])
            log.info("expired vector store emptied", extra={"fields": {"kb_id": r["id"], "tenant": r["tenant"]}})
    return emptied


class ExpirySweeper(Periodic):
    def __init__(self, pool: asyncpg.Pool, data_dir: Path, every: float | None = None) -> None:
        self.pool = pool
        self.data_dir = Path(data_dir)
        super().__init__("vector-store-expiry", every or interval(), self._sweep, log)

    async def _sweep(self) -> None:
        await sweep(self.pool, self.data_dir)
