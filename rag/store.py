"""Knowledge bases, documents and chunks in PostgreSQL (schema: gateway/migrations/0008).

Every function takes a connection the caller opened (inside a tenant-scoped transaction when
it serves a tenant) and a ``tenant``: the rows are filtered by it in SQL as well; ``tenant``
None is the super-admin and sees every tenant. Chunks and vectors are plain data: a chunk is
any object with ``.index .text .section .tokens``, a vector a list of floats (L2-normalized).

Chunks of a document are written as a new *generation*: insert the new rows, flip the
document's ``generation``, delete the old rows — one transaction, so a reader sees all of the
old chunks or all of the new, never a mix; queries also join on the document's generation.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import struct
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import asyncpg
import numpy as np

DEFAULT_SETTINGS: dict[str, Any] = {
    "chunk_size": 500,
    "overlap": 50,
    "top_k": 5,
    "threshold": 0.7,
    "max_context_tokens": 3000,
    "rerank": False,
}
STATUSES = ("queued", "processing", "ready", "failed")
MAX_DIMS = 4000  # HNSW over halfvec
_SCOPE_SQL = "SELECT set_config('gateway.tenant', $1, true), set_config('role', 'gateway_tenant', true)"


class ChunkLike(Protocol):
    index: int
    text: str
    section: str
    tokens: int


@dataclass(frozen=True)
class KnowledgeBase:
    id: str
    tenant: str
    name: str
    description: str
    embedding_model: str
    dims: int
    settings: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
    reembed_model: str | None = None  # the model a re-embedding in progress moves to
    reembed_dims: int | None = None


@dataclass(frozen=True)
class Document:
    id: str
    tenant: str
    kb_id: str
    filename: str
    content_type: str
    bytes: int
    sha256: str
    status: str
    reason: str | None
    chunks: int
    generation: int
    embedding_model: str | None
    replaces: str | None
    replaced_by: str | None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    file_id: str | None = None  # the uploaded file (OpenAI Files API) it came from
    attributes: dict[str, Any] = field(default_factory=dict)  # for search filters
    chunking: dict[str, Any] | None = None  # {"chunk_size", "overlap"} of its own, else the KB's
    reason_code: str | None = None  # why it failed, for programs (``reason`` is for people)
    pending_generation: int | None = None  # chunks of a re-embedding, not live yet
    pending_model: str | None = None


class StoreError(Exception):
    """A request the store refuses (bad argument, unknown document...); the message is safe to show."""


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(8)


@contextlib.asynccontextmanager
async def scoped(
    pool: asyncpg.Pool, tenant: str | None, *, isolation: str | None = None, readonly: bool = False
) -> AsyncIterator[asyncpg.Connection]:
    """A transaction that sees only ``tenant``'s rows under row-level security (the second wall);
    ``tenant`` None: the super-admin, every row. Same contract as gateway.db.tenant_transaction."""
    async with pool.acquire() as conn, conn.transaction(isolation=isolation, readonly=readonly):
        if tenant is not None:
            await conn.execute(_SCOPE_SQL, tenant)
        yield conn


def vector_literal(vec: Sequence[float]) -> str:
    return "[" + ",".join(repr(float(x)) for x in vec) + "]"


def _encode_halfvec(vec: Any) -> bytes:
    # pgvector's binary halfvec: int16 dim, int16 unused, then big-endian IEEE half floats.
    # Bytes are taken as already encoded (an array of them is not mistaken for a 2-D array).
    if isinstance(vec, bytes | bytearray):
        return bytes(vec)
    arr = np.asarray(vec, dtype=">f2")
    return struct.pack(">hh", arr.shape[0], 0) + arr.tobytes()


def _decode_halfvec(data: bytes) -> list[float]:
    dim, _ = struct.unpack_from(">hh", data)
    return np.frombuffer(data, dtype=">f2", count=dim, offset=4).astype(float).tolist()


async def register_halfvec(conn: asyncpg.Connection) -> None:
    """Binary codec for halfvec on this connection (COPY needs one); values are float sequences."""
    await conn.set_type_codec(
        "halfvec", schema="public", encoder=_encode_halfvec, decoder=_decode_halfvec, format="binary"
    )


def _kb(row: asyncpg.Record) -> KnowledgeBase:
    settings = row["settings"]
    if isinstance(settings, str):
        settings = json.loads(settings)
    return KnowledgeBase(
        id=row["id"],
        tenant=row["tenant"],
        name=row["name"],
        description=row["description"],
        embedding_model=row["embedding_model"],
        dims=row["dims"],
        settings={**DEFAULT_SETTINGS, **settings},
        created_at=row["created_at"],
        reembed_model=row.get("reembed_model"),
        reembed_dims=row.get("reembed_dims"),
    )


def _doc(row: asyncpg.Record) -> Document:
    values = {k: row[k] for k in Document.__dataclass_fields__}
    for name in ("attributes", "chunking"):
        if isinstance(values[name], str):
            values[name] = json.loads(values[name])
    values["attributes"] = values["attributes"] or {}
    return Document(**values)


_KB_COLS = "id, tenant, name, description, embedding_model, dims, settings, created_at, reembed_model, reembed_dims"
_DOC_COLS = ", ".join(Document.__dataclass_fields__)


# -- knowledge bases ---------------------------------------------------------------------------


async def ensure_vector_index(conn: asyncpg.Connection, dims: int) -> None:
    """The partial HNSW index for vectors of ``dims`` dimensions (384 and 1,536 come with the
    migration). Needs the table owner: call it outside a tenant-scoped transaction."""
    dims = _check_dims(dims)
    await conn.execute(
        f"CREATE INDEX IF NOT EXISTS kb_chunks_hnsw_{dims} ON kb_chunks USING hnsw "
        f"((embedding::halfvec({dims})) halfvec_cosine_ops) WITH (m = 16, ef_construction = 64) WHERE dims = {dims}"
    )


def _check_dims(dims: int) -> int:
    if not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= MAX_DIMS:
        raise StoreError(f"dims must be an integer between 1 and {MAX_DIMS}")
    return dims


async def create_kb(
    conn: asyncpg.Connection,
    tenant: str,
    name: str,
    *,
    embedding_model: str,
    dims: int,
    description: str = "",
    settings: dict[str, Any] | None = None,
) -> KnowledgeBase:
    """A new knowledge base; StoreError when the tenant already has one of that name."""
    _check_dims(dims)
    merged = {**DEFAULT_SETTINGS, **(settings or {})}
    try:
        row = await conn.fetchrow(
            f"""INSERT INTO knowledge_bases (id, tenant, name, description, embedding_model, dims, settings)
                VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb) RETURNING {_KB_COLS}""",
            new_id("kb_"),
            tenant,
            name,
            description,
            embedding_model,
            dims,
            json.dumps(merged),
        )
    except asyncpg.UniqueViolationError:
        raise StoreError(f"a knowledge base named {name!r} already exists") from None
    return _kb(row)


async def get_kb(conn: asyncpg.Connection, tenant: str | None, kb_id: str) -> KnowledgeBase | None:
    row = await conn.fetchrow(
        f"SELECT {_KB_COLS} FROM knowledge_bases WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)", kb_id, tenant
    )
    return _kb(row) if row else None


async def list_kbs(
    conn: asyncpg.Connection, tenant: str | None, *, limit: int = 100, after: str | None = None
) -> list[KnowledgeBase]:
    """At most ``limit`` (≤ 1,001) knowledge bases, oldest first, after the knowledge base
    ``after`` (a cursor: StoreError when it is none of ``tenant``'s)."""
    cursor = None
    if after is not None:
        cursor = await conn.fetchrow(
            "SELECT created_at, id FROM knowledge_bases WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)",
            after,
            tenant,
        )
        if cursor is None:
            raise StoreError("no such knowledge base")
    rows = await conn.fetch(
        f"""SELECT {_KB_COLS} FROM knowledge_bases WHERE ($1::text IS NULL OR tenant = $1)
              AND ($3::timestamptz IS NULL OR (created_at, id) > ($3, $4))
            ORDER BY created_at, id LIMIT $2""",
        tenant,
        max(1, min(limit, 1001)),
        cursor["created_at"] if cursor else None,
        cursor["id"] if cursor else None,
    )
    return [_kb(r) for r in rows]


async def update_kb_settings(
    conn: asyncpg.Connection, tenant: str | None, kb_id: str, settings: dict[str, Any]
) -> KnowledgeBase | None:
    row = await conn.fetchrow(
        f"""UPDATE knowledge_bases SET settings = settings || $3::jsonb, updated_at = now()
            WHERE id = $1 AND ($2::text IS NULL OR tenant = $2) RETURNING {_KB_COLS}""",
        kb_id,
        tenant,
        json.dumps(settings),
    )
    return _kb(row) if row else None


async def set_embedding_model(
    conn: asyncpg.Connection, tenant: str | None, kb_id: str, model: str, dims: int
) -> KnowledgeBase | None:
    """Switch the knowledge base's model. Chunks keep the model they were embedded with and
    vector search uses only chunks of the knowledge base's current model, so until each
    document is re-embedded (``replace_chunks`` with the new model) its old chunks are found by
    full-text search only. Call ``ensure_vector_index(dims)`` first for a new dimension."""
    _check_dims(dims)
    row = await conn.fetchrow(
        f"""UPDATE knowledge_bases SET embedding_model = $3, dims = $4, updated_at = now()
            WHERE id = $1 AND ($2::text IS NULL OR tenant = $2) RETURNING {_KB_COLS}""",
        kb_id,
        tenant,
        model,
        dims,
    )
    return _kb(row) if row else None


async def delete_kb(conn: asyncpg.Connection, tenant: str | None, kb_id: str) -> bool:
    """Deletes the knowledge base, its documents and chunks."""
    async with conn.transaction():
        await conn.execute(
            "DELETE FROM kb_chunks WHERE kb_id = $1 AND ($2::text IS NULL OR tenant = $2)", kb_id, tenant
        )
        status = await conn.execute(
            "DELETE FROM knowledge_bases WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)", kb_id, tenant
        )
    return status.endswith(" 1")


# -- documents ---------------------------------------------------------------------------------


async def add_document(
    conn: asyncpg.Connection,
    tenant: str,
    kb_id: str,
    *,
    filename: str,
    content_type: str,
    size: int,
    sha256: str,
    replaces: str | None = None,
) -> tuple[Document, bool]:
    """(document, created). The same content (sha256) already live in the knowledge base is
    returned as it is, with created False: re-uploading never duplicates. ``replaces``: the
    document this new version takes over from when its chunks go live (``replace_chunks``)."""
    kb = await get_kb(conn, tenant, kb_id)
    if kb is None:
        raise StoreError("no such knowledge base")
    if replaces is not None and await get_document(conn, tenant, replaces) is None:
        raise StoreError("the document to replace does not exist")
    row = await conn.fetchrow(
        f"""INSERT INTO kb_documents (id, tenant, kb_id, filename, content_type, bytes, sha256, replaces)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
            ON CONFLICT (kb_id, sha256) WHERE replaced_by IS NULL AND file_id IS NULL DO NOTHING
            RETURNING {_DOC_COLS}""",
        new_id("doc_"),
        tenant,
        kb_id,
        filename,
        content_type,
        size,
        sha256,
        replaces,
    )
    if row is not None:
        return _doc(row), True
    row = await conn.fetchrow(
        f"""SELECT {_DOC_COLS} FROM kb_documents
            WHERE kb_id = $1 AND sha256 = $2 AND replaced_by IS NULL AND file_id IS NULL AND tenant = $3""",
        kb_id,
        sha256,
        tenant,
    )
    if row is None:  # lost a race with a delete: try once more
        return await add_document(
            conn,
            tenant,
            kb_id,
            filename=filename,
            content_type=content_type,
            size=size,
            sha256=sha256,
            replaces=replaces,
        )
    return _doc(row), False


async def get_document(conn: asyncpg.Connection, tenant: str | None, document_id: str) -> Document | None:
    row = await conn.fetchrow(
        f"SELECT {_DOC_COLS} FROM kb_documents WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)",
        document_id,
        tenant,
    )
    return _doc(row) if row else None


async def list_documents(
    conn: asyncpg.Connection,
    tenant: str | None,
    kb_id: str,
    *,
    include_replaced: bool = False,
    limit: int = 100,
    after: str | None = None,
) -> list[Document]:
    """At most ``limit`` (≤ 1,001) documents, oldest first, after the document ``after`` (a
    cursor: StoreError when it is no document of the knowledge base)."""
    cursor = None
    if after is not None:
        cursor = await conn.fetchrow(
            """SELECT created_at, id FROM kb_documents
               WHERE id = $1 AND kb_id = $2 AND ($3::text IS NULL OR tenant = $3)""",
            after,
            kb_id,
            tenant,
        )
        if cursor is None:
            raise StoreError("no such document")
    rows = await conn.fetch(
        f"""SELECT {_DOC_COLS} FROM kb_documents
            WHERE kb_id = $1 AND ($2::text IS NULL OR tenant = $2) AND ($3 OR replaced_by IS NULL)
              AND ($5::timestamptz IS NULL OR (created_at, id) > ($5, $6))
            ORDER BY created_at, id LIMIT $4""",
        kb_id,
        tenant,
        include_replaced,
        max(1, min(limit, 1001)),
        cursor["created_at"] if cursor else None,
        cursor["id"] if cursor else None,
    )
    return [_doc(r) for r in rows]


async def count_documents(conn: asyncpg.Connection, tenant: str | None, kb_id: str) -> tuple[dict[str, int], int]:
    """({status: live documents}, their chunks) of the knowledge base, counted in SQL."""
    rows = await conn.fetch(
        """SELECT status, count(*) AS n, coalesce(sum(chunks), 0)::bigint AS chunks FROM kb_documents
           WHERE kb_id = $1 AND ($2::text IS NULL OR tenant = $2) AND replaced_by IS NULL GROUP BY status""",
        kb_id,
        tenant,
    )
    counts = dict.fromkeys(STATUSES, 0)
    for r in rows:
        counts[r["status"]] = int(r["n"])
    return counts, sum(int(r["chunks"]) for r in rows)


async def set_status(
    conn: asyncpg.Connection,
    tenant: str | None,
    document_id: str,
    status: str,
    reason: str | None = None,
    reason_code: str | None = None,
) -> Document | None:
    """queued → processing → ready | failed, with a reason a person understands (and its
    ``reason_code`` for programs: the extractor's code, ``cancelled``, ``processing_failed``...)."""
    if status not in STATUSES:
        raise StoreError(f"status must be one of {', '.join(STATUSES)}")
    if reason is not None and reason_code is None:
        reason_code = "failed"
    row = await conn.fetchrow(
        f"""UPDATE kb_documents SET status = $3, reason = $4, reason_code = $5, updated_at = now()
            WHERE id = $1 AND ($2::text IS NULL OR tenant = $2) RETURNING {_DOC_COLS}""",
        document_id,
        tenant,
        status,
        reason,
        reason_code if reason is not None or status == "failed" else None,
    )
    return _doc(row) if row else None


async def delete_document(conn: asyncpg.Connection, tenant: str | None, document_id: str) -> bool:
    """Deletes the document and its chunks (every generation)."""
    status = await conn.execute(
        "DELETE FROM kb_documents WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)", document_id, tenant
    )
    return status.endswith(" 1")


# -- chunks ------------------------------------------------------------------------------------


async def replace_chunks(
    conn: asyncpg.Connection,
    tenant: str,
    kb_id: str,
    document_id: str,
    chunks: Sequence[ChunkLike],
    vectors: Sequence[Sequence[float]],
    model: str,
    *,
    mark_ready: bool = True,
) -> Document:
    """Make ``chunks`` the document's content, atomically: in one transaction, COPY a new
    generation, flip the document to it, delete the old generation (and, for a new version of
    a document, retire the one it replaces). Readers see all-old or all-new. The vectors must
    all have the knowledge base's dimension."""
    if len(chunks) != len(vectors):
        raise StoreError("one vector per chunk")
    async with conn.transaction():
        doc = await conn.fetchrow(
            """SELECT d.generation, d.replaces, k.dims FROM kb_documents d JOIN knowledge_bases k ON k.id = d.kb_id
               WHERE d.id = $1 AND d.kb_id = $2 AND d.tenant = $3 FOR UPDATE OF d""",
            document_id,
            kb_id,
            tenant,
        )
        if doc is None:
            raise StoreError("no such document")
        dims = doc["dims"]
        generation = await _next_generation(conn, document_id, doc["generation"])
        await _insert_chunks(conn, tenant, kb_id, document_id, generation, chunks, vectors, dims, model)
        row = await conn.fetchrow(
            f"""UPDATE kb_documents SET generation = $2, chunks = $3, embedding_model = $4, updated_at = now(),
                       status = CASE WHEN $5 THEN 'ready' ELSE status END,
                       reason = CASE WHEN $5 THEN NULL ELSE reason END,
                       reason_code = CASE WHEN $5 THEN NULL ELSE reason_code END,
                       pending_generation = NULL, pending_model = NULL
                WHERE id = $1 RETURNING {_DOC_COLS}""",
            document_id,
            generation,
            len(chunks),
            model,
            mark_ready,
        )
        await conn.execute(
            "DELETE FROM kb_chunks WHERE document_id = $1 AND generation <> $2 AND tenant = $3",
            document_id,
            generation,
            tenant,
        )
        if doc["replaces"]:
            await conn.execute("DELETE FROM kb_chunks WHERE document_id = $1 AND tenant = $2", doc["replaces"], tenant)
            await conn.execute(
                """UPDATE kb_documents SET replaced_by = $2, chunks = 0, updated_at = now()
                   WHERE id = $1 AND tenant = $3""",
                doc["replaces"],
                document_id,
                tenant,
            )
    return _doc(row)


async def _next_generation(conn: asyncpg.Connection, document_id: str, live: int) -> int:
    top = await conn.fetchval("SELECT max(generation) FROM kb_chunks WHERE document_id = $1", document_id)
    return max(live, top or 0) + 1


async def _insert_chunks(
    conn: asyncpg.Connection,
    tenant: str,
    kb_id: str,
    document_id: str,
    generation: int,
    chunks: Sequence[ChunkLike],
    vectors: Sequence[Sequence[float]],
    dims: int,
    model: str,
) -> None:
    for vec in vectors:
        if len(vec) != dims:
            raise StoreError(f"vector of {len(vec)} dimensions, the knowledge base has {dims}")
    if not chunks:
        return
    # INSERT from arrays, not COPY: COPY FROM is refused under row-level security.
    await register_halfvec(conn)
    await conn.execute(
        """INSERT INTO kb_chunks (tenant, kb_id, document_id, generation, idx, section, text, tokens,
                                  dims, embedding, embedding_model)
           SELECT $1, $2, $3, $4, u.idx, u.section, u.text, u.tokens, $5, u.embedding, $6
           FROM unnest($7::int[], $8::text[], $9::text[], $10::int[], $11::halfvec[])
                AS u (idx, section, text, tokens, embedding)""",
        tenant,
        kb_id,
        document_id,
        generation,
        dims,
        model,
        [int(c.index) for c in chunks],
        [c.section or "" for c in chunks],
        [c.text for c in chunks],
        [int(c.tokens) for c in chunks],
        [_encode_halfvec(v) for v in vectors],
    )


# -- re-embedding ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredChunk:
    index: int
    section: str
    text: str
    tokens: int


async def live_chunks(conn: asyncpg.Connection, tenant: str, document_id: str) -> list[StoredChunk]:
    """The live generation's chunks of a document, in order (what a re-embedding embeds again)."""
    rows = await conn.fetch(
        """SELECT c.idx, c.section, c.text, c.tokens FROM kb_chunks c JOIN kb_documents d ON d.id = c.document_id
           WHERE c.document_id = $1 AND c.tenant = $2 AND c.generation = d.generation ORDER BY c.idx""",
        document_id,
        tenant,
    )
    return [StoredChunk(r["idx"], r["section"], r["text"], r["tokens"]) for r in rows]


async def start_reembed(conn: asyncpg.Connection, tenant: str, kb_id: str, model: str, dims: int) -> list[str] | None:
    """Begins moving the knowledge base to ``model`` (``dims``): pending chunks of an earlier,
    unfinished move are dropped. The ids of the documents to embed again (those ready), or None
    for no such knowledge base. Search keeps using the current model until ``finish_reembed``."""
    _check_dims(dims)
    async with conn.transaction():
        # FOR UPDATE first: waits for a document going live meanwhile (rag/ingest.py holds the
        # row FOR KEY SHARE), so the list of ready documents below includes it
        await conn.execute("SELECT 1 FROM knowledge_bases WHERE id = $1 AND tenant = $2 FOR UPDATE", kb_id, tenant)
        kb = await conn.fetchval(
            """UPDATE knowledge_bases SET reembed_model = $3, reembed_dims = $4, updated_at = now()
               WHERE id = $1 AND tenant = $2 RETURNING id""",
            kb_id,
            tenant,
            model,
            dims,
        )
        if kb is None:
            return None
        await conn.execute(
            """DELETE FROM kb_chunks c USING kb_documents d
               WHERE c.document_id = d.id AND d.kb_id = $1 AND d.tenant = $2 AND c.generation <> d.generation""",
            kb_id,
            tenant,
        )
        await conn.execute(
            """UPDATE kb_documents SET pending_generation = NULL, pending_model = NULL
               WHERE kb_id = $1 AND tenant = $2 AND pending_generation IS NOT NULL""",
            kb_id,
            tenant,
        )
        rows = await conn.fetch(
            """SELECT id FROM kb_documents WHERE kb_id = $1 AND tenant = $2 AND status = 'ready'
               AND replaced_by IS NULL ORDER BY created_at, id""",
            kb_id,
            tenant,
        )
    return [r["id"] for r in rows]


async def write_pending(
    conn: asyncpg.Connection,
    tenant: str,
    kb_id: str,
    document_id: str,
    chunks: Sequence[ChunkLike],
    vectors: Sequence[Sequence[float]],
    model: str,
) -> bool:
    """Stores the document's chunks embedded with the re-embedding's model as its pending
    generation (replacing an older pending one); False when the move was cancelled or changed."""
    async with conn.transaction():
        doc = await conn.fetchrow(
            """SELECT d.generation, k.reembed_model, k.reembed_dims FROM kb_documents d
               JOIN knowledge_bases k ON k.id = d.kb_id
               WHERE d.id = $1 AND d.kb_id = $2 AND d.tenant = $3 FOR UPDATE OF d""",
            document_id,
            kb_id,
            tenant,
        )
        if doc is None or doc["reembed_model"] != model:
            return False
        await conn.execute(
            "DELETE FROM kb_chunks WHERE document_id = $1 AND tenant = $2 AND generation <> $3",
            document_id,
            tenant,
            doc["generation"],
        )
        generation = await _next_generation(conn, document_id, doc["generation"])
        await _insert_chunks(conn, tenant, kb_id, document_id, generation, chunks, vectors, doc["reembed_dims"], model)
        await conn.execute(
            "UPDATE kb_documents SET pending_generation = $2, pending_model = $3 WHERE id = $1 AND tenant = $4",
            document_id,
            generation,
            model,
            tenant,
        )
    return True


async def finish_reembed(conn: asyncpg.Connection, tenant: str, kb_id: str) -> bool:
    """When every ready document has its pending generation for the new model: one transaction
    makes them all live and switches the knowledge base's model (True). Until then, nothing."""
    async with conn.transaction():
        kb = await conn.fetchrow(
            "SELECT reembed_model, reembed_dims FROM knowledge_bases WHERE id = $1 AND tenant = $2 FOR UPDATE",
            kb_id,
            tenant,
        )
        if kb is None or kb["reembed_model"] is None:
            return False
        missing = await conn.fetchval(
            """SELECT count(*) FROM kb_documents WHERE kb_id = $1 AND tenant = $2 AND replaced_by IS NULL
               AND status = 'ready' AND pending_model IS DISTINCT FROM $3""",
            kb_id,
            tenant,
            kb["reembed_model"],
        )
        if missing:
            return False
        await conn.execute(
            """UPDATE kb_documents SET generation = pending_generation, embedding_model = pending_model,
                      pending_generation = NULL, pending_model = NULL, updated_at = now()
               WHERE kb_id = $1 AND tenant = $2 AND pending_model = $3""",
            kb_id,
            tenant,
            kb["reembed_model"],
        )
        await conn.execute(
            """DELETE FROM kb_chunks c USING kb_documents d
               WHERE c.document_id = d.id AND d.kb_id = $1 AND d.tenant = $2 AND c.generation <> d.generation""",
            kb_id,
            tenant,
        )
        await conn.execute(
            """UPDATE knowledge_bases SET embedding_model = reembed_model, dims = reembed_dims,
                      reembed_model = NULL, reembed_dims = NULL, updated_at = now()
               WHERE id = $1 AND tenant = $2""",
            kb_id,
            tenant,
        )
    return True


async def count_chunks(conn: asyncpg.Connection, tenant: str | None, *, kb_id: str | None = None) -> int:
    return await conn.fetchval(
        """SELECT count(*) FROM kb_chunks WHERE ($1::text IS NULL OR tenant = $1)
           AND ($2::text IS NULL OR kb_id = $2)""",
        tenant,
        kb_id,
    )
