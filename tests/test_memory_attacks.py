"""Attacks on the stored memory window (``runtime/memory.py``'s ``…:w``) and the confidence score's
word-set cache: what a client, a second replica or Redis itself can do to make the stored window
differ from the window the list gives (real Valkey and PostgreSQL)."""

from __future__ import annotations

import itertools
import random
import string
import tracemalloc
import uuid

import orjson

from runtime.hitl import confidence
from runtime.hitl import settings as hitl_settings
from runtime.hitl.confidence import Signals
from runtime.memory import Memory, keys
from runtime.memory_window import clean_message, extended, message_tokens, window
from runtime.types import MemorySettings
from tests.test_memory import _agent, _entries, _rows_if, _run, _turn, _until


def _call(call_id: str, arguments: str = "{}") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": "client_tool", "arguments": arguments}}


def _accepted_by_openai(messages: list[dict]) -> bool:
    """OpenAI's rule for tool messages: an assistant message's calls are answered by the tool
    messages right after it, and a tool message answers a call of those (a call may stay open
    at the very end: the client is about to send its result)."""
    pending: set[str] = set()
    for m in messages:
        if m.get("role") == "tool":
            if m.get("tool_call_id") not in pending:
                return False
            pending.discard(m["tool_call_id"])
            continue
        if pending:
            return False
        pending = {c["id"] for c in m.get("tool_calls") or ()}
    return True


async def _store(memory: Memory, tenant: str, agent, conv: str, messages: list[dict], rid: str) -> None:
    """One agent turn as the gateway runs it: load the window, store the turn with it as base."""
    base = await memory.load(tenant, agent, conv)
    await memory.append(tenant, agent, conv, messages, request_id=rid, prompt_version=1, variant=None, base=base)


async def _stored_and_listed(memory: Memory, redis, tenant: str, agent, conv: str):
    """The window a load gives from the stored value, then the one it cuts from the list."""
    window_key, _ = keys(tenant, agent.id, conv)
    stored = await memory.load(tenant, agent, conv)
    await redis.delete(f"{window_key}:w")
    return stored, await memory.load(tenant, agent, conv)


def test_attack_several_turns_in_one_request_are_cut_turn_by_turn(services):
    """A client sends several user messages in one request, with a call it answers only after
    the next user message (a lenient upstream took it). The list's cut keeps ``window_turns``
    turns and drops the call left open in its turn; the stored window counted the request as
    one turn: more turns than allowed, and a call followed by a user message, which OpenAI
    refuses."""

    async def body(memory: Memory, pool, redis):
        tenant, conv = f"t-{uuid.uuid4().hex[:8]}", "conv-several"
        agent = _agent(tenant, window_turns=2)
        window_key, _ = keys(tenant, agent.id, conv)
        await _store(memory, tenant, agent, conv, _turn(0), "r0")
        sent = [
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": None, "tool_calls": [_call("call_x")]},
            {"role": "user", "content": "two"},
            {"role": "tool", "tool_call_id": "call_x", "content": "late"},
            {"role": "user", "content": "three"},
            {"role": "assistant", "content": "done"},
        ]
        await _store(memory, tenant, agent, conv, sent, "r1")
        assert await redis.exists(f"{window_key}:w")
        stored, listed = await _stored_and_listed(memory, redis, tenant, agent, conv)
        assert listed == [{"role": "user", "content": "two"}, *[clean_message(m) for m in sent[4:]]]
        assert stored == listed and stored.tokens == listed.tokens
        assert _accepted_by_openai(stored)

    _run(services, body)


def test_attack_a_window_extended_by_hostile_sequences_equals_the_list_cut():
    """``extended`` against ``window`` over the whole list on random client-made sequences:
    several turns per request, calls and results out of order, repeated call ids, results
    without calls, calls left open and abandoned, every budget; and every window is one OpenAI
    accepts."""
    rng = random.Random(20261125)

    def sent() -> list[dict]:
        out = [{"role": "user", "content": "u"}]
        for _ in range(rng.randint(0, 5)):
            k, cid = rng.randrange(8), rng.choice(["a", "b"])
            out.append(
                [
                    {"role": "user", "content": f"u{rng.randrange(9)}"},
                    {"role": "assistant", "content": rng.choice([None, "x"]), "tool_calls": [_call(cid)]},
                    {"role": "tool", "tool_call_id": cid, "content": "r"},
                    {"role": "assistant", "content": "x", "tool_calls": [_call("a"), _call("b")]},
                    {"role": "tool", "tool_call_id": "a", "content": "rr" * rng.randrange(20)},
                    {"role": "assistant", "content": "answer"},
                    {"role": "assistant", "content": "answer"},
                    {"role": "assistant", "content": "answer"},
                ][k]
            )
        return [clean_message(m) for m in out]

    for case in range(600):
        settings = MemorySettings(window_turns=rng.randint(1, 6), window_tokens=rng.choice([30, 100, 4000]))
        stored: list[dict] = []
        chained = window((), settings)
        for i in range(rng.randint(1, 8)):
            added = _entries(sent())
            stored += [m for _, m in added]
            whole = window(_entries(stored), settings)
            assert _accepted_by_openai(whole), (case, i)
            new = extended(chained, added, settings)
            if new is not None:
                assert new == whole and new.tokens == whole.tokens, (case, i)
            chained = whole


def test_attack_an_abandoned_client_call_does_not_cost_the_window_an_older_turn(services):
    """A turn ends with a client's tool call (kept: its result is on its way), then the client
    sends a new question instead. The call is dropped now, and the turn before it, which did not
    fit beside the call, fits again: the list's cut has it, the stored window had lost it."""

    async def body(memory: Memory, pool, redis):
        tenant, conv = f"t-{uuid.uuid4().hex[:8]}", "conv-abandoned"
        first = [{"role": "user", "content": "tell me " + "about it " * 60}, {"role": "assistant", "content": "ok"}]
        second = _turn(2)
        question = {"role": "user", "content": "question 1"}
        pending = {"role": "assistant", "tool_calls": [_call("call_p", '{"q": "' + "x y " * 50 + '"}')]}
        budget = sum(message_tokens(m) for m in (*first, question, *second))
        tokens = [sum(message_tokens(m) for m in ms) for ms in (first, [pending], second)]
        assert tokens[2] < tokens[1] <= tokens[0] + tokens[2]  # the call crowds turn 0 out, alone it fits
        agent = _agent(tenant, window_turns=10, window_tokens=budget)
        await _store(memory, tenant, agent, conv, first, "r0")
        await _store(memory, tenant, agent, conv, [question, pending], "r1")
        assert await memory.load(tenant, agent, conv) == [question, pending]
        await _store(memory, tenant, agent, conv, second, "r2")
        assert await memory.load(tenant, agent, conv) == [*first, question, *second]
        stored, listed = await _stored_and_listed(memory, redis, tenant, agent, conv)
        assert stored == listed

    _run(services, body)


def test_attack_a_stored_window_is_not_served_once_the_list_moved_without_it(services):
    """The stored window is a copy of what the list gives; when the list changes without it, a
    load must not serve it: (1) Redis evicted the list alone (maxmemory) — the stored window
    was served, the next turn pushed onto an empty list and the history PostgreSQL holds was
    never read again; (2) a replica of an older release stores a turn (its script does not know
    the stored window) — the stored window missed that turn."""

    async def body(memory: Memory, pool, redis):
        tenant, conv = f"t-{uuid.uuid4().hex[:8]}", "conv-evicted"
        agent = _agent(tenant)
        window_key, seq_key = keys(tenant, agent.id, conv)
        for i in range(3):
            await _store(memory, tenant, agent, conv, _turn(i), f"r{i}")
        await memory.flush()
        await _until(lambda: _rows_if(pool, tenant, agent.id, conv, 6), "three turns in PostgreSQL")
        assert await redis.exists(f"{window_key}:w")
        await redis.delete(window_key)  # evicted; its stored window is not
        await _store(memory, tenant, agent, conv, _turn(3), "r3")
        assert await memory.load(tenant, agent, conv) == [m for i in range(4) for m in _turn(i)]

        assert await redis.exists(f"{window_key}:w")
        old = {"role": "user", "content": "stored by an older replica"}
        seq = await redis.incrby(seq_key, 1)
        await redis.rpush(window_key, orjson.dumps({"s": seq, "t": message_tokens(old), "m": old}))
        assert (await memory.load(tenant, agent, conv))[-1] == old

    _run(services, body)


def test_attack_distinct_word_questions_do_not_fill_the_process_with_word_sets():
    """Earlier questions' word sets are cached (the confidence score compares the last three on
    each turn). A client writes questions of as many distinct short words as fit (2,000
    characters each, what the HITL stage passes): 1,024 cached sets held ~70 MB per process."""
    alphabet = string.ascii_lowercase + string.digits + "'"
    pairs = ["".join(p) for p in itertools.product(alphabet, repeat=2)]
    rng = random.Random(7)

    def question(size: int) -> str:
        rng.shuffle(pairs)
        return " ".join(pairs)[:size]

    settings = hitl_settings.build({"enabled": True, "threshold": 0.4})
    texts = [question(2000) for _ in range(1024)] + [question(256) for _ in range(1024)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(0, len(texts), 3):
            confidence.score(Signals(question="where is my order", previous_questions=texts[i : i + 3]), settings)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 8_000_000, held
    # the cache still serves what it is for: a short question asked again
    again = Signals(question="Where is my order?", previous_questions=["where is my order"])
    repeated = confidence.score(again, settings)
    assert "repeated_question" in repeated.reasons


def test_attack_tool_results_that_do_not_follow_their_call_are_not_sent(services):
    """A lenient upstream (vLLM, Ollama; Anthropic merges the two assistant messages) took a
    client's turns whose tool results do not come right after their call, or answer a call id
    used twice. Replayed as they are, OpenAI refuses the request ("must be followed by tool
    messages responding to each 'tool_call_id'"): the window keeps a call only with the results
    right after it."""

    async def body(memory: Memory, pool, redis):
        tenant, conv = f"t-{uuid.uuid4().hex[:8]}", "conv-pairs"
        agent = _agent(tenant)
        turns = [
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": None, "tool_calls": [_call("a1")]},
                {"role": "assistant", "content": "let me check"},
                {"role": "tool", "tool_call_id": "a1", "content": "late"},
                {"role": "assistant", "content": "done a"},
            ],
            [
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "x", "tool_calls": [_call("b1"), _call("b2")]},
                {"role": "tool", "tool_call_id": "b1", "content": "r1"},
                {"role": "assistant", "content": "half"},
                {"role": "tool", "tool_call_id": "b2", "content": "r2"},
                {"role": "assistant", "content": "done b"},
            ],
            [
                {"role": "user", "content": "d"},
                {"role": "assistant", "content": None, "tool_calls": [_call("d")]},
                {"role": "tool", "tool_call_id": "d", "content": "r"},
                {"role": "assistant", "content": "again", "tool_calls": [_call("d")]},
                {"role": "assistant", "content": "done d"},
            ],
        ]
        for i, turn in enumerate(turns):
            await _store(memory, tenant, agent, conv, turn, f"r{i}")
        stored, listed = await _stored_and_listed(memory, redis, tenant, agent, conv)
        assert stored == listed
        assert _accepted_by_openai(listed), listed
        assert [m["content"] for m in listed if m["role"] == "tool"] == ["r1", "r"]  # kept where they pair

    _run(services, body)
