"""A key revocation or a budget change committed in PostgreSQL whose announcement to the other
replicas then fails (Redis unreachable) was answered as if every replica had been told: a 200
with nothing to say that another replica may still accept the revoked key for up to
``server.key_cache_ttl``, or act on the budget's old values until Redis is back. Now it answers
as committed with ``x-gateway-warning`` saying so, as an agent change does
(tests/test_agent_change_unannounced.py); the change itself stands, in this replica at once.

The gateway is launched with ``policies.keys.announce_revocation`` and
``policies.budgets.announce_change`` given a Redis client on a port nothing listens on (the real
announcements, their real ``ConnectionError``); the rest of the gateway uses the embedded Valkey."""

from __future__ import annotations

import textwrap
import uuid

import httpx
import pytest

from tests.conftest import LOCAL_HTTP, MASTER_KEY, Gateway

LAUNCHER = textwrap.dedent(
    """
    import sys

    import redis.asyncio as aioredis

    from policies import budgets, keys


    def dead_redis(real):
        async def announce(redis, *args):
            dead = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=5)  # nothing listens
            try:
                return await real(dead, *args)
            finally:
                await dead.aclose()

        return announce


    keys.announce_revocation = dead_redis(keys.announce_revocation)
    budgets.announce_change = dead_redis(budgets.announce_change)

    from gateway.cli import main

    sys.exit(main())
    """
)


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    config = {
        "server": {"key_cache_ttl": 45},
        "providers": [{"name": "llm", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k"]}],
        "models": [{"name": "m", "deployments": [{"provider": "llm", "model": "m"}]}],
    }
    g = Gateway(tmp_root, config, services, launcher=LAUNCHER, launcher_name="unannounced_admin_gateway")
    yield g
    g.stop()


def _call(gw: Gateway, method: str, path: str, key: str = MASTER_KEY, **kw) -> httpx.Response:
    return LOCAL_HTTP.request(method, f"{gw.url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=60, **kw)


def _chat(gw: Gateway, key: str) -> int:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    return _call(gw, "POST", "/v1/chat/completions", key, json=body).status_code


def test_a_key_revocation_whose_announcement_fails_says_other_replicas_may_still_accept_it(gw):
    tenant = f"rv-{uuid.uuid4().hex[:6]}"
    r = _call(gw, "POST", "/admin/keys", json={"name": "doomed", "tenant": tenant})
    assert r.status_code == 201, r.text
    key, key_id = r.json()["key"], r.json()["id"]
    assert _chat(gw, key) == 200  # (cached here now)
    r = _call(gw, "DELETE", f"/admin/keys/{key_id}")
    assert r.status_code == 200 and r.json()["revoked"] is True, r.text
    warning = r.headers.get("x-gateway-warning") or ""
    assert warning.startswith("revoked; the other replicas were not told") and warning.endswith("45 s"), warning
    assert _chat(gw, key) == 401  # this replica dropped it at once
    lines = [line for line in gw.log().splitlines() if "revocation not announced" in line]
    assert lines and not any(key in line for line in lines)


def test_a_budget_change_whose_announcement_fails_answers_as_committed_with_a_warning(gw):
    tenant = f"bu-{uuid.uuid4().hex[:6]}"
    warned = "saved; the other replicas were not told (Redis unreachable) and read it when Redis is back"
    body = {"scope": "tenant", "scope_value": tenant, "limit_usd": 10, "period": "monthly"}
    r = _call(gw, "POST", "/admin/budgets", json=body)
    assert r.status_code == 201, r.text
    assert r.headers.get("x-gateway-warning") == warned
    budget_id = r.json()["id"]
    r = _call(gw, "PATCH", f"/admin/budgets/{budget_id}", json={"limit_usd": 20})
    assert r.status_code == 200 and r.json()["limit_usd"] == 20, r.text
    assert r.headers.get("x-gateway-warning") == warned
    r = _call(gw, "POST", "/admin/keys", json={"name": "with-budget", "tenant": tenant, "budget_usd": 5})
    assert r.status_code == 201 and r.json()["budget_id"], r.text
    assert r.headers.get("x-gateway-warning") == warned
    r = _call(gw, "DELETE", f"/admin/budgets/{budget_id}")
    assert r.status_code == 200 and r.json()["deleted"] is True, r.text
    assert r.headers.get("x-gateway-warning") == warned
    assert _call(gw, "GET", f"/admin/budgets/{budget_id}").status_code == 404
