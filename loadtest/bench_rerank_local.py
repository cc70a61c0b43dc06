# ruff: noqa: E402  (BLAS thread settings must precede the numpy import)
"""Latency of the local cross-encoder re-ranker (rag/rerank_local.py) at a realistic size
(``python -m loadtest.bench_rerank_local --model DIR``).

``DIR`` is a cross-encoder folder: the real ms-marco-MiniLM-L-6-v2, or a random model of its
size made without a download by ``tests/fixtures/make_cross_encoder.py --bench DIR`` (hidden 384,
6 layers, 12 heads, 30,522 word embeddings; the latency depends on the sizes, not the values).
One query against 20 and 50 documents of ~200 tokens each, through ``LocalReranker.rerank`` as
the gateway calls it (its own thread, batches of 16), after one warm-up call; ``--threads``
BLAS threads (1 is what a gateway with the local embedder runs: kb_worker asks OpenBLAS for one).
Writes the table to stdout; the figures of record are in loadtest/results/rerank-local.md.
"""

from __future__ import annotations

import argparse
import os
import sys

_threads = "1"
if "--threads" in sys.argv:
    _threads = sys.argv[sys.argv.index("--threads") + 1]
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = _threads

import asyncio
import platform
import random
import statistics
import time

from rag.rerank_local import LocalReranker

WORDS = (
    "order delivery refund parcel invoice warranty account password shipping return payment card "
    "express standard courier address customer support product price discount coupon replacement "
    "damaged missing tracking number weekend holiday office email phone business days policy"
).split()


def documents(reranker: LocalReranker, count: int, tokens: int, rng: random.Random) -> list[str]:
    """``count`` texts of about ``tokens`` tokens each (the model's own tokenizer counts)."""
    tok = reranker.model.tokenizer
    out = []
    for _ in range(count):
        words = [rng.choice(WORDS) for _ in range(tokens)]
        while len(tok.encode(" ".join(words)).ids) - 2 > tokens:
            words.pop()
        out.append(" ".join(words))
    return out


async def run(args) -> None:
    reranker = LocalReranker(args.model, max_documents=1000)
    rng = random.Random(7)
    query = "how long does a refund to my card take after the parcel is returned"
    print(f"model: {args.model} (hidden {reranker.model.encoder.hidden}, {reranker.model.encoder.layers} layers)")
    print(f"python {platform.python_version()}, {os.cpu_count()} cpus, BLAS threads {_threads}")
    print("| documents | tokens / pair | runs | p50 ms | min ms | max ms | ms / document |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for count in args.docs:
        docs = documents(reranker, count, args.tokens, rng)
        pair = len(reranker.model.tokenizer.encode(query, docs[0]).ids)
        await reranker.rerank(query, docs, count)  # warm-up
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            await reranker.rerank(query, docs, count)
            times.append((time.perf_counter() - t0) * 1000)
        p50 = statistics.median(times)
        print(
            f"| {count} | {pair} | {args.runs} | {p50:.0f} | {min(times):.0f} | {max(times):.0f} | {p50 / count:.1f} |"
        )
    reranker.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a cross-encoder folder")
    parser.add_argument("--docs", type=lambda s: [int(x) for x in s.split(",")], default=[20, 50])
    parser.add_argument("--tokens", type=int, default=200, help="tokens per document")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", default="1", help="BLAS threads")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
