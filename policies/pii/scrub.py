"""Scrubbing a request body: which policy applies, every text that leaves, the actions.

Texts that leave: message content (strings and the text parts of multi-part content, for
every role, tool results included), tool-call and function-call arguments of assistant
messages, and embeddings input. The body is copied, never changed in place.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from gateway.config import Pii, PiiPolicy
from gateway.errors import InvalidRequest, ServiceUnavailable
from gateway.types import Identity
from policies.pii.analysis import Analyzer, CustomRecognizer, Spec
from policies.pii.anonymize import Vault, apply
from policies.pii.entities import BUILTIN, EntityType, custom_entity

log = logging.getLogger("gateway.pii")


class PiiBlocked(InvalidRequest):
    default_code = "pii_blocked"


@dataclass(frozen=True)
class CompiledPolicy:
    name: str
    spec: Spec
    actions: dict[str, str]  # label -> action
    labels: dict[str, str]  # Presidio entity type -> label
    mask_keep: int


@dataclass
class ScrubState:
    """One request's scrubbing: the vault shared by all its attempts, bodies per policy."""

    vault: Vault = field(default_factory=Vault)
    bodies: dict[str, dict] = field(default_factory=dict)
    found: dict[str, dict[str, int]] = field(default_factory=dict)  # policy -> label -> findings
    counts: dict[str, int] = field(default_factory=dict)  # label -> findings, of the body sent
    policy: str | None = None
    sent: dict | None = None  # the body as it last left (for content logging, when enabled)


class Slot:
    """A text inside the body: where it is (for error messages) and how to replace it."""

    __slots__ = ("holder", "key", "path")

    def __init__(self, path: str, holder: Any, key: Any) -> None:
        self.path, self.holder, self.key = path, holder, key

    @property
    def text(self) -> str:
        return self.holder[self.key]


def _slots(body: dict, endpoint: str) -> list[Slot]:
    out: list[Slot] = []
    if endpoint == "embeddings":
        inp = body.get("input")
        if isinstance(inp, str):
            out.append(Slot("input", body, "input"))
        elif isinstance(inp, list):
            out.extend(Slot(f"input[{i}]", inp, i) for i, v in enumerate(inp) if isinstance(v, str))
        return out
    for i, msg in enumerate(body.get("messages") or ()):
        if not isinstance(msg, dict):
            continue
        content = msg.get("content")
        if isinstance(content, str):
            out.append(Slot(f"messages[{i}].content", msg, "content"))
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    out.append(Slot(f"messages[{i}].content[{j}].text", part, "text"))
        for k, call in enumerate(msg.get("tool_calls") or ()):
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                out.append(Slot(f"messages[{i}].tool_calls[{k}].function.arguments", fn, "arguments"))
        fc = msg.get("function_call")
        if isinstance(fc, dict) and isinstance(fc.get("arguments"), str):
            out.append(Slot(f"messages[{i}].function_call.arguments", fc, "arguments"))
    return out


def compile_policies(pii: Pii, data_dir: Path) -> dict[str, CompiledPolicy]:
    custom = {r.name: r for r in pii.recognizers}
    out = {}
    for name, policy in pii.policies.items():
        out[name] = _compile(name, policy, pii, custom, str(data_dir))
    return out


def _compile(name: str, policy: PiiPolicy, pii: Pii, custom: dict, data_dir: str) -> CompiledPolicy:
    types: list[EntityType] = []
    recognizers = []
    actions = {}
    for entity, action in sorted(policy.entities.items()):
        if action == "allow":
            continue
        et = BUILTIN.get(entity) or custom_entity(entity)
        types.append(et)
        actions[et.label] = action
        if entity in custom:
            r = custom[entity]
            recognizers.append(CustomRecognizer(et.presidio, r.pattern, r.score, tuple(r.context), r.ignore_case))
    spec = Spec(
        entities=tuple(sorted(t.presidio for t in types)),
        regions=tuple(policy.phone_regions),
        min_score=policy.min_score,
        custom=tuple(recognizers),
        ner_model=pii.ner_model,
        data_dir=data_dir,
    )
    return CompiledPolicy(name, spec, actions, {t.presidio: t.label for t in types}, policy.mask_keep)


class Scrubber:
    """The gateway's PII stage: resolves the policy of a request and scrubs its body."""

    def __init__(self, pii: Pii, data_dir: Path) -> None:
        self.config = pii
        self.policies = compile_policies(pii, data_dir)
        # pii.timeout_s when the config has it; else GATEWAY_PII_TIMEOUT_S or the default.
        self.analyzer = Analyzer(pii.workers, pii.cache_size, getattr(pii, "timeout_s", None))
        self.secret = (pii.hash_secret or "").encode()

    async def start(self) -> None:
        specs = {p.spec for p in self.policies.values() if p.spec.entities}
        await self.analyzer.start(sorted(specs, key=repr))

    async def close(self) -> None:
        await self.analyzer.close()

    def policy_for(self, identity: Identity | None, group: str) -> CompiledPolicy | None:
        """The caller's key's policy, else the model group's, else the tenant's, else ``default``."""
        key_policy = identity.pii_policy if identity is not None else None
        tenant = identity.tenant if identity is not None else "default"
        name = key_policy or self.config.models.get(group) or self.config.tenants.get(tenant) or "default"
        policy = self.policies.get(name)
        return policy if policy is not None and policy.actions else None

    async def scrub(self, body: dict, endpoint: str, policy: CompiledPolicy, state: ScrubState) -> dict:
        """A scrubbed copy of ``body`` (or ``body`` itself when nothing was found).

        Raises ``PiiBlocked`` naming the entity types (never the values) and the first field."""
        found = state.bodies.get(policy.name)
        if found is not None:
            state.sent, state.policy, state.counts = found, policy.name, state.found[policy.name]
            return found
        slots = _slots(body, endpoint)
        try:
            findings = await self.analyzer.find(policy.spec, [s.text for s in slots]) if slots else []
        except Exception as exc:  # fail closed: nothing leaves unscrubbed
            log.error("PII analysis failed: %s: %s", type(exc).__name__, exc)
            raise ServiceUnavailable(
                "Personal-data scrubbing is unavailable, so the request was not sent.", code="pii_unavailable"
            ) from None
        counts: Counter = Counter()
        blocked: set[str] = set()
        first_blocked: str | None = None  # the first field holding a blocked entity
        for slot, fs in zip(slots, findings, strict=True):
            for _s, _e, entity, _score in fs:
                label = policy.labels.get(entity)
                if label is None:
                    continue
                counts[label] += 1
                if policy.actions[label] == "block":
                    blocked.add(label)
                    first_blocked = first_blocked or slot.path
        state.counts = state.found[policy.name] = dict(counts)
        state.policy = policy.name
        if blocked:
            raise PiiBlocked(
                "The request contains personal data that policy forbids sending to this model: "
                f"{', '.join(sorted(blocked))}.",
                param=first_blocked,
            )
        if not counts:
            state.bodies[policy.name] = state.sent = body
            return body
        out = orjson.loads(orjson.dumps(body))  # a deep copy, faster than copy.deepcopy
        for slot, new_slot, fs in zip(slots, _slots(out, endpoint), findings, strict=True):
            if not fs:
                continue
            spans = [(s, e, policy.labels[t]) for s, e, t, _ in fs if t in policy.labels]
            new_slot.holder[new_slot.key] = apply(
                slot.text, spans, policy.actions, state.vault, policy.mask_keep, self.secret
            )
        state.bodies[policy.name] = state.sent = out
        return out
