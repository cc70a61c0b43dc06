"""End to end: the official OpenAI SDK → gateway (real HTTP) → mock provider (real HTTP)."""

from __future__ import annotations

import json

import openai
import pytest

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}


@pytest.mark.parametrize("model", ["gpt-mock", "claude-mock"])
def test_chat_completion_non_streaming(client, model):
    resp = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello gateway"}])
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == "echo: Hello gateway"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens == 3
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


@pytest.mark.parametrize("model", ["gpt-mock", "claude-mock"])
def test_streaming_reassembles_to_the_same_text(client, model):
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello streaming world"}], stream=True
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: Hello streaming world"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks), "usage must not appear unless asked for"


@pytest.mark.parametrize("model", ["gpt-mock", "claude-mock"])
def test_stream_include_usage_gives_a_final_usage_chunk(client, model):
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "count me"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.completion_tokens == 3 and last.usage.prompt_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_gateway_asks_upstream_for_stream_usage_even_when_client_does_not(client, mock):
    mock.clear()
    list(client.chat.completions.create(model="gpt-mock", messages=[{"role": "user", "content": "x"}], stream=True))
    sent = mock.last()["body"]
    assert sent["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("model", ["gpt-mock", "claude-mock"])
def test_tools_and_forced_tool_choice(client, model):
    resp = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Weather in Paris?", "days": 1}

    follow = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21C"},
        ],
        tools=[WEATHER_TOOL],
    )
    assert follow.choices[0].message.content == "tool result: sunny, 21C"


@pytest.mark.parametrize("model", ["gpt-mock", "claude-mock"])
def test_streamed_tool_call_arguments_reassemble(client, model):
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Rome"}],
            tools=[WEATHER_TOOL],
            tool_choice="required",
            stream=True,
        )
    )
    calls: dict[int, dict] = {}
    for c in chunks:
        for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = tc.id or entry["id"]
            entry["name"] += (tc.function.name or "") if tc.function else ""
            entry["arguments"] += (tc.function.arguments or "") if tc.function else ""
    assert list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Rome", "days": 1}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_anthropic_translation_reaches_the_provider_in_its_format(client, mock):
    mock.clear()
    client.chat.completions.create(
        model="claude-mock",
        messages=[
            {"role": "system", "content": "You are terse."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}},
                ],
            },
        ],
        stop=["END"],
        temperature=1.7,
        user="u-42",
        max_tokens=50,
    )
    req = mock.last()
    assert req["path"] == "/v1/messages"
    assert req["headers"]["x-api-key"] == "ant-key" and req["headers"]["anthropic-version"]
    body = req["body"]
    assert body["system"] == "You are terse."
    assert body["model"] == "mock-claude" and body["max_tokens"] == 50
    assert body["stop_sequences"] == ["END"] and body["temperature"] == 1.0
    assert body["metadata"] == {"user_id": "u-42"}
    assert body["messages"][0]["content"][1] == {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"},
    }


def test_parameters_pass_through_to_openai_upstreams(client, mock):
    mock.clear()
    resp = client.chat.completions.create(
        model="gpt-mock",
        messages=[{"role": "user", "content": "one two three four five six"}],
        n=2,
        stop=["five"],
        seed=7,
        logprobs=True,
        top_logprobs=2,
        user="end-user-1",
        response_format={"type": "text"},
        max_tokens=3,
        extra_body={"custom_vendor_flag": {"nested": True}},
    )
    body = mock.last()["body"]
    assert body["model"] == "mock-gpt"
    for field, value in [
        ("n", 2),
        ("stop", ["five"]),
        ("seed", 7),
        ("logprobs", True),
        ("top_logprobs", 2),
        ("user", "end-user-1"),
        ("max_tokens", 3),
        ("custom_vendor_flag", {"nested": True}),
    ]:
        assert body[field] == value, field
    assert len(resp.choices) == 2
    assert resp.system_fingerprint == "fp_mock_7"
    assert resp.choices[0].finish_reason == "length"
    assert resp.choices[0].message.content == "echo: one two "
    assert [t.token for t in resp.choices[0].logprobs.content] == ["echo: ", "one ", "two "]


def test_stop_sequence_cuts_the_reply(client):
    resp = client.chat.completions.create(
        model="gpt-mock", messages=[{"role": "user", "content": "alpha STOP beta"}], stop="STOP"
    )
    assert resp.choices[0].message.content == "echo: alpha "


@pytest.mark.parametrize("model", ["gpt-mock", "claude-mock"])
def test_response_format_json(client, mock, model):
    mock.clear()
    resp = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], response_format={"type": "json_object"}
    )
    assert json.loads(resp.choices[0].message.content) == {"echo": "hi"}
    sent = mock.last()["body"]
    if model == "claude-mock":  # Anthropic has no response_format: it becomes an instruction
        assert "single valid JSON object" in sent["system"]
    else:
        assert sent["response_format"] == {"type": "json_object"}


def test_embeddings_float_and_base64(client):
    default = client.embeddings.create(model="embed-mock", input=["first text", "second text"])  # SDK asks base64
    floats = client.embeddings.create(model="embed-mock", input=["first text", "second text"], encoding_format="float")
    assert [d.index for d in default.data] == [0, 1]
    assert len(default.data[0].embedding) == 8
    for a, b in zip(default.data, floats.data, strict=True):
        assert a.embedding == pytest.approx(b.embedding, abs=1e-6)
    assert default.usage.prompt_tokens == 4
    sized = client.embeddings.create(model="embed-mock", input="x", dimensions=16)
    assert len(sized.data[0].embedding) == 16


def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list()]
    # the configured groups, in config order; then the tenant's agents (other tests create some)
    assert [i for i in ids if not i.startswith("agent:")] == ["gpt-mock", "claude-mock", "embed-mock"]
    model = client.models.retrieve("claude-mock")
    assert model.id == "claude-mock" and model.object == "model"
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("nope")
    assert exc.value.code == "model_not_found"


def test_unknown_model_is_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert exc.value.code == "model_not_found"
    assert exc.value.body["param"] == "model"


def test_wrong_endpoint_for_model_mode(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model="gpt-mock", input="x")
    assert exc.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="embed-mock", messages=[{"role": "user", "content": "x"}])


def test_bad_key_is_authentication_error(gateway):
    bad = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-gw-not-a-real-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        bad.chat.completions.create(model="gpt-mock", messages=[{"role": "user", "content": "x"}])
    assert exc.value.code == "invalid_api_key"
    assert "sk-gw-not-a-real-key" not in str(exc.value), "the key must not be echoed back in full"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_master_key_is_accepted_on_v1(gateway):
    from tests.conftest import MASTER_KEY

    master = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=MASTER_KEY, max_retries=0)
    assert master.chat.completions.create(model="gpt-mock", messages=[{"role": "user", "content": "x"}]).choices


def test_invalid_field_is_bad_request_naming_it(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="gpt-mock", messages=[{"role": "user", "content": "x"}], temperature=5)
    assert exc.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="gpt-mock", messages=[{"role": "wizard", "content": "x"}])
    assert exc.value.body["param"] == "messages[0].role"


def test_n_above_one_is_rejected_for_anthropic_with_the_field_named(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="claude-mock", messages=[{"role": "user", "content": "x"}], n=3)
    assert exc.value.body["param"] == "n"
