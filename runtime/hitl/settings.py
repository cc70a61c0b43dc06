"""An agent's human-in-the-loop settings (``settings.escalation`` of the agent), checked when an
admin sets them and read, cached per agent object, on every turn.

    {"enabled": true,             # escalate on low confidence / rules (default: only when the
                                  #   agent declares the escalate_to_human built-in)
     "threshold": 0.4,            # a turn scoring below it escalates
     "team": "support", "skills": ["billing"],
     "mode": "handoff",           # or "answer_and_confirm": the AI answer goes out, plus a note
     "handoff_message": "...", "confirm_note": "...",
     "hold_message": "...",       # the answer to a customer message while a person holds the
                                  #   conversation ("" answers with empty content)
     "phrases": ["talk to a person", ...],   # asking for a human: escalate whatever the score
     "urgent_phrases": ["urgent", ...],
     "negative_words": [...],     # the sentiment lexicon (default: a built-in English one)
     "logprobs": false,           # ask the provider for token log-probabilities (scored)
     "judge": {"model": "cheap-group", "weight": 1.0},  # an extra model call per turn, optional
     "routes": [{"phrases": ["refund"], "team": "billing", "urgency": "high", "skills": []}]}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.errors import InvalidRequest

URGENCIES = ("low", "normal", "high", "urgent")
MODES = ("handoff", "answer_and_confirm")
MAX_PHRASES = 100
MAX_PHRASE = 100
MAX_MESSAGE = 2000
MAX_ROUTES = 32
MAX_NAME = 64

DEFAULT_PHRASES = (
    "talk to a person",
    "talk to a human",
    "speak to a person",
    "speak to a human",
    "speak to someone",
    "talk to someone",
    "real person",
    "human agent",
    "representative",
    "speak to a manager",
    "talk to an agent",
)
DEFAULT_URGENT = ("urgent", "emergency", "asap", "immediately", "right now", "lawyer", "legal action")
DEFAULT_NEGATIVE = (
    "angry", "annoyed", "awful", "bad", "broken", "cancel", "complain", "complaint", "disappointed",
    "disgusted", "dissatisfied", "doesn't", "fail", "failed", "frustrated", "frustrating", "furious",
    "garbage", "hate", "horrible", "incompetent", "joke", "mad", "never", "nonsense", "pathetic",
    "refund", "ridiculous", "rubbish", "scam", "stupid", "terrible", "unacceptable", "unhappy",
    "upset", "useless", "waste", "worst", "wrong",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Route:
    phrases: tuple[str, ...]
    team: str | None = None
    urgency: str | None = None
    skills: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EscalationSettings:
    enabled: bool = False
    threshold: float = 0.4
    team: str = "support"
    skills: tuple[str, ...] = ()
    mode: str = "handoff"
    handoff_message: str = "I'm passing your conversation to a member of our team; they will reply here shortly."
    confirm_note: str = "A member of our team will confirm this answer shortly."
    hold_message: str = "Thank you. A member of our team has your conversation and will reply here shortly."
    phrases: tuple[str, ...] = DEFAULT_PHRASES
    urgent_phrases: tuple[str, ...] = DEFAULT_URGENT
    negative_words: frozenset[str] = frozenset(DEFAULT_NEGATIVE)
    logprobs: bool = False
    judge_model: str | None = None
    judge_weight: float = 1.0
    routes: tuple[Route, ...] = field(default_factory=tuple)


_CACHE: dict[int, tuple[Any, EscalationSettings]] = {}


def of(agent) -> EscalationSettings:
    """The agent's settings (cached per agent object: agents are immutable and replaced on change)."""
    hit = _CACHE.get(id(agent))
    if hit is not None and hit[0] is agent:
        return hit[1]
    if len(_CACHE) > 4096:
        _CACHE.clear()
    raw = agent.settings.get("escalation") or {}
    value = build(raw, default_enabled="escalate_to_human" in agent.builtins)
    _CACHE[id(agent)] = (agent, value)
    return value


def build(raw: dict, default_enabled: bool = False) -> EscalationSettings:
    """Settings from their stored (already checked) form."""
    judge = raw.get("judge") or {}
    kw: dict[str, Any] = {"enabled": bool(raw.get("enabled", default_enabled))}
    for key in ("threshold", "team", "mode", "handoff_message", "confirm_note", "hold_message", "logprobs"):
        if key in raw and raw[key] is not None:
            kw[key] = raw[key]
    for key in ("skills", "phrases", "urgent_phrases"):
        if key in raw and raw[key] is not None:
            kw[key] = tuple(s.lower() if key != "skills" else s for s in raw[key])
    if raw.get("negative_words") is not None:
        kw["negative_words"] = frozenset(w.lower() for w in raw["negative_words"])
    if judge.get("model"):
        kw["judge_model"] = judge["model"]
        kw["judge_weight"] = float(judge.get("weight", 1.0))
    kw["routes"] = tuple(
        Route(tuple(p.lower() for p in r["phrases"]), r.get("team"), r.get("urgency"), tuple(r.get("skills") or ()))
        for r in raw.get("routes") or ()
    )
    return EscalationSettings(**kw)


# ---- checking admin input ------------------------------------------------------------------------
def _bad(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=f"escalation.{param}", code="invalid_value")


def _text(value, param: str, limit: int, empty: bool = False) -> str:
    if not isinstance(value, str) or len(value) > limit or "\x00" in value or (not empty and not value.strip()):
        raise _bad(param, f"'escalation.{param}' must be a string of at most {limit} characters.")
    return value


def _name(value, param: str) -> str:
    ok = isinstance(value, str) and 0 < len(value) <= MAX_NAME and value.isascii()
    if not ok or not value.replace("-", "").replace("_", "").isalnum():
        raise _bad(param, f"'escalation.{param}' must be 1-{MAX_NAME} letters, digits, '-' or '_'.")
    return value


def _list(value, param: str, item, limit: int = MAX_PHRASES) -> list:
    if not isinstance(value, list) or len(value) > limit:
        raise _bad(param, f"'escalation.{param}' must be an array of at most {limit} entries.")
    return [item(v, f"{param}[{i}]") for i, v in enumerate(value)]


def _phrase(value, param: str) -> str:
    return _text(value, param, MAX_PHRASE)


KNOWN = (
    "enabled", "threshold", "team", "skills", "mode", "handoff_message", "confirm_note", "hold_message",
    "phrases", "urgent_phrases", "negative_words", "logprobs", "judge", "routes",
)  # fmt: skip


def check(value: Any) -> dict:
    """``settings.escalation`` from admin input: a 400 naming the field, or the value to store."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest("'escalation' must be an object.", param="escalation", code="invalid_type")
    out: dict[str, Any] = {}
    for key, v in value.items():
        if key not in KNOWN:
            raise _bad(str(key)[:64], f"Unknown field {str(key)[:64]!r}; known: {', '.join(KNOWN)}.")
        if key in ("enabled", "logprobs"):
            if not isinstance(v, bool):
                raise _bad(key, f"'escalation.{key}' must be true or false.")
            out[key] = v
        elif key == "threshold":
            if not isinstance(v, int | float) or isinstance(v, bool) or not 0 <= v <= 1:
                raise _bad(key, "'escalation.threshold' must be a number from 0 to 1.")
            out[key] = float(v)
        elif key == "team":
            out[key] = _name(v, key)
        elif key == "skills":
            out[key] = _list(v, key, _name, 32)
        elif key == "mode":
            if v not in MODES:
                raise _bad(key, f"'escalation.mode' must be one of {', '.join(MODES)}.")
            out[key] = v
        elif key in ("handoff_message", "confirm_note", "hold_message"):
            out[key] = _text(v, key, MAX_MESSAGE, empty=key == "hold_message")
        elif key in ("phrases", "urgent_phrases", "negative_words"):
            out[key] = _list(v, key, _phrase, 1000 if key == "negative_words" else MAX_PHRASES)
        elif key == "judge":
            out[key] = _judge(v)
        elif key == "routes":
            out[key] = _list(v, key, _route, MAX_ROUTES)
    return out


def _judge(value) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"model", "weight"}:
        raise _bad("judge", "'escalation.judge' must be an object with 'model' (a model group) and 'weight'.")
    model = _text(value.get("model"), "judge.model", 256)
    weight = value.get("weight", 1.0)
    if not isinstance(weight, int | float) or isinstance(weight, bool) or not 0 < weight <= 1:
        raise _bad("judge.weight", "'escalation.judge.weight' must be a number in (0, 1].")
    return {"model": model, "weight": float(weight)}


def _route(value, param: str) -> dict:
    if not isinstance(value, dict) or set(value) - {"phrases", "team", "urgency", "skills"} or not value.get("phrases"):
        raise _bad(param, f"'escalation.{param}' must be an object with 'phrases' and a 'team' and/or 'urgency'.")
    out: dict[str, Any] = {"phrases": _list(value["phrases"], f"{param}.phrases", _phrase, 50)}
    if value.get("team") is not None:
        out["team"] = _name(value["team"], f"{param}.team")
    if value.get("urgency") is not None:
        if value["urgency"] not in URGENCIES:
            raise _bad(f"{param}.urgency", f"urgency must be one of {', '.join(URGENCIES)}.")
        out["urgency"] = value["urgency"]
    if value.get("skills") is not None:
        out["skills"] = _list(value["skills"], f"{param}.skills", _name, 32)
    return out
