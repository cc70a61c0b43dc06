"""The knowledge-base admin API (``/admin/knowledge-bases...``) and the ingestion queue's admin
(``/admin/queues/kb-ingest...``, super-admin only).

Mounted into gateway/admin.py (``routes(admin)``): authenticated, tenant-scoped, access-logged
like every admin route. A tenant admin sees only its tenant's knowledge bases (filtered in SQL,
walled by row-level security); the super-admin sees every tenant, names one with ``?tenant=``
(reads) or ``"tenant"`` (create).

Uploads are multipart (the ``file`` field), parsed as they stream in (gateway/multipart_upload.py): the file's bytes go
straight to a temporary file on disk (hashed on the way), never whole into memory, and past
``MAX_UPLOAD_BYTES`` the upload is refused with a 413. The document is recorded, its file moved
to ``<data_dir>/kb/<tenant hash>/<document id>`` and the ingestion job queued in one
transaction, then the call answers 202 at once; the worker (gateway/kb_worker.py) does the rest.
The same content uploaded again answers 200 with the existing document.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core import http
from core.errors import GatewayError, InvalidRequest, NotFound, PermissionDenied
from gateway import admin as base  # a module, not names: admin.py imports this module in turn
from gateway import admin_input as inp
from gateway import kb_embedding, kb_limits, rerank, storage_quota
from gateway.db import tenant_transaction
from gateway.multipart_upload import bad_after, place, receive_upload
from rag import ingest, retrieve
from rag import store as kb_store
from rag.embedding import MODEL as LOCAL_MODEL

QUEUE_NAMES = ("kb-ingest",)

CREATE_FIELDS = frozenset({"name", "description", "embedding_model", "settings", "tenant"})
SETTING_FIELDS = frozenset({"chunk_size", "chunk_overlap", "top_k", "threshold", "max_context_tokens"})
TEXT_SETTINGS = frozenset({"rerank_model"})  # a configured model group of mode rerank, or null
QUERY_FIELDS = frozenset({"query", "top_k", "threshold", "max_context_tokens", "candidates", "lexical_floor"})
# (low, high, integer) for every setting and query parameter
_BOUNDS = {
    "chunk_size": (50, 2000, True),
    "chunk_overlap": (0, 1000, True),
    "top_k": (1, 50, True),
    "threshold": (0.0, 1.0, False),
    "max_context_tokens": (100, 100_000, True),
    "candidates": (1, retrieve.MAX_CANDIDATES, True),
    "lexical_floor": (0.0, 1.0, False),
}
_PROVIDER_MODELS = ("text-embedding-3-small", "text-embedding-3-large", "text-embedding-ada-002")


def _only(data: dict, allowed: frozenset, prefix: str = "") -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        name = str(unknown[0])[:64]
        raise InvalidRequest(
            f"Unknown parameter '{prefix}{name}'; known: {', '.join(sorted(allowed))}.",
            param=prefix + name,
            code="unknown_parameter",
        )


def _bounded(data: dict, name: str, param: str | None = None):
    value = data.get(name)
    if value is None:
        return None
    low, high, integer = _BOUNDS[name]
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = value == int(value)
    if not ok or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise InvalidRequest(
            f"'{param or name}' must be {kind} from {low:g} to {high:g}.", param=param or name, code="invalid_value"
        )
    return int(value) if integer else float(value)


def _settings(raw, router=None, ident=None, local: str | None = None) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidRequest("'settings' must be an object.", param="settings", code="invalid_type")
    _only(raw, SETTING_FIELDS | TEXT_SETTINGS, "settings.")
    out = {}
    if "rerank_model" in raw:
        out["rerank_model"] = _rerank_model(raw["rerank_model"], router, ident, local)
    for name in SETTING_FIELDS:
        value = _bounded(raw, name, f"settings.{name}")
        if value is not None:
            out["overlap" if name == "chunk_overlap" else name] = value
    size = out.get("chunk_size", kb_store.DEFAULT_SETTINGS["chunk_size"])
    if out.get("overlap", 0) > size // 2:
        raise InvalidRequest(
            "'settings.chunk_overlap' must be at most half of chunk_size.",
            param="settings.chunk_overlap",
            code="invalid_value",
        )
    return out


def _rerank_model(value, router, ident=None, local: str | None = None) -> str | None:
    """A rerank group the caller's key may use: every search of the knowledge base (by any key
    of the tenant) is re-ranked through it and billed to the tenant, so the admin who sets it
    must be allowed that model (the key's model allow-list), as for ``embedding_model``.
    ``local``: the name of the local cross-encoder, when one is loaded (rag/rerank_local.py)."""
    if value is None:
        return None
    model = router.model(value) if router is not None and isinstance(value, str) else None
    if (model is None or model.mode != "rerank") and (local is None or value != local):
        raise InvalidRequest(
            "'settings.rerank_model' must name a configured model group of mode 'rerank' (or the local "
            "re-ranker), or be null.",
            param="settings.rerank_model",
            code="invalid_value",
        )
    if ident is not None and not ident.is_master and ident.models and value not in ident.models:
        raise PermissionDenied(
            f"This API key may not use model `{value[:64]}`.", param="settings.rerank_model", code="model_not_allowed"
        )
    return value


def _local_name(svc) -> str | None:
    local = getattr(svc, "local_reranker", None)
    return local.name if local is not None else None


def describe_kb(kb: kb_store.KnowledgeBase) -> dict:
    s = kb.settings
    return {
        "id": kb.id,
        "object": "knowledge_base",
        "tenant": kb.tenant,
        "name": kb.name,
        "description": kb.description,
        "embedding_model": kb.embedding_model,
        "dims": kb.dims,
        "settings": {
            "chunk_size": s.get("chunk_size"),
            "chunk_overlap": s.get("overlap"),
            "top_k": s.get("top_k"),
            "threshold": s.get("threshold"),
            "max_context_tokens": s.get("max_context_tokens"),
            "rerank_model": s.get("rerank_model"),
        },
        "reembedding": {"embedding_model": kb.reembed_model, "dims": kb.reembed_dims} if kb.reembed_model else None,
        "created_at": kb.created_at,
    }


def describe_doc(doc: kb_store.Document) -> dict:
    return {
        "id": doc.id,
        "object": "knowledge_base.document",
        "kb_id": doc.kb_id,
        "filename": doc.filename,
        "content_type": doc.content_type,
        "bytes": doc.bytes,
        "sha256": doc.sha256,
        "status": doc.status,
        "reason": doc.reason,
        "reason_code": doc.reason_code,
        "chunks": doc.chunks,
        "embedding_model": doc.embedding_model,
        "created_at": doc.created_at,
        "updated_at": doc.updated_at,
    }


# ---- routes ------------------------------------------------------------------------------------


class KbAdmin:
    def __init__(self, admin) -> None:
        self.admin = admin

    @property
    def svc(self):
        return self.admin.svc

    @property
    def kb(self):
        if self.svc.kb is None:
            raise GatewayError("Knowledge bases are not enabled on this gateway.")
        return self.svc.kb

    def routes(self) -> list[Route]:
        return [
            Route("/admin/knowledge-bases", self.create_kb, methods=["POST"]),
            Route("/admin/knowledge-bases", self.list_kbs, methods=["GET"]),
            Route("/admin/knowledge-bases/{kb_id}", self.get_kb, methods=["GET"]),
            Route("/admin/knowledge-bases/{kb_id}", self.delete_kb, methods=["DELETE"]),
            Route("/admin/knowledge-bases/{kb_id}", self.update_kb, methods=["PATCH"]),
            Route("/admin/knowledge-bases/{kb_id}/documents", self.upload, methods=["POST"]),
            Route("/admin/knowledge-bases/{kb_id}/documents", self.list_documents, methods=["GET"]),
            Route("/admin/knowledge-bases/{kb_id}/documents/{doc_id}", self.get_document, methods=["GET"]),
            Route("/admin/knowledge-bases/{kb_id}/documents/{doc_id}", self.delete_document, methods=["DELETE"]),
            Route("/admin/knowledge-bases/{kb_id}/query", self.query, methods=["POST"]),
            Route("/admin/queues/{queue}", self.queue_stats, methods=["GET"]),
            Route("/admin/queues/{queue}/dead-letters", self.dead_letters, methods=["GET"]),
            Route("/admin/queues/{queue}/dead-letters/{dead_id}/retry", self.retry_dead, methods=["POST"]),
            Route("/admin/queues/{queue}/dead-letters/{dead_id}", self.drop_dead, methods=["DELETE"]),
        ]

    # ---- helpers -------------------------------------------------------------------------------
    async def _kb(self, request: Request, conn) -> kb_store.KnowledgeBase:
        kb_id = request.path_params["kb_id"]
        kb = await kb_store.get_kb(conn, base._view(request), kb_id[:64])
        if kb is None:
            raise NotFound(f"No knowledge base {kb_id[:64]!r}.", param="kb_id")
        return kb

    async def _doc(self, request: Request, conn, kb: kb_store.KnowledgeBase) -> kb_store.Document:
        doc_id = request.path_params["doc_id"]
        doc = await kb_store.get_document(conn, kb.tenant, doc_id[:64])
        if doc is None or doc.kb_id != kb.id or doc.replaced_by is not None:
            raise NotFound(f"No document {doc_id[:64]!r} in this knowledge base.", param="doc_id")
        return doc

    def _path(self, tenant: str, doc_id: str) -> Path:
        return ingest.document_path(self.kb.data_dir, tenant, doc_id)

    # ---- knowledge bases -----------------------------------------------------------------------
    async def create_kb(self, request: Request) -> Response:
        data = await inp.body(request)
        _only(data, CREATE_FIELDS)
        ident = base._ident(request)
        name = inp.text(data, "name", required=True, max_len=128)
        description = inp.text(data, "description", max_len=2000) or ""
        model = inp.text(data, "embedding_model", max_len=256) or LOCAL_MODEL
        kb_embedding.check_model(self.svc, model, ident)
        settings = _settings(data.get("settings"), self.svc.router, base._ident(request), _local_name(self.svc))
        tenant = inp.text(data, "tenant", max_len=128)
        if not ident.is_master:
            if tenant is not None and tenant != ident.tenant:
                raise PermissionDenied(
                    f"This admin key belongs to tenant {ident.tenant!r}.", param="tenant", code="tenant_mismatch"
                )
            tenant = ident.tenant
        tenant = tenant or "default"
        dims = await self._dims(model, tenant)
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            await kb_limits.check_room_for_kb(conn, tenant)
            try:
                kb = await kb_store.create_kb(
                    conn,
                    tenant,
                    name,
                    embedding_model=model,
                    dims=dims,
                    description=description,
                    settings=settings,
                )
            except kb_store.StoreError as exc:
                raise InvalidRequest(str(exc), param="name", code="name_taken") from None
        return base._json(describe_kb(kb), 201)

    async def list_kbs(self, request: Request) -> Response:
        """A page of the knowledge bases, oldest first (``limit``, ``after``, ``has_more``: as
        ``list_documents``); the super-admin's spans every tenant unless ``?tenant=`` names one."""
        limit, after = inp.page(request)
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            try:
                kbs = await kb_store.list_kbs(conn, base._view(request), limit=limit + 1, after=after)
            except kb_store.StoreError:
                raise bad_after("knowledge base") from None
        return base._json(inp.listing([describe_kb(k) for k in kbs[:limit]], len(kbs) > limit))

    async def get_kb(self, request: Request) -> Response:
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            kb = await self._kb(request, conn)
            counts, chunks = await kb_store.count_documents(conn, kb.tenant, kb.id)
        out = describe_kb(kb)
        out["documents"] = counts
        out["chunks"] = chunks
        return base._json(out)

    async def _dims(self, model: str, tenant: str) -> int:
        """The model's dimension (probed through the gateway) with its vector index in place."""
        dims = await kb_embedding.probe_dims(self.svc, model, tenant)
        if not 1 <= dims <= kb_store.MAX_DIMS:
            raise InvalidRequest(
                f"{model[:64]!r} makes vectors of {dims} dimensions; at most {kb_store.MAX_DIMS} are supported.",
                param="embedding_model",
                code="invalid_value",
            )
        async with self.svc.pool.acquire() as conn:  # DDL: the table owner, not a tenant role
            await kb_store.ensure_vector_index(conn, dims)
        return dims

    async def update_kb(self, request: Request) -> Response:
        """Changes settings (retrieval defaults, ``rerank_model``; chunking applies to documents
        processed from now on), the description, or the embedding model: then every document
        is embedded again in the background (a pending generation per document) while search
        keeps using the current model, and the last one switches the knowledge base at once."""
        data = await inp.body(request)
        _only(data, frozenset({"description", "settings", "embedding_model"}))
        settings = _settings(data.get("settings"), self.svc.router, base._ident(request), _local_name(self.svc))
        description = inp.text(data, "description", max_len=2000)
        model = inp.text(data, "embedding_model", max_len=256)
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            kb = await self._kb(request, conn)
        reembed: list[str] | None = None
        if model is not None and kb.reembed_model and model not in (kb.embedding_model, kb.reembed_model):
            # One move at a time: each would queue a job per document (and bill its embeddings),
            # so alternating PATCHes would flood the shared ingestion queue.
            err = InvalidRequest(
                f"The knowledge base is still moving to {kb.reembed_model!r}; change the model again "
                "when that re-embedding has finished.",
                param="embedding_model",
                code="reembedding_in_progress",
            )
            err.status = 409
            raise err
        if model is not None and model not in (kb.embedding_model, kb.reembed_model):
            kb_embedding.check_model(self.svc, model, base._ident(request))
            dims = await self._dims(model, kb.tenant)
            async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
                reembed = await kb_store.start_reembed(conn, kb.tenant, kb.id, model, dims)
                if not reembed:
                    await kb_store.finish_reembed(conn, kb.tenant, kb.id)
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            kb = await self._kb(request, conn)
            if settings:
                kb = await kb_store.update_kb_settings(conn, kb.tenant, kb.id, settings)
            if description is not None:
                await conn.execute(
                    "UPDATE knowledge_bases SET description = $3, updated_at = now() WHERE id = $1 AND tenant = $2",
                    kb.id,
                    kb.tenant,
                    description,
                )
                kb = await kb_store.get_kb(conn, kb.tenant, kb.id)
        for doc_id in reembed or ():
            job = {"kind": "reembed", "tenant": kb.tenant, "kb_id": kb.id, "document_id": doc_id, "model": model}
            await self.kb.queue.enqueue(job)
        return base._json(describe_kb(kb), 202 if reembed else 200)

    async def delete_kb(self, request: Request) -> Response:
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            kb = await self._kb(request, conn)
            # every document's id, however many (a list call's page stops at 1,000: the bytes of
            # the rest stayed on disk, counted by no quota once their rows were gone)
            docs = await conn.fetch(
                "DELETE FROM kb_documents WHERE kb_id = $1 AND tenant = $2 RETURNING id", kb.id, kb.tenant
            )
            await kb_store.delete_kb(conn, kb.tenant, kb.id)
        for doc in docs:
            with contextlib.suppress(OSError):
                self._path(kb.tenant, doc["id"]).unlink()
        return base._json({"id": kb.id, "object": "knowledge_base", "deleted": True})

    # ---- documents -----------------------------------------------------------------------------
    async def upload(self, request: Request) -> Response:
        quota = storage_quota.of(self.svc)
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            kb = await self._kb(request, conn)  # before reading the body: an unknown KB is a 404
            room = await storage_quota.precheck(conn, kb.tenant, quota)  # full: refused before 50 MB reach the disk
        with storage_quota.receiving(kb.tenant):
            upload = await receive_upload(
                request, self.kb.data_dir / "kb" / "incoming", room=room, over_room=storage_quota.full(quota)
            )
        try:
            async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
                # the tenant's storage lock, to the commit: the quota and the store's limit are exact
                room = await kb_limits.Room.take(conn, kb.tenant, kb.id, kb_limits.of(self.svc), attaching=False)
                doc, created = await kb_store.add_document(
                    conn,
                    kb.tenant,
                    kb.id,
                    filename=upload.filename,
                    content_type=upload.content_type or "application/octet-stream",
                    size=upload.size,
                    sha256=upload.sha.hexdigest(),
                )
                if created:  # (the same content again is the document it was: nothing more stored)
                    await storage_quota.check(conn, kb.tenant, quota, upload.size, counted=True)
                    room.add(upload.size, "file", attached=False)
                if not created and doc.status != "failed":
                    return base._json(describe_doc(doc), 200)
                if not created:  # the same content again after a failure: try once more
                    doc = await kb_store.set_status(conn, kb.tenant, doc.id, "queued")
                dest = self._path(kb.tenant, doc.id)
                place(upload.path, dest)
            # Queued only once the document is committed: a worker that took the job earlier
            # would find no document, drop the job, and leave the document queued forever.
            job = {
                "tenant": kb.tenant,
                "kb_id": kb.id,
                "document_id": doc.id,
                "path": str(dest),
                "sha256": doc.sha256,
                "queued_at": time.time(),
            }
            try:
                await self.kb.queue.enqueue(job)
            except Exception:
                async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
                    await kb_store.set_status(
                        conn, kb.tenant, doc.id, "failed", "The document could not be queued; upload it again."
                    )
                raise
            return base._json(describe_doc(doc), 202)
        finally:
            with contextlib.suppress(OSError):
                upload.path.unlink()

    async def list_documents(self, request: Request) -> Response:
        """A page of the documents, oldest first: ``limit`` (1–1,000, default 1,000) after the
        document ``after`` (the ``last_id`` of the page before); ``has_more`` when more follow."""
        limit, after = inp.page(request)
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            kb = await self._kb(request, conn)
            try:
                docs = await kb_store.list_documents(conn, kb.tenant, kb.id, limit=limit + 1, after=after)
            except kb_store.StoreError:
                raise bad_after("document of this knowledge base") from None
        return base._json(inp.listing([describe_doc(d) for d in docs[:limit]], len(docs) > limit))

    async def get_document(self, request: Request) -> Response:
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            kb = await self._kb(request, conn)
            doc = await self._doc(request, conn, kb)
        return base._json(describe_doc(doc))

    async def delete_document(self, request: Request) -> Response:
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            kb = await self._kb(request, conn)
            doc = await self._doc(request, conn, kb)
            await kb_store.delete_document(conn, kb.tenant, doc.id)
        with contextlib.suppress(OSError):
            self._path(kb.tenant, doc.id).unlink()
        return base._json({"id": doc.id, "object": "knowledge_base.document", "deleted": True})

    # ---- retrieval test ------------------------------------------------------------------------
    async def query(self, request: Request) -> Response:
        data = await inp.body(request)
        _only(data, QUERY_FIELDS)
        text = inp.text(data, "query", required=True, max_len=retrieve.MAX_QUERY_CHARS)
        params = {name: _bounded(data, name) for name in QUERY_FIELDS - {"query"}}
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            kb = await self._kb(request, conn)
        s = kb.settings
        top_k = params["top_k"] or s.get("top_k", 5)
        threshold = params["threshold"] if params["threshold"] is not None else s.get("threshold", 0.7)
        budget = params["max_context_tokens"] or s.get("max_context_tokens", 3000)
        notes = []
        t0 = time.perf_counter()
        vector, why = await kb_embedding.query_vector(self.svc, kb, text)
        embed_ms = round((time.perf_counter() - t0) * 1000, 3) if vector is not None else None
        if why:
            notes.append(why)
        kwargs = {}
        if params["candidates"] is not None:
            kwargs["candidates"] = params["candidates"]
        if params["lexical_floor"] is not None:
            kwargs["lexical_floor"] = params["lexical_floor"]
        reranker = rerank.for_kb(self.svc, kb)
        result = await retrieve.retrieve(
            self.svc.pool,
            kb.tenant,
            [kb.id],
            text,
            vector,
            top_k=top_k,
            threshold=threshold,
            max_context_tokens=budget,
            reranker=reranker,
            query_model=kb.embedding_model,
            **kwargs,
        )
        out = result.explain()
        if embed_ms is not None:
            out["timings_ms"] = {"embedding_ms": embed_ms, **out["timings_ms"]}
        out["notes"] = notes + out["notes"]
        doc_ids = sorted({h["document_id"] for h in out["hits"]} | {c["document_id"] for c in out["candidates"]})
        names = {}
        if doc_ids:
            async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
                rows = await conn.fetch(
                    "SELECT id, filename FROM kb_documents WHERE id = ANY($1::text[]) AND tenant = $2",
                    doc_ids,
                    kb.tenant,
                )
            names = {r["id"]: r["filename"] for r in rows}
        for item in (*out["hits"], *out["candidates"]):
            item["filename"] = names.get(item["document_id"])
        return base._json(
            {
                "object": "knowledge_base.query",
                "kb_id": kb.id,
                "query": text,
                "embedding_model": kb.embedding_model,
                "settings": {"top_k": top_k, "threshold": threshold, "max_context_tokens": budget, **kwargs},
                **out,
            }
        )

    # ---- the ingestion queue (super-admin) -----------------------------------------------------
    def _queue(self, request: Request):
        if not base._ident(request).is_master:
            raise PermissionDenied("Only the master key can manage queues.", code="super_admin_required")
        name = request.path_params["queue"]
        channel_queues = self.svc.whatsapp.queues if self.svc.whatsapp is not None else {}
        if name in channel_queues:  # the WhatsApp channel's (wa-inbound, wa-status)
            return channel_queues[name]
        if name not in QUEUE_NAMES:
            raise NotFound(f"No queue {name[:64]!r}; known: {', '.join(QUEUE_NAMES)}.", param="queue")
        return self.kb.queue

    async def queue_stats(self, request: Request) -> Response:
        queue = self._queue(request)
        return base._json({"object": "queue", "name": queue.name, **(await queue.stats())})

    async def dead_letters(self, request: Request) -> Response:
        queue = self._queue(request)
        limit = http.query_limit(request.query_params, 100, 1000)
        return base._json({"object": "list", "data": await queue.dead_letters(limit)})

    async def retry_dead(self, request: Request) -> Response:
        queue = self._queue(request)
        dead_id = request.path_params["dead_id"]
        letter = await self._letter(queue, dead_id) if queue is self.kb.queue else None
        begun = time.time()
        if not await queue.retry_dead(dead_id):
            raise NotFound(f"No dead letter {dead_id[:64]!r}.", param="dead_id")
        if letter is not None:
            await self._requeued(letter, begun)
        return base._json({"id": dead_id, "object": "queue.dead_letter", "retried": True})

    @staticmethod
    async def _letter(queue, dead_id: str) -> dict | None:
        """The payload of an ingestion dead letter (None: no such letter, or not a document's)."""
        letter = await queue.dead_letter(dead_id)
        payload = letter["payload"] if letter is not None else None
        return payload if isinstance(payload, dict) and isinstance(payload.get("document_id"), str) else None

    async def _requeued(self, payload: dict, begun: float) -> None:
        """A retried document reads ``queued`` again, not its old failure: a client polling it
        after the retry took the stale ``failed`` for the retry's outcome. Only a failure from
        before the retry is replaced (the worker may have taken the job, and ended it, already)."""
        async with tenant_transaction(self.svc.pool, None) as conn:
            await conn.execute(
                """UPDATE kb_documents SET status = 'queued', reason = NULL, reason_code = NULL, updated_at = now()
                   WHERE id = $1 AND status = 'failed' AND updated_at <= to_timestamp($2)""",
                payload["document_id"],
                begun,
            )

    async def drop_dead(self, request: Request) -> Response:
        queue = self._queue(request)
        dead_id = request.path_params["dead_id"]
        if not await queue.drop_dead(dead_id):
            raise NotFound(f"No dead letter {dead_id[:64]!r}.", param="dead_id")
        return base._json({"id": dead_id, "object": "queue.dead_letter", "deleted": True})


def routes(admin) -> list[Route]:
    """The knowledge-base and queue admin routes, for gateway/admin.py's route list."""
    return KbAdmin(admin).routes()
