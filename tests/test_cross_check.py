"""Cross-check of the session-22 reviews: where two branches' changes meet (the stream path and an
agent's stored answer, ...). Real gateway processes over HTTP, the OpenAI SDK, the mock provider."""

from __future__ import annotations

import uuid

import httpx
import openai
import orjson
import pytest

from tests.conftest import MASTER_KEY, Gateway, MockProvider, started
from tests.test_agents_e2e import create_agent
from tests.test_policies import new_key

HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def up(tmp_root):
    m = MockProvider(tmp_root)
    yield m
    m.stop()


@pytest.fixture(scope="module")
def gw(tmp_root, services, up):
    cfg = {
        "router": {"max_attempts": 1},
        "providers": [
            {
                "name": "pp",
                "kind": "openai",
                "base_url": f"{up.url}/v1",
                "api_keys": [f"k-{uuid.uuid4().hex[:8]}"],
                "timeouts": {"first_byte": 5, "idle": 5, "total": 20},
            }
        ],
        "models": [
            {"name": "agent-model", "deployments": [{"provider": "pp", "model": "m"}]},
            {
                "name": "priced",
                "deployments": [
                    {"provider": "pp", "model": "mp", "input_cost_per_token": 1e-6, "output_cost_per_token": 1e-6}
                ],
            },
            {
                "name": "windowed",
                "deployments": [
                    {"provider": "pp", "model": "short", "context_window": 400},
                    {"provider": "pp", "model": "long", "context_window": 100000},
                ],
            },
        ],
    }
    with started(Gateway(tmp_root, cfg, services)) as (g,):
        yield g


@pytest.fixture
def raw(up):
    yield up
    up.configure(raw=None)


def _sse(*objs) -> list[str]:
    return [f"data: {orjson.dumps(o).decode()}\n\n" for o in objs]


def _chunk(delta, finish=None) -> dict:
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def test_an_agents_streamed_turn_with_a_chunk_of_an_unexpected_shape_is_relayed_and_stored(gw, raw):
    """The routing review relays chunks whose ``choices``/``delta`` are not OpenAI's (the commit
    check and the usage estimate skip them); an agent's stored answer read the same chunks with
    ``.get`` on whatever was there, so the turn's stream ended in a server_error event (after the
    answer) and the turn was not remembered."""
    agent = create_agent(gw)
    key = new_key(gw)["key"]
    odd = [{"id": "c", "choices": "zz"}, {"id": "c", "choices": [1, {"delta": "x"}, {"delta": [1]}]}]
    pieces = _sse(_chunk({"role": "assistant", "content": "hi there"}), *odd, _chunk({}, "stop"))
    raw.configure(raw={"pieces": [*pieces, "data: [DONE]\n\n"]})
    conv = f"cc-{uuid.uuid4().hex[:8]}"
    body = {
        "model": f"agent:{agent['name']}",
        "messages": HELLO,
        "stream": True,
        "metadata": {"conversation_id": conv},
        "variables": {"company": "Acme"},
    }
    with httpx.stream(
        "POST", f"{gw.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60
    ) as resp:
        assert resp.status_code == 200, resp.read()
        events = [e[6:] for e in resp.read().split(b"\n\n") if e.startswith(b"data: ")]
    assert events[-1] == b"[DONE]", events[-2:]
    assert not any(b'"error"' in e for e in events)
    path = f"/v1/agents/{agent['name']}/conversations/{conv}/messages"
    stored = httpx.get(f"{gw.url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert stored.status_code == 200, stored.text
    assert [m["content"] for m in stored.json()["data"] if m["role"] == "assistant"] == ["hi there"]


def test_the_cli_revoking_a_key_drops_every_key_minted_from_it_from_the_replicas_caches(gw, services, tmp_root):
    """The keys review revokes a key's minted keys with it, and DELETE /admin/keys announces each
    one's revocation to the replicas' key caches; ``gateway keys revoke`` revoked them in
    PostgreSQL too but announced only the named key, so its children stayed served from every
    replica's cache until the next version poll."""
    import redis

    from policies.keys import REVOKE_CHANNEL, hash_key
    from tests.conftest import run_cli
    from tests.test_admin_review_s22 import as_key

    ta = f"t-{uuid.uuid4().hex[:8]}"
    boss = new_key(gw, tenant=ta, scopes=["admin"])
    child = as_key(gw, boss["key"], "POST", "/admin/keys", json={"name": "c", "scopes": ["admin"]}).json()
    grandchild = as_key(gw, child["key"], "POST", "/admin/keys", json={"name": "gc"}).json()
    sub = redis.Redis.from_url(services[1]).pubsub()
    sub.subscribe(REVOKE_CHANNEL)
    try:
        assert sub.get_message(timeout=5)["type"] == "subscribe"
        out = run_cli("keys", "revoke", boss["id"], urls=services, tmp=tmp_root)
        assert out.returncode == 0, out.stderr
        announced = set()
        while (m := sub.get_message(timeout=2)) is not None:
            announced.add(m["data"].decode())
    finally:
        sub.close()
    assert {hash_key(k["key"]) for k in (boss, child, grandchild)} <= announced


def test_an_agent_turn_longer_than_a_deployments_context_window_is_not_sent_to_it(gw):
    """``ctx.body_bytes`` bounds the prompt's tokens from above: the router skips counting when
    it fits a context window, a routing rule when it is under ``prompt_tokens_over``, and the
    routing review's off-loop count skips a body below OFF_LOOP_BYTES. It stayed the client's
    body size while the agent stage added the system prompt and history (and the tools loop its
    results): a long agent prompt was sent to a deployment whose window it overflows (the
    provider's 400 instead of another deployment), and counted on the event loop."""
    agent = create_agent(gw, model="windowed", template="You are {{ company }}'s assistant. " + "word " * 800)
    key = new_key(gw)["key"]
    c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=60)
    for _ in range(8):
        raw = c.chat.completions.with_raw_response.create(
            model=f"agent:{agent['name']}", messages=HELLO, extra_body={"variables": {"company": "Acme"}}
        )
        assert raw.headers["x-gateway-deployment"] == "pp/long"


def test_a_tool_loop_step_longer_than_a_deployments_context_window_is_not_sent_to_it(gw, tmp_root):
    """The same bound in the tools loop: a step's prompt holds the tool results (up to 32 KiB
    each, 32 calls a step) that the client's body never had."""
    from tests.test_agents_e2e import ToolServer

    tools = ToolServer(tmp_root)
    try:
        big = {
            "name": "get_big",
            "description": "A long document",
            "parameters": {"type": "object", "properties": {}},
            "kind": "http",
            "config": {
                "method": "GET",
                "url": f"{tools.url}/big?bytes=20000",
                "allowed_hosts": ["127.0.0.1"],
                "allow_private_networks": True,
            },
        }
        agent = create_agent(gw, model="windowed", tools=[big])
        key = new_key(gw)["key"]
        c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=60)
        directive = '[[mock:{"tool_calls_steps": [[{"name": "get_big", "arguments": {}}]]}]]'
        for _ in range(8):
            raw = c.chat.completions.with_raw_response.create(
                model=f"agent:{agent['name']}",
                messages=[{"role": "user", "content": f"read it {directive}"}],
                extra_body={"variables": {"company": "Acme"}},
            )
            assert raw.parse().choices[0].message.content.startswith("tool result")
            assert raw.headers["x-gateway-deployment"] == "pp/long"
    finally:
        tools.stop()


def _log_line(gw: Gateway, rid: str) -> dict | None:
    for entry in gw.log().splitlines():
        if rid in entry and entry.startswith("{") and '"msg":"request"' in entry.replace(" ", ""):
            return orjson.loads(entry)
    return None


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_a_provider_streamed_without_usage_is_counted_and_the_sdk_reads_the_estimate(gw, raw, field):
    """The routing review relays reasoning deltas as content (they commit the stream); a provider
    that reports no usage has the answer counted by the gateway, which read only content and
    tool calls — reasoning, billed as completion tokens by every provider, was charged nothing.
    The client asked for ``include_usage``: the estimate reaches the OpenAI SDK as OpenAI's usage
    chunk (no choices), after the answer."""
    from tests.conftest import wait_until

    thought = " ".join(f"step{i}" for i in range(300))
    pieces = _sse(
        _chunk({"role": "assistant", "content": ""}),
        _chunk({field: thought}),
        _chunk({"content": "yes"}),
        _chunk({}, "stop"),
    )
    raw.configure(raw={"pieces": [*pieces, "data: [DONE]\n\n"]})
    key = new_key(gw)["key"]
    rid = f"rs-{uuid.uuid4().hex[:8]}"
    c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=60)
    stream = c.chat.completions.create(
        model="agent-model",
        messages=HELLO,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-request-id": rid},
    )
    got = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in got if ch.choices) == "yes"
    assert got[-1].choices == [] and got[-1].usage is not None
    assert got[-1].usage.completion_tokens >= 300, got[-1].usage
    wait_until(lambda: _log_line(gw, rid) is not None, timeout=10, what="the request's log line")
    assert _log_line(gw, rid)["completion_tokens"] == got[-1].usage.completion_tokens


@pytest.mark.parametrize("end", ["client_gone", "provider_broke", "gateway_failed"])
def test_a_stream_that_ends_early_is_estimated_off_the_event_loop(monkeypatch, end):
    """The routing review counts a long answer without usage in a worker thread when the stream
    ends with [DONE] — but a stream that ends otherwise (the client hung up, the provider broke
    off, the gateway's own failure) was still counted on the event loop: up to the ~1-2 MiB
    kept (0.4 s for 512 KiB of "aaaa…", 65k tokens) every other request of the replica waited,
    and a client can end its streams early at will."""
    import asyncio
    import threading
    from types import SimpleNamespace

    from core.errors import UpstreamError
    from core.types import RequestContext, Route, Usage
    from gateway import pipeline
    from gateway.usage import OFF_LOOP_BYTES

    where: list[bool] = []

    def estimating(ctx, sent):
        where.append(threading.current_thread() is threading.main_thread())
        return Usage(prompt_tokens=1, completion_tokens=2)

    monkeypatch.setattr(pipeline, "estimate_stream_usage", estimating)
    route = Route("m", "p", "p/m", "m", None)
    content = b"data: " + orjson.dumps({"choices": [{"delta": {"content": "a" * OFF_LOOP_BYTES}}]}) + b"\n\n"

    async def events():
        yield content
        if end == "provider_broke":
            raise UpstreamError("broke off", code="upstream_disconnected")
        if end == "gateway_failed":
            raise KeyError("x")
        yield content
        await asyncio.sleep(3600)

    async def attempts(router, ctx, group, attempt, hold=False):
        ctx.route = route
        return [content], events()

    monkeypatch.setattr(pipeline, "run_attempts", attempts)
    router = SimpleNamespace(release=lambda r: None, finished=lambda *a: None)
    svc = SimpleNamespace(router=router, config=SimpleNamespace(policies=SimpleNamespace(enabled=False)), adapters={})
    ctx = RequestContext("r", "chat", {"model": "m", "messages": []}, 0.0, stream=True)

    async def go():
        gone = asyncio.Event()
        if end == "client_gone":
            gone.set()

        async def receive():
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            await asyncio.sleep(0)

        await pipeline.call_stream(svc, ctx, None, {"headers": []}, send, receive)

    asyncio.run(go())
    assert where == [False]


def test_a_hard_budgets_reservation_counts_the_response_format_of_a_large_request(gw):
    """Under a hard budget the reservation is an upper bound: the prompt counted exactly plus the
    ``response_format`` schema (which the provider counts as prompt too). The routing review
    counts a prompt of 32 KiB or more before admission (off the event loop), and a prompt
    already counted was reserved as is — without the schema: a request whose schema alone costs
    more than the whole budget was admitted and served."""
    key = new_key(gw)
    r = httpx.post(
        f"{gw.url}/admin/budgets",
        json={"scope": "key", "scope_value": key["id"], "limit_usd": 0.001},
        headers={"Authorization": f"Bearer {MASTER_KEY}"},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    schema = {"type": "object", "description": "field " * 12_000, "properties": {"a": {"type": "string"}}}
    body = {
        "model": "priced",
        "messages": HELLO,
        "max_tokens": 1,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }
    resp = httpx.post(
        f"{gw.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key['key']}"}, timeout=60
    )
    assert resp.status_code == 429, resp.text
    assert resp.json()["error"]["code"] == "budget_too_small"
    small = {**body, "response_format": {"type": "json_object"}}
    resp = httpx.post(
        f"{gw.url}/v1/chat/completions", json=small, headers={"Authorization": f"Bearer {key['key']}"}, timeout=60
    )
    assert resp.status_code == 200, resp.text


def test_an_agent_turn_sent_as_a_stream_carries_the_usage_estimate_the_client_asked_for(gw, raw, tmp_root):
    """An agent with server-side tools runs its model calls unstreamed and sends the answer in
    chunks; a client that asked for ``include_usage`` got the provider's usage as is — ``null``
    when the provider reported none, while the stream path gives the gateway's estimate then (the
    README's promise) and so does this path once a turn has two steps (their sum)."""
    weather = {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        "kind": "http",
        "config": {"method": "GET", "url": "http://127.0.0.1:9/weather", "allowed_hosts": ["127.0.0.1"]},
    }
    agent = create_agent(gw, tools=[weather])
    answer = {
        "id": "c1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "sunny all week"}, "finish_reason": "stop"}
        ],
    }
    raw.configure(raw={"content_type": "application/json", "pieces": [orjson.dumps(answer).decode()]})
    key = new_key(gw)["key"]
    c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=60)
    got = list(
        c.chat.completions.create(
            model=f"agent:{agent['name']}",
            messages=HELLO,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"variables": {"company": "Acme"}},
        )
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in got if ch.choices) == "sunny all week"
    assert got[-1].choices == [] and got[-1].usage is not None
    from core.tokens import count_text

    assert got[-1].usage.completion_tokens == count_text("sunny all week") and got[-1].usage.prompt_tokens > 0


def _nested(depth: int, kind: str):
    value: object = 1
    for i in range(depth - 1):
        value = [value] if kind == "list" or (kind == "mixed" and i % 2) else {"k": value}
    return {"deep": value}


@pytest.mark.parametrize("kind", ["dict", "list", "mixed"])
def test_the_json_depth_bound_is_exactly_128_levels(kind):
    """``check_depth`` walked every container of any body with more than 128 brackets in Python —
    an agent turn with ten tools, ~115 us on the event loop for a ~25 us parse (6.9 ms for 5,000
    messages) — and now asks orjson (which writes at most 254 nested containers) to write the
    body wrapped in 126 lists, walking only a body that fails: the bound stays exactly 128."""
    from core.errors import InvalidRequest
    from core.http import check_depth

    for depth in (127, 128):
        body = _nested(depth, kind)
        check_depth(orjson.dumps(body), body)
    for depth in (129, 200, 254):
        body = _nested(depth, kind)
        raw = orjson.dumps(body) if depth < 254 else b"[" * 300
        with pytest.raises(InvalidRequest) as exc:
            check_depth(raw, body)
        assert exc.value.param == "deep"
    wide = {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}] * 500}
    check_depth(orjson.dumps(wide), wide)


def test_a_provider_answer_nested_past_what_can_be_written_again_is_a_bad_answer_not_a_500(gw, raw):
    """The fuzz review bounds a client's body at 128 levels because orjson reads 1024 and writes
    254; a provider's answer was read unbounded, and an agent's tools loop writes it again (its
    usage summed, its steps capped): a 500 with a traceback. It is now the provider's bad answer
    (502 upstream_bad_response, which falls back), as any answer of the wrong shape is."""
    weather = {
        "name": "get_weather",
        "description": "The weather",
        "parameters": {"type": "object", "properties": {}},
        "kind": "http",
        "config": {"method": "GET", "url": "http://127.0.0.1:9/weather", "allowed_hosts": ["127.0.0.1"]},
    }
    agent = create_agent(gw, tools=[weather], max_steps=2)
    call = {"id": "t1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    answer = {"id": "c1", "object": "chat.completion", "created": 1, "model": "m"}
    answer["choices"] = [{"index": 0, "message": message, "finish_reason": "tool_calls"}]
    deep = '{"x": ' + "[" * 300 + "1" + "]" * 300 + ", " + orjson.dumps(answer).decode()[1:]
    raw.configure(raw={"content_type": "application/json", "pieces": [deep]})
    key = new_key(gw)["key"]
    resp = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": f"agent:{agent['name']}", "messages": HELLO, "variables": {"company": "Acme"}},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    assert resp.status_code == 502, resp.text
    assert resp.json()["error"]["code"] == "upstream_bad_response"


def test_a_usage_chunk_written_with_a_space_before_the_colon_is_read_and_not_relayed_unasked(gw, raw):
    """The routing review recognises an error event written ``{"error" : {...}}``; the usage
    chunk had the same byte check (``"usage":{`` or ``"usage": {``): written ``"usage" : {`` it
    was not read (the provider's counts replaced by the gateway's estimate) and was relayed to a
    client that never asked for usage — a chunk with no choices, on which ``chunk.choices[0]``
    fails."""
    from tests.conftest import wait_until

    pieces = _sse(_chunk({"role": "assistant", "content": "hi"}), _chunk({}, "stop"))
    usage = '{"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [], '
    usage += '"usage" : {"prompt_tokens": 111, "completion_tokens": 222, "total_tokens": 333}}'
    raw.configure(raw={"pieces": [*pieces, f"data: {usage}\n\n", "data: [DONE]\n\n"]})
    key = new_key(gw)["key"]
    rid = f"us-{uuid.uuid4().hex[:8]}"
    c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=60)
    got = list(
        c.chat.completions.create(model="agent-model", messages=HELLO, stream=True, extra_headers={"x-request-id": rid})
    )
    assert all(ch.choices for ch in got), got[-1]
    wait_until(lambda: _log_line(gw, rid) is not None, timeout=10, what="the request's log line")
    line = _log_line(gw, rid)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (111, 222), line
