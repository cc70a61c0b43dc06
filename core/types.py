"""Shared dataclasses of the request pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

EXCERPT = 64  # characters of a client-chosen string that may appear in a message or log line


def excerpt(text: object, limit: int = EXCERPT) -> str:
    """A client-chosen string, bounded for an error message or a log field: a 1 MB model name
    is not echoed back, logged or kept whole."""
    text = text if isinstance(text, str) else str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


MAX_TOKENS = 2**31 - 1  # the most tokens one count may claim (the ledger's column is an int4)


def token_count(value) -> int:
    """A provider's token count as a number the gateway can bill: an integer from 0 to
    ``MAX_TOKENS``, or -1 when it is no count at all. A provider (or a proxy in front of it) may
    send anything; a count must not credit a budget (negative), fail the response (a string),
    or halt the ledger whose column cannot hold it (beyond int4): a count too large is clamped,
    a float truncated, anything else (a negative number, a string, NaN, a boolean) is -1."""
    if type(value) is int:
        return -1 if value < 0 else min(value, MAX_TOKENS)
    if type(value) is float and 0 <= value:  # (NaN compares false)
        return int(min(value, MAX_TOKENS))
    return -1


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_openai(cls, usage: dict | None) -> Usage | None:
        if not isinstance(usage, dict):
            return None
        details = usage.get("prompt_tokens_details")
        # absent: 0 (an embedding has no completion); present but no count (null too): not usage
        prompt = token_count(usage.get("prompt_tokens", 0))
        completion = token_count(usage.get("completion_tokens", 0))
        if prompt < 0 or completion < 0:  # not counts: the gateway estimates the usage instead
            return None
        cached = token_count(details.get("cached_tokens", 0)) if isinstance(details, dict) else 0
        return cls(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=min(prompt, max(cached, 0)))

    def to_openai(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


@dataclass(slots=True)
class Identity:
    """Who is calling: resolved from the bearer key by the authenticate stage."""

    key_id: str
    name: str
    tenant: str = "default"
    is_master: bool = False
    require_tags: frozenset = frozenset()
    limits: Any = None  # config.Limit set on the key, else the configured default applies
    models: frozenset = frozenset()  # models the key may use; empty: all
    scopes: frozenset = frozenset()  # e.g. {"admin"}
    expires_at: float | None = None
    pii_policy: str | None = None  # the PII policy this key's requests get (config pii.policies)
    # Networks (ipaddress objects) the key may be used from, from its metadata ``allowed_ips``;
    # empty: any address. The tenant's list (config ``tenants.<name>.allowed_ips``) applies too.
    allowed_ips: tuple = ()
    # Attribution values the key may assert, by field: {"customer": ["acme", "acme-*"], ...};
    # a field not named is free. Set by the admin who minted the key.
    attribution: Any = None
    # The rate windows of the keys that minted this one (their key id and config.Limit), up the
    # chain: a minted key's requests count in each, so minting many children never multiplies
    # the minter's rate. Recorded at minting (metadata ``shared_limits``).
    shared_limits: tuple = ()


@dataclass(slots=True)
class Route:
    """One attempt's target: a deployment of a model group and one of its provider's keys."""

    model: str  # the model group serving the attempt
    provider: str
    deployment: str  # provider/upstream-model
    upstream_model: str
    api_key: str | None
    state: Any = None  # routing.health.DeploymentState
    key_state: Any = None  # routing.health.KeyState


@dataclass(slots=True, frozen=True)
class Constraints:
    """What a request, its key or its tenant demands of the deployment that serves it."""

    tags: frozenset = frozenset()
    max_price: float | None = None  # USD, estimated for this request
    max_latency: float | None = None  # seconds, against the deployment's recent latency
    strategy: str | None = None


NO_CONSTRAINTS = Constraints()


@dataclass(slots=True)
class RequestContext:
    request_id: str  # the gateway's own id: the ledger's key, the response's x-request-id
    endpoint: str  # "chat" | "embeddings"
    body: dict[str, Any]
    started: float
    # The caller's own id (x-client-request-id, else x-request-id), when it sent a sane one:
    # echoed back and stored beside the gateway's id, searchable, never unique, never a key.
    client_request_id: str | None = None
    identity: Identity | None = None
    model: str = ""  # the name the client sent
    stream: bool = False
    include_usage: bool = False
    route: Route | None = None
    attempts: int = 0
    status: int = 0
    usage: Usage | None = None
    ttft: float | None = None
    error_code: str | None = None
    constraints: Constraints = NO_CONSTRAINTS
    body_bytes: int = 0
    max_output: int = 0
    upstream_headers: Any = None  # the last upstream response's headers
    fallbacks: int = 0
    agent: Any = None  # runtime.types.Turn when the model names an agent (the agent stage sets it)
    # The model groups this request may be served by (the key's allow-list; empty: any). An agent
    # turn a key may take by the agent's name may use the agent's routing, whatever it is.
    models_allowed: frozenset = frozenset()
    step: int = 1  # the model call of an agent turn this is (the tools loop counts up)
    _prompt_tokens: int | None = None
    # Token counts of messages known before the body is counted (``id()`` of the message → the
    # message and its count): an agent turn's system prompt, not tokenized again every turn.
    known_tokens: dict[int, tuple[dict, int]] | None = None
    # An agent turn's stored history (``runtime.memory.Window``), whose ``known()`` maps its
    # messages to their counts as ``known_tokens`` does: mapped only when the prompt is counted
    # (``known``), since most turns never count it (the provider reports the usage) and the map
    # cost a Python step per message on every turn.
    known_history: Any = None
    # Tokens the prompt may still gain once the request is admitted (an agent's knowledge-base
    # sources: their search costs money, so it runs only for an admitted turn): an upper bound,
    # which routing rules and budget reservations add to the prompt's count.
    grow_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def prompt_tokens(self) -> int:
        """Counted once, and only when something needs it (tiktoken, offline)."""
        if self._prompt_tokens is None:
            from core.tokens import count_prompt

            self._prompt_tokens = count_prompt(self.body, self.known())
        return self._prompt_tokens

    def known(self) -> dict[int, tuple[dict, int]] | None:
        """What counting the prompt need not tokenize again (``count_prompt``'s ``known``): the
        stored history's counts and ``known_tokens``."""
        if self.known_history is None:
            return self.known_tokens
        known = self.known_history.known()
        if self.known_tokens:
            known.update(self.known_tokens)
        return known or None
