"""The HTTP surface: request ids, health, metrics, logs, and client mistakes."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from tests.conftest import wait_until

CHAT = {"model": "gpt-mock", "messages": [{"role": "user", "content": "hi"}]}


def _is_openai_error(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in resp.text
    return body["error"]


def test_every_response_carries_a_request_id(http):
    for method, path, body in [
        ("POST", "/v1/chat/completions", CHAT),
        ("GET", "/v1/models", None),
        ("GET", "/healthz", None),
        ("GET", "/nowhere", None),
        ("POST", "/v1/chat/completions", {"model": 1}),
    ]:
        resp = http.request(method, path, json=body)
        assert re.fullmatch(r"req_[0-9a-f]{28}", resp.headers["x-request-id"]), (path, resp.headers)
        assert "x-client-request-id" not in resp.headers


def test_a_sane_caller_request_id_is_echoed_beside_the_gateways_own(http):
    resp = http.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "trace-abc.123"})
    assert resp.headers["x-request-id"].startswith("req_")
    assert resp.headers["x-client-request-id"] == "trace-abc.123"
    resp = http.post(
        "/v1/chat/completions", json=CHAT, headers={"x-client-request-id": "mine 1", "x-request-id": "other"}
    )
    assert resp.headers["x-client-request-id"] == "mine 1"  # OpenAI's header wins
    evil = http.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "bad id\twith tabs"})
    assert evil.headers["x-request-id"].startswith("req_") and "x-client-request-id" not in evil.headers
    long = http.post("/v1/chat/completions", json=CHAT, headers={"x-client-request-id": "y" * 513})
    assert long.status_code == 200 and "x-client-request-id" not in long.headers  # ignored, never trimmed


def test_streaming_response_carries_request_id_and_route_headers(http):
    with http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-request-id"].startswith("req_")
        assert resp.headers["x-gateway-provider"] == "mock-openai"
        assert resp.headers["x-gateway-deployment"] == "mock-openai/mock-gpt"
        assert resp.headers["x-gateway-attempts"] == "1"
        body = resp.read().decode()
    assert body.rstrip().endswith("data: [DONE]")


def test_health_and_readiness(gateway):
    assert httpx.get(f"{gateway.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{gateway.url}/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "database": "ok", "redis": "ok"}


def test_metrics_count_requests_tokens_latency_and_errors(http, gateway):
    http.post("/v1/chat/completions", json=CHAT)
    with http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
        resp.read()
    http.post(
        "/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": 'x [[mock:{"status":500}]]'}]}
    )
    text = httpx.get(f"{gateway.url}/metrics").text

    def value(pattern: str) -> float:
        m = re.search(pattern + r" ([0-9.e+]+)", text)
        assert m, pattern
        return float(m.group(1))

    labels = 'endpoint="chat",model="gpt-mock",provider="mock-openai"'
    assert value(r"gateway_requests_total\{" + labels + r',status="200"\}') >= 2
    assert value(r"gateway_requests_total\{" + labels + r',status="502"\}') >= 1
    assert value(r"gateway_request_duration_seconds_count\{" + labels + r"\}") >= 3
    assert value(r'gateway_time_to_first_token_seconds_count\{model="gpt-mock",provider="mock-openai"\}') >= 1
    assert value(r'gateway_tokens_total\{kind="completion",model="gpt-mock",provider="mock-openai"\}') >= 2
    assert value(r'gateway_upstream_errors_total\{code="bad_gateway",provider="mock-openai"\}') >= 1
    assert "gateway_requests_in_flight" in text


def test_logs_are_json_lines_with_the_request_id(http, gateway):
    resp = http.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "log-check-42"})
    assert resp.status_code == 200

    def logged() -> dict | None:
        for line in gateway.log().splitlines():
            if line.startswith("{") and "log-check-42" in line:
                return json.loads(line)
        return None

    wait_until(lambda: logged() is not None, timeout=5, what="log line")
    entry = logged()
    assert entry["request_id"] == resp.headers["x-request-id"] and entry["client_request_id"] == "log-check-42"
    assert entry["status"] == 200 and entry["model"] == "gpt-mock" and entry["prompt_tokens"] > 0
    assert "hi" not in json.dumps({k: v for k, v in entry.items() if k != "msg"}), "no message content in logs"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"", 400, None),
        (b"[1,2]", 400, None),
        (b'{"messages": []}', 400, "model"),
        (b'{"model": "gpt-mock"}', 400, "messages"),
        (b'{"model": "gpt-mock", "messages": "hi"}', 400, "messages"),
        (b'{"model": "gpt-mock", "messages": [{"role": "user"}]}', 400, "messages[0].content"),
        (b'{"model": "gpt-mock", "messages": [{"role": "user", "content": 5}]}', 400, "messages[0].content"),
        (b'{"model": "gpt-mock", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', 400, "stream"),
        (b'{"model": "gpt-mock", "messages": [{"role": "user", "content": "x"}], "n": true}', 400, "n"),
        (
            b'{"model": "gpt-mock", "messages": [{"role": "user", "content": "x"}], "tools": [{}]}',
            400,
            "tools[0].function",
        ),
        (b'{"model": "gpt-mock", "messages": [{"role": "tool", "content": "x"}]}', 400, "messages[0].tool_call_id"),
        (b'{"model": "gpt-mock", "messages": [{"role": "user", "content": "x"}], "stop": [1]}', 400, "stop"),
        (b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}', 404, "model"),
    ],
)
def test_bad_chat_input_gets_a_named_openai_error(http, body, status, param):
    resp = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == status, resp.text
    err = _is_openai_error(resp)
    assert err["param"] == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "embed-mock"}, "input"),
        ({"model": "embed-mock", "input": []}, "input"),
        ({"model": "embed-mock", "input": [1, "a"]}, "input"),
        ({"model": "embed-mock", "input": "x", "encoding_format": "hex"}, "encoding_format"),
        ({"model": "embed-mock", "input": "x", "dimensions": 0}, "dimensions"),
    ],
)
def test_bad_embeddings_input_gets_a_named_error(http, body, param):
    resp = http.post("/v1/embeddings", json=body)
    assert resp.status_code == 400
    assert _is_openai_error(resp)["param"] == param


def test_oversized_body_is_413(http):
    resp = http.post(
        "/v1/chat/completions", content=b"x" * (9 * 1024 * 1024), headers={"content-type": "application/json"}
    )
    assert resp.status_code == 413
    assert _is_openai_error(resp)["code"] == "request_too_large"


def test_oversized_body_is_caught_by_the_sdk_as_413(client):
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(
            model="gpt-mock", messages=[{"role": "user", "content": "y" * (9 * 1024 * 1024)}]
        )
    assert exc.value.status_code == 413


def test_unknown_path_and_wrong_method(http):
    resp = http.get("/v1/completely/unknown")
    assert resp.status_code == 404 and _is_openai_error(resp)
    resp = http.get("/v1/chat/completions")
    assert resp.status_code == 405 and _is_openai_error(resp)


def test_auth_is_checked_before_the_body(gateway):
    resp = httpx.post(
        f"{gateway.url}/v1/chat/completions", content=b"{garbage", headers={"Authorization": "Bearer nope"}
    )
    assert resp.status_code == 401
    resp = httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT, headers={"Authorization": "Basic abc"})
    assert resp.status_code == 401


def test_openapi_document_is_served(gateway):
    doc = httpx.get(f"{gateway.url}/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/embeddings", "/v1/models"} <= set(doc["paths"])


def test_client_hanging_up_mid_stream_is_logged_and_releases_upstream(gateway, api_key):
    import socket

    body = json.dumps(
        {
            "model": "gpt-mock",
            "stream": True,
            "messages": [{"role": "user", "content": 'a b c d e f [[mock:{"chunk_ms": 200, "chunks": 6}]]'}],
        }
    ).encode()
    sock = socket.create_connection(("127.0.0.1", gateway.port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + api_key.encode() + b"\r\nx-request-id: hangup-test-1\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    assert b"200 OK" in sock.recv(4096)
    sock.close()

    def logged() -> dict | None:
        for line in gateway.log().splitlines():
            if "hangup-test-1" in line and line.startswith("{"):
                return json.loads(line)
        return None

    wait_until(lambda: logged() is not None, timeout=10, what="log line of the abandoned stream")
    assert logged()["status"] == 499
