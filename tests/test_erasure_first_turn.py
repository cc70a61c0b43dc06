"""A conversation no channel marks (an API client's) had no erasure mark: a turn that found it
empty in Redis (a first turn, or one after its window expired) and was answered while the
conversation was erased stored itself after the erasure, since no seq floor told it from a turn
after it. ``_LOAD`` now answers Redis's time when it holds nothing, and ``_APPEND`` holds such a
turn to the erasure's time (``:erased:at``, set by the erasure): one found empty before the
erasure stores nothing, one after it starts the conversation anew. No round trip is added: the
time comes with the load, the mark is read by the append. Real embedded PostgreSQL and Valkey."""

from __future__ import annotations

import uuid

import pytest

from runtime.memory import Erased, keys
from tests.test_memory import _agent, _run, _turn


def test_a_first_turn_found_empty_before_the_erasure_is_not_stored_after_it(services):
    async def body(memory, pool, redis):
        agent = _agent(tenant=f"t-{uuid.uuid4().hex[:6]}")
        conv = f"c-{uuid.uuid4().hex[:6]}"
        window_key, _ = keys(agent.tenant, agent.id, conv)
        loaded = await memory.load(agent.tenant, agent, conv)  # the turn begins: nothing stored
        assert loaded == [] and loaded.since is not None
        await memory.forget_recent(agent.tenant, agent.id, conv)  # erased while it is answered
        with pytest.raises(Erased):
            await memory.append(
                agent.tenant, agent, conv, _turn(0), request_id="r0", prompt_version=1, variant=None, base=loaded
            )
        assert await redis.lrange(window_key, 0, -1) == []
        again = await memory.load(agent.tenant, agent, conv)  # a turn begun after the erasure
        await memory.append(
            agent.tenant, agent, conv, _turn(1), request_id="r1", prompt_version=1, variant=None, base=again
        )
        assert len(await memory.load(agent.tenant, agent, conv)) == 2

    _run(services, body)
