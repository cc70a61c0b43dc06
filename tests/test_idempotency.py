"""Idempotency-Key on /v1/chat/completions (gateway/idempotency.py), through a real gateway
process, the OpenAI SDK and a mock provider that counts its calls."""

from __future__ import annotations

import threading
import uuid

import httpx
import openai
import pytest

from tests.conftest import Gateway, wait_until
from tests.test_policies import admin, ledger_rows, new_key


def _config(mock) -> dict:
    return {
        "router": {"max_attempts": 1, "circuit": {"failures": 1000}},
        "providers": [{"name": "pp", "kind": "openai", "base_url": f"{mock.url}/v1", "api_keys": ["k"]}],
        "models": [{"name": "m", "deployments": [{"provider": "pp", "model": "mock-gpt"}]}],
    }


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    g = Gateway(tmp_root, _config(module_mock), services)
    yield g
    g.stop()


@pytest.fixture(scope="module")
def agent(gw) -> str:
    name = f"idem-{uuid.uuid4().hex[:6]}"
    r = admin(gw, "POST", "/admin/agents", json={"name": name, "model": "m", "template": "You help."})
    assert r.status_code == 201, r.text
    return name


@pytest.fixture(scope="module")
def key(gw) -> str:
    return new_key(gw)["key"]


def _client(gw, key) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=30)


def _turn(c, agent, conv, text, idem=None, header="Idempotency-Key", **kw):
    return c.chat.completions.with_raw_response.create(
        model=f"agent:{agent}",
        messages=[{"role": "user", "content": text}],
        metadata={"conversation_id": conv},
        extra_headers={header: idem} if idem else None,
        **kw,
    )


def _calls(mock) -> int:
    return len(mock.requests())


def test_replay_returns_the_same_body_without_a_second_model_call_or_memory(gw, agent, services, module_mock):
    own = new_key(gw)  # its ledger rows are this test's alone
    c = _client(gw, own["key"])
    conv, idem = f"c-{uuid.uuid4().hex[:8]}", f"wamid.{uuid.uuid4().hex}"
    first = _turn(c, agent, conv, "one", idem)
    calls = _calls(module_mock)
    again = _turn(c, agent, conv, "one", idem)
    assert again.http_response.content == first.http_response.content
    assert again.headers["x-gateway-idempotent-replay"] == "true"
    assert "x-gateway-idempotent-replay" not in first.headers
    assert again.headers["x-request-id"] != first.headers["x-request-id"]
    assert again.headers["x-gateway-provider"] == "pp"
    assert _calls(module_mock) == calls  # the model was not called again
    # the other header name means the same key
    third = _turn(c, agent, conv, "one", idem, header="x-gateway-idempotency-key")
    assert third.http_response.content == first.http_response.content
    assert _calls(module_mock) == calls
    # the conversation holds the turn once: the next turn's prompt has "one" once
    last = _turn(c, agent, conv, "two")
    users = [m["content"] for m in module_mock.last()["body"]["messages"] if m["role"] == "user"]
    assert users == ["one", "two"]
    # no budget or audit record for a replay: the first turn and "two" only
    wait_until(lambda: len(ledger_rows(services[0], "key_id = $1", own["id"])) >= 2, what="the ledger rows")
    rows = ledger_rows(services[0], "key_id = $1", own["id"])
    expected = [first.headers["x-request-id"], last.headers["x-request-id"]]
    assert sorted(r["request_id"] for r in rows) == sorted(expected)


def test_same_key_with_another_body_is_refused_naming_the_header(gw, agent, key, module_mock):
    c = _client(gw, key)
    conv, idem = f"c-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    _turn(c, agent, conv, "first", idem)
    calls = _calls(module_mock)
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        _turn(c, agent, conv, "something else", idem)
    assert exc.value.body["param"] == "Idempotency-Key"
    assert exc.value.body["code"] == "idempotency_key_reused"
    assert _calls(module_mock) == calls


def test_a_repeat_while_the_first_is_in_progress_gets_409_then_the_answer(gw, agent, key, module_mock):
    c = _client(gw, key)
    conv, idem = f"c-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    text = 'slow [[mock:{"delay_ms": 1500}]]'
    calls = _calls(module_mock)
    out: dict = {}
    slow = threading.Thread(target=lambda: out.setdefault("r", _turn(c, agent, conv, text, idem)))
    slow.start()
    wait_until(lambda: _calls(module_mock) > calls, what="the first request at the model")
    with pytest.raises(openai.ConflictError) as exc:
        _turn(c, agent, conv, text, idem)
    assert exc.value.body["code"] == "idempotency_key_in_use"
    assert exc.value.response.headers["retry-after"] == "1"
    slow.join(30)
    replay = _turn(c, agent, conv, text, idem)
    assert replay.http_response.content == out["r"].http_response.content
    assert _calls(module_mock) == calls + 1


def test_a_server_error_releases_the_key_so_a_retry_runs(gw, key, module_mock):
    c = _client(gw, key)
    idem = uuid.uuid4().hex
    body = {"model": "m", "messages": [{"role": "user", "content": "flaky"}]}
    module_mock.configure(fail_rate=1.0, fail_status=500)
    try:
        with pytest.raises(openai.APIStatusError) as exc:
            c.chat.completions.create(**body, extra_headers={"Idempotency-Key": idem})
        assert exc.value.status_code >= 500
    finally:
        module_mock.configure(fail_rate=0.0)
    calls = _calls(module_mock)
    ok = c.chat.completions.with_raw_response.create(**body, extra_headers={"Idempotency-Key": idem})
    assert "x-gateway-idempotent-replay" not in ok.headers
    assert ok.parse().choices[0].message.content
    assert _calls(module_mock) == calls + 1


def test_a_client_error_is_not_stored(gw, key, module_mock):
    c = _client(gw, key)
    idem = uuid.uuid4().hex
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}], extra_headers={"Idempotency-Key": idem}
        )
    with pytest.raises(openai.NotFoundError):  # run again (not a replay, not "in progress")
        c.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}], extra_headers={"Idempotency-Key": idem}
        )


def test_keys_are_scoped_per_api_key(gw, key, module_mock):
    other = new_key(gw)["key"]
    idem = uuid.uuid4().hex
    a = _client(gw, key).chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "from a"}], extra_headers={"Idempotency-Key": idem}
    )
    b = _client(gw, other).chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "from b"}], extra_headers={"Idempotency-Key": idem}
    )
    assert "x-gateway-idempotent-replay" not in b.headers
    assert a.parse().choices[0].message.content != b.parse().choices[0].message.content


def test_a_streamed_answer_is_replayed_as_the_same_stream(gw, agent, key, module_mock):
    conv, idem = f"c-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    body = {
        "model": f"agent:{agent}",
        "messages": [{"role": "user", "content": "stream me"}],
        "metadata": {"conversation_id": conv},
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": idem}
    first = httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers, timeout=30)
    calls = _calls(module_mock)
    assert first.content.endswith(b"data: [DONE]\n\n")
    # the SDK reads the replay as the stream it is
    stream = _client(gw, key).chat.completions.create(**body, extra_headers={"Idempotency-Key": idem})
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert "stream me" in text
    again = httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert again.content == first.content
    assert again.headers["content-type"].startswith("text/event-stream")
    assert again.headers["x-gateway-idempotent-replay"] == "true"
    assert _calls(module_mock) == calls


@pytest.mark.parametrize(
    "headers",
    [
        {"Idempotency-Key": "k" * 256},
        {"Idempotency-Key": "café".encode()},
        {"Idempotency-Key": "a", "x-gateway-idempotency-key": "b"},
    ],
    ids=["too-long", "not-ascii", "two-that-disagree"],
)
def test_bad_idempotency_keys_are_refused_naming_the_header(gw, key, module_mock, headers):
    calls = _calls(module_mock)
    r = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
        headers={"Authorization": f"Bearer {key}", **headers},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] in ("Idempotency-Key", "idempotency-key")
    assert _calls(module_mock) == calls


def test_an_unauthenticated_request_claims_nothing(gw, key, module_mock):
    idem = uuid.uuid4().hex
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    r = httpx.post(
        f"{gw.url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer sk-bad", "Idempotency-Key": idem}
    )
    assert r.status_code == 401
    ok = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}", "Idempotency-Key": idem},
        timeout=30,
    )
    assert ok.status_code == 200 and "x-gateway-idempotent-replay" not in ok.headers


def test_the_openapi_documents_name_the_idempotency_key_and_every_channel_admin_route():
    from gateway import admin_channels, admin_vapi
    from gateway.openapi import admin_document, openapi_document

    chat = openapi_document()["paths"]["/v1/chat/completions"]["post"]
    assert "Idempotency-Key" in [p["name"] for p in chat["parameters"]]
    assert {"409", "422"} <= set(chat["responses"])
    paths = admin_document()["paths"]
    for route in [*admin_channels.routes(None), *admin_vapi.routes(None)]:
        for method in route.methods - {"HEAD"}:
            assert method.lower() in paths.get(route.path, {}), (method, route.path)


def test_a_request_that_outlived_its_claim_does_not_store_over_the_repeat_that_claimed_the_key(
    tmp_root, services, module_mock
):
    """A claims the key (lock 2 s) and its model call takes 6 s; B, a repeat after A's claim
    expired, claims the key, is answered at once and stores its answer; then A ends. A's answer
    used to be stored over B's: replays before A ended got B's answer, replays after it A's —
    two answers for one key."""
    g = Gateway(tmp_root, {**_config(module_mock), "server": {"idempotency_lock_s": 2}}, services)
    try:
        k = new_key(g)["key"]
        idem = uuid.uuid4().hex
        body = {"model": "m", "messages": [{"role": "user", "content": f"one answer {idem}"}]}

        def post() -> httpx.Response:
            headers = {"Authorization": f"Bearer {k}", "Idempotency-Key": idem}
            return httpx.post(f"{g.url}/v1/chat/completions", json=body, headers=headers, timeout=60)

        out: dict = {}
        calls = _calls(module_mock)
        module_mock.configure(ttft_ms=6000)  # A's model call is slow ...
        try:
            a = threading.Thread(target=lambda: out.setdefault("a", post()))
            a.start()
            wait_until(lambda: _calls(module_mock) > calls, what="A at the model")
        finally:
            module_mock.configure(ttft_ms=0)  # ... B's is not
        assert post().status_code == 409  # A holds the claim
        wait_until(lambda: (r := post()).status_code != 409 and out.setdefault("b", r) is r, timeout=30, what="B")
        assert "x-gateway-idempotent-replay" not in out["b"].headers  # B ran: A's claim had expired
        a.join(30)
        assert out["a"].status_code == 200 and out["b"].status_code == 200
        replay = post()
        assert replay.status_code == 200 and replay.headers["x-gateway-idempotent-replay"] == "true"
        assert replay.json()["id"] == out["b"].json()["id"] != out["a"].json()["id"]
    finally:
        g.stop()
