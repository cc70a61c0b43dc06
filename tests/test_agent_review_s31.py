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
