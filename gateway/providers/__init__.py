"""Provider adapters: one module per wire format."""

from __future__ import annotations

from core.config import Provider
from core.upstream import Upstream
from gateway.providers.base import ProviderAdapter


def build_adapter(cfg: Provider, upstream: Upstream) -> ProviderAdapter:
    """The adapter of a provider, behind the guard that scrubs what its errors say."""
    from gateway.providers.guard import GuardedAdapter

    return GuardedAdapter(_adapter(cfg, upstream), cfg)


def _adapter(cfg: Provider, upstream: Upstream) -> ProviderAdapter:
    if cfg.kind == "openai":
        from gateway.providers.openai import OpenAIAdapter

        return OpenAIAdapter(cfg, upstream)
    if cfg.kind == "anthropic":
        from gateway.providers.anthropic import AnthropicAdapter

        return AnthropicAdapter(cfg, upstream)
    if cfg.kind == "litellm":
        from gateway.providers.litellm import LiteLLMAdapter  # imports litellm: only when configured

        return LiteLLMAdapter(cfg, upstream)
    raise ValueError(f"unknown provider kind {cfg.kind!r}")
