"""Keeping a request alive through provider failures: retries, backoff, fallbacks.

An attempt that fails with a provider error (connect error, timeout, 429, 5xx, garbage) is
retried at once on another key or deployment of the same model group; when the group has
nothing left to try, the request falls back along the model's ``fallbacks`` chain at once;
once the whole chain was tried, it goes round again after an exponential backoff with full
jitter (at least the provider's ``retry-after``, when it gave one).
Context-window and content-policy refusals take their own chains. Errors that are the
client's (400, ...) are never retried. Everything happens within the router's deadline and
``max_attempts``; a cooldown that ends soon enough (``retry-after``) is waited out.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from core import metrics
from core.errors import GatewayError, InvalidRequest, RateLimited, ServiceUnavailable, UpstreamError
from core.types import RequestContext, Route
from gateway.routing import health
from gateway.routing.router import Group, Router

T = TypeVar("T")

_SPECIAL_CHAINS = {
    "context_length_exceeded": "context_window_fallbacks",
    "content_policy_violation": "content_policy_fallbacks",
    "content_filter": "content_policy_fallbacks",
}
_MAX_WAIT = 10.0  # longest single wait for a cooldown to end


def _unavailable(ctx: RequestContext, router: Router, chain: list[Group]) -> GatewayError:
    """Nothing could be tried: 429 when every usable deployment's keys are rate limited, else 503."""
    times = [t for g in chain if (t := router.earliest_return(g)) is not None]
    headers = {}
    if times:
        headers["retry-after"] = str(max(1, round(min(times) - health.now())))
    now = health.now()
    if any(d.health.admissible(now) for g in chain for d in g.deployments):
        return RateLimited(
            f"Every provider key able to serve model `{ctx.model}` is rate limited right now.", headers=headers
        )
    return ServiceUnavailable(
        f"No deployment of model `{ctx.model}` is available right now; all are cooling down or failing.",
        headers=headers,
        code="no_healthy_deployment",
    )


async def run_attempts(
    router: Router, ctx: RequestContext, group: Group, attempt: Callable[[Route], Awaitable[T]], *, hold: bool = False
) -> T:
    """Runs ``attempt`` until one succeeds. With ``hold`` the successful route stays counted
    as in flight (a stream still being relayed): the caller then calls ``router.release``."""
    settings = router.settings
    deadline = ctx.started + settings.deadline
    chain = [group, *router.fallbacks(group, "fallbacks", ctx)]  # only groups the key may use
    used_chains: set[str] = set()
    idx = 0
    skip_deps: set[str] = set()
    skip_keys: set[str] = set()
    rounds = 0
    unfit: set[str] = set()
    last: GatewayError | None = None
    while ctx.attempts < settings.max_attempts:
        current = chain[idx]
        route = router.pick(current, ctx, skip_deps, skip_keys)
        if route is None and not ctx.attempts and not skip_deps and not skip_keys:
            reasons = router.unfit_reasons(current, ctx)
            if reasons:
                unfit.update(reasons)
                if "context window" in reasons and "context_window_fallbacks" not in used_chains:
                    used_chains.add("context_window_fallbacks")
                    extra = [g for g in router.fallbacks(group, "context_window_fallbacks", ctx) if g not in chain]
                    chain = [*chain[: idx + 1], *extra, *chain[idx + 1 :]]
        if route is None:
            if idx + 1 < len(chain):  # nothing (left) to try in this group: fall back at once
                idx += 1
                ctx.fallbacks += 1
                metrics.fallbacks.get(ctx.model, chain[idx].model.name).inc()
                continue
            # Everything in the chain was tried, or is cooling down: wait and go round again,
            # if something will be usable soon enough (backoff with full jitter between rounds).
            now = health.now()
            ready = min(router.ready_at(g, ctx) for g in chain) - now
            delay = ready
            tried = bool(skip_deps or skip_keys)
            if not tried and delay <= 0:
                break  # usable now yet not picked: nothing more can come of another round
            if tried:
                delay = max(ready, random.random() * min(settings.backoff.max, settings.backoff.base * 2**rounds))
                rounds += 1
            if delay > _MAX_WAIT or time.perf_counter() + delay >= deadline:
                break
            if delay > 0:
                await asyncio.sleep(delay + 0.002)
            skip_deps.clear()
            skip_keys.clear()
            idx = 0
            continue
        if ctx.attempts:
            metrics.retries.get(ctx.model).inc()
        ctx.route = route
        ctx.attempts += 1
        ctx.upstream_headers = None
        ctx.usage = None  # a failed attempt's usage (a stream's usage chunk before it broke) is not this one's
        started = time.perf_counter()
        try:
            result = await attempt(route)
        except GatewayError as err:
            router.finished(route, ctx, err, time.perf_counter() - started)
            router.release(route)
            last = err
            if isinstance(err, UpstreamError):
                metrics.upstream_errors.get(route.provider, metrics.code_label(err.code)).inc()
                if err.upstream_status in (401, 403, 429):
                    skip_keys.add(route.key_state.id)
                else:
                    skip_deps.add(route.deployment)
                if time.perf_counter() >= deadline:
                    break
                continue
            special = _SPECIAL_CHAINS.get(err.code or "")
            if special is None or special in used_chains:
                raise
            used_chains.add(special)
            extra = [g for g in router.fallbacks(group, special, ctx) if g not in chain[: idx + 1]]
            if not extra:
                raise
            chain = [*chain[: idx + 1], *extra]
            idx += 1
            ctx.fallbacks += 1
            metrics.fallbacks.get(ctx.model, chain[idx].model.name).inc()
            continue
        except BaseException:
            router.abandoned(route)
            raise
        router.finished(route, ctx, None, time.perf_counter() - started)
        if not hold:
            router.release(route)
        return result
    if last is not None:
        raise last
    if unfit and not ctx.attempts:
        code = "context_length_exceeded" if unfit == {"context window"} else "no_deployment_meets_constraints"
        raise InvalidRequest(
            f"No deployment of model `{ctx.model}` can serve this request ({'; '.join(sorted(unfit))}).",
            param="messages" if code == "context_length_exceeded" else "model",
            code=code,
        )
    raise _unavailable(ctx, router, chain)
