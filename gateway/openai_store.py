"""The app behind ``/v1/files…`` and ``/v1/vector_stores…`` (gateway/openai_files.py and
gateway/openai_vector_stores.py): the caller's key is authenticated like every /v1 call, then a
small Starlette router dispatches; every error is OpenAI-shaped."""

from __future__ import annotations

import logging
from pathlib import Path

import asyncpg
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from core.errors import GatewayError, InvalidRequest, MethodNotAllowed, NotFound
from gateway import key_window, openai_files, openai_vector_stores
from gateway.db import BUSY, busy_error
from rag import ingest

log = logging.getLogger("gateway.files")

PREFIXES = ("/v1/files", "/v1/vector_stores")


def handles(path: str) -> bool:
    """Whether ``path`` belongs to the files / vector stores API."""
    for prefix in PREFIXES:
        if path == prefix or path.startswith(prefix + "/"):
            return True
    return False


async def _error(request: Request, exc: GatewayError) -> Response:
    return Response(exc.body(), status_code=exc.status, media_type="application/json", headers=exc.headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    cls = {404: NotFound, 405: MethodNotAllowed}.get(exc.status_code, InvalidRequest)
    err = cls(f"{exc.detail} ({request.method} {request.url.path[:200]})")
    err.status = exc.status_code
    return await _error(request, err)


async def _internal_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, BUSY):  # e.g. an upload that waited past the driver's timeout on the storage lock
        log.warning("files / vector stores call gave up on a busy database: %s", type(exc).__name__)
        return await _error(request, busy_error())
    log.exception("files / vector stores API error")
    return await _error(request, GatewayError("The server had an error while processing your request."))


class OpenAIStore:
    """``/v1/files…`` and ``/v1/vector_stores…``: authenticated like every /v1 call (the bearer
    key, then its allowed networks), held to the key's calls per minute (its rpm, else
    ``limits.key``'s, else key_window.DEFAULT_PER_MINUTE), then routed by a small Starlette app."""

    def __init__(self, gateway) -> None:
        self.gateway = gateway  # GatewayApp: .svc is set at start-up
        self.files = openai_files.Files(self)
        self.vector_stores = openai_vector_stores.VectorStores(self)
        self.app = Starlette(
            routes=[*self.files.routes(), *self.vector_stores.routes()],
            exception_handlers={GatewayError: _error, HTTPException: _http_error, Exception: _internal_error},
        )

    @property
    def svc(self):
        return self.gateway.svc

    @property
    def pool(self) -> asyncpg.Pool:
        return self.svc.pool

    @property
    def kb(self):
        if self.svc.kb is None:
            raise GatewayError("Knowledge bases are not enabled on this gateway.")
        return self.svc.kb

    @property
    def data_dir(self) -> Path:
        return self.kb.data_dir

    def document_path(self, tenant_name: str, doc_id: str) -> Path:
        return ingest.document_path(self.data_dir, tenant_name, doc_id)

    async def __call__(self, scope, receive, send) -> None:
        ident_ = await self.svc.auth.authenticate_scope(scope)
        # each call costs database work (and an upload, disk): a per-key window shared by every
        # replica, counted before the body is read (gateway/key_window.py)
        await key_window.admit(self.svc, ident_, "store", "Files and vector store calls")
        scope.setdefault("state", {})["identity"] = ident_
        await self.app(scope, receive, send)
