"""Attacks through the provider side of the gateway (issue #11, items 1, 15 and 19).

Item 1: a key holder puts litellm's own keyword arguments in the body (``api_base``,
``extra_headers``, ``mock_response``, ``fallbacks``, ...) to send the gateway's provider key to
a server of theirs, reach internal addresses or fake usage. A real HTTP server in this test
(the sentinel) stands for the attacker's or an internal server: its address is in every such
field, and it must never see a connection. Item 15: provider error messages that echo keys or
name internal hosts reach the client cleaned, in JSON errors and in stream error events.
Item 19: an embedding model configured without ``mode`` serves ``/v1/embeddings``.

Everything goes through real HTTP: a gateway process, the mock provider, the OpenAI SDK.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest

from gateway.providers.litellm import CHAT_PARAMS, EMBEDDING_PARAMS
from tests.conftest import Gateway, MockProvider, free_port

# Provider keys of shapes no pattern knows: only the configured-secret scrub can catch them.
# Each provider has spares: the item 15 tests make the mock answer 401 (the key is taken out
# of rotation) and 429 (the key cools down).
OPENAI_KEY = "oa-key-PLAIN-1"
ANTHROPIC_KEY = "ant-key-PLAIN-2"
TAIL_KEY = "tail-key-PLAIN-3"
KEYS = {"gpt-mock": OPENAI_KEY, "claude-mock": ANTHROPIC_KEY, "tail-model": TAIL_KEY}


def _keys(key: str) -> list[str]:
    return [key, *(f"{key}-spare{i}" for i in range(3))]


class Sentinel:
    """A listening HTTP server that answers like a provider (with absurd usage) and records
    every connection made to it, HTTP or not."""

    def __init__(self) -> None:
        self.connections: list[tuple] = []
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def setup(self) -> None:
                outer.connections.append(self.client_address)
                super().setup()

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                outer.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "body": self.rfile.read(length)}
                )
                body = json.dumps(
                    {
                        "id": "chatcmpl-sentinel",
                        "object": "chat.completion",
                        "created": 0,
                        "model": "sentinel",
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": "from the sentinel"},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 10**6, "completion_tokens": 10**6, "total_tokens": 2 * 10**6},
                    }
                ).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = _answer

            def log_message(self, *args) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def sentinel():
    s = Sentinel()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def umock(tmp_root):
    m = MockProvider(tmp_root)
    yield m
    m.stop()


def _config(mock: MockProvider) -> dict:
    timeouts = {"first_byte": 5, "idle": 5, "total": 20}
    closed = free_port()  # nothing listens here
    return {
        "router": {"max_attempts": 1, "circuit": {"failures": 1000}},
        "providers": [
            {
                "name": "mock-openai",
                "kind": "openai",
                "base_url": f"{mock.url}/v1",
                "api_keys": _keys(OPENAI_KEY),
                "timeouts": timeouts,
            },
            {
                "name": "mock-anthropic",
                "kind": "anthropic",
                "base_url": mock.url,
                "api_keys": _keys(ANTHROPIC_KEY),
                "timeouts": timeouts,
            },
            {
                "name": "tail",
                "kind": "litellm",
                "litellm_provider": "openai",
                "base_url": f"{mock.url}/v1",
                "api_keys": _keys(TAIL_KEY),
                "timeouts": timeouts,
            },
            {
                "name": "down",
                "kind": "openai",
                "base_url": f"http://localhost:{closed}/v1",
                "api_keys": ["down-key-PLAIN-4"],
                "timeouts": timeouts,
            },
            {
                "name": "down-tail",
                "kind": "litellm",
                "litellm_provider": "openai",
                "base_url": f"http://localhost:{closed}/v1",
                "api_keys": ["down-key-PLAIN-5"],
                "timeouts": timeouts,
            },
        ],
        "models": [
            {"name": "gpt-mock", "deployments": [{"provider": "mock-openai", "model": "mock-gpt"}]},
            {"name": "claude-mock", "deployments": [{"provider": "mock-anthropic", "model": "mock-claude"}]},
            {"name": "tail-model", "deployments": [{"provider": "tail", "model": "mock-gpt"}]},
            {
                "name": "tail-embed",
                "mode": "embedding",
                "deployments": [{"provider": "tail", "model": "mock-embedding"}],
            },
            {"name": "down-model", "deployments": [{"provider": "down", "model": "mock-gpt"}]},
            {"name": "down-tail-model", "deployments": [{"provider": "down-tail", "model": "mock-gpt"}]},
            # item 19: no mode given; the bundled model map knows these as embedding models
            {"name": "embed-inferred", "deployments": [{"provider": "mock-openai", "model": "text-embedding-3-small"}]},
            {"name": "tail-embed-inferred", "deployments": [{"provider": "tail", "model": "text-embedding-3-large"}]},
        ],
    }


@pytest.fixture(scope="module")
def ugw(tmp_root, services, umock):
    g = Gateway(tmp_root, _config(umock), services)
    yield g
    g.stop()


@pytest.fixture
def sdk(ugw, api_key):
    with openai.OpenAI(base_url=f"{ugw.url}/v1", api_key=api_key, max_retries=0, timeout=30) as c:
        yield c


def _hostile(url: str) -> dict:
    """Every litellm keyword argument that moves a request, fakes one or adds a callback."""
    return {
        "api_base": url,
        "base_url": url,
        "api_key": "sk-attacker-0000",
        "api_version": "2099-01-01",
        "organization": "org-attacker",
        "deployment_id": "attacker",
        "extra_headers": {"x-attacker": "1", "Authorization": "Bearer sk-attacker-0000"},
        "headers": {"x-attacker": "1"},
        "default_headers": {"x-attacker": "1"},
        "extra_body": {"api_base": url},
        "custom_llm_provider": "openai",
        "aws_bedrock_runtime_endpoint": url,
        "aws_sts_endpoint": url,
        "aws_region_name": "us-east-1",
        "aws_access_key_id": "AKIAATTACKER0000000",
        "aws_secret_access_key": "attacker",
        "vertex_project": "attacker",
        "vertex_location": "us-central1",
        "vertex_credentials": "{}",
        "mock_response": "faked by the client",
        "mock_tool_calls": [{"id": "x", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        "fallbacks": [{"model": "openai/gpt-4o", "api_base": url, "api_key": "sk-attacker-0000"}],
        "context_window_fallback_dict": {"openai/mock-gpt": "openai/gpt-4o"},
        "model_list": [{"model_name": "tail-model", "litellm_params": {"model": "openai/x", "api_base": url}}],
        "metadata": {"callbacks": ["langfuse"], "langfuse_host": url},
        "success_callback": ["langfuse", "webhook"],
        "failure_callback": ["langfuse"],
        "callbacks": ["langfuse"],
        "langfuse_host": url,
        "langfuse_public_key": "pk-attacker",
        "langfuse_secret_key": "sk-attacker",
        "input_cost_per_token": 1000.0,
        "output_cost_per_token": 1000.0,
        "timeout": 0.0001,
        "num_retries": 50,
        "max_retries": 50,
        "proxy_server_request": {"url": url},
        "azure_ad_token": "attacker",
    }


def _assert_untouched(sentinel: Sentinel, umock: MockProvider, key: str) -> dict:
    assert sentinel.connections == [], sentinel.requests
    last = umock.last()
    sent = last["headers"].get("x-api-key") or last["headers"].get("authorization", "").removeprefix("Bearer ")
    assert sent in _keys(key)
    assert "x-attacker" not in last["headers"]
    # what reaches the provider is the OpenAI request, nothing of litellm's own arguments
    assert set(last["body"]) <= CHAT_PARAMS | EMBEDDING_PARAMS | {"model", "stream", "stream_options"}, last["body"]
    return last


# ---- item 1: litellm keyword arguments from the client ----------------------------------------------
def test_item1_litellm_ignores_client_api_base_headers_and_callbacks(sdk, sentinel, umock):
    umock.clear()
    text = "long tail"
    clean = sdk.chat.completions.create(model="tail-model", messages=[{"role": "user", "content": text}])
    resp = sdk.chat.completions.create(
        model="tail-model", messages=[{"role": "user", "content": text}], extra_body=_hostile(sentinel.url)
    )
    assert resp.choices[0].message.content == "echo: long tail"
    last = _assert_untouched(sentinel, umock, TAIL_KEY)
    assert last["path"] == "/v1/chat/completions" and last["body"]["model"] == "mock-gpt"
    assert len(umock.requests()) == 2  # served upstream both times, not by a fallback or a mock
    assert resp.usage.model_dump() == clean.usage.model_dump()


def _one_field_attacks(url: str) -> dict[str, dict]:
    return {
        "api_base": {"api_base": url},
        "base_url": {"base_url": url},
        "extra_headers": {"extra_headers": {"x-attacker": "1"}},
        "custom_llm_provider": {"custom_llm_provider": "ollama"},
        "mock_response": {"mock_response": "faked by the client"},
        "fallbacks": {"fallbacks": [{"model": "openai/gpt-4o", "api_base": url, "api_key": "sk-attacker-0000"}]},
        "model_list": {
            "model_list": [{"model_name": "x", "litellm_params": {"model": "openai/x", "api_base": url}}],
            "fallbacks": ["x"],
        },
        "aws_bedrock_runtime_endpoint": {"aws_bedrock_runtime_endpoint": url, "aws_region_name": "us-east-1"},
        "timeout": {"timeout": 0.000001},
    }


@pytest.mark.parametrize("field", list(_one_field_attacks("http://x")))
def test_item1_litellm_ignores_each_client_connection_field(sdk, sentinel, umock, field):
    """One field at a time; ``fallbacks`` and ``model_list`` matter when the provider fails, so
    the provider fails once: the client gets the failure, the sentinel nothing."""
    umock.clear()
    extra = _one_field_attacks(sentinel.url)[field]
    if field in ("fallbacks", "model_list"):
        with pytest.raises(openai.InternalServerError):
            sdk.chat.completions.create(
                model="tail-model",
                messages=[{"role": "user", "content": 'x [[mock:{"status": 500}]]'}],
                extra_body=extra,
            )
    else:
        resp = sdk.chat.completions.create(
            model="tail-model", messages=[{"role": "user", "content": "one field"}], extra_body=extra
        )
        assert resp.choices[0].message.content == "echo: one field"
    _assert_untouched(sentinel, umock, TAIL_KEY)
    assert len(umock.requests()) == 1


def test_item1_litellm_stream_ignores_client_connection_fields(sdk, sentinel, umock):
    umock.clear()
    chunks = list(
        sdk.chat.completions.create(
            model="tail-model",
            messages=[{"role": "user", "content": "streamed tail"}],
            stream=True,
            stream_options={"include_usage": True},
            extra_body=_hostile(sentinel.url),
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: streamed tail"
    assert chunks[-1].usage.completion_tokens == 3
    _assert_untouched(sentinel, umock, TAIL_KEY)


def test_item1_litellm_embeddings_ignore_client_connection_fields(sdk, sentinel, umock):
    umock.clear()
    emb = sdk.embeddings.create(
        model="tail-embed", input="vector me", encoding_format="float", extra_body=_hostile(sentinel.url)
    )
    assert len(emb.data[0].embedding) == 8
    last = _assert_untouched(sentinel, umock, TAIL_KEY)
    assert last["path"] == "/v1/embeddings"


def test_item1_litellm_mock_response_cannot_fake_usage_or_cost(sdk, sentinel, umock):
    """litellm answers ``mock_response`` itself, with usage of its choosing; the cost is priced
    from that usage. The answer must come from the provider, with the provider's usage."""
    umock.clear()
    resp = sdk.chat.completions.create(
        model="tail-model",
        messages=[{"role": "user", "content": "one two three"}],
        extra_body={
            "mock_response": "faked",
            "mock_tool_calls": None,
            "mock_timeout": True,
            "mock_delay": 0,
            "usage": {"prompt_tokens": 0, "completion_tokens": 0},
            "input_cost_per_token": 0.0,
            "output_cost_per_token": 0.0,
        },
    )
    assert resp.choices[0].message.content == "echo: one two three"
    assert resp.usage.completion_tokens == 4 and resp.usage.prompt_tokens > 0
    assert len(umock.requests()) == 1
    assert sentinel.connections == []


def test_item1_litellm_refuses_tools_that_name_a_server(sdk, sentinel, umock):
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.chat.completions.create(
            model="tail-model",
            messages=[{"role": "user", "content": "use the tool"}],
            tools=[{"type": "mcp", "server_label": "evil", "server_url": f"{sentinel.url}/mcp/evil"}],
        )
    assert exc.value.body["param"] == "tools[0].type"
    # function tools are rebuilt from their known fields: a server_url beside them goes nowhere
    umock.clear()
    sdk.chat.completions.create(
        model="tail-model",
        messages=[{"role": "user", "content": "use the tool"}],
        tools=[
            {
                "type": "function",
                "server_url": f"{sentinel.url}/mcp/evil",
                "function": {"name": "f", "parameters": {"type": "object", "properties": {}}, "api_base": sentinel.url},
            }
        ],
    )
    sent = umock.last()["body"]["tools"][0]
    assert "server_url" not in sent and "api_base" not in sent["function"]
    assert sentinel.connections == []


def test_item1_litellm_does_not_fetch_internal_urls_named_in_messages(sdk, sentinel):
    """litellm downloads some media itself (a PDF named by URL): never from an internal address."""
    with pytest.raises(openai.APIStatusError) as exc:
        sdk.chat.completions.create(
            model="tail-model",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "read this"},
                        {"type": "file", "file": {"file_id": f"{sentinel.url}/internal.pdf"}},
                    ],
                }
            ],
        )
    assert sentinel.connections == []
    assert sentinel.url.split("//")[1] not in exc.value.message  # and the refusal does not echo it


@pytest.mark.parametrize("model", ["gpt-mock", "claude-mock"])
def test_item1_openai_and_anthropic_adapters_keep_client_fields_out_of_headers_and_urls(sdk, sentinel, umock, model):
    umock.clear()
    resp = sdk.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        extra_body=_hostile(sentinel.url),
        extra_headers={"x-attacker": "1", "x-forwarded-host": "evil.example", "anthropic-version": "1999-01-01"},
    )
    assert resp.choices[0].message.content == "echo: hi"
    last = umock.last()
    assert sentinel.connections == []
    assert last["path"] == ("/v1/messages" if model == "claude-mock" else "/v1/chat/completions")
    assert "x-attacker" not in last["headers"] and "x-forwarded-host" not in last["headers"]
    if model == "claude-mock":
        assert last["headers"]["x-api-key"] in _keys(ANTHROPIC_KEY)
        assert last["headers"]["anthropic-version"] == "2023-06-01"
        # the translation builds Anthropic's body from the fields it knows, nothing else
        assert set(last["body"]) <= {"model", "messages", "max_tokens", "system", "metadata", "stream"}
    else:
        assert last["headers"]["authorization"].removeprefix("Bearer ") in _keys(OPENAI_KEY)
        assert last["body"]["model"] == "mock-gpt"


# ---- item 15: provider error messages ---------------------------------------------------------------
def _leaky(mock: MockProvider, key: str) -> str:
    return (
        f"Incorrect API key provided: sk-abc***wxyz. Key {key} was refused by "
        f"http://10.20.30.40:8443/v1/chat (llm-backend.svc.cluster.local:8000, fd00::1, {mock.url}) "
        "for Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJlMTIz"
    )


def _assert_clean(message: str, mock: MockProvider, key: str) -> None:
    for leak in (
        "abc***wxyz",
        "sk-abc",
        key,
        "10.20.30.40",
        "llm-backend",
        "cluster.local",
        "fd00::1",
        "eyJhbGciOi",
        mock.url,
        "127.0.0.1",
        "localhost",
    ):
        assert leak not in message, (leak, message)


@pytest.mark.parametrize("model", ["gpt-mock", "claude-mock", "tail-model"])
@pytest.mark.parametrize("status", [401, 400, 429, 500])
def test_item15_upstream_error_messages_lose_keys_and_hosts(sdk, umock, model, status):
    directive = {"status": status, "message": _leaky(umock, KEYS[model]), "retry_after": 1}
    with pytest.raises(openai.APIStatusError) as exc:
        sdk.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"hi [[mock:{json.dumps(directive)}]]"}]
        )
    err = exc.value
    _assert_clean(err.message, umock, KEYS[model])
    _assert_clean(err.response.text, umock, KEYS[model])
    assert "Incorrect API key provided" in err.message  # still says what went wrong
    expected = {401: (502, "upstream_error"), 400: (400, "invalid_request_error"), 429: (429, "rate_limit_error")}
    status_code, kind = expected.get(status, (502, "upstream_error"))
    assert (err.status_code, err.body["type"]) == (status_code, kind)


@pytest.mark.parametrize("model", ["gpt-mock", "claude-mock"])
def test_item15_stream_error_events_lose_keys_and_hosts(ugw, api_key, umock, model):
    # after content was sent: the stream ends with an error event
    directive = {"error_after": 4, "message": _leaky(umock, KEYS[model])}
    body = {
        "model": model,
        "stream": True,
        "messages": [{"role": "user", "content": f"a b c d e f [[mock:{json.dumps(directive)}]]"}],
    }
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.stream("POST", f"{ugw.url}/v1/chat/completions", json=body, headers=headers, timeout=30) as r:
        assert r.status_code == 200
        text = r.read().decode()
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert any(e.get("choices") for e in events), text  # content came first
    error = events[-1]["error"]
    assert "Incorrect API key provided" in error["message"]
    _assert_clean(text, umock, KEYS[model])
    # before any content: the failure is a JSON error, cleaned the same way
    directive["error_after"] = 0
    body["messages"][0]["content"] = f"a b [[mock:{json.dumps(directive)}]]"
    r = httpx.post(f"{ugw.url}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert r.status_code >= 500 and "Incorrect API key provided" in r.json()["error"]["message"]
    _assert_clean(r.text, umock, KEYS[model])


@pytest.mark.parametrize("model", ["down-model", "down-tail-model"])
def test_item15_connection_failures_do_not_name_hosts_or_addresses(sdk, umock, model):
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as exc:
            out = sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], stream=stream)
            list(out)
        assert exc.value.status_code in (502, 503, 504)
        _assert_clean(exc.value.response.text, umock, "down-key-PLAIN")


def test_item15_model_names_and_field_paths_survive_the_scrub(sdk, umock):
    message = "The model `mock-gpt` does not exist; messages.0.content.1.text: Invalid value, see api.openai.com/docs"
    directive = {"status": 404, "message": message}
    with pytest.raises(openai.APIStatusError) as exc:
        sdk.chat.completions.create(
            model="gpt-mock", messages=[{"role": "user", "content": f"hi [[mock:{json.dumps(directive)}]]"}]
        )
    assert "`mock-gpt`" in exc.value.message
    assert "messages.0.content.1.text" in exc.value.message
    assert "api.openai.com" not in exc.value.message


# ---- item 19: embedding models configured without a mode --------------------------------------------
@pytest.mark.parametrize("model", ["embed-inferred", "tail-embed-inferred"])
def test_item19_embedding_mode_is_inferred_from_the_bundled_model_map(sdk, umock, model):
    umock.clear()
    emb = sdk.embeddings.create(model=model, input="vector me", encoding_format="float")
    assert len(emb.data[0].embedding) == 8
    assert umock.last()["path"] == "/v1/embeddings"
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    assert "embedding model" in exc.value.message
    listed = {m.id for m in sdk.models.list()}
    assert model in listed


@pytest.mark.parametrize("model", ["gpt-mock", "claude-mock"])
def test_oversized_upstream_error_body_is_read_only_up_to_its_cap(sdk, umock, model):
    """A provider answering an error with megabytes: the gateway reads at most 1 MiB of it (the
    JSON is then cut short) and still answers an OpenAI-shaped error of bounded size."""
    directive = {"status": 400, "message": "x" * (3 * 1024 * 1024)}
    with pytest.raises(openai.APIStatusError) as exc:
        sdk.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"hi [[mock:{json.dumps(directive)}]]"}]
        )
    assert exc.value.status_code in (400, 502)
    assert len(exc.value.response.content) < 64 * 1024
    assert set(exc.value.body) >= {"message", "type"}
    ok = sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "still here?"}])
    assert ok.choices[0].message.content


@pytest.mark.parametrize("status", [200, 400])
def test_gzip_bomb_from_upstream_is_capped_on_the_aiohttp_client(monkeypatch, status):
    """A provider answering with a small gzip body that inflates far past the cap: its
    Content-Length (the compressed size) is under the cap, but the aiohttp client's read()
    inflates it whole. The decompressed bytes are counted: a success body is a 502, an error
    body is cut at its cap."""
    import asyncio
    import gzip

    from aiohttp import web

    from core import upstream as up
    from core.config import Timeouts
    from core.errors import UpstreamError

    monkeypatch.setenv(up.CLIENT_ENV, "aiohttp")
    monkeypatch.setattr(up, "MAX_BODY_BYTES", 1024 * 1024)
    monkeypatch.setattr(up, "MAX_ERROR_BODY_BYTES", 64 * 1024)
    bomb = gzip.compress(b"\0" * (16 * 1024 * 1024))

    async def handler(request):
        return web.Response(status=status, body=bomb, headers={"Content-Encoding": "gzip"})

    async def run():
        app = web.Application()
        app.router.add_post("/", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        client = up.Upstream()
        await client.start()
        try:
            resp = await client.post(f"http://127.0.0.1:{port}/", b"{}", {}, Timeouts(), "mock")
            assert resp.content_length is not None and resp.content_length < 64 * 1024
            if status >= 400:
                assert len(await client.read(resp, "mock")) <= 64 * 1024
            else:
                with pytest.raises(UpstreamError) as exc:
                    await client.read(resp, "mock")
                assert exc.value.code == "upstream_response_too_large"
        finally:
            await client.close()
            await runner.cleanup()

    asyncio.run(run())
