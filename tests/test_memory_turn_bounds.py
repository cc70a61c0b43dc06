"""What one turn may make memory do (found by the s31 review of the agent runtime): a tools loop
of more than ``MAX_APPEND`` messages stored nothing, not even the customer's message; a turn with
a large message was tokenized on the event loop (~0.5 s for 6 MB, every request in flight
waiting). Real Valkey and PostgreSQL."""

from __future__ import annotations

import threading
import uuid

from runtime import memory as memory_module
from runtime.memory import MAX_APPEND, Memory
from tests.test_memory import _agent, _rows_if, _run, _until


def _tool_steps(n: int) -> list[dict]:
    out: list[dict] = []
    for i in range(n):
        call = {"id": f"call_{i}", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
        out += [
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": f"result {i}"},
        ]
    return out


def test_a_tools_loop_longer_than_the_append_bound_keeps_the_customers_message_and_the_answer(services):
    async def body(memory: Memory, pool, redis):
        tenant, conv = f"t-{uuid.uuid4().hex[:8]}", "long-loop"
        agent = _agent(tenant, window_tokens=1_000_000)
        user = {"role": "user", "content": "find every order of mine"}
        answer = {"role": "assistant", "content": "Here are your 150 orders."}
        turn = [user, *_tool_steps(150), answer]  # 302 messages
        assert len(turn) > MAX_APPEND
        base = await memory.load(tenant, agent, conv)  # (as a turn does: the new window is stored beside)
        await memory.append(tenant, agent, conv, turn, request_id="req-long", prompt_version=1, variant=None, base=base)
        loaded = await memory.load(tenant, agent, conv)
        assert loaded[0] == user and loaded[-1] == answer
        assert len(loaded) <= MAX_APPEND
        answered = {m["tool_call_id"] for m in loaded if m["role"] == "tool"}
        called = {c["id"] for m in loaded for c in m.get("tool_calls") or ()}
        assert answered == called  # no stray result, no unanswered call
        rows = await _until(lambda: _rows_if(pool, tenant, agent.id, conv, len(loaded)), "messages in PostgreSQL")
        assert rows[0]["role"] == "user" and rows[-1]["role"] == "assistant"

    _run(services, body)


def test_a_large_turn_is_tokenized_off_the_event_loop(services, monkeypatch):
    counted_on: list[bool] = []
    real = memory_module.message_tokens

    def recording(message: dict) -> int:
        counted_on.append(threading.current_thread() is threading.main_thread())
        return real(message)

    monkeypatch.setattr(memory_module, "message_tokens", recording)

    async def body(memory: Memory, pool, redis):
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        agent = _agent(tenant, window_tokens=1_000_000)
        small = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
        await memory.append(tenant, agent, "small", small, request_id="r1", prompt_version=1, variant=None)
        assert counted_on == [True, True]  # (a small turn: on the loop, no thread hop)
        counted_on.clear()
        big = [{"role": "user", "content": "word " * 200_000}, {"role": "assistant", "content": "ok"}]
        await memory.append(tenant, agent, "big", big, request_id="r2", prompt_version=1, variant=None)
        assert counted_on == [False, False]
        loaded = await memory.load(tenant, agent, "big")
        assert loaded == big

    _run(services, body)
