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

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.errors import InvalidRequest, NotFound, PermissionDenied
from gateway import admin_input as inp
from gateway import kb_embedding, kb_limits, openai_files, openai_vector_search, vector_store_attach
from gateway.admin_kb import _only
from gateway.db import tenant_transaction
from gateway.openai_common import (
    MAX_ID,
    ident,
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
from gateway.openai_vector_store_objects import (
    _KB_COLS,
    MANAGED_SQL,
    MAX_FILE_IDS,
    _attributes,
    _chunking,
    _counts,
    _expires_after,
    _file_ids,
    _kb,
    _metadata,
    _store_counts,
    check_not_expired,
    describe_file,
    describe_store,
    manages,
)
from rag import ingest
from rag import store as kb_store
from rag.embedding import DIMS as LOCAL_DIMS
from rag.embedding import MODEL as LOCAL_MODEL

POLL_AFTER_MS = "250"
CREATE_FIELDS = frozenset({"name", "description", "file_ids", "chunking_strategy", "metadata", "expires_after"})
UPDATE_FIELDS = frozenset({"name", "metadata", "expires_after"})
FILE_FIELDS = frozenset({"file_id", "attributes", "chunking_strategy"})
BATCH_FIELDS = frozenset({"file_ids", "files", "attributes", "chunking_strategy"})


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

    async def _writable(self, conn, owner: str, request: Request):
        """The vector store's row when the caller may change it. A knowledge base made through
        the admin API, or one an agent of the tenant answers from, is the operators': any key
        of the tenant reads and searches it, only a key with the admin scope changes it (a key
        minted to chat must not delete it or put text into agents' prompts)."""
        row = await self._row(conn, owner, path_id(request, "vs_id"))
        if manages(ident(request)):
            return row
        managed = await conn.fetchval(
            f"SELECT {MANAGED_SQL} FROM knowledge_bases k WHERE k.id = $1 AND k.tenant = $2", row["id"], owner
        )
        if managed:
            raise PermissionDenied(
                f"The vector store '{row['id']}' is a knowledge base the tenant's operators manage (made through "
                "the admin API, or one an agent answers from): any key may search it, only a key with the admin "
                "scope may change it.",
                param="vector_store_id",
                code="knowledge_base_managed",
            )
        return row

    async def _describe(self, conn, owner: str, row) -> dict:
        counts = await _store_counts(conn, owner, [row["id"]])
        return describe_store(row, counts[row["id"]])

    async def _doc(self, conn, owner: str, kb_id: str, file_id: str) -> kb_store.Document:
        return await vector_store_attach.find_document(conn, owner, kb_id, file_id)

    async def _enqueue(self, owner: str, docs: list[kb_store.Document], payer: dict | None) -> None:
        """After the commit: each new document gets the file's bytes and its ingestion job (a
        rolled-back attach leaves nothing on disk); ``payer``: the key its embeddings run for
        (kb_embedding.check_payer)."""
        for doc in docs:
            try:
                source = openai_files.file_path(self.store.data_dir, owner, doc.file_id)
                link_or_copy(source, self.store.document_path(owner, doc.id))
            except FileNotFoundError:  # the file was deleted meanwhile
                async with tenant_transaction(self.store.pool, owner) as conn:
                    await kb_store.set_status(
                        conn, owner, doc.id, "failed", "The file was deleted before it was processed.", "file_missing"
                    )
                continue
            job = {
                "tenant": owner,
                "kb_id": doc.kb_id,
                "document_id": doc.id,
                "path": str(self.store.document_path(owner, doc.id)),
                "sha256": doc.sha256,
                "queued_at": time.time(),
            }
            job.update(payer or {})
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
            await kb_limits.check_room_for_kb(conn, owner)
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
            payer = kb_embedding.check_payer(kb, ident(request))
            entries = [(f, {}, chunking, f"file_ids[{i}]") for i, f in enumerate(file_ids)]
            for doc, new in await vector_store_attach.attach(conn, owner, kb, entries, kb_limits.of(self.store.svc)):
                if new:
                    created.append(doc)
            out = await self._describe(conn, owner, row)
        await self._enqueue(owner, created, payer)
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
            row = await self._writable(conn, owner, request)
            check_not_expired(row)
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
            row = await self._writable(conn, owner, request)
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
            row = await self._writable(conn, owner, request)
            check_not_expired(row)
            kb = _kb(row)
            payer = kb_embedding.check_payer(kb, ident(request))
            [(doc, new)] = await vector_store_attach.attach(
                conn, owner, kb, [(file_id, attributes, chunking, "file_id")], kb_limits.of(self.store.svc)
            )
        if new:
            await self._enqueue(owner, [doc], payer)
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
            kb = _kb(await self._writable(conn, owner, request))
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
            kb = _kb(await self._writable(conn, owner, request))
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
            row = await self._writable(conn, owner, request)
            check_not_expired(row)
            kb = _kb(row)
            payer = kb_embedding.check_payer(kb, ident(request))
            attached = []
            for doc, new in await vector_store_attach.attach(conn, owner, kb, entries, kb_limits.of(self.store.svc)):
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
            await kb_limits.keep_newest_batches(conn, owner)  # (under the tenant's lock the attach took)
            out = await self._describe_batch(conn, owner, batch)
        await self._enqueue(owner, created, payer)
        return json_response(out, headers=self._poll_headers(out["status"]))

    async def _batch(self, conn, owner: str, request: Request, *, write: bool = False):
        if write:
            vs = await self._writable(conn, owner, request)
        else:
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
            batch = await self._batch(conn, owner, request, write=True)
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

    async def search(self, request: Request) -> Response:
        return await openai_vector_search.search(self, request)
