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


# ``_WORD.findall`` without the regex engine: every byte that is not [a-z0-9'] becomes a space and
# the rest is split on spaces. A character beyond ASCII is encoded as bytes >= 0x80 only, so each
# becomes spaces too, exactly where the regex would stop a word (lone surrogates included).
_WORD_BYTES = bytes(c if chr(c) in "abcdefghijklmnopqrstuvwxyz0123456789'" else 0x20 for c in range(256))


def words(text: str) -> list[str]:
    return _words(text[:MAX_TEXT].lower())


def _words(lowered: str) -> list[str]:
    """``_WORD.findall(lowered)``, about three times faster."""
    return lowered.encode("utf-8", "surrogatepass").translate(_WORD_BYTES).decode("ascii").split()


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
    """Jaccard similarity of at least 0.8. The sizes alone bound it (the intersection is at most
    the smaller set, the union at least the larger): most pairs are decided without a set built."""
    na, nb = len(a), len(b)
    if not na or not nb:
        return False
    if (na / nb if na <= nb else nb / na) < 0.8:
        return False
    common = len(a & b)
    return common / (na + nb - common) >= 0.8


def _max_urgency(a: str, b: str | None) -> str:
    if b not in URGENCIES:
        return a
    return a if URGENCIES.index(a) >= URGENCIES.index(b) else b


def _contains_any(text: str, phrases: tuple[str, ...]) -> bool:
    for phrase in phrases:  # a loop, not any(<genexpr>): no generator per call
        if phrase in text:
            return True
    return False


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
        if _contains_any(question, settings.phrases):
            factors.append(("asked_for_human", 0.2))
            rule = rule or "asked_for_human"
        if _contains_any(question, settings.urgent_phrases):
            urgency = "urgent"
        # words(question) without lowering it again: ASCII text is its own lower case, at its
        # length (other text may grow when lowered, and words() cuts it again: that path stays)
        tokens = _words(question) if question.isascii() else words(question)
        negative = sum(map(settings.negative_words.__contains__, tokens))
        if negative:
            factors.append(("negative_sentiment", (0.85, 0.6, 0.4)[min(negative, 3) - 1]))
            if negative >= 3:
                urgency = _max_urgency(urgency, "high")
        if signals.previous_questions:
            mine = set(tokens)
            for q in signals.previous_questions[-3:]:
                q = q[:MAX_TEXT]  # (``_word_set`` inlined: one call less per question compared)
                if _similar(mine, _cached_word_set(q) if len(q) <= _CACHED else frozenset(words(q))):
                    factors.append(("repeated_question", 0.35))
                    break
    if signals.judge is not None:
        factors.append(("judge", max(0.0, min(1.0, signals.judge))))
    value = 1.0
    for _, f in factors:
        value *= f
    value = round(max(0.0, min(1.0, value)), 3)
    team, skills = None, ()
    if question:
        for route in settings.routes:
            if _contains_any(question, route.phrases):
                team, skills = route.team, route.skills
                urgency = _max_urgency(urgency, route.urgency)
                break
    escalate = settings.enabled and (rule is not None or value < settings.threshold)
    # (positional: a class called with keywords builds a dict of them first, ~3k instructions)
    return Confidence(value, [name for name, f in factors if f < 1.0], escalate, rule, urgency, team, skills)
