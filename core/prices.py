"""Model prices, context windows and modes from litellm's bundled price map, read as a file.

litellm is never imported for this: the JSON file ships inside its package and is found by
path, and nothing is downloaded. Config overrides (``input_cost_per_token``,
``output_cost_per_token``, ``context_window`` on a deployment; ``mode`` on a model) win over
the map. The config module only is imported for its types, so the config can ask this one.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from core.config import Deployment, Provider

# The map's modes the gateway serves, and the endpoint each is served on.
_MODES = {"embedding": "embedding", "chat": "chat", "completion": "chat", "responses": "chat"}


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


def model_mode(provider: Provider, model: str) -> str | None:
    """``chat`` or ``embedding`` as the map files a deployed model, or None when it does not know."""
    mode = lookup(provider, model).get("mode")
    return _MODES.get(mode) if isinstance(mode, str) else None


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
