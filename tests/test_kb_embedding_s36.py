"""A knowledge base's embeddings batch is sized as a client's body of the same texts: its token
estimate (a provider that reports no usage) is counted off the event loop, as a client's is."""

from __future__ import annotations

import asyncio
import threading

import orjson

from gateway import pipeline
from gateway.kb_embedding import batch_context
from gateway.usage import OFF_LOOP_BYTES


def test_a_large_ingestion_batch_is_estimated_off_the_event_loop(monkeypatch) -> None:
    texts = ["word " * 2000] * 8  # 80 KB of text: a client's body this size is estimated in a thread
    ctx = batch_context("emb", texts)
    assert ctx.body_bytes == len(orjson.dumps(ctx.body)) >= OFF_LOOP_BYTES
    where: list[bool] = []
    real = pipeline.estimate_usage

    def spy(c, raw):
        where.append(threading.current_thread() is threading.main_thread())
        return real(c, raw)

    monkeypatch.setattr(pipeline, "estimate_usage", spy)
    answer = orjson.dumps({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}]})
    usage = asyncio.run(pipeline._estimate(ctx, answer))
    assert where == [False]  # (before: the batch's context had body_bytes 0, counted on the loop)
    assert usage.prompt_tokens >= 8 * 2000


def test_a_small_batch_stays_on_the_loop(monkeypatch) -> None:
    ctx = batch_context("emb", ["hello", ""])
    assert ctx.body["input"] == ["hello", " "]
    assert 0 < ctx.body_bytes < OFF_LOOP_BYTES
