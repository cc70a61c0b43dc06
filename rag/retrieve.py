"""Hybrid retrieval: HNSW vector search + PostgreSQL full-text search, fused with reciprocal
rank fusion, then the threshold, an optional re-ranker, top-k and the token budget — with an
explanation of every candidate and stage timings.

Both searches run in one read-only REPEATABLE READ transaction (one snapshot: a replace that
commits between them cannot mix generations) scoped to the tenant (row-level security as the second
wall) and filter by tenant and knowledge base in SQL. Vector search only sees chunks embedded
with the knowledge base's current model and the query vector's dimension.

The threshold applies to the cosine similarity (1 - cosine distance). Every candidate has one,
full-text hits included (it is computed for them too). A candidate below the threshold is
still kept when full-text search matched it — ``websearch_to_tsquery`` requires every query
term, a strong lexical signal for codes, names and exact phrases that embeddings blur — and its
similarity reaches ``lexical_floor`` (default 0.3: unrelated text scores lower, so a query of
common words cannot pull in arbitrary chunks). ``lexical_floor=None`` makes the threshold
strict. Without a query vector (no embedding available) full-text matches are kept as they are.

Full-text search ranks (``ts_rank_cd``) at most the first ``FTS_SCAN`` matches of a query in
storage order, so a query of words found in most chunks stays cheap; its top ``candidates`` by
rank come from those.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import asyncpg

from rag.rerank import Reranker, RerankError
from rag.store import MAX_DIMS, scoped, vector_literal

RRF_K = 60
MAX_CANDIDATES = 200
MAX_KBS = 50
MAX_QUERY_CHARS = 4000
# Full-text ranking reads each match's tsvector: only this many matches are ranked per query
# (see kb_fts_candidates in migration 0008).
FTS_SCAN = 200
# Vector search is exact (every chunk's distance, sorted) when the searched chunks number at
# most this many, and HNSW above (Qdrant's full_scan_threshold). HNSW is approximate and its
# index is shared by every tenant: a small knowledge base filtered out of a large graph can
# lose its own nearest chunks, and the planner's choice between the two rests on statistics
# that lag behind inserts. Measured on this machine (12,000 chunks of 384 dims, row-level
# security on): counting up to 2,001 chunks takes about 1 ms, up to 10,001 about 3.5 ms, and an
# exact search of 12,000 about 13 ms against HNSW's 9.4 ms; 2,000 keeps both costs near 1-3 ms.
EXACT_BELOW = 2_000

# Full-text query of a question: websearch_to_tsquery requires every term (AND), right for
# codes, names and short keyword queries, but a natural-language question rarely has all its
# words in one passage. A query of more than AND_TERMS keywords searches for any of them (OR),
# stop words dropped, ranked by ts_rank_cd.
AND_TERMS = 3
MAX_TERMS = 16
_STOP = frozenset(
    """a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have
    having he her here hers him his how i if in into is it its itself just me more most my no nor not
    now of off on once only or other our out over own same she should so some such than that the their
    them then there these they this those through to too under until up very was we were what when
    where which while who whom why will with would you your yours may might must shall also get got""".split()
)

KEPT = "kept"
BELOW_THRESHOLD = "below_threshold"
BEYOND_TOP_K = "beyond_top_k"
OVER_TOKEN_BUDGET = "over_token_budget"


@dataclass
class Hit:
    chunk_id: int
    document_id: str
    kb_id: str
    section: str
    text: str
    similarity: float | None
    fts_rank: float | None
    score: float
    source_number: int
    tokens: int = 0
    rerank_score: float | None = None


@dataclass
class Candidate:
    """One chunk either search returned, and what became of it."""

    chunk_id: int
    document_id: str
    kb_id: str
    section: str
    tokens: int
    similarity: float | None
    vector_rank: int | None  # 1-based position in the vector results
    fts_rank: float | None  # ts_rank_cd
    fts_position: int | None  # 1-based position in the full-text results
    fused: float = 0.0
    rerank_score: float | None = None
    decision: str = ""
    why: str = ""
    text: str = field(default="", repr=False)


@dataclass
class Retrieval:
    hits: list[Hit]
    candidates: list[Candidate]
    timings: dict[str, float]
    reranked: bool = False
    rerank_error: str | None = None
    notes: list[str] = field(default_factory=list)
    vector_scan: str | None = None  # "exact", "hnsw", or None (no vector search)

    def explain(self) -> dict[str, Any]:
        """JSON-ready: every candidate with its scores and decision, the timings, the notes."""
        return {
            "hits": [asdict(h) for h in self.hits],
            "candidates": [{k: v for k, v in asdict(c).items() if k != "text"} for c in self.candidates],
            "timings_ms": self.timings,
            "reranked": self.reranked,
            "rerank_error": self.rerank_error,
            "notes": self.notes,
            "vector_scan": self.vector_scan,
        }


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)


_JOINS = """JOIN kb_chunks c ON c.id = s.id
    JOIN kb_documents d ON d.id = c.document_id AND d.generation = c.generation AND d.replaced_by IS NULL
    JOIN knowledge_bases k ON k.id = c.kb_id"""


def _words(text: str) -> list[str]:
    """The runs of letters and decimal digits of ``text``, lower-cased. PostgreSQL's parser
    splits at every other character (``_``, ``²``...), so it makes one term of each run at most
    (and a compound of a hyphenated run's besides): counted here, never fewer than it makes."""
    return "".join(c if c.isalpha() or c.isdecimal() else " " for c in text.lower()).split()


def fts_query(text: str) -> str:
    """The text given to websearch_to_tsquery: as typed for short queries (every term required,
    quotes and ``-`` honoured), else its keywords joined with ``or``. Either way at most
    ``MAX_TERMS`` words reach it: as typed only when the whole text has that few (repeats and
    stop words count: the 'simple' configuration keeps them); a longer one of few distinct
    keywords, or with a quote, requires each keyword once. (As typed, 4,000 characters of a
    repeated word, phrase or negation made thousands of terms: seconds of a database core per
    search over the index every tenant's chunks share.) Nor with more than ``MAX_TERMS`` ``-``: each
    is a negation, and 32 in a row (a Markdown rule) overflowed the parser's stack: the whole
    search failed (an agent turn's grounding found nothing)."""
    every = _words(text)
    keywords = list(dict.fromkeys(w for w in every if w not in _STOP and len(w) > 1))[:MAX_TERMS]
    if len(keywords) <= AND_TERMS or '"' in text:
        typed = len(every) <= MAX_TERMS and text.count("-") <= MAX_TERMS
        return text if typed else " ".join(keywords)
    return " or ".join(keywords)


def _chunk_filter(dims: int) -> str:
    """The chunks of the searched knowledge bases ($2) of the tenant ($1; NULL: super-admin)
    whose vectors have ``dims`` dimensions."""
    return f"c.dims = {dims} AND c.kb_id = ANY($2::text[]) AND ($1::text IS NULL OR c.tenant = $1)"


def _vector_filter(dims: int, docs: str, by_document: bool) -> str:
    """The chunks an exact vector search reads; ``docs`` is the parameter of the document
    filter. With it, the chunks are found from the documents (a semi-join on the
    (document_id, ...) index, also in a generic plan): a filter on a few documents of a large
    knowledge base never walks all its chunks."""
    only = f"c.document_id IN (SELECT unnest({docs}::text[]))" if by_document else f"{docs}::text[] IS NULL"
    return f"{_chunk_filter(dims)} AND {only}"


def _count_sql(dims: int, cap: int, by_document: bool) -> str:
    """How many chunks a search reads, counted up to ``cap``."""
    where = _vector_filter(dims, "$3", by_document)
    return f"SELECT count(*) FROM (SELECT 1 FROM kb_chunks c WHERE {where} LIMIT {cap}) s"


def _vector_sql(dims: int, limit: int, *, exact: bool, by_document: bool = False) -> str:
    cast = f"halfvec({dims})"
    if exact:
        where = _vector_filter(dims, "$4", by_document)
        # OFFSET 0 keeps the filter a subquery of its own: the ORDER BY below sorts its rows
        # and cannot be planned as a scan of the HNSW index.
        nearest = f"""SELECT f.id, f.embedding::{cast} <=> $3::text::{cast} AS dist
      FROM (SELECT c.id, c.embedding FROM kb_chunks c WHERE {where} OFFSET 0) f
      ORDER BY dist LIMIT {limit}"""
    else:  # more than EXACT_BELOW chunks to read: the HNSW scan, filtered
        nearest = f"""SELECT c.id, c.embedding::{cast} <=> $3::text::{cast} AS dist
      FROM kb_chunks c
      WHERE {_chunk_filter(dims)} AND ($4::text[] IS NULL OR c.document_id = ANY($4::text[]))
      ORDER BY c.embedding::{cast} <=> $3::text::{cast} LIMIT {limit}"""
    return f"""SELECT c.id, c.document_id, c.kb_id, c.section, c.text, c.tokens, 1 - s.dist AS similarity
FROM ({nearest}) s
{_JOINS}
WHERE c.embedding_model = coalesce($5::text, k.embedding_model)
ORDER BY s.dist"""


def _fts_sql(dims: int | None, limit: int) -> str:
    # The match runs in kb_fts_candidates (SECURITY DEFINER): under row-level security `@@` (not
    # LEAKPROOF) cannot use the GIN index; the ids are joined back to kb_chunks under RLS.
    if dims is None:
        similarity = "CASE WHEN $3::text IS NULL OR $6::text IS NULL THEN NULL::float8 END"  # (no vector)
    else:
        cast = f"halfvec({dims})"
        similarity = (
            f"CASE WHEN c.dims = {dims} AND c.embedding_model = coalesce($6::text, k.embedding_model) "
            f"THEN 1 - (c.embedding::{cast} <=> $3::text::{cast}) END"
        )
    return f"""SELECT c.id, c.document_id, c.kb_id, c.section, c.text, c.tokens, s.rank, {similarity} AS similarity
FROM kb_fts_candidates($1::text, $2::text[], $4::text, {limit}, {FTS_SCAN}, $5::text[]) s
{_JOINS}
ORDER BY s.rank DESC, c.id"""


async def retrieve(
    pool: asyncpg.Pool,
    tenant: str | None,
    kb_ids: Sequence[str],
    query_text: str,
    query_vector: Sequence[float] | None,
    *,
    top_k: int = 5,
    threshold: float = 0.7,
    max_context_tokens: int = 3000,
    candidates: int = 40,
    ef_search: int = 64,
    lexical_floor: float | None = 0.3,
    reranker: Reranker | None = None,
    rerank_top_n: int | None = None,
    document_ids: Sequence[str] | None = None,
    query_model: str | None = None,
    exact_below: int = EXACT_BELOW,
) -> Retrieval:
    """Search ``kb_ids`` of ``tenant`` (None: super-admin) for ``query_text`` /
    ``query_vector`` (the query embedded with the knowledge bases' model, L2-normalized);
    ``document_ids``: only in these documents (None: all). ``query_model``: the model the
    vector was made with; only chunks of that model are compared with it (a model switch
    between embedding the query and searching leaves full-text results, never a comparison of
    two models' vectors). None: the knowledge base's model at query time. ``exact_below``: the
    vector search is exact when the searched chunks are at most this many, HNSW above."""
    t_total = time.perf_counter()
    timings: dict[str, float] = {}
    notes: list[str] = []
    kb_list = list(dict.fromkeys(kb_ids))[:MAX_KBS]
    query_text = (query_text or "")[:MAX_QUERY_CHARS]
    candidates = max(1, min(int(candidates), MAX_CANDIDATES))
    top_k = max(0, int(top_k))
    dims = len(query_vector) if query_vector is not None else None
    if dims is not None and not 1 <= dims <= MAX_DIMS:
        raise ValueError(f"query vector must have 1..{MAX_DIMS} dimensions")
    qvec = vector_literal(query_vector) if query_vector is not None else None
    docs = list(document_ids) if document_ids is not None else None

    vec_rows: list[asyncpg.Record] = []
    vector_scan: str | None = None
    fts_rows: list[asyncpg.Record] = []
    if kb_list:
        t0 = time.perf_counter()
        # One snapshot for both searches: under READ COMMITTED each statement would take its
        # own, and a replace committing between them would mix two generations.
        async with scoped(pool, tenant, isolation="repeatable_read", readonly=True) as conn:
            await conn.execute(
                "SELECT set_config('hnsw.ef_search', $1, true), "
                "set_config('hnsw.iterative_scan', 'relaxed_order', true)",
                str(max(candidates, min(int(ef_search), 1000))),
            )
            timings["begin_ms"] = _ms(t0)
            if dims is not None:
                t0 = time.perf_counter()
                args = (tenant, kb_list, qvec, docs, query_model)
                cap = max(0, int(exact_below)) + 1
                by_doc = docs is not None
                exact = await conn.fetchval(_count_sql(dims, cap, by_doc), tenant, kb_list, docs) < cap
                vector_scan = "exact" if exact else "hnsw"
                vec_rows = await conn.fetch(_vector_sql(dims, candidates, exact=exact, by_document=by_doc), *args)
                timings["vector_ms"] = _ms(t0)
            if query_text.strip():
                t0 = time.perf_counter()
                fts_rows = await conn.fetch(
                    _fts_sql(dims, candidates), tenant, kb_list, qvec, fts_query(query_text), docs, query_model
                )
                timings["fts_ms"] = _ms(t0)
    else:
        notes.append("no knowledge base to search")
    if dims is None:
        notes.append("no query vector: full-text search only, no similarity threshold")

    t0 = time.perf_counter()
    pool_of: dict[int, Candidate] = {}
    for pos, r in enumerate(vec_rows, 1):
        pool_of[r["id"]] = Candidate(
            chunk_id=r["id"],
            document_id=r["document_id"],
            kb_id=r["kb_id"],
            section=r["section"],
            tokens=r["tokens"],
            similarity=float(r["similarity"]),
            vector_rank=pos,
            fts_rank=None,
            fts_position=None,
            text=r["text"],
        )
    for pos, r in enumerate(fts_rows, 1):
        cand = pool_of.get(r["id"])
        if cand is None:
            sim = r["similarity"]
            cand = pool_of[r["id"]] = Candidate(
                chunk_id=r["id"],
                document_id=r["document_id"],
                kb_id=r["kb_id"],
                section=r["section"],
                tokens=r["tokens"],
                similarity=float(sim) if sim is not None else None,
                vector_rank=None,
                fts_rank=None,
                fts_position=None,
                text=r["text"],
            )
        cand.fts_rank = float(r["rank"])
        cand.fts_position = pos
    for cand in pool_of.values():
        cand.fused = sum(1.0 / (RRF_K + p) for p in (cand.vector_rank, cand.fts_position) if p is not None)
    ordered = sorted(pool_of.values(), key=lambda c: (-c.fused, -(c.similarity or 0.0), c.chunk_id))

    passing: list[Candidate] = []
    for cand in ordered:
        sim = cand.similarity
        if dims is None:
            cand.why = "full-text match (no query vector)"
        elif sim is not None and sim >= threshold:
            cand.why = f"similarity {sim:.3f} >= threshold {threshold:g}"
        elif cand.fts_position is not None and lexical_floor is not None and sim is not None and sim >= lexical_floor:
            cand.why = (
                f"full-text match: similarity {sim:.3f} below threshold {threshold:g} "
                f"but >= lexical floor {lexical_floor:g}"
            )
        else:
            cand.decision = BELOW_THRESHOLD
            cand.why = (
                f"similarity {sim:.3f} < threshold {threshold:g}"
                if sim is not None
                else "no similarity (chunk of another embedding model or dimension)"
            )
            continue
        passing.append(cand)
    timings["fuse_ms"] = _ms(t0)

    reranked = False
    rerank_error: str | None = None
    if reranker is not None and passing and query_text.strip():
        t0 = time.perf_counter()
        try:
            ranking = await reranker.rerank(query_text, [c.text for c in passing], rerank_top_n or len(passing))
        except RerankError as exc:
            rerank_error = str(exc)
            notes.append(f"re-ranking skipped: {exc}; fused order kept")
        else:
            reranked = True
            order = []
            for index, score in ranking:
                passing[index].rerank_score = score
                order.append(passing[index])
            ranked_ids = {id(c) for c in order}
            for cand in passing:
                if id(cand) not in ranked_ids:
                    cand.decision = BEYOND_TOP_K
                    cand.why += "; not in the re-ranker's top_n"
            passing = order
        timings["rerank_ms"] = _ms(t0)

    hits: list[Hit] = []
    used = 0
    for cand in passing:
        if cand.decision:
            continue
        if len(hits) >= top_k:
            cand.decision = BEYOND_TOP_K
            cand.why += f"; beyond top-k {top_k}"
        elif used + cand.tokens > max_context_tokens:
            cand.decision = OVER_TOKEN_BUDGET
            cand.why += f"; {cand.tokens} tokens would exceed the budget ({used} of {max_context_tokens} used)"
        else:
            used += cand.tokens
            cand.decision = KEPT
            hits.append(
                Hit(
                    chunk_id=cand.chunk_id,
                    document_id=cand.document_id,
                    kb_id=cand.kb_id,
                    section=cand.section,
                    text=cand.text,
                    similarity=cand.similarity,
                    fts_rank=cand.fts_rank,
                    score=cand.rerank_score if cand.rerank_score is not None else cand.fused,
                    source_number=len(hits) + 1,
                    tokens=cand.tokens,
                    rerank_score=cand.rerank_score,
                )
            )
    shown_ids = {c.chunk_id for c in passing}
    shown = passing + [c for c in ordered if c.chunk_id not in shown_ids]
    timings["total_ms"] = _ms(t_total)
    return Retrieval(
        hits=hits,
        candidates=shown,
        timings=timings,
        reranked=reranked,
        rerank_error=rerank_error,
        notes=notes,
        vector_scan=vector_scan,
    )
