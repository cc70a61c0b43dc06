"""Differential tests of the agent stage's per-turn work made cheaper (issue 12, the stage's own
CPU): the confidence score and the signals it is computed from must come out exactly as before.
The oracles: ``test_perf_oracles._old_score`` and ``_old_signals`` (the score and signals before
their earlier rewrite, which 460de80's equal on every input that file's tests try). Inputs:
``test_perf_oracles``'s generated turns (every odd character, every odd type) and conversations
as the agent stage builds them (a stored window of whole turns, the client's new messages,
repeated and rephrased questions, tool steps, sources)."""

from __future__ import annotations

import random

import pytest

from core.types import RequestContext
from gateway import hitl_stage
from runtime.hitl import confidence
from runtime.hitl.confidence import Confidence
from runtime.memory_window import Window
from runtime.types import Agent, PromptVersion, Selection, Turn
from tests import test_perf_oracles as gen


# ---- conversations as the agent stage builds them ---------------------------------------------------
def _conversation_ctx(rng: random.Random) -> RequestContext:
    """An ordered turn: system prompt, the stored window (whole turns), the client's new
    messages; questions that repeat or rephrase earlier ones, tool steps, sources."""
    settings = gen._SETTINGS[rng.randrange(len(gen._SETTINGS))]
    agent = Agent(id="agt_1", tenant="t", name="support", model="m", knowledge_bases=rng.choice(((), ("kb1",))))
    asked = [gen._message(rng, settings) for _ in range(rng.randrange(1, 4))]
    history = Window()
    for _ in range(rng.choice((0, 1, 2, 5, 10, 20))):
        q = rng.choice(asked) if rng.random() < 0.5 else gen._near(rng, rng.choice(asked))
        history.append({"role": "user", "content": q if rng.random() < 0.9 else [{"type": "text", "text": q}]})
        if rng.random() < 0.2:
            history.append({"role": "assistant", "content": None, "tool_calls": [{"id": "c", "function": {}}]})
            history.append({"role": "tool", "tool_call_id": "c", "content": "result"})
        history.append({"role": "assistant", "content": gen._message(rng, settings)})
    history.tokens = [7] * len(history)
    history.seq = len(history)
    question = rng.choice(asked) if rng.random() < 0.5 else gen._message(rng, settings)
    new = [{"role": "user", "content": question}]
    if rng.random() < 0.2:  # a client sending its tool results, or several messages at once
        new = [gen._msg(rng, settings) for _ in range(rng.randrange(1, 5))] + new
    turn = Turn(
        agent=agent,
        selection=Selection(version=PromptVersion(version=1, template="x"), label="production", variant=None),
        conversation_id="c-1",
        variables={},
        new_messages=new,
    )
    turn.history = history
    body = {"messages": [{"role": "system", "content": "You are ..."}, *history, *new]}
    ctx = RequestContext(request_id="req_1", endpoint="chat", body=body, started=0.0)
    ctx.agent = turn
    turn.steps.append({"step": 1, "kind": "model", "status": 200})
    if rng.random() < 0.3:
        turn.steps.append(
            {"step": 1, "kind": "tool", "name": rng.choice(("lookup", "escalate_to_human")), "status": "ok"}
        )
        ctx.extra["tool_messages"] = [
            {"role": "assistant", "tool_calls": [{"function": {"name": "escalate_to_human", "arguments": "{}"}}]}
        ]
    if rng.random() < 0.3:
        turn.citations = [{"similarity": rng.random(), "source": i} for i in range(rng.randrange(0, 4))]
    turn.degraded = rng.random() < 0.05
    return ctx


def _same(new: Confidence, old: Confidence) -> None:
    assert new == old
    assert type(new.score) is float and type(new.reasons) is list and type(new.skills) is tuple


@pytest.mark.parametrize("seed", range(3))
def test_score_is_unchanged_on_generated_signals(seed):
    rng = random.Random(3700 + seed)
    for _ in range(2500):
        settings = gen._SETTINGS[rng.randrange(len(gen._SETTINGS))]
        signals = gen._signals(rng, settings)
        _same(confidence.score(signals, settings), gen._old_score(signals, settings))


def test_signals_and_score_are_unchanged_on_generated_turns():
    rng = random.Random(3710)
    for _ in range(3000):
        ctx = gen._turn_ctx(rng)
        answer = {"content": gen._content(rng, gen._SETTINGS[0])}
        try:
            old = gen._old_signals(ctx, answer)
        except Exception as exc:  # an input the old one refused: the new one refuses it the same way
            with pytest.raises(type(exc)):
                hitl_stage._signals(ctx, answer)
            continue
        new = hitl_stage._signals(ctx, answer)
        assert new == old
        for settings in gen._SETTINGS:
            _same(confidence.score(new, settings), gen._old_score(old, settings))


def test_signals_and_score_are_unchanged_on_ordered_conversations():
    rng = random.Random(3720)
    repeated = 0
    for _ in range(3000):
        ctx = _conversation_ctx(rng)
        answer = {"content": gen._message(rng, gen._SETTINGS[0])}
        new, old = hitl_stage._signals(ctx, answer), gen._old_signals(ctx, answer)
        assert new == old
        for settings in gen._SETTINGS:
            conf = confidence.score(new, settings)
            _same(conf, gen._old_score(old, settings))
            repeated += "repeated_question" in conf.reasons
    assert repeated > 1000  # (the corpus does exercise the comparison with earlier questions)
