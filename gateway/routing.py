"""The route stage: a model name → a deployment of its group and one of its provider's keys.

Deployments are chosen by weight; a provider's keys take turns, so load spreads evenly over
them. (Fallbacks, retries, cooldowns and the other strategies build on this.)
"""

from __future__ import annotations

import itertools
import random

from gateway.config import Config, Model
from gateway.errors import InvalidRequest, ModelNotFound
from gateway.types import Route


class _Group:
    __slots__ = ("cumulative", "model", "routes_base", "total")

    def __init__(self, model: Model) -> None:
        self.model = model
        self.routes_base = [(d.provider, f"{d.provider}/{d.model}", d.model) for d in model.deployments]
        weights = list(itertools.accumulate(d.weight for d in model.deployments))
        self.cumulative = weights
        self.total = weights[-1]


class Router:
    def __init__(self, config: Config) -> None:
        self._groups = {m.name: _Group(m) for m in config.models}
        self._keys = {p.name: itertools.cycle(p.api_keys or [None]) for p in config.providers}
        self._random = random.Random()

    @property
    def models(self) -> list[Model]:
        return [g.model for g in self._groups.values()]

    def model(self, name: str) -> Model | None:
        group = self._groups.get(name)
        return group.model if group else None

    def route(self, name: str, mode: str) -> Route:
        group = self._groups.get(name)
        if group is None:
            raise ModelNotFound(f"The model `{name}` does not exist or you do not have access to it.", param="model")
        if group.model.mode != mode:
            use = "/v1/embeddings" if group.model.mode == "embedding" else "/v1/chat/completions"
            raise InvalidRequest(
                f"The model `{name}` is an {group.model.mode} model; use {use}.",
                param="model",
                code="unsupported_model",
            )
        if len(group.routes_base) == 1:
            index = 0
        else:
            point = self._random.random() * group.total
            index = next(i for i, c in enumerate(group.cumulative) if point < c)
        provider, deployment, upstream_model = group.routes_base[index]
        return Route(
            model=name,
            provider=provider,
            deployment=deployment,
            upstream_model=upstream_model,
            api_key=next(self._keys[provider]),
        )
