"""The objects of the OpenAI Vector Stores API: reading its inputs (chunking strategies,
expiry, file ids, metadata and attributes; every problem a 400 naming the field) and writing
its shapes (``vector_store``, ``vector_store.file`` with its status and ``last_error``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import orjson

from core.errors import InvalidRequest
from gateway.admin_kb import _only
from gateway.openai_common import MAX_ID, ts
from rag import ingest
from rag import store as kb_store
from rag.attributes import InvalidAttributes, check_attributes

MAX_FILE_IDS = 500  # per create / batch call
_INVALID_FILE_CODES = frozenset(
    {
        "empty_file",
        "corrupt_pdf",
        "corrupt_docx",
        "corrupt_html",
        "encrypted_pdf",
        "no_text_layer",
        "too_large",
        "timeout",
    }
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
        if not isinstance(value, str) or not 1 <= len(value) <= MAX_ID or "\x00" in value:
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


def _expires_at(row) -> datetime | None:
    days = row["expires_after_days"]
    return (row["last_active_at"] or row["created_at"]) + timedelta(days=days) if days else None


def is_expired(row) -> bool:
    expires_at = _expires_at(row)
    return expires_at is not None and expires_at <= datetime.now(UTC)


def check_not_expired(row) -> None:
    """An expired vector store is read-only: searching or adding files to it would make it
    active again (its expiry counts from ``last_active_at``), resurrecting data its owner asked
    to expire. It can be read, listed and deleted."""
    if is_expired(row):
        raise InvalidRequest(
            f"The vector store '{row['id']}' has expired; create a new one.",
            param="vector_store_id",
            code="vector_store_expired",
        )


def describe_store(row, counts: tuple[dict, int]) -> dict:
    file_counts, usage = counts
    active = row["last_active_at"] or row["created_at"]
    days = row["expires_after_days"]
    expires_at = _expires_at(row)
    if is_expired(row):
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


# The operators' knowledge bases (SQL over ``knowledge_bases k``): made through the admin API
# (ids ``kb_…``; /v1 makes ``vs_…``), or answered from by an active agent of the tenant. Any key
# of the tenant reads and searches them; only a key with the admin scope changes them.
MANAGED_SQL = """(left(k.id, 3) <> 'vs_' OR EXISTS (
    SELECT 1 FROM agents a WHERE a.tenant = k.tenant AND a.archived_at IS NULL
      AND a.settings -> 'knowledge_bases' ? k.id))"""


def manages(ident) -> bool:
    """Whether the caller may change the operators' knowledge bases (``MANAGED_SQL``)."""
    return ident.is_master or "admin" in ident.scopes


def _kb(row) -> kb_store.KnowledgeBase:
    return kb_store._kb(row)
