"""A tenant admin could create API keys without end (600 admin calls a minute, every one a row
that each key list of the tenant, and the super-admin's, reads): a tenant's admins now hold at
most ``policies.max_keys_per_tenant`` live keys (4 here, the admin's own key counted), however
many requests race; a revoked key frees its place, and the super-admin is never refused."""

from __future__ import annotations

import concurrent.futures
import uuid

import pytest

from tests.conftest import Gateway
from tests.test_admin_review_s22 import as_key
from tests.test_policies import admin, cfg, new_key


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    g = Gateway(tmp_root, cfg(module_mock, policies={"max_keys_per_tenant": 4}), services)
    yield g
    g.stop()


def test_attack_a_tenant_admin_cannot_create_keys_without_bound_even_racing(gw):
    tenant = f"kc-{uuid.uuid4().hex[:8]}"
    boss = new_key(gw, tenant=tenant, scopes=["admin"])  # (the first live key: 3 places left)

    def create(i: int) -> tuple[int, str | None]:
        r = as_key(gw, boss["key"], "POST", "/admin/keys", json={"name": f"k{i}"})
        return r.status_code, r.json().get("error", {}).get("param") if r.status_code != 201 else None

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = sorted(pool.map(create, range(8)), key=lambda a: a[0])
    assert answers == [(201, None)] * 3 + [(400, "name")] * 5, answers
    r = as_key(gw, boss["key"], "POST", "/admin/keys", json={"name": "one-more"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_keys", r.text
    live = [k for k in admin(gw, "GET", "/admin/keys", params={"tenant": tenant}).json()["data"]]
    assert len(live) == 4
    # a revoked key frees its place; the super-admin's keys on the tenant are never refused
    victim = next(k for k in live if k["id"] != boss["id"])
    assert admin(gw, "DELETE", f"/admin/keys/{victim['id']}").status_code == 200
    assert as_key(gw, boss["key"], "POST", "/admin/keys", json={"name": "again"}).status_code == 201
    assert admin(gw, "POST", "/admin/keys", json={"name": "by-master", "tenant": tenant}).status_code == 201
