"""Second review of the s31 agent-runtime changes (registry version catch-up, tools kept across
reloads): each test is an interleaving or an admin change that a replica served wrongly before
its fix."""

from __future__ import annotations

import openai
import orjson
import pytest

from tests.conftest import Gateway
from tests.test_agent_review_s31 import schema_tool


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    config = {
        "providers": [{"name": "pp", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k"]}],
        "models": [{"name": "agent-model", "deployments": [{"provider": "pp", "model": "m"}]}],
    }
    g = Gateway(tmp_root, config, services)
    yield g
    g.stop()


def test_a_reload_does_not_keep_a_tool_whose_schema_changed_from_true_to_1():
    """A full reload keeps an agent's parsed tools when its stored tools did not change, compared
    with Python's ``==``, for which ``true == 1``: an admin's change of ``{"const": true}`` to
    ``{"const": 1}`` (or ``"enum": [false, true]`` to ``[0, 1]``, a different schema) left every
    replica serving, and validating the model's arguments against, the old one."""
    from runtime.agents import agent_from_rows

    def row(value) -> dict:
        tool = schema_tool("flag", {"type": "object", "properties": {"on": {"const": value}}})
        return {
            "id": "agt_x",
            "tenant": "t",
            "name": "n",
            "model": "m",
            "description": "",
            "settings": {"tools": [tool]},
        }

    before = agent_from_rows(row(True), {}, {})
    after = agent_from_rows(row(1), {}, {}, before)
    const = after.tools[0].parameters["properties"]["on"]["const"]
    assert const == 1 and const is not True
    assert agent_from_rows(row(True), {}, {}, before).tools is before.tools  # unchanged: kept


def test_a_change_committed_but_never_announced_reaches_the_registry_after_a_catch_up(gw, services, monkeypatch):
    """A writer killed (or Redis failing) between its commit and ``announce`` leaves a change no
    replica heard of. Before the version catch-up, the next change by anyone moved the version
    and every replica's poll reloaded everything, the lost change with it; with the catch-up, one
    later change (its message, version + 1) set the registry's version equal to Redis's while the
    first agent stayed stale, for good. A catch-up now owes a full reload (CATCH_UP_RELOAD_S, 0
    here so the next poll does it)."""
    import asyncio

    import asyncpg
    import redis.asyncio as aioredis

    import runtime.agent_registry as registry_module
    import runtime.agents as agents
    from tests.test_agent_review_s31 import tenant_agent
    from tests.test_tools_review_s22 import call, new_key, unique

    monkeypatch.setattr(registry_module, "CATCH_UP_RELOAD_S", 0.0)
    tenant = unique("t")
    boss = new_key(gw, tenant, admin=True)
    first, second = tenant_agent(gw, boss, []), tenant_agent(gw, boss, [])

    async def run() -> str:
        pool = await asyncpg.create_pool(services[0], min_size=1, max_size=2)  # (migrated by gw)
        redis = aioredis.from_url(services[1])
        registry = registry_module.AgentRegistry(pool, redis)

        async def until(check) -> bool:
            for _ in range(400):
                if check():
                    return True
                await asyncio.sleep(0.025)
            return False

        try:
            await registry.start()
            assert await until(lambda: registry.get(tenant, second) is not None)
            synced = await redis.get(agents.VERSION_KEY)
            assert await until(lambda: registry._version == synced)
            # the writer of a change to `first`: committed, then killed before its announcement
            async with pool.acquire() as conn, conn.transaction():
                agent = await agents.load_agent(conn, registry.get(tenant, first).id)
                await agents.update_agent(conn, agent, None, "unannounced", agent.settings)
            # an ordinary change of another agent, announced (its message and version + 1)
            patched = await asyncio.to_thread(
                call, gw, "PATCH", f"/admin/agents/{second}", boss, json={"description": "announced"}
            )
            assert patched.status_code == 200, patched.text
            assert await until(lambda: registry.get(tenant, second).description == "announced")
            await until(lambda: registry.get(tenant, first).description == "unannounced")
            return registry.get(tenant, first).description
        finally:
            await registry.stop()
            await pool.close()
            await redis.aclose()

    assert asyncio.run(run()) == "unannounced"


def test_a_keyword_that_reads_the_whole_argument_is_charged_by_its_size(gw):
    """The turn's keyword budget charged ``enum``, ``const`` and ``pattern`` one unit an
    evaluation whatever they read: a tenant admin's 5 KB schema (44 subschemas) whose 13 levels of
    ``$defs`` each ``allOf`` two ``$ref`` to the next end in an ``enum`` of one 2,200-item array,
    and the model's arguments that array: 8,192 evaluations each walking 2,200 values, 11 s of a
    replica's event loop per turn (98,000 units); a ``pattern`` over a 60 KB string the same way
    7 s, ``const`` 3 s. Those keywords are charged the size of what they read now."""
    from tests.test_agent_review_s31 import ask, schema_tool, tenant_agent
    from tests.test_tools_review_s22 import new_key, unique

    def fan_out(leaf: dict) -> dict:
        depth = 13
        defs = {
            f"a{i}": {"allOf": [{"$ref": f"#/$defs/a{i + 1}"}, {"$ref": f"#/$defs/a{i + 1}"}]} for i in range(depth)
        }
        defs[f"a{depth}"] = leaf
        return {"type": "object", "properties": {"x": {"$ref": "#/$defs/a0"}}, "$defs": defs}

    zeros = [0] * 2200
    tenant = unique("t")
    boss = new_key(gw, tenant, admin=True)
    tools = [
        schema_tool("one_of", fan_out({"enum": [zeros]})),
        schema_tool("same", fan_out({"const": zeros})),
        schema_tool("digits", fan_out({"pattern": "^[0-9]*$"})),
    ]
    name = tenant_agent(gw, boss, tools)
    key = new_key(gw, tenant)
    for tool, value in (("one_of", zeros), ("same", zeros), ("digits", "0" * 60_000)):
        answer = ask(gw, key, name, [{"name": tool, "arguments": {"x": value}}])
        assert "too costly" in answer, (tool, answer[:200])


def test_the_validation_budget_is_one_per_request_not_one_per_step(gw, module_mock):
    """Each step of a turn got a whole validation budget, so a hostile schema's ~0.7 s of
    event-loop work a step came back up to ``max_steps`` (20) times a request: ~14 s. The steps
    of one request share one budget now: a call that spends most of it in step 1 leaves too
    little for the same call in step 2."""
    from tests.test_agent_review_s31 import tenant_agent
    from tests.test_tools_review_s22 import new_key, unique

    tenant = unique("t")
    boss = new_key(gw, tenant, admin=True)
    schema = {"type": "object", "properties": {"x": {"type": "array", "items": {"type": "integer"}}}}
    name = tenant_agent(gw, boss, [schema_tool("wide", schema)])
    call = {"name": "wide", "arguments": {"x": [0] * 20_000}}  # ~60 % of the budget: 20,002 values x 3
    directive = "[[mock:" + orjson.dumps({"tool_calls_steps": [[call], [call]]}).decode() + "]]"
    c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=new_key(gw, tenant), max_retries=0, timeout=60)
    module_mock.clear()
    c.chat.completions.create(model=f"agent:{name}", messages=[{"role": "user", "content": directive}])
    results = [
        str(m.get("content"))
        for r in module_mock.requests()
        for m in (r.get("body") or {}).get("messages") or []
        if m.get("role") == "tool"
    ]
    assert results and not any("too large" in r or "too costly" in r for r in results[:1]), results[:1]
    assert any("too large" in r or "too costly" in r for r in results), [r[:120] for r in results]
