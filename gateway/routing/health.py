"""Health of keys and deployments, as this process knows it (shared.py keeps replicas in step).

A key is cooled down after a 429 (until ``retry-after`` / the reset time) and taken out of
rotation after a 401/403. A deployment has a circuit breaker: ``failures`` errors within
``window`` seconds open it for ``cooldown`` seconds; then a single probe request is let
through (half-open), and its outcome closes or re-opens the circuit.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from dataclasses import dataclass, field

from core.config import Circuit, Deployment

CLOSED, HALF_OPEN, OPEN = 0, 1, 2
KEY_DISABLED_FOR = 3600.0


def key_id(key: str | None) -> str:
    return hashlib.sha256((key or "").encode()).hexdigest()[:12]


@dataclass(slots=True)
class KeyState:
    provider: str
    key: str | None
    id: str
    cooldown_until: float = 0.0
    disabled_until: float = 0.0
    remaining: int | None = None
    limit: int | None = None
    reset_at: float = 0.0

    def available(self, now: float) -> bool:
        if now < self.cooldown_until or now < self.disabled_until:
            return False
        return not (self.remaining == 0 and now < self.reset_at)

    def headroom(self) -> float:
        """Requests left before the provider's limit; unknown counts as plenty (so it gets tried)."""
        return float("inf") if self.remaining is None else float(self.remaining)


@dataclass(slots=True)
class ProviderKeys:
    name: str
    keys: list[KeyState]
    turn: int = 0

    def by_id(self, kid: str) -> KeyState | None:
        return next((k for k in self.keys if k.id == kid), None)

    def next_available(self, now: float, exclude: frozenset | set, prefer_headroom: bool) -> KeyState | None:
        keys = self.keys
        if prefer_headroom:
            best = None
            for k in keys:
                if k.available(now) and k.id not in exclude and (best is None or k.headroom() > best.headroom()):
                    best = k
            return best
        n = len(keys)
        for i in range(n):
            k = keys[(self.turn + i) % n]
            if k.id not in exclude and k.available(now):
                self.turn = (self.turn + i + 1) % n
                return k
        return None

    def earliest_return(self, now: float) -> float | None:
        """When the first unavailable key is usable again (disabled keys excepted)."""
        times = [
            max(k.cooldown_until, k.reset_at if k.remaining == 0 else 0.0) for k in self.keys if k.disabled_until <= now
        ]
        future = [t for t in times if t > now]
        return min(future) if future else None


@dataclass(slots=True)
class UpstreamHealth:
    """One upstream deployment (a provider's model) as this process knows it. Every entry of the
    config naming the same provider and model shares it, whichever group lists it: a circuit
    opened by one group's failures protects the others, and least-busy / latency see all the
    traffic it gets. Replicas share its circuit under its id (shared.py)."""

    id: str  # provider/upstream-model
    in_flight: int = 0
    latency: float | None = None  # decayed moving average, seconds
    failures: deque = field(default_factory=deque)
    state: int = CLOSED
    open_until: float = 0.0
    probing: bool = False

    def admissible(self, now: float) -> bool:
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            return now >= self.open_until and not self.probing
        return not self.probing  # HALF_OPEN: one probe at a time

    def record_latency(self, seconds: float, alpha: float = 0.2) -> None:
        self.latency = seconds if self.latency is None else (1 - alpha) * self.latency + alpha * seconds

    def record_success(self) -> None:
        if self.state != CLOSED:
            self.state = CLOSED
            self.failures.clear()
        self.probing = False

    def record_failure(self, now: float, circuit: Circuit) -> bool:
        """Counts a failure; True when this one opened (or re-opened) the circuit."""
        self.probing = False
        if self.state in (HALF_OPEN, OPEN):
            self.open(now + circuit.cooldown)
            return True
        failures = self.failures
        failures.append(now)
        while failures and failures[0] < now - circuit.window:
            failures.popleft()
        if len(failures) >= circuit.failures:
            self.open(now + circuit.cooldown)
            return True
        return False

    def open(self, until: float) -> None:
        self.state = OPEN
        self.open_until = max(self.open_until, until)
        self.failures.clear()

    def start_attempt(self, now: float) -> None:
        self.in_flight += 1
        if self.state == OPEN and now >= self.open_until:
            self.state = HALF_OPEN
        if self.state == HALF_OPEN:
            self.probing = True


@dataclass(slots=True)
class DeploymentState:
    """One deployment entry of one model group: the operator's settings for it (weight, tags,
    prices, context window) and the health of the upstream it calls, shared with every other
    entry naming the same provider and model."""

    id: str  # provider/upstream-model: the upstream's id (headers, ledger, metrics, shared health)
    cfg: Deployment
    provider: str
    keys: ProviderKeys
    health: UpstreamHealth
    tags: frozenset
    input_cost: float | None
    output_cost: float | None
    context_window: int | None

    def estimated_cost(self, prompt_tokens: int, max_output: int) -> float:
        if self.input_cost is None or self.output_cost is None:
            return float("inf")
        return prompt_tokens * self.input_cost + max_output * self.output_cost


def now() -> float:
    return time.time()
