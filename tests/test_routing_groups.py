"""Two model groups listing the same provider and model: each entry keeps its own settings.

The router kept one state per ``provider/model``, so the second group to list a deployment got
the first group's: its prices (what budgets and the ledger charge), context window, tags and
weight were ignored. Now each entry keeps its own settings, and entries that call the same
upstream share its health (circuit, latency, in flight) under the upstream's id, which stays
``provider/model`` in headers, the ledger, metrics and the health shared through Redis.
A real gateway process, the OpenAI SDK, the mock provider of loadtest/.
"""

from __future__ import annotations

import uuid

import httpx
import openai
import pytest
import redis

from core.config import ConfigError, parse_config
from tests.conftest import Gateway, started, wait_until
from tests.test_policies import admin, ledger_rows, new_key

U = uuid.uuid4().hex[:8]  # upstream models unique per run: health is shared through the suite's Redis
SAME, NARROW, CIRC, A, B, F, G = (f"{n}-{U}" for n in ("same", "narrow", "circ", "a", "b", "f", "g"))
CHEAP = {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}
PREMIUM = {"input_cost_per_token": 1e-5, "output_cost_per_token": 3e-5}
LONG = " ".join(["word"] * 120)  # ~120 tokens: over a 40-token window
HELLO = [{"role": "user", "content": "hello there"}]


def _dep(model: str, provider: str = "gp", **settings) -> dict:
    return {"provider": provider, "model": model, **settings}


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    cfg = {
        "router": {
            "max_attempts": 3,
            "backoff": {"base": 0.01, "max": 0.02},
            "circuit": {"failures": 2, "window": 30, "cooldown": 60},
        },
        "providers": [
            {"name": "gp", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": [f"gp-{U}"]},
            # every call through this one fails (the mock obeys the x-mock header)
            {
                "name": "bad",
                "kind": "openai",
                "base_url": f"{module_mock.url}/v1",
                "api_keys": [f"bad-{U}"],
                "headers": {"x-mock": '{"status": 500}'},
            },
        ],
        "models": [
            # first the cheap entry, then the same upstream at list price with other tags
            {"name": "cheap", "deployments": [_dep(SAME, tags=["cheap"], **CHEAP)]},
            {"name": "premium", "deployments": [_dep(SAME, tags=["premium"], **PREMIUM)]},
            # a window the operator narrowed, falling back to the same upstream with its full window
            {"name": "narrow", "fallbacks": ["wide"], "deployments": [_dep(NARROW, context_window=40, **CHEAP)]},
            {"name": "wide", "deployments": [_dep(NARROW, context_window=100000, **PREMIUM)]},
            # the same two upstreams, weighted the other way round
            {"name": "to-a", "deployments": [_dep(A, weight=1000), _dep(B, weight=0.001)]},
            {"name": "to-b", "deployments": [_dep(A, weight=0.001), _dep(B, weight=1000)]},
            # a failing upstream, then a fallback group listing it too (heavily weighted) beside another
            {"name": "fa", "fallbacks": ["fb"], "deployments": [_dep(F, "bad", **CHEAP)]},
            {"name": "fb", "deployments": [_dep(F, "bad", weight=1000, **CHEAP), _dep(G, weight=0.001, **PREMIUM)]},
            {"name": "circ-1", "deployments": [_dep(CIRC, **CHEAP)]},
            {"name": "circ-2", "deployments": [_dep(CIRC, **PREMIUM)]},
        ],
    }
    with started(Gateway(tmp_root, cfg, services)) as (g,):
        yield g


def _sdk(gw: Gateway, key: dict) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key["key"], max_retries=0, timeout=60)


def _ledger_row(database_url: str, request_id: str) -> dict:
    wait_until(lambda: ledger_rows(database_url, "request_id = $1", request_id), timeout=10, what="ledger row")
    return ledger_rows(database_url, "request_id = $1", request_id)[0]


def _budget(gw: Gateway, key: dict) -> dict:
    r = admin(gw, "POST", "/admin/budgets", json={"scope": "key", "scope_value": key["id"], "limit_usd": 10.0})
    assert r.status_code == 201, r.text
    return r.json()


@pytest.mark.parametrize(("group", "prices"), [("cheap", CHEAP), ("premium", PREMIUM)])
def test_each_group_charges_its_own_price_for_the_same_upstream(gw, services, group, prices):
    """The ledger's cost and the budget's spend follow the prices of the group's own entry."""
    key = new_key(gw)
    budget = _budget(gw, key)
    raw = _sdk(gw, key).chat.completions.with_raw_response.create(model=group, messages=HELLO)
    assert raw.headers["x-gateway-deployment"] == f"gp/{SAME}"  # the upstream's id, as before
    row = _ledger_row(services[0], raw.parse()._request_id)
    assert (row["served_model"], row["deployment"]) == (group, f"gp/{SAME}")
    expected = row["prompt_tokens"] * prices["input_cost_per_token"]
    expected += row["completion_tokens"] * prices["output_cost_per_token"]
    assert row["completion_tokens"] > 0 and row["cost_usd"] == pytest.approx(expected)

    def spent() -> float:
        return admin(gw, "GET", f"/admin/budgets/{budget['id']}").json()["spent_usd"]

    wait_until(lambda: spent() > 0, timeout=10, what="budget spend")
    assert spent() == pytest.approx(expected, rel=1e-3)


def test_each_group_routes_by_its_own_tags(gw, api_key):
    """A request requiring ``premium`` is served by the premium group's entry and refused by the
    cheap group's, though both call the same upstream."""
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=api_key, max_retries=0, timeout=60)
    tags = {"x-gateway-tags": "premium"}
    assert client.chat.completions.create(model="premium", messages=HELLO, extra_headers=tags).choices
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="cheap", messages=HELLO, extra_headers=tags)
    assert err.value.code == "no_deployment_meets_constraints"
    assert client.chat.completions.create(model="cheap", messages=HELLO, extra_headers={"x-gateway-tags": "cheap"})


def test_each_group_has_its_own_context_window_and_falls_back_to_the_other(gw, services, api_key):
    """A prompt over the narrowed window of ``narrow`` falls back to ``wide`` — the same upstream
    with its full window — and is charged at ``wide``'s price; ``wide`` serves it directly too."""
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=api_key, max_retries=0, timeout=60)
    long = [{"role": "user", "content": LONG}]
    for group in ("wide", "narrow"):
        raw = client.chat.completions.with_raw_response.create(model=group, messages=long)
        row = _ledger_row(services[0], raw.parse()._request_id)
        assert (row["model"], row["served_model"], row["deployment"]) == (group, "wide", f"gp/{NARROW}")
        assert row["fallbacks"] == (1 if group == "narrow" else 0)
        expected = row["prompt_tokens"] * 1e-5 + row["completion_tokens"] * 3e-5
        assert row["cost_usd"] == pytest.approx(expected)
    # a short prompt fits the narrow window: served by narrow itself, at its price
    raw = client.chat.completions.with_raw_response.create(model="narrow", messages=HELLO)
    row = _ledger_row(services[0], raw.parse()._request_id)
    assert row["served_model"] == "narrow" and row["fallbacks"] == 0
    assert row["cost_usd"] == pytest.approx(row["prompt_tokens"] * 1e-6 + row["completion_tokens"] * 2e-6)


def test_a_fallback_group_skips_the_upstream_that_just_failed_in_the_first(gw, services, api_key, module_mock):
    """``fa``'s upstream fails; ``fb`` lists the same upstream (weight 1000) beside another: the
    request is not sent to the failed upstream again but to the other, at ``fb``'s price."""
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=api_key, max_retries=0, timeout=60)
    module_mock.clear()
    raw = client.chat.completions.with_raw_response.create(model="fa", messages=HELLO)
    assert raw.headers["x-gateway-deployment"] == f"gp/{G}"
    row = _ledger_row(services[0], raw.parse()._request_id)
    assert (row["served_model"], row["attempts"], row["fallbacks"]) == ("fb", 2, 1)
    assert row["cost_usd"] == pytest.approx(row["prompt_tokens"] * 1e-5 + row["completion_tokens"] * 3e-5)
    assert [r["body"]["model"] for r in module_mock.requests()] == [F, G]


def test_each_group_weighs_its_own_entries(gw, api_key):
    """``to-a`` and ``to-b`` list the same two upstreams with opposite weights (1000 : 0.001)."""
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=api_key, max_retries=0, timeout=60)
    for group, upstream in (("to-a", A), ("to-b", B)):
        served = {
            client.chat.completions.with_raw_response.create(model=group, messages=HELLO).headers[
                "x-gateway-deployment"
            ]
            for _ in range(8)
        }
        assert served == {f"gp/{upstream}"}, group


def test_a_circuit_opened_through_one_group_protects_the_other(gw, api_key, module_mock, services):
    """The circuit belongs to the upstream: failures through ``circ-1`` open it for ``circ-2``
    too (no request reaches the upstream), under the upstream's id in metrics and in Redis."""
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=api_key, max_retries=0, timeout=60)
    failing = [{"role": "user", "content": 'x [[mock:{"status": 500}]]'}]
    with pytest.raises(openai.InternalServerError):  # 502: two failures (a retry) open the circuit
        client.chat.completions.create(model="circ-1", messages=failing)
    module_mock.clear()
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model="circ-2", messages=HELLO)
    assert err.value.status_code == 503 and err.value.code == "no_healthy_deployment"
    assert not [r for r in module_mock.requests() if (r.get("body") or {}).get("model") == CIRC]
    text = httpx.get(f"{gw.url}/metrics").text
    lines = [ln for ln in text.splitlines() if ln.startswith("gateway_circuit_state{") and CIRC in ln]
    assert lines == [f'gateway_circuit_state{{deployment="gp/{CIRC}"}} 2.0'], lines
    r = redis.Redis.from_url(services[1])
    try:
        assert r.exists(f"gateway:health:circuit:::gp/{CIRC}")  # what another replica loads at start-up
    finally:
        r.close()


def test_v1_models_lists_both_groups(gw, api_key):
    models = httpx.get(f"{gw.url}/v1/models", headers={"Authorization": f"Bearer {api_key}"}).json()["data"]
    ids = [m["id"] for m in models]
    assert {"cheap", "premium", "narrow", "wide"} <= set(ids) and len(ids) == len(set(ids))


# ---- one group listing an upstream twice ---------------------------------------------------------


def _config(*deployments: dict) -> dict:
    return {
        "providers": [{"name": "gp", "kind": "openai", "base_url": "http://127.0.0.1:1/v1", "api_keys": ["k"]}],
        "models": [{"name": "g", "deployments": list(deployments)}],
    }


def test_one_group_listing_an_upstream_twice_with_other_settings_is_refused_naming_the_field():
    with pytest.raises(ConfigError) as err:
        parse_config(_config(_dep("m", **CHEAP), _dep("x"), _dep("m", **PREMIUM)))
    assert err.value.problems == [
        "models[0].deployments[2].input_cost_per_token: gp/m is deployments[0] of this group already, "
        "with another input_cost_per_token; list it once"
    ]
    with pytest.raises(ConfigError) as err:
        parse_config(_config(_dep("m"), _dep("m", tags=["eu"])))
    assert err.value.problems[0].startswith("models[0].deployments[1].tags: ")


def test_one_group_listing_an_upstream_twice_alike_still_loads():
    """As before: the same entry twice is two equal candidates (twice the share of the group)."""
    cfg = parse_config(_config(_dep("m", weight=2), _dep("m", weight=2)))
    assert len(cfg.models[0].deployments) == 2
