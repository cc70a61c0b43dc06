"""A replica that serves agents loads the tokenizer (tiktoken's o200k_base: ~0.5 s of CPU) in a
thread when its agent registry learns of an agent, not on the event loop in the middle of its
first agent turn (every request in flight waited for it: a stream's first token came 3.9 s late
in the suite). Real embedded PostgreSQL and Valkey, the agent created over HTTP."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from core import tokens
from tests.test_agents_admin import AgentGateway, config, create
from tests.test_prompt_versions_memory import _close, _registry


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    g = AgentGateway(tmp_root, config(module_mock), services)
    yield g
    g.stop()


@pytest.fixture
def unloaded():
    """This process's tokenizer as a fresh replica's: not loaded, no warm-up started."""
    saved = tokens._loaded, tokens._warming
    tokens._loaded, tokens._warming = None, None
    yield
    if tokens._warming is not None:
        tokens._warming.join(30)
    if tokens._loaded is None:
        tokens._loaded = saved[0]


def test_a_registry_holding_an_agent_loads_the_tokenizer_off_the_event_loop(gw, services, unloaded):
    assert create(gw, name=f"warm-{uuid.uuid4().hex[:8]}", tenant=f"t-{uuid.uuid4().hex[:8]}").status_code == 201

    async def go() -> tuple[bool, str | None]:
        reg, pool, redis = await _registry(services)  # its reload: what start() reads
        try:
            thread = tokens._warming.name if tokens._warming is not None else None
            await asyncio.to_thread(tokens.wait_warm, 60)  # (what a start-up waits for)
            return tokens.loaded(), thread
        finally:
            await _close(reg, pool, redis)

    loaded, thread = asyncio.run(go())
    assert thread == "tokenizer-warm"
    assert loaded
    assert tokens.count_text("hello world") == 2


def test_a_count_during_the_warm_up_waits_for_it_and_loads_once(unloaded):
    tokens.warm()
    tokens.warm()  # (a second call starts no second thread)
    warming = tokens._warming
    assert tokens.count_text("hello world") == 2  # waits for the thread's load, or loads under its lock
    warming.join(30)
    assert tokens._warming is warming and tokens.loaded()
