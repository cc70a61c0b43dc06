"""What a provider reports as usage, through a real gateway (mock provider speaking OpenAI's and
Anthropic's formats, real Valkey and PostgreSQL, the OpenAI SDK): counts that are no counts —
negative, text, null, booleans — are never billed as given (a negative one would credit a
budget) nor trusted as zero (the answer would be free): the gateway bills its own estimate."""

from __future__ import annotations

import json
import uuid

import openai
import pytest

from tests.conftest import Gateway, wait_until
from tests.test_policies import ledger_rows, new_key

PRICE = {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    cfg = {
        "router": {"max_attempts": 1},
        "providers": [
            {"name": "po", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k1"]},
            {"name": "pa", "kind": "anthropic", "base_url": module_mock.url, "api_keys": ["k2"]},
        ],
        "models": [
            {"name": "o", "deployments": [{"provider": "po", "model": "m", **PRICE}]},
            {"name": "a", "deployments": [{"provider": "pa", "model": "mock-claude", **PRICE}]},
        ],
    }
    g = Gateway(tmp_root, cfg, services)
    yield g
    g.stop()


def _ask(usage: dict) -> list[dict]:
    return [{"role": "user", "content": "tell me about many things [[mock:" + json.dumps({"usage": usage}) + "]]"}]


NO_COUNTS = [
    ("o", {"prompt_tokens": -1000, "completion_tokens": -5, "total_tokens": -1005}),
    ("o", {"prompt_tokens": None, "completion_tokens": None}),
    ("o", {"prompt_tokens": "many", "completion_tokens": True}),
    ("a", {"input_tokens": -1000, "output_tokens": -5}),
    ("a", {"input_tokens": "many", "output_tokens": 3}),
]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize(("model", "usage"), NO_COUNTS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(NO_COUNTS)])
def test_counts_that_are_no_counts_are_estimated_never_billed_as_given(gw, services, model, usage, stream):
    key = new_key(gw, tenant=f"usage-{uuid.uuid4().hex[:6]}")["key"]
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)
    if stream:  # the usual loop of a client that did not ask for usage: every chunk has a choice
        raw = client.chat.completions.with_raw_response.create(model=model, messages=_ask(usage), stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in raw.parse())
    else:
        raw = client.chat.completions.with_raw_response.create(model=model, messages=_ask(usage))
        text = raw.parse().choices[0].message.content
    assert "many things" in text
    rid = raw.headers["x-request-id"]
    wait_until(lambda: ledger_rows(services[0], "request_id = $1", rid), timeout=15, what="the ledger row")
    row = ledger_rows(services[0], "request_id = $1", rid)[0]
    assert row["usage_estimated"] is True and row["prompt_tokens"] > 0 and row["completion_tokens"] > 0
    assert row["cost_usd"] == pytest.approx(row["prompt_tokens"] * 1e-6 + row["completion_tokens"] * 2e-6)
