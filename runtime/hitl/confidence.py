"""How sure an agent turn is: a score in [0, 1] with its reasons, from signals that cost no model
call (the judge is optional and scored by the caller).

Each signal gives a factor in [0, 1]; the score is their product, so two doubts weigh more than
one. Reasons are short codes (``low_logprobs``, ``no_sources``, ...), never content:

- ``low_logprobs``: the geometric mean token probability (where the provider returned them);
- ``no_sources`` / ``weak_sources``: the agent has knowledge bases and nothing passed the
  threshold, or the best similarity was weak;
- ``escalate_tool``: the model called ``escalate_to_human`` (score 0: a rule);
- ``tool_failure``: a server-side tool failed or timed out (per failure);
- ``fallback``: every deployment failed and the fallback message answered;
- ``asked_for_human``: a configured phrase ("talk to a person") in the customer's message (a rule);
- ``repeated_question``: the customer asks again what they asked in one of the last turns;
- ``negative_sentiment``: words of the sentiment lexicon;
- ``judge``: the optional judge model's verdict.

A rule escalates whatever the score; otherwise a score below the agent's threshold does.
Everything here is plain Python over short texts (bounded): the bench
(loadtest/bench_hitl.py) keeps it well under half a millisecond.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field

from runtime.hitl.settings import URGENCIES, EscalationSettings

MAX_TEXT = 4000  # characters of a message looked at
_WORD = re.compile(r"[a-z0-9']+")


@dataclass(slots=True)
class Signals:
    question: str = ""  # the customer's message this turn
    previous_questions: list[str] = field(default_factory=list)  # their earlier messages, newest last
    answer: str = ""
    logprobs: list[float] | None = None
    has_knowledge: bool = False
    best_similarity: float | None = None
    sources: int = 0
    escalate_tool: bool = False
    escalate_urgency: str | None = None
    tool_failures: int = 0
    fallback: bool = False
    judge: float | None = None  # the judge model's confidence, when asked


@dataclass(slots=True)
class Confidence:
    score: float
    reasons: list[str]
    escalate: bool
    rule: str | None = None  # the rule that escalates whatever the score
    urgency: str = "normal"
    team: str | None = None
    skills: tuple[str, ...] = ()

    def record(self) -> dict:
        return {"score": self.score, "reasons": self.reasons, "escalate": self.escalate, "urgency": self.urgency}


def words(text: str) -> list[str]:
    return _WORD.findall(text[:MAX_TEXT].lower())


_CACHED = 256  # characters of a question whose words are cached (most are shorter)


def _word_set(text: str) -> frozenset[str]:
    """The words of an earlier question. A conversation's last questions are compared again on
    each of its next turns, so a short one is split once. A long one is not cached: its word set
    grows with the distinct words a client puts in it (~70 KB at 2,000 characters), and 1,024 of
    them held ~70 MB per process; 256 of at most ``_CACHED`` characters hold ~3 MB at worst."""
    return _cached_word_set(text) if len(text) <= _CACHED else frozenset(words(text))


@functools.lru_cache(maxsize=256)
def _cached_word_set(text: str) -> frozenset[str]:
    return frozenset(words(text))


def _similar(a: set[str], b: frozenset[str]) -> bool:
    if not a or not b:
        return False
    return len(a & b) / len(a | b) >= 0.8


def _max_urgency(a: str, b: str | None) -> str:
    if b not in URGENCIES:
        return a
    return a if URGENCIES.index(a) >= URGENCIES.index(b) else b


def score(signals: Signals, settings: EscalationSettings) -> Confidence:
    factors: list[tuple[str, float]] = []
    rule: str | None = None
    urgency = "normal"
    if signals.logprobs:
        lp = signals.logprobs[:4096]
        # a log-probability is at most 0; a provider's larger value would overflow exp()
        p = math.exp(max(-1e6, min(0.0, sum(lp) / len(lp))))
        if p < 0.9:
            factors.append(("low_logprobs", p))
    if signals.has_knowledge:
        if signals.sources == 0:
            factors.append(("no_sources", 0.45))
        elif signals.best_similarity is not None and signals.best_similarity < 0.6:
            factors.append(("weak_sources", max(0.0, min(1.0, 0.4 + signals.best_similarity))))
    if signals.escalate_tool:
        factors.append(("escalate_tool", 0.0))
        rule = "escalate_tool"
        urgency = _max_urgency(urgency, signals.escalate_urgency)
    if signals.tool_failures:
        factors.append(("tool_failure", 0.6 ** min(signals.tool_failures, 5)))
    if signals.fallback:
        factors.append(("fallback", 0.2))
    question = signals.question[:MAX_TEXT].lower()
    if question:
        if any(p in question for p in settings.phrases):
            factors.append(("asked_for_human", 0.2))
            rule = rule or "asked_for_human"
        if any(p in question for p in settings.urgent_phrases):
            urgency = "urgent"
        tokens = words(question)
        negative = sum(1 for t in tokens if t in settings.negative_words)
        if negative:
            factors.append(("negative_sentiment", (0.85, 0.6, 0.4)[min(negative, 3) - 1]))
            if negative >= 3:
                urgency = _max_urgency(urgency, "high")
        if signals.previous_questions:
            mine = set(tokens)
            if any(_similar(mine, _word_set(q[:MAX_TEXT])) for q in signals.previous_questions[-3:]):
                factors.append(("repeated_question", 0.35))
    if signals.judge is not None:
        factors.append(("judge", max(0.0, min(1.0, signals.judge))))
    value = 1.0
    for _, f in factors:
        value *= f
    value = round(max(0.0, min(1.0, value)), 3)
    team, skills = None, ()
    for route in settings.routes:
        if question and any(p in question for p in route.phrases):
            team, skills = route.team, route.skills
            urgency = _max_urgency(urgency, route.urgency)
            break
    escalate = settings.enabled and (rule is not None or value < settings.threshold)
    return Confidence(
        score=value,
        reasons=[name for name, f in factors if f < 1.0],
        escalate=escalate,
        rule=rule,
        urgency=urgency,
        team=team,
        skills=skills,
    )
