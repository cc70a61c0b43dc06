"""A tenant's active agents are bounded in number and in settings bytes (every replica holds
every active agent in memory and reads them all on a full reload; before, only the 5,000
prompt versions bounded them: up to 5,000 agents of 256 KB settings, 1.28 GB, per tenant).
Real gateway over HTTP, real embedded PostgreSQL and Valkey."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.test_agents_admin import AgentGateway, call, config, create, db, new_key

MAX_AGENTS = 3
MAX_SETTINGS_BYTES = 40_000


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    cfg = config(module_mock)
    cfg["policies"] = {"max_agents_per_tenant": MAX_AGENTS, "max_agent_settings_bytes_per_tenant": MAX_SETTINGS_BYTES}
    g = AgentGateway(tmp_root, cfg, services)
    yield g
    g.stop()


def _tenant() -> str:
    return f"quota-{uuid.uuid4().hex[:8]}"


def _active(services, tenant: str) -> int:
    return db(services[0], "SELECT count(*) AS n FROM agents WHERE tenant = $1 AND archived_at IS NULL", tenant)[0]["n"]


def test_a_tenant_past_its_agents_gets_400_and_archiving_one_makes_room(gw, services):
    tenant = _tenant()
    for i in range(MAX_AGENTS):
        assert create(gw, name=f"a{i}", tenant=tenant).status_code == 201
    r = create(gw, name="one-more", tenant=tenant)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "too_many_agents" and r.json()["error"]["param"] == "name"
    assert _active(services, tenant) == MAX_AGENTS
    assert create(gw, name="elsewhere", tenant=_tenant()).status_code == 201  # another tenant: its own count
    assert call(gw, "DELETE", "/admin/agents/a0", new_key(gw, tenant, admin=True)).status_code == 200
    assert create(gw, name="one-more", tenant=tenant).status_code == 201


def test_racing_creates_never_pass_the_bound_together(gw, services):
    tenant = _tenant()
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: create(gw, name=f"race{i}", tenant=tenant).status_code, range(8)))
    assert sorted(codes) == [201] * MAX_AGENTS + [400] * (8 - MAX_AGENTS)
    assert _active(services, tenant) == MAX_AGENTS


def test_settings_past_the_tenants_bytes_are_refused_at_create_and_at_change(gw, services):
    tenant = _tenant()
    big = {"who": "x" * 15_000}  # ~15 KB of defaults
    assert create(gw, name="b0", tenant=tenant, defaults=big).status_code == 201
    assert create(gw, name="b1", tenant=tenant, defaults=big).status_code == 201
    r = create(gw, name="b2", tenant=tenant, defaults=big)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "agent_storage_exceeded" and r.json()["error"]["param"] == "defaults"
    assert _active(services, tenant) == 2
    key = new_key(gw, tenant, admin=True)
    before = db(services[0], "SELECT settings FROM agents WHERE tenant = $1 AND name = 'b1'", tenant)[0]["settings"]
    r = call(gw, "PATCH", "/admin/agents/b1", key, json={"defaults": {"who": "y" * 30_000}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "agent_storage_exceeded", r.text
    after = db(services[0], "SELECT settings FROM agents WHERE tenant = $1 AND name = 'b1'", tenant)[0]["settings"]
    assert after == before  # nothing stored
    # a change that stays within the bound (its own old settings do not count twice) is taken
    r = call(gw, "PATCH", "/admin/agents/b1", key, json={"defaults": {"who": "z" * 20_000}})
    assert r.status_code == 200, r.text
