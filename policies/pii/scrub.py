"""Scrubbing a request body: which policy applies, every text that leaves, the actions.

The texts that leave, and how each is put back once scrubbed, are listed in ``fields``
(content, names, tool calls and definitions, prediction, response format, metadata, user,
embeddings input as text or as token arrays). The body is copied, never changed in place.

Refused (400) rather than sent: an entity the policy blocks; personal data in a tool or
function name (rewriting a name breaks tool calls); a token array the gateway cannot decode
with the model's tokenizer (it cannot be checked).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from core.config import Pii, PiiPolicy
from core.errors import InvalidRequest, ServiceUnavailable
from core.pii_entities import BUILTIN, EntityType, custom_entity
from core.types import Identity
from policies.pii import fields
from policies.pii.analysis import Analyzer, CustomRecognizer, Spec, TooMuchToCheck
from policies.pii.anonymize import Vault, apply

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


class PiiUndecodable(InvalidRequest):
    default_code = "pii_undecodable"


def _too_much(exc: TooMuchToCheck, slots: list[fields.Slot]) -> InvalidRequest:
    """The 400 of a request past a per-request analysis bound, naming the field: the one being
    checked when the phone-number checks ran out, else the one with the most text to check."""
    if exc.setting == "max_phone_checks":
        message = (
            "This request holds too many distinct phone-number-like numbers to check for personal data: "
            f"checking them needs more than the {exc.budget:,} number checks allowed per request "
            "(pii.max_phone_checks). Send fewer numbers at once."
        )
    else:
        message = (
            f"This request holds {exc.chars:,} characters of text around numbers and addresses to check "
            f"for personal data; at most {exc.budget:,} are checked per request (pii.max_analysed_chars). "
            "Send less at once."
        )
    slot = slots[exc.text] if exc.text is not None else max(slots, key=lambda s: len(s.text or ""))
    return InvalidRequest(message, param=slot.path, code="pii_too_much_to_check")


_THREAD_TOKENS = 20_000  # token arrays longer than this (in all) are decoded off the event loop


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

    def __init__(self, pii: Pii, data_dir: Path, models: dict[str, tuple[str, ...]] | None = None) -> None:
        self.config = pii
        # model group -> its deployments' model names: the tokenizer of token-array input when
        # the group's own name is not a model tiktoken knows.
        self.models = models or {}
        self.policies = compile_policies(pii, data_dir)
        # pii.timeout_s when the config has it; else GATEWAY_PII_TIMEOUT_S or the default.
        self.analyzer = Analyzer(
            pii.workers,
            pii.cache_size,
            getattr(pii, "timeout_s", None),
            getattr(pii, "max_analysed_chars", None),
            getattr(pii, "max_phone_checks", None),
            getattr(pii, "worker_max_growth_mb", None),
        )
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
        decoded = await self._decoded(body) if endpoint == "embeddings" and fields.has_tokens(body) else []
        slots = fields.slots(body, endpoint, decoded)
        try:
            findings = await self.analyzer.find(policy.spec, [s.text for s in slots]) if slots else []
        except TooMuchToCheck as exc:  # the request's own size: the client's to change
            raise _too_much(exc, slots) from None
        except Exception as exc:  # fail closed: nothing leaves unscrubbed
            log.error("PII analysis failed: %s: %s", type(exc).__name__, exc)
            raise ServiceUnavailable(
                "Personal-data scrubbing is unavailable, so the request was not sent.", code="pii_unavailable"
            ) from None
        counts: Counter = Counter()
        blocked: set[str] = set()
        first_blocked: str | None = None  # the first field holding a blocked entity
        in_names: set[str] = set()
        first_name: str | None = None  # the first tool or function name holding personal data
        for slot, fs in zip(slots, findings, strict=True):
            for _s, _e, entity, _score in fs:
                label = policy.labels.get(entity)
                if label is None:
                    continue
                counts[label] += 1
                if policy.actions[label] == "block":
                    blocked.add(label)
                    first_blocked = first_blocked or slot.path
                elif slot.kind == fields.IDENT:
                    in_names.add(label)
                    first_name = first_name or slot.path
        state.counts = state.found[policy.name] = dict(counts)
        state.policy = policy.name
        if blocked:
            raise PiiBlocked(
                "The request contains personal data that policy forbids sending to this model: "
                f"{', '.join(sorted(blocked))}.",
                param=first_blocked,
            )
        if in_names:
            state.counts = state.found[policy.name] = dict(counts)
            raise PiiBlocked(
                f"A tool or function name contains personal data ({', '.join(sorted(in_names))}); names cannot "
                "be rewritten without breaking tool calls, so the request was not sent. Rename the tool.",
                param=first_name,
            )
        if not counts:
            state.bodies[policy.name] = state.sent = body
            return body
        out = orjson.loads(orjson.dumps(body))  # a deep copy, faster than copy.deepcopy
        moved = fields.token_slots_like(out, decoded) if decoded else []
        for slot, new_slot, fs in zip(slots, fields.slots(out, endpoint, moved), findings, strict=True):
            if not fs:
                continue
            spans = [(s, e, policy.labels[t]) for s, e, t, _ in fs if t in policy.labels]
            new_slot.put(apply(slot.text, spans, policy.actions, state.vault, policy.mask_keep, self.secret))
        state.bodies[policy.name] = state.sent = out
        return out

    async def _decoded(self, body: dict) -> list[fields.Slot]:
        """The token arrays of an embeddings input as text, with the model's tokenizer."""
        model = body.get("model") if isinstance(body.get("model"), str) else ""
        encoding = fields.encoding_for(model, self.models.get(model, ()))
        if encoding is None:
            raise PiiUndecodable(
                f"`input` is given as tokens, and the gateway does not know the tokenizer of model `{model}`, "
                "so it cannot check them for personal data as its policy requires. Send the input as text.",
                param="input",
            )
        inp = body["input"]
        size = sum(len(a) for a in inp) if isinstance(inp[0], list) else len(inp)
        try:
            if size > _THREAD_TOKENS:
                return await asyncio.to_thread(fields.token_slots, body, encoding)
            return fields.token_slots(body, encoding)
        except fields.Undecodable as exc:
            raise PiiUndecodable(
                f"`{exc}` holds token ids the tokenizer of model `{model}` does not have, so it cannot be "
                "checked for personal data as the gateway's policy requires.",
                param=str(exc),
            ) from None
