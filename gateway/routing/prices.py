"""Model prices and context windows from litellm's bundled price map, read as a file.

litellm is never imported for this: the JSON file ships inside its package and is found by
path. Config overrides (``input_cost_per_token``, ``output_cost_per_token``,
``context_window`` on a deployment) win over the map.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

import orjson

from gateway.config import Deployment, Provider


def _litellm_dir() -> Path | None:
    spec = importlib.util.find_spec("litellm")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@cache
def price_map() -> dict:
    folder = _litellm_dir()
    if folder is None:
        return {}
    path = folder / "model_prices_and_context_window_backup.json"
    try:
        return orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}


def tokenizer_dir() -> Path | None:
    folder = _litellm_dir()
    return folder / "litellm_core_utils" / "tokenizers" if folder else None


def lookup(provider: Provider, model: str) -> dict:
    """The price-map entry for a deployed model, trying the names litellm files it under."""
    prices = price_map()
    candidates = [model]
    if provider.litellm_provider:
        candidates.insert(0, f"{provider.litellm_provider}/{model}")
    candidates.append(f"{provider.kind}/{model}")
    for name in candidates:
        entry = prices.get(name)
        if isinstance(entry, dict):
            return entry
    return {}


def deployment_prices(provider: Provider, dep: Deployment) -> tuple[float | None, float | None, int | None]:
    """(input USD/token, output USD/token, context window) with config overrides applied."""
    entry = (
        {}
        if dep.input_cost_per_token is not None and dep.output_cost_per_token is not None and dep.context_window
        else lookup(provider, dep.model)
    )
    inp = dep.input_cost_per_token if dep.input_cost_per_token is not None else entry.get("input_cost_per_token")
    out = dep.output_cost_per_token if dep.output_cost_per_token is not None else entry.get("output_cost_per_token")
    window = dep.context_window or entry.get("max_input_tokens") or entry.get("max_tokens")
    return inp, out, int(window) if window else None
