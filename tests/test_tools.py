"""Server-side tools: declarations (parse_tools), HTTP and MCP tools run against a real tool
server (loadtest.mock_tools), the address guard, builtins, and the mock provider's tool-call
directives."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from core.netguard import NetworkPolicy
from runtime.mcp import MCPClient
from runtime.tools import BUILTINS, ToolConfigError, ToolRunner, parse_tools
from runtime.types import Agent
from tests.conftest import LOCAL_HTTP, Proc, free_port, wait_until

LOCAL = "http://127.0.0.1/a"
LOOPBACK = NetworkPolicy(allowed=(ipaddress.ip_network("127.0.0.0/8"),))


class ToolServer(Proc):
    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "loadtest.mock_tools", "--port", str(self.port)]
        super().__init__(args, dict(os.environ), tmp / f"tools-{self.port}.log")
        wait_until(lambda: LOCAL_HTTP.get(f"{self.url}/health").status_code == 200, what="tool server")

    def requests(self) -> list[dict]:
        return LOCAL_HTTP.get(f"{self.url}/_requests").json()["requests"]

    def clear(self) -> None:
        LOCAL_HTTP.delete(f"{self.url}/_requests")


@pytest.fixture(scope="module")
def tools_server(tmp_root: Path) -> Iterator[ToolServer]:
    server = ToolServer(tmp_root)
    yield server
    server.stop()


def http_tool(name: str, url: str, *, method: str = "GET", properties: dict | None = None, **config) -> dict:
    properties = properties if properties is not None else {}
    return {
        "name": name,
        "description": f"the {name} tool",
        "kind": "http",
        "parameters": {"type": "object", "properties": properties, "required": list(properties)},
        "config": {"method": method, "url": url, "allowed_hosts": ["127.0.0.1", "localhost"], **config},
    }


def agent_with(*specs: dict, builtins: tuple[str, ...] = ()) -> Agent:
    return Agent(
        id="a1", tenant="t1", name="support", model="gpt-mock", tools=parse_tools(list(specs)), builtins=builtins
    )


def call(name: str, arguments, ident: str = "call_1") -> dict:
    raw = arguments if isinstance(arguments, str) else orjson.dumps(arguments).decode()
    return {"id": ident, "type": "function", "function": {"name": name, "arguments": raw}}


def run(agent: Agent, calls: list[dict], *, guard=LOOPBACK, within: float = 10.0, **kw):
    async def go():
        runner = ToolRunner(guard=guard, **kw)
        await runner.start()
        try:
            return await runner.run(agent, calls, deadline=time.monotonic() + within, context={"tenant": "t1"})
        finally:
            await runner.stop()

    return asyncio.run(go())


# --- declarations ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        ({"name": "bad name", "kind": "http"}, "tools[0].name", "letters"),
        ({"name": "x", "kind": "ftp"}, "tools[0].kind", "http"),
        ({"name": "nope", "kind": "builtin"}, "tools[0].name", "unknown builtin"),
        (
            http_tool("x", "http://127.0.0.1/a") | {"parameters": {"type": "object", "properties": {"a": {"type": 5}}}},
            "tools[0].parameters.properties.a.type",
            "JSON schema",
        ),
        (
            http_tool("x", "http://127.0.0.1/a") | {"parameters": {"type": "string"}},
            "tools[0].parameters.type",
            "object",
        ),
        (http_tool("x", "ftp://127.0.0.1/a"), "tools[0].config.url", "http"),
        (http_tool("x", "http://{host}/a", properties={"host": {"type": "string"}}), "tools[0].config.url", "host"),
        (http_tool("x", "http://127.0.0.1/{missing}"), "tools[0].config.url", "missing"),
        (http_tool("x", "http://evil.example/a"), "tools[0].config.url", "allowed_hosts"),
        (http_tool("x", "http://127.0.0.1/a", timeout_s=61), "tools[0].config.timeout_s", "60"),
        (http_tool("x", "http://127.0.0.1/a", retries=6), "tools[0].config.retries", "5"),
        (http_tool("x", "http://127.0.0.1/a", allowed_hosts=[]), "tools[0].config.allowed_hosts", "list"),
        (http_tool("x", "http://127.0.0.1/a", verb="GET"), "tools[0].config.verb", "unknown"),
        (
            http_tool("x", "http://127.0.0.1/a", headers={"X-Key": "${TOOL_NOT_SET_ANYWHERE}"}),
            "tools[0].config.headers.X-Key",
            "not set",
        ),
        (
            http_tool("x", "http://127.0.0.1/a", headers={"X-Key": "${DATABASE_URL}"}),
            "tools[0].config.headers.X-Key",
            "TOOL_",
        ),
        (http_tool("x", "http://127.0.0.1/a", headers={"Host": "a"}), "tools[0].config.headers.Host", "gateway"),
        (http_tool("x", "http://127.0.0.1/a", headers={"X": "a\r\nb"}), "tools[0].config.headers.X", "control"),
        ({"name": "m", "kind": "mcp", "config": {"url": "not a url"}}, "tools[0].config.url", "URL"),
    ],
)
def test_parse_tools_names_the_field_at_fault(spec, field, words):
    with pytest.raises(ToolConfigError) as err:
        parse_tools([spec])
    assert err.value.field == field
    assert words in str(err.value)


def test_parse_tools_refuses_duplicates_and_too_many():
    with pytest.raises(ToolConfigError) as err:
        parse_tools([http_tool("x", "http://127.0.0.1/a"), http_tool("x", "http://127.0.0.1/b")])
    assert err.value.field == "tools[1].name"
    with pytest.raises(ToolConfigError) as err:
        parse_tools([http_tool(f"t{i}", "http://127.0.0.1/a") for i in range(65)])
    assert err.value.field == "tools"


def test_parse_tools_keeps_secret_templates_not_values(monkeypatch):
    monkeypatch.setenv("TOOL_TEST_SECRET", "s3cret-value")
    (tool,) = parse_tools(
        [http_tool("x", "http://127.0.0.1/a", headers={"Authorization": "Bearer ${TOOL_TEST_SECRET}"})]
    )
    assert tool.config["headers"] == {"Authorization": "Bearer ${TOOL_TEST_SECRET}"}
    assert "s3cret-value" not in repr(tool)


def test_builtins_parse_to_their_fixed_specs():
    tools = parse_tools([{"kind": "builtin", "name": "escalate_to_human"}])
    assert tools == (BUILTINS["escalate_to_human"],)
    assert set(BUILTINS) == {"knowledge_search", "escalate_to_human", "end_conversation"}


# --- http tools over real HTTP -----------------------------------------------------------------


def test_http_tool_fills_placeholders_encoded_and_sends_env_headers(tools_server, monkeypatch):
    monkeypatch.setenv("TOOL_TEST_TOKEN", "tok-123")
    weather = http_tool(
        "get_weather",
        f"{tools_server.url}/weather?city={{city}}",
        properties={"city": {"type": "string"}},
        headers={"Authorization": "Bearer ${TOOL_TEST_TOKEN}"},
    )
    order = http_tool(
        "update_order",
        f"{tools_server.url}/orders/{{order_id}}",
        method="POST",
        properties={"order_id": {"type": "string"}, "note": {"type": "string"}},
    )
    tools_server.clear()
    agent = agent_with(weather, order)
    results = run(
        agent,
        [
            call("get_weather", {"city": "São Paulo & co"}, "c1"),
            call("update_order", {"order_id": "A/1?x", "note": "hi"}, "c2"),
        ],
    )
    assert [r.status for r in results] == ["ok", "ok"]
    assert [r.tool_call_id for r in results] == ["c1", "c2"]
    assert orjson.loads(results[0].content)["city"] == "São Paulo & co"
    echoed = orjson.loads(results[1].content)
    assert echoed["body"] == {"note": "hi"}
    seen = {r["path"].split("/")[1]: r for r in tools_server.requests()}
    assert seen["weather"]["headers"]["authorization"] == "Bearer tok-123"
    assert seen["orders"]["raw_path"] == "/orders/A%2F1%3Fx"


def test_http_tool_retries_5xx_then_succeeds(tools_server):
    flaky = http_tool("flaky", f"{tools_server.url}/flaky?key=r1&fails=2", retries=3)
    tools_server.clear()
    (result,) = run(agent_with(flaky), [call("flaky", {})])
    assert result.status == "ok", result.content
    assert orjson.loads(result.content)["attempts"] == 3
    assert len([r for r in tools_server.requests() if r["path"] == "/flaky"]) == 3


def test_http_tool_error_is_a_short_message_without_retry_on_4xx(tools_server):
    tools = [
        http_tool("bad", f"{tools_server.url}/fail?status=404", retries=3),
        http_tool("down", f"{tools_server.url}/fail?status=503", retries=1),
        http_tool("moved", f"{tools_server.url}/redirect"),
    ]
    tools_server.clear()
    results = run(agent_with(*tools), [call("bad", {}, "a"), call("down", {}, "b"), call("moved", {}, "c")])
    assert [r.status for r in results] == ["error", "error", "error"]
    assert "HTTP 404" in results[0].content
    assert "HTTP 503" in results[1].content
    assert "HTTP 302" in results[2].content
    paths = [r["query"].get("status") for r in tools_server.requests() if r["path"] == "/fail"]
    assert paths.count("404") == 1 and paths.count("503") == 2
    assert all(tools_server.url not in r.content for r in results)


def test_http_tool_times_out(tools_server):
    slow = http_tool("slow", f"{tools_server.url}/slow?delay_ms=5000", timeout_s=0.3)
    (result,) = run(agent_with(slow), [call("slow", {})])
    assert result.status == "timeout"
    (result,) = run(
        agent_with(http_tool("slow", f"{tools_server.url}/slow?delay_ms=5000")), [call("slow", {})], within=0.3
    )
    assert result.status == "timeout"


def test_http_tool_answer_is_capped(tools_server):
    big = http_tool("big", f"{tools_server.url}/big?bytes=200000", max_response_bytes=1000)
    (result,) = run(agent_with(big), [call("big", {})])
    assert result.status == "ok"
    assert result.content.startswith("x" * 1000)
    assert "truncated" in result.content and len(result.content) < 1100
    (result,) = run(
        agent_with(http_tool("big", f"{tools_server.url}/big?bytes=50000")), [call("big", {})], max_result_chars=2000
    )
    assert len(result.content) < 2100 and "truncated" in result.content


def test_loopback_refused_by_the_guard_unless_the_operator_allows_it(tools_server):
    weather = http_tool("w", f"{tools_server.url}/weather?city={{city}}", properties={"city": {"type": "string"}})
    local = http_tool("l", f"http://localhost:{tools_server.port}/weather?city=x")
    tools_server.clear()
    results = run(agent_with(weather, local), [call("w", {"city": "x"}, "a"), call("l", {}, "b")], guard=None)
    assert [r.status for r in results] == ["error", "error"]
    assert all("network policy" in r.content for r in results)
    assert all("127.0.0.1" not in r.content for r in results)
    assert tools_server.requests() == []
    results = run(agent_with(weather), [call("w", {"city": "x"})], guard=LOOPBACK)
    assert results[0].status == "ok"


def test_metadata_address_refused_even_with_private_networks_allowed():
    meta = http_tool("m", "http://169.254.169.254/latest/meta-data") | {}
    meta["config"]["allowed_hosts"] = ["169.254.169.254"]
    (result,) = run(agent_with(meta), [call("m", {})], guard=NetworkPolicy(allow_private=True))
    assert result.status == "error" and "network policy" in result.content


# --- arguments ---------------------------------------------------------------------------------


def test_invalid_arguments_come_back_as_invalid_naming_the_field(tools_server):
    weather = http_tool(
        "get_weather",
        f"{tools_server.url}/weather?city={{city}}",
        properties={"city": {"type": "string"}, "days": {"type": "integer", "maximum": 7}},
    )
    weather["parameters"]["required"] = ["city"]
    tools_server.clear()
    results = run(
        agent_with(weather),
        [
            call("get_weather", "{not json", "a"),
            call("get_weather", {"days": 2}, "b"),
            call("get_weather", {"city": "x", "days": 99}, "c"),
            call("get_weather", {"city": 5}, "d"),
            call("get_weather", "[1]", "e"),
            call("no_such_tool", {}, "f"),
        ],
    )
    assert [r.status for r in results] == ["invalid"] * 6
    assert "JSON" in results[0].content
    assert "'city'" in results[1].content
    assert "'days'" in results[2].content
    assert "'city'" in results[3].content
    assert "object" in results[4].content
    assert "unknown tool" in results[5].content
    assert tools_server.requests() == []


def test_calls_run_concurrently(tools_server):
    slow = http_tool(
        "slow", f"{tools_server.url}/slow?delay_ms=400&tag={{tag}}", properties={"tag": {"type": "string"}}
    )
    tools_server.clear()
    results = run(agent_with(slow), [call("slow", {"tag": str(i)}, f"c{i}") for i in range(3)])
    assert [r.status for r in results] == ["ok"] * 3
    spans = [(r["start"], r["end"]) for r in tools_server.requests() if r["path"] == "/slow"]
    assert len(spans) == 3
    # every request started before any of them ended: they overlapped on the server
    assert max(start for start, _ in spans) < min(end for _, end in spans)


# --- MCP ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sse", [False, True])
def test_mcp_list_and_call(tools_server, sse):
    url = f"{tools_server.url}/mcp" + ("?sse=1" if sse else "")

    async def go():
        runner = ToolRunner(guard=LOOPBACK)
        await runner.start()
        try:
            listed = await runner.list_mcp_tools(url)
            agent = agent_with(
                {"name": "add", "kind": "mcp", "parameters": listed[0]["inputSchema"], "config": {"url": url}},
                {"name": "order", "kind": "mcp", "config": {"url": url, "tool": "lookup_order"}},
            )
            results = await runner.run(
                agent,
                [
                    call("add", {"a": 2, "b": 3.5}, "a"),
                    call("order", {"order_id": "A1"}, "b"),
                    call("order", {"order_id": "ZZ"}, "c"),
                    call("add", {"a": "two"}, "d"),
                ],
                deadline=time.monotonic() + 10,
                context={},
            )
            return listed, results
        finally:
            await runner.stop()

    listed, results = asyncio.run(go())
    assert {t["name"] for t in listed} == {"add", "lookup_order"}
    assert [r.status for r in results] == ["ok", "ok", "error", "invalid"]
    assert results[0].content == "5.5"
    assert orjson.loads(results[1].content)["status"] == "shipped"
    assert "no such order" in results[2].content
    assert "'b'" in results[3].content or "'a'" in results[3].content


def test_mcp_session_is_reused_and_renewed_after_expiry(tools_server):
    import aiohttp

    url = f"{tools_server.url}/mcp"

    async def go():
        async with aiohttp.ClientSession() as http:
            client = MCPClient(http, url)
            first = await client.call_tool("add", {"a": 1, "b": 1})
            again = await client.call_tool("add", {"a": 2, "b": 2})
            async with http.post(f"{tools_server.url}/_mcp/expire") as resp:
                assert resp.status == 200
            renewed = await client.call_tool("add", {"a": 3, "b": 3})
            return first, again, renewed

    tools_server.clear()
    assert asyncio.run(go()) == (("2", False), ("4", False), ("6", False))
    methods = [orjson.loads(r["body"]).get("method") for r in tools_server.requests() if r["path"] == "/mcp"]
    assert methods == [
        "initialize",
        "notifications/initialized",
        "tools/call",
        "tools/call",
        "tools/call",  # 404: the session expired
        "initialize",
        "notifications/initialized",
        "tools/call",
    ]


def test_mcp_server_on_loopback_refused_by_default(tools_server):
    agent = agent_with({"name": "add", "kind": "mcp", "config": {"url": f"{tools_server.url}/mcp"}})
    (result,) = run(agent, [call("add", {"a": 1, "b": 2})], guard=None)
    assert result.status == "error" and "network policy" in result.content


# --- builtins ------------------------------------------------------------------------------------


def test_builtins_default_behaviour():
    agent = agent_with(builtins=("knowledge_search", "escalate_to_human", "end_conversation"))
    results = run(
        agent,
        [
            call("knowledge_search", {"query": "returns"}, "a"),
            call("escalate_to_human", {"reason": "angry", "urgency": "high"}, "b"),
            call("end_conversation", {}, "c"),
            call("escalate_to_human", {"urgency": "whenever"}, "d"),
        ],
    )
    assert [r.status for r in results] == ["error", "ok", "ok", "invalid"]
    assert results[0].content == "no knowledge base attached"
    assert results[1].escalate and not results[1].end
    assert results[2].end and not results[2].escalate
    assert not results[3].escalate


def test_builtin_handlers_receive_arguments_and_context():
    seen = []

    async def search(arguments: dict, context: dict) -> str:
        seen.append((arguments, context))
        return '{"passages": ["30 days"]}'

    async def broken(arguments: dict, context: dict) -> str:
        raise RuntimeError("boom")

    agent = agent_with(builtins=("knowledge_search", "escalate_to_human"))
    results = run(
        agent,
        [
            call("knowledge_search", {"query": "returns", "top_k": 2}, "a"),
            call("escalate_to_human", {"reason": "x"}, "b"),
        ],
        builtin_handlers={"knowledge_search": search, "escalate_to_human": broken},
    )
    assert results[0].status == "ok" and "30 days" in results[0].content
    assert seen == [({"query": "returns", "top_k": 2}, {"tenant": "t1"})]
    assert results[1].status == "error" and "boom" not in results[1].content


def test_openai_tools_and_server_tool_names(tools_server):
    agent = agent_with(http_tool("w", f"{tools_server.url}/weather"), builtins=("end_conversation",))
    runner = ToolRunner()
    names = [t["function"]["name"] for t in runner.openai_tools(agent)]
    assert names == ["w", "end_conversation"]
    assert runner.is_server_tool(agent, "w") and runner.is_server_tool(agent, "end_conversation")
    assert not runner.is_server_tool(agent, "client_tool")


# --- the mock provider's tool-call directives ------------------------------------------------------


def _chat(mock, messages: list[dict], *, stream: bool = False, tools: list | None = None) -> dict:
    body = {"model": "mock-gpt", "messages": messages, "stream": stream}
    if tools:
        body["tools"] = tools
    headers = {"authorization": "Bearer k"}
    if not stream:
        return httpx.post(f"{mock.url}/v1/chat/completions", json=body, headers=headers).json()
    calls: dict[int, dict] = {}
    text, finish = "", None
    first_chunks = []
    with httpx.stream("POST", f"{mock.url}/v1/chat/completions", json=body, headers=headers) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = orjson.loads(line[6:])["choices"][0]
            delta = choice["delta"]
            text += delta.get("content") or ""
            finish = choice["finish_reason"] or finish
            for part in delta.get("tool_calls") or []:
                entry = calls.setdefault(part["index"], {"id": None, "name": None, "arguments": ""})
                if "id" in part:
                    entry["id"] = part["id"]
                    entry["name"] = part["function"]["name"]
                    first_chunks.append(part)
                entry["arguments"] += part["function"].get("arguments") or ""
    return {"text": text, "finish": finish, "calls": [calls[i] for i in sorted(calls)], "first": first_chunks}


CALLS = [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "add", "arguments": {"a": 1, "b": 2}}]
DIRECTIVE = "[[mock:" + orjson.dumps({"tool_calls": CALLS}).decode() + "]]"


def test_mock_directive_answers_with_tool_calls(mock):
    user = {"role": "user", "content": f"weather? {DIRECTIVE}"}
    out = _chat(mock, [user])
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    calls = choice["message"]["tool_calls"]
    assert [(c["function"]["name"], orjson.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("add", {"a": 1, "b": 2}),
    ]
    assert all(c["id"].startswith("call_") for c in calls) and len({c["id"] for c in calls}) == 2
    # the second call of the loop: the last message is a tool result
    follow = [
        user,
        choice["message"],
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": "sunny"},
        {"role": "tool", "tool_call_id": calls[1]["id"], "content": "3"},
    ]
    again = _chat(mock, follow)["choices"][0]
    assert again["finish_reason"] == "stop"
    assert again["message"]["content"] == "tool result: sunny | 3"


def test_mock_directive_streams_tool_calls_in_openai_chunks(mock):
    user = {"role": "user", "content": f"weather? {DIRECTIVE}"}
    out = _chat(mock, [user], stream=True)
    assert out["finish"] == "tool_calls"
    assert [(c["name"], orjson.loads(c["arguments"])) for c in out["calls"]] == [
        ("get_weather", {"city": "Paris"}),
        ("add", {"a": 1, "b": 2}),
    ]
    assert all(p["function"]["arguments"] == "" and p["id"].startswith("call_") for p in out["first"])
    follow = [
        user,
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "tool", "tool_call_id": "x", "content": "rainy"},
    ]
    again = _chat(mock, follow, stream=True)
    assert again["finish"] == "stop" and again["text"] == "tool result: rainy"


def test_mock_directive_always_and_steps_and_raw_arguments(mock):
    always = '[[mock:{"tool_calls": [{"name": "t", "arguments": {}}], "tool_calls_always": true}]]'
    msgs = [
        {"role": "user", "content": always},
        {"role": "assistant", "content": None, "tool_calls": [call("t", {})]},
        {"role": "tool", "tool_call_id": "call_1", "content": "ok"},
    ]
    assert _chat(mock, msgs)["choices"][0]["finish_reason"] == "tool_calls"
    steps = '[[mock:{"tool_calls_steps": [[{"name": "a"}], [{"name": "b", "arguments": "{broken"}]]}]]'
    first = _chat(mock, [{"role": "user", "content": steps}])["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in first] == ["a"]
    msgs = [
        {"role": "user", "content": steps},
        {"role": "assistant", "content": None, "tool_calls": first},
        {"role": "tool", "tool_call_id": first[0]["id"], "content": "r1"},
    ]
    second = _chat(mock, msgs)["choices"][0]["message"]["tool_calls"]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in second] == [("b", "{broken")]
    msgs += [
        {"role": "assistant", "content": None, "tool_calls": second},
        {"role": "tool", "tool_call_id": second[0]["id"], "content": "r2"},
    ]
    assert _chat(mock, msgs)["choices"][0]["message"]["content"] == "tool result: r2"
    # an empty list: text, even though tools are offered
    tools = [{"type": "function", "function": {"name": "t", "parameters": {"type": "object"}}}]
    plain = _chat(mock, [{"role": "user", "content": 'hi [[mock:{"tool_calls": []}]]'}], tools=tools)
    assert plain["choices"][0]["finish_reason"] == "stop"


def test_mock_directive_on_the_anthropic_path(mock):
    body = {
        "model": "mock-claude",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": f"weather? {DIRECTIVE}"}],
    }
    headers = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
    out = httpx.post(f"{mock.url}/v1/messages", json=body, headers=headers).json()
    assert out["stop_reason"] == "tool_use"
    uses = [b for b in out["content"] if b["type"] == "tool_use"]
    assert [(u["name"], u["input"]) for u in uses] == [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
    body["messages"] += [
        {"role": "assistant", "content": out["content"]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0]["id"], "content": "sunny"}]},
    ]
    again = httpx.post(f"{mock.url}/v1/messages", json=body, headers=headers).json()
    assert again["stop_reason"] == "end_turn"
    assert again["content"][0]["text"] == "tool result: sunny"


# --- hardening --------------------------------------------------------------------------------------


def test_patterns_run_on_re2_and_pattern_properties_are_refused(tools_server):
    with pytest.raises(ToolConfigError) as err:
        parse_tools([http_tool("x", LOCAL, properties={"a": {"type": "string", "pattern": "(a+)+(?=b)"}})])
    assert err.value.field == "tools[0].parameters.properties.a.pattern"
    spec = http_tool("x", LOCAL)
    spec["parameters"]["patternProperties"] = {"^a": {"type": "string"}}
    with pytest.raises(ToolConfigError) as err:
        parse_tools([spec])
    assert err.value.field == "tools[0].parameters.patternProperties"
    # a property may be called "pattern" or "patternProperties"
    parse_tools([http_tool("x", LOCAL, properties={"pattern": {"type": "string"}, "patternProperties": {}})])
    city = {"city": {"type": "string", "pattern": "^[A-Za-z ]+$"}}
    weather = http_tool("w", f"{tools_server.url}/weather?city={{city}}", properties=city)
    results = run(agent_with(weather), [call("w", {"city": "Paris"}, "a"), call("w", {"city": "a" * 5000 + "!"}, "b")])
    assert [r.status for r in results] == ["ok", "invalid"]
    assert "'city'" in results[1].content and len(results[1].content) < 400


def test_deeply_nested_arguments_are_invalid_not_a_crash(tools_server):
    spec = http_tool("x", f"{tools_server.url}/weather?city=x", properties={"a": {}})
    deep = '{"a": ' + "[" * 1000 + "]" * 1000 + "}"
    (result,) = run(agent_with(spec), [call("x", deep)])
    assert result.status == "invalid" and "nested" in result.content
    assert result.arguments is None


def test_dot_segments_cannot_climb_the_path(tools_server):
    order = http_tool("o", f"{tools_server.url}/orders/{{order_id}}", properties={"order_id": {"type": "string"}})
    tools_server.clear()
    results = run(agent_with(order), [call("o", {"order_id": ".."}, "a"), call("o", {"order_id": "../x"}, "b")])
    assert results[0].status == "error" and "order_id" in results[0].content
    assert results[1].status == "ok"
    assert [r["raw_path"] for r in tools_server.requests()] == ["/orders/..%2Fx"]


def test_waiting_for_a_slot_counts_against_the_deadline(tools_server):
    slow = http_tool("slow", f"{tools_server.url}/slow?delay_ms=3000", timeout_s=30)
    results = run(agent_with(slow), [call("slow", {}, "a"), call("slow", {}, "b")], within=0.5, max_concurrency=1)
    assert [r.status for r in results] == ["timeout", "timeout"]


def test_public_tool_masks_literal_header_values(monkeypatch):
    from runtime.tools import public_tool

    monkeypatch.setenv("TOOL_TEST_SECRET", "s3cret")
    spec = http_tool("x", LOCAL, headers={"Authorization": "Bearer ${TOOL_TEST_SECRET}", "X-Api-Key": "literal-key"})
    shown = public_tool(parse_tools([spec])[0])
    assert shown["config"]["headers"] == {"Authorization": "Bearer ${TOOL_TEST_SECRET}", "X-Api-Key": "***"}


def test_a_tool_may_open_private_networks_but_never_metadata(tools_server):
    local = http_tool("w", f"{tools_server.url}/weather?city=x", allow_private_networks=True)
    cidr = http_tool("c", f"{tools_server.url}/weather?city=y", allowed_networks=["127.0.0.1/32"])
    plain = http_tool("p", f"{tools_server.url}/weather?city=z")
    results = run(
        agent_with(local, cidr, plain), [call("w", {}, "a"), call("c", {}, "b"), call("p", {}, "c")], guard=None
    )
    assert [r.status for r in results] == ["ok", "ok", "error"]
    for bad in ("169.254.169.254/32", "169.254.0.0/15", "0.0.0.0/0", "::ffff:0:0/96", "fe80::/64"):
        with pytest.raises(ToolConfigError) as err:
            parse_tools([http_tool("m", LOCAL, allowed_networks=[bad])])
        assert err.value.field == "tools[0].config.allowed_networks[0]"
    meta = http_tool("m", "http://169.254.169.254/latest", allow_private_networks=True)
    meta["config"]["allowed_hosts"] = ["169.254.169.254"]
    (result,) = run(agent_with(meta), [call("m", {})], guard=None)
    assert result.status == "error" and "network policy" in result.content
    mcp = {"name": "add", "kind": "mcp", "config": {"url": f"{tools_server.url}/mcp", "allow_private_networks": True}}
    (result,) = run(agent_with(mcp), [call("add", {"a": 1, "b": 2})], guard=None)
    assert (result.status, result.content) == ("ok", "3")
