"""Knowledge-base storage and hybrid retrieval (rag.store, rag.retrieve, rag.rerank) on the
embedded PostgreSQL with pgvector, migrations applied by gateway.db.migrate."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import secrets
from dataclasses import dataclass

import asyncpg
import pytest
from aiohttp import web

from gateway.db import migrate
from rag import store
from rag.rerank import HttpReranker
from rag.retrieve import (
    BELOW_THRESHOLD,
    BEYOND_TOP_K,
    EXACT_BELOW,
    KEPT,
    OVER_TOKEN_BUDGET,
    _count_sql,
    _vector_sql,
    retrieve,
)

DIMS = 384


@dataclass
class Chunk:
    index: int
    text: str
    section: str = ""
    tokens: int = 10


def vec(*weights: tuple[int, float]) -> list[float]:
    """A unit vector with the given weights on the given axes."""
    v = [0.0] * DIMS
    for axis, w in weights:
        v[axis] = w
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def at_similarity(sim: float, axis: int = 1) -> list[float]:
    """A unit vector whose cosine with axis 0 is ``sim``."""
    return vec((0, sim), (axis, math.sqrt(1 - sim * sim)))


QUERY = vec((0, 1.0))


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def tenant_name() -> str:
    return "t-" + secrets.token_hex(4)


def run(services, body):
    async def main():
        conn = await asyncpg.connect(services[0])
        try:
            await migrate(conn)
        finally:
            await conn.close()
        pool = await asyncpg.create_pool(services[0], min_size=1, max_size=4)
        try:
            return await body(pool)
        finally:
            await pool.close()

    return asyncio.run(main())


async def make_kb(pool, tenant, docs: dict[str, list[tuple[Chunk, list[float]]]], *, model="local-minilm"):
    """A knowledge base of ``tenant`` with ready documents; returns (kb, {name: document})."""
    async with store.scoped(pool, tenant) as conn:
        kb = await store.create_kb(conn, tenant, "kb-" + secrets.token_hex(3), embedding_model=model, dims=DIMS)
        out = {}
        for name, pairs in docs.items():
            doc, _ = await store.add_document(
                conn, tenant, kb.id, filename=name, content_type="text/plain", size=1, sha256=sha(name)
            )
            out[name] = await store.replace_chunks(
                conn, tenant, kb.id, doc.id, [c for c, _ in pairs], [v for _, v in pairs], model
            )
    return kb, out


def test_tenant_b_never_retrieves_tenant_a_chunks(services):
    a, b = tenant_name(), tenant_name()

    async def body(pool):
        kb, _ = await make_kb(pool, a, {"secret.txt": [(Chunk(0, "the launch code is alpha"), QUERY)]})
        mine = await retrieve(pool, a, [kb.id], "launch code", QUERY, threshold=0.5)
        assert [h.text for h in mine.hits] == ["the launch code is alpha"]

        theirs = await retrieve(pool, b, [kb.id], "launch code", QUERY, threshold=0.0)
        assert theirs.hits == [] and theirs.candidates == []
        async with store.scoped(pool, b) as conn:
            # The second wall: even SQL that forgets to filter sees nothing of tenant A.
            assert await conn.fetchval("SELECT count(*) FROM kb_chunks WHERE kb_id = $1", kb.id) == 0
            assert await conn.fetchval("SELECT count(*) FROM knowledge_bases WHERE id = $1", kb.id) == 0
            assert await store.get_kb(conn, b, kb.id) is None
            with pytest.raises(store.StoreError):
                await store.add_document(conn, b, kb.id, filename="x", content_type="t", size=1, sha256="00")
        async with store.scoped(pool, None) as conn:  # the super-admin sees it
            assert (await store.get_kb(conn, None, kb.id)).tenant == a

    run(services, body)


def test_reuploading_the_same_content_returns_the_existing_document(services):
    t = tenant_name()

    async def body(pool):
        kb, docs = await make_kb(pool, t, {"a.txt": [(Chunk(0, "alpha"), QUERY), (Chunk(1, "beta"), QUERY)]})
        async with store.scoped(pool, t) as conn:
            again, created = await store.add_document(
                conn, t, kb.id, filename="renamed.txt", content_type="text/plain", size=1, sha256=sha("a.txt")
            )
            assert not created and again.id == docs["a.txt"].id and again.status == "ready"
            assert len(await store.list_documents(conn, t, kb.id)) == 1
            assert await store.count_chunks(conn, t, kb_id=kb.id) == 2

    run(services, body)


def test_replace_is_atomic_for_a_concurrent_reader(services):
    t = tenant_name()
    n = 6

    async def body(pool):
        old = [(Chunk(i, f"old text {i}"), at_similarity(0.9 - i * 0.01)) for i in range(n)]
        kb, docs = await make_kb(pool, t, {"d.txt": old})
        doc = docs["d.txt"]

        async def seen() -> set[str]:
            r = await retrieve(pool, t, [kb.id], "text", QUERY, top_k=50, threshold=0.0)
            return {h.text for h in r.hits}

        old_texts = {f"old text {i}" for i in range(n)}
        new_texts = {f"new text {i}" for i in range(n + 2)}
        async with pool.acquire() as writer:
            tx = writer.transaction()
            await tx.start()
            await writer.execute(store._SCOPE_SQL, t)
            new = [(Chunk(i, f"new text {i}"), at_similarity(0.8)) for i in range(n + 2)]
            await store.replace_chunks(
                writer, t, kb.id, doc.id, [c for c, _ in new], [v for _, v in new], "local-minilm"
            )
            assert await seen() == old_texts  # written, not committed: all old
            await tx.commit()
        assert await seen() == new_texts  # committed: all new, no old row left

        # Readers racing a series of replaces only ever see one whole generation.
        async def replacer():
            for g in range(8):
                pairs = [(Chunk(i, f"gen{g} text {i}"), at_similarity(0.85)) for i in range(3 + g)]
                async with store.scoped(pool, t) as conn:
                    await store.replace_chunks(
                        conn, t, kb.id, doc.id, [c for c, _ in pairs], [v for _, v in pairs], "local-minilm"
                    )

        observed: list[set[str]] = []

        async def reader():
            for _ in range(30):
                observed.append(await seen())

        await asyncio.gather(replacer(), reader(), reader())
        for texts in observed:
            prefixes = {s.rsplit(" ", 2)[0] for s in texts}
            assert len(prefixes) == 1, texts
            prefix = prefixes.pop()
            if prefix.startswith("gen"):
                assert len(texts) == 3 + int(prefix[3:])
        async with store.scoped(pool, t) as conn:
            assert await store.count_chunks(conn, t, kb_id=kb.id) == 3 + 7

    run(services, body)


def test_deleting_a_document_removes_its_chunks(services):
    t = tenant_name()

    async def body(pool):
        kb, docs = await make_kb(
            pool, t, {"keep.txt": [(Chunk(0, "keep me"), QUERY)], "drop.txt": [(Chunk(0, "drop me"), QUERY)]}
        )
        async with store.scoped(pool, t) as conn:
            assert await store.delete_document(conn, t, docs["drop.txt"].id)
            assert not await store.delete_document(conn, t, docs["drop.txt"].id)
            assert await store.count_chunks(conn, t, kb_id=kb.id) == 1
        r = await retrieve(pool, t, [kb.id], "me", QUERY, threshold=0.0)
        assert [h.text for h in r.hits] == ["keep me"]
        async with store.scoped(pool, t) as conn:
            assert await store.delete_kb(conn, t, kb.id)
            assert await store.count_chunks(conn, t, kb_id=kb.id) == 0

    run(services, body)


def test_a_new_version_replaces_the_old_document_when_its_chunks_go_live(services):
    t = tenant_name()

    async def body(pool):
        kb, docs = await make_kb(pool, t, {"v1": [(Chunk(0, "price is 10 euros"), QUERY)]})
        v1 = docs["v1"]
        async with store.scoped(pool, t) as conn:
            v2, created = await store.add_document(
                conn,
                t,
                kb.id,
                filename="price.txt",
                content_type="text/plain",
                size=1,
                sha256=sha("v2"),
                replaces=v1.id,
            )
            assert created
        r = await retrieve(pool, t, [kb.id], "price", QUERY, threshold=0.0)
        assert [h.text for h in r.hits] == ["price is 10 euros"]  # v2 not live yet
        async with store.scoped(pool, t) as conn:
            await store.replace_chunks(conn, t, kb.id, v2.id, [Chunk(0, "price is 12 euros")], [QUERY], "local-minilm")
            assert (await store.get_document(conn, t, v1.id)).replaced_by == v2.id
            assert [d.id for d in await store.list_documents(conn, t, kb.id)] == [v2.id]
            # v1's content uploaded again is a new live document, not the retired record.
            back, created = await store.add_document(
                conn, t, kb.id, filename="old.txt", content_type="text/plain", size=1, sha256=sha("v1")
            )
            assert created and back.id != v1.id
        r = await retrieve(pool, t, [kb.id], "price", QUERY, threshold=0.0)
        assert [h.text for h in r.hits] == ["price is 12 euros"]

    run(services, body)


def test_hybrid_ranking_fuses_vector_and_full_text(services):
    t = tenant_name()
    first, closest, lexical, spam, other = (
        "warranty for SKU-4411 is two years",
        "general warranty terms apply",
        "the warranty card is included in the box, see the label with SKU-4411",
        "SKU-4411 warranty unrelated spam",
        "shipping takes three days",
    )

    async def body(pool):
        kb, _ = await make_kb(
            pool,
            t,
            {
                "doc": [
                    (Chunk(0, first, "Support > Warranty"), at_similarity(0.90, 1)),
                    (Chunk(1, closest, "Support"), at_similarity(0.95, 2)),
                    (Chunk(2, lexical), at_similarity(0.45, 3)),
                    (Chunk(3, spam), at_similarity(0.10, 4)),
                    (Chunk(4, other), at_similarity(0.20, 5)),
                ]
            },
        )
        # Three candidates from each search: vector 1, 0, 2; full text 3, 0, 2 (the tightest cover first).
        r = await retrieve(pool, t, [kb.id], "SKU-4411 warranty", QUERY, threshold=0.7, candidates=3)
        by_text = {c.text: c for c in r.candidates}
        assert [(by_text[x].vector_rank, by_text[x].fts_position) for x in (first, closest, lexical, spam)] == [
            (2, 2),
            (1, None),
            (3, 3),
            (None, 1),
        ]
        # Found by both searches beats first in one: chunk 0 and chunk 2 rank above the closest vector.
        assert [h.text for h in r.hits] == [first, lexical, closest]
        assert by_text[first].fused == pytest.approx(2 / 62) and by_text[first].fts_rank > 0
        assert r.hits[0].section == "Support > Warranty" and r.hits[0].source_number == 1
        assert r.hits[0].similarity == pytest.approx(0.90, abs=0.01)
        assert by_text[lexical].decision == KEPT and "lexical floor" in by_text[lexical].why
        assert by_text[spam].decision == BELOW_THRESHOLD and "0.100 < threshold" in by_text[spam].why
        assert other not in by_text
        assert {"vector_ms", "fts_ms", "fuse_ms", "total_ms"} <= set(r.timings)

        strict = await retrieve(pool, t, [kb.id], "SKU-4411 warranty", QUERY, candidates=3, lexical_floor=None)
        assert [h.text for h in strict.hits] == [first, closest]
        text_only = await retrieve(pool, t, [kb.id], "SKU-4411", None)
        assert {h.text for h in text_only.hits} == {first, lexical, spam}
        assert all(h.similarity is None for h in text_only.hits)
        assert any("full-text search only" in n for n in text_only.notes)


def test_threshold_top_k_and_token_budget_are_explained(services):
    t = tenant_name()

    async def body(pool):
        pairs = [
            (Chunk(i, f"passage number {i}", tokens=100 if i != 1 else 950), at_similarity(0.99 - i * 0.05, i + 1))
            for i in range(8)
        ]
        kb, _ = await make_kb(pool, t, {"doc": pairs})
        r = await retrieve(pool, t, [kb.id], "", QUERY, top_k=3, threshold=0.75, max_context_tokens=1000)
        decisions = {c.text: (c.decision, c.why) for c in r.candidates}
        assert [h.text for h in r.hits] == ["passage number 0", "passage number 2", "passage number 3"]
        assert [h.source_number for h in r.hits] == [1, 2, 3]
        assert (
            decisions["passage number 1"][0] == OVER_TOKEN_BUDGET and "950 tokens" in decisions["passage number 1"][1]
        )
        assert decisions["passage number 4"][0] == BEYOND_TOP_K
        # 0.99 - 5 * 0.05 = 0.74 < 0.75
        assert (
            decisions["passage number 5"][0] == BELOW_THRESHOLD
            and "< threshold 0.75" in decisions["passage number 5"][1]
        )
        explained = r.explain()
        assert explained["candidates"][0]["decision"] == KEPT and "text" not in explained["candidates"][0]

    run(services, body)


def test_a_small_knowledge_base_is_searched_exactly_and_a_large_one_through_hnsw(services):
    """HNSW is approximate and its index is shared by every tenant: the flaky miss of a small
    knowledge base's own chunk (a below-threshold passage absent from the candidates) came from
    it. Up to ``exact_below`` chunks the search compares every chunk; the plan of that query
    never reads the HNSW index."""
    t = tenant_name()

    async def body(pool):
        pairs = [(Chunk(i, f"passage {i}"), at_similarity(0.95 - i * 0.1, i + 1)) for i in range(6)]
        kb, _ = await make_kb(pool, t, {"doc": pairs})
        everything = [f"passage {i}" for i in range(6)]
        exact = await retrieve(pool, t, [kb.id], "", QUERY, top_k=6, threshold=-1.0)
        assert exact.vector_scan == "exact" and exact.explain()["vector_scan"] == "exact"
        assert [c.text for c in exact.candidates] == everything
        assert [round(c.similarity, 3) for c in exact.candidates] == [round(0.95 - i * 0.1, 3) for i in range(6)]
        # at the bound: still exact; one chunk fewer allowed: HNSW
        assert (await retrieve(pool, t, [kb.id], "", QUERY, exact_below=6)).vector_scan == "exact"
        approx = await retrieve(pool, t, [kb.id], "", QUERY, top_k=6, threshold=-1.0, exact_below=5)
        assert approx.vector_scan == "hnsw"
        assert (await retrieve(pool, None, [kb.id], "", QUERY)).vector_scan == "exact"  # super-admin
        assert (await retrieve(pool, t, [kb.id], "text only", None)).vector_scan is None
        # a document filter counts only that document's chunks
        kb2, _ = await make_kb(pool, t, {"a": pairs[:2], "b": pairs[2:]})
        async with store.scoped(pool, t) as conn:
            a = await conn.fetchval("SELECT document_id FROM kb_chunks WHERE kb_id = $1 AND text = 'passage 0'", kb2.id)
        one = await retrieve(pool, t, [kb2.id], "", QUERY, threshold=-1.0, document_ids=[a], exact_below=2)
        assert one.vector_scan == "exact" and [c.text for c in one.candidates] == ["passage 0", "passage 1"]
        assert (await retrieve(pool, t, [kb2.id], "", QUERY, exact_below=2)).vector_scan == "hnsw"
        async with store.scoped(pool, t) as conn:
            qvec = store.vector_literal(QUERY)
            args = (t, [kb.id], qvec, None, None)
            plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + _vector_sql(DIMS, 40, exact=True), *args))
            assert "hnsw" not in plan, plan
            await conn.execute("SET LOCAL enable_seqscan = off")
            await conn.execute("SET LOCAL enable_bitmapscan = off")
            plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + _vector_sql(DIMS, 40, exact=True), *args))
            assert "hnsw" not in plan, plan

    run(services, body)


def test_a_document_filter_counts_its_chunks_without_walking_the_knowledge_base(services):
    """Deciding between exact and HNSW search counts the chunks searched: with a document
    filter (vector stores' attribute filters) in a large knowledge base, the count reads the
    filtered documents' chunks through their index, not every chunk of the knowledge base."""
    t = tenant_name()

    async def body(pool):
        big = [(Chunk(i, f"bulk {i}"), at_similarity(0.5, 1 + i % 50)) for i in range(3000)]
        kb, _ = await make_kb(pool, t, {"big": big, "small": [(Chunk(0, "needle"), QUERY), (Chunk(1, "hay"), QUERY)]})
        async with store.scoped(pool, None) as conn:
            await conn.execute("ANALYZE kb_chunks")
        async with store.scoped(pool, t) as conn:
            small = await conn.fetchval("SELECT document_id FROM kb_chunks WHERE kb_id = $1 AND text = 'needle'", kb.id)
            # a prepared statement run often gets a generic plan: the parameters' values unknown
            await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            sql = _count_sql(DIMS, EXACT_BELOW + 1, True)
            await conn.execute(f"PREPARE count_chunks(text, text[], text[]) AS {sql}")
            assert all(x.isalnum() or x in "-_" for x in t + kb.id + small)
            explain = f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE count_chunks('{t}', ARRAY['{kb.id}'], ARRAY['{small}'])"
            (plan,) = json.loads(await conn.fetchval(explain))
            await conn.execute("DEALLOCATE count_chunks")

        def removed(node: dict) -> int:
            return node.get("Rows Removed by Filter", 0) + sum(removed(n) for n in node.get("Plans", []))

        assert removed(plan["Plan"]) < 100, plan
        found = await retrieve(pool, t, [kb.id], "", QUERY, threshold=-1.0, document_ids=[small])
        assert found.vector_scan == "exact" and sorted(c.text for c in found.candidates) == ["hay", "needle"]
        assert (await retrieve(pool, t, [kb.id], "", QUERY, threshold=-1.0)).vector_scan == "hnsw"

    run(services, body)


def test_vector_search_uses_only_chunks_of_the_current_model(services):
    t = tenant_name()

    async def body(pool):
        kb, _ = await make_kb(pool, t, {"doc": [(Chunk(0, "refund policy details"), QUERY)]}, model="old-model")
        async with store.scoped(pool, t) as conn:
            await store.set_embedding_model(conn, t, kb.id, "new-model", DIMS)
        r = await retrieve(pool, t, [kb.id], "unrelated", QUERY, threshold=0.0)
        assert r.hits == []
        r = await retrieve(pool, t, [kb.id], "refund policy", QUERY, threshold=0.0)
        (cand,) = r.candidates
        assert cand.vector_rank is None and cand.similarity is None and cand.decision == BELOW_THRESHOLD

    run(services, body)


def test_bad_input_changes_nothing(services):
    t = tenant_name()

    async def body(pool):
        kb, docs = await make_kb(pool, t, {"doc": [(Chunk(0, "stays"), QUERY)]})
        async with store.scoped(pool, t) as conn:
            with pytest.raises(store.StoreError):
                await store.replace_chunks(
                    conn, t, kb.id, docs["doc"].id, [Chunk(0, "x")], [[1.0, 0.0]], "local-minilm"
                )
            with pytest.raises(store.StoreError):
                await store.set_status(conn, t, docs["doc"].id, "done")
            with pytest.raises(store.StoreError):
                await store.create_kb(conn, t, kb.name, embedding_model="m", dims=DIMS)
        async with store.scoped(pool, t) as conn:
            assert await store.count_chunks(conn, t, kb_id=kb.id) == 1
            failed = await store.set_status(conn, t, docs["doc"].id, "failed", "encrypted PDF")
            assert (failed.status, failed.reason) == ("failed", "encrypted PDF")

    run(services, body)


def test_reranker_over_http_reorders_and_failures_keep_the_fused_order(services):
    t = tenant_name()
    seen: list[dict] = []

    async def rerank(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append({"auth": request.headers.get("Authorization"), **body})
        if body["query"] == "fail":
            return web.json_response({"error": "boom"}, status=500)
        if body["query"] == "slow":
            await asyncio.sleep(2)
        # Prefer the documents mentioning "blue", then the rest in reverse.
        scored = [
            (i, 0.9 if "blue" in d else 0.1 * i / len(body["documents"])) for i, d in enumerate(body["documents"])
        ]
        scored.sort(key=lambda p: -p[1])
        return web.json_response({"results": [{"index": i, "relevance_score": s} for i, s in scored[: body["top_n"]]]})

    async def body(pool):
        app = web.Application()
        app.router.add_post("/v1/rerank", rerank)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}/v1/rerank"
        try:
            pairs = [
                (Chunk(i, f"red item {i}" if i != 3 else "the blue item"), at_similarity(0.95 - i * 0.02, i + 1))
                for i in range(5)
            ]
            kb, _ = await make_kb(pool, t, {"doc": pairs})
            rr = HttpReranker(url, "rk-secret", "rerank-mini", timeout=0.5)
            try:
                r = await retrieve(pool, t, [kb.id], "blue", QUERY, top_k=2, reranker=rr)
                assert r.reranked and r.rerank_error is None and "rerank_ms" in r.timings
                assert r.hits[0].text == "the blue item"
                assert r.hits[0].rerank_score == pytest.approx(0.9) and r.hits[0].score == pytest.approx(0.9)
                assert seen[-1]["model"] == "rerank-mini" and seen[-1]["auth"] == "Bearer rk-secret"
                assert len(seen[-1]["documents"]) == 5 and seen[-1]["top_n"] == 5

                for query, why in (("fail", "HTTP 500"), ("slow", "timed out")):
                    r = await retrieve(pool, t, [kb.id], query, QUERY, top_k=2, reranker=rr)
                    assert not r.reranked and why in r.rerank_error
                    assert [h.text for h in r.hits] == ["red item 0", "red item 1"]
                    assert any("fused order kept" in n for n in r.notes)
            finally:
                await rr.close()
            down = HttpReranker(f"http://127.0.0.1:{port + 1 if port < 65535 else 1}/v1/rerank", None, "m", timeout=0.5)
            try:
                r = await retrieve(pool, t, [kb.id], "blue", QUERY, top_k=2, reranker=down)
                assert not r.reranked and r.rerank_error and len(r.hits) == 2
            finally:
                await down.close()
        finally:
            await runner.cleanup()

    run(services, body)
