"""Review of the agent runtime as an attacker (a tenant admin, a client, a model steered by a
prompt injection): each test is a hostile input that worked before its fix, run against a real
gateway process over HTTP with the OpenAI SDK, the mock provider (whose directives make the model
call tools) and the real tool / MCP server of loadtest/mock_tools."""

from __future__ import annotations

import openai
import orjson
import pytest

from tests.conftest import LOCAL_HTTP, Gateway
from tests.test_tools_review_s22 import ToolServer, call, new_key, unique


@pytest.fixture(scope="module")
def tools(tmp_root):
    server = ToolServer(tmp_root)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    config = {
        "router": {"max_attempts": 1},
        "providers": [{"name": "pp", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k"]}],
        "models": [{"name": "agent-model", "deployments": [{"provider": "pp", "model": "m"}]}],
    }
    g = Gateway(tmp_root, config, services)
    yield g
    g.stop()


def tenant_agent(gw, key: str, tools: list[dict]) -> str:
    """An agent created by a tenant admin (``key``) with ``tools``."""
    name = unique("rv")
    body = {"name": name, "model": "agent-model", "template": "You help.", "tools": tools}
    resp = call(gw, "POST", "/admin/agents", key, json=body)
    assert resp.status_code == 201, resp.text
    return name


def ask(gw, key: str, name: str, calls: list[dict]) -> str:
    directive = "[[mock:" + orjson.dumps({"tool_calls": calls}).decode() + "]]"
    c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=30)
    answer = c.chat.completions.create(model=f"agent:{name}", messages=[{"role": "user", "content": directive}])
    return answer.choices[0].message.content or ""


def schema_tool(name: str, parameters: dict) -> dict:
    # validation comes before any connection: the address is never reached
    config = {"url": "https://tools.invalid/x", "allowed_hosts": ["tools.invalid"], "method": "POST"}
    return {"name": name, "kind": "http", "description": "a tool", "parameters": parameters, "config": config}


# ---- tool argument validation --------------------------------------------------------------------


def test_ref_fan_out_in_a_tool_schema_cannot_stall_a_replica(gw):
    """A tenant admin's tool schema of 40 ``$defs`` (3 KB), each ``allOf`` two ``$ref`` to the
    next: validating the arguments ``{}`` evaluates the last one 2**40 times, on the event loop
    of a replica every tenant shares. The per-turn budget counted values times the schema's
    size (here 1 x 120), not what ``$ref`` makes jsonschema evaluate; what is evaluated is
    counted now."""
    tenant = unique("t")
    boss = new_key(gw, tenant, admin=True)
    depth = 40
    defs = {f"a{i}": {"allOf": [{"$ref": f"#/$defs/a{i + 1}"}, {"$ref": f"#/$defs/a{i + 1}"}]} for i in range(depth)}
    defs[f"a{depth}"] = {"type": "object"}
    name = tenant_agent(gw, boss, [schema_tool("fan", {"type": "object", "$ref": "#/$defs/a0", "$defs": defs})])
    answer = ask(gw, new_key(gw, tenant), name, [{"name": "fan", "arguments": {}}])
    assert "too costly" in answer
    assert LOCAL_HTTP.get(f"{gw.url}/healthz").status_code == 200


def test_a_recursive_tool_schema_cannot_double_its_work_at_every_level_of_the_arguments(gw):
    """The same through the arguments: a recursive schema whose every level refers twice to
    itself, and 30 levels of ``{"a": {"a": ...}}`` from the model (30 values, well inside the
    budget of values times subschemas), is 2**30 evaluations. A legitimately recursive schema
    (a tree) still validates."""
    tenant = unique("t")
    boss = new_key(gw, tenant, admin=True)
    node = {"type": "object", "properties": {"a": {"allOf": [{"$ref": "#/$defs/n"}, {"$ref": "#/$defs/n"}]}}}
    tree = {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}}}
    name = tenant_agent(
        gw,
        boss,
        [
            schema_tool("nest", {"type": "object", "$ref": "#/$defs/n", "$defs": {"n": node}}),
            schema_tool("tree", tree),
        ],
    )
    key = new_key(gw, tenant)
    deep: dict = {}
    for _ in range(30):
        deep = {"a": deep}
    assert "too costly" in ask(gw, key, name, [{"name": "nest", "arguments": deep}])
    small = {"kids": [{"kids": []}, {"kids": [{"kids": "no"}]}]}
    answer = ask(gw, key, name, [{"name": "tree", "arguments": small}])
    assert "invalid arguments: argument 'kids.1.kids.0.kids'" in answer


# ---- MCP -----------------------------------------------------------------------------------------


def mcp_tool(url: str) -> dict:
    return {
        "name": "add",
        "description": "Add two numbers.",
        "kind": "mcp",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}},
        "config": {"url": url, "tool": "add", "allow_private_networks": True},
    }


def test_an_mcp_server_cannot_flood_the_event_loop_with_tiny_events(gw, tools):
    """An MCP server (an admin's choice, or one taken over) answered with 100,000 ``data: 1``
    events before its response: each was split and parsed on the event loop (4 MB of them are
    466,000 events, ~1.2 s of a replica's loop per call, 32 calls a step). Past MAX_EVENTS the
    answer is refused; a server's few notifications still pass."""
    tenant = unique("t")
    name = unique("rv")
    body = {"name": name, "model": "agent-model", "template": "You help.", "tenant": tenant}
    body["tools"] = [mcp_tool(f"{tools.url}/mcp?sse=1&flood=100000")]
    assert call(gw, "POST", "/admin/agents", json=body).status_code == 201
    key = new_key(gw, tenant)
    answer = ask(gw, key, name, [{"name": "add", "arguments": {"a": 40, "b": 2}}])
    assert "too many events" in answer and "42" not in answer
    fine = {**body, "name": unique("rv"), "tools": [mcp_tool(f"{tools.url}/mcp?sse=1&flood=50")]}
    assert call(gw, "POST", "/admin/agents", json=fine).status_code == 201
    assert "42" in ask(gw, key, fine["name"], [{"name": "add", "arguments": {"a": 40, "b": 2}}])


# ---- client input --------------------------------------------------------------------------------


def test_a_client_tool_named_by_a_list_is_not_a_server_error(gw):
    """Only tools of type "function" are checked when a request is parsed; the agent stage read
    every tool's ``function.name`` into a set, and a list there (``{"type": "custom",
    "function": {"name": ["x"]}}``) raised TypeError: a 500 and a stack trace in the log."""
    tenant = unique("t")
    name = tenant_agent(gw, new_key(gw, tenant, admin=True), [schema_tool("look", {"type": "object"})])
    body = {
        "model": f"agent:{name}",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "custom", "function": {"name": ["x"]}}],
    }
    resp = call(gw, "POST", "/v1/chat/completions", new_key(gw, tenant), json=body)
    assert resp.status_code < 500, resp.text  # (what the provider makes of it, as for any model)
    assert resp.status_code == 200 or resp.json()["error"]["type"] == "invalid_request_error"


# ---- tool schemas at save and at load ------------------------------------------------------------


def test_a_tool_schema_of_thousands_of_subschemas_is_refused_at_save(gw):
    """Checking a schema against the 2020-12 metaschema costs ~0.35 ms a subschema on the event
    loop: a tenant admin's 30 KB ``allOf`` of 10,000 ``{}`` held it 3.7 s, eight such tools in
    one 256 KB body 29 s — at the save, again when the saved agent was read back, and in every
    replica at each reload. A schema is bounded in subschemas now, an agent's tools together
    too (400 naming the field, nothing stored)."""
    tenant = unique("t")
    boss = new_key(gw, tenant, admin=True)
    wide = schema_tool("wide", {"type": "object", "allOf": [{} for _ in range(5000)]})
    body = {"name": unique("rv"), "model": "agent-model", "template": "You help.", "tools": [wide]}
    resp = call(gw, "POST", "/admin/agents", boss, json=body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "tools[0].parameters"
    # under the bound one by one, over it together
    part = {"type": "object", "allOf": [{} for _ in range(800)]}
    body["tools"] = [schema_tool(f"t{i}", part) for i in range(3)]
    resp = call(gw, "POST", "/admin/agents", boss, json=body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "tools[2].parameters"
    assert call(gw, "GET", f"/admin/agents/{body['name']}", boss).status_code == 404
    body["tools"] = body["tools"][:2]
    assert call(gw, "POST", "/admin/agents", boss, json=body).status_code == 201


def test_loading_a_saved_agent_does_not_check_its_tool_schemas_again(monkeypatch):
    """Every replica reloads every agent when any agent changes (and at start): each load ran
    the metaschema check of every tool schema of every tenant again, seconds of the event loop
    per large agent. A schema is checked when saved; a load keeps the cheap checks only."""
    from jsonschema import Draft202012Validator

    from runtime.agents import agent_from_rows

    checked = []
    monkeypatch.setattr(Draft202012Validator, "check_schema", classmethod(lambda cls, s, **kw: checked.append(s)))
    tool = schema_tool("look", {"type": "object", "properties": {"q": {"type": "string"}}})
    row = {"id": "agt_x", "tenant": "t", "name": "n", "model": "m", "description": "", "settings": {"tools": [tool]}}
    agent = agent_from_rows(row, {}, {})
    assert [t.name for t in agent.tools] == ["look"]
    assert checked == []


class CountingRedis:
    """The registry's Redis, counting its reads of the agents' version (the poll's, once a second)."""

    def __init__(self, redis) -> None:
        self._redis = redis
        self.version_reads = 0

    def __getattr__(self, name: str):
        return getattr(self._redis, name)

    async def get(self, key):
        from runtime.agents import VERSION_KEY

        if key == VERSION_KEY:
            self.version_reads += 1
        return await self._redis.get(key)


def test_one_agent_change_does_not_make_every_replica_reload_every_agent(gw, services):
    """A change reloaded the changed agent (its pub/sub message) but left the registry's version
    behind, so the next poll (within a second) read every agent of every tenant again, on the
    event loop (3.4 ms an agent of 64 tools: 17 s for a tenant admin's 5,000): any PATCH, by any
    tenant, cost every replica a full reload. A single change now catches the version up."""
    import asyncio

    import asyncpg
    import redis.asyncio as aioredis

    from runtime.agent_registry import AgentRegistry

    tenant = unique("t")
    boss = new_key(gw, tenant, admin=True)
    name = tenant_agent(gw, boss, [])

    async def run() -> tuple[int, int]:
        pool = await asyncpg.create_pool(services[0], min_size=1, max_size=2)  # (migrated by gw)
        redis = CountingRedis(aioredis.from_url(services[1]))
        registry = AgentRegistry(pool, redis)
        full = [0]
        whole = registry.reload

        async def counted() -> None:
            full[0] += 1
            await whole()

        registry.reload = counted

        async def until(check) -> None:
            for _ in range(400):
                if check():
                    return
                await asyncio.sleep(0.025)
            raise AssertionError("the registry never got there")

        try:
            await registry.start()
            await until(lambda: full[0] >= 2)  # at start, and once subscribed
            reads = redis.version_reads
            await until(lambda: redis.version_reads >= reads + 2)  # a poll found it up to date
            before = full[0]
            patched = await asyncio.to_thread(
                call, gw, "PATCH", f"/admin/agents/{name}", boss, json={"description": "changed"}
            )
            assert patched.status_code == 200, patched.text
            await until(lambda: getattr(registry.get(tenant, name), "description", None) == "changed")
            reads = redis.version_reads
            await until(lambda: redis.version_reads >= reads + 2)  # two polls since the change
            return before, full[0]
        finally:
            await registry.stop()
            await pool.close()
            await redis.aclose()

    before, after = asyncio.run(run())
    assert after == before


def test_a_reload_does_not_parse_the_tools_of_an_unchanged_agent_again(monkeypatch):
    """A full reload of the registry (at start, after a burst of changes, on a new subscription)
    parsed every tool of every agent of every tenant again on the event loop (~30 ms an agent
    of 64 tools; a tenant admin may hold thousands of agents). An agent whose tools did not
    change keeps the tools parsed before; changed ones are parsed."""
    import runtime.tools
    from runtime.agents import agent_from_rows

    tool = schema_tool("look", {"type": "object", "properties": {"q": {"type": "string"}}})
    row = {"id": "agt_x", "tenant": "t", "name": "n", "model": "m", "description": "", "settings": {"tools": [tool]}}
    before = agent_from_rows(row, {}, {})
    parsed = []
    whole = runtime.tools.parse_tools
    monkeypatch.setattr(runtime.tools, "parse_tools", lambda specs, **kw: parsed.append(specs) or whole(specs, **kw))
    again = agent_from_rows(orjson.loads(orjson.dumps(row)), {}, {}, before)
    assert again.tools is before.tools and parsed == []
    other = {**tool, "name": "find"}
    changed = agent_from_rows({**row, "settings": {"tools": [other]}}, {}, {}, before)
    assert [t.name for t in changed.tools] == ["find"] and len(parsed) == 1
