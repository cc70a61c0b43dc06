"""A client that hangs up while the provider is silent is noticed at once, not at the provider's
next byte: the upstream connection is closed, the reservation released and the request recorded
(499) while the provider still stalls. The mock provider stalls until the test releases it
(``stall``), and tells when the gateway's connection to it closed (``GET /_mock/stalls``), so
every step below is an observed state, never a wait of some length."""

from __future__ import annotations

import socket
import uuid

import orjson
import pytest

from tests.conftest import LOCAL_HTTP, Gateway, MockProvider, wait_until
from tests.test_policies import admin, ledger_rows, new_key

# a provider silent for this long is not timed out by the gateway during a test
PATIENT = {"first_byte": 120, "idle": 120, "total": 300}


def config(mock: MockProvider) -> dict:
    return {
        "router": {"max_attempts": 1},
        "policies": {"local_admission": False},  # every reservation in the budget's own counter
        "providers": [
            {"name": "pp", "kind": "openai", "base_url": f"{mock.url}/v1", "api_keys": ["k"], "timeouts": PATIENT}
        ],
        "models": [
            {
                "name": "priced",
                "deployments": [
                    {"provider": "pp", "model": "m", "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}
                ],
            }
        ],
    }


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    g = Gateway(tmp_root, config(module_mock), services)
    yield g
    g.stop()


def _stalls(mock: MockProvider) -> dict:
    return LOCAL_HTTP.get(f"{mock.url}/_mock/stalls").json()


def _release(mock: MockProvider, key: str) -> None:
    LOCAL_HTTP.post(f"{mock.url}/_mock/release", json={"key": key}).raise_for_status()


def _post(gw: Gateway, api_key: str, rid: str, body: dict) -> socket.socket:
    raw = orjson.dumps(body)
    sock = socket.create_connection(("127.0.0.1", gw.port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + api_key.encode() + b"\r\nx-request-id: " + rid.encode() + b"\r\n"
        b"Content-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw
    )
    return sock


def _hang_up_during_stall(gw, mock, services, *, stream: bool, stall_after: int, read_until: bytes | None):
    key = new_key(gw, budget_usd=1.0, budget_period="daily")
    stall = f"stall-{uuid.uuid4().hex[:8]}"
    rid = f"hangup-{uuid.uuid4().hex[:8]}"
    directive = {"stall": stall, "stall_after": stall_after, "chunks": 4, "reply": "one two three four five six"}
    body = {
        "model": "priced",
        "stream": stream,
        "max_tokens": 50,
        "messages": [{"role": "user", "content": f"hi [[mock:{orjson.dumps(directive).decode()}]]"}],
    }
    budget = f"/admin/budgets/{key['budget_id']}"
    sock = _post(gw, key["key"], rid, body)
    try:
        wait_until(lambda: _stalls(mock).get(stall) == "waiting", timeout=20, what="the provider stalling")
        if read_until is not None:  # part of the answer reached the client before the stall
            seen = b""
            while read_until not in seen:
                got = sock.recv(65536)
                assert got, seen
                seen += got
        assert admin(gw, "GET", budget).json()["reserved_usd"] > 0  # the request holds its reservation
    finally:
        sock.close()  # the client hangs up; the provider stays silent
    try:
        # Before the provider sends anything more: the gateway's connection to it is closed, the
        # reservation released, and the request recorded as the client's hang-up.
        wait_until(lambda: _stalls(mock).get(stall) == "hung_up", timeout=20, what="the upstream connection closed")
        wait_until(lambda: admin(gw, "GET", budget).json()["reserved_usd"] == 0, timeout=20, what="released")
        wait_until(lambda: ledger_rows(services[0], "client_request_id = $1", rid), timeout=20, what="ledger row")
        assert _stalls(mock)[stall] == "hung_up"  # (still: nothing was released by the test)
    finally:
        _release(mock, stall)
    row = ledger_rows(services[0], "client_request_id = $1", rid)[0]
    assert row["status"] == 499
    assert row["prompt_tokens"] > 0  # the prompt was sent: it is charged (estimated)
    state = admin(gw, "GET", budget).json()
    assert state["spent_usd"] == pytest.approx(row["cost_usd"])
    return row


def test_stream_hangup_before_the_first_byte_closes_the_upstream_and_settles(gw, module_mock, services):
    """The provider sent its headers and the role chunk, then nothing: the client has heard
    nothing when it leaves."""
    row = _hang_up_during_stall(gw, module_mock, services, stream=True, stall_after=1, read_until=None)
    assert row["completion_tokens"] == 0


def test_stream_hangup_mid_stream_closes_the_upstream_and_charges_what_was_relayed(gw, module_mock, services):
    """Two content chunks relayed, then the provider stalls and the client leaves."""
    row = _hang_up_during_stall(gw, module_mock, services, stream=True, stall_after=3, read_until=b"two")
    assert row["completion_tokens"] >= 2


def test_stream_hangup_of_an_unstreamed_request_closes_the_upstream_and_settles(gw, module_mock, services):
    """The same for a request without ``stream``: the provider has not answered yet."""
    row = _hang_up_during_stall(gw, module_mock, services, stream=False, stall_after=0, read_until=None)
    assert row["completion_tokens"] == 0


def test_stream_after_a_released_stall_is_answered_in_full(gw, module_mock, api_key):
    """The stall directive itself: released, the stream goes on to its end (the tests above
    stand on it)."""
    stall = f"stall-{uuid.uuid4().hex[:8]}"
    directive = orjson.dumps({"stall": stall, "stall_after": 2, "reply": "alpha beta gamma"}).decode()
    key = new_key(gw)
    import threading

    import openai

    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key["key"], max_retries=0, timeout=60)
    texts: list[str] = []

    def read() -> None:
        stream = client.chat.completions.create(
            model="priced", stream=True, messages=[{"role": "user", "content": f"hi [[mock:{directive}]]"}]
        )
        texts.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))

    t = threading.Thread(target=read)
    t.start()
    wait_until(lambda: _stalls(module_mock).get(stall) == "waiting", timeout=20, what="the stall")
    _release(module_mock, stall)
    t.join(60)
    assert texts == ["alpha beta gamma"]
    assert _stalls(module_mock)[stall] == "released"
