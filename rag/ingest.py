"""The ingestion job: one uploaded document → extracted, chunked, embedded, stored.

Run by a ``core.queue.Queue`` worker (at-least-once), so it is idempotent:

- a document already ``ready`` with the payload's sha256 is left as it is (a duplicate delivery);
- chunks are written with ``rag.store.replace_chunks`` (a new generation swapped in atomically),
  so a job re-run after its worker died mid-document ends with one set of chunks, never two.

Outcomes: ``queued → processing → ready | failed``. A file that cannot give text (encrypted or
scanned PDF, corrupt DOCX, empty, unsupported type) is the document's final answer, not a job
failure: the document is marked ``failed`` with the extractor's message and the job ends
normally (retrying cannot change the file, and a dead letter would only repeat it). Problems
no retry can fix in the job itself (a malformed payload, a model this process cannot run) raise
``Fatal``; anything else (database, disk, embedder hiccups) raises for the queue to retry with
backoff, and on the last attempt the document is marked ``failed`` first, so nobody waits on a
document that will never be processed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import asyncpg

from core.queue import Fatal, Job
from rag import store
from rag.chunking import chunk
from rag.embedding import MODEL as LOCAL_MODEL
from rag.extract import ExtractionError
from rag.sandbox import TIMEOUT as EXTRACT_TIMEOUT
from rag.sandbox import extract_bounded

log = logging.getLogger("gateway.kb")

EMBED_BATCH = 64  # texts per embedder call: bounded memory, and other jobs get turns in between
LOCAL_CHUNK_SIZE = 250  # all-MiniLM-L6-v2 reads 256 word pieces; longer text would be cut unseen
LOCAL_OVERLAP = 25
CANCELLED = "cancelled"  # reason_code of a document whose batch was cancelled before it ran
MIN_CHUNK_CAP = 2_000  # chunks any document may have (check_pieces)
MIN_CHARS_PER_CHUNK = 32  # past that, the characters a chunk it must hold on average


class Embedder(Protocol):
    model: str

    async def embed(self, texts: list[str]) -> list[list[float]]: ...


# (model, tenant, payer) → its embedder, None: unknown. ``payer``: the client key a job names
# ({"key_id", "pii_policy"?, "attribution"?}: the key that attached the file pays for its
# embeddings, under its PII policy, attributed to the values it is bound to), None: the tenant's own
Embedders = Callable[[str, str, "dict[str, str] | None"], "Embedder | None"]
PAYER_FIELDS = ("key_id", "pii_policy")


def chunk_settings(kb: store.KnowledgeBase, doc: store.Document | None = None) -> tuple[int, int]:
    """(size, overlap) in tokens for a document: its own chunking strategy, else the knowledge
    base's settings."""
    own = (doc.chunking if doc is not None else None) or {}
    size = int(own.get("chunk_size") or kb.settings.get("chunk_size") or store.DEFAULT_SETTINGS["chunk_size"])
    overlap = int(own["overlap"] if "overlap" in own else (kb.settings.get("overlap") or 0))
    if kb.embedding_model == LOCAL_MODEL:
        size, overlap = min(size, LOCAL_CHUNK_SIZE), min(overlap, LOCAL_OVERLAP)
    return size, overlap


def document_path(data_dir: Path, tenant: str, document_id: str) -> Path:
    """Where an upload is kept: ``<data_dir>/kb/<tenant hash>/<document id>``."""
    return Path(data_dir) / "kb" / hashlib.sha256(tenant.encode()).hexdigest()[:16] / document_id


def _payload(job: Job) -> dict[str, str]:
    p = job.payload
    need = ("tenant", "kb_id", "document_id")
    if not isinstance(p, dict) or not all(isinstance(p.get(k), str) and p.get(k) for k in need):
        raise Fatal(f"malformed ingestion payload: needs {', '.join(need)}")
    return p


async def _mark(
    pool: asyncpg.Pool,
    tenant: str,
    document_id: str,
    status: str,
    reason: str | None = None,
    reason_code: str | None = None,
) -> None:
    async with store.scoped(pool, tenant) as conn:
        await store.set_status(conn, tenant, document_id, status, reason, reason_code)


async def handle(
    job: Job,
    *,
    pool: asyncpg.Pool,
    embedder: Embedder | None,
    data_dir: Path,
    max_attempts: int | None = None,
    extract_timeout: float = EXTRACT_TIMEOUT,
    embedders: Embedders | None = None,
) -> None:
    """Process one ingestion job (payload: tenant, kb_id, document_id, path, sha256?; or a
    re-embedding: ``kind: reembed`` and ``model``). ``max_attempts``: the queue's attempts
    (max_retries + 1); on the last one a failure marks the document ``failed`` before it is
    raised. ``embedders(model, tenant, payer)``: the embedder of a model (None: unknown), for
    the key the payload names (``key_id``, ``pii_policy``); without it only ``embedder``'s own
    model is available."""
    p = _payload(job)
    payer = {k: p[k] for k in PAYER_FIELDS if isinstance(p.get(k), str)} if isinstance(p.get("key_id"), str) else None
    if payer is not None and isinstance(p.get("attribution"), dict):  # the key's fixed user/customer/agent
        payer["attribution"] = p["attribution"]

    def pick(model: str, tenant: str) -> Embedder | None:
        if embedders is not None:
            return embedders(model, tenant, payer)
        return embedder if embedder is not None and embedder.model == model else None

    if p.get("kind") == "reembed":
        await _reembed(p, pool=pool, pick=pick)
        return
    try:
        await _process(p, pool=pool, pick=pick, data_dir=data_dir, extract_timeout=extract_timeout)
    except Fatal as exc:
        await _mark_failed(pool, p, str(exc), getattr(exc, "code", None) or "model_unavailable")
        raise
    except Exception as exc:
        if max_attempts is not None and job.attempt >= max_attempts:
            if isinstance(exc, FileNotFoundError):
                reason, code = "the uploaded file is no longer on the server's disk; upload it again", "file_missing"
            else:
                reason = f"processing failed after {job.attempt} attempts ({type(exc).__name__}); try again later"
                code = "processing_failed"
            await _mark_failed(pool, p, reason, code)
        raise


async def _mark_failed(pool: asyncpg.Pool, p: dict, reason: str, code: str) -> None:
    try:
        await _mark(pool, p["tenant"], p["document_id"], "failed", reason[:1000], code)
    except Exception as exc:  # the queue's dead letter still records the failure
        log.warning("kb ingest: cannot mark %s failed: %s", p["document_id"], exc)


async def _process(
    p: dict[str, Any],
    *,
    pool: asyncpg.Pool,
    pick: Embedders,
    data_dir: Path,
    extract_timeout: float = EXTRACT_TIMEOUT,
) -> None:
    tenant, kb_id, document_id = p["tenant"], p["kb_id"], p["document_id"]
    async with store.scoped(pool, tenant) as conn:
        kb = await store.get_kb(conn, tenant, kb_id)
        doc = await store.get_document(conn, tenant, document_id)
        if kb is None or doc is None or doc.kb_id != kb_id or doc.replaced_by is not None:
            log.info("kb ingest: document %s is gone; nothing to do", document_id)
            if doc is None:  # deleted after its bytes were placed: they must not stay on disk
                _discard(document_path(data_dir, tenant, document_id))
            return
        if doc.status == "ready" and doc.sha256 == (p.get("sha256") or doc.sha256):
            return  # a duplicate delivery of a job that finished
        if doc.status == "failed" and doc.reason_code == CANCELLED:
            return  # its batch was cancelled before it started
        await store.set_status(conn, tenant, document_id, "processing")
    embedder = pick(kb.embedding_model, tenant)
    if embedder is None:
        raise Fatal(f"the embedding model {kb.embedding_model!r} is not available on this server")
    path = document_path(data_dir, tenant, document_id)
    if not path.is_file():
        raise FileNotFoundError(f"upload of {document_id} not found")
    try:
        # PDF and DOCX in a child process with time and memory limits (rag/sandbox.py)
        sections = await extract_bounded(path, doc.filename, doc.content_type, deadline=extract_timeout)
    except ExtractionError as exc:
        await _mark(pool, tenant, document_id, "failed", exc.message, exc.code)
        log.info("kb ingest: %s failed: %s (%s)", document_id, exc.code, exc.message)
        return
    size, overlap = chunk_settings(kb, doc)
    chunks = await _in_thread(lambda: chunk(sections, size=size, overlap=overlap))
    try:
        check_pieces(chunks, doc.filename)
    except ExtractionError as exc:
        await _mark(pool, tenant, document_id, "failed", exc.message, exc.code)
        return
    vectors = await embed_chunks(embedder, chunks)
    async with store.scoped(pool, tenant) as conn:
        # The knowledge base as it is now, locked against a model switch (finish_reembed) or the
        # start of a move (start_reembed) until this document is ready: a move that began while
        # it was processed did not list it (it was not ready), and one that finished meanwhile
        # would otherwise get chunks of the old model as live content. KEY SHARE: both of those
        # lock the row FOR UPDATE, while a search's last_active_at update does not wait on it.
        now = await conn.fetchrow(
            "SELECT embedding_model, reembed_model FROM knowledge_bases WHERE id = $1 AND tenant = $2 FOR KEY SHARE",
            kb_id,
            tenant,
        )
        current = await store.get_document(conn, tenant, document_id)
        if now is None or current is None or current.replaced_by is not None:
            if current is None:
                _discard(path)
            return  # deleted while it was processed
        if now["embedding_model"] != kb.embedding_model:
            raise RuntimeError("the knowledge base changed its embedding model meanwhile")  # retried: embed again
        await store.replace_chunks(conn, tenant, kb_id, document_id, chunks, vectors, kb.embedding_model)
    log.info("kb ingest: %s ready, %d chunks", document_id, len(chunks))
    if now["reembed_model"]:  # a move to another model is under way: this document needs both
        await _reembed({**p, "model": now["reembed_model"]}, pool=pool, pick=pick)


def check_pieces(chunks, filename: str) -> None:
    """A chunk never spans two sections, so a file of many tiny ones ("# h1\nx\n# h2\nx\n"...)
    made a chunk — a row, a vector, an embedding call's share — per few bytes: 100,000 of them
    from 1 MB, ~150 MB of PostgreSQL and minutes of the shared worker. Past ``MIN_CHUNK_CAP``
    a document must average ``MIN_CHARS_PER_CHUNK`` characters a chunk (a glossary of one-line
    entries does; ordinary text is ~1,000 a chunk)."""
    chars = sum(len(c.text) for c in chunks)
    if len(chunks) > max(MIN_CHUNK_CAP, chars // MIN_CHARS_PER_CHUNK):
        raise ExtractionError(
            "too_large",
            f"{filename!r} splits into {len(chunks):,} sections of {chars // max(1, len(chunks))} characters on "
            "average; merge its short sections (or headings) and upload it again.",
        )


def _discard(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


async def embed_chunks(embedder: Embedder, chunks) -> list[list[float]]:
    """Vectors of ``chunks`` (section path + text), in batches of EMBED_BATCH."""
    vectors: list[list[float]] = []
    for start in range(0, len(chunks), EMBED_BATCH):
        batch = chunks[start : start + EMBED_BATCH]
        vectors.extend(await embedder.embed([f"{c.section}\n\n{c.text}" if c.section else c.text for c in batch]))
    return vectors


async def _reembed(p: dict[str, Any], *, pool: asyncpg.Pool, pick: Embedders) -> None:
    """A document's live chunks embedded again with the knowledge base's next model, stored as
    its pending generation; the last one to finish switches the knowledge base (atomically)."""
    tenant, kb_id, document_id, model = p["tenant"], p["kb_id"], p["document_id"], p.get("model")
    async with store.scoped(pool, tenant) as conn:
        kb = await store.get_kb(conn, tenant, kb_id)
        if kb is None or kb.reembed_model is None or kb.reembed_model != model:
            return  # finished, cancelled or superseded
        chunks = await store.live_chunks(conn, tenant, document_id)
    embedder = pick(model, tenant)
    if embedder is None:
        raise RuntimeError(f"the embedding model {model!r} is not available yet")  # retried
    vectors = await embed_chunks(embedder, chunks)
    async with store.scoped(pool, tenant) as conn:
        if await store.write_pending(conn, tenant, kb_id, document_id, chunks, vectors, model):
            if await store.finish_reembed(conn, tenant, kb_id):
                log.info("kb ingest: knowledge base %s now uses %s", kb_id, model)


async def _in_thread(fn, *args):
    return await asyncio.to_thread(fn, *args)
