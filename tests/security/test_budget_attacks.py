"""Attacks on the money (issue #11, items 11 and 12): concurrent requests racing a budget,
requests that cost more than their reservation says, across two replicas."""

from __future__ import annotations

import asyncio
import collections
import uuid

import httpx
import openai
import pytest

from tests.conftest import Gateway, MockProvider
from tests.test_policies import HELLO, admin, new_key


def priced_cfg(mock: MockProvider) -> dict:
    key = f"k-{uuid.uuid4().hex[:6]}"
    dep = {"provider": "pp", "model": "m"}
    return {
        "router": {"max_attempts": 1},
        "providers": [{"name": "pp", "kind": "openai", "base_url": f"{mock.url}/v1", "api_keys": [key]}],
        "models": [
            {"name": "priced", "deployments": [{**dep, "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}]},
            {"name": "cheap", "deployments": [{**dep, "input_cost_per_token": 1e-6, "output_cost_per_token": 1e-6}]},
            {
                "name": "pricey",
                "deployments": [{**dep, "model": "m2", "input_cost_per_token": 1e-6, "output_cost_per_token": 1e-4}],
            },
            {
                "name": "cheap-with-fallback",
                "fallbacks": ["pricey"],
                "deployments": [{**dep, "input_cost_per_token": 1e-6, "output_cost_per_token": 1e-6}],
            },
            {"name": "routed", "rules": [{"when": {"metadata": {"tier": "gold"}}, "use": "pricey"}, {"use": "cheap"}]},
        ],
    }


@pytest.fixture(scope="module")
def replicas(tmp_root, services, module_mock):
    a, b = Gateway(tmp_root, priced_cfg(module_mock), services), Gateway(tmp_root, priced_cfg(module_mock), services)
    yield a, b
    a.stop()
    b.stop()


def race(replicas, key: str, n: int, **kw) -> collections.Counter:
    """``n`` concurrent requests, alternating between the replicas; outcome codes counted."""

    async def run() -> collections.Counter:
        clients = [openai.AsyncOpenAI(base_url=f"{g.url}/v1", api_key=key, max_retries=0) for g in replicas]
        outcomes: collections.Counter = collections.Counter()

        async def one(i: int) -> None:
            try:
                await clients[i % 2].chat.completions.create(
                    model=kw.get("model", "priced"), messages=HELLO, max_tokens=kw.get("max_tokens", 5)
                )
                outcomes["ok"] += 1
            except openai.RateLimitError as exc:
                outcomes[exc.code] += 1

        await asyncio.gather(*(one(i) for i in range(n)))
        for c in clients:
            await c.close()
        return outcomes

    return asyncio.run(run())


def test_item11_hard_budget_is_never_overshot_by_concurrent_requests(replicas):
    a, _ = replicas
    limit = 0.0002  # about 13 requests' worth (9 prompt + 3 completion tokens ≈ 1.5e-5 USD each)
    key = new_key(a, budget_usd=limit, budget_period="daily")
    total = collections.Counter()
    for _ in range(30):  # waves of 50 at once until it is used up (bounded)
        total += race(replicas, key["key"], 50)
        if total["insufficient_quota"]:
            break
    state = admin(a, "GET", f"/admin/budgets/{key['budget_id']}").json()
    assert state["enforcement"] == "hard"
    assert state["spent_usd"] <= limit, state  # never past the limit, however many raced
    assert state["reserved_usd"] == 0
    assert total["ok"] >= 5 and total["insufficient_quota"] > 0
    # the 100 % alert fired, once, when the budget was exhausted, although spend stops short
    assert state["alerts_fired"] == [0.5, 0.8, 1.0]


def test_item11_soft_budget_keeps_admitting_while_spend_is_below_the_limit(replicas):
    a, _ = replicas
    # One request reserves 9e-6 + 2000 * 2e-6 ≈ 0.004 USD, more than the 0.001 left of each budget.
    hard = new_key(a)
    soft = new_key(a)
    for key, enforcement in ((hard, "hard"), (soft, "soft")):
        admin(
            a,
            "POST",
            "/admin/budgets",
            json={"scope": "key", "scope_value": key["id"], "limit_usd": 0.001, "enforcement": enforcement},
        ).raise_for_status()
    client = openai.OpenAI(base_url=f"{a.url}/v1", api_key=soft["key"], max_retries=0)
    assert client.chat.completions.create(model="priced", messages=HELLO, max_tokens=2000).choices
    client = openai.OpenAI(base_url=f"{a.url}/v1", api_key=hard["key"], max_retries=0)
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="priced", messages=HELLO, max_tokens=2000)
    assert err.value.code == "budget_too_small"
    # a request that fits is served
    assert client.chat.completions.create(model="priced", messages=HELLO, max_tokens=5).choices


def reservation_refused(gw: Gateway, key: str, **kw) -> bool:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)
    try:
        client.chat.completions.create(messages=HELLO, **kw)
    except openai.RateLimitError as exc:
        assert exc.code == "budget_too_small", exc
        return True
    return False


def test_item12_reservation_counts_every_choice_of_n(replicas):
    a, _ = replicas
    key = new_key(a, budget_usd=0.0003)  # 1 choice of 100 tokens at 1e-6 fits; 4 do not
    assert not reservation_refused(a, key["key"], model="cheap", max_tokens=100)
    assert reservation_refused(a, key["key"], model="cheap", max_tokens=100, n=4)


def test_item12_reservation_prices_the_fallbacks_and_rule_targets_a_request_may_reach(replicas):
    a, _ = replicas
    key = new_key(a, budget_usd=0.001)  # 100 tokens at 1e-6 fit; at the fallback's 1e-4 they do not
    assert not reservation_refused(a, key["key"], model="cheap", max_tokens=100)
    assert reservation_refused(a, key["key"], model="cheap-with-fallback", max_tokens=100)
    assert reservation_refused(a, key["key"], model="routed", max_tokens=100)


def test_item11_a_request_without_max_tokens_cannot_overshoot_a_hard_budget(replicas, module_mock):
    """Found by review: the reservation assumed default_max_output tokens, but nothing held the
    provider to it, and the character estimate of the prompt could be fooled."""
    a, _ = replicas
    limit = 0.01
    key = new_key(a, budget_usd=limit)
    client = openai.OpenAI(base_url=f"{a.url}/v1", api_key=key["key"], max_retries=0)
    module_mock.clear()
    long_echo = [{"role": "user", "content": "w " * 3000}]  # the mock echoes it: 3,000+ output tokens
    try:
        client.chat.completions.create(model="priced", messages=long_echo)
    except openai.RateLimitError:
        pass
    sent = module_mock.requests()
    assert sent and all(r["body"].get("max_completion_tokens") == 1024 for r in sent)  # the reserved bound
    spent = admin(a, "GET", f"/admin/budgets/{key['budget_id']}").json()["spent_usd"]
    assert spent <= limit


def test_item8_a_key_held_to_its_own_budget_cannot_mint_keys_outside_it(replicas):
    a, _ = replicas
    boss = new_key(a, tenant="t-minting", scopes=["admin"], budget_usd=0.001)
    r = httpx.post(
        f"{a.url}/admin/keys", headers={"Authorization": f"Bearer {boss['key']}"}, json={"name": "child"}, timeout=30
    )
    assert r.status_code == 403 and r.json()["error"]["code"] == "key_wider_than_minter"


def test_item9_a_field_fixed_to_one_value_cannot_be_dodged_by_leaving_it_out(replicas):
    a, _ = replicas
    key = new_key(a, tenant="t-fixed", attribution={"customer": ["acme"]})
    bud = admin(
        a,
        "POST",
        "/admin/budgets",
        json={"tenant": "t-fixed", "scope": "customer", "scope_value": "acme", "limit_usd": 1},
    ).json()
    client = openai.OpenAI(base_url=f"{a.url}/v1", api_key=key["key"], max_retries=0)
    client.chat.completions.create(model="priced", messages=HELLO, max_tokens=5)  # names no customer
    assert admin(a, "GET", f"/admin/budgets/{bud['id']}").json()["spent_usd"] > 0
