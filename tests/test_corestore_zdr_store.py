"""Zero data retention holds for what the client sends: a request whose key, tenant or headers
require the ``zdr`` tag cannot ask the provider to keep it (``store: true`` with its
``metadata``, ``prompt_cache_retention: "24h"``). It is refused with a 400 naming the field,
before anything is admitted, charged or sent upstream; an agent's turn alike."""

from __future__ import annotations

import uuid

import openai
import pytest

from core.types import Constraints, RequestContext, Route
from gateway.providers.openai import _upstream_payload
from tests.conftest import Gateway, wait_until
from tests.test_policies import admin, ledger_rows, new_key

HELLO = [{"role": "user", "content": "hello"}]


def config(mock) -> dict:
    return {
        "router": {"max_attempts": 1},
        "providers": [{"name": "pp", "kind": "openai", "base_url": f"{mock.url}/v1", "api_keys": ["k"]}],
        "models": [
            {
                "name": "zdr-model",
                "deployments": [
                    {
                        "provider": "pp",
                        "model": "m",
                        "tags": ["zdr"],
                        "input_cost_per_token": 1e-6,
                        "output_cost_per_token": 2e-6,
                    }
                ],
            }
        ],
    }


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    g = Gateway(tmp_root, config(module_mock), services)
    yield g
    g.stop()


@pytest.fixture(scope="module")
def zdr_client(gw):
    key = new_key(gw, require_tags=["zdr"])
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key["key"], max_retries=0, timeout=30) as c:
        yield c


def _refused(call, field: str, mock) -> None:
    mock.clear()
    with pytest.raises(openai.BadRequestError) as exc:
        call()
    err = exc.value.body
    assert err["param"] == field and err["code"] == "retention_not_allowed", err
    assert field in err["message"]
    assert mock.requests() == []  # nothing reached the provider


def test_store_true_under_zdr_key_is_refused_naming_store(gw, zdr_client, module_mock, services):
    def call():
        return zdr_client.chat.completions.create(
            model="zdr-model", messages=HELLO, store=True, metadata={"case": "c-1"}
        )

    _refused(call, "store", module_mock)
    # audited as a refusal, charged nothing
    rid = f"zdr-{uuid.uuid4().hex[:8]}"
    with pytest.raises(openai.BadRequestError) as exc:
        zdr_client.chat.completions.create(
            model="zdr-model", messages=HELLO, store=True, extra_headers={"x-request-id": rid}
        )
    gid = exc.value.response.headers["x-request-id"]
    wait_until(lambda: ledger_rows(services[0], "request_id = $1", gid), timeout=15, what="ledger row")
    row = ledger_rows(services[0], "request_id = $1", gid)[0]
    assert (row["status"], row["cost_usd"], row["provider"], row["prompt_tokens"]) == (400, 0, None, 0)


def test_streamed_store_true_under_zdr_key_is_refused(zdr_client, module_mock):
    _refused(
        lambda: zdr_client.chat.completions.create(model="zdr-model", messages=HELLO, store=True, stream=True),
        "store",
        module_mock,
    )


def test_extended_prompt_cache_under_zdr_key_is_refused(zdr_client, module_mock):
    _refused(
        lambda: zdr_client.chat.completions.create(
            model="zdr-model", messages=HELLO, extra_body={"prompt_cache_retention": "24h"}
        ),
        "prompt_cache_retention",
        module_mock,
    )


def test_store_true_with_zdr_header_is_refused(gw, module_mock):
    key = new_key(gw)
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key["key"], max_retries=0, timeout=30) as c:
        _refused(
            lambda: c.chat.completions.create(
                model="zdr-model", messages=HELLO, store=True, extra_headers={"x-gateway-tags": "zdr"}
            ),
            "store",
            module_mock,
        )


def test_agent_turn_with_store_true_under_zdr_key_is_refused(gw, zdr_client, module_mock):
    name = f"zdrbot-{uuid.uuid4().hex[:6]}"
    r = admin(gw, "POST", "/admin/agents", json={"name": name, "model": "zdr-model", "template": "Be brief."})
    assert r.status_code == 201, r.text
    _refused(
        lambda: zdr_client.chat.completions.create(
            model=f"agent:{name}", messages=HELLO, store=True, metadata={"conversation_id": "conv-zdr-1"}
        ),
        "store",
        module_mock,
    )


def test_zdr_request_without_retention_is_served(zdr_client, module_mock):
    module_mock.clear()
    resp = zdr_client.chat.completions.create(
        model="zdr-model", messages=HELLO, store=False, extra_body={"prompt_cache_retention": "in_memory"}
    )
    assert resp.choices
    sent = module_mock.last()["body"]
    assert sent.get("store") is False and sent.get("prompt_cache_retention") == "in_memory"
    assert "metadata" not in sent


def test_adapter_never_sends_retention_fields_for_a_zdr_request():
    """Calls the gateway builds itself (an agent's steps, its judge) hold to it too."""
    ctx = RequestContext(request_id="r", endpoint="chat", body={}, started=0.0)
    ctx.constraints = Constraints(tags=frozenset({"zdr"}))
    route = Route(model="g", provider="pp", deployment="d", upstream_model="m", api_key=None)
    body = {"messages": HELLO, "store": True, "metadata": {"a": "b"}, "prompt_cache_retention": "24h"}
    payload = _upstream_payload(ctx, body, route)
    assert payload == {"messages": HELLO, "model": "m"}
    assert body["store"] is True  # the caller's body is not changed
    ctx.constraints = Constraints()
    assert _upstream_payload(ctx, body, route)["store"] is True  # without zdr: the client's choice
