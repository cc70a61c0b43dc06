"""Attaching uploaded files to a vector store: one document per file that names it (its bytes
are linked after the commit and its ingestion job queued by the caller, gateway/
openai_vector_stores.py), for ``files.create``, ``file_batches.create`` and ``file_ids`` at
creation alike."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg
import orjson

from core.errors import NotFound
from gateway import kb_limits, openai_files
from gateway.openai_common import MAX_ID
from rag import store as kb_store

# (file id, attributes, chunking or None, the request field that named the file)
Entry = tuple[str, dict, dict | None, str]


async def find_document(conn: asyncpg.Connection, owner: str, kb_id: str, file_id: str) -> kb_store.Document:
    """The live document of the vector store's file ``file_id`` (404 naming ``file_id``)."""
    row = await conn.fetchrow(
        f"""SELECT {kb_store._DOC_COLS} FROM kb_documents
            WHERE tenant = $1 AND kb_id = $2 AND coalesce(file_id, id) = $3 AND replaced_by IS NULL""",
        owner,
        kb_id,
        file_id[:MAX_ID],
    )
    if row is None:
        raise NotFound(f"No file found with id '{file_id[:MAX_ID]}' in vector store '{kb_id}'.", param="file_id")
    return kb_store._doc(row)


async def attach(
    conn: asyncpg.Connection,
    owner: str,
    kb: kb_store.KnowledgeBase,
    entries: Sequence[Entry],
    limits: kb_limits.Limits = kb_limits.Limits(),
) -> list[tuple[kb_store.Document, bool]]:
    """(document, created) for each entry, in order; the caller queues created ones after commit.
    The store's and the tenant's documents are counted once, under the tenant's lock
    (kb_limits.Room): a file attached where it already is takes no more room."""
    if not entries:
        return []
    room = await kb_limits.Room.take(conn, owner, kb.id, limits)
    out = [await _attach_one(conn, owner, kb, room, *entry) for entry in entries]
    if any(new for _, new in out):
        await conn.execute(
            "UPDATE knowledge_bases SET last_active_at = now() WHERE id = $1 AND tenant = $2", kb.id, owner
        )
    return out


async def _attach_one(
    conn: asyncpg.Connection,
    owner: str,
    kb: kb_store.KnowledgeBase,
    room: kb_limits.Room,
    file_id: str,
    attributes: dict,
    chunking: dict | None,
    param: str,
) -> tuple[kb_store.Document, bool]:
    file = await openai_files.get_file(conn, owner, file_id, param=param, lock="FOR KEY SHARE")
    row = await conn.fetchrow(
        f"""INSERT INTO kb_documents (id, tenant, kb_id, filename, content_type, bytes, sha256, file_id,
                                      attributes, chunking)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10::jsonb)
            ON CONFLICT (kb_id, file_id) WHERE file_id IS NOT NULL DO NOTHING
            RETURNING {kb_store._DOC_COLS}""",
        kb_store.new_id("doc_"),
        owner,
        kb.id,
        file["filename"],
        file["content_type"],
        file["bytes"],
        file["sha256"],
        file["id"],
        orjson.dumps(attributes).decode(),
        orjson.dumps(chunking).decode() if chunking is not None else None,
    )
    if row is not None:
        room.add(file["bytes"], param, attached=True)
        return kb_store._doc(row), True
    doc = await find_document(conn, owner, kb.id, file["id"])
    if doc.status != "failed":
        return doc, False
    # attached again after a failure (or a cancelled batch): tried again, as an admin re-upload
    # of a failed document is (the provider may be back; the file may read now)
    return await kb_store.set_status(conn, owner, doc.id, "queued"), True
