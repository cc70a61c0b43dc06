"""``metadata`` on chat completions: the gateway's own (attribution, an agent's conversation id)
is not sent to an OpenAI provider unless the client asked OpenAI to store the completion — OpenAI
answers 400 "The 'metadata' parameter is only allowed when 'store' is enabled" to it otherwise,
and the mock provider answers as OpenAI does."""

from __future__ import annotations

import uuid

import openai
import pytest

from tests.conftest import Gateway
from tests.test_idempotency import _config
from tests.test_policies import new_key


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    g = Gateway(tmp_root, _config(module_mock), services)
    yield g
    g.stop()


def _client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=new_key(gw)["key"], max_retries=0, timeout=30)


@pytest.mark.parametrize("stream", [False, True])
def test_attribution_metadata_is_the_gateways_and_not_sent_upstream(gw, module_mock, stream):
    text = f"tagged {uuid.uuid4().hex[:8]}"
    resp = _client(gw).chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": text}],
        metadata={"tags": "vip,eu", "customer": "c-1"},
        stream=stream,
    )
    if stream:
        assert "".join(c.choices[0].delta.content or "" for c in resp if c.choices)
    else:
        assert resp.choices[0].message.content
    sent = [r["body"] for r in module_mock.requests() if text in str(r["body"].get("messages"))]
    assert sent and all("metadata" not in r for r in sent)


def test_metadata_with_store_goes_to_the_provider(gw, module_mock):
    text = f"stored {uuid.uuid4().hex[:8]}"
    _client(gw).chat.completions.create(
        model="m", messages=[{"role": "user", "content": text}], store=True, metadata={"project": "p1"}
    )
    sent = [r["body"] for r in module_mock.requests() if text in str(r["body"].get("messages"))]
    assert sent[-1]["metadata"] == {"project": "p1"} and sent[-1]["store"] is True
