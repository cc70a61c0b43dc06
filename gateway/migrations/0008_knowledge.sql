-- Knowledge bases (issue #13): documents, chunks, vector + full-text indexes.
--
-- Vectors: one `halfvec` column WITHOUT a fixed dimension, because knowledge bases differ (384
-- for the local MiniLM model, 1,536 for text-embedding-3-small, 3,072 for -large). HNSW needs a
-- dimension, so the index is an expression index on a cast, partial on `dims`:
--     ((embedding::halfvec(1536)) halfvec_cosine_ops) WHERE dims = 1536
-- one per dimension in use (384 and 1,536 here; rag.store.ensure_vector_index adds others when
-- a knowledge base with a new dimension is created). Queries say `dims = <D>` and order by
-- `embedding::halfvec(<D>) <=> $q` with D a literal, so the planner matches the index even
-- under generic plans. Rejected: one partial index per knowledge base (exact per-KB search, but
-- thousands of indexes slow every plan and every insert), one table per dimension (a new model
-- means DDL on a new table and every query names its table). Tenant and knowledge-base filters
-- apply on top of the HNSW scan with pgvector's iterative scan (0.8), and the planner picks
-- the btree on kb_id plus an exact sort when a knowledge base is small. halfvec halves the
-- index (2 bytes a dimension) and HNSW over halfvec accepts up to 4,000 dimensions (vector:
-- 2,000), so 3,072-dim models fit.
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE IF NOT EXISTS knowledge_bases (
    id               text PRIMARY KEY,              -- 'kb_' + random
    tenant           text NOT NULL,
    name             text NOT NULL,
    description      text NOT NULL DEFAULT '',
    embedding_model  text NOT NULL,
    dims             integer NOT NULL CHECK (dims BETWEEN 1 AND 4000),
    settings         jsonb NOT NULL DEFAULT '{"chunk_size": 500, "overlap": 50, "top_k": 5, "threshold": 0.7,
                                              "max_context_tokens": 3000, "rerank": false}',
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant, name)
);

-- One uploaded file. `generation` is the generation of chunks that is live; rag.store writes a
-- new generation, flips this, and deletes the old rows, in one transaction. `replaces` points at
-- the document a new version will replace when its chunks go live; the old one then gets
-- `replaced_by`, loses its chunks, and stays as a record.
CREATE TABLE IF NOT EXISTS kb_documents (
    id               text PRIMARY KEY,              -- 'doc_' + random
    tenant           text NOT NULL,
    kb_id            text NOT NULL REFERENCES knowledge_bases (id) ON DELETE CASCADE,
    filename         text NOT NULL,
    content_type     text NOT NULL DEFAULT 'application/octet-stream',
    bytes            bigint NOT NULL DEFAULT 0,
    sha256           text NOT NULL,
    status           text NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'processing', 'ready', 'failed')),
    reason           text,
    chunks           integer NOT NULL DEFAULT 0,
    generation       integer NOT NULL DEFAULT 0,
    embedding_model  text,
    replaces         text,
    replaced_by      text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
-- Re-uploading the same content into a knowledge base finds the live document, never a copy.
CREATE UNIQUE INDEX IF NOT EXISTS kb_documents_live_sha ON kb_documents (kb_id, sha256) WHERE replaced_by IS NULL;
CREATE INDEX IF NOT EXISTS kb_documents_tenant_kb ON kb_documents (tenant, kb_id, created_at);

CREATE TABLE IF NOT EXISTS kb_chunks (
    id               bigserial PRIMARY KEY,
    tenant           text NOT NULL,
    kb_id            text NOT NULL,
    document_id      text NOT NULL REFERENCES kb_documents (id) ON DELETE CASCADE,
    generation       integer NOT NULL,
    idx              integer NOT NULL,
    section          text NOT NULL DEFAULT '',
    text             text NOT NULL,
    tokens           integer NOT NULL,
    dims             integer NOT NULL,
    embedding        halfvec NOT NULL,
    embedding_model  text NOT NULL,
    tsv              tsvector GENERATED ALWAYS AS (to_tsvector('simple', coalesce(section, '') || ' ' || text)) STORED,
    CHECK (vector_dims(embedding) = dims),
    UNIQUE (document_id, generation, idx)
);
-- Keep vectors inline and uncompressed when they fit (floats do not compress): exact scans of
-- small knowledge bases then read no TOAST.
ALTER TABLE kb_chunks ALTER COLUMN embedding SET STORAGE MAIN;
CREATE INDEX IF NOT EXISTS kb_chunks_kb ON kb_chunks (kb_id, dims);
CREATE INDEX IF NOT EXISTS kb_chunks_tsv ON kb_chunks USING gin (tsv);
CREATE INDEX IF NOT EXISTS kb_chunks_hnsw_384 ON kb_chunks
    USING hnsw ((embedding::halfvec(384)) halfvec_cosine_ops) WITH (m = 16, ef_construction = 64) WHERE dims = 384;
CREATE INDEX IF NOT EXISTS kb_chunks_hnsw_1536 ON kb_chunks
    USING hnsw ((embedding::halfvec(1536)) halfvec_cosine_ops) WITH (m = 16, ef_construction = 64) WHERE dims = 1536;

-- Full-text candidates. Under row-level security PostgreSQL never uses a non-LEAKPROOF
-- operator as an index condition ahead of the policy's qual, and tsvector's `@@` is not
-- LEAKPROOF: as the role gateway_tenant, `tsv @@ q` was a filter over every chunk of the knowledge
-- base (kb_id btree or seq scan, detoasting each tsvector: 240 ms per query at 100k chunks, even
-- for 8 matches), never a GIN scan. This function runs as its owner (not subject to RLS), so the
-- GIN index answers the match; it filters by tenant itself — `gateway.tenant` when a tenant
-- transaction set it, else the caller's — and the caller joins its ids back to kb_chunks under
-- RLS, so the wall still applies to every row returned. Ranking reads each match's tsvector,
-- so only the first `p_scan` matches (storage order) are ranked: a query of common words that
-- matches most of the corpus costs p_scan detoasts, not 100k. Custom plans: the query text is
-- a constant, so the planner sees how selective it is.
CREATE OR REPLACE FUNCTION kb_fts_candidates(p_tenant text, p_kb_ids text[], p_query text, p_limit integer,
                                             p_scan integer)
RETURNS TABLE (id bigint, rank real)
LANGUAGE sql STABLE SECURITY DEFINER ROWS 40
SET search_path = pg_catalog, public
SET plan_cache_mode = force_custom_plan
AS $$
    SELECT m.id, ts_rank_cd(m.tsv, websearch_to_tsquery('simple', p_query)) AS rank
    FROM (SELECT c.id, c.tsv FROM kb_chunks c
          WHERE c.tsv @@ websearch_to_tsquery('simple', p_query)
            AND c.kb_id = ANY (p_kb_ids)
            AND c.tenant = coalesce(nullif(current_setting('gateway.tenant', true), ''), p_tenant, c.tenant)
            AND (p_tenant IS NULL OR c.tenant = p_tenant)
          LIMIT p_scan) m
    ORDER BY rank DESC, m.id
    LIMIT p_limit
$$;
REVOKE ALL ON FUNCTION kb_fts_candidates(text, text[], text, integer, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION kb_fts_candidates(text, text[], text, integer, integer) TO gateway_tenant;

SELECT gateway_isolate_tenant('knowledge_bases');
SELECT gateway_isolate_tenant('kb_documents');
SELECT gateway_isolate_tenant('kb_chunks');
GRANT USAGE ON SEQUENCE kb_chunks_id_seq TO gateway_tenant;
