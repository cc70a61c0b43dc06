"""The stored windows a process holds decoded (``runtime.memory_held``): a load whose stored
window is still the one held decodes nothing, and anything that changes or drops the stored
window in Redis (another replica's turn, an erasure, a settings change) is seen (real Valkey and
PostgreSQL; both of ``Memory``'s Redis paths: redis-py and the pipelined client)."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from core.fastredis import PipelinedRedis
from gateway.db import migrate
from runtime import memory as memory_module
from runtime.memory import Erased, Memory, erasure_mark, keys, message_tokens
from runtime.memory_held import PER_MESSAGE, HeldWindows
from runtime.memory_window import Window, fingerprint, stored_window
from runtime.types import Agent, MemorySettings


def _agent(**memory) -> Agent:
    agent_id = f"agt_{uuid.uuid4().hex[:12]}"
    return Agent(id=agent_id, tenant="acme", name="support", model="gpt-mock", memory=MemorySettings(**memory))


def _turn(i: int) -> list[dict]:
    return [{"role": "user", "content": f"question {i} é"}, {"role": "assistant", "content": f"answer {i}"}]


def _tool_turn(i: int) -> list[dict]:
    call = {"id": f"call_{i}", "type": "function", "function": {"name": "lookup", "arguments": '{"q": 1}'}}
    return [
        {"role": "user", "content": f"look up {i}"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": f"call_{i}", "content": "result"},
        {"role": "assistant", "content": f"found {i}"},
    ]


class _Decodes:
    """Counts ``stored_window`` calls (the decode a held window spares)."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        real = memory_module.stored_window

        def spy(raw, settings):
            self.calls += 1
            return real(raw, settings)

        monkeypatch.setattr(memory_module, "stored_window", spy)


def _run(services, body, *, fast: bool, replicas: int = 2):
    """``body(memories, pool, redis)``: ``replicas`` Memory objects on the same Redis and
    PostgreSQL (replicas of the gateway), each over the pipelined client when ``fast``."""

    async def main():
        async with asyncpg.create_pool(services[0], min_size=1, max_size=4) as pool:
            async with pool.acquire() as conn:
                await migrate(conn)
            redis = aioredis.from_url(services[1])
            memories = []
            for _ in range(replicas):
                m = Memory(pool, redis, fast=PipelinedRedis(services[1]) if fast else None)
                await m.start()
                memories.append(m)
            try:
                await body(memories, pool, redis)
            finally:
                for m in memories:
                    await m.stop()
                await redis.aclose()

    asyncio.run(main())


async def _store(memory: Memory, agent: Agent, conv: str, messages: list[dict]) -> Window:
    base = await memory.load(agent.tenant, agent, conv)
    await memory.append(
        agent.tenant, agent, conv, messages, request_id=uuid.uuid4().hex, prompt_version=1, variant=None, base=base
    )
    return base


@pytest.mark.parametrize("fast", [False, True])
def test_a_window_this_process_stored_is_loaded_without_a_decode(services, monkeypatch, fast):
    """Turn after turn of one conversation on one replica: each load is the window a fresh
    replica (nothing held) reads, messages, counts and seq, and none decodes the stored window."""
    decodes = _Decodes(monkeypatch)

    async def body(memories, pool, redis):
        mine, fresh = memories
        agent = _agent(window_turns=3)
        conv = f"c-{uuid.uuid4().hex}"
        for i in range(6):
            await _store(mine, agent, conv, _tool_turn(i) if i % 2 else _turn(i))
        hits, calls = mine.held.hits, decodes.calls
        got = await mine.load(agent.tenant, agent, conv)
        assert (mine.held.hits, decodes.calls) == (hits + 1, calls)  # held: no decode
        want = await fresh.load(agent.tenant, agent, conv)
        assert decodes.calls == calls + 1 and fresh.held.hits == 0  # (the fresh one decoded it)
        assert list(got) == list(want) and got.tokens == want.tokens and got.seq == want.seq
        assert got.tokens == [message_tokens(m) for m in got]
        # the stored value is the one the old encoding gives (joined from the messages' JSON)
        raw = await redis.get(f"{keys(agent.tenant, agent.id, conv)[0]}:w")
        entry = raw.split(b'"x":"', 1)[1].split(b'"', 1)[0]  # (the storing turn's stream entry id)
        expected = b'{"n":%d,"x":"%s","c":"%s","t":%s,"m":%s}' % (
            want.seq,
            entry,
            fingerprint(agent.memory).encode(),
            orjson.dumps(want.tokens),
            orjson.dumps(list(want)),
        )
        assert raw == expected

    _run(services, body, fast=fast)


def test_a_held_window_is_handed_out_as_a_copy(services):
    """A caller changing the list it was given (or its counts) changes nothing held."""

    async def body(memories, pool, redis):
        mine = memories[0]
        agent = _agent()
        conv = f"c-{uuid.uuid4().hex}"
        await _store(mine, agent, conv, _turn(1))
        await _store(mine, agent, conv, _turn(2))
        hits = mine.held.hits
        got = await mine.load(agent.tenant, agent, conv)
        kept = list(got), list(got.tokens)
        got.append({"role": "user", "content": "injected"})
        got.tokens.append(7)
        got.pop(0)
        again = await mine.load(agent.tenant, agent, conv)
        assert (list(again), again.tokens) == kept
        assert mine.held.hits == hits + 2

    _run(services, body, fast=True, replicas=1)


@pytest.mark.parametrize("fast", [False, True])
def test_another_replicas_turn_is_seen_not_the_held_window(services, monkeypatch, fast):
    decodes = _Decodes(monkeypatch)

    async def body(memories, pool, redis):
        a, b = memories
        agent = _agent()
        conv = f"c-{uuid.uuid4().hex}"
        await _store(a, agent, conv, _turn(1))
        await _store(b, agent, conv, _turn(2))  # b stores the next turn (a still holds turn 1's window)
        hits, calls = a.held.hits, decodes.calls
        got = await a.load(agent.tenant, agent, conv)
        assert a.held.hits == hits and decodes.calls == calls + 1
        assert [m["content"] for m in got] == [m["content"] for m in _turn(1) + _turn(2)]
        # a now holds what it read: its next load is a hit, and its next turn stores after b's
        assert [m["content"] for m in await a.load(agent.tenant, agent, conv)] == [m["content"] for m in got]
        assert a.held.hits == hits + 1
        await _store(a, agent, conv, _turn(3))
        got = await b.load(agent.tenant, agent, conv)
        assert [m["content"] for m in got][-2:] == ["question 3 é", "answer 3"] and len(got) == 6

    _run(services, body, fast=fast)


@pytest.mark.parametrize("fast", [False, True])
def test_an_erasure_by_any_replica_drops_the_held_window(services, fast):
    async def body(memories, pool, redis):
        a, b = memories
        agent = _agent()
        for eraser in (a, b):
            conv = f"c-{uuid.uuid4().hex}"
            await _store(a, agent, conv, _turn(1))
            await _store(a, agent, conv, _turn(2))
            await a.writer.drain()
            hits = a.held.hits
            await eraser.forget_recent(agent.tenant, agent.id, conv)
            await pool.execute(  # (the conversations API erases PostgreSQL's copy too)
                "DELETE FROM conversations WHERE tenant = $1 AND agent_id = $2 AND external_id = $3",
                agent.tenant,
                agent.id,
                conv,
            )
            got = await a.load(agent.tenant, agent, conv)
            assert list(got) == [] and a.held.hits == hits, eraser is a

    _run(services, body, fast=fast)


def test_the_erasure_mark_is_read_on_a_held_window_too(services):
    """A channel's turn queued before its conversation's erasure is refused (``Erased``) whether
    or not the process holds the window."""

    async def body(memories, pool, redis):
        a = memories[0]
        agent = _agent()
        conv = f"c-{uuid.uuid4().hex}"
        await _store(a, agent, conv, _turn(1))
        await _store(a, agent, conv, _turn(2))
        mark = erasure_mark(agent.tenant, agent.id, conv)
        sec, usec = await redis.time()
        queued = sec * 1_000_000 + usec
        assert len(await a.load(agent.tenant, agent, conv, erased=(mark, queued))) == 4  # (held: a hit)
        hits = a.held.hits
        await redis.set(mark, f"{sec}.{usec + 1:06d}" if usec < 999_999 else f"{sec + 1}.000000")
        with pytest.raises(Erased):
            await a.load(agent.tenant, agent, conv, erased=(mark, queued))
        assert a.held.hits == hits

    _run(services, body, fast=True, replicas=1)


def test_a_window_held_for_other_settings_is_not_used(services, monkeypatch):
    decodes = _Decodes(monkeypatch)

    async def body(memories, pool, redis):
        a = memories[0]
        agent = _agent(window_turns=5)
        conv = f"c-{uuid.uuid4().hex}"
        for i in range(4):
            await _store(a, agent, conv, _turn(i))
        changed = Agent(id=agent.id, tenant=agent.tenant, name="support", model="gpt-mock",
                        memory=MemorySettings(window_turns=2))  # fmt: skip
        hits, calls = a.held.hits, decodes.calls
        got = await a.load(changed.tenant, changed, conv)
        assert a.held.hits == hits and len(got) == 4  # the last two turns, cut from the list
        assert decodes.calls == calls + 1  # (the stored window was read, and found cut for other settings)

    _run(services, body, fast=True, replicas=1)


def test_a_stored_window_of_the_previous_release_loads_and_is_not_held(services, monkeypatch):
    """The stored window a replica of the previous release wrote (its encoding, its script's
    ``n``, no ``x``) loads as before, is not held (its ``n`` alone cannot tell it apart from a
    window stored under the same seq later), and the next turn is stored after it (held then)."""
    decodes = _Decodes(monkeypatch)

    async def body(memories, pool, redis):
        a, old = memories
        agent = _agent()
        conv = f"c-{uuid.uuid4().hex}"
        await _store(old, agent, conv, _turn(1))
        window_key = keys(agent.tenant, agent.id, conv)[0]
        base = await old.load(agent.tenant, agent, conv)
        # the previous release's append stores turn 2 and its window, encoded whole
        await old.append(agent.tenant, agent, conv, _turn(2), request_id="r", prompt_version=1, variant=None)
        messages = [*base, *_turn(2)]
        tokens = [*base.tokens, *(message_tokens(m) for m in _turn(2))]
        body_ = b'{"n":%d,"c":"%s","t":%s,"m":%s}' % (
            base.seq + 2,
            fingerprint(agent.memory).encode(),
            orjson.dumps(tokens),
            orjson.dumps(messages),
        )
        await redis.set(f"{window_key}:w", body_)
        calls = decodes.calls
        got = await a.load(agent.tenant, agent, conv)
        assert decodes.calls == calls + 1 and list(got) == messages and got.tokens == tokens
        again = await a.load(agent.tenant, agent, conv)
        assert decodes.calls == calls + 2 and list(again) == messages and a.held.hits == 0
        await a.append(agent.tenant, agent, conv, _turn(3), request_id="r3", prompt_version=1, variant=None, base=again)
        stored = stored_window(await redis.get(f"{window_key}:w"), agent.memory)
        assert list(stored) == [*messages, *_turn(3)] and stored.seq == base.seq + 4
        assert list(await a.load(agent.tenant, agent, conv)) == list(stored) and a.held.hits == 1

    _run(services, body, fast=True)


def test_the_held_windows_are_bounded_by_entries_and_bytes():
    settings = MemorySettings()
    w = Window([{"role": "user", "content": "x"}])
    w.tokens = [2]
    one = 10 + PER_MESSAGE  # (a window of one message whose JSON is 10 bytes counts this much)
    held = HeldWindows(max_entries=3, max_bytes=3 * one)
    for i in range(5):
        held.put(f"k{i}", i + 1, f"{i + 1}/1-0", fingerprint(settings), w, 10)
    assert len(held) == 3 and held.get("k0", fingerprint(settings)) is None
    held.put("big", 1, "1/1-0", fingerprint(settings), w, 2 * one + 1 - PER_MESSAGE)
    assert len(held) == 1 and held.get("big", fingerprint(settings)) is not None
    held.put("huge", 1, "1/1-0", fingerprint(settings), w, 3 * one + 1 - PER_MESSAGE)  # over the whole bound: not held
    assert held.get("huge", fingerprint(settings)) is None
    assert held.get("big", "other") is None  # cut for other settings


def test_what_a_stored_window_carries_is_what_its_messages_say():
    """``Window.starts``, ``last_tools``, ``joined`` and ``sizes`` (carried from turn to turn so the next window
    is neither scanned nor encoded again) are what the messages give when worked out afresh,
    and the stored value is the one encoding the whole window gives."""
    import random

    from runtime.memory_window import _has_tools, next_stored

    rng = random.Random(20261128)
    for case in range(60):
        settings = MemorySettings(window_turns=rng.randint(1, 8), window_tokens=rng.choice([60, 400, 100_000]))
        base = Window()
        base.tokens, base.seq = [], 1
        for i in range(rng.randint(1, 25)):
            added = [(message_tokens(m), m) for m in (_tool_turn(i) if rng.random() < 0.3 else _turn(i))]
            encoded = [orjson.dumps(m) for _, m in added]
            (seq, body), new = next_stored(base, added, encoded, settings)
            assert new is not None and seq == base.seq
            assert body == b'"c":"%s","t":%s,"m":%s}' % (
                fingerprint(settings).encode(),
                orjson.dumps(new.tokens),
                orjson.dumps(list(new)),
            )
            if new.joined is not None:
                assert new.joined == b",".join(orjson.dumps(m) for m in new), (case, i)
                assert new.sizes == [len(orjson.dumps(m)) for m in new], (case, i)
            if new.starts is not None:
                starts = [j for j, m in enumerate(new) if m.get("role") == "user"]
                assert new.starts == starts, (case, i)
                assert new.last_tools == (bool(starts) and any(_has_tools(m) for m in new[starts[-1] :])), (case, i)
            new.seq = base.seq + len(added)
            base = new


def test_the_stream_record_is_the_turn_encoded_whole(services):
    """The record ``append`` queues for PostgreSQL (joined from its messages' JSON) is what
    encoding the turn whole gives, its messages last (``dead_tag`` reads what precedes them)."""
    from runtime.memory import MEMORY_STREAM, clean_message, dead_tag

    async def body(memories, pool, redis):
        a = memories[0]
        agent = _agent()
        conv = f"c-{uuid.uuid4().hex}"
        turn = [*_tool_turn(1), {"role": "assistant", "content": 'ünïcode \u2028 "quoted"\n'}]
        await a.append(agent.tenant, agent, conv, turn, request_id="req-1", prompt_version=3, variant="b")
        entries = await redis.xrevrange(MEMORY_STREAM, count=20)
        raw = next(f[b"r"] for _, f in entries if orjson.loads(f[b"r"])["external_id"] == conv)
        record = orjson.loads(raw)
        assert list(record) == [
            "tenant", "agent_id", "external_id", "request_id", "prompt_version", "variant", "ts", "messages",
        ]  # fmt: skip
        assert record["messages"] == [clean_message(m) for m in turn]
        assert (record["request_id"], record["variant"]) == ("req-1", "b")
        assert raw == orjson.dumps(record)
        cut = raw[: raw.index(b',"messages":') + 20]  # (a dead letter kept cut)
        assert dead_tag({b"r": cut}) == dead_tag({b"r": raw}) is not None

    _run(services, body, fast=True, replicas=1)


@pytest.mark.parametrize("fast", [False, True])
def test_a_held_window_of_an_erased_conversation_is_not_served_when_its_seqs_start_again(services, fast):
    """Attack (a recycled number, a customer who asked for erasure and writes again): replica a
    holds a conversation's window (n=4); b erases it; the seq counter and the erasure's keys
    expire (or are evicted) before the next turn, PostgreSQL holds nothing, so the conversation's
    seqs start again at 1 and b's second turn stores a window with n=4 again. a's next load must
    be that new window, never the erased one a held under the same n."""

    async def body(memories, pool, redis):
        a, b = memories
        agent = _agent()
        conv = f"c-{uuid.uuid4().hex}"
        erased = [{"role": "user", "content": "my card is 4111"}, {"role": "assistant", "content": "noted"}]
        await _store(a, agent, conv, erased)
        await _store(a, agent, conv, _turn(2))
        await a.writer.drain()
        await b.forget_recent(agent.tenant, agent.id, conv)
        await pool.execute(  # (the conversations API erases PostgreSQL's copy too)
            "DELETE FROM conversations WHERE tenant = $1 AND agent_id = $2 AND external_id = $3",
            agent.tenant,
            agent.id,
            conv,
        )
        window_key, seq_key = keys(agent.tenant, agent.id, conv)
        # what their TTLs do in time (the counter: ttl_s + a day after the last turn), or eviction
        await redis.delete(seq_key, f"{window_key}:erased", f"{window_key}:erased:seq", f"{window_key}:erased:at")
        await _store(b, agent, conv, _turn(7))
        await _store(b, agent, conv, _turn(8))
        raw = await redis.get(f"{window_key}:w")
        assert raw is not None and raw.startswith(b'{"n":4,')  # (the same n a holds)
        got = await a.load(agent.tenant, agent, conv)
        assert [m["content"] for m in got] == [m["content"] for m in _turn(7) + _turn(8)]

    _run(services, body, fast=fast)


def test_many_small_messages_held_cost_no_more_memory_than_the_bound_counts(services):
    """Attack (memory): turns of many tiny messages (a client sends a user message then hundreds
    of short ones), in as many conversations as the held windows' bound allows. What a held window
    costs the process (its decoded messages and the JSON kept to join the next window) must be
    within what ``HeldWindows`` counts against its byte bound, or the bound holds nothing back:
    a message's JSON kept as ``orjson.dumps`` made it holds a buffer of about 4 KB, whatever its
    length (30 bytes counted)."""
    import gc
    import tracemalloc

    def turn(i: int) -> list[dict]:
        return [{"role": "user", "content": f"q{i}"}, *({"role": "assistant", "content": "a"} for _ in range(150))]

    async def body(memories, pool, redis):
        a = memories[0]
        agent = _agent(window_turns=4, window_tokens=100_000)
        conv = f"c-{uuid.uuid4().hex}"
        tracemalloc.start()
        try:
            for i in range(3):
                await _store(a, agent, conv, turn(i))
            window_key = keys(agent.tenant, agent.id, conv)[0]
            assert len(a.held) == 1 and a.held.get(window_key, fingerprint(agent.memory)) is not None
            counted = a.held._bytes
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            a.held.drop(window_key)
            gc.collect()
            freed = before - tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        assert freed > 0
        assert freed <= counted, (freed, counted)

    _run(services, body, fast=True, replicas=1)
