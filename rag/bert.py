"""A BERT encoder run with numpy: the layers both local models share (the sentence embedder of
rag/embedding.py and the cross-encoder re-ranker of rag/rerank_local.py), no torch.

Token + position + type embeddings, then ``num_hidden_layers`` encoder layers of multi-head
self-attention and an exact (erf) GELU feed-forward, each followed by a residual LayerNorm: the
forward pass of Hugging Face's ``BertModel``. Weights are read from a ``model.safetensors``
(memory-mapped; float32) under an optional key prefix (``bert.`` in a
``BertForSequenceClassification`` checkpoint, none in a sentence-transformers one).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

_DTYPES = {"F32": np.float32, "I64": np.int64}
_ROWS = 128  # tokens per block of the feed-forward
# config keys the forward pass reads, and what they must be
_NEEDED = ("hidden_size", "num_attention_heads", "num_hidden_layers", "layer_norm_eps")


class ModelError(Exception):
    """A model folder that cannot be used; the message names the file and the problem."""


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    if raw.size < 8:
        raise ModelError(f"{path.name}: not a safetensors file")
    size = int(raw[:8].view("<u8")[0])
    if not 2 <= size <= raw.size - 8:
        raise ModelError(f"{path.name}: not a safetensors file")
    try:
        header = json.loads(bytes(raw[8 : 8 + size]))
    except ValueError:
        raise ModelError(f"{path.name}: unreadable safetensors header") from None
    base = 8 + size
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ModelError(f"{path.name}: tensor {name} is {info.get('dtype')}; only F32 weights are supported")
        start, end = info["data_offsets"]
        tensors[name] = np.frombuffer(raw[base + start : base + end], dtype=dtype).reshape(info["shape"])
    return tensors


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
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


def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x * np.float32(0.7071067811865476)))


def read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"config.json: {type(exc).__name__}") from None
    if not isinstance(config, dict):
        raise ModelError("config.json: not an object")
    missing = [k for k in _NEEDED if not isinstance(config.get(k), int | float)]
    if missing:
        raise ModelError(f"config.json: no {', '.join(missing)}")
    if config.get("hidden_act", "gelu") != "gelu":
        raise ModelError(f"config.json: hidden_act {config['hidden_act']!r} is not supported (only 'gelu')")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ModelError("config.json: only absolute position embeddings are supported")
    return config


class BertEncoder:
    """``BertModel``'s embeddings and encoder layers over weights named ``{prefix}embeddings…``
    and ``{prefix}encoder.layer.{i}…``."""

    def __init__(self, config: dict, weights: dict[str, np.ndarray], prefix: str = "") -> None:
        self.heads = int(config["num_attention_heads"])
        self.layers = int(config["num_hidden_layers"])
        self.hidden = int(config["hidden_size"])
        self.eps = float(config["layer_norm_eps"])
        self.prefix = prefix
        self.w = weights
        if self.hidden % self.heads:
            raise ModelError("config.json: hidden_size is not a multiple of num_attention_heads")
        missing = [n for n in self._names() if n not in weights]
        if missing:
            raise ModelError(f"model.safetensors: no tensor {missing[0]} (and {len(missing) - 1} more)")
        word = weights[f"{prefix}embeddings.word_embeddings.weight"]
        if word.ndim != 2 or word.shape[1] != self.hidden:
            raise ModelError("model.safetensors: word embeddings do not match hidden_size")
        self.vocab = word.shape[0]
        self.max_positions = weights[f"{prefix}embeddings.position_embeddings.weight"].shape[0]

    def _names(self) -> list[str]:
        p = self.prefix
        names = [
            f"{p}embeddings.{n}.weight" for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")
        ]
        names += [f"{p}embeddings.LayerNorm.{s}" for s in ("weight", "bias")]
        parts = (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "attention.output.LayerNorm",
            "intermediate.dense",
            "output.dense",
            "output.LayerNorm",
        )
        for i in range(self.layers):
            names += [f"{p}encoder.layer.{i}.{part}.{s}" for part in parts for s in ("weight", "bias")]
        return names

    def dense(self, x: np.ndarray, name: str) -> np.ndarray:
        """``x @ W.T + b`` of the weights named ``name`` (prefixed), as one 2-D product: BLAS
        runs it several times faster than a batched 3-D matmul."""
        w = self.w
        flat = x.reshape(-1, x.shape[-1]) @ w[f"{self.prefix}{name}.weight"].T + w[f"{self.prefix}{name}.bias"]
        return flat.reshape(*x.shape[:-1], -1)

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        return layer_norm(x, self.w[f"{self.prefix}{name}.weight"], self.w[f"{self.prefix}{name}.bias"], self.eps)

    def _attention(self, x: np.ndarray, blocked: np.ndarray, layer: str) -> np.ndarray:
        """Multi-head self-attention, one sequence at a time: its (heads, length, length) scores
        stay in cache through the softmax's passes."""
        n, length, _ = x.shape
        head = self.hidden // self.heads

        def split(t: np.ndarray) -> np.ndarray:
            return t.reshape(n, length, self.heads, head).transpose(0, 2, 1, 3)

        q = split(self.dense(x, f"{layer}.attention.self.query") * np.float32(1 / np.sqrt(head)))
        k = split(self.dense(x, f"{layer}.attention.self.key"))
        v = split(self.dense(x, f"{layer}.attention.self.value"))
        context = np.empty((n, length, self.heads, head), dtype=np.float32)
        for b in range(n):
            scores = q[b] @ k[b].transpose(0, 2, 1)
            scores += blocked[b]
            scores -= scores.max(-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(-1, keepdims=True)
            context[b] = (scores @ v[b]).transpose(1, 0, 2)
        return context.reshape(n, length, -1)

    def _feed_forward(self, x: np.ndarray, layer: str) -> np.ndarray:
        """dense → GELU → dense over ``_ROWS`` tokens at a time: the GELU's many elementwise
        passes then run on a block that stays in cache instead of the whole batch."""
        flat = x.reshape(-1, x.shape[-1])
        out = np.empty_like(flat)
        for start in range(0, len(flat), _ROWS):
            hidden = gelu(self.dense(flat[start : start + _ROWS], f"{layer}.intermediate.dense"))
            out[start : start + _ROWS] = self.dense(hidden, f"{layer}.output.dense")
        return out.reshape(x.shape)

    def forward(self, ids: np.ndarray, types: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The last hidden states, (batch, length, hidden), of token ids with their type ids
        and attention mask (1 for a real token, 0 for padding), each (batch, length)."""
        p = self.prefix
        w = self.w
        length = ids.shape[1]
        x = (
            w[f"{p}embeddings.word_embeddings.weight"][ids]
            + w[f"{p}embeddings.position_embeddings.weight"][np.arange(length)][None]
            + w[f"{p}embeddings.token_type_embeddings.weight"][types]
        )
        x = self._norm(x, "embeddings.LayerNorm")
        blocked = (1.0 - mask.astype(np.float32))[:, None, :] * np.float32(-1e9)
        for i in range(self.layers):
            layer = f"encoder.layer.{i}"
            context = self._attention(x, blocked, layer)
            x = self._norm(
                x + self.dense(context, f"{layer}.attention.output.dense"), f"{layer}.attention.output.LayerNorm"
            )
            x = self._norm(x + self._feed_forward(x, layer), f"{layer}.output.LayerNorm")
        return x


def batch_arrays(encodings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, type ids, attention mask) of a padded batch of ``tokenizers`` encodings."""
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    types = np.array([e.type_ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.float32)
    return ids, types, mask
