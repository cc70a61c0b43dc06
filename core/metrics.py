"""Prometheus metrics. With several workers, prometheus_client's multiprocess mode is used
(``PROMETHEUS_MULTIPROC_DIR`` is set by ``gateway serve`` before the workers start)."""

from __future__ import annotations

import logging
import os
import re

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

log = logging.getLogger("gateway.metrics")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 1.5, 2.5, 5, 10, 30)

REQUESTS = Counter(
    "gateway_requests_total",
    "Requests by endpoint, model, provider and HTTP status",
    ["endpoint", "model", "provider", "status"],
)
LATENCY = Histogram(
    "gateway_request_duration_seconds",
    "Whole-request latency as the client saw it",
    ["endpoint", "model", "provider"],
    buckets=_LATENCY_BUCKETS,
)
TTFT = Histogram(
    "gateway_time_to_first_token_seconds",
    "Time to the first streamed chunk",
    ["model", "provider"],
    buckets=_TTFT_BUCKETS,
)
TOKENS = Counter("gateway_tokens_total", "Tokens by kind (prompt, completion, cached)", ["model", "provider", "kind"])
UPSTREAM_ERRORS = Counter(
    "gateway_upstream_errors_total", "Failed upstream attempts by provider and error code", ["provider", "code"]
)
RETRIES = Counter("gateway_retries_total", "Attempts after the first, by requested model", ["model"])
FALLBACKS = Counter("gateway_fallbacks_total", "Fallbacks from a requested model to another group", ["model", "to"])
COOLDOWNS = Counter("gateway_key_cooldowns_total", "Provider keys cooled down or taken out", ["provider", "reason"])
CIRCUIT_OPENED = Counter("gateway_circuit_opened_total", "Circuit breaker trips by deployment", ["deployment"])
CIRCUIT_STATE = Gauge(
    "gateway_circuit_state",
    "Circuit state by deployment: 0 closed, 1 half-open, 2 open",
    ["deployment"],
    multiprocess_mode="max",
)
BUDGET_ALERTS = Counter("gateway_budget_alerts_total", "Budget alert thresholds reached", ["threshold"])
REFUSED = Counter("gateway_refused_total", "Requests refused by a policy", ["reason"])
SPILLED = Counter(
    "gateway_stream_spilled_total",
    "Stream entries moved to local disk while PostgreSQL was away, by stream (ledger, runs, memory)",
    ["stream"],
)
SPILL_FAILURES = Counter(
    "gateway_stream_spill_failures_total",
    "Attempts to move a stream's backlog to local disk that failed (disk full, not writable), by stream",
    ["stream"],
)
DEAD_LETTERS = Counter(
    "gateway_dead_letters_total",
    "Records PostgreSQL refused, moved to a dead-letter stream or file, by stream (ledger, runs, memory)",
    ["stream"],
)
ADMITTED_FROM_CREDIT = Counter(
    "gateway_admitted_from_credit_total", "Requests admitted from this process's admission credit (no Redis call)"
)
PII_ENTITIES = Counter(
    "gateway_pii_entities_total", "Personal data found in requests, by entity type and action", ["entity", "action"]
)
PII_TEXTS = Counter(
    "gateway_pii_texts_total",
    "Texts checked for personal data, by outcome: cached (seen before), clean (no candidate), analysed",
    ["outcome"],
)
PII_WORKER_RECYCLES = Counter(
    "gateway_pii_worker_recycles_total",
    "PII analysis workers replaced by a fresh one because their memory grew past pii.worker_max_growth_mb",
)
IN_FLIGHT = Gauge("gateway_requests_in_flight", "Requests being served", multiprocess_mode="livesum")
AGENT_PROMPT_BYTES = Gauge(
    "gateway_agent_prompt_bytes",
    "Prompt versions the agent registry holds in memory: those labels point at, and pinned ones read on demand",
    ["held"],
    multiprocess_mode="livesum",
)


MAX_SERIES = 2000  # label combinations per metric; more would only come from values out of bounds


class _Children:
    """Caches labelled children: ``.labels()`` costs a lock and a dict build per call.

    Label values must come from bounded sets (configured names, the gateway's own codes); no
    client-chosen string is a label. As a second wall, a metric's label combinations are capped:
    beyond ``MAX_SERIES`` new ones are counted under ``other``, so ``/metrics`` cannot grow
    without bound whatever slips through."""

    __slots__ = ("_cache", "_metric", "_overflow")

    def __init__(self, metric) -> None:
        self._metric = metric
        self._cache: dict[tuple, object] = {}
        self._overflow = None

    def get(self, *labels: str):
        child = self._cache.get(labels)
        if child is None:
            if len(self._cache) >= MAX_SERIES:
                return self._overflowed(len(labels))
            child = self._cache[labels] = self._metric.labels(*labels)
        return child

    def _overflowed(self, n: int):
        if self._overflow is None:
            log.error("metric %s has %d label combinations; counting new ones as 'other'", self._metric, MAX_SERIES)
            self._overflow = self._metric.labels(*(["other"] * n))
        return self._overflow


_CODE = re.compile(r"^[a-z0-9_.\-]{1,64}$")


def code_label(code: str | None) -> str:
    """An error code as a label: codes are the gateway's own, but some are relayed from a
    provider's answer, so anything not shaped like a code is ``other``."""
    if not code:
        return "unknown"
    return code if _CODE.match(code) else "other"


requests = _Children(REQUESTS)
latency = _Children(LATENCY)
ttft = _Children(TTFT)
tokens = _Children(TOKENS)
upstream_errors = _Children(UPSTREAM_ERRORS)
retries = _Children(RETRIES)
fallbacks = _Children(FALLBACKS)
cooldowns = _Children(COOLDOWNS)
circuit_opened = _Children(CIRCUIT_OPENED)
budget_alerts = _Children(BUDGET_ALERTS)
refused = _Children(REFUSED)
pii_entities = _Children(PII_ENTITIES)
pii_texts = _Children(PII_TEXTS)


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
