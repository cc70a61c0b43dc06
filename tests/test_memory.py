"""Conversation memory: the window in Redis, the messages in PostgreSQL (real Valkey and PostgreSQL)."""

from __future__ import annotations

import asyncio
import random
import uuid

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from core.errors import InvalidRequest
from core.stream_writer import StreamWriter
from gateway.db import migrate
from runtime import conversations
from runtime.memory import (
    MEMORY_GROUP,
    MEMORY_STREAM,
    Memory,
    MemoryUnavailable,
    check_conversation_id,
    clean_message,
    keys,
    message_tokens,
    window,
)
from runtime.types import Agent, MemorySettings
from tests.conftest import free_port


def _agent(tenant: str = "acme", **memory) -> Agent:
    agent_id = f"agt_{uuid.uuid4().hex[:12]}"
    return Agent(id=agent_id, tenant=tenant, name="support", model="gpt-mock", memory=MemorySettings(**memory))


def _turn(i: int) -> list[dict]:
    return [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]


def _tool_turn(i: int) -> list[dict]:
    call = {"id": f"call_{i}", "type": "function", "function": {"name": "lookup", "arguments": '{"q": 1}'}}
    return [
        {"role": "user", "content": f"look up {i}"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": f"call_{i}", "content": "result " * 50},
        {"role": "assistant", "content": f"found {i}"},
    ]


def _entries(messages: list[dict]) -> list[tuple[int, dict]]:
    return [(message_tokens(m), m) for m in messages]


async def _until(check, what: str, within: float = 20.0):
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)


def _run(services, body):
    """Runs ``body(memory, pool, redis)`` against the real services, the memory writer started."""

    async def main():
        async with asyncpg.create_pool(services[0], min_size=1, max_size=4) as pool:
            async with pool.acquire() as conn:
                await migrate(conn)
            redis = aioredis.from_url(services[1])
            memory = Memory(pool, redis)
            await memory.start()
            try:
                await body(memory, pool, redis)
            finally:
                await memory.stop()
                await redis.aclose()

    asyncio.run(main())


async def _rows(pool, tenant: str, agent_id: str, external_id: str) -> list:
    return await pool.fetch(
        """SELECT m.seq, m.role, m.content, m.request_id, m.prompt_version, m.variant FROM messages m
           JOIN conversations c ON c.id = m.conversation_id
           WHERE c.tenant = $1 AND c.agent_id = $2 AND c.external_id = $3 ORDER BY m.seq""",
        tenant,
        agent_id,
        external_id,
    )


# --- the window (no I/O) ------------------------------------------------------------------------


def test_window_keeps_the_last_turns_by_count():
    messages = [m for i in range(5) for m in _turn(i)]
    got = window(_entries(messages), MemorySettings(window_turns=2, window_tokens=100_000))
    assert [m["content"] for m in got] == ["question 3", "answer 3", "question 4", "answer 4"]


def test_window_keeps_whole_turns_within_the_token_budget():
    messages = [m for i in range(5) for m in _turn(i)]
    per_turn = sum(message_tokens(m) for m in _turn(4))
    got = window(_entries(messages), MemorySettings(window_turns=20, window_tokens=2 * per_turn + per_turn // 2))
    assert [m["content"] for m in got] == ["question 3", "answer 3", "question 4", "answer 4"]
    # a budget smaller than the newest turn sends nothing rather than half a turn
    assert window(_entries(messages), MemorySettings(window_tokens=per_turn - 1)) == []


def test_window_never_separates_a_tool_call_from_its_result():
    messages = [*_turn(0), *_tool_turn(1), *_turn(2)]
    tool_turn = sum(message_tokens(m) for m in _tool_turn(1))
    last = sum(message_tokens(m) for m in _turn(2))
    # room for the last turn and most of the tool turn: the tool turn goes whole
    got = window(_entries(messages), MemorySettings(window_tokens=last + tool_turn - 5))
    assert [m["content"] for m in got] == ["question 2", "answer 2"]
    got = window(_entries(messages), MemorySettings(window_tokens=last + tool_turn))
    assert [m["role"] for m in got] == ["user", "assistant", "tool", "assistant", "user", "assistant"]
    # a list trimmed in the middle of a turn (the Redis cap) starts at the next user message
    got = window(_entries(messages[4:]), MemorySettings())
    assert got[0] == {"role": "user", "content": "question 2"}


def test_window_drops_tool_calls_left_unanswered_except_a_pending_client_call():
    pending = {"id": "call_x", "type": "function", "function": {"name": "client_tool", "arguments": "{}"}}
    abandoned = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [pending]}]
    orphan_tool = [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "nope", "content": "r"}]
    messages = [*abandoned, *orphan_tool, *abandoned]
    got = window(_entries(messages), MemorySettings())
    # the first abandoned call (followed by a user message) and the orphan tool result are gone;
    # the last one is a client call whose result the client is about to send
    assert got == [abandoned[0], orphan_tool[0], *abandoned]


def test_a_windows_known_counts_give_the_same_prompt_count_as_tokenizing_it_all():
    """An agent turn counts its prompt from the counts memory stored (no tokenizing of history):
    the total must equal counting the whole body, repaired tool turns and odd content included."""
    from core.tokens import count_prompt

    odd = [
        {"role": "user", "content": [{"type": "text", "text": "a picture, and ünïcode 🎉"}, {"type": "image_url"}]},
        {"role": "assistant", "content": "x" * 700},
    ]
    pending = {"id": "call_x", "type": "function", "function": {"name": "client_tool", "arguments": '{"a": [1, 2]}'}}
    abandoned = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok", "tool_calls": [pending]}]
    messages = [*_turn(0), *_tool_turn(1), *odd, *abandoned, *_turn(2), *abandoned]
    got = window(_entries(messages), MemorySettings())
    assert len(got.tokens) == len(got) == len(messages)
    assert "tool_calls" not in got[9] and "tool_calls" in got[-1]  # repaired: a copy, counted afresh
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = {"messages": [{"role": "system", "content": "be brief"}, *got, {"role": "user", "content": "new"}]}
    body["tools"] = tools
    assert count_prompt(body, got.known()) == count_prompt(body)
    # a count is tied to its message, not to a recycled id: a copy is counted afresh
    known = got.known()
    body["messages"] = [{**m, "content": "changed " * 40} if i == 3 else m for i, m in enumerate(body["messages"])]
    assert count_prompt(body, known) == count_prompt(body)


def test_the_newest_first_window_equals_the_whole_window_on_random_conversations():
    """``Memory.load`` decodes from the newest entry back and stops early (newest_window); it
    must send exactly what cutting the whole decoded list sends (window), tool turns, abandoned
    calls, unreadable entries and every budget included."""
    import random

    from runtime.memory_window import _decode, newest_window

    rng = random.Random(20261125)
    kinds = _random_kinds(rng)
    for case in range(400):
        messages = [m for i in range(rng.randint(0, 40)) for m in rng.choice(kinds)(i)]
        raw = [orjson.dumps({"s": i, "t": message_tokens(m), "m": m}) for i, m in enumerate(messages)]
        if raw and case % 7 == 0:
            raw.insert(rng.randrange(len(raw)), b"not json")
        settings = MemorySettings(window_turns=rng.randint(1, 25), window_tokens=rng.choice([50, 400, 4000, 100_000]))
        whole = window(_decode(raw), settings)
        fast = newest_window(raw, settings)
        assert fast == whole, case
        assert fast.tokens == whole.tokens, case


def test_conversation_id_is_bounded():
    assert check_conversation_id("c-1") == "c-1"
    for bad in ("", "x" * 257, 7, None, "a\x00b"):
        with pytest.raises(InvalidRequest) as err:
            check_conversation_id(bad)
        assert err.value.param == "metadata.conversation_id"


# --- Redis and PostgreSQL -----------------------------------------------------------------------


def test_three_turns_appended_and_loaded_back(services):
    async def body(memory: Memory, pool, redis):
        tenant, conv = f"t-{uuid.uuid4().hex[:8]}", "conv-three"
        agent = _agent(tenant)
        assert await memory.load(tenant, agent, conv) == []
        for i in range(3):
            assert len(await memory.load(tenant, agent, conv)) == 2 * i
            await memory.append(
                tenant,
                agent,
                conv,
                [{"role": "system", "content": "never stored"}, *_turn(i)],
                request_id=f"req-{i}",
                prompt_version=7,
                variant="7",
            )
        loaded = await memory.load(tenant, agent, conv)
        assert loaded == [m for i in range(3) for m in _turn(i)]
        rows = await _until(
            lambda: _rows_if(pool, tenant, agent.id, conv, 6), "messages in PostgreSQL"
        )  # written by the background writer
        assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5, 6]
        assert [orjson.loads(r["content"]) for r in rows] == loaded
        assert [r["request_id"] for r in rows] == ["req-0", "req-0", "req-1", "req-1", "req-2", "req-2"]
        assert {(r["prompt_version"], r["variant"]) for r in rows} == {(7, "7")}
        row = await memory.conversation(tenant, agent.id, conv)
        assert row["turns"] == 3 and row["id"].startswith("conv_") and row["status"] == "active"
        assert row["held_by_human"] is False and row["external_id"] == conv
        history = await memory.history(tenant, agent.id, conv, limit=4)
        assert [h["seq"] for h in history] == [3, 4, 5, 6] and history[-1]["message"] == _turn(2)[1]

    _run(services, body)


async def _rows_if(pool, tenant, agent_id, conv, n):
    rows = await _rows(pool, tenant, agent_id, conv)
    return rows if len(rows) >= n else None


def test_expired_window_is_reloaded_from_postgres(services):
    async def body(memory: Memory, pool, redis):
        tenant, conv = f"t-{uuid.uuid4().hex[:8]}", "conv-expired"
        agent = _agent(tenant)
        for i in range(3):
            await memory.append(tenant, agent, conv, _tool_turn(i), request_id=f"r{i}", prompt_version=1, variant=None)
        before = await memory.load(tenant, agent, conv)
        await _until(lambda: _rows_if(pool, tenant, agent.id, conv, 12), "messages in PostgreSQL")
        window_key, seq_key = keys(tenant, agent.id, conv)
        await redis.delete(window_key, seq_key)  # expired (or evicted)
        assert await memory.load(tenant, agent, conv) == before
        assert await redis.llen(window_key) == 12  # warmed again
        # the seq counter was restored too: the next turn does not reuse stored numbers
        await memory.append(tenant, agent, conv, _turn(9), request_id="r9", prompt_version=1, variant=None)
        rows = await _until(lambda: _rows_if(pool, tenant, agent.id, conv, 14), "the new turn in PostgreSQL")
        assert [r["seq"] for r in rows] == list(range(1, 15))
        assert (await memory.load(tenant, agent, conv))[-2:] == _turn(9)

    _run(services, body)


def test_replayed_batch_writes_each_message_once(services):
    async def body(memory: Memory, pool, redis):
        tenant, conv = f"t-{uuid.uuid4().hex[:8]}", "conv-replay"
        agent = _agent(tenant)
        record = {
            "tenant": tenant,
            "agent_id": agent.id,
            "external_id": conv,
            "request_id": "req-1",
            "prompt_version": 3,
            "variant": None,
            "ts": 1.7e9,
            "messages": [*_turn(1), {"role": "user", "content": "nul \x00 inside"}],
        }
        entries = [{b"r": orjson.dumps(record), b"s": b"1"}]
        for _ in range(3):  # the writer died after its commit, before its ack: the batch comes again
            async with pool.acquire() as conn, conn.transaction():
                await conversations.write_turns(conn, entries)
        rows = await _rows(pool, tenant, agent.id, conv)
        assert [r["seq"] for r in rows] == [1, 2, 3]
        assert orjson.loads(rows[2]["content"])["content"] == "nul \ufffd inside"
        assert (await memory.conversation(tenant, agent.id, conv))["turns"] == 2

    _run(services, body)


def test_entries_of_a_dead_writer_are_claimed_and_written_once(services):
    async def body(memory: Memory, pool, redis):
        tenant, conv = f"t-{uuid.uuid4().hex[:8]}", "conv-claim"
        agent = _agent(tenant)
        await memory.stop()  # this process's writer is away; a second one stands in below
        await memory.append(tenant, agent, conv, _turn(1), request_id="r1", prompt_version=1, variant=None)
        # a consumer reads the entry and dies (SIGKILL) before writing it
        await redis.xreadgroup(MEMORY_GROUP, "dead-consumer", {MEMORY_STREAM: ">"}, count=10_000)
        writer = StreamWriter(
            redis, pool, stream=MEMORY_STREAM, group=MEMORY_GROUP, write=conversations.write_turns, claim_idle=0.0
        )
        await writer.start()
        try:
            rows = await _until(lambda: _rows_if(pool, tenant, agent.id, conv, 2), "claimed entries written")
            assert [r["seq"] for r in rows] == [1, 2]
        finally:
            await writer.stop()
        pending = await redis.xpending(MEMORY_STREAM, MEMORY_GROUP)
        assert not any(c["name"] == b"dead-consumer" for c in pending.get("consumers") or [])

    _run(services, body)


def test_concurrent_appends_to_one_conversation_keep_distinct_seqs(services):
    async def body(memory: Memory, pool, redis):
        tenant, conv = f"t-{uuid.uuid4().hex[:8]}", "conv-race"
        agent = _agent(tenant, window_turns=100, window_tokens=100_000)
        second = Memory(pool, aioredis.from_url(services[1]))  # another replica, its own connection
        try:
            await asyncio.gather(
                *(
                    (memory if i % 2 else second).append(
                        tenant, agent, conv, _turn(i), request_id=f"r{i}", prompt_version=1, variant=None
                    )
                    for i in range(20)
                )
            )
        finally:
            await second._redis.aclose()
        loaded = await memory.load(tenant, agent, conv)
        assert len(loaded) == 40
        # each turn's messages stayed together, whichever order the turns landed in
        for user, answer in zip(loaded[::2], loaded[1::2], strict=True):
            assert user["content"].replace("question", "answer") == answer["content"]
        rows = await _until(lambda: _rows_if(pool, tenant, agent.id, conv, 40), "40 messages in PostgreSQL")
        assert [r["seq"] for r in rows] == list(range(1, 41))
        assert [orjson.loads(r["content"]) for r in rows] == loaded

    _run(services, body)


def test_memory_unavailable_when_redis_is_down(services):
    async def main():
        async with asyncpg.create_pool(services[0], min_size=1, max_size=2) as pool:
            redis = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
            memory = Memory(pool, redis)
            agent = _agent()
            try:
                with pytest.raises(MemoryUnavailable) as err:
                    await memory.load("acme", agent, "conv-down")
                assert err.value.reason.startswith("redis: ")
                with pytest.raises(MemoryUnavailable):
                    await memory.append(
                        "acme", agent, "conv-down", _turn(1), request_id="r", prompt_version=1, variant=None
                    )
            finally:
                await redis.aclose()

    asyncio.run(main())


def test_history_is_tenant_isolated(services):
    async def body(memory: Memory, pool, redis):
        mine, theirs = f"t-{uuid.uuid4().hex[:8]}", f"t-{uuid.uuid4().hex[:8]}"
        agent = _agent(mine)
        await memory.append(mine, agent, "shared-id", _turn(1), request_id="r1", prompt_version=1, variant=None)
        # the same agent id and conversation id under another tenant: a separate conversation
        await memory.append(theirs, agent, "shared-id", _turn(2), request_id="r2", prompt_version=1, variant=None)
        assert await memory.load(mine, agent, "shared-id") == _turn(1)
        assert await memory.load(theirs, agent, "shared-id") == _turn(2)
        await _until(lambda: _rows_if(pool, mine, agent.id, "shared-id", 2), "mine written")
        await _until(lambda: _rows_if(pool, theirs, agent.id, "shared-id", 2), "theirs written")
        assert [h["message"] for h in await memory.history(mine, agent.id, "shared-id")] == _turn(1)
        assert [h["message"] for h in await memory.history(theirs, agent.id, "shared-id")] == _turn(2)
        assert await memory.history(f"t-{uuid.uuid4().hex[:8]}", agent.id, "shared-id") == []
        assert await memory.conversation(f"t-{uuid.uuid4().hex[:8]}", agent.id, "shared-id") is None
        # the super-admin sees both
        assert len(await memory.history(None, agent.id, "shared-id")) == 4

    _run(services, body)


def test_a_record_postgres_refuses_goes_to_the_dead_letter_stream(services):
    async def body(memory: Memory, pool, redis):
        tenant, conv = f"t-{uuid.uuid4().hex[:8]}", "conv-poison"
        agent = _agent(tenant)
        poison = {"tenant": tenant, "agent_id": agent.id, "external_id": "conv-bad", "ts": "not a time", "messages": []}
        await redis.xadd(MEMORY_STREAM, {"r": orjson.dumps(poison), "s": "1"})
        await redis.xadd(MEMORY_STREAM, {"r": b"{not json", "s": "1"})
        await memory.append(tenant, agent, conv, _turn(1), request_id="r1", prompt_version=1, variant=None)
        # the good turn is not held back by the bad records around it
        rows = await _until(lambda: _rows_if(pool, tenant, agent.id, conv, 2), "the good turn written")
        assert [r["seq"] for r in rows] == [1, 2]

        async def dead():
            entries = await redis.xrange(f"{MEMORY_STREAM}:dead")
            return [e for _, e in entries if tenant.encode() in e[b"r"] or e[b"r"] == b"{not json"]

        assert len(await _until(dead, "the poison records dead-lettered")) >= 2

    _run(services, body)


# --- the stored window (``…:w``) -------------------------------------------------------------


def _random_kinds(rng):
    return [
        _turn,
        _tool_turn,
        lambda i: [
            {"role": "user", "content": f"q{i}"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": f"c{i}", "type": "function", "function": {"name": "client", "arguments": "{}"}}],
            },
        ],
        lambda i: [{"role": "tool", "tool_call_id": f"c{i - 1}", "content": "late result"}],
        lambda i: [{"role": "tool", "tool_call_id": f"orphan{i}", "content": "r"}],
        lambda i: [{"role": "assistant", "content": "a" * rng.randint(1, 900), "name": "human"}],
        lambda i: [{"role": "user", "content": "u " * rng.randint(1, 400)}],
    ]


def test_a_window_extended_turn_by_turn_equals_the_window_cut_from_the_whole_list():
    """What an append stores (``extended``: the loaded window plus the turn, cut again) must be
    what cutting the whole list would give, turn after turn — tool steps, a client call answered
    a turn later, orphan results, oversized turns and every budget included."""
    from runtime.memory_window import extended

    rng = random.Random(20261126)
    kinds = _random_kinds(rng)
    for case in range(300):
        settings = MemorySettings(window_turns=rng.randint(1, 12), window_tokens=rng.choice([60, 400, 4000, 100_000]))
        stored: list[dict] = []
        chained = window((), settings)
        for i in range(rng.randint(1, 30)):
            added = _entries(rng.choice(kinds)(i))
            stored += [m for _, m in added]
            whole = window(_entries(stored), settings)
            pending = bool(chained and chained[-1].get("tool_calls"))  # a client's call left open
            chained = extended(chained, added, settings)
            if chained is None:  # the turn joins the last one (or drops its call): the load cuts the list
                assert added[0][1]["role"] != "user" or pending
                chained = whole
                continue
            assert chained == whole, (case, i)
            assert chained.tokens == whole.tokens, (case, i)


def test_an_agent_turns_prompt_count_maps_its_stored_history_only_when_counted():
    """The stored history's counts are mapped when the prompt is counted (``RequestContext.known``):
    the count equals tokenizing the whole body, and a system prompt grounding changed (its count
    dropped from ``known_tokens``) is counted afresh."""
    from core.tokens import count_prompt, count_text
    from core.types import RequestContext

    got = window(_entries([*_turn(0), *_tool_turn(1), *_turn(2)]), MemorySettings())
    system = {"role": "system", "content": "be brief"}
    body = {"messages": [system, *got, {"role": "user", "content": "new"}]}
    ctx = RequestContext("r", "chat", body, 0.0)
    ctx.known_history = got
    ctx.known_tokens = {id(system): (system, count_text("be brief") + 3)}
    assert ctx.known() == {**got.known(), **ctx.known_tokens}
    assert ctx.prompt_tokens() == count_prompt(body)
    system["content"] += " and cite the sources below" * 20
    ctx.known_tokens.pop(id(system))
    ctx._prompt_tokens = None
    assert id(system) not in ctx.known()
    assert ctx.prompt_tokens() == count_prompt(body)


def test_the_stored_window_is_what_the_list_gives(services):
    async def body(memory: Memory, pool, redis):
        tenant, conv = f"t-{uuid.uuid4().hex[:8]}", "conv-stored"
        agent = _agent(tenant, window_turns=3)
        window_key, _ = keys(tenant, agent.id, conv)
        for i in range(5):
            base = await memory.load(tenant, agent, conv)
            turn = _tool_turn(i) if i % 2 else _turn(i)
            await memory.append(
                tenant, agent, conv, turn, request_id=f"r{i}", prompt_version=1, variant=None, base=base
            )
            assert await redis.exists(f"{window_key}:w"), i
        from_stored = await memory.load(tenant, agent, conv)
        assert orjson.loads(await redis.get(f"{window_key}:w"))["n"] == from_stored.seq
        await redis.delete(f"{window_key}:w")
        from_list = await memory.load(tenant, agent, conv)
        assert from_stored == from_list == [clean_message(m) for m in (*_turn(2), *_tool_turn(3), *_turn(4))]
        assert from_stored.tokens == from_list.tokens and from_stored.seq == from_list.seq == 14

    _run(services, body)


def test_a_turn_stored_since_the_window_was_read_is_never_lost(services):
    """Two replicas answer turns of one conversation from the same window at once: the second
    append must not store a window without the first one's turn; a person's reply (stored with
    no window) and a turn stored by a replica that read nothing drop the stored window too."""

    async def body(memory: Memory, pool, redis):
        tenant, conv = f"t-{uuid.uuid4().hex[:8]}", "conv-cas"
        agent = _agent(tenant)
        window_key, _ = keys(tenant, agent.id, conv)
        second = Memory(pool, aioredis.from_url(services[1]))
        try:
            await memory.append(tenant, agent, conv, _turn(0), request_id="r0", prompt_version=1, variant=None)
            base = await memory.load(tenant, agent, conv)
            base_again = await second.load(tenant, agent, conv)
            await memory.append(
                tenant, agent, conv, _turn(1), request_id="r1", prompt_version=1, variant=None, base=base
            )
            assert await redis.exists(f"{window_key}:w")
            await second.append(
                tenant, agent, conv, _turn(2), request_id="r2", prompt_version=1, variant=None, base=base_again
            )
            assert not await redis.exists(f"{window_key}:w")  # its window lacked turn 1
            assert await memory.load(tenant, agent, conv) == [*_turn(0), *_turn(1), *_turn(2)]

            base = await memory.load(tenant, agent, conv)
            await memory.append(
                tenant, agent, conv, _turn(3), request_id="r3", prompt_version=1, variant=None, base=base
            )
            assert await redis.exists(f"{window_key}:w")
            reply = {"role": "assistant", "content": "a person answers", "name": "human"}
            await second.append(tenant, agent, conv, [reply], request_id="h1", prompt_version=1, variant=None)
            assert not await redis.exists(f"{window_key}:w")
            assert (await memory.load(tenant, agent, conv))[-1] == reply

            # concurrent turns on one replica, all from the same window
            base = await memory.load(tenant, agent, conv)
            await asyncio.gather(
                *(
                    memory.append(
                        tenant, agent, conv, _turn(i), request_id=f"c{i}", prompt_version=1, variant=None, base=base
                    )
                    for i in range(10, 14)
                )
            )
            loaded = await memory.load(tenant, agent, conv)
            assert sorted(m["content"] for m in loaded[-8:]) == sorted(
                m["content"] for i in range(10, 14) for m in _turn(i)
            )
        finally:
            await second._redis.aclose()

    _run(services, body)


def test_a_stored_window_cut_for_other_settings_or_too_large_is_not_used(services):
    async def body(memory: Memory, pool, redis):
        tenant, conv = f"t-{uuid.uuid4().hex[:8]}", "conv-settings"
        agent = _agent(tenant, window_turns=10)
        window_key, _ = keys(tenant, agent.id, conv)
        for i in range(4):
            base = await memory.load(tenant, agent, conv)
            await memory.append(
                tenant, agent, conv, _turn(i), request_id=f"r{i}", prompt_version=1, variant=None, base=base
            )
        narrower = Agent(
            id=agent.id, tenant=tenant, name="support", model="gpt-mock", memory=MemorySettings(window_turns=2)
        )
        assert await memory.load(tenant, narrower, conv) == [*_turn(2), *_turn(3)]  # not the stored 4 turns
        # a window larger than MAX_WINDOW_BYTES is not stored; loads cut the list
        big = [{"role": "user", "content": "x" * 200_000}, {"role": "assistant", "content": "y" * 100_000}]
        wide = _agent(tenant, window_turns=10, window_tokens=1_000_000)
        base = await memory.load(tenant, wide, "conv-big")
        await memory.append(tenant, wide, "conv-big", big, request_id="b1", prompt_version=1, variant=None, base=base)
        big_key, _ = keys(tenant, wide.id, "conv-big")
        assert not await redis.exists(f"{big_key}:w")
        assert await memory.load(tenant, wide, "conv-big") == big
        # an unreadable stored window is read from the list
        await redis.set(f"{window_key}:w", b"{not json")
        assert await memory.load(tenant, agent, conv) == [m for i in range(4) for m in _turn(i)]

    _run(services, body)


def test_a_seq_counter_lost_never_hands_out_a_seq_twice(services):
    """Redis may evict the counter alone (maxmemory), or it expires after the list and a person
    replies to the conversation later: messages.seq is unique in PostgreSQL, so a seq handed out
    twice would drop the message there."""

    async def body(memory: Memory, pool, redis):
        tenant, conv = f"t-{uuid.uuid4().hex[:8]}", "conv-seq"
        agent = _agent(tenant)
        window_key, seq_key = keys(tenant, agent.id, conv)
        for i in range(2):
            base = await memory.load(tenant, agent, conv)
            await memory.append(
                tenant, agent, conv, _turn(i), request_id=f"r{i}", prompt_version=1, variant=None, base=base
            )
        await redis.delete(seq_key)  # the counter alone: the list's last seq is the floor
        base = await memory.load(tenant, agent, conv)
        await memory.append(tenant, agent, conv, _turn(2), request_id="r2", prompt_version=1, variant=None, base=base)
        await memory.flush()
        # (another process's writer may hold some of them: the suite's gateways share the stream)
        await _until(lambda: _rows_if(pool, tenant, agent.id, conv, 6), "six messages in PostgreSQL")
        await redis.delete(window_key, seq_key, f"{window_key}:w")  # both gone: PostgreSQL's last seq
        reply = {"role": "assistant", "content": "a person answers", "name": "human"}
        await memory.append(tenant, agent, conv, [reply], request_id="h1", prompt_version=1, variant=None)
        rows = await _until(lambda: _rows_if(pool, tenant, agent.id, conv, 7), "seven messages in PostgreSQL")
        assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
        assert [r["request_id"] for r in rows] == ["r0", "r0", "r1", "r1", "r2", "r2", "h1"]

    _run(services, body)


def test_a_start_whose_second_script_load_fails_closes_the_pipelined_connection(services):
    """``Memory.start`` loads its two scripts over the pipelined client it was given, then starts
    its writer; a failure after the first load left that connection open (a failed start-up then
    stops only the parts that started: ``gateway/started.py``). The client here is the real one,
    over the embedded Valkey; its second load fails."""
    from core.fastredis import PipelinedRedis

    async def main() -> None:
        async with asyncpg.create_pool(services[0], min_size=1, max_size=2) as pool:
            redis = aioredis.from_url(services[1])
            fast = PipelinedRedis(services[1])
            loads = 0
            real = fast.script_load

            async def script_load(source: str) -> str:
                nonlocal loads
                loads += 1
                if loads == 2:
                    raise ConnectionError("the second load fails")
                return await real(source)

            fast.script_load = script_load
            closed = []
            real_close = fast.close

            async def close() -> None:
                closed.append(True)
                await real_close()

            fast.close = close
            try:
                with pytest.raises(ConnectionError):
                    await Memory(pool, redis, fast=fast).start()
                assert closed == [True]
            finally:
                if not closed:
                    await real_close()
                await redis.aclose()

    asyncio.run(main())
