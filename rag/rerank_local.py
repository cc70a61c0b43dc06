"""A local cross-encoder re-ranker: a Hugging Face ``BertForSequenceClassification`` folder
(e.g. ``cross-encoder/ms-marco-MiniLM-L-6-v2``) run with numpy on the CPU, nothing downloaded.

No PyPI wheel ships cross-encoder weights, so the user installs the folder (``config.json``,
``model.safetensors``, ``tokenizer.json``) and names it in ``rag.rerank.local_model_dir`` or
``GATEWAY_RERANK_MODEL_DIR``. Unnamed, the re-ranker is off. Named but unusable (a file missing,
not a BERT classifier, more than one label, weights not float32), the gateway refuses to start
with the reason: a re-ranker the operator asked for is never dropped silently.

Scoring matches sentence-transformers' ``CrossEncoder.predict``: each (query, document) pair is
tokenized as ``[CLS] query [SEP] document [SEP]`` with type ids 0 then 1, truncated longest-first
to the model's length (the document gives way first: it is the longer), run through the BERT
encoder of rag/bert.py, pooled (dense + tanh of the ``[CLS]`` state), and the classifier's one
logit is the score — passed through a sigmoid unless the folder's config names another
activation (``sbert_ce_default_activation_function`` or ``sentence_transformers.activation_fn``):
ms-marco-MiniLM-L-6-v2 names ``Identity``, so its scores are raw logits, as its model card shows.

Pairs are sorted by length and scored in batches on one dedicated thread (concurrent requests
queue for it; the event loop never runs the model), with a per-call timeout and a bound on the
documents per call. A call given up (timed out, or its caller gone) stops at its next batch: the
thread is not left scoring for nobody, and its place in the queue is held until it has stopped.
The thread serves owners (tenants) in turn, not in arrival order, and one owner holds at most
``MAX_WAITING_PER_OWNER`` of the queue's places: no tenant keeps the model busy for every other.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import threading
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from rag.bert import BertEncoder, ModelError, batch_arrays, read_config, read_safetensors
from rag.rerank import RerankError

log = logging.getLogger("rag.rerank")

FILES = ("config.json", "model.safetensors", "tokenizer.json")
ENV_DIR = "GATEWAY_RERANK_MODEL_DIR"
MAX_LENGTH = 512
BATCH = 16
MAX_DOCUMENTS = 200
TIMEOUT_S = 30.0
MAX_WAITING = 16  # calls queued for the model's thread (the one it runs included)
MAX_WAITING_PER_OWNER = 4  # of those, the calls of one owner (a tenant)
_CHARS_PER_TOKEN = 16  # text beyond max_length * this many characters is cut before tokenizing


def _activation(config: dict) -> str:
    """``sigmoid`` or ``identity``, as sentence-transformers' CrossEncoder would choose."""
    named = config.get("sbert_ce_default_activation_function")
    st = config.get("sentence_transformers")
    if isinstance(st, dict) and st.get("activation_fn"):
        named = st["activation_fn"]
    if named is None:
        return "sigmoid"  # CrossEncoder's default for one label
    last = str(named).rsplit(".", 1)[-1]
    if last in ("Sigmoid", "Identity"):
        return last.lower()
    raise ModelError(f"config.json: activation {named!r} is not supported (Sigmoid or Identity)")


class Cancelled(Exception):
    """A scoring given up by its caller, stopped between two batches."""


class CrossEncoder:
    """The model of one folder, loaded and checked; ``score`` is synchronous (run it off the
    event loop)."""

    def __init__(self, folder: Path, *, max_length: int = MAX_LENGTH, batch_size: int = BATCH) -> None:
        from tokenizers import Tokenizer

        missing = [name for name in FILES if not (folder / name).is_file()]
        if missing:
            raise ModelError(f"{', '.join(missing)} not found")
        config = read_config(folder)
        arch = config.get("architectures") or ["BertForSequenceClassification"]
        if config.get("model_type", "bert") != "bert" or "BertForSequenceClassification" not in arch:
            raise ModelError("config.json: not a BertForSequenceClassification model")
        labels = config.get("id2label")
        num_labels = len(labels) if isinstance(labels, dict) else config.get("num_labels", 1)
        if num_labels != 1:
            raise ModelError(f"config.json: {num_labels} labels; only single-score cross-encoders (1 label)")
        self.activation = _activation(config)
        weights = read_safetensors(folder / "model.safetensors")
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in weights else ""
        self.encoder = BertEncoder(config, weights, prefix)
        hidden = self.encoder.hidden
        for name, shape in (
            (f"{prefix}pooler.dense.weight", (hidden, hidden)),
            (f"{prefix}pooler.dense.bias", (hidden,)),
            ("classifier.weight", (1, hidden)),
            ("classifier.bias", (1,)),
        ):
            if name not in weights or weights[name].shape != shape:
                raise ModelError(f"model.safetensors: no tensor {name} of shape {shape}")
        self.max_length = max(8, min(max_length, self.encoder.max_positions, _tokenizer_limit(folder)))
        self.batch_size = max(1, batch_size)
        try:
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # the tokenizers library raises its own exception type
            raise ModelError(f"tokenizer.json: {str(exc)[:200]}") from None
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=self.max_length, strategy="longest_first")
        pad_id = int(config.get("pad_token_id") or 0)
        tokenizer.enable_padding(pad_id=pad_id, pad_token=tokenizer.id_to_token(pad_id) or "[PAD]")
        probe = tokenizer.encode("query", "document")
        if 1 not in probe.type_ids or probe.type_ids[0] != 0:
            raise ModelError("tokenizer.json: no sentence-pair template (type ids 0 then 1)")
        if tokenizer.get_vocab_size() > self.encoder.vocab:
            raise ModelError("tokenizer.json: more tokens than the model's word embeddings")
        self.tokenizer = tokenizer

    def _batch(self, query: str, documents: list[str]) -> tuple[np.ndarray, int]:
        cut = self.max_length * _CHARS_PER_TOKEN
        pairs = [(query[:cut], d[:cut]) for d in documents]
        ids, types, mask = batch_arrays(self.tokenizer.encode_batch(pairs))
        x = self.encoder.forward(ids, types, mask)
        enc = self.encoder
        pooled = np.tanh(enc.dense(x[:, 0], "pooler.dense"))
        w = enc.w
        logits = pooled @ w["classifier.weight"].T + w["classifier.bias"]
        logits = logits[:, 0].astype(np.float64)
        scores = 1.0 / (1.0 + np.exp(-logits)) if self.activation == "sigmoid" else logits
        return scores, int(mask.sum())

    def score(self, query: str, documents: list[str]) -> list[float]:
        """The relevance score of each document for ``query``, in the documents' order."""
        return self.score_counted(query, documents)[0]

    def score_counted(
        self, query: str, documents: list[str], cancelled: threading.Event | None = None
    ) -> tuple[list[float], int]:
        """``score``, and the tokens the model read (every pair's, as truncated). Stops with
        ``Cancelled`` before the next batch once ``cancelled`` is set."""
        order = sorted(range(len(documents)), key=lambda i: len(documents[i]))  # less padding
        out = [0.0] * len(documents)
        tokens = 0
        for start in range(0, len(order), self.batch_size):
            if cancelled is not None and cancelled.is_set():
                raise Cancelled
            ids = order[start : start + self.batch_size]
            scores, read = self._batch(query, [documents[i] for i in ids])
            tokens += read
            for i, s in zip(ids, scores.tolist(), strict=True):
                out[i] = float(s)
        return out, tokens


def _tokenizer_limit(folder: Path) -> int:
    """``model_max_length`` of a tokenizer_config.json beside the tokenizer, when sensible."""
    try:
        value = json.loads((folder / "tokenizer_config.json").read_text()).get("model_max_length")
    except (OSError, ValueError, AttributeError):
        return MAX_LENGTH * 16
    return int(value) if isinstance(value, int) and 8 <= value <= 1_000_000 else MAX_LENGTH * 16


class FairExecutor:
    """One worker thread that runs the jobs of its owners in turn (round robin; each owner's in
    arrival order): a job waits behind at most one job of each other owner with work queued,
    however many that owner queued. ``submit`` is ``ThreadPoolExecutor.submit`` with an owner."""

    def __init__(self, name: str) -> None:
        self._queues: dict[object, collections.deque] = {}  # owner → its jobs, oldest first
        self._turns: collections.deque = collections.deque()  # owners with jobs, next first
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn, *args, owner: object = None) -> Future:
        future: Future = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("executor shut down")
            queue = self._queues.get(owner)
            if queue is None:
                queue = self._queues[owner] = collections.deque()
                self._turns.append(owner)
            entry = (future, fn, args)
            queue.append(entry)
            self._cv.notify()
        future.add_done_callback(lambda f: self._drop(owner, entry) if f.cancelled() else None)
        return future

    def _drop(self, owner: object, entry: tuple) -> None:
        """A job given up while it waited leaves its queue (and lets go of its arguments)."""
        with self._cv:
            queue = self._queues.get(owner)
            if queue is None or entry not in queue:
                return
            queue.remove(entry)
            if not queue:
                del self._queues[owner]
                self._turns.remove(owner)

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._turns and not self._closed:
                    self._cv.wait()
                if not self._turns:
                    return
                owner = self._turns.popleft()
                queue = self._queues[owner]
                future, fn, args = queue.popleft()
                if queue:
                    self._turns.append(owner)  # its next job after the other owners' next
                else:
                    del self._queues[owner]
            if not future.set_running_or_notify_cancel():  # given up while it waited
                continue
            try:
                result = fn(*args)
            except BaseException as exc:  # the caller sees it
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self) -> None:
        with self._cv:
            self._closed = True
            jobs = [job for queue in self._queues.values() for job in queue]
            self._queues.clear()
            self._turns.clear()
            self._cv.notify_all()
        for future, _, _ in jobs:
            future.cancel()


class LocalReranker:
    """rag.rerank.Reranker over a local cross-encoder. ``name``: the model name clients and
    knowledge bases use for it (default ``local/<folder name>``)."""

    def __init__(
        self,
        folder: str | Path,
        *,
        name: str | None = None,
        max_length: int = MAX_LENGTH,
        batch_size: int = BATCH,
        max_documents: int = MAX_DOCUMENTS,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self.folder = Path(folder).expanduser().resolve()
        self.name = name or f"local/{self.folder.name}"
        self.max_documents = max_documents
        self.timeout_s = timeout_s
        try:
            self.model = CrossEncoder(self.folder, max_length=max_length, batch_size=batch_size)
        except ModelError as exc:
            raise ModelError(f"local re-ranker {self.folder}: {exc}") from None
        self._executor = FairExecutor("rerank-local")
        self._lock = threading.Lock()
        self._waiting = 0  # calls queued or running on the model's thread
        self._by_owner: dict[str, int] = {}

    async def rerank(self, query: str, documents: list[str], top_n: int) -> list[tuple[int, float]]:
        """``rerank_counted`` without the count (rag.rerank.Reranker)."""
        return (await self.rerank_counted(query, documents, top_n))[0]

    async def rerank_counted(
        self, query: str, documents: list[str], top_n: int, owner: str | None = None
    ) -> tuple[list[tuple[int, float]], int]:
        """Scored on the model's thread, in its owner's turn (FairExecutor); with the tokens the
        model read. A call that waits and runs longer than ``timeout_s`` fails, and so does one
        whose caller is gone: queued, it leaves the queue; running, it stops at its next batch
        (its place is held until then). Beyond ``MAX_WAITING`` calls in the queue, or
        ``MAX_WAITING_PER_OWNER`` of ``owner``'s (when named), a new one fails at once rather
        than wait."""
        if not documents:
            return [], 0
        if len(documents) > self.max_documents:
            raise RerankError(f"at most {self.max_documents} documents per local re-rank")
        with self._lock:
            if self._waiting >= MAX_WAITING or self._by_owner.get(owner, 0) >= MAX_WAITING_PER_OWNER:
                raise RerankError("local re-ranker busy")
            self._waiting += 1
            if owner is not None:
                self._by_owner[owner] = self._by_owner.get(owner, 0) + 1
        cancelled = threading.Event()
        try:
            job = self._executor.submit(self.model.score_counted, query, list(documents), cancelled, owner=owner)
        except RuntimeError:  # shut down
            self._release(owner)
            raise RerankError("local re-ranker stopped") from None
        job.add_done_callback(lambda _: self._release(owner))  # when the thread is free of it
        try:
            scores, tokens = await asyncio.wait_for(asyncio.wrap_future(job), self.timeout_s)
        except TimeoutError:
            raise RerankError(f"local re-ranker timed out after {self.timeout_s:g} s") from None
        except Exception as exc:  # the model's own failure: the caller keeps its order
            log.warning("local re-ranker failed: %s", type(exc).__name__)
            raise RerankError(f"local re-ranker failed ({type(exc).__name__})") from None
        finally:
            cancelled.set()  # given up (or done): a running job stops at its next batch
        ranked = sorted(enumerate(scores), key=lambda p: -p[1])
        return ranked[: max(1, min(top_n, len(documents)))], tokens

    def _release(self, owner: str | None) -> None:
        with self._lock:
            self._waiting -= 1
            if owner is None:
                return
            left = self._by_owner.get(owner, 0) - 1
            if left > 0:
                self._by_owner[owner] = left
            else:
                self._by_owner.pop(owner, None)

    def close(self) -> None:
        self._executor.shutdown()


def from_settings(settings, environ=os.environ, taken: frozenset[str] = frozenset()) -> LocalReranker | None:
    """The re-ranker ``settings`` (core.config.RagRerank) describe, its folder named there or in
    ``GATEWAY_RERANK_MODEL_DIR``; None when neither names one. Raises ModelError (start-up
    fails) when the folder named cannot be used or its name is ``taken`` (by a model group)."""
    folder = settings.local_model_dir or environ.get(ENV_DIR, "").strip() or None
    if folder is None:
        return None
    name = settings.name or f"local/{Path(folder).expanduser().resolve().name}"
    if name in taken:
        raise ModelError(f"local re-ranker: its name {name!r} is a configured model group; set rag.rerank.name")
    reranker = LocalReranker(
        folder,
        name=name,
        max_length=settings.max_length,
        batch_size=settings.batch_size,
        max_documents=settings.max_documents,
        timeout_s=settings.timeout_s,
    )
    log.info("local re-ranker %s loaded from %s", reranker.name, reranker.folder)
    return reranker
