"""The OpenAI Vector Stores API (``/v1/vector_stores…``) over the knowledge bases.

A vector store is a knowledge base of the caller's tenant, and a vector-store file is one of its
documents: attaching a file (``files.create``, ``file_batches.create``, or ``file_ids`` at
creation) records a document that names the file, links the file's bytes to the document's
path, and queues the same ingestion job an admin upload queues (gateway/kb_worker.py). Its
status maps ``queued``/``processing`` → ``in_progress``, ``ready`` → ``completed``, ``failed`` →
``failed`` with ``last_error`` (``unsupported_file``, ``invalid_file`` for files that give no
text, ``server_error`` otherwise) — or ``cancelled`` when its batch was cancelled first. While a
file is in progress its answer carries ``openai-poll-after-ms``, which the SDK's ``*_and_poll``
helpers honour.

Search (``POST /v1/vector_stores/{id}/search``) is the knowledge bases' hybrid retrieval (rag/
retrieve.py) with the OpenAI shapes: ``max_num_results`` 1–50, ``filters`` on attributes
compiled to parameterised SQL (rag/attributes.py) that selects the documents searched,
``ranking_options.score_threshold`` on the cosine similarity (the ``score``).

Documents uploaded through the admin API appear here too, with their document id as file id.
"""

from __future__ import annotations

import contextlib
import time
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.errors import InvalidRequest, NotFound
from gateway import admin_input as inp
from gateway import kb_embedding, openai_files, rerank
from gateway.admin_kb import _only
from gateway.db import tenant_transaction
from gateway.openai_common import (
    MAX_ID,
    json_response,
    keyset_page,
    link_or_copy,
    list_body,
    list_params,
    new_id,
    path_id,
    tenant,
    ts,
)
from rag import ingest, retrieve
from rag import store as kb_store
from rag.attributes import InvalidAttributes, check_attributes, compile_filter
from rag.embedding import DIMS as LOCAL_DIMS
from rag.embedding import MODEL as LOCAL_MODEL

MAX_STORES = 1000  # per tenant
MAX_FILES_PER_STORE = 10_000
MAX_FILE_IDS = 500  # per create / batch call
MAX_QUERIES = 10
POLL_AFTER_MS = "250"
CREATE_FIELDS = frozenset({"name", "description", "file_ids", "chunking_strategy", "metadata", "expires_after"})
UPDATE_FIELDS = frozenset({"name", "metadata", "expires_after"})
FILE_FIELDS = frozenset({"file_id", "attributes", "chunking_strategy"})
BATCH_FIELDS = frozenset({"file_ids", "files", "attributes", "chunking_strategy"})
SEARCH_FIELDS = frozenset({"query", "max_num_results", "filters", "ranking_options", "rewrite_query"})
RANKERS = ("none", "auto", "default-2024-11-15")
_INVALID_FILE_CODES = frozenset(
    {"empty_file", "corrupt_pdf", "corrupt_docx", "encrypted_pdf", "no_text_layer", "too_large", "timeout"}
)


def _bad(exc: InvalidAttributes) -> InvalidRequest:
    return InvalidRequest(exc.message, param=exc.param, code="invalid_value")


# ---- input -----------------------------------------------------------------------------------


def _chunking(raw, param: str = "chunking_strategy") -> dict | None:
    """None (auto: the knowledge base's settings) or {"chunk_size", "overlap"}."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InvalidRequest(f"'{param}' must be an object.", param=param, code="invalid_type")
    kind = raw.get("type")
    if kind == "auto":
        _only(raw, frozenset({"type"}), f"{param}.")
        return None
    if kind != "static":
        raise InvalidRequest(f"'{param}.type' must be 'auto' or 'static'.", param=f"{param}.type", code="invalid_value")
    _only(raw, frozenset({"type", "static"}), f"{param}.")
    static = raw.get("static")
    if not isinstance(static, dict):
        raise InvalidRequest(f"'{param}.static' must be an object.", param=f"{param}.static", code="invalid_type")
    _only(static, frozenset({"max_chunk_size_tokens", "chunk_overlap_tokens"}), f"{param}.static.")
    size = static.get("max_chunk_size_tokens")
    overlap = static.get("chunk_overlap_tokens", 0)
    name = f"{param}.static.max_chunk_size_tokens"
    if not isinstance(size, int) or isinstance(size, bool) or not 100 <= size <= 4096:
        raise InvalidRequest(f"'{name}' must be an integer from 100 to 4096.", param=name, code="invalid_value")
    name = f"{param}.static.chunk_overlap_tokens"
    if not isinstance(overlap, int) or isinstance(overlap, bool) or not 0 <= overlap <= size // 2:
        raise InvalidRequest(
            f"'{name}' must be an integer from 0 to half of max_chunk_size_tokens.", param=name, code="invalid_value"
        )
    return {"chunk_size": size, "overlap": overlap}


def _expires_after(raw) -> tuple[bool, int | None]:
    """(given, days): days None clears the expiry."""
    if raw is None:
        return False, None
    if not isinstance(raw, dict):
        raise InvalidRequest("'expires_after' must be an object.", param="expires_after", code="invalid_type")
    _only(raw, frozenset({"anchor", "days"}), "expires_after.")
    if raw.get("anchor") != "last_active_at":
        raise InvalidRequest(
            "'expires_after.anchor' must be 'last_active_at'.", param="expires_after.anchor", code="invalid_value"
        )
    days = raw.get("days")
    if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= 365:
        raise InvalidRequest(
            "'expires_after.days' must be an integer from 1 to 365.", param="expires_after.days", code="invalid_value"
        )
    return True, days


def _file_ids(raw, param: str = "file_ids") -> list[str]:
    if raw is None:
        return []
    if not isinstance(raw, list) or len(raw) > MAX_FILE_IDS:
        raise InvalidRequest(f"'{param}' must be an array of at most {MAX_FILE_IDS} file ids.", param=param)
    for i, value in enumerate(raw):
        if not isinstance(value, str) or not 1 <= len(value) <= MAX_ID:
            raise InvalidRequest(f"'{param}[{i}]' must be a file id.", param=f"{param}[{i}]", code="invalid_value")
    return list(dict.fromkeys(raw))


def _metadata(raw) -> dict:
    try:
        return check_attributes(raw, "metadata")
    except InvalidAttributes as exc:
        raise _bad(exc) from None


def _attributes(raw, param: str = "attributes") -> dict:
    try:
        return check_attributes(raw, param)
    except InvalidAttributes as exc:
        raise _bad(exc) from None


# ---- shapes ----------------------------------------------------------------------------------

_KB_COLS = (
    "id, tenant, name, description, embedding_model, dims, settings, created_at, display_name, metadata, "
    "expires_after_days, last_active_at"
)


def _json_col(value):
    return orjson.loads(value) if isinstance(value, str) else value


def file_status(doc: kb_store.Document) -> str:
    if doc.status in ("queued", "processing"):
        return "in_progress"
    if doc.status == "ready":
        return "completed"
    return "cancelled" if doc.reason_code == ingest.CANCELLED else "failed"


def last_error(doc: kb_store.Document) -> dict | None:
    if doc.status != "failed" or doc.reason_code == ingest.CANCELLED:
        return None
    code = doc.reason_code or ""
    kind = "unsupported_file" if code == "unsupported_type" else "invalid_file" if code in _INVALID_FILE_CODES else None
    return {"code": kind or "server_error", "message": doc.reason or "processing failed"}


def describe_file(doc: kb_store.Document, kb: kb_store.KnowledgeBase) -> dict:
    size, overlap = ingest.chunk_settings(kb, doc)
    return {
        "id": doc.file_id or doc.id,
        "object": "vector_store.file",
        "vector_store_id": kb.id,
        "status": file_status(doc),
        "last_error": last_error(doc),
        "usage_bytes": doc.bytes if doc.status == "ready" else 0,
        "created_at": ts(doc.created_at),
        "attributes": doc.attributes or {},
        "chunking_strategy": {
            "type": "static",
            "static": {"max_chunk_size_tokens": size, "chunk_overlap_tokens": overlap},
        },
    }


def _counts(rows) -> tuple[dict, int]:
    counts = {"in_progress": 0, "completed": 0, "failed": 0, "cancelled": 0, "total": 0}
    usage = 0
    for r in rows:
        if r["status"] in ("queued", "processing"):
            key = "in_progress"
        elif r["status"] == "ready":
            key = "completed"
            usage += r["bytes"] or 0
        else:
            key = "cancelled" if r["reason_code"] == ingest.CANCELLED else "failed"
        counts[key] += r["n"]
        counts["total"] += r["n"]
    return counts, usage


async def _store_counts(conn: asyncpg.Connection, owner: str, kb_ids: list[str]) -> dict[str, tuple[dict, int]]:
    rows = await conn.fetch(
        """SELECT kb_id, status, reason_code, count(*) AS n, sum(bytes)::bigint AS bytes FROM kb_documents
           WHERE tenant = $1 AND kb_id = ANY($2::text[]) AND replaced_by IS NULL
           GROUP BY kb_id, status, reason_code""",
        owner,
        kb_ids,
    )
    by_kb: dict[str, list] = {k: [] for k in kb_ids}
    for r in rows:
        by_kb[r["kb_id"]].append(r)
    return {k: _counts(v) for k, v in by_kb.items()}


def describe_store(row, counts: tuple[dict, int]) -> dict:
    file_counts, usage = counts
    active = row["last_active_at"] or row["created_at"]
    days = row["expires_after_days"]
    expires_at = active + timedelta(days=days) if days else None
    if expires_at is not None and expires_at <= datetime.now(UTC):
        status = "expired"
    else:
        status = "in_progress" if file_counts["in_progress"] else "completed"
    return {
        "id": row["id"],
        "object": "vector_store",
        "name": row["display_name"] if row["display_name"] is not None else row["name"],
        "status": status,
        "file_counts": file_counts,
        "usage_bytes": usage,
        "created_at": ts(row["created_at"]),
        "last_active_at": ts(active),
        "metadata": _json_col(row["metadata"]) or {},
        "expires_after": {"anchor": "last_active_at", "days": days} if days else None,
        "expires_at": ts(expires_at),
    }


def _kb(row) -> kb_store.KnowledgeBase:
    return kb_store._kb(row)


# ---- routes ----------------------------------------------------------------------------------


class VectorStores:
    def __init__(self, store) -> None:
        self.store = store  # gateway.openai_store.OpenAIStore

    def routes(self) -> list[Route]:
        base = "/v1/vector_stores"
        one = base + "/{vs_id}"
        return [
            Route(base, self.create, methods=["POST"]),
            Route(base, self.list, methods=["GET"]),
            Route(one, self.retrieve, methods=["GET"]),
            Route(one, self.update, methods=["POST"]),
            Route(one, self.delete, methods=["DELETE"]),
            Route(one + "/search", self.search, methods=["POST"]),
            Route(one + "/files", self.add_file, methods=["POST"]),
            Route(one + "/files", self.list_files, methods=["GET"]),
            Route(one + "/files/{file_id}", self.get_file, methods=["GET"]),
            Route(one + "/files/{file_id}", self.update_file, methods=["POST"]),
            Route(one + "/files/{file_id}", self.remove_file, methods=["DELETE"]),
            Route(one + "/files/{file_id}/content", self.file_content, methods=["GET"]),
            Route(one + "/file_batches", self.create_batch, methods=["POST"]),
            Route(one + "/file_batches/{batch_id}", self.get_batch, methods=["GET"]),
            Route(one + "/file_batches/{batch_id}/cancel", self.cancel_batch, methods=["POST"]),
            Route(one + "/file_batches/{batch_id}/files", self.batch_files, methods=["GET"]),
        ]

    # ---- helpers -------------------------------------------------------------------------------
    async def _row(self, conn, owner: str, vs_id: str):
        row = await conn.fetchrow(
            f"SELECT {_KB_COLS} FROM knowledge_bases WHERE id = $1 AND tenant = $2", vs_id[:MAX_ID], owner
        )
        if row is None:
            raise NotFound(f"No vector store found with id '{vs_id[:MAX_ID]}'.", param="vector_store_id")
        return row

    async def _describe(self, conn, owner: str, row) -> dict:
        counts = await _store_counts(conn, owner, [row["id"]])
        return describe_store(row, counts[row["id"]])

    async def _doc(self, conn, owner: str, kb_id: str, file_id: str) -> kb_store.Document:
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

    async def _attach(
        self,
        conn,
        owner: str,
        kb: kb_store.KnowledgeBase,
        file_id: str,
        attributes: dict,
        chunking: dict | None,
        param: str,
    ) -> tuple[kb_store.Document, bool]:
        """(document, created) for ``file_id`` in ``kb``; the caller queues created ones after commit."""
        file = await openai_files.get_file(conn, owner, file_id, param=param)
        count = await conn.fetchval(
            "SELECT count(*) FROM kb_documents WHERE tenant = $1 AND kb_id = $2 AND replaced_by IS NULL", owner, kb.id
        )
        if count >= MAX_FILES_PER_STORE:
            raise InvalidRequest(
                f"The vector store has {MAX_FILES_PER_STORE:,} files, the limit.", param=param, code="too_many_files"
            )
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
        if row is None:
            return await self._doc(conn, owner, kb.id, file["id"]), False
        doc = kb_store._doc(row)
        source = openai_files.file_path(self.store.data_dir, owner, file["id"])
        try:
            link_or_copy(source, self.store.document_path(owner, doc.id))
        except FileNotFoundError:
            raise NotFound(f"The content of {file['id']} is no longer stored.", param=param) from None
        await conn.execute(
            "UPDATE knowledge_bases SET last_active_at = now() WHERE id = $1 AND tenant = $2", kb.id, owner
        )
        return doc, True

    async def _enqueue(self, owner: str, docs: list[kb_store.Document]) -> None:
        for doc in docs:
            job = {
                "tenant": owner,
                "kb_id": doc.kb_id,
                "document_id": doc.id,
                "path": str(self.store.document_path(owner, doc.id)),
                "sha256": doc.sha256,
                "queued_at": time.time(),
            }
            try:
                await self.store.kb.queue.enqueue(job)
            except Exception:
                async with tenant_transaction(self.store.pool, owner) as conn:
                    await kb_store.set_status(
                        conn, owner, doc.id, "failed", "The file could not be queued; add it again.", "queue_failed"
                    )
                raise

    def _poll_headers(self, status: str) -> dict[str, str] | None:
        return {"openai-poll-after-ms": POLL_AFTER_MS} if status == "in_progress" else None

    # ---- vector stores -------------------------------------------------------------------------
    async def create(self, request: Request) -> Response:
        data = await inp.body(request)
        _only(data, CREATE_FIELDS)
        name = inp.text(data, "name", max_len=256)
        description = inp.text(data, "description", max_len=512) or ""
        file_ids = _file_ids(data.get("file_ids"))
        chunking = _chunking(data.get("chunking_strategy"))
        metadata = _metadata(data.get("metadata"))
        _, days = _expires_after(data.get("expires_after"))
        owner = tenant(request)
        created: list[kb_store.Document] = []
        async with tenant_transaction(self.store.pool, owner) as conn:
            count = await conn.fetchval("SELECT count(*) FROM knowledge_bases WHERE tenant = $1", owner)
            if count >= MAX_STORES:
                raise InvalidRequest(
                    f"This tenant has {MAX_STORES:,} vector stores, the limit.", code="too_many_stores"
                )
            vs_id = new_id("vs_")
            await conn.execute(
                """INSERT INTO knowledge_bases (id, tenant, name, description, embedding_model, dims, settings,
                                                display_name, metadata, expires_after_days, last_active_at)
                   VALUES ($1, $2, $1, $3, $4, $5, $6::jsonb, $7, $8::jsonb, $9, now())""",
                vs_id,
                owner,
                description,
                LOCAL_MODEL,
                LOCAL_DIMS,
                orjson.dumps(kb_store.DEFAULT_SETTINGS).decode(),
                name or "",
                orjson.dumps(metadata).decode(),
                days,
            )
            row = await self._row(conn, owner, vs_id)
            kb = _kb(row)
            for i, file_id in enumerate(file_ids):
                doc, new = await self._attach(conn, owner, kb, file_id, {}, chunking, f"file_ids[{i}]")
                if new:
                    created.append(doc)
            out = await self._describe(conn, owner, row)
        await self._enqueue(owner, created)
        return json_response(out)

    async def list(self, request: Request) -> Response:
        lp = list_params(request)
        owner = tenant(request)
        async with tenant_transaction(self.store.pool, owner) as conn:
            rows, more = await keyset_page(
                conn, table="knowledge_bases", id_col="id", select=_KB_COLS, where="tenant = $1", args=[owner], lp=lp
            )
            counts = await _store_counts(conn, owner, [r["id"] for r in rows])
        return json_response(list_body([describe_store(r, counts[r["id"]]) for r in rows], more))

    async def retrieve(self, request: Request) -> Response:
        owner = tenant(request)
        async with tenant_transaction(self.store.pool, owner) as conn:
            out = await self._describe(conn, owner, await self._row(conn, owner, path_id(request, "vs_id")))
        return json_response(out)

    async def update(self, request: Request) -> Response:
        data = await inp.body(request)
        _only(data, UPDATE_FIELDS)
        name = inp.text(data, "name", max_len=256)
        metadata = _metadata(data.get("metadata")) if "metadata" in data and data["metadata"] is not None else None
        clear_expiry = "expires_after" in data and data["expires_after"] is None
        given, days = _expires_after(data.get("expires_after"))
        owner = tenant(request)
        async with tenant_transaction(self.store.pool, owner) as conn:
            row = await self._row(conn, owner, path_id(request, "vs_id"))
            await conn.execute(
                """UPDATE knowledge_bases SET display_name = coalesce($3, display_name),
                          metadata = coalesce($4::jsonb, metadata),
                          expires_after_days = CASE WHEN $5 THEN $6 ELSE expires_after_days END,
                          last_active_at = now(), updated_at = now()
                   WHERE id = $1 AND tenant = $2""",
                row["id"],
                owner,
                name,
                orjson.dumps(metadata).decode() if metadata is not None else None,
                given or clear_expiry,
                days,
            )
            out = await self._describe(conn, owner, await self._row(conn, owner, row["id"]))
        return json_response(out)

    async def delete(self, request: Request) -> Response:
        owner = tenant(request)
        async with tenant_transaction(self.store.pool, owner) as conn:
            row = await self._row(conn, owner, path_id(request, "vs_id"))
            docs = await conn.fetch("SELECT id FROM kb_documents WHERE kb_id = $1 AND tenant = $2", row["id"], owner)
            await conn.execute("DELETE FROM kb_documents WHERE kb_id = $1 AND tenant = $2", row["id"], owner)
            await kb_store.delete_kb(conn, owner, row["id"])
        for doc in docs:
            with contextlib.suppress(OSError):
                self.store.document_path(owner, doc["id"]).unlink()
        return json_response({"id": row["id"], "object": "vector_store.deleted", "deleted": True})

    # ---- files of a vector store ---------------------------------------------------------------
    async def add_file(self, request: Request) -> Response:
        data = await inp.body(request)
        _only(data, FILE_FIELDS)
        file_id = inp.text(data, "file_id", required=True, max_len=MAX_ID)
        attributes = _attributes(data.get("attributes"))
        chunking = _chunking(data.get("chunking_strategy"))
        owner = tenant(request)
        async with tenant_transaction(self.store.pool, owner) as conn:
            kb = _kb(await self._row(conn, owner, path_id(request, "vs_id")))
            doc, new = await self._attach(conn, owner, kb, file_id, attributes, chunking, "file_id")
        if new:
            await self._enqueue(owner, [doc])
        out = describe_file(doc, kb)
        return json_response(out, headers=self._poll_headers(out["status"]))

    async def list_files(self, request: Request, batch_file_ids: list[str] | None = None) -> Response:
        lp = list_params(request)
        status = request.query_params.get("filter")
        states = {
            None: None,
            "in_progress": ["queued", "processing"],
            "completed": ["ready"],
            "failed": ["failed"],
            "cancelled": ["failed"],
        }
        if status not in states:
            raise InvalidRequest(
                "'filter' must be one of in_progress, completed, failed, cancelled.",
                param="filter",
                code="invalid_value",
            )
        cancelled = None if status not in ("failed", "cancelled") else status == "cancelled"
        owner = tenant(request)
        async with tenant_transaction(self.store.pool, owner) as conn:
            kb = _kb(await self._row(conn, owner, path_id(request, "vs_id")))
            rows, more = await keyset_page(
                conn,
                table="kb_documents",
                id_col="coalesce(file_id, id)",
                select=kb_store._DOC_COLS,
                where="""tenant = $1 AND kb_id = $2 AND replaced_by IS NULL
                         AND ($3::text[] IS NULL OR status = ANY($3::text[]))
                         AND ($4::boolean IS NULL OR (reason_code IS NOT DISTINCT FROM 'cancelled') = $4)
                         AND ($5::text[] IS NULL OR file_id = ANY($5::text[]))""",
                args=[owner, kb.id, states[status], cancelled, batch_file_ids],
                lp=lp,
            )
        return json_response(list_body([describe_file(kb_store._doc(r), kb) for r in rows], more))

    async def get_file(self, request: Request) -> Response:
        owner = tenant(request)
        async with tenant_transaction(self.store.pool, owner) as conn:
            kb = _kb(await self._row(conn, owner, path_id(request, "vs_id")))
            doc = await self._doc(conn, owner, kb.id, path_id(request, "file_id"))
        out = describe_file(doc, kb)
        return json_response(out, headers=self._poll_headers(out["status"]))

    async def update_file(self, request: Request) -> Response:
        data = await inp.body(request)
        _only(data, frozenset({"attributes"}))
        if "attributes" not in data:
            raise InvalidRequest(
                "Missing required parameter: 'attributes'.", param="attributes", code="missing_required_parameter"
            )
        attributes = _attributes(data.get("attributes"))
        owner = tenant(request)
        async with tenant_transaction(self.store.pool, owner) as conn:
            kb = _kb(await self._row(conn, owner, path_id(request, "vs_id")))
            doc = await self._doc(conn, owner, kb.id, path_id(request, "file_id"))
            row = await conn.fetchrow(
                f"""UPDATE kb_documents SET attributes = $3::jsonb, updated_at = now()
                    WHERE id = $1 AND tenant = $2 RETURNING {kb_store._DOC_COLS}""",
                doc.id,
                owner,
                orjson.dumps(attributes).decode(),
            )
        return json_response(describe_file(kb_store._doc(row), kb))

    async def remove_file(self, request: Request) -> Response:
        """Removes the file from the vector store (its chunks go); the file itself stays."""
        owner = tenant(request)
        async with tenant_transaction(self.store.pool, owner) as conn:
            kb = _kb(await self._row(conn, owner, path_id(request, "vs_id")))
            doc = await self._doc(conn, owner, kb.id, path_id(request, "file_id"))
            await kb_store.delete_document(conn, owner, doc.id)
        with contextlib.suppress(OSError):
            self.store.document_path(owner, doc.id).unlink()
        return json_response({"id": doc.file_id or doc.id, "object": "vector_store.file.deleted", "deleted": True})

    async def file_content(self, request: Request) -> Response:
        """The parsed text of a vector-store file: its chunks, in order (at most 1,000)."""
        owner = tenant(request)
        async with tenant_transaction(self.store.pool, owner) as conn:
            kb = _kb(await self._row(conn, owner, path_id(request, "vs_id")))
            doc = await self._doc(conn, owner, kb.id, path_id(request, "file_id"))
            rows = await conn.fetch(
                """SELECT text FROM kb_chunks WHERE tenant = $1 AND document_id = $2 AND generation = $3
                   ORDER BY idx LIMIT 1001""",
                owner,
                doc.id,
                doc.generation,
            )
        data = [{"type": "text", "text": r["text"]} for r in rows[:1000]]
        return json_response(
            {"object": "vector_store.file_content.page", "data": data, "has_more": len(rows) > 1000, "next_page": None}
        )

    # ---- file batches --------------------------------------------------------------------------
    async def create_batch(self, request: Request) -> Response:
        data = await inp.body(request)
        _only(data, BATCH_FIELDS)
        file_ids = _file_ids(data.get("file_ids"))
        attributes = _attributes(data.get("attributes"))
        chunking = _chunking(data.get("chunking_strategy"))
        entries = [(f, attributes, chunking, f"file_ids[{i}]") for i, f in enumerate(file_ids)]
        files = data.get("files")
        if files is not None:
            if file_ids:
                raise InvalidRequest("Give 'file_ids' or 'files', not both.", param="files", code="invalid_value")
            if not isinstance(files, list) or not 1 <= len(files) <= MAX_FILE_IDS:
                raise InvalidRequest(f"'files' must be an array of 1 to {MAX_FILE_IDS} objects.", param="files")
            for i, item in enumerate(files):
                if not isinstance(item, dict):
                    raise InvalidRequest(f"'files[{i}]' must be an object.", param=f"files[{i}]", code="invalid_type")
                _only(item, FILE_FIELDS, f"files[{i}].")
                fid = inp.text(item, "file_id", required=True, max_len=MAX_ID)
                entries.append(
                    (
                        fid,
                        _attributes(item.get("attributes"), f"files[{i}].attributes")
                        if "attributes" in item
                        else attributes,
                        _chunking(item.get("chunking_strategy"), f"files[{i}].chunking_strategy") or chunking,
                        f"files[{i}].file_id",
                    )
                )
        if not entries:
            raise InvalidRequest(
                "Missing required parameter: 'file_ids'.", param="file_ids", code="missing_required_parameter"
            )
        owner = tenant(request)
        created: list[kb_store.Document] = []
        async with tenant_transaction(self.store.pool, owner) as conn:
            kb = _kb(await self._row(conn, owner, path_id(request, "vs_id")))
            attached = []
            for fid, attrs, chunks, param in entries:
                doc, new = await self._attach(conn, owner, kb, fid, attrs, chunks, param)
                attached.append(doc.file_id)
                if new:
                    created.append(doc)
            batch = await conn.fetchrow(
                """INSERT INTO kb_file_batches (id, tenant, kb_id, file_ids) VALUES ($1, $2, $3, $4)
                   RETURNING id, kb_id, file_ids, cancelled, created_at""",
                new_id("vsfb_"),
                owner,
                kb.id,
                list(dict.fromkeys(attached)),
            )
            out = await self._describe_batch(conn, owner, batch)
        await self._enqueue(owner, created)
        return json_response(out, headers=self._poll_headers(out["status"]))

    async def _batch(self, conn, owner: str, request: Request):
        vs = await self._row(conn, owner, path_id(request, "vs_id"))
        batch_id = path_id(request, "batch_id")
        row = await conn.fetchrow(
            """SELECT id, kb_id, file_ids, cancelled, created_at FROM kb_file_batches
               WHERE id = $1 AND kb_id = $2 AND tenant = $3""",
            batch_id,
            vs["id"],
            owner,
        )
        if row is None:
            raise NotFound(f"No file batch found with id '{batch_id}'.", param="batch_id")
        return row

    async def _describe_batch(self, conn, owner: str, batch) -> dict:
        rows = await conn.fetch(
            """SELECT status, reason_code, count(*) AS n, sum(bytes)::bigint AS bytes FROM kb_documents
               WHERE tenant = $1 AND kb_id = $2 AND file_id = ANY($3::text[]) AND replaced_by IS NULL
               GROUP BY status, reason_code""",
            owner,
            batch["kb_id"],
            batch["file_ids"],
        )
        counts, _ = _counts(rows)
        if counts["in_progress"]:
            status = "in_progress"
        elif batch["cancelled"]:
            status = "cancelled"
        elif counts["total"] and counts["failed"] == counts["total"]:
            status = "failed"
        else:
            status = "completed"
        return {
            "id": batch["id"],
            "object": "vector_store.files_batch",
            "vector_store_id": batch["kb_id"],
            "status": status,
            "file_counts": counts,
            "created_at": ts(batch["created_at"]),
        }

    async def get_batch(self, request: Request) -> Response:
        owner = tenant(request)
        async with tenant_transaction(self.store.pool, owner) as conn:
            out = await self._describe_batch(conn, owner, await self._batch(conn, owner, request))
        return json_response(out, headers=self._poll_headers(out["status"]))

    async def cancel_batch(self, request: Request) -> Response:
        """Files of the batch not yet started are cancelled; those being processed finish."""
        owner = tenant(request)
        async with tenant_transaction(self.store.pool, owner) as conn:
            batch = await self._batch(conn, owner, request)
            await conn.execute(
                "UPDATE kb_file_batches SET cancelled = true WHERE id = $1 AND tenant = $2", batch["id"], owner
            )
            await conn.execute(
                """UPDATE kb_documents SET status = 'failed', reason = 'cancelled before processing started',
                          reason_code = $4, updated_at = now()
                   WHERE tenant = $1 AND kb_id = $2 AND file_id = ANY($3::text[]) AND status = 'queued'""",
                owner,
                batch["kb_id"],
                batch["file_ids"],
                ingest.CANCELLED,
            )
            out = await self._describe_batch(conn, owner, await self._batch(conn, owner, request))
        return json_response(out)

    async def batch_files(self, request: Request) -> Response:
        owner = tenant(request)
        async with tenant_transaction(self.store.pool, owner) as conn:
            batch = await self._batch(conn, owner, request)
        return await self.list_files(request, list(batch["file_ids"]))

    # ---- search --------------------------------------------------------------------------------
    async def search(self, request: Request) -> Response:
        data = await inp.body(request)
        _only(data, SEARCH_FIELDS)
        raw = data.get("query")
        if isinstance(raw, str):
            queries = [raw]
        elif isinstance(raw, list) and 1 <= len(raw) <= MAX_QUERIES and all(isinstance(q, str) for q in raw):
            queries = raw
        elif raw is None:
            raise InvalidRequest(
                "Missing required parameter: 'query'.", param="query", code="missing_required_parameter"
            )
        else:
            raise InvalidRequest(
                f"'query' must be a string or an array of 1 to {MAX_QUERIES} strings.",
                param="query",
                code="invalid_type",
            )
        text = " ".join(q.strip() for q in queries).strip()
        if not text or "\x00" in text or len(text) > retrieve.MAX_QUERY_CHARS:
            raise InvalidRequest(
                f"'query' must have 1 to {retrieve.MAX_QUERY_CHARS} characters of text.",
                param="query",
                code="invalid_value",
            )
        top = data.get("max_num_results", 10)
        if not isinstance(top, int) or isinstance(top, bool) or not 1 <= top <= 50:
            raise InvalidRequest("'max_num_results' must be an integer from 1 to 50.", param="max_num_results")
        ranking = data.get("ranking_options") or {}
        if not isinstance(ranking, dict):
            raise InvalidRequest("'ranking_options' must be an object.", param="ranking_options", code="invalid_type")
        _only(ranking, frozenset({"ranker", "score_threshold"}), "ranking_options.")
        if ranking.get("ranker") is not None and ranking["ranker"] not in RANKERS:
            raise InvalidRequest(
                f"'ranking_options.ranker' must be one of {', '.join(RANKERS)}.", param="ranking_options.ranker"
            )
        threshold = ranking.get("score_threshold", 0.0)
        if not isinstance(threshold, int | float) or isinstance(threshold, bool) or not 0 <= threshold <= 1:
            raise InvalidRequest(
                "'ranking_options.score_threshold' must be a number from 0 to 1.",
                param="ranking_options.score_threshold",
            )
        if data.get("rewrite_query") not in (None, True, False):
            raise InvalidRequest("'rewrite_query' must be a boolean.", param="rewrite_query", code="invalid_type")
        where_args: list = []
        condition = None
        if data.get("filters") is not None:
            try:
                condition = compile_filter(data["filters"], where_args, column="attributes")
            except InvalidAttributes as exc:
                raise _bad(exc) from None
        owner = tenant(request)
        async with tenant_transaction(self.store.pool, owner) as conn:
            row = await self._row(conn, owner, path_id(request, "vs_id"))
            kb = _kb(row)
            doc_ids = None
            if condition is not None:
                n = len(where_args)
                found = await conn.fetch(
                    f"""SELECT id FROM kb_documents WHERE tenant = ${n + 1} AND kb_id = ${n + 2}
                          AND replaced_by IS NULL AND status = 'ready' AND {condition}""",
                    *where_args,
                    owner,
                    kb.id,
                )
                doc_ids = [r["id"] for r in found]
            if row["last_active_at"] is None or row["last_active_at"] < datetime.now(UTC) - timedelta(minutes=1):
                await conn.execute(
                    "UPDATE knowledge_bases SET last_active_at = now() WHERE id = $1 AND tenant = $2", kb.id, owner
                )
        vector, _ = await kb_embedding.query_vector(self.store.svc, kb, text)
        hits = []
        if doc_ids is None or doc_ids:
            result = await retrieve.retrieve(
                self.store.pool,
                owner,
                [kb.id],
                text,
                vector,
                top_k=top,
                threshold=float(threshold),
                max_context_tokens=10**9,
                candidates=max(40, 2 * top),
                lexical_floor=None,
                document_ids=doc_ids,
                # "auto" (the default): the knowledge base's rerank_model when it has one
                reranker=rerank.for_kb(self.store.svc, kb) if ranking.get("ranker") != "none" else None,
            )
            hits = result.hits
        docs = {}
        if hits:
            async with tenant_transaction(self.store.pool, owner) as conn:
                rows = await conn.fetch(
                    """SELECT id, file_id, filename, attributes FROM kb_documents
                       WHERE id = ANY($1::text[]) AND tenant = $2""",
                    sorted({h.document_id for h in hits}),
                    owner,
                )
            docs = {r["id"]: r for r in rows}
        data_out = []
        for h in hits:
            d = docs.get(h.document_id)
            if d is None:
                continue
            score = h.rerank_score if h.rerank_score is not None else h.similarity
            data_out.append(
                {
                    "file_id": d["file_id"] or d["id"],
                    "filename": d["filename"],
                    "score": round(min(1.0, max(0.0, score if score is not None else h.score)), 6),
                    "attributes": _json_col(d["attributes"]) or {},
                    "content": [{"type": "text", "text": h.text}],
                }
            )
        return json_response(
            {
                "object": "vector_store.search_results.page",
                "search_query": raw,
                "data": data_out,
                "has_more": False,
                "next_page": None,
            }
        )
