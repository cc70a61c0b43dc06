"""Upstream failures reach the client as OpenAI-shaped errors the SDK maps to its classes."""

from __future__ import annotations

import json

import openai
import pytest


def _say(directive: dict, text: str = "hi") -> list[dict]:
    return [{"role": "user", "content": f"{text} [[mock:{json.dumps(directive)}]]"}]


@pytest.mark.parametrize("model", ["gpt-mock", "claude-mock"])
def test_upstream_429_is_rate_limit_error_with_retry_after(client, model):
    with pytest.raises(openai.RateLimitError) as exc:
        client.chat.completions.create(model=model, messages=_say({"status": 429, "retry_after": 7}))
    assert exc.value.status_code == 429
    assert exc.value.response.headers["retry-after"] == "7"
    assert exc.value.body["type"] == "rate_limit_error"
    assert exc.value.response.headers["x-gateway-provider"].startswith("mock-")


@pytest.mark.parametrize("model", ["gpt-mock", "claude-mock"])
def test_upstream_500_is_502_server_error(client, model):
    with pytest.raises(openai.InternalServerError) as exc:
        client.chat.completions.create(model=model, messages=_say({"status": 500}))
    assert exc.value.status_code == 502
    assert exc.value.body["type"] == "upstream_error"


def test_anthropic_overloaded_529_is_503(client):
    with pytest.raises(openai.InternalServerError) as exc:
        client.chat.completions.create(model="claude-mock", messages=_say({"status": 529}))
    assert exc.value.status_code == 503


@pytest.mark.parametrize("model", ["gpt-mock", "claude-mock"])
def test_upstream_400_is_relayed_as_bad_request(client, model):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=model, messages=_say({"status": 400, "message": "too many cats"}))
    assert "too many cats" in exc.value.message


def test_upstream_auth_failure_is_not_blamed_on_the_client(client):
    with pytest.raises(openai.InternalServerError) as exc:
        client.chat.completions.create(model="gpt-mock", messages=_say({"status": 401}))
    assert exc.value.status_code == 502
    assert exc.value.code == "upstream_auth_error"


@pytest.mark.parametrize("model", ["gpt-mock", "claude-mock"])
def test_upstream_garbage_is_502_not_500(client, model):
    with pytest.raises(openai.InternalServerError) as exc:
        client.chat.completions.create(model=model, messages=_say({"malformed": True}))
    assert exc.value.status_code == 502
    assert exc.value.code == "upstream_bad_response"


@pytest.mark.parametrize("model", ["gpt-mock", "claude-mock"])
def test_upstream_that_never_answers_is_504(client, model):
    with pytest.raises(openai.InternalServerError) as exc:
        client.chat.completions.create(model=model, messages=_say({"hang": True}))
    assert exc.value.status_code == 504
    assert exc.value.code == "upstream_timeout"


@pytest.mark.parametrize("model", ["gpt-mock", "claude-mock"])
def test_connection_dropped_mid_body_is_502(client, model):
    with pytest.raises(openai.InternalServerError) as exc:
        client.chat.completions.create(model=model, messages=_say({"cut_after": 1}))
    assert exc.value.status_code == 502


# Events before the first content: OpenAI sends 1 (the role chunk); Anthropic 3 (message_start,
# ping, content_block_start).
PREAMBLE = {"gpt-mock": 1, "claude-mock": 3}


@pytest.mark.parametrize("model", ["gpt-mock", "claude-mock"])
def test_stream_cut_after_content_ends_with_an_error_event(client, model):
    stream = client.chat.completions.create(
        model=model,
        messages=_say({"cut_after": PREAMBLE[model] + 2, "chunks": 8}, "a b c d e f g h i j"),
        stream=True,
    )
    received = []
    with pytest.raises(openai.APIError) as exc:
        for chunk in stream:
            received.append(chunk)
    assert "".join(c.choices[0].delta.content or "" for c in received if c.choices), "content before the cut arrives"
    assert "broke off" in exc.value.message or "before it was complete" in exc.value.message


@pytest.mark.parametrize("model", ["gpt-mock", "claude-mock"])
def test_stream_cut_before_any_content_is_an_ordinary_error_response(client, model):
    # Nothing was sent yet, so the failure is still a plain HTTP error (a router may fall back).
    with pytest.raises(openai.InternalServerError) as exc:
        client.chat.completions.create(model=model, messages=_say({"cut_after": PREAMBLE[model]}), stream=True)
    assert exc.value.status_code == 502 and exc.value.code == "upstream_disconnected"


def test_openai_stream_with_a_malformed_event_is_relayed_as_is(client):
    # A relay passes through what it cannot read; the client's parser is the one to complain.
    stream = client.chat.completions.create(model="gpt-mock", messages=_say({"malformed": True}), stream=True)
    with pytest.raises(Exception):  # noqa: B017 - a JSON error raised inside the SDK
        list(stream)


def test_anthropic_stream_with_a_malformed_event_before_content_is_a_502(client):
    with pytest.raises(openai.InternalServerError) as exc:
        client.chat.completions.create(model="claude-mock", messages=_say({"malformed": True}), stream=True)
    assert exc.value.status_code == 502 and exc.value.code == "upstream_bad_response"


def test_stream_error_before_first_byte_is_a_normal_error_response(client):
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-mock", messages=_say({"status": 429}), stream=True)


def test_unreachable_provider_is_502(tmp_root, services, api_key):
    from tests.conftest import Gateway, free_port

    port = free_port()  # nothing listens there
    cfg = {
        "providers": [{"name": "gone", "kind": "openai", "base_url": f"http://127.0.0.1:{port}/v1", "api_keys": ["k"]}],
        "models": [{"name": "m", "deployments": [{"provider": "gone", "model": "m"}]}],
    }
    gw = Gateway(tmp_root, cfg, services)
    try:
        c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=api_key, max_retries=0)
        with pytest.raises(openai.InternalServerError) as exc:
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert exc.value.status_code == 502 and exc.value.code == "upstream_connect_error"
    finally:
        gw.stop()
