"""The knowledge-base ingestion worker inside a gateway process: consumes the durable
``kb-ingest`` queue with rag/ingest.py's handler, two documents at a time.

Tenants take turns: the queue is a core/fair_queue.py ``FairQueue`` keyed by the job's tenant,
so a tenant that uploads 1,000 files does not put them ahead of every other tenant's next
document; and within a tenant's turns its knowledge bases take turns (sub-key: the job's
knowledge base), so one knowledge base's 1,000 files do not hold another's one. Each free
worker takes the next tenant's document in round-robin order (a tenant's next document starts
after at most one document of each other tenant with documents waiting), while a tenant alone
still gets every worker of every replica (no per-tenant cap). A document being retried waits
aside and does not hold its tenant's other documents. Jobs a previous release queued (a plain
queue of the same name) are still drained, one at a time, by each worker, beside the two.

The local embedding model runs numpy in a thread. Every job's embedding goes through one
dedicated thread, and OpenBLAS is asked for one thread of its own, so ingestion takes about one
CPU core however many documents wait, and the event loop serving requests keeps the others.

Tuning by environment (read at start; tests shorten them):
``GATEWAY_KB_WORKER`` (``0`` disables the worker in this process; uploads still queue),
``GATEWAY_KB_VISIBILITY_TIMEOUT`` (s, default 60), ``GATEWAY_KB_LIVENESS_TTL`` (s, default 10: a
killed worker's documents, and its tenant's turn, are taken over that long after its last sign of
life), ``GATEWAY_KB_MAX_RETRIES`` (default 5),
``GATEWAY_KB_BACKOFF`` (s, base of the exponential backoff, default 2),
``GATEWAY_KB_EXTRACT_TIMEOUT`` (s a PDF or DOCX may take to read, default 60; rag/sandbox.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from core.background import stop_task
from core.env import env_float, env_on
from core.fair_queue import FairQueue
from rag import ingest
from rag.embedding import LocalEmbedder

log = logging.getLogger("gateway.kb")

QUEUE = "kb-ingest"
CONCURRENCY = 2


def enabled() -> bool:
    return env_on("GATEWAY_KB_WORKER")


def _tenant(payload: dict) -> str | None:
    tenant = payload.get("tenant")
    return f"tenant:{tenant}" if isinstance(tenant, str) and tenant else None


def _kb(payload: dict) -> str | None:
    kb = payload.get("kb_id")
    return kb if isinstance(kb, str) and kb else None


def make_queue(redis) -> FairQueue:
    return FairQueue(
        redis,
        QUEUE,
        key_of=_tenant,
        sub_key_of=_kb,
        max_retries=int(env_float("GATEWAY_KB_MAX_RETRIES", 5)),
        backoff_base=env_float("GATEWAY_KB_BACKOFF", 2.0),
        visibility_timeout=max(0.5, env_float("GATEWAY_KB_VISIBILITY_TIMEOUT", 60.0)),
        liveness_ttl=env_float("GATEWAY_KB_LIVENESS_TTL", 10.0),
        dedupe_ttl=3600,
    )


def _one_blas_thread() -> None:
    """numpy is imported long before this runs, so OPENBLAS_NUM_THREADS would come too late: ask
    the loaded OpenBLAS directly (best effort; nothing happens without one)."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        with open("/proc/self/maps") as fh:
            libs = {line.split()[-1] for line in fh if "openblas" in line.lower() and line.rstrip().endswith(".so")}
    except OSError:
        return
    for path in libs:
        with contextlib.suppress(OSError):
            lib = ctypes.CDLL(path)
            for name in (
                "scipy_openblas_set_num_threads64_",
                "openblas_set_num_threads64_",
                "openblas_set_num_threads",
            ):
                fn = getattr(lib, name, None)
                if fn is not None:
                    fn(1)
                    break


class SerialEmbedder:
    """The local model behind one thread: concurrent jobs queue for it instead of each taking
    a core (and the default executor stays free for the rest of the gateway)."""

    def __init__(self, inner: LocalEmbedder) -> None:
        self.inner = inner
        self.model = inner.model
        self.dims = inner.dims
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kb-embed")

    async def embed(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.inner.embed_sync, list(texts))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def make_embedder() -> LocalEmbedder | None:
    """The local embedding model when its weights are installed, else None (documents of a
    knowledge base on it then fail with a reason saying so). Queries (admin, agent turns) use
    it directly; the worker's ingestion goes through its own single thread (SerialEmbedder),
    so a query never waits behind a document's batches."""
    if not LocalEmbedder.available():
        log.warning("the local embedding model is not installed; knowledge-base ingestion is unavailable")
        return None
    _one_blas_thread()
    return LocalEmbedder()


class KbWorker:
    def __init__(self, pool, redis, embedder: LocalEmbedder | None, data_dir: Path) -> None:
        self.pool = pool
        self.queue = make_queue(redis)
        self.embedder = SerialEmbedder(embedder) if embedder is not None else None
        self.data_dir = Path(data_dir)
        self._task: asyncio.Task | None = None
        # (model, tenant, payer or None) → embedder, for knowledge bases on provider models: set
        # by gateway/kb_embedding.install once the services exist
        self.embedders = None

    def handler(self):
        return functools.partial(
            ingest.handle,
            pool=self.pool,
            embedder=self.embedder,
            embedders=self._embedders,
            data_dir=self.data_dir,
            max_attempts=self.queue.max_retries + 1,
            extract_timeout=max(0.1, env_float("GATEWAY_KB_EXTRACT_TIMEOUT", ingest.EXTRACT_TIMEOUT)),
        )

    def _embedders(self, model: str, tenant: str, payer: dict | None = None):
        if self.embedder is not None and model == self.embedder.model:
            return self.embedder
        if self.embedders is None:
            raise RuntimeError("provider embeddings are not ready yet")  # start-up: the job is retried
        return self.embedders(model, tenant, payer)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="kb-ingest-worker")

    async def _run(self) -> None:
        while True:
            try:
                await self.queue.run(self.handler(), concurrency=CONCURRENCY)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Queue.run handles Redis errors itself; this is a last guard
                log.warning("kb ingest worker stopped (%s); restarting in 5 s", exc)
                await asyncio.sleep(5)

    async def stop(self, grace: float = 10.0) -> None:
        """In-flight documents get ``grace`` seconds; the rest go back to the queue unchanged."""
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.queue.stop(grace), grace + 15)
            await stop_task(self._task)
            self._task = None

    def close(self) -> None:
        """The embedding thread (documents embedded by the worker, or re-embedded for the admin
        API: started or not, the worker has it)."""
        if self.embedder is not None:
            self.embedder.close()
