"""An admin agent change committed in PostgreSQL whose announcement to the other replicas then
fails (Redis unreachable) answered 500: the client, told it failed, would send again a change
that had happened (a second prompt version, a label moved twice). Now it answers as committed
(its usual status and body), with ``x-gateway-warning`` saying the other replicas were not told,
and the failure logged (its error's type, no content). The other replicas load the change at
their next full reload (runtime/agent_registry.py, ``CATCH_UP_RELOAD_S``: every replica's poll does one
at least that often, from PostgreSQL, with or without Redis; tests/test_agent_reload_unannounced.py).

The gateway is launched with ``runtime.agents.announce`` given a Redis client on a port nothing
listens on (the real announcement, its real ``ConnectionError``); the rest of the gateway uses
the embedded Valkey as usual. Every route that announces is called: create, patch, a new
version, a label moved, an experiment started and stopped (promote), a learned answer approved
(it attaches the learned-answers knowledge base), delete."""

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

    from runtime import agents

    _announce = agents.announce


    async def announce(redis, agent_id=None):
        dead = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=5)  # nothing listens
        try:
            return await _announce(dead, agent_id)
        finally:
            await dead.aclose()


    agents.announce = announce

    from gateway.cli import main

    sys.exit(main())
    """
)
NOT_ANNOUNCED = "saved; the other replicas were not told (Redis unreachable) and load it at their next full reload"
TEMPLATE = "You are the parcel desk of ACME-SECRET-TEMPLATE."
ANSWER = "Yes, we ship to Iceland within 6 working days."


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    config = {
        "router": {"max_attempts": 1},
        "providers": [{"name": "llm", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k"]}],
        "models": [{"name": "agent-model", "deployments": [{"provider": "llm", "model": "m"}]}],
    }
    g = Gateway(tmp_root, config, services, launcher=LAUNCHER, launcher_name="unannounced_gateway")
    yield g
    g.stop()


def _call(gw: Gateway, method: str, path: str, key: str = MASTER_KEY, **kw) -> httpx.Response:
    return LOCAL_HTTP.request(method, f"{gw.url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=60, **kw)


def _key(gw: Gateway, tenant: str, admin: bool = False) -> str:
    body = {"name": f"k-{uuid.uuid4().hex[:6]}", "tenant": tenant, **({"scopes": ["admin"]} if admin else {})}
    r = _call(gw, "POST", "/admin/keys", json=body)
    assert r.status_code == 201, r.text
    return r.json()["key"]


def _escalated(gw: Gateway, key: str, agent: str) -> str:
    """An escalation of the agent's (a customer asks for a person): its id."""
    body = {
        "model": f"agent:{agent}",
        "messages": [{"role": "user", "content": "I want to talk to a person: do you ship to Iceland?"}],
        "metadata": {"conversation_id": f"c-{uuid.uuid4().hex[:8]}"},
    }
    r = _call(gw, "POST", "/v1/chat/completions", key, json=body)
    assert r.status_code == 200 and r.headers.get("x-gateway-escalation"), r.text
    return r.headers["x-gateway-escalation"]


def test_every_agent_change_whose_announcement_fails_answers_as_committed(gw):
    tenant = f"un-{uuid.uuid4().hex[:6]}"
    name = f"desk-{uuid.uuid4().hex[:6]}"
    key, boss = _key(gw, tenant), _key(gw, tenant, admin=True)
    base = f"/admin/agents/{name}"
    answers: dict[str, tuple[int, str | None]] = {}

    def change(what: str, method: str, path: str, expect: int, **kw) -> dict:
        r = _call(gw, method, path, boss, **kw)
        answers[what] = (r.status_code, r.headers.get("x-gateway-warning"))
        return r.json() if r.status_code == expect else {}

    escalation = {"enabled": True, "threshold": 0.5, "handoff_message": "A person will answer."}
    body = {"name": name, "model": "agent-model", "template": TEMPLATE, "escalation": escalation}
    created = change("create", "POST", "/admin/agents", 201, json=body)
    patched = change("patch", "PATCH", base, 200, json={"description": "parcels"})
    version = change("version", "POST", f"{base}/versions", 201, json={"template": TEMPLATE + " Be brief."})
    label = change("label", "PUT", f"{base}/labels/prod", 200, json={"version": 1})
    started = change("experiment", "PUT", f"{base}/labels/ab", 200, json={"variants": {"1": 50, "2": 50}})
    stopped = change("promote", "POST", f"{base}/experiments/ab/stop", 200, json={"promote": 2})
    warned = (200, NOT_ANNOUNCED)
    assert answers == {
        "create": (201, NOT_ANNOUNCED),
        "patch": warned,
        "version": (201, NOT_ANNOUNCED),
        "label": warned,
        "experiment": warned,
        "promote": warned,
    }
    assert created["name"] == name and patched["description"] == "parcels" and version["version"] == 2
    assert label["target"] == {"1": 1} and started["experiment_id"] and str(stopped["promoted"]) == "2"

    esc_id = _escalated(gw, key, name)  # (this replica serves the changes at once)
    assert _call(gw, "POST", f"/admin/escalations/{esc_id}/claim", boss).status_code == 200
    r = _call(gw, "POST", f"/admin/escalations/{esc_id}/resolve", boss, json={"corrected_answer": ANSWER})
    assert r.status_code == 200, r.text
    example = r.json()["learned_example"]
    approved = change("approve", "POST", f"{base}/learned/{example['id']}/approve", 200)
    agent = _call(gw, "GET", base, boss).json()
    deleted = change("delete", "DELETE", base, 200)
    assert (answers["approve"], answers["delete"]) == (warned, warned)
    assert approved["status"] == "approved" and approved["kb_id"] in agent["knowledge_bases"]
    assert agent["labels"]["ab"] == {"2": 1} and deleted["deleted"] is True
    lines = [line for line in gw.log().splitlines() if "not announced" in line]
    assert len(lines) == 8, lines
    assert not any(TEMPLATE in line or ANSWER in line or boss in line for line in lines)


def test_a_change_this_replica_cannot_read_back_answers_as_committed(services):
    """(Failed before: the change was committed and announced, then this replica's own reload of
    it met a database error and the route answered 500, inviting the change again.) A real
    registry over a real pool, closed (asyncpg's InterfaceError), and the real Valkey."""
    import asyncio
    import types

    import asyncpg
    import redis.asyncio as aioredis

    from gateway.agent_announce import NOT_RELOADED, WARNING, announced
    from runtime.agent_registry import AgentRegistry

    async def go() -> dict[str, str]:
        pool = await asyncpg.create_pool(services[0], min_size=1, max_size=1)
        await pool.close()
        redis = aioredis.from_url(services[1])
        try:
            svc = types.SimpleNamespace(redis=redis, agents=AgentRegistry(pool, redis))
            return await announced(svc, "agt_missing")
        finally:
            await redis.aclose()

    assert asyncio.run(go()) == {WARNING: NOT_RELOADED}
