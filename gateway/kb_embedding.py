"""Knowledge-base embeddings through the gateway's own embeddings path.

A knowledge base names its embedding model: the offline local model (``local/all-MiniLM-L6-v2``)
or any model group of mode ``embedding`` the gateway routes. Ingestion and queries embed with a
provider group *in process*, through the same stages as a client's ``POST /v1/embeddings``:
route (fallbacks, key balancing, circuit breakers) → admit (rate limits, the budget
reservation) → scrub (PII policy) → complete (retries) → settle (cost, budgets, the ledger),
attributed to the knowledge base's tenant under the workflow ``kb-ingest`` or ``kb-query``.

In process rather than over HTTP to itself: no loopback hop, no API key to mint and keep for
the gateway's own use, no second authentication; the pipeline's stages are plain functions
(pipeline.route/admit/scrub/complete/settle) and run the same either way.
"""

from __future__ import annotations

import base64
import struct
import time

import numpy as np
import orjson

from core.errors import GatewayError, InvalidRequest, PermissionDenied
from core.types import Identity, RequestContext
from gateway.validation import validate_embeddings
from rag.embedding import MODEL as LOCAL_MODEL
from rag.store import MAX_DIMS

MAX_BATCH = 256  # texts per upstream call
PROBE = "knowledge base dimension probe"


class EmbeddingFailed(Exception):
    """The embeddings call failed after the pipeline's retries and fallbacks (safe to show)."""


class GatewayEmbedder:
    """Embeddings of a model group for a tenant's knowledge bases, L2-normalised."""

    def __init__(self, svc, model: str, tenant: str, workflow: str, identity: Identity | None = None) -> None:
        self.svc = svc
        self.model = model
        self.workflow = workflow
        # ``identity``: the key a client's query runs for (its model allow-list, rate limits and
        # budgets apply, and the ledger names it); else the tenant's own (ingestion, admin tools)
        self.identity = identity or Identity(key_id=f"kb:{tenant}", name="knowledge-bases", tenant=tenant)

    async def embed(self, texts: list[str]) -> list[list[float]]:
        out: list[list[float]] = []
        for start in range(0, len(texts), MAX_BATCH):
            out.extend(await self._call(texts[start : start + MAX_BATCH]))
        return out

    async def _call(self, texts: list[str]) -> list[list[float]]:
        from gateway import pipeline  # (pipeline → agent stage → grounding → here)

        if not texts:
            return []
        ctx = batch_context(self.model, texts)
        body = ctx.body
        ctx.identity = self.identity
        ctx.model = self.model
        scope = {"headers": [(b"x-gateway-workflow", self.workflow.encode())], "client": None}
        try:
            validate_embeddings(body)
            group = pipeline.route(self.svc, ctx, scope, "embedding")
            await pipeline.admit(self.svc, ctx, scope)
            await pipeline.scrub(self.svc, ctx)
            raw = await pipeline.complete(self.svc, ctx, group)
        except GatewayError as exc:
            ctx.status = exc.status
            ctx.error_code = exc.code
            await pipeline.settle(self.svc, ctx, scope)
            if exc.code == "pii_too_much_to_check" and len(texts) > 1:
                # past a per-request PII analysis bound (pii.max_phone_checks, max_analysed_chars):
                # a document's batch is split as a client would split it, each half bounded again
                half = len(texts) // 2
                return await self._call(texts[:half]) + await self._call(texts[half:])
            raise EmbeddingFailed(f"embedding model {self.model!r} failed ({exc.code or exc.status})") from None
        await pipeline.settle(self.svc, ctx, scope)
        return _vectors(raw, len(texts))


def batch_context(model: str, texts: list[str]) -> RequestContext:
    """The request context of one batch, sized as a client's body of the same texts would be: a
    large batch's token estimate (a provider that reports no usage) is then counted off the event
    loop, as a client's ``POST /v1/embeddings`` is (``pipeline._estimate``, ``usage.OFF_LOOP_BYTES``)."""
    body = {"model": model, "input": [t if t else " " for t in texts], "encoding_format": "float"}
    ctx = RequestContext(
        request_id=f"kbemb-{time.time_ns():x}", endpoint="embeddings", body=body, started=time.perf_counter()
    )
    ctx.body_bytes = len(orjson.dumps(body))
    return ctx


def _vectors(raw: bytes, count: int) -> list[list[float]]:
    """One L2-normalised vector per text from the provider's answer; anything else (not JSON,
    base64 that is not floats, NaN or infinite components, more than ``MAX_DIMS`` dimensions:
    pgvector and retrieval refuse them) is the provider's bad answer, EmbeddingFailed."""
    try:
        return _read_vectors(raw, count)
    except (ValueError, TypeError, AttributeError, struct.error):
        raise EmbeddingFailed("the embeddings answer could not be read") from None


def _read_vectors(raw: bytes, count: int) -> list[list[float]]:
    data = orjson.loads(raw).get("data")
    if not isinstance(data, list) or len(data) != count:
        raise EmbeddingFailed("the embeddings answer does not have one vector per text")
    out: list[list[float]] = [[] for _ in range(count)]
    for pos, item in enumerate(data):
        index = item.get("index", pos) if isinstance(item, dict) else pos
        emb = item.get("embedding") if isinstance(item, dict) else None
        if isinstance(emb, str):
            buf = base64.b64decode(emb)
            emb = list(struct.unpack(f"<{len(buf) // 4}f", buf))
        if not isinstance(emb, list) or not emb or not isinstance(index, int) or not 0 <= index < count:
            raise EmbeddingFailed("the embeddings answer has an invalid vector")
        vec = np.asarray(emb, dtype=np.float64)
        if vec.ndim != 1 or len(vec) > MAX_DIMS or not np.isfinite(vec).all():
            raise EmbeddingFailed("the embeddings answer has an invalid vector")
        top = float(np.abs(vec).max())
        vec = vec / top if top > 0 else vec  # (squares of components near 1e308 overflow)
        norm = float(np.linalg.norm(vec))
        out[index] = (vec / norm if norm > 0 else vec).tolist()
    if any(not v for v in out) or len({len(v) for v in out}) != 1:
        raise EmbeddingFailed("the embeddings answer has missing or uneven vectors")
    return out


def check_model(svc, model: str, ident: Identity | None, param: str = "embedding_model") -> None:
    """400 unless ``model`` is the local model or a configured embedding group; 403 when the
    caller's key may not use it (its model allow-list)."""
    if model == LOCAL_MODEL:
        if svc.embedder is None:
            raise InvalidRequest(
                f"The local embedding model {LOCAL_MODEL!r} is not installed on this gateway.",
                param=param,
                code="model_not_available",
            )
        return
    group = svc.router.model(model)
    if group is None or group.mode != "embedding":
        raise InvalidRequest(
            f"{model[:64]!r} is not a configured embedding model group; use one of mode 'embedding' "
            f"or {LOCAL_MODEL!r}.",
            param=param,
            code="model_not_available",
        )
    if ident is not None and not ident.is_master and ident.models and model not in ident.models:
        raise PermissionDenied(f"This API key may not use model `{model[:64]}`.", param=param, code="model_not_allowed")


async def probe_dims(svc, model: str, tenant: str) -> int:
    """The dimension of a model's vectors: one short text embedded through the gateway."""
    if model == LOCAL_MODEL:
        return svc.embedder.dims
    try:
        vec = (await GatewayEmbedder(svc, model, tenant, "kb-ingest").embed([PROBE]))[0]
    except EmbeddingFailed as exc:
        raise InvalidRequest(str(exc), param="embedding_model", code="model_unavailable") from None
    return len(vec)


def embedder_for(svc, model: str, tenant: str, workflow: str, identity: Identity | None = None):
    """The embedder of ``model`` for ``tenant``'s knowledge bases; None when it is unknown."""
    if model == LOCAL_MODEL:
        return svc.embedder
    group = svc.router.model(model)
    if group is None or group.mode != "embedding":
        return None
    return GatewayEmbedder(svc, model, tenant, workflow, identity)


async def query_vector(svc, kb, text: str, identity: Identity | None = None) -> tuple[list[float] | None, str | None]:
    """(the query embedded with the knowledge base's model, None) or (None, why not): a
    failing model leaves full-text search, never a failed query. ``identity``: the client key
    the query is for (a /v1 search), held to its own allow-list, limits and budgets."""
    embedder = embedder_for(svc, kb.embedding_model, kb.tenant, "kb-query", identity)
    if embedder is None:
        return None, f"the embedding model {kb.embedding_model!r} is not available here: full-text search only"
    try:
        vector = (await embedder.embed([text]))[0]
    except EmbeddingFailed as exc:
        return None, f"{exc}: full-text search only"
    if len(vector) != kb.dims:  # compared with no chunk, it would leave no result at all
        return None, f"the embedding model answered {len(vector)} dimensions, not {kb.dims}: full-text search only"
    return vector, None


def payer(tenant: str, who: dict | None) -> Identity | None:
    """Who an ingestion job's embeddings run for: the client key that attached the file (its
    budgets hold, its ledger rows name it, its PII policy scrubs the text), else (None) the
    tenant's own identity."""
    if not who or not who.get("key_id"):
        return None
    fixed = who.get("attribution") if isinstance(who.get("attribution"), dict) else {}
    return Identity(
        key_id=who["key_id"],
        name="knowledge-bases",
        tenant=tenant,
        pii_policy=who.get("pii_policy"),
        attribution={k: [str(v)] for k, v in fixed.items() if k in _FIXED} or None,  # filled in at admission
    )


_FIXED = ("user", "customer", "agent")  # what a key may be bound to that an embedding call is attributed to


def _fixed_attribution(ident: Identity) -> dict[str, str]:
    """The values a key asserts on every request of its (one exact value allowed for a field):
    its files' embeddings are attributed to them too, on their budgets."""
    out = {}
    for name, patterns in (ident.attribution or {}).items():
        if name in _FIXED and isinstance(patterns, list) and len(patterns) == 1 and not patterns[0].endswith("*"):
            out[name] = patterns[0]
    return out


def check_payer(kb, ident: Identity) -> dict | None:
    """The key an attach of ``ident``'s to ``kb`` is embedded for, as the job names it
    (``key_id``, ``pii_policy``; None: the master key, the tenant pays); 403 when the key may
    not use the knowledge base's provider embedding model."""
    if ident.is_master:
        return None
    model = kb.embedding_model
    if model != LOCAL_MODEL and ident.models and model not in ident.models:
        raise PermissionDenied(
            f"This API key may not use the vector store's embedding model `{model[:64]}`.",
            param="vector_store_id",
            code="model_not_allowed",
        )
    who = {"key_id": ident.key_id}
    if ident.pii_policy:
        who["pii_policy"] = ident.pii_policy
    fixed = _fixed_attribution(ident)
    if fixed:
        who["attribution"] = fixed
    return who


def install(svc) -> None:
    """Lets the ingestion worker embed with any model group (called once the services exist)."""
    if svc.kb is not None:
        svc.kb.embedders = lambda model, tenant, who=None: (
            svc.kb.embedder
            if model == LOCAL_MODEL
            else embedder_for(svc, model, tenant, "kb-ingest", payer(tenant, who))
        )
