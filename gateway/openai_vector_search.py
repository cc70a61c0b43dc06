"""``POST /v1/vector_stores/{id}/search``: the knowledge bases' hybrid retrieval (rag/retrieve.py)
in OpenAI's shapes. ``max_num_results`` 1–50; ``filters`` on file attributes compiled to
parameterised SQL (rag/attributes.py) that selects the documents searched (only ready ones);
``ranking_options.score_threshold`` on the cosine similarity, which is the ``score`` (the
re-ranker's score when the knowledge base re-ranks: ``ranker`` ``auto``, the default, uses its
``rerank_model``; ``none`` skips it); ``rewrite_query`` is accepted and does nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from starlette.requests import Request
from starlette.responses import Response

from core.errors import InvalidRequest
from gateway import admin_input as inp
from gateway import kb_embedding, rerank
from gateway.admin_kb import _only
from gateway.db import tenant_transaction
from gateway.openai_common import ident, json_response, path_id, tenant
from gateway.openai_vector_store_objects import _bad, _json_col, _kb, check_not_expired
from rag import retrieve
from rag.attributes import InvalidAttributes, compile_filter

SEARCH_FIELDS = frozenset({"query", "max_num_results", "filters", "ranking_options", "rewrite_query"})
RANKERS = ("none", "auto", "default-2024-11-15")
MAX_QUERIES = 10


async def search(vs, request: Request) -> Response:
    """The search route of ``vs`` (gateway.openai_vector_stores.VectorStores)."""
    data = await inp.body(request)
    _only(data, SEARCH_FIELDS)
    raw = data.get("query")
    if isinstance(raw, str):
        queries = [raw]
    elif isinstance(raw, list) and 1 <= len(raw) <= MAX_QUERIES and all(isinstance(q, str) for q in raw):
        queries = raw
    elif raw is None:
        raise InvalidRequest("Missing required parameter: 'query'.", param="query", code="missing_required_parameter")
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
    ranking = data.get("ranking_options")
    ranking = {} if ranking is None else ranking  # (false, 0, "" or [] are no object either)
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
    async with tenant_transaction(vs.store.pool, owner) as conn:
        row = await vs._row(conn, owner, path_id(request, "vs_id"))
        check_not_expired(row)
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
    # the query's embedding and re-ranking run for the caller's key: its model allow-list, rate
    # limits and budgets hold (a plain key cannot spend the tenant's provider models unmetered)
    caller = ident(request)
    vector, _ = await kb_embedding.query_vector(vs.store.svc, kb, text, caller)
    hits = []
    if doc_ids is None or doc_ids:
        result = await retrieve.retrieve(
            vs.store.pool,
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
            query_model=kb.embedding_model,
            # "auto" (the default): the knowledge base's rerank_model when it has one
            reranker=rerank.for_kb(vs.store.svc, kb, caller) if ranking.get("ranker") != "none" else None,
        )
        hits = result.hits
    docs = {}
    if hits:
        async with tenant_transaction(vs.store.pool, owner) as conn:
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
