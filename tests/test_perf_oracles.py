"""Differential tests of the per-turn costs made cheaper (issue 12): the confidence score, the
signals it is computed from and the stored run record must come out exactly as before. Each
``_old_*`` function below is a frozen copy of the implementation before the change (9753a67):
the oracle. The inputs are generated (seeded: a failure reproduces) — real-world-looking
customer messages, every kind of odd character (non-ASCII letters that lower to ASCII, lone
surrogates, NUL, emoji), sizes around every bound, odd-typed run fields — plus fixed cases."""

from __future__ import annotations

import decimal
import enum
import math
import random
import re
import time

import orjson
import pytest
from prometheus_client import REGISTRY

from core.types import RequestContext
from gateway import hitl_stage
from runtime import runs
from runtime.hitl import confidence
from runtime.hitl import settings as hitl_settings
from runtime.hitl.confidence import Confidence, Signals
from runtime.hitl.settings import DEFAULT_NEGATIVE, URGENCIES
from runtime.types import Agent, PromptVersion, Selection, Turn

# ---- the oracle: frozen copies of the old implementation -------------------------------------------
_OLD_WORD = re.compile(r"[a-z0-9']+")
_OLD_MAX_TEXT = 4000


def _old_words(text: str) -> list[str]:
    return _OLD_WORD.findall(text[:_OLD_MAX_TEXT].lower())


def _old_word_set(text: str) -> frozenset[str]:
    return frozenset(_old_words(text))  # (the old one cached short texts: the same value)


def _old_similar(a: set[str], b: frozenset[str]) -> bool:
    if not a or not b:
        return False
    return len(a & b) / len(a | b) >= 0.8


def _old_max_urgency(a: str, b: str | None) -> str:
    if b not in URGENCIES:
        return a
    return a if URGENCIES.index(a) >= URGENCIES.index(b) else b


def _old_score(signals: Signals, settings) -> Confidence:
    factors: list[tuple[str, float]] = []
    rule = None
    urgency = "normal"
    if signals.logprobs:
        lp = signals.logprobs[:4096]
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
        urgency = _old_max_urgency(urgency, signals.escalate_urgency)
    if signals.tool_failures:
        factors.append(("tool_failure", 0.6 ** min(signals.tool_failures, 5)))
    if signals.fallback:
        factors.append(("fallback", 0.2))
    question = signals.question[:_OLD_MAX_TEXT].lower()
    if question:
        if any(p in question for p in settings.phrases):
            factors.append(("asked_for_human", 0.2))
            rule = rule or "asked_for_human"
        if any(p in question for p in settings.urgent_phrases):
            urgency = "urgent"
        tokens = _old_words(question)
        negative = sum(1 for t in tokens if t in settings.negative_words)
        if negative:
            factors.append(("negative_sentiment", (0.85, 0.6, 0.4)[min(negative, 3) - 1]))
            if negative >= 3:
                urgency = _old_max_urgency(urgency, "high")
        if signals.previous_questions:
            mine = set(tokens)
            if any(_old_similar(mine, _old_word_set(q[:_OLD_MAX_TEXT])) for q in signals.previous_questions[-3:]):
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
            urgency = _old_max_urgency(urgency, route.urgency)
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


def _old_text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _old_question(messages: list) -> str:
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            return _old_text(m.get("content"))[: confidence.MAX_TEXT]
    return ""


def _old_signals(ctx: RequestContext, answer: dict) -> Signals:
    turn = ctx.agent
    agent = turn.agent
    new = turn.new_messages
    question = _old_question(new)
    users = [m for m in new if isinstance(m, dict) and m.get("role") == "user"]
    previous = [_old_text(m.get("content"))[:2000] for m in users[-4:-1]]
    history = ctx.body.get("messages") or []
    for i in range(turn.memory_loaded, 0, -1):
        if len(previous) >= 3:
            break
        m = history[i] if i < len(history) else None
        if isinstance(m, dict) and m.get("role") == "user":
            previous.insert(0, _old_text(m.get("content"))[:2000])
    sims = [c.get("similarity") for c in turn.citations if isinstance(c.get("similarity"), int | float)]
    failures = sum(1 for s in turn.steps if s.get("kind") == "tool" and s.get("status") not in ("ok", None))
    escalate_tool = any(
        s.get("kind") == "tool" and s.get("name") == "escalate_to_human" and s.get("status") == "ok" for s in turn.steps
    )
    urgency = None
    if escalate_tool:
        for m in ctx.extra.get("tool_messages", ()):
            for call in m.get("tool_calls") or () if m.get("role") == "assistant" else ():
                fn = call.get("function") or {}
                if fn.get("name") == "escalate_to_human":
                    try:
                        urgency = (orjson.loads(fn.get("arguments") or "{}") or {}).get("urgency")
                    except (orjson.JSONDecodeError, AttributeError):
                        pass
    return Signals(
        question=question,
        previous_questions=previous[-3:],
        answer=_old_text(answer.get("content")),
        has_knowledge=bool(agent.knowledge_bases),
        best_similarity=max(sims) if sims else None,
        sources=len(turn.citations),
        escalate_tool=escalate_tool,
        escalate_urgency=urgency if isinstance(urgency, str) else None,
        tool_failures=failures,
        fallback=turn.degraded,
    )


_OLD_RUN_TEXT = 200
_OLD_STEPS = 64


def _old_run_text(value, limit: int = _OLD_RUN_TEXT):
    if value is None:
        return None
    return str(value)[:limit]


def _old_int(value):
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return max(-(2**31), min(2**31 - 1, number))


def _old_float(value):
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _old_tokens(value):
    if isinstance(value, dict):
        return {str(k)[:40]: _old_int(v) for k, v in list(value.items())[:4]}
    return _old_int(value)


def _old_bound_step(step: dict) -> dict:
    out: dict = {}
    for key in ("step", "arguments_bytes", "result_bytes"):
        if step.get(key) is not None:
            out[key] = _old_int(step[key])
    for key in ("kind", "name", "status", "deployment", "error"):
        if step.get(key) is not None:
            out[key] = _old_run_text(step[key])
    if step.get("duration_ms") is not None:
        out["duration_ms"] = _old_float(step["duration_ms"])
    if step.get("tokens") is not None:
        out["tokens"] = _old_tokens(step["tokens"])
    return out


def _old_bound_run(run: dict) -> dict:
    steps = [_old_bound_step(s) for s in (run.get("steps") or [])[:_OLD_STEPS] if isinstance(s, dict)]
    omitted = len(run.get("steps") or []) - _OLD_STEPS
    if omitted > 0:
        steps.append({"kind": "omitted", "count": omitted})
    return {
        "request_id": _old_run_text(run["request_id"]),
        "tenant": _old_run_text(run.get("tenant") or "default"),
        "agent": _old_run_text(run.get("agent")),
        "agent_id": _old_run_text(run.get("agent_id")),
        "prompt_version": _old_int(run.get("prompt_version")),
        "variant": _old_run_text(run.get("variant")),
        "conversation_id": _old_run_text(run.get("conversation_id"), 256),
        "status": _old_int(run.get("status")),
        "degraded": bool(run.get("degraded")),
        "escalated": bool(run.get("escalated")),
        "memory_error": _old_run_text(run.get("memory_error")),
        "confidence": _old_float(run.get("confidence")),
        "confidence_reasons": [_old_run_text(r, 40) for r in (run.get("confidence_reasons") or [])[:16]] or None,
        "escalation_id": _old_run_text(run.get("escalation_id"), 64),
        "steps": steps,
        "latency_ms": _old_float(run.get("latency_ms")),
        "ts": _old_float(run.get("ts")) or time.time(),
    }


# ---- generated inputs -------------------------------------------------------------------------------
_WORDS = (
    "where is my order i ordered it last week and it still hasn't arrived can you check the tracking "
    "number please the app doesn't let me log in password reset email never came what are your opening "
    "hours do you ship to canada how much is delivery invoice 2024 order #12345 account id 42 thanks"
).split()
_ODD = (
    "İ", "ı", "K", "Å", "ß", "ﬁ", "ǅ", "Σ", "é", "É", "ñ", "Ä", "ö", "ÿ", "Ÿ", "ǰ", "ẞ", "Ω",
    "\ud800", "\udfff", "\x00", "\t", "\n", "\r", "\u00a0", "\u2003", "\u200b", "\ufeff", "’", "‘",
    "😀", "👍🏽", "中文", "日本語", "ру́сский", "١٢٣", "𝟘𝟙", "Ⅻ", "½", "²", "'", "''", "-", "_", "?!",
    "...", "\\", "\"", "<b>", "&amp;", "%s", "{}", "0x1F", "e\u0301",
)  # fmt: skip
_CORPUS = (
    "Where is my order?",
    "where is my order",
    "WHERE IS MY ORDER???",
    "I want to talk to a person, this is useless!",
    "This is TERRIBLE, useless and ridiculous service. Refund me ASAP or I call my lawyer.",
    "Can I speak to a manager? It's urgent.",
    "I've been charged twice — can you refund the second payment?",
    "Kann ich mit einem Menschen sprechen? Das ist unverschämt!",
    "Je veux parler à un humain, c'est inacceptable.",
    "¿Dónde está mi pedido? Llevo dos semanas esperando.",
    "我的订单在哪里？",
    "the app doesn't work, it doesn't even open, doesn't matter what I do",
    "my order #A-12345 (placed 2024-05-01) hasn't shipped",
    "",
    "   ",
    "????",
    "Hello",
)


def _phrase_pool(settings) -> list[str]:
    pool = [*settings.phrases, *settings.urgent_phrases, *sorted(settings.negative_words)]
    for route in settings.routes:
        pool.extend(route.phrases)
    return pool or list(DEFAULT_NEGATIVE)


def _case(rng: random.Random, text: str) -> str:
    r = rng.random()
    if r < 0.2:
        return text.upper()
    if r < 0.4:
        return text.title()
    if r < 0.5:
        return "".join(c.upper() if rng.random() < 0.5 else c for c in text)
    return text


def _message(rng: random.Random, settings, size: int | None = None) -> str:
    r = rng.random()
    if r < 0.15:
        return rng.choice(_CORPUS)
    if r < 0.2:  # any code point (surrogates included)
        return "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(0, 60)))
    pool = _phrase_pool(settings)
    n = size if size is not None else rng.choice((0, 1, 2, 4, 8, 15, 40, 120))
    parts = []
    for _ in range(n):
        x = rng.random()
        if x < 0.55:
            parts.append(rng.choice(_WORDS))
        elif x < 0.75:
            parts.append(rng.choice(pool))
        elif x < 0.9:
            parts.append(rng.choice(_ODD))
        else:
            parts.append(str(rng.randrange(10 ** rng.randrange(1, 8))))
    sep = rng.choice((" ", " ", ", ", "", "\n", "  ", "\u00a0", "'"))
    return _case(rng, sep.join(parts))


def _near(rng: random.Random, text: str) -> str:
    """A variation of an earlier message: words dropped, added, reordered, recased."""
    tokens = text.split()
    if tokens and rng.random() < 0.5:
        tokens.pop(rng.randrange(len(tokens)))
    if rng.random() < 0.5:
        tokens.insert(rng.randrange(len(tokens) + 1), rng.choice(_WORDS))
    if rng.random() < 0.3:
        rng.shuffle(tokens)
    return _case(rng, " ".join(tokens) + rng.choice(("", "?", "!!", " please")))


_SETTINGS = (
    hitl_settings.build({"enabled": True, "threshold": 0.4}),
    hitl_settings.build({}),
    hitl_settings.build(
        {
            "enabled": True,
            "threshold": 0.9,
            "phrases": ["Mensch", "HUMAN", "à un humain", "İnsan", "can't"],
            "urgent_phrases": ["sofort", "Ω", "right now"],
            "negative_words": ["unverschämt", "doesn't", "can't", "bad", "42", "", "'", "Refund"],
            "routes": [
                {"phrases": ["refund", "charged twice"], "team": "billing", "urgency": "high", "skills": ["billing"]},
                {"phrases": ["order"], "team": "shipping", "urgency": "low"},
                {"phrases": ["pedido", "订单"], "team": "intl", "urgency": None},
                {"phrases": ["lawyer"], "team": "legal", "urgency": "bogus"},
            ],
        }
    ),
    hitl_settings.build({"enabled": True, "threshold": 0.0, "phrases": [], "urgent_phrases": [], "negative_words": []}),
)


def _signals(rng: random.Random, settings) -> Signals:
    question = _message(rng, settings)
    if rng.random() < 0.03:
        question = _message(rng, settings, size=rng.randrange(600, 1200))  # beyond MAX_TEXT characters
    previous = []
    for _ in range(rng.choice((0, 0, 1, 2, 3, 3, 5))):
        x = rng.random()
        if x < 0.35:
            previous.append(_near(rng, question))
        elif x < 0.45:
            previous.append(question)
        elif x < 0.5:
            previous.append(question * rng.randrange(2, 40))  # past the cached length, or MAX_TEXT
        else:
            previous.append(_message(rng, settings))
    logprobs = rng.choice(
        (None, None, [], [-0.01, -0.02], [-2.0] * 3, [0.5, 3.0], [-math.inf], [math.nan, -1.0],
         [rng.uniform(-3, 0) for _ in range(rng.randrange(1, 50))])
    )  # fmt: skip
    return Signals(
        question=question,
        previous_questions=previous,
        answer=_message(rng, settings),
        logprobs=logprobs,
        has_knowledge=rng.random() < 0.4,
        best_similarity=rng.choice((None, 0.0, 0.59, 0.6, 0.9, -1.0, 2.0, rng.random())),
        sources=rng.choice((0, 0, 1, 3)),
        escalate_tool=rng.random() < 0.1,
        escalate_urgency=rng.choice((None, "whenever", "", *URGENCIES)),
        tool_failures=rng.choice((0, 0, 0, 1, 2, 5, 9)),
        fallback=rng.random() < 0.05,
        judge=rng.choice((None, None, 0.0, 0.3, 1.0, -0.5, 1.5, math.nan)),
    )


# ---- confidence -------------------------------------------------------------------------------------
def test_words_match_the_regex_on_any_text():
    rng = random.Random(1201)
    texts = [*_CORPUS, *_ODD, "a" * 5000, "ab'c " * 1000, "x" * 3999 + "İ" + "yz", "K" * 4001]
    for _ in range(3000):
        texts.append("".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(0, 40))))
        texts.append(_message(rng, _SETTINGS[rng.randrange(len(_SETTINGS))]))
        texts.append("".join(rng.choice(_ODD + tuple("aZ09' .,")) for _ in range(rng.randrange(0, 30))))
    for text in texts:
        assert confidence.words(text) == _old_words(text), repr(text)
        lowered = text.lower()
        assert confidence._words(lowered) == _OLD_WORD.findall(lowered), repr(text)


def test_similar_matches_the_jaccard_oracle_around_its_threshold():
    rng = random.Random(1202)
    vocab = [f"w{i}" for i in range(12)]
    for _ in range(20_000):
        a = set(rng.sample(vocab, rng.randrange(0, 12)))
        b = frozenset(rng.sample(vocab, rng.randrange(0, 12)))
        assert confidence._similar(a, b) == _old_similar(a, b), (a, b)
    # exactly at the threshold: 4 of 5 words in common, 8 of 10
    assert confidence._similar({"a", "b", "c", "d"}, frozenset("abcde")) is True
    assert confidence._similar(set("abcdefgh"), frozenset("abcdefghij")) is True
    assert confidence._similar(set("abc"), frozenset("abcd")) is False


@pytest.mark.parametrize("seed", range(4))
def test_score_matches_the_old_implementation_on_generated_turns(seed):
    rng = random.Random(1300 + seed)
    for _ in range(2500):
        settings = _SETTINGS[rng.randrange(len(_SETTINGS))]
        signals = _signals(rng, settings)
        old = _old_score(signals, settings)
        new = confidence.score(signals, settings)
        assert new == old, signals
        assert type(new.score) is float and 0.0 <= new.score <= 1.0


def test_score_matches_on_fixed_cases():
    on = _SETTINGS[0]
    cases = [Signals(question=q) for q in _CORPUS]
    cases += [
        Signals(question="Where is my order?", previous_questions=["where is my order"]),
        Signals(question="where is my order", previous_questions=["x" * 300 + " where is my order"]),
        Signals(question="İ am angry", previous_questions=["i̇ am angry"]),
        Signals(question="KELVIN bad", previous_questions=["kelvin bad"]),
        Signals(question="useless useless useless", escalate_tool=True, escalate_urgency="low"),
        Signals(question="a" * 10_000, previous_questions=["a" * 10_000]),
    ]
    for s in cases:
        for settings in _SETTINGS:
            assert confidence.score(s, settings) == _old_score(s, settings), s
    assert confidence.score(cases[-1], on) == _old_score(cases[-1], on)


# ---- the signals of a turn --------------------------------------------------------------------------
def _content(rng: random.Random, settings):
    r = rng.random()
    if r < 0.7:
        return _message(rng, settings)
    if r < 0.85:
        return [
            rng.choice(
                ({"type": "text", "text": _message(rng, settings)}, {"type": "image_url"}, {"text": 5}, "text", None)
            )
            for _ in range(rng.randrange(0, 4))
        ]
    return rng.choice((None, 42, {"text": "x"}, ""))


def _msg(rng: random.Random, settings):
    if rng.random() < 0.05:
        return rng.choice(("user", None, ["user"]))
    role = rng.choice(("user", "user", "assistant", "system", "tool", "developer", None))
    return {"role": role, "content": _content(rng, settings)}


def _turn_ctx(rng: random.Random) -> RequestContext:
    settings = _SETTINGS[rng.randrange(len(_SETTINGS))]
    agent = Agent(id="agt_1", tenant="t", name="support", model="m", knowledge_bases=rng.choice(((), ("kb1",))))
    new = [_msg(rng, settings) for _ in range(rng.choice((1, 1, 1, 2, 3, 5, 8, 41)))]  # 41: a stateless history
    turn = Turn(
        agent=agent,
        selection=Selection(version=PromptVersion(version=1, template="x"), label="production", variant=None),
        conversation_id="c-1",
        variables={},
        new_messages=new,
    )
    turn.history = [{}] * rng.choice((0, 0, 1, 2, 5, 20, 40))
    body_messages = [{"role": "system", "content": "You are ..."}]
    body_messages += [_msg(rng, settings) for _ in range(rng.choice((0, 3, 10, 41, 60)))]
    body_messages += new
    ctx = RequestContext(request_id="req_1", endpoint="chat", body={"messages": body_messages}, started=0.0)
    if rng.random() < 0.05:
        ctx.body = {}
    ctx.agent = turn
    turn.citations = [
        {"similarity": rng.choice((None, 0.3, 0.7, 1, True, "0.9", math.nan)), "source": "kb"}
        for _ in range(rng.choice((0, 0, 1, 3)))
    ]
    for i in range(rng.choice((0, 1, 2, 4))):
        turn.steps.append(
            {
                "step": i,
                "kind": rng.choice(("model", "tool", "tool", "citation", None)),
                "name": rng.choice(("escalate_to_human", "lookup", None, "escalate_to_human ")),
                "status": rng.choice(("ok", "ok", None, "error", "timeout", 500, "OK")),
            }
        )
    turn.degraded = rng.random() < 0.05
    if rng.random() < 0.3:
        args = rng.choice(('{"urgency": "high"}', '{"urgency": 3}', "not json", "[1]", "null", None, '{"u": 1}'))
        ctx.extra["tool_messages"] = [
            {"role": "assistant", "tool_calls": [{"function": {"name": "escalate_to_human", "arguments": args}}]},
            {"role": "tool", "tool_calls": [{"function": {"name": "escalate_to_human", "arguments": "{}"}}]},
        ]
    return ctx


def test_signals_match_the_old_implementation_on_generated_turns():
    rng = random.Random(1400)
    for _ in range(4000):
        ctx = _turn_ctx(rng)
        answer = {"content": _content(rng, _SETTINGS[0])}
        try:
            old = _old_signals(ctx, answer)
        except Exception as exc:  # an input the old one refused: the new one refuses it the same way
            with pytest.raises(type(exc)):
                hitl_stage._signals(ctx, answer)
            continue
        assert hitl_stage._signals(ctx, answer) == old


def test_the_confidence_metric_counts_every_scored_turn_by_its_label():
    rng = random.Random(1401)

    def count(label: str) -> float:
        return REGISTRY.get_sample_value("gateway_agent_confidence_count", {"escalated": label}) or 0.0

    def total(label: str) -> float:
        return REGISTRY.get_sample_value("gateway_agent_confidence_sum", {"escalated": label}) or 0.0

    before = {x: (count(x), total(x)) for x in ("true", "false")}
    scores = []
    for _ in range(5):
        ctx = _turn_ctx(rng)
        hitl_stage.score_streamed(ctx, "an answer")
        scores.append(ctx.agent.confidence.score)
    hitl_stage._observe("true", 0.25)
    assert count("false") == before["false"][0] + 5
    assert total("false") == pytest.approx(before["false"][1] + sum(scores))
    assert count("true") == before["true"][0] + 1 and total("true") == pytest.approx(before["true"][1] + 0.25)


# ---- the stored run record --------------------------------------------------------------------------
class _Color(enum.IntEnum):
    RED = 3


class _Str(str):
    def __str__(self) -> str:
        return "shown-" + self


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")


_ODD_VALUES = (
    None, True, False, 0, -1, 7, 2**31, 2**31 - 1, -(2**31) - 1, 2**63, -(2**70), 10**400, 1.5, -0.0,
    math.nan, math.inf, -math.inf, 1e308, "12", " 7 ", "1e3", "abc", "", "nan", "inf", "x" * 10_000,
    "nul\x00in", "é" * 300, b"bytes", bytearray(b"ba"), [], [1, 2], {}, {"a": 1}, (1,), _Color.RED,
    _Str("sub"), decimal.Decimal("NaN"), decimal.Decimal("1e400"), decimal.Decimal("2.5"), 3 + 4j, _Unprintable(),
)  # fmt: skip
_HASHABLE = tuple(v for v in _ODD_VALUES if getattr(type(v), "__hash__", None) is not None)
_RUN_KEYS = (
    "tenant", "agent", "agent_id", "prompt_version", "variant", "conversation_id", "status", "degraded",
    "escalated", "memory_error", "confidence", "confidence_reasons", "escalation_id", "latency_ms", "ts",
)  # fmt: skip
_STEP_KEYS = (
    "step", "arguments_bytes", "result_bytes", "kind", "name", "status", "deployment", "error", "duration_ms",
    "tokens", "other",
)  # fmt: skip


def _gateway_step(rng: random.Random) -> dict:
    """A step as the tools loop writes one."""
    step = {"step": rng.randrange(1, 6), "kind": rng.choice(("model", "tool", "escalation")), "status": "ok"}
    if step["kind"] == "model":
        step.update(name="bench", deployment="mock/bench", duration_ms=round(rng.uniform(0, 900), 3))
        step["tokens"] = {"prompt_tokens": rng.randrange(9999), "completion_tokens": rng.randrange(999)}
        if rng.random() < 0.2:
            step.update(status=rng.choice((429, 502, 500)), error=rng.choice(("rate_limited", "upstream_error")))
    elif step["kind"] == "tool":
        step.update(name=rng.choice(("lookup", "escalate_to_human", "t" * 300)), arguments_bytes=rng.randrange(99))
        step.update(result_bytes=rng.randrange(9999), duration_ms=rng.random() * 100)
    return step


def _run(rng: random.Random) -> dict:
    run = {
        "request_id": f"req_{rng.getrandbits(64):016x}",
        "tenant": rng.choice(("default", "acme", None, "")),
        "agent": "support",
        "agent_id": "agt_1",
        "prompt_version": rng.randrange(1, 50),
        "variant": rng.choice((None, "7", "8")),
        "conversation_id": rng.choice((None, "conv-1", "c" * 300)),
        "status": rng.choice((200, 200, 502, 429)),
        "degraded": rng.random() < 0.1,
        "escalated": rng.random() < 0.1,
        "memory_error": rng.choice((None, None, "store failed: TimeoutError")),
        "confidence": rng.choice((None, 1.0, 0.42, 0.0)),
        "confidence_reasons": rng.choice((None, [], ["no_sources"], ["r" * 60, "negative_sentiment"], ["x"] * 20)),
        "escalation_id": rng.choice((None, "esc_" + "1" * 70)),
        "steps": [_gateway_step(rng) for _ in range(rng.choice((0, 1, 2, 3, 10, 64, 65, 200)))],
        "latency_ms": round(rng.uniform(0, 500), 3),
        "ts": rng.choice((1_700_000_000.5, 0.0, None)),
    }
    for _ in range(rng.choice((0, 0, 1, 3))):  # odd-typed fields, as a bug or a client could put there
        run[rng.choice(_RUN_KEYS)] = rng.choice(_ODD_VALUES)
    for step in run["steps"]:
        if rng.random() < 0.1:
            step[rng.choice(_STEP_KEYS)] = rng.choice(_ODD_VALUES)
        if rng.random() < 0.06:
            step["tokens"] = {rng.choice(_HASHABLE): rng.choice(_ODD_VALUES) for _ in range(rng.randrange(1, 7))}
    if rng.random() < 0.05:
        run["steps"].insert(0, rng.choice(("step", 3, None, ["kind"])))
    if rng.random() < 0.02:
        run["steps"] = rng.choice((None, (), "steps", 5))
    if rng.random() < 0.01:
        del run["request_id"]
    return run


def _without_default_ts(run: dict, bounded: dict) -> dict:
    """``ts`` defaults to the clock when the run has none: compared apart."""
    if not _old_float(run.get("ts")):
        assert abs(bounded["ts"] - time.time()) < 600
        return {k: v for k, v in bounded.items() if k != "ts"}
    return bounded


@pytest.mark.parametrize("seed", range(3))
def test_bound_run_matches_the_old_implementation_on_generated_runs(seed):
    rng = random.Random(1500 + seed)
    for _ in range(1500):
        run = _run(rng)
        try:
            old = _old_bound_run(run)
        except Exception as exc:
            with pytest.raises(type(exc)):
                runs.bound_run(run)
            continue
        new = runs.bound_run(run)
        assert list(new) == list(old)  # the same keys in the same order: the same encoded bytes
        assert _without_default_ts(run, new) == _without_default_ts(run, old), run
        if _old_float(run.get("ts")):
            try:
                expected = orjson.dumps(old)
            except Exception as exc:
                with pytest.raises(type(exc)):
                    runs.encode_run(run)
                continue
            assert runs.encode_run(run) == expected


def test_bound_step_and_its_helpers_match_on_every_odd_value():
    for value in _ODD_VALUES:
        for name, new, old in (
            ("_int", runs._int, _old_int),
            ("_float", runs._float, _old_float),
            ("_text", runs._text, _old_run_text),
            ("_tokens", runs._tokens, _old_tokens),
        ):
            try:
                expected = old(value)
            except Exception as exc:
                with pytest.raises(type(exc)):
                    new(value)
                continue
            got = new(value)
            assert got == expected or (got != got and expected != expected), (name, value)
            assert type(got) is type(expected), (name, value)
        for key in _STEP_KEYS:
            step = {"kind": "tool", key: value}
            try:
                expected = _old_bound_step(step)
            except Exception as exc:
                with pytest.raises(type(exc)):
                    runs.bound_step(step)
                continue
            assert runs.bound_step(step) == expected and list(runs.bound_step(step)) == list(expected)
