"""Choosing a deployment and a key for each attempt, and learning from how it went.

A model name is a group of deployments. ``pick`` filters the group down to deployments that are
admissible now (circuit not open, a key available, tags / price / latency / context window
constraints met) and lets the group's strategy choose among them:

- ``weighted``  weighted random (the default)
- ``least-busy`` fewest requests in flight in this process
- ``latency``   lowest decayed latency (time to first token for streams), exploring now and then
- ``cost``      cheapest estimated cost for this request
- ``usage``     most rate-limit headroom left, from the provider's ``x-ratelimit-*`` headers

Each deployment entry of a group keeps its own settings (weight, tags, prices, context
window); entries naming the same provider and model, in whatever groups, call one upstream and
share its health (circuit, in flight, latency) under one id, ``provider/model``. Keys and their
cool-downs belong to the provider.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

from core import metrics
from core.config import Config, Model
from core.errors import GatewayError, InvalidRequest, ModelNotFound, PermissionDenied, UpstreamError
from core.prices import deployment_prices
from core.types import NO_CONSTRAINTS, Constraints, RequestContext, Route, excerpt
from gateway.routing import health
from gateway.routing.health import KEY_DISABLED_FOR, DeploymentState, KeyState, ProviderKeys, UpstreamHealth, key_id
from gateway.routing.ratelimits import read as read_ratelimits

log = logging.getLogger("gateway.routing")


class Group:
    __slots__ = ("deployments", "model", "strategy")

    def __init__(self, model: Model, deployments: list[DeploymentState], strategy: str) -> None:
        self.model = model
        self.deployments = deployments
        self.strategy = strategy


class Router:
    def __init__(self, config: Config, publish: Callable[[dict], None] | None = None) -> None:
        self.settings = config.router
        self.config = config
        self._publish = publish or (lambda event: None)
        self._random = random.Random()
        providers = {p.name: p for p in config.providers}
        self.keys = {
            p.name: ProviderKeys(p.name, [KeyState(p.name, k, key_id(k)) for k in (p.api_keys or [None])])
            for p in config.providers
        }
        self.upstreams: dict[str, UpstreamHealth] = {}
        self.groups: dict[str, Group] = {}
        for m in config.models:
            states = []
            for d in m.deployments:
                dep_id = f"{d.provider}/{d.model}"
                upstream = self.upstreams.get(dep_id)
                if upstream is None:
                    upstream = self.upstreams[dep_id] = UpstreamHealth(dep_id)
                inp, out, window = deployment_prices(providers[d.provider], d)
                state = DeploymentState(
                    id=dep_id,
                    cfg=d,
                    provider=d.provider,
                    keys=self.keys[d.provider],
                    health=upstream,
                    tags=frozenset(d.tags),
                    input_cost=inp,
                    output_cost=out,
                    context_window=window,
                )
                states.append(state)
            self.groups[m.name] = Group(m, states, m.strategy or self.settings.strategy)

    def set_publisher(self, publish: Callable[[dict], None]) -> None:
        self._publish = publish

    # ---- model names -------------------------------------------------------------------------
    @property
    def models(self) -> list[Model]:
        return [g.model for g in self.groups.values()]

    def model(self, name: str) -> Model | None:
        group = self.groups.get(name)
        return group.model if group else None

    def group(self, name: str, mode: str) -> Group:
        group = self.groups.get(name)
        if group is None:
            raise ModelNotFound(
                f"The model `{excerpt(name)}` does not exist or you do not have access to it.", param="model"
            )
        if group.model.mode != mode:
            if "rerank" in (mode, group.model.mode):  # (gateway/rerank.py)
                kind = "a rerank" if group.model.mode == "rerank" else f"a {group.model.mode}"
                raise InvalidRequest(
                    f"The model `{name}` is {kind} model, not one for this endpoint.",
                    param="model",
                    code="unsupported_model",
                )
            kind, use = (
                ("an embedding", "/v1/embeddings")
                if group.model.mode == "embedding"
                else ("a chat", "/v1/chat/completions")
            )
            raise InvalidRequest(
                f"The model `{name}` is {kind} model; use {use}.",
                param="model",
                code="unsupported_model",
            )
        return group

    def resolve(self, ctx: RequestContext, mode: str) -> Group:
        """The group a request is served from: its model, or the first rule of its model that
        matches and whose target the caller's key may use.

        A key's model allow-list holds for every group that serves it, not only for the name it
        asked for. A rule pointing at a group the key may not use is passed over, as if it did
        not match: rules are the operator's routing policy and the allow-list narrows it, so a
        restricted key gets the first route it may take (the catch-all, typically) — and a
        client cannot reach a group it may not use by shaping its request (metadata, prompt size,
        tools) to match a rule. When every matching rule is passed over: 403 model_not_allowed.
        """
        group = self.group(ctx.model, mode)
        if not group.model.rules:
            return group
        from gateway.routing.rules import matches

        allowed = ctx.models_allowed
        refused = None
        for rule in group.model.rules:
            if matches(rule.when, ctx):
                if allowed and rule.use not in allowed:
                    refused = refused or rule.use
                    continue
                return self.group(rule.use, mode)
        if refused is not None:
            raise PermissionDenied(
                f"This API key may not use model `{refused}`, which model `{ctx.model}` routes this request to.",
                param="model",
                code="model_not_allowed",
            )
        raise InvalidRequest(
            f"No routing rule of model `{ctx.model}` matches this request.", param="model", code="no_matching_rule"
        )

    def fallbacks(self, group: Group, kind: str, ctx: RequestContext | None = None) -> list[Group]:
        """The groups of one of a group's fallback chains that may serve this request: a group
        the caller's key may not use (its model allow-list) is skipped, never served."""
        names = getattr(group.model, kind)
        allowed = ctx.models_allowed if ctx is not None else None
        return [self.groups[n] for n in names if n in self.groups and (not allowed or n in allowed)]

    # ---- choosing -----------------------------------------------------------------------------
    def pick(self, group: Group, ctx: RequestContext, skip_deployments: set, skip_keys: set) -> Route | None:
        now = health.now()
        c = ctx.constraints
        strategy = c.strategy or group.strategy
        candidates: list[tuple[DeploymentState, KeyState]] = []
        prefer_headroom = strategy == "usage"
        for dep in group.deployments:
            if dep.id in skip_deployments or not dep.health.admissible(now):
                continue
            if (c is not NO_CONSTRAINTS or dep.context_window is not None) and not self._fits(dep, ctx, c):
                continue
            key = dep.keys.next_available(now, skip_keys, prefer_headroom)
            if key is None:
                continue
            candidates.append((dep, key))
        if not candidates:
            return None
        dep, key = candidates[0] if len(candidates) == 1 else self._choose(strategy, candidates, ctx)
        dep.health.start_attempt(now)
        return Route(
            model=group.model.name,
            provider=dep.provider,
            deployment=dep.id,
            upstream_model=dep.cfg.model,
            api_key=key.key,
            state=dep,
            key_state=key,
        )

    def _fits(self, dep: DeploymentState, ctx: RequestContext, c: Constraints) -> bool:
        return self._unfit(dep, ctx, c) is None

    @staticmethod
    def _unfit(dep: DeploymentState, ctx: RequestContext, c: Constraints) -> str | None:
        """Why a deployment cannot serve this request whatever its health, if it cannot."""
        if c.tags and not c.tags <= dep.tags:
            return "tags " + excerpt(",".join(sorted(c.tags - dep.tags)))  # client-chosen: bounded
        latency = dep.health.latency
        if c.max_latency is not None and latency is not None and latency > c.max_latency:
            return "max latency"
        window = dep.context_window
        if window is not None and ctx.body_bytes + ctx.max_output > window:
            # the body's size bounds its token count from above; count only when it matters
            if ctx.prompt_tokens() + ctx.max_output > window:
                return "context window"
        if c.max_price is not None and dep.estimated_cost(ctx.prompt_tokens(), ctx.max_output or 256) > c.max_price:
            return "max price"
        return None

    def unfit_reasons(self, group: Group, ctx: RequestContext) -> set[str]:
        """Empty when some deployment of the group could serve the request if it were healthy."""
        reasons = set()
        for dep in group.deployments:
            why = self._unfit(dep, ctx, ctx.constraints)
            if why is None:
                return set()
            reasons.add(why)
        return reasons

    def _choose(self, strategy: str, candidates: list, ctx: RequestContext) -> tuple:
        rnd = self._random
        if strategy == "least-busy":
            low = min(d.health.in_flight for d, _ in candidates)
            return rnd.choice([c for c in candidates if c[0].health.in_flight == low])
        if strategy == "latency":
            if rnd.random() < self.settings.latency_exploration:
                return rnd.choice(candidates)
            return min(candidates, key=lambda c: (c[0].health.latency or 0.0, rnd.random()))
        if strategy == "cost":
            tokens = ctx.prompt_tokens()
            out = ctx.max_output or 256
            return min(candidates, key=lambda c: (c[0].estimated_cost(tokens, out), rnd.random()))
        if strategy == "usage":
            return max(candidates, key=lambda c: (c[1].headroom(), rnd.random()))
        total = 0.0
        for d, _ in candidates:
            total += d.cfg.weight
        point = rnd.random() * total
        for c in candidates:
            point -= c[0].cfg.weight
            if point < 0:
                return c
        return candidates[-1]

    def ready_at(self, group: Group, ctx: RequestContext) -> float:
        """When some deployment able to serve the request is next usable (now, if one is); inf if never."""
        now = health.now()
        best = float("inf")
        for dep in group.deployments:
            if self._unfit(dep, ctx, ctx.constraints) is not None:
                continue
            up = dep.health
            if up.admissible(now):
                t_circuit = now
            elif up.state == health.OPEN:
                t_circuit = up.open_until
            else:
                t_circuit = now + 0.05  # a half-open probe is under way
            if any(k.available(now) for k in dep.keys.keys):
                t_key = now
            else:
                t_key = dep.keys.earliest_return(now) or float("inf")
            best = min(best, max(t_circuit, t_key))
        return best

    def earliest_return(self, group: Group) -> float | None:
        """When something in this group that is cooling down becomes usable again."""
        now = health.now()
        times = []
        for dep in group.deployments:
            up = dep.health
            if up.state == health.OPEN and up.open_until > now:
                times.append(up.open_until)
            t = dep.keys.earliest_return(now)
            if t is not None:
                times.append(t)
        return min(times) if times else None

    # ---- learning -----------------------------------------------------------------------------
    def finished(self, route: Route, ctx: RequestContext, error: GatewayError | None, elapsed: float) -> None:
        up: UpstreamHealth = route.state.health
        key: KeyState = route.key_state
        headers = ctx.upstream_headers
        if headers is not None:
            remaining, limit, _tokens, reset_at = read_ratelimits(headers)
            if remaining is not None:
                key.remaining, key.limit, key.reset_at = remaining, limit, reset_at or 0.0
        if error is None:
            up.record_success()
            up.record_latency(ctx.ttft if ctx.ttft is not None else elapsed)
            return
        if not isinstance(error, UpstreamError):
            up.record_success()  # the provider answered properly; the request was at fault
            return
        now = health.now()
        status = error.upstream_status
        if status == 429:
            wait = error.retry_after
            if wait is None and key.remaining == 0 and key.reset_at > now:
                wait = key.reset_at - now
            until = now + (wait if wait is not None else self.settings.key_cooldown)
            key.cooldown_until = max(key.cooldown_until, until)
            up.probing = False
            metrics.cooldowns.get(route.provider, "rate_limited").inc()
            self._publish({"t": "key", "p": key.provider, "k": key.id, "until": key.cooldown_until})
            return
        if status in (401, 403):
            key.disabled_until = now + KEY_DISABLED_FOR
            up.probing = False
            metrics.cooldowns.get(route.provider, "auth_failed").inc()
            log.error(
                "provider rejected an API key; key taken out of rotation",
                extra={"fields": {"provider": key.provider, "key_id": key.id, "status": status}},
            )
            self._publish({"t": "key_off", "p": key.provider, "k": key.id, "until": key.disabled_until})
            return
        if up.record_failure(now, self.settings.circuit):
            metrics.circuit_opened.get(up.id).inc()
            log.warning("circuit opened", extra={"fields": {"deployment": up.id, "until": up.open_until}})
            self._publish({"t": "circuit", "d": up.id, "until": up.open_until})

    @staticmethod
    def release(route: Route) -> None:
        """The attempt no longer occupies its deployment (least-busy counts these)."""
        route.state.health.in_flight -= 1

    @staticmethod
    def abandoned(route: Route) -> None:
        """The attempt was cancelled (the client left): no verdict on the deployment."""
        up = route.state.health
        up.in_flight -= 1
        up.probing = False

    def apply(self, event: dict) -> None:
        """A health event from another replica (or from Redis at start-up)."""
        kind = event.get("t")
        until = float(event.get("until", 0))
        if kind in ("key", "key_off"):
            keys = self.keys.get(event.get("p", ""))
            key = keys.by_id(event.get("k", "")) if keys else None
            # no key is out for longer than a rejected one (or the configured cooldown): an event
            # stored before retry-after was bounded (centuries) must not retire the key for good
            until = min(until, health.now() + max(KEY_DISABLED_FOR, self.settings.key_cooldown))
            if key is not None:
                if kind == "key":
                    key.cooldown_until = max(key.cooldown_until, until)
                else:
                    key.disabled_until = max(key.disabled_until, until)
        elif kind == "circuit":
            up = self.upstreams.get(event.get("d", ""))
            if up is not None and until > health.now():
                up.open(until)

    def circuit_states(self) -> dict[str, int]:
        return {u.id: u.state for u in self.upstreams.values()}
