"""The OpenAI Files API (``/v1/files``) and the app that serves it with the Vector Stores API
(gateway/openai_vector_stores.py), so ``client.files`` and ``client.vector_stores`` of the
OpenAI SDKs work against the gateway unchanged.

Who may call: any API key of the tenant (or the master key, which acts for the ``default``
tenant) — as in OpenAI, where the same key that chats uploads files; no extra scope is asked,
so existing SDK code works. What bounds a key that should only chat: the tenant's caps below
(files, bytes, vector stores, files per store, attached files — each checked under a
per-tenant lock, so concurrent requests cannot overshoot them), and a search's embedding and
re-ranking calls run for the calling key (its model allow-list, rate limits and budgets). Files
and vector stores belong to the caller's tenant: every statement runs in a tenant transaction
(row-level security) and filters by tenant in SQL as well, so another tenant's ids answer 404
exactly like ids that never existed. Ids are generated here (``file-…``, ``vs_…``, ``vsfb_…``).

Bounds: an upload is streamed to disk with the admin API's multipart parser (50 MB a file), a
tenant keeps at most ``policies.max_files_per_tenant`` files and documents in
``policies.max_file_bytes_per_tenant`` bytes (gateway/storage_quota.py), every list is
keyset-paginated (``limit``, ``order``, ``after``, ``before``; ``first_id``, ``last_id``,
``has_more``) with a capped ``limit``.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Literal

import asyncpg
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from core.errors import InvalidRequest, NotFound, PermissionDenied
from gateway import multipart_upload, storage_quota
from gateway.db import tenant_transaction
from gateway.openai_common import (
    MAX_ID,
    ident,
    json_response,
    keyset_page,
    list_body,
    list_params,
    new_id,
    path_id,
    tenant,
    ts,
)
from gateway.openai_vector_store_objects import MANAGED_SQL, manages

PURPOSES = ("assistants", "user_data")


# ---- files -----------------------------------------------------------------------------------


def file_path(data_dir: Path, tenant_name: str, file_id: str) -> Path:
    """Where an uploaded file's bytes are kept: ``<data_dir>/files/<tenant hash>/<file id>``."""
    return Path(data_dir) / "files" / hashlib.sha256(tenant_name.encode()).hexdigest()[:16] / file_id


def describe_file(row) -> dict:
    return {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": ts(row["created_at"]),
        "expires_at": None,
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": "processed",
        "status_details": None,
    }


_FILE_COLS = "id, tenant, filename, purpose, bytes, sha256, content_type, created_at"


async def get_file(
    conn: asyncpg.Connection,
    tenant_name: str,
    file_id: str,
    param: str = "file_id",
    lock: Literal["", "FOR UPDATE", "FOR KEY SHARE"] = "",
):
    """The file's row (404 naming ``param``), locked to the end of the transaction when asked: a
    delete takes it ``FOR UPDATE`` and an attach ``FOR KEY SHARE``, so an attach either commits
    before the delete removes the file's documents (and its document goes with them) or finds
    the file gone — never a document of a deleted file."""
    row = await conn.fetchrow(
        f"SELECT {_FILE_COLS} FROM openai_files WHERE id = $1 AND tenant = $2 {lock}", file_id[:MAX_ID], tenant_name
    )
    if row is None:
        raise NotFound(f"No such File object: {file_id[:MAX_ID]}", param=param)
    return row


async def insert_file(
    conn: asyncpg.Connection,
    owner: str,
    *,
    filename: str,
    purpose: str,
    size: int,
    sha256: str,
    content_type: str,
    quota: storage_quota.StorageQuota,
):
    """The new file's row, within the tenant's storage quota. Concurrent uploads are serialised
    per tenant from the count to the commit, so two of them can never both pass a cap that has
    room for one."""
    await storage_quota.lock(conn, owner)
    await storage_quota.check(conn, owner, quota, size)
    return await conn.fetchrow(
        f"""INSERT INTO openai_files (id, tenant, filename, purpose, bytes, sha256, content_type)
            VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {_FILE_COLS}""",
        new_id("file-"),
        owner,
        filename,
        purpose,
        size,
        sha256,
        content_type,
    )


class Files:
    def __init__(self, store) -> None:
        self.store = store

    def routes(self) -> list[Route]:
        return [
            Route("/v1/files", self.create, methods=["POST"]),
            Route("/v1/files", self.list, methods=["GET"]),
            Route("/v1/files/{file_id}", self.retrieve, methods=["GET"]),
            Route("/v1/files/{file_id}", self.delete, methods=["DELETE"]),
            Route("/v1/files/{file_id}/content", self.content, methods=["GET"]),
        ]

    async def create(self, request: Request) -> Response:
        data_dir = self.store.data_dir
        owner = tenant(request)
        quota = storage_quota.of(self.store.svc)
        async with tenant_transaction(self.store.pool, owner) as conn:  # full: refuse before 50 MB reach the disk
            room = await storage_quota.precheck(conn, owner, quota)
        with storage_quota.receiving(owner):
            upload = await multipart_upload.receive_upload(
                request, data_dir / "files" / "incoming", room=room, over_room=storage_quota.full(quota)
            )
        try:
            raw = upload.fields.get("purpose")
            purpose = raw.decode("utf-8", "replace").strip() if raw is not None else None
            if not purpose:
                raise InvalidRequest(
                    "Missing required parameter: 'purpose'.", param="purpose", code="missing_required_parameter"
                )
            if purpose not in PURPOSES:
                raise InvalidRequest(
                    f"'purpose' must be one of {', '.join(PURPOSES)} on this gateway.",
                    param="purpose",
                    code="invalid_value",
                )
            if upload.size == 0:
                raise InvalidRequest("The file is empty.", param="file", code="empty_file")
            async with tenant_transaction(self.store.pool, owner) as conn:
                row = await insert_file(
                    conn,
                    owner,
                    filename=upload.filename,
                    purpose=purpose,
                    size=upload.size,
                    sha256=upload.sha.hexdigest(),
                    content_type=upload.content_type or "application/octet-stream",
                    quota=quota,
                )
                multipart_upload.place(upload.path, file_path(data_dir, owner, row["id"]))
            return json_response(describe_file(row))
        finally:
            with contextlib.suppress(OSError):
                upload.path.unlink()

    async def list(self, request: Request) -> Response:
        lp = list_params(request, default=100, maximum=10_000)
        purpose = request.query_params.get("purpose")
        if purpose is not None and (len(purpose) > 64 or "\x00" in purpose):
            raise InvalidRequest(
                "'purpose' must be at most 64 characters, none of them NUL.", param="purpose", code="invalid_value"
            )
        owner = tenant(request)
        async with tenant_transaction(self.store.pool, owner) as conn:
            rows, more = await keyset_page(
                conn,
                table="openai_files",
                id_col="id",
                select=_FILE_COLS,
                where="tenant = $1 AND ($2::text IS NULL OR purpose = $2)",
                args=[owner, purpose],
                lp=lp,
            )
        return json_response(list_body([describe_file(r) for r in rows], more))

    async def retrieve(self, request: Request) -> Response:
        owner = tenant(request)
        async with tenant_transaction(self.store.pool, owner) as conn:
            row = await get_file(conn, owner, path_id(request, "file_id"))
        return json_response(describe_file(row))

    async def delete(self, request: Request) -> Response:
        """Deletes the file and removes it from every vector store of the tenant (as OpenAI does);
        a file an operators' knowledge base holds only for a key with the admin scope."""
        owner = tenant(request)
        async with tenant_transaction(self.store.pool, owner) as conn:
            row = await get_file(conn, owner, path_id(request, "file_id"), lock="FOR UPDATE")
            if not manages(ident(request)) and await conn.fetchval(
                f"""SELECT EXISTS (SELECT 1 FROM kb_documents d JOIN knowledge_bases k ON k.id = d.kb_id
                                   WHERE d.tenant = $1 AND d.file_id = $2 AND k.tenant = $1 AND {MANAGED_SQL})""",
                owner,
                row["id"],
            ):
                raise PermissionDenied(
                    f"The file {row['id']} is in a knowledge base the tenant's operators manage; only a key "
                    "with the admin scope may delete it.",
                    param="file_id",
                    code="knowledge_base_managed",
                )
            docs = await conn.fetch(
                "DELETE FROM kb_documents WHERE tenant = $1 AND file_id = $2 RETURNING id", owner, row["id"]
            )
            await conn.execute("DELETE FROM openai_files WHERE id = $1 AND tenant = $2", row["id"], owner)
        for doc in docs:
            with contextlib.suppress(OSError):
                self.store.document_path(owner, doc["id"]).unlink()
        with contextlib.suppress(OSError):
            file_path(self.store.data_dir, owner, row["id"]).unlink()
        return json_response({"id": row["id"], "object": "file", "deleted": True})

    async def content(self, request: Request) -> Response:
        owner = tenant(request)
        async with tenant_transaction(self.store.pool, owner) as conn:
            row = await get_file(conn, owner, path_id(request, "file_id"))
        path = file_path(self.store.data_dir, owner, row["id"])
        if not path.is_file():
            raise NotFound(f"The content of {row['id']} is no longer stored.", param="file_id")
        return FileResponse(path, media_type="application/octet-stream")
