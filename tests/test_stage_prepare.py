"""The agent stage's prompt bound (``RequestContext.body_bytes``) without the stored history
encoded again: memory keeps each stored message's token count, the bound takes those counts for
the history and the JSON size of the rest of the body. It must stay an upper bound of the prompt's
token count (context windows, routing rules and the off-loop count rely on it), and the body sent
must be the same as before. The stage runs as the pipeline calls it; memory answers with a window
cut by ``runtime.memory_window.window`` from counted messages, as Redis's would be read."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

import orjson

from core.tokens import count_prompt
from core.types import RequestContext
from gateway import agent_stage
from runtime.memory_window import message_tokens, window
from runtime.types import Agent, MemorySettings, PromptVersion

_WORDS = (
    'where is my order the tracking page says label created can I change the size 12345 ünïcödé 😀 " \\ \n'
).split(" ")


class _Memory:
    def __init__(self, stored: list[dict]):
        self.stored = stored

    async def load(self, tenant, agent, conversation, erased=None):
        return window(((message_tokens(m), m) for m in self.stored), agent.memory)


class _Tools:
    def openai_tools(self, agent):
        return []


class _Agents:
    def __init__(self, agent):
        self.agent = agent

    def get(self, tenant, name):
        return self.agent if name == self.agent.name else None

    async def pinned(self, agent, selector):
        return None


def _agent() -> Agent:
    version = PromptVersion(
        version=1,
        template="You are {{ company }}'s assistant. Answer briefly.",
        variables={"company": {"type": "string", "required": True}},
    )
    return Agent(
        id="agt_1",
        tenant="default",
        name="support",
        model="m",
        memory=MemorySettings(window_turns=20, window_tokens=100_000),
        labels={"production": {1: 100}},
        versions={1: version},
    )


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randrange(0, 60)))


def _stored(rng: random.Random, turns: int) -> list[dict]:
    out = []
    for _ in range(turns):
        out.append({"role": "user", "content": _text(rng)})
        if rng.random() < 0.2:
            call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"id": "7"}'}}
            out.append({"role": "assistant", "content": None, "tool_calls": [call]})
            out.append({"role": "tool", "tool_call_id": "c1", "content": _text(rng)})
        out.append({"role": "assistant", "content": _text(rng)})
    return out


def _prepared(stored: list[dict], body: dict) -> RequestContext:
    agent = _agent()
    svc = SimpleNamespace(agents=_Agents(agent), memory=_Memory(stored), tools=_Tools(), channel_keys=set())
    ctx = RequestContext(request_id="req_1", endpoint="chat", body=body, started=0.0, model=body["model"])
    asyncio.run(agent_stage.prepare(svc, ctx, {}))
    return ctx


def _body(rng: random.Random) -> dict:
    return {
        "model": "agent:support",
        "messages": [{"role": "user", "content": _text(rng)}],
        "metadata": {"conversation_id": "conv-1"},
        "variables": {"company": "Acme"},
        "max_tokens": 50,
    }


def test_the_bound_takes_the_stored_historys_token_counts_instead_of_encoding_it():
    rng = random.Random(3800)
    stored = _stored(rng, 20)
    ctx = _prepared(stored, _body(rng))
    history = ctx.known_history
    assert history is not None and len(history) == len(stored)
    messages = ctx.body["messages"]
    assert messages[1 : 1 + len(history)] == stored  # the history is sent as before
    rest = {**ctx.body, "messages": [messages[0], *messages[1 + len(history) :]]}
    assert ctx.body_bytes == len(orjson.dumps(rest)) + sum(history.tokens)
    assert ctx.body_bytes < len(orjson.dumps(ctx.body))  # (the history's JSON is larger than its tokens)


def test_the_bound_stays_above_the_prompts_token_count():
    rng = random.Random(3801)
    for _ in range(60):
        stored = _stored(rng, rng.choice((0, 1, 3, 20, 40)))
        ctx = _prepared(stored, _body(rng))
        assert list(ctx.body) == ["model", "messages", "max_tokens"]  # the gateway's fields taken out
        assert ctx.body_bytes >= count_prompt(ctx.body) == ctx.prompt_tokens()
