"""A hard budget reserves a request's prompt plus its ``max_tokens``; a provider that ignores
``max_tokens`` (the mock's ``ignore_max_tokens``) streamed on and its reported usage was charged,
past the reservation and past the budget's limit. The relay now ends such a stream at the
reserved output, as OpenAI ends one cut at ``max_tokens``."""

from __future__ import annotations

import asyncio
import collections
import uuid

import httpx
import openai
import orjson
import pytest

from tests.conftest import LOCAL_HTTP, Gateway, MockProvider, wait_until
from tests.test_policies import admin, ledger_rows, new_key

REPLY = " ".join(f"w{i}" for i in range(400))  # far more than max_tokens


def config(mock: MockProvider) -> dict:
    return {
        "router": {"max_attempts": 1},
        "policies": {"local_admission": False},
        "providers": [{"name": "pp", "kind": "openai", "base_url": f"{mock.url}/v1", "api_keys": ["k"]}],
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


def _messages(**directive) -> list[dict]:
    plan = {"reply_words": 400, "chunks": 100, "ignore_max_tokens": True, **directive}
    return [{"role": "user", "content": f"hi [[mock:{orjson.dumps(plan).decode()}]]"}]


def test_stream_past_max_tokens_is_cut_at_the_reservation_of_a_hard_budget(gw, services):
    limit = 0.0002  # one request's reservation fits; the whole answer (~1600 output tokens) does not
    key = new_key(gw, budget_usd=limit, budget_period="daily")
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key["key"], max_retries=0, timeout=60)
    stream = client.chat.completions.with_raw_response.create(
        model="priced",
        stream=True,
        max_tokens=20,
        stream_options={"include_usage": True},
        messages=_messages(),
    )
    rid = stream.headers["x-request-id"]
    chunks = list(stream.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text and text in REPLY and len(text) < len(REPLY) // 4, len(text)
    assert finishes == ["length"]  # one last chunk, as OpenAI ends a stream cut at max_tokens
    assert chunks[-1].choices == [] and chunks[-1].usage is not None  # the usage chunk asked for
    assert 0 < chunks[-1].usage.completion_tokens <= 20
    wait_until(lambda: ledger_rows(services[0], "request_id = $1", rid), timeout=15, what="ledger row")
    row = ledger_rows(services[0], "request_id = $1", rid)[0]
    assert row["status"] == 200 and 0 < row["completion_tokens"] <= 20
    state = admin(gw, "GET", f"/admin/budgets/{key['budget_id']}").json()
    assert state["spent_usd"] <= limit, state
    assert state["spent_usd"] == pytest.approx(row["cost_usd"]) and state["reserved_usd"] == 0


def test_stream_cut_without_include_usage_ends_with_length_and_done(gw):
    key = new_key(gw, budget_usd=0.0002, budget_period="daily")

    body = {"model": "priced", "stream": True, "max_tokens": 10, "messages": _messages()}
    with httpx.stream(
        "POST", f"{gw.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key['key']}"}
    ) as resp:
        raw = b"".join(resp.iter_bytes())
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    last = orjson.loads(events[-2][6:])
    assert last["choices"][0]["finish_reason"] == "length" and last["choices"][0]["delta"] == {}
    assert last["object"] == "chat.completion.chunk" and last["id"].startswith("chatcmpl-mock")
    assert not any(b'"usage":{' in e for e in events)  # not asked for


def test_stream_twenty_concurrent_streams_past_max_tokens_never_overshoot_a_hard_budget(gw):
    limit = 0.0006  # a few reservations at once; each whole answer alone would pass it
    key = new_key(gw, budget_usd=limit, budget_period="daily")

    async def run() -> collections.Counter:
        client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=key["key"], max_retries=0, timeout=60)
        outcomes: collections.Counter = collections.Counter()

        async def one() -> None:
            try:
                stream = await client.chat.completions.create(
                    model="priced", stream=True, max_tokens=20, messages=_messages(chunk_ms=1)
                )
                async for _ in stream:
                    pass
                outcomes["ok"] += 1
            except openai.RateLimitError:
                outcomes["refused"] += 1

        await asyncio.gather(*(one() for _ in range(20)))
        await client.close()
        return outcomes

    outcomes = asyncio.run(run())
    assert outcomes["ok"] >= 2 and outcomes["ok"] + outcomes["refused"] == 20, outcomes
    state = admin(gw, "GET", f"/admin/budgets/{key['budget_id']}").json()
    assert state["spent_usd"] <= limit, state
    assert state["reserved_usd"] == 0


def test_stream_unstreamed_answer_past_max_tokens_is_charged_in_full(gw, services):
    """Not truncated: the provider produced (and bills) the whole answer, and the client got it;
    cutting the body would charge less than was spent. The budget records the overshoot as it
    happened (spent past the limit, the ledger with the provider's counts) and refuses what follows."""
    limit = 0.0002
    key = new_key(gw, budget_usd=limit, budget_period="daily")
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key["key"], max_retries=0, timeout=60)
    resp = client.chat.completions.with_raw_response.create(model="priced", max_tokens=20, messages=_messages())
    answer = resp.parse()
    assert answer.choices[0].message.content == REPLY and answer.usage.completion_tokens == 400
    rid = resp.headers["x-request-id"]
    wait_until(lambda: ledger_rows(services[0], "request_id = $1", rid), timeout=15, what="ledger row")
    row = ledger_rows(services[0], "request_id = $1", rid)[0]
    assert row["completion_tokens"] == 400
    assert row["cost_usd"] == pytest.approx(row["prompt_tokens"] * 1e-6 + 400 * 2e-6)
    state = admin(gw, "GET", f"/admin/budgets/{key['budget_id']}").json()
    assert state["spent_usd"] == pytest.approx(row["cost_usd"]) and state["spent_usd"] > limit
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="priced", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert refused.value.code == "insufficient_quota"


def test_stream_cut_closes_the_upstream_connection(gw, module_mock):
    """The provider still streaming (it stalls at its 50th event, far past the cut) has its
    connection closed by the gateway once the stream was cut: the stall sees the hang-up."""
    stall = f"stall-{uuid.uuid4().hex[:8]}"
    key = new_key(gw, budget_usd=0.0002, budget_period="daily")
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key["key"], max_retries=0, timeout=60)
    try:
        chunks = list(
            client.chat.completions.create(
                model="priced", stream=True, max_tokens=10, messages=_messages(stall=stall, stall_after=50)
            )
        )
        assert chunks[-1].choices[0].finish_reason == "length"
        wait_until(
            lambda: LOCAL_HTTP.get(f"{module_mock.url}/_mock/stalls").json().get(stall) == "hung_up",
            timeout=20,
            what="the upstream connection closed",
        )
    finally:
        LOCAL_HTTP.post(f"{module_mock.url}/_mock/release", json={"key": stall})
