"""``POST /v1/rerank`` (Cohere-compatible, as Jina, Voyage and LiteLLM's proxy speak it), and the
knowledge bases' re-ranking stage through it.

The request takes the pipeline's stages like an embeddings call: authenticate → parse (bounded
here) → route to a model group of mode ``rerank`` (the key's model allow-list holds) → admit
(rate limits, budget reservation) → scrub (PII of the query and documents) → the upstream
``/rerank`` of the deployment's provider, with retries, key rotation and fallbacks → settle
(cost, budgets, the audit record) → respond. Usage is the token count of the query and the
documents (rerank APIs bill in "search units"; tokens keep the ledger comparable).

A model named like the local cross-encoder (rag/rerank_local.py, ``rag.rerank`` in the config)
is scored in this process instead: authenticate → parse → the key's allow-list → admit → the
model on its own thread → settle → respond (no scrub: nothing leaves the gateway; no cost).

``GatewayReranker`` is rag.rerank's ``Reranker`` over the same path, in process: a knowledge
base's retrieval with ``rerank_model`` set re-ranks its candidates through a configured rerank
group, attributed to its tenant with the workflow ``kb-query``.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import orjson

from core.errors import GatewayError, InvalidRequest, PermissionDenied, ServiceUnavailable, UpstreamError
from core.tokens import count_text
from core.types import Identity, RequestContext, Usage, excerpt
from gateway import pipeline
from gateway.providers.base import bad_response
from gateway.routing import run_attempts
from gateway.usage import OFF_LOOP_BYTES
from gateway.validation import require_model
from rag.rerank import Reranker, RerankError
from rag.rerank_local import LocalReranker

MAX_DOCUMENTS = 1000
MAX_QUERY_CHARS = 8000
MAX_DOCUMENT_CHARS = 32_000
FIELDS = frozenset({"model", "query", "documents", "top_n", "return_documents", "max_chunks_per_doc", "user"})


def _bad(param: str, message: str, code: str = "invalid_value") -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


def validate_rerank(body: Any) -> None:
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    require_model(body)
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        name = str(unknown[0])[:64]
        raise _bad(name, f"Unknown parameter '{name}'.", "unknown_parameter")
    query = body.get("query")
    if not isinstance(query, str) or not query.strip():
        raise _bad("query", "'query' must be a non-empty string.", "missing_required_parameter")
    if len(query) > MAX_QUERY_CHARS:
        raise _bad("query", f"'query' must be at most {MAX_QUERY_CHARS} characters.")
    docs = body.get("documents")
    if not isinstance(docs, list) or not 1 <= len(docs) <= MAX_DOCUMENTS:
        raise _bad("documents", f"'documents' must be an array of 1 to {MAX_DOCUMENTS} documents.")
    for i, doc in enumerate(docs):
        text = doc.get("text") if isinstance(doc, dict) else doc
        if not isinstance(text, str) or (isinstance(doc, dict) and set(doc) - {"text"}):
            raise _bad(f"documents[{i}]", f"'documents[{i}]' must be a string or an object with 'text'.")
        if len(text) > MAX_DOCUMENT_CHARS:
            raise _bad(f"documents[{i}]", f"'documents[{i}]' must be at most {MAX_DOCUMENT_CHARS} characters.")
    top_n = body.get("top_n")
    if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 1):
        raise _bad("top_n", "'top_n' must be a positive integer.")
    if body.get("return_documents") not in (None, True, False):
        raise _bad("return_documents", "'return_documents' must be a boolean.", "invalid_type")
    chunks = body.get("max_chunks_per_doc")
    if chunks is not None and (not isinstance(chunks, int) or isinstance(chunks, bool) or not 1 <= chunks <= 100):
        raise _bad("max_chunks_per_doc", "'max_chunks_per_doc' must be an integer from 1 to 100.")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _bad("user", "'user' must be a string.", "invalid_type")


def _texts(body: dict) -> list[str]:
    return [d["text"] if isinstance(d, dict) else d for d in body["documents"]]


def _answer(raw: bytes, body: dict, provider: str) -> bytes:
    """The provider's results checked (indexes in range, scores numbers): the Cohere shape
    whoever answered (``_shape``)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad_response(provider, "body is not JSON") from None
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, list):
        raise bad_response(provider, "no 'results' array")
    count = len(body["documents"])
    ranked, seen = [], set()
    for item in results:
        index = item.get("index") if isinstance(item, dict) else None
        score = item.get("relevance_score") if isinstance(item, dict) else None
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < count or index in seen:
            raise bad_response(provider, "a result with an invalid index")
        if not isinstance(score, int | float) or isinstance(score, bool) or not math.isfinite(score):
            raise bad_response(provider, "a result with an invalid relevance_score")
        seen.add(index)
        ranked.append((index, float(score)))
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
    rid = data.get("id") if isinstance(data.get("id"), str) else None
    return _shape(ranked, body, meta, rid)


def _shape(ranked: list[tuple[int, float]], body: dict, meta: dict, rid: str | None) -> bytes:
    """(index, score) pairs sorted best first, cut to ``top_n``, with the documents when asked."""
    texts = _texts(body)
    out = []
    for index, score in sorted(ranked, key=lambda p: -p[1]):
        entry: dict[str, Any] = {"index": index, "relevance_score": score}
        if body.get("return_documents"):
            entry["document"] = {"text": texts[index]}
        out.append(entry)
    if body.get("top_n"):
        out = out[: body["top_n"]]
    return orjson.dumps({"id": rid, "results": out, "meta": meta})


async def _upstream(svc, ctx: RequestContext, group) -> bytes:
    async def attempt(r) -> bytes:
        adapter = svc.adapters[r.provider]
        call = getattr(adapter, "rerank", None)
        if call is None:
            raise UpstreamError(f"Provider {r.provider} has no rerank API.", code="unsupported_operation")
        raw = await call(ctx, r, await pipeline.body_for(svc, ctx, r))
        return _answer(raw, ctx.body, r.provider)

    raw = await run_attempts(svc.router, ctx, group, attempt)
    ctx.status = 200
    await estimate_usage(ctx)
    return raw


async def estimate_usage(ctx: RequestContext) -> None:
    """The usage of an answer whose provider reported none: the query and documents counted, in
    a worker thread when the request is large (tiktoken takes seconds for megabytes of text like
    "aaaa…": every other request would wait)."""
    if ctx.usage is None:
        ctx.extra["usage_estimated"] = True
        if ctx.body_bytes >= OFF_LOOP_BYTES:
            ctx.usage = await asyncio.to_thread(_counted, ctx.body)
        else:
            ctx.usage = _counted(ctx.body)


def _counted(body: dict) -> Usage:
    return Usage(prompt_tokens=sum(count_text(t) for t in [body["query"], *_texts(body)]))


def reserve_tokens(ctx: RequestContext) -> None:
    """The prompt size the budget reservation counts (the policies' estimate reads chat
    ``messages`` and embeddings ``input``; a rerank body has ``query`` and ``documents``, so
    without this an 8 MB request would reserve ~3 tokens against a hard budget)."""
    chars = len(ctx.body["query"]) + sum(len(t) for t in _texts(ctx.body))
    ctx._prompt_tokens = chars // 3 + 3


async def rerank(svc, ctx: RequestContext, scope: dict, receive, send) -> None:
    """The ``/v1/rerank`` request, stage by stage (app.py runs it like the other endpoints)."""
    await pipeline.authenticate(svc, ctx, scope)
    await pipeline.parse(svc, ctx, scope, receive, validate_rerank)
    reserve_tokens(ctx)
    local = local_reranker(svc, ctx.model)
    if local is not None:  # the local cross-encoder: nothing leaves the gateway, nothing to route
        allowed(ctx)
        if len(ctx.body["documents"]) > local.max_documents:  # refused before it counts anywhere
            raise _bad("documents", f"'documents' must hold at most {local.max_documents} documents for {local.name}.")
        await pipeline.admit(svc, ctx, scope)
        raw = await _local(ctx, local)
    else:
        group = pipeline.route(svc, ctx, scope, "rerank")
        await pipeline.admit(svc, ctx, scope)
        await pipeline.scrub(svc, ctx)
        raw = await _upstream(svc, ctx, group)
    await pipeline.settle(svc, ctx, scope)
    await pipeline.respond(ctx, raw, send)


def local_reranker(svc, name: object) -> LocalReranker | None:
    """The local cross-encoder (rag/rerank_local.py) when one is loaded and ``name`` is its name."""
    local = getattr(svc, "local_reranker", None)
    return local if local is not None and isinstance(name, str) and name == local.name else None


def local_model_objects(svc, created: int) -> list[dict]:
    """The local re-ranker as ``/v1/models`` lists a model (none when it is not loaded)."""
    local = getattr(svc, "local_reranker", None)
    return [{"id": local.name, "object": "model", "created": created, "owned_by": "gateway"}] if local else []


def allowed(ctx: RequestContext) -> None:
    """The key's model allow-list, for a model that is not a routed group."""
    ident = ctx.identity
    if ident is not None and ident.models and ctx.model not in ident.models:
        raise PermissionDenied(
            f"This API key may not use model `{excerpt(ctx.model)}`.", param="model", code="model_not_allowed"
        )


async def _local(ctx: RequestContext, local: LocalReranker) -> bytes:
    """Usage: the tokens the model read, counted on its thread (tokenizing up to 8 MB of
    documents again with tiktoken here would hold the event loop for seconds)."""
    texts = _texts(ctx.body)
    tenant = ctx.identity.tenant if ctx.identity is not None else None
    try:
        ranked, tokens = await local.rerank_counted(ctx.body["query"], texts, len(texts), owner=tenant)
    except RerankError as exc:
        raise ServiceUnavailable(str(exc), code="reranker_unavailable") from None
    ctx.status = 200
    ctx.usage = Usage(prompt_tokens=tokens)
    return _shape(ranked, ctx.body, {"model": local.name}, ctx.request_id)


class _TenantLocal:
    """The local cross-encoder for one tenant's knowledge-base queries: its calls hold at most
    the queue places of one owner (rag.rerank_local.MAX_WAITING_PER_OWNER)."""

    def __init__(self, local: LocalReranker, tenant: str) -> None:
        self.local = local
        self.tenant = tenant
        self.name = local.name

    async def rerank(self, query: str, documents: list[str], top_n: int) -> list[tuple[int, float]]:
        return (await self.local.rerank_counted(query, documents, top_n, owner=self.tenant))[0]


def reranker_for(svc, name: object, tenant: str, identity: Identity | None = None) -> Reranker | None:
    """The re-ranker a knowledge base's ``rerank_model`` names: the local cross-encoder, or a
    rerank group still configured (through the gateway's own path); else None."""
    local = local_reranker(svc, name)
    if local is not None:  # (a caller's key limited to other models gets the fused order)
        allowed_to = identity is None or not identity.models or name in identity.models
        return _TenantLocal(local, tenant) if allowed_to else None
    model = svc.router.model(name) if isinstance(name, str) else None
    if model is None or model.mode != "rerank":
        return None
    return GatewayReranker(svc, name, tenant, identity)


def for_kb(svc, kb, identity: Identity | None = None) -> Reranker | None:
    """The re-ranker of a knowledge base (``reranker_for`` its ``rerank_model``); ``identity``:
    the client key the query is for (else the tenant's own)."""
    return reranker_for(svc, kb.settings.get("rerank_model"), kb.tenant, identity)


class GatewayReranker:
    """rag.rerank.Reranker through the gateway's own rerank path, in process, for a tenant's
    knowledge-base queries (routing, fallbacks, budgets and the audit record apply)."""

    def __init__(self, svc, model: str, tenant: str, identity: Identity | None = None) -> None:
        self.svc = svc
        self.model = model
        self.name = f"gateway:{model}"
        self.identity = identity or Identity(key_id=f"kb:{tenant}", name="knowledge-bases", tenant=tenant)

    async def rerank(self, query: str, documents: list[str], top_n: int) -> list[tuple[int, float]]:
        if not documents:
            return []
        body = {"model": self.model, "query": query[:MAX_QUERY_CHARS], "documents": documents[:MAX_DOCUMENTS]}
        body["top_n"] = max(1, min(top_n, len(body["documents"])))
        ctx = RequestContext(
            request_id=f"kbrr-{time.time_ns():x}", endpoint="rerank", body=body, started=time.perf_counter()
        )
        ctx.identity = self.identity
        ctx.model = self.model
        scope = {"headers": [(b"x-gateway-workflow", b"kb-query")], "client": None}
        try:
            validate_rerank(body)
            reserve_tokens(ctx)
            group = pipeline.route(self.svc, ctx, scope, "rerank")
            await pipeline.admit(self.svc, ctx, scope)
            await pipeline.scrub(self.svc, ctx)
            raw = await _upstream(self.svc, ctx, group)
        except GatewayError as exc:
            ctx.status = exc.status
            ctx.error_code = exc.code
            await pipeline.settle(self.svc, ctx, scope)
            raise RerankError(f"rerank model {self.model!r} failed ({exc.code or exc.status})") from None
        await pipeline.settle(self.svc, ctx, scope)
        results = orjson.loads(raw)["results"]
        return [(r["index"], r["relevance_score"]) for r in results]
