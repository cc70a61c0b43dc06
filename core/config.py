"""The gateway's configuration file: YAML, ``${VAR}`` interpolated, validated with paths.

``load_config`` raises ``ConfigError`` carrying *every* problem found, each prefixed with its
path in the file (``providers[1].kind: ...``), which is what ``gateway check-config`` prints.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PROVIDER_KINDS = ("openai", "anthropic", "litellm")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(_Strict):
    connect: float = Field(5.0, gt=0)
    first_byte: float = Field(60.0, gt=0)
    idle: float = Field(60.0, gt=0)
    total: float = Field(600.0, gt=0)


class Provider(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    kind: Literal["openai", "anthropic", "litellm"]
    base_url: str | None = None
    api_keys: list[str] = Field(default_factory=list)
    headers: dict[str, str] = Field(default_factory=dict)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    # anthropic
    anthropic_version: str = "2023-06-01"
    default_max_tokens: int = Field(4096, gt=0)
    # litellm: the litellm provider prefix, e.g. "groq", "gemini", "bedrock"
    litellm_provider: str | None = None

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^\s/]+", v):
            raise ValueError("must be an http:// or https:// URL")
        return v.rstrip("/") if v else v

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, v: list[str]) -> list[str]:
        for i, key in enumerate(v):
            if not key.strip():
                raise ValueError(f"api_keys[{i}] is empty")
        return v


STRATEGIES = ("weighted", "least-busy", "latency", "cost", "usage")
Strategy = Literal["weighted", "least-busy", "latency", "cost", "usage"]


class Deployment(_Strict):
    provider: str
    model: str = Field(min_length=1)
    weight: float = Field(1.0, gt=0)
    tags: list[str] = Field(default_factory=list)
    # Overrides of the bundled price map (USD per token) and context window (tokens).
    input_cost_per_token: float | None = Field(None, ge=0)
    output_cost_per_token: float | None = Field(None, ge=0)
    context_window: int | None = Field(None, gt=0)


class RuleCondition(_Strict):
    """All given conditions must hold. ``metadata`` compares the request's metadata fields."""

    metadata: dict[str, str] = Field(default_factory=dict)
    prompt_tokens_over: int | None = Field(None, ge=0)
    has_tools: bool | None = None
    has_images: bool | None = None


class Rule(_Strict):
    when: RuleCondition = Field(default_factory=RuleCondition)
    use: str = Field(min_length=1)


class Model(_Strict):
    name: str = Field(min_length=1, max_length=256)
    # Served on /v1/chat/completions or /v1/embeddings. When not given, taken from the bundled
    # model map: a group whose deployments it files as embedding models is an embedding group
    # (``_infer_modes``); an explicit mode always wins.
    mode: Literal["chat", "embedding", "rerank"] = "chat"  # rerank: POST /v1/rerank (gateway/rerank.py)
    deployments: list[Deployment] = Field(default_factory=list)
    # A model with rules and no deployments routes each request to the first matching group.
    rules: list[Rule] = Field(default_factory=list)
    strategy: Strategy | None = None
    fallbacks: list[str] = Field(default_factory=list)
    context_window_fallbacks: list[str] = Field(default_factory=list)
    content_policy_fallbacks: list[str] = Field(default_factory=list)
    owned_by: str = "gateway"

    @model_validator(mode="after")
    def _deployments_or_rules(self) -> Model:
        if bool(self.deployments) == bool(self.rules):
            raise ValueError("give either deployments (at least one) or rules")
        return self


class Backoff(_Strict):
    base: float = Field(0.05, ge=0)
    max: float = Field(2.0, ge=0)


class Circuit(_Strict):
    failures: int = Field(5, ge=1)  # failures within `window` seconds open the circuit
    window: float = Field(30.0, gt=0)
    cooldown: float = Field(15.0, gt=0)  # then one probe request (half-open)


class RouterSettings(_Strict):
    strategy: Strategy = "weighted"
    max_attempts: int = Field(6, ge=1)  # over all deployments and fallbacks of one request
    deadline: float = Field(120.0, gt=0)  # seconds for the whole request, retries included
    backoff: Backoff = Field(default_factory=Backoff)
    circuit: Circuit = Field(default_factory=Circuit)
    key_cooldown: float = Field(10.0, gt=0)  # a 429 without retry-after cools a key this long
    latency_exploration: float = Field(0.05, ge=0, le=1)


class Limit(_Strict):
    rpm: int = Field(0, ge=0)  # requests per minute; 0: no limit
    tpm: int = Field(0, ge=0)  # tokens per minute; 0: no limit


class Limits(_Strict):
    """Rate limits, enforced across replicas. Per-key limits set through the admin API win
    over ``key``; ``user`` applies to every end user; the maps name tenants and model groups."""

    key: Limit = Field(default_factory=Limit)
    user: Limit = Field(default_factory=Limit)
    tenant: dict[str, Limit] = Field(default_factory=dict)
    model: dict[str, Limit] = Field(default_factory=dict)
    # per agent name (within each tenant), and per end user of any agent (the request's `user`)
    agent: dict[str, Limit] = Field(default_factory=dict)
    agent_user: Limit = Field(default_factory=Limit)


class Alerts(_Strict):
    webhook_url: str | None = None  # where budget alerts are POSTed (a budget may name its own)
    # Signs x-gateway-signature: alerts to webhook_url with this secret itself, alerts to a
    # budget's own URL with that budget's key derived from it (policies/alerts.py).
    secret: str | None = None
    thresholds: list[float] = Field(default_factory=lambda: [0.5, 0.8, 1.0])
    # Webhooks reach public addresses only (checked on the address connected to), unless:
    allow_private_networks: bool = False  # loopback, RFC 1918, CGNAT, ULA; never link-local/metadata
    allowed_networks: list[str] = Field(default_factory=list)  # CIDRs allowed whatever they are
    # Each alert is tried at most max_attempts times and for max_age seconds after it fired,
    # then recorded as failed (log line, gateway_alert_deliveries_total) and dropped.
    max_attempts: int = Field(12, ge=1)
    max_age: float = Field(3600.0, gt=0)
    backoff: Backoff = Field(default_factory=lambda: Backoff(base=1.0, max=300.0))  # per receiver
    connect_timeout: float = Field(3.0, gt=0)
    timeout: float = Field(10.0, gt=0)  # one attempt, connection to response status
    max_concurrency: int = Field(256, ge=1)  # attempts in flight over all receivers
    max_backlog: int = Field(1000, ge=1)  # alerts waiting for one receiver; more fail at once

    @field_validator("allowed_networks")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        import ipaddress

        out = []
        for i, net in enumerate(v):
            try:
                out.append(str(ipaddress.ip_network(net)))
            except ValueError as exc:
                raise ValueError(f"allowed_networks[{i}]: {exc}") from None
        return out


class Policies(_Strict):
    enabled: bool = True  # budgets, rate limits and the ledger
    fail_open: bool = False  # when Redis is unreachable: serve (true) or refuse with 503 (false)
    default_max_output: int = Field(1024, gt=0)  # output tokens reserved when a request names none
    # Prompt tokens a hard budget reserves for each image (of any detail), audio, file or other
    # part of a chat request that is not text, whose size its text does not tell: OpenAI bills a
    # high-detail image up to ~1,500 tokens, Anthropic ~1,600. Raise it for models that bill
    # images as more tokens, or for files of many pages, or video.
    media_part_tokens: int = Field(1600, ge=0)
    log_content: bool = False
    # Admission credit (policies/credit.py): a replica may lease a small share of a large
    # remaining budget or rate limit and admit requests from it without a Redis round trip.
    local_admission: bool = True
    lease_requests: int = Field(32, ge=1, le=10_000)  # a lease: this many requests (or estimates) of credit
    lease_headroom: int = Field(64, ge=2, le=1_000_000)  # granted only with this many leases of room left
    # A request's budget reservation is released when it settles, or after this long: a replica
    # that dies with requests in flight (or a settle Redis never got) holds budget no longer.
    # Longer than any request may run (a request running longer may overshoot by its estimate).
    reservation_hold_s: float = Field(3600.0, gt=0, le=7 * 86400)
    # Budgets a tenant may have (every replica holds every budget in memory); the super-admin's
    # own budgets on a tenant count too but are never refused.
    max_budgets_per_tenant: int = Field(10_000, ge=1)
    # Live (unrevoked) API keys a tenant may have; keys the super-admin creates count too but are
    # never refused. A tenant admin minting keys without end grew the table every list scans.
    max_keys_per_tenant: int = Field(10_000, ge=1)
    # Prompt versions a tenant may store (its active agents'), in number and in bytes (template,
    # variables and note); a save past either is refused. Every replica holds the versions labels
    # point at; one pinned by number (agent:x@7) is read on demand into an LRU of
    # prompt_cache_bytes per replica (runtime/prompt_versions.py).
    max_prompt_versions_per_tenant: int = Field(5000, ge=1)
    max_prompt_bytes_per_tenant: int = Field(64 * 1024 * 1024, ge=1)
    # Active agents a tenant may have, in number and in bytes of their settings (tools, defaults,
    # memory...): every replica holds every active agent in memory and reads them all on a full
    # reload; a create or a change past either is refused.
    max_agents_per_tenant: int = Field(1000, ge=1)
    max_agent_settings_bytes_per_tenant: int = Field(32 * 1024 * 1024, ge=1)
    prompt_cache_bytes: int = Field(32 * 1024 * 1024, ge=0)
    # Files a tenant may keep on the gateway's disk, in number and bytes: /v1/files uploads and
    # documents uploaded to its knowledge bases count together (gateway/storage_quota.py).
    max_files_per_tenant: int = Field(10_000, ge=1)
    max_file_bytes_per_tenant: int = Field(10 * 2**30, ge=1)
    # What a tenant's vector stores may hold, across all of them: each file attached to a store
    # is a document there (its chunks, its embedding work), counted in number and by the file's
    # bytes as OpenAI bills each store's usage_bytes (gateway/kb_limits.py): a file counts once
    # toward the storage above, but once per store here.
    max_attached_files_per_tenant: int = Field(100_000, ge=1)
    max_attached_bytes_per_tenant: int = Field(10 * 2**30, ge=1)


PiiAction = Literal["redact", "mask", "hash", "block", "pseudonymize", "allow"]


class PiiRecognizer(_Strict):
    """A custom regex recognizer: order numbers, internal code names, ..."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,39}$")
    pattern: str = Field(min_length=1)
    score: float = Field(0.8, gt=0, le=1)
    context: list[str] = Field(default_factory=list)  # words nearby that raise the score
    ignore_case: bool = False

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            compiled = re.compile(v)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        if compiled.match(""):
            raise ValueError("matches the empty string")
        return v


class PiiPolicy(_Strict):
    """What to do with each entity type; types not named are let through."""

    entities: dict[str, PiiAction] = Field(default_factory=dict)
    phone_regions: list[str] = Field(default_factory=lambda: ["US", "GB", "DE", "FR"])
    min_score: float = Field(0.4, ge=0, le=1)  # detections scoring lower are ignored
    mask_keep: int = Field(4, ge=0)  # characters left visible at the end by `mask`

    @field_validator("phone_regions")
    @classmethod
    def _regions(cls, v: list[str]) -> list[str]:
        import phonenumbers

        for i, region in enumerate(v):
            if region not in phonenumbers.SUPPORTED_REGIONS:
                raise ValueError(f"phone_regions[{i}]: {region!r} is not a region code (ISO 3166, e.g. 'US')")
        return v


class Pii(_Strict):
    """PII scrubbing. The policy named ``default`` applies unless a key (its ``pii_policy``),
    the model group or the tenant names another; a key's choice wins, then the model's, then
    the tenant's."""

    policies: dict[str, PiiPolicy] = Field(default_factory=dict)
    tenants: dict[str, str] = Field(default_factory=dict)  # tenant -> policy name
    models: dict[str, str] = Field(default_factory=dict)  # model group -> policy name
    recognizers: list[PiiRecognizer] = Field(default_factory=list)
    workers: int = Field(1, ge=0, le=32)  # analysis processes; 0: in the serving process
    cache_size: int = Field(20000, ge=0)  # texts whose findings are remembered (by content hash)
    hash_secret: str | None = None  # HMAC key of the `hash` action
    ner_model: str | None = None  # an installed spaCy pipeline (name or path) for person/location
    # Seconds one analysis call may take (plus 20 µs per character, at most 60 s); a worker
    # that overruns is replaced and the request gets 503 pii_unavailable. Unset: 5 s (or the
    # environment's GATEWAY_PII_TIMEOUT_S).
    timeout_s: float | None = Field(None, gt=0, le=120)
    # Characters of one request's text that may go to analysis after pre-filtering (the text
    # around candidate numbers and addresses; every character with person/location); past it
    # the request is a 400 pii_too_much_to_check.
    max_analysed_chars: int = Field(128 * 1024, ge=1024, le=64 * 1024 * 1024)
    # libphonenumber checks one request's phone-shaped numbers may take (a number takes one to a
    # few dozen, each ≈ 0.1-0.4 ms: the default is ≈ 0.2-0.4 s of a worker); past it the request is a
    # 400 pii_too_much_to_check naming the field. Distinct numbers only: a repeated one is free.
    max_phone_checks: int = Field(1000, ge=100, le=10_000_000)
    # MB an analysis worker's resident memory may grow by after it is ready (spaCy keeps every
    # distinct word it has read); past it the worker is replaced by a fresh one between calls.
    worker_max_growth_mb: int = Field(256, ge=8, le=1024 * 1024)

    @property
    def enabled(self) -> bool:
        return any(p.entities for p in self.policies.values())


def _cidrs(v: list[str]) -> list[str]:
    import ipaddress

    for i, net in enumerate(v):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ValueError(f"[{i}]: {net!r} is not an IP address or CIDR network (e.g. 10.0.0.0/8)") from None
    return v


class Tenant(_Strict):
    require_tags: list[str] = Field(default_factory=list)
    # Addresses (CIDRs) the tenant's keys may be used from, on the API and the admin API alike;
    # empty: any. A key's own ``allowed_ips`` must be met as well.
    allowed_ips: list[str] = Field(default_factory=list)

    @field_validator("allowed_ips")
    @classmethod
    def _allowed_ips(cls, v: list[str]) -> list[str]:
        return _cidrs(v)


class Server(_Strict):
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0)
    log_requests: bool = True
    # Proxies (CIDRs) whose X-Forwarded-For is believed, hop by hop from the right; from any other
    # peer the header is ignored. Replaces uvicorn's proxy-headers handling.
    trusted_proxies: list[str] = Field(default_factory=list)
    # A cached key is looked up again after this many seconds, so a revocation this process
    # missed (Redis down, publish failed) takes effect anyway.
    key_cache_ttl: float = Field(60.0, gt=0)
    # When PostgreSQL cannot be reached for that look-up, the cached key keeps working this many
    # seconds longer; then its requests are refused with 503 until the database answers.
    key_cache_grace: float = Field(300.0, ge=0)
    # Failed authentications allowed per client address (IPv6: per /64) and minute, after a burst;
    # beyond them 429 without a database query. 0: no limit.
    failed_auth_per_minute: int = Field(60, ge=0)
    failed_auth_burst: int = Field(20, ge=1)
    # /readyz checks the database and Redis at most once per this many seconds, however many ask.
    readiness_interval: float = Field(1.0, ge=0)
    # Idempotency-Key on chat completions (gateway/idempotency.py): a stored answer is replayed
    # for this many seconds; a request in progress holds its key at most this long (a process
    # that died mid-request frees it then).
    idempotency_ttl_s: float = Field(86_400.0, gt=0)
    idempotency_lock_s: float = Field(300.0, gt=0)
    # Stored answers of one tenant together hold at most this much of Redis; past it the oldest
    # are deleted first (their retries run the model again). 0: no bound.
    idempotency_max_bytes_per_tenant: int = Field(256 * 1024 * 1024, ge=0)
    # A webhook that writes a record an erasure rewrites (a VAPI call's status update or
    # end-of-call report) waits at most this long for its tenant's erasure lock (core.erasure_key:
    # an erasure of the tenant, or of another tenant of its bucket, in progress), then is answered
    # 503 to retry: a waiter holds one of the pool's connections, and many would hold every
    # tenant's. (The background writers and an outbound call's record, the call placed, wait on.)
    erasure_lock_wait_s: float = Field(2.0, gt=0, le=30)
    # The admin reports that read many rows (spend, experiments, escalation stats): each statement
    # runs at most this long (then 503: narrow the range), and one tenant runs at most this many
    # at once in a process (then 429 with retry-after): they hold pooled connections meanwhile.
    admin_report_timeout_s: float = Field(10.0, gt=0, le=30)
    admin_reports_per_tenant: int = Field(2, ge=1)
    # ... and every tenant's together at most this many (a pool of 10 connections: tenants' caps
    # added up could still hold it all).
    admin_reports_total: int = Field(4, ge=1)
    # One tenant runs at most this many conversation erasures at once in a process (then 429 with
    # retry-after): each waits for its tenant's erasure lock, which erasures hold one at a time, on
    # a pooled connection, and a tenant admin's erasures sent at once held the pool.
    erasures_per_tenant: int = Field(2, ge=1)
    # /admin/spend without 'from' reports this many days back from now (the range is in the answer).
    spend_default_days: int = Field(31, ge=1, le=3660)

    @field_validator("trusted_proxies")
    @classmethod
    def _trusted_proxies(cls, v: list[str]) -> list[str]:
        return _cidrs(v)


class Channels(_Strict):
    """Channel accounts, by channel and account name. Each channel package validates its own
    accounts' fields at start-up (the kernel does not know the channels); ``${VAR}`` secrets are
    interpolated here like everywhere else."""

    # The gateway's own base URL, which the channel adapters call as OpenAI clients (empty: the
    # address this process listens on).
    gateway_url: str = ""
    whatsapp: dict[str, dict[str, Any]] = Field(default_factory=dict)
    vapi: dict[str, dict[str, Any]] = Field(default_factory=dict)


class HitlSla(_Strict):
    first_response_s: float = Field(gt=0)  # time to the first human reply
    resolution_s: float = Field(gt=0)  # time to resolution


class Hitl(_Strict):
    """Human in the loop (runtime/hitl): the escalation queue's leases, priorities and SLAs."""

    lease_s: float = Field(300.0, gt=0)  # a claim lasts this long unless renewed (a reply renews it)
    sweep_interval_s: float = Field(5.0, gt=0)  # SLA alerts and expired leases, in every replica
    aging_per_minute: float = Field(1.0, ge=0)  # priority points per minute of waiting
    tier_variable: str = "customer_tier"  # the variable (or metadata field) naming the customer's tier
    tiers: dict[str, int] = Field(default_factory=lambda: {"vip": 150, "enterprise": 100, "premium": 50})
    # per urgency (low, normal, high, urgent); unnamed ones keep the defaults of runtime/hitl/sla.py
    sla: dict[Literal["low", "normal", "high", "urgent"], HitlSla] = Field(default_factory=dict)


class RagRerank(_Strict):
    """The local cross-encoder re-ranker (rag/rerank_local.py): off unless a Hugging Face
    cross-encoder folder is named here or in GATEWAY_RERANK_MODEL_DIR."""

    local_model_dir: str | None = None
    name: str | None = Field(None, min_length=1, max_length=128)  # default: local/<folder name>
    max_length: int = Field(512, ge=8, le=8192)  # tokens per (query, document) pair
    batch_size: int = Field(16, ge=1, le=256)
    max_documents: int = Field(200, ge=1, le=1000)  # per call
    timeout_s: float = Field(30.0, gt=0, le=600)


class Rag(_Strict):
    rerank: RagRerank = Field(default_factory=RagRerank)


class Config(_Strict):
    server: Server = Field(default_factory=Server)
    router: RouterSettings = Field(default_factory=RouterSettings)
    policies: Policies = Field(default_factory=Policies)
    limits: Limits = Field(default_factory=Limits)
    alerts: Alerts = Field(default_factory=Alerts)
    tenants: dict[str, Tenant] = Field(default_factory=dict)
    pii: Pii = Field(default_factory=Pii)
    providers: list[Provider] = Field(default_factory=list)
    models: list[Model] = Field(default_factory=list)
    channels: Channels = Field(default_factory=Channels)
    hitl: Hitl = Field(default_factory=Hitl)
    rag: Rag = Field(default_factory=Rag)

    def provider(self, name: str) -> Provider:
        return next(p for p in self.providers if p.name == name)


_PLACEHOLDER = re.compile(r"__gwvar(\d+)__")


def _protect(text: str) -> tuple[str, list[tuple[str, str | None]]]:
    """Swaps each ``${VAR}`` for a plain token before YAML parsing.

    ``api_keys: [${KEY}]`` is not valid YAML as written (``{`` opens a flow mapping), and
    substituting values into the text would let a value inject YAML. Tokens are replaced by
    the values after parsing instead, where each one's path in the file is known.
    """
    found: list[tuple[str, str | None]] = []

    def swap(m: re.Match) -> str:
        found.append((m.group(1), m.group(2)))
        return f"__gwvar{len(found) - 1}__"

    return _VAR.sub(swap, text), found


def _interpolate(node: Any, path: str, found: list, problems: list[str], unset: str | None = None) -> Any:
    if isinstance(node, dict):
        return {k: _interpolate(v, f"{path}.{k}" if path else str(k), found, problems, unset) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{path}[{i}]", found, problems, unset) for i, v in enumerate(node)]
    if isinstance(node, str) and "__gwvar" in node:

        def sub(m: re.Match) -> str:
            name, default = found[int(m.group(1))]
            value = os.environ.get(name)
            if value is None or value == "":
                if default is not None:
                    return default
                if unset is not None:
                    return unset
                problems.append(f"{path}: environment variable {name} is not set")
                return ""
            return value

        return _PLACEHOLDER.sub(sub, node)
    return node


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _infer_modes(cfg: Config, problems: list[str]) -> None:
    """Sets the mode of each model group configured without one, from the bundled model map
    (read as a file, nothing downloaded): ``embedding`` when the map files its deployments as
    embedding models, or, for a group of rules, when every group its rules use is one."""
    from core.prices import model_mode

    providers = {p.name: p for p in cfg.providers}
    for i, m in enumerate(cfg.models):
        if "mode" in m.model_fields_set or not m.deployments:
            continue
        modes = {model_mode(providers[d.provider], d.model) for d in m.deployments if d.provider in providers}
        modes.discard(None)
        if len(modes) > 1:
            problems.append(
                f"models[{i}].mode: its deployments mix {' and '.join(sorted(modes))} models; set mode explicitly"
            )
        elif modes == {"embedding"}:
            cfg.models[i] = m.model_copy(update={"mode": "embedding"})
    by_name = {m.name: m for m in cfg.models}
    for i, m in enumerate(cfg.models):
        if "mode" in m.model_fields_set or not m.rules:
            continue
        if {by_name[r.use].mode if r.use in by_name else None for r in m.rules} == {"embedding"}:
            cfg.models[i] = m.model_copy(update={"mode": "embedding"})


def _cross_check(cfg: Config, problems: list[str]) -> None:
    _infer_modes(cfg, problems)
    names: dict[str, int] = {}
    for i, p in enumerate(cfg.providers):
        if p.name in names:
            problems.append(f"providers[{i}].name: duplicate provider name {p.name!r}")
        names[p.name] = i
        if p.kind == "openai" and not p.base_url:
            problems.append(f"providers[{i}].base_url: required for kind 'openai'")
        if p.kind in ("openai", "anthropic") and not p.api_keys:
            problems.append(f"providers[{i}].api_keys: at least one key is required")
    seen: set[str] = set()
    all_models = {m.name: m for m in cfg.models}
    for i, m in enumerate(cfg.models):
        if m.name in seen:
            problems.append(f"models[{i}].name: duplicate model name {m.name!r}")
        seen.add(m.name)
        for field in ("fallbacks", "context_window_fallbacks", "content_policy_fallbacks"):
            for j, name in enumerate(getattr(m, field)):
                target = all_models.get(name)
                if target is None:
                    problems.append(f"models[{i}].{field}[{j}]: unknown model {name!r}")
                elif target.mode != m.mode or target.rules:
                    problems.append(f"models[{i}].{field}[{j}]: {name!r} must be a {m.mode} model with deployments")
        for j, rule in enumerate(m.rules):
            target = all_models.get(rule.use)
            if target is None:
                problems.append(f"models[{i}].rules[{j}].use: unknown model {rule.use!r}")
            elif target.rules:
                problems.append(f"models[{i}].rules[{j}].use: {rule.use!r} has rules itself; point at deployments")
        for j, d in enumerate(m.deployments):
            where = f"models[{i}].deployments[{j}]"
            if d.provider not in names:
                problems.append(f"{where}.provider: unknown provider {d.provider!r}")
            elif m.mode == "embedding" and cfg.providers[names[d.provider]].kind == "anthropic":
                problems.append(f"{where}.provider: anthropic has no embeddings endpoint")
        _check_repeated_deployments(m, i, problems)


def _check_repeated_deployments(m: Model, i: int, problems: list[str]) -> None:
    """One group may list an upstream (provider and model) twice only as the same entry: two
    entries with other settings would leave which price, window or tags hold to chance."""
    first: dict[tuple[str, str], int] = {}
    for j, d in enumerate(m.deployments):
        k = first.setdefault((d.provider, d.model), j)
        if k == j:
            continue
        other = m.deployments[k]
        for name in type(d).model_fields:
            if getattr(d, name) != getattr(other, name):
                problems.append(
                    f"models[{i}].deployments[{j}].{name}: {d.provider}/{d.model} is deployments[{k}] "
                    f"of this group already, with another {name}; list it once"
                )
                break


def _check_pii(cfg: Config, problems: list[str]) -> None:
    from core.pii_entities import BUILTIN

    pii = cfg.pii
    custom = {r.name for r in pii.recognizers}
    for i, r in enumerate(pii.recognizers):
        if r.name in BUILTIN:
            problems.append(f"pii.recognizers[{i}].name: {r.name!r} is a built-in entity type")
    for name, policy in pii.policies.items():
        for entity, action in policy.entities.items():
            where = f"pii.policies.{name}.entities.{entity}"
            known = BUILTIN.get(entity)
            if known is None and entity not in custom:
                problems.append(
                    f"{where}: unknown entity type (built in: {', '.join(BUILTIN)}; or a pii.recognizers name)"
                )
            elif known is not None and known.needs_ner and not pii.ner_model and action != "allow":
                problems.append(f"{where}: needs an NER model: set pii.ner_model")
            if action == "hash" and not pii.hash_secret:
                problems.append(f"{where}: the hash action needs pii.hash_secret")
    models = {m.name for m in cfg.models}
    for section, names in (("tenants", None), ("models", models)):
        for key, policy in getattr(pii, section).items():
            if policy not in pii.policies:
                problems.append(f"pii.{section}.{key}: unknown policy {policy!r}")
            if names is not None and key not in names:
                problems.append(f"pii.{section}.{key}: unknown model {key!r}")


def parse_config(data: Any, found: list | None = None, unset: str | None = None) -> Config:
    """Validates parsed YAML; ``found`` holds the ``${VAR}`` tokens ``_protect`` swapped out.
    ``unset``: the value of a variable that is not set and has no default (None: a problem)."""
    problems: list[str] = []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(["(top level): must be a mapping with providers and models"])
    if found is None:  # a dict built in code: protect its strings the same way
        found = []
        data = _protect_tree(data, found)
    data = _interpolate(data, "", found, problems, unset)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        for e in exc.errors():
            msg = e["msg"].removeprefix("Value error, ")
            problems.append(f"{_loc(e['loc']) or '(top level)'}: {msg}")
        raise ConfigError(problems) from None
    _cross_check(cfg, problems)
    _check_pii(cfg, problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(path: str | Path, unset: str | None = None) -> Config:
    """The config at ``path``, validated; ``unset`` as ``parse_config`` takes it."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read file: {exc.strerror}"]) from None
    text, found = _protect(text)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        raise ConfigError([f"{path} ({where}): invalid YAML: {getattr(exc, 'problem', exc)}"]) from None
    return parse_config(data, found, unset)


def _protect_tree(data: Any, found: list) -> Any:
    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, str):
            text, more = _protect(node)
            offset = len(found)
            found.extend(more)
            return _PLACEHOLDER.sub(lambda m: f"__gwvar{int(m.group(1)) + offset}__", text)
        return node

    return walk(data)
