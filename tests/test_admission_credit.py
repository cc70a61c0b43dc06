"""Admission credit (policies/credit.py): replicas admit from leases of large remaining limits
without a Redis round trip — and still never pass a hard budget or a rate limit, and a replica
that dies stops holding budget within seconds. Two gateway processes over one Redis."""

from __future__ import annotations

import asyncio
import collections
import re
import signal
import time

import httpx
import openai
import pytest

from tests.conftest import Gateway, wait_until
from tests.test_policies import HELLO, admin, cfg, new_key

# Small leases, so a test's budget of a few dozen requests still lends some.
LEASES = {"policies": {"lease_requests": 4, "lease_headroom": 4}}


@pytest.fixture(scope="module")
def pair(tmp_root, services, module_mock):
    a = Gateway(tmp_root, cfg(module_mock, **LEASES), services)
    b = Gateway(tmp_root, cfg(module_mock, **LEASES), services)
    yield a, b
    a.stop()
    b.stop()


def local_admits(*gateways: Gateway) -> float:
    total = 0.0
    for gw in gateways:
        text = httpx.get(f"{gw.url}/metrics", timeout=30).text
        found = re.search(r"^gateway_admitted_from_credit_total (\S+)$", text, re.M)
        total += float(found.group(1)) if found else 0.0
    return total


def one_request_cost(gw: Gateway) -> float:
    """What one test request costs (its reservation under a hard budget is about 2.5 times
    that: the whole prompt and ``max_tokens`` at the highest price), from the admin API."""
    key = new_key(gw, budget_usd=1000.0, budget_period="daily")
    r = chat(gw, key["key"])
    assert r.status_code == 200
    return admin(gw, "GET", f"/admin/budgets/{key['budget_id']}").json()["spent_usd"]


def chat(gw: Gateway, key: str) -> httpx.Response:
    return httpx.post(
        f"{gw.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "priced", "messages": HELLO, "max_tokens": 5},
        timeout=30,  # (httpx's 5 s default: a loaded host's slow answer was a ReadTimeout)
    )


def test_leased_admission_never_overshoots_a_hard_budget_across_replicas(pair):
    a, b = pair
    cost = one_request_cost(a)
    limit = round(80 * cost, 9)  # room for leases at first, then none near the end
    key = new_key(a, budget_usd=limit, budget_period="daily")
    before = local_admits(a, b)

    async def run() -> collections.Counter:
        clients = [openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=key["key"], max_retries=0) for gw in (a, b)]
        outcomes: collections.Counter = collections.Counter()
        sem = asyncio.Semaphore(16)

        async def one(i: int) -> None:
            async with sem:
                try:
                    await clients[i % 2].chat.completions.create(model="priced", messages=HELLO, max_tokens=5)
                    outcomes["ok"] += 1
                except openai.RateLimitError as exc:
                    outcomes[exc.code] += 1

        await asyncio.gather(*(one(i) for i in range(300)))
        for c in clients:
            await c.close()
        return outcomes

    outcomes = asyncio.run(run())
    assert local_admits(a, b) > before, "some requests were admitted from credit"
    state = admin(a, "GET", f"/admin/budgets/{key['budget_id']}").json()
    assert state["spent_usd"] <= limit + 1e-12, (state, outcomes)
    assert outcomes["ok"] >= 40, outcomes  # leases did not strand most of the budget
    assert outcomes["insufficient_quota"] + outcomes["budget_reserved"] == 300 - outcomes["ok"]

    # every reservation was settled, and the leases are given back once their credit expires
    def held() -> tuple[float, float]:
        state = admin(a, "GET", f"/admin/budgets/{key['budget_id']}").json()
        return state["reserved_usd"], state["leased_usd"]

    wait_until(lambda: held() == (0, 0), timeout=10, what="no reservation or lease left")


def test_leased_admission_keeps_a_rate_limit_across_replicas(pair):
    a, b = pair
    # one minute's window: start early enough in one to finish inside it
    wait_until(lambda: time.time() % 60 <= 40, timeout=65, what="the first 40 s of a minute")
    key = new_key(a, rpm=120)  # leases of 4 requests (120 // 8 > 4)
    before = local_admits(a, b)
    ok = sum(chat((a, b)[i % 2], key["key"]).status_code == 200 for i in range(160))
    assert local_admits(a, b) > before
    # Never more than the limit; at most each replica's unused lease short of it.
    assert 120 - 2 * 4 <= ok <= 120


def test_a_dead_replicas_lease_stops_holding_budget_within_seconds(tmp_root, services, module_mock, pair):
    survivor, _ = pair
    cost = one_request_cost(survivor)
    limit = round(60 * cost, 9)  # about 24 requests' reservations: the first one gets a lease
    key = new_key(survivor, budget_usd=limit, budget_period="daily")
    victim = Gateway(tmp_root, cfg(module_mock, **LEASES), services)
    try:
        assert chat(victim, key["key"]).status_code == 200  # takes a lease of 4 requests' worth
        victim.stop(signal.SIGKILL)  # before its renewer gives the credit back
    finally:
        victim.stop()
    dead = admin(survivor, "GET", f"/admin/budgets/{key['budget_id']}").json()["leased_usd"]
    assert dead > 0, "the victim died holding a lease"
    # The survivor spends most of the budget at once, so that what follows one request at a
    # time (a couple of dozen requests on a loaded host outlived the dead lease's 5 s) is short.
    burst = max(0, int((limit - dead) / cost) - 10)

    async def spend() -> None:
        sem = asyncio.Semaphore(8)
        async with httpx.AsyncClient(base_url=survivor.url, timeout=30) as client:

            async def one() -> None:
                async with sem:
                    await client.post(
                        "/v1/chat/completions",
                        headers={"Authorization": f"Bearer {key['key']}"},
                        json={"model": "priced", "messages": HELLO, "max_tokens": 5},
                    )

            await asyncio.gather(*(one() for _ in range(burst)))

    asyncio.run(spend())
    # The dead replica's lease still holds part of the budget: the survivor is refused with
    # budget_reserved (retry soon) before the budget is used up ...
    codes = []
    for _ in range(80):
        r = chat(survivor, key["key"])
        if r.status_code != 200:
            codes.append(r.json()["error"]["code"])
            break
    assert codes == ["budget_reserved"], codes
    spent = admin(survivor, "GET", f"/admin/budgets/{key['budget_id']}").json()["spent_usd"]
    assert spent < limit - 2 * cost
    # ... until the lease expires (5 s without renewal); then the rest of the budget is usable,
    # and never more than it.
    wait_until(lambda: chat(survivor, key["key"]).status_code == 200, timeout=15, what="the dead lease expired")
    last = None
    for _ in range(80):
        last = chat(survivor, key["key"])
        if last.status_code != 200:
            break
    assert last is not None and last.json()["error"]["code"] in ("insufficient_quota", "budget_reserved")
    state = admin(survivor, "GET", f"/admin/budgets/{key['budget_id']}").json()
    assert limit - 2 * cost <= state["spent_usd"] <= limit + 1e-12
