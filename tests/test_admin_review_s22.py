"""Review of keys, tenancy, the admin API, budgets and alerts (session 22): each test is one
thing a client, a tenant admin or an operator could do that went wrong, through real HTTP
against a real gateway process."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
import uuid

import httpx
import openai
import pytest

from tests.conftest import MASTER_KEY, Gateway, free_port, wait_until
from tests.test_policies import HELLO, admin, cfg, ledger_rows, new_key


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    config = cfg(module_mock, limits={"user": {"rpm": 2}}, policies={"max_budgets_per_tenant": 6})
    g = Gateway(tmp_root, config, services)
    yield g
    g.stop()


def as_key(gw: Gateway, key: str, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, f"{gw.url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=30, **kw)


def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def sdk(gw: Gateway, key: dict) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key["key"], max_retries=0)


def budget_on(gw: Gateway, key: dict, limit: float, **extra) -> dict:
    r = admin(
        gw, "POST", "/admin/budgets", json={"scope": "key", "scope_value": key["id"], "limit_usd": limit, **extra}
    )
    assert r.status_code == 201, r.text
    return r.json()


# ---- alerts -------------------------------------------------------------------------------------
def test_one_large_request_refused_by_a_hard_budget_fires_no_false_alerts(gw):
    """A client sent one request with a large max_tokens to a hard budget 8 % spent: it was told
    the budget was "used up" and the 50, 80 and 100 % alerts all fired — so the real ones never
    fired later in the period. Now it is told what is left, and no alert fires."""
    key = new_key(gw)
    b = budget_on(gw, key, 1e-4)
    client = sdk(gw, key)
    client.chat.completions.create(model="priced", messages=HELLO, max_tokens=5)  # ≈ 8e-6 USD: 8 %
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="priced", messages=HELLO, max_tokens=45)  # could cost ≈ 9.8e-5
    assert err.value.code == "insufficient_quota"
    assert "is used up" not in err.value.message and "max_tokens" in err.value.message
    state = admin(gw, "GET", f"/admin/budgets/{b['id']}").json()
    assert state["alerts_fired"] == [], state
    # the budget was not used up: a request that fits is served
    assert client.chat.completions.create(model="priced", messages=HELLO, max_tokens=5).choices


def spend_until_refused(client: openai.OpenAI) -> openai.RateLimitError:
    for _ in range(6):
        try:
            client.chat.completions.create(model="priced", messages=HELLO, max_tokens=1)
        except openai.RateLimitError as exc:
            return exc
    raise AssertionError("never refused")


def test_sound_the_100_percent_alert_of_a_hard_budget_still_fires_when_what_is_left_pays_for_no_request(gw):
    key = new_key(gw)
    b = budget_on(gw, key, 1.5e-5)  # one request of max_tokens 1 reserves ≈ 1.2e-5 of it
    assert spend_until_refused(sdk(gw, key)).code == "insufficient_quota"
    assert 1.0 in admin(gw, "GET", f"/admin/budgets/{b['id']}").json()["alerts_fired"]


def test_raising_a_budget_limit_rearms_its_alerts(gw):
    """The alerts of a budget whose limit was raised stayed fired for the period: the 100 %
    alert of the new limit never came. They now count per limit."""
    key = new_key(gw)
    b = budget_on(gw, key, 1.5e-5)
    spend_until_refused(sdk(gw, key))
    assert 1.0 in admin(gw, "GET", f"/admin/budgets/{b['id']}").json()["alerts_fired"]
    raised = admin(gw, "PATCH", f"/admin/budgets/{b['id']}", json={"limit_usd": 1.0}).json()
    assert raised["spent_usd"] < 0.001 and raised["alerts_fired"] == [], raised


# ---- budgets: what they apply to -----------------------------------------------------------------
@pytest.mark.parametrize(("scope", "length"), [("customer", 201), ("user", 250), ("tag", 101), ("tenant", 129)])
def test_a_budget_on_a_value_longer_than_a_request_can_carry_is_refused(gw, scope, length):
    """Attribution keeps 200 characters of a customer (100 of a tag): a hard budget on a
    250-character customer was stored and never applied — the customer spent without limit."""
    before = admin(gw, "GET", "/admin/budgets").json()["data"]
    r = admin(gw, "POST", "/admin/budgets", json={"scope": scope, "scope_value": "c" * length, "limit_usd": 1e-9})
    assert r.status_code == 400 and r.json()["error"]["param"] == "scope_value", r.text
    assert admin(gw, "GET", "/admin/budgets").json()["data"] == before


def test_sound_a_budget_on_the_longest_customer_a_request_carries_applies(gw):
    ta, customer = tenant(), "c" * 200
    key = new_key(gw, tenant=ta)
    r = admin(
        gw,
        "POST",
        "/admin/budgets",
        json={"scope": "customer", "scope_value": customer, "limit_usd": 1e-9, "tenant": ta},
    )
    assert r.status_code == 201, r.text
    with pytest.raises(openai.RateLimitError):
        sdk(gw, key).chat.completions.create(
            model="priced", messages=HELLO, max_tokens=5, extra_headers={"x-gateway-customer": customer}
        )


# ---- keys ------------------------------------------------------------------------------------------
def test_revoking_a_tenant_admin_key_revokes_every_key_it_minted(gw):
    """Whoever held a tenant admin key (leaked, or an employee who left) minted an admin child,
    then a grandchild: revoking the admin key left both working, admin API included. A minted
    key is never wider than its minter (its expiry is bounded by the minter's); it no longer
    outlives its minter's revocation either."""
    ta = tenant()
    boss = new_key(gw, tenant=ta, scopes=["admin"])
    child = as_key(gw, boss["key"], "POST", "/admin/keys", json={"name": "c", "scopes": ["admin"]}).json()
    grandchild = as_key(gw, child["key"], "POST", "/admin/keys", json={"name": "gc"}).json()
    bystander = new_key(gw, tenant=ta)
    assert as_key(gw, child["key"], "GET", "/admin/keys").status_code == 200
    assert sdk(gw, grandchild).models.list().data is not None
    r = admin(gw, "DELETE", f"/admin/keys/{boss['id']}")
    assert r.status_code == 200
    # (the revocation reaches the gateway's key cache by pub/sub, a moment after the answer)
    wait_until(lambda: as_key(gw, child["key"], "GET", "/admin/keys").status_code == 401, 10, "child revoked")
    wait_until(lambda: as_key(gw, grandchild["key"], "GET", "/v1/models").status_code == 401, 10, "grandchild")
    assert sorted(r.json()["minted_keys_revoked"]) == sorted([child["id"], grandchild["id"]])
    assert as_key(gw, bystander["key"], "GET", "/v1/models").status_code == 200  # not minted by it
    listed = {k["id"]: k for k in admin(gw, "GET", f"/admin/keys?all=true&tenant={ta}").json()["data"]}
    assert all(listed[k["id"]]["revoked_at"] for k in (boss, child, grandchild))
    assert listed[bystander["id"]]["revoked_at"] is None


# ---- budgets: what a tenant admin reads ----------------------------------------------------------
def test_a_tenant_admin_cannot_read_the_receiver_or_signing_key_of_a_budget_the_super_admin_set(gw):
    """The super-admin capped a tenant with an alert receiver whose URL carries its token: the
    tenant's admins read the URL and the budget's signing key (to post forged alerts to it)."""
    ta = tenant()
    boss = new_key(gw, tenant=ta, scopes=["admin"])
    hook = "https://8.8.8.8/hook?token=operator-secret-123"
    r = admin(
        gw, "POST", "/admin/budgets", json={"scope": "tenant", "scope_value": ta, "limit_usd": 5, "webhook_url": hook}
    )
    assert r.status_code == 201 and r.json()["webhook_signing_key"], r.text  # the super-admin's to read
    seen = [as_key(gw, boss["key"], "GET", f"/admin/budgets/{r.json()['id']}").json()]
    seen += as_key(gw, boss["key"], "GET", "/admin/budgets").json()["data"]
    for state in seen:
        assert state["locked"] and "webhook_signing_key" not in state and state["webhook_url"] is None, state
        assert state["limit_usd"] == 5  # the rest stays readable
    assert "operator-secret" not in as_key(gw, boss["key"], "GET", "/admin/budgets").text
    # a budget the tenant admin set itself is its own to read
    own = as_key(
        gw,
        boss["key"],
        "POST",
        "/admin/budgets",
        json={"scope": "user", "scope_value": "u1", "limit_usd": 1, "webhook_url": hook},
    ).json()
    assert own["webhook_url"] == hook and own["webhook_signing_key"]
    assert as_key(gw, boss["key"], "GET", f"/admin/budgets/{own['id']}").json()["webhook_url"] == hook


# ---- admin input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/keys?tenant=%00"),
        ("GET", "/admin/budgets?tenant=a%00b"),
        ("GET", "/admin/access-log?actor=%00"),
        ("DELETE", "/admin/keys/key_%00"),
        ("GET", "/admin/budgets/bud_%00"),
        ("GET", "/admin/requests/%00"),
        ("GET", "/admin/runs/%00"),
        ("GET", "/admin/agents/%00"),
    ],
)
def test_a_nul_character_in_an_admin_path_or_query_is_a_400_not_a_500(gw, method, path):
    r = httpx.request(method, f"{gw.url}{path}", headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=30)
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("path", "param"),
    [
        ("/admin/spend?from=9999-12-31T23:59:59-23:59", "from"),
        ("/admin/spend?to=0001-01-01T00:00:00%2B23:59", "to"),
        ("/admin/access-log?from=9999-12-31T23:59:59-23:59", "from"),
    ],
)
def test_a_date_out_of_range_once_its_offset_is_applied_is_a_400_not_a_500(gw, path, param):
    r = httpx.get(f"{gw.url}{path}", headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_patching_a_budget_limit_to_null_is_a_400_naming_it_and_changes_nothing(gw):
    b = admin(gw, "POST", "/admin/budgets", json={"scope": "user", "scope_value": tenant(), "limit_usd": 3}).json()
    r = admin(gw, "PATCH", f"/admin/budgets/{b['id']}", json={"limit_usd": None, "enforcement": "soft"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit_usd", r.text
    after = admin(gw, "GET", f"/admin/budgets/{b['id']}").json()
    assert after["limit_usd"] == 3 and after["enforcement"] == "hard"


# ---- budgets: what a change costs every replica ----------------------------------------------------
def test_a_stream_of_budget_changes_never_reloads_every_tenants_budgets(gw, services, monkeypatch):
    """Every budget change (a PATCH, a create, a delete — any tenant admin may send them in a
    loop) made every replica reload every budget of every tenant: ≈ 130 ms of CPU per change at
    20,000 budgets, so one tenant's admin could stall every replica for all tenants. A change
    now names its budget, and each replica reads that one row."""
    import asyncio
    import secrets

    import asyncpg
    import redis.asyncio as aioredis

    from policies import budgets

    loads = []
    whole = budgets.list_budgets

    async def counted(conn, tenant=None):
        loads.append(tenant)
        return await whole(conn, tenant)

    monkeypatch.setattr(budgets, "list_budgets", counted)

    async def run() -> None:
        pool = await asyncpg.create_pool(services[0], min_size=1, max_size=2)  # (migrated by gw)
        redis = aioredis.from_url(services[1])
        cache = budgets.BudgetCache(pool, redis)
        ta, bid = tenant(), f"bud_{secrets.token_hex(8)}"

        async def until(check) -> None:
            for _ in range(200):
                if check():
                    return
                await asyncio.sleep(0.025)
            raise AssertionError("the cache never caught up")

        try:
            await cache.start()
            await asyncio.sleep(0.2)  # subscribed
            started = len(loads)
            await pool.execute(
                "INSERT INTO budgets (id, tenant, scope, scope_value, limit_usd, period) "
                "VALUES ($1, $2, 'customer', 'acme', 1, 'monthly')",
                bid,
                ta,
            )
            await redis.publish(budgets.CHANGED, bid)  # as budgets.announce_change(redis, bid) does
            await until(lambda: [b.id for b in cache.applicable({"tenant": ta, "customer": "acme"})] == [bid])
            for limit in range(2, 32):
                await pool.execute("UPDATE budgets SET limit_usd = $2 WHERE id = $1", bid, limit)
                await redis.publish(budgets.CHANGED, bid)  # as budgets.announce_change(redis, bid) does
            await until(lambda: cache.by_id[bid].limit_usd == 31)
            await pool.execute("DELETE FROM budgets WHERE id = $1", bid)
            await redis.publish(budgets.CHANGED, bid)  # as budgets.announce_change(redis, bid) does
            await until(lambda: bid not in cache.by_id)
            assert cache.applicable({"tenant": ta, "customer": "acme"}) == []
            assert len(loads) == started, f"{len(loads) - started} reloads of every budget for 32 changes of one"
        finally:
            await cache.stop()
            await redis.aclose()
            await pool.close()

    asyncio.run(run())


# ---- rate limits ---------------------------------------------------------------------------------
def test_a_client_cannot_fill_another_tenants_user_rate_window_by_naming_its_user_with_a_colon(gw):
    """Per-user windows were named user:<tenant>:<user>: a client of tenant "acme" saying it is
    user "x:alice" counted in tenant "acme:x"'s user alice's window, and filled it."""
    acme = tenant()
    ours, theirs = new_key(gw, tenant=acme), new_key(gw, tenant=f"{acme}:x")
    for _ in range(2):  # limits.user: 2 requests a minute
        sdk(gw, ours).chat.completions.create(model="priced", messages=HELLO, max_tokens=5, user="x:alice")
    assert sdk(gw, theirs).chat.completions.create(model="priced", messages=HELLO, max_tokens=5, user="alice").choices
    with pytest.raises(openai.RateLimitError):  # (the window itself holds: acme's x:alice is full)
        sdk(gw, ours).chat.completions.create(model="priced", messages=HELLO, max_tokens=5, user="x:alice")


# ---- usage a provider did not report ---------------------------------------------------------------
CALL = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": {"city": "Paris"}}}


class QuirkyProvider:
    """An OpenAI-compatible server that reports no usage and sends a tool call's arguments as
    an object, not a string (as some self-hosted servers do)."""

    def __init__(self) -> None:
        def chunk(delta: dict, finish: str | None) -> bytes:
            obj = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
            obj["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                req = json.loads(self.rfile.read(int(self.headers["content-length"])))
                if req.get("stream"):
                    first = chunk({"role": "assistant", "tool_calls": [{"index": 0, **CALL}]}, None)
                    body, ctype = first + chunk({}, "tool_calls") + b"data: [DONE]\n\n", "text/event-stream"
                else:
                    message = {"role": "assistant", "content": None, "tool_calls": [CALL]}
                    choice = {"index": 0, "message": message, "finish_reason": "tool_calls"}
                    answer = {"id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": [choice]}
                    body, ctype = json.dumps(answer).encode(), "application/json"
                self.send_response(200)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_an_answer_whose_unreported_usage_has_an_unusual_shape_is_served_and_charged(tmp_root, services):
    """A provider that reported no usage and sent tool-call arguments as an object: counting
    the answer raised, so the non-streamed answer became a 500, and the streamed one reached
    the client (its tool call included) but broke before its end and was charged nothing."""
    upstream = QuirkyProvider()
    deployment = {"provider": "q", "model": "m", "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}
    config = {
        "router": {"max_attempts": 1},
        "providers": [{"name": "q", "kind": "openai", "base_url": f"{upstream.url}/v1", "api_keys": ["k"]}],
        "models": [{"name": "priced", "deployments": [deployment]}],
    }
    g = Gateway(tmp_root, config, services)
    try:
        key = new_key(g)
        client = sdk(g, key)
        answer = client.chat.completions.create(model="priced", messages=HELLO, max_tokens=5)
        assert answer.choices[0].message.tool_calls[0].function.name == "lookup"
        chunks = list(client.chat.completions.create(model="priced", messages=HELLO, max_tokens=5, stream=True))
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        wait_until(lambda: len(ledger_rows(services[0], "key_id = $1", key["id"])) == 2, 15, "two ledger rows")
        for row in ledger_rows(services[0], "key_id = $1", key["id"]):
            assert row["status"] == 200 and row["completion_tokens"] > 0 and row["cost_usd"] > 0, row
    finally:
        g.stop()
        upstream.server.shutdown()


# ---- listings ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("what", ["keys", "budgets"])
def test_keys_and_budgets_are_listed_a_bounded_page_at_a_time(gw, what):
    """GET /admin/keys and /admin/budgets answered every row at once (a budget costing three
    Redis round trips): a tenant admin that minted 100,000 keys or budgets made every listing
    that large. They now answer pages of at most 1,000, newest first, with an ``after`` cursor."""
    ta = tenant()
    boss = new_key(gw, tenant=ta, scopes=["admin"])
    made = []
    for i in range(5):
        if what == "keys":
            made.append(as_key(gw, boss["key"], "POST", "/admin/keys", json={"name": f"k{i}"}).json()["id"])
        else:
            body = {"scope": "customer", "scope_value": f"c{i}", "limit_usd": 1}
            made.append(as_key(gw, boss["key"], "POST", "/admin/budgets", json=body).json()["id"])
    if what == "keys":
        made.insert(0, boss["id"])  # the admin key is the tenant's oldest
    seen, after = [], None
    for _ in range(5):
        page = as_key(
            gw, boss["key"], "GET", f"/admin/{what}", params={"limit": 2, **({"after": after} if after else {})}
        )
        assert page.status_code == 200, page.text
        page = page.json()
        assert len(page["data"]) <= 2
        seen += [row["id"] for row in page["data"]]
        after = page["last_id"]
        if not page["has_more"]:
            break
    assert seen == list(reversed(made)), "newest first, each once"
    for bad in ("0", "1001", "ten"):
        r = as_key(gw, boss["key"], "GET", f"/admin/{what}", params={"limit": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "limit"


def test_a_tenant_admin_cannot_create_budgets_without_bound_even_racing(gw):
    """Every budget is held in every replica's memory and loaded whole at start-up: a tenant
    admin could create millions. A tenant's admins now create at most
    ``policies.max_budgets_per_tenant`` (6 here), however many requests race."""
    import concurrent.futures

    ta = tenant()
    boss = new_key(gw, tenant=ta, scopes=["admin"])

    def create(i: int) -> int:
        body = {"scope": "customer", "scope_value": f"c{i}", "limit_usd": 1}
        return as_key(gw, boss["key"], "POST", "/admin/budgets", json=body).status_code

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        codes = sorted(pool.map(create, range(10)))
    assert codes == [201] * 6 + [400] * 4, codes
    r = as_key(gw, boss["key"], "POST", "/admin/keys", json={"name": "k", "budget_usd": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_budgets"
    assert len(admin(gw, "GET", "/admin/budgets", params={"tenant": ta}).json()["data"]) == 6
    # the super-admin's caps on the tenant are never refused
    body = {"scope": "tenant", "scope_value": ta, "limit_usd": 1}
    assert admin(gw, "POST", "/admin/budgets", json=body).status_code == 201


# ---- Redis unreachable -------------------------------------------------------------------------------
def test_with_redis_down_side_routes_answer_503_to_retry_and_admin_changes_still_succeed(
    tmp_root, services, module_mock
):
    """With Redis unreachable, feedback and /v1/files answered 500 (their per-key window could
    not be counted) where model calls answer 503 policy_store_unavailable; and DELETE
    /admin/keys/{id} answered 500 although the key was revoked (its announcement failed), so
    an admin could never see it succeed. Every replica flushes its key cache when its
    subscription comes back, and cached keys expire (server.key_cache_ttl) meanwhile."""
    from gateway.embedded import EmbeddedServices

    valkey = EmbeddedServices(tmp_root / f"valkey-{uuid.uuid4().hex[:6]}").start(postgres=False)
    g = Gateway(tmp_root, cfg(module_mock), (services[0], valkey.redis_url))
    try:
        key = new_key(g)
        headers = {"Authorization": f"Bearer {key['key']}"}
        assert httpx.get(f"{g.url}/v1/models", headers=headers).status_code == 200  # (now cached)
        valkey.stop()
        for r in (
            httpx.post(f"{g.url}/v1/feedback", headers=headers, json={"request_id": "req_x", "score": 1}),
            httpx.get(f"{g.url}/v1/files", headers=headers),
        ):
            assert r.status_code == 503 and r.json()["error"]["code"] == "policy_store_unavailable", r.text
            assert r.headers["retry-after"] == "1"
        r = admin(g, "DELETE", f"/admin/keys/{key['id']}")
        assert r.status_code == 200 and r.json()["revoked"] is True, r.text
        assert httpx.get(f"{g.url}/v1/models", headers=headers).status_code == 401  # this replica: at once
        # a budget change stands and is answered (its spend unknown for now), not a 500 after the write
        body = {"scope": "customer", "scope_value": f"c-{uuid.uuid4().hex[:6]}", "limit_usd": 2}
        r = admin(g, "POST", "/admin/budgets", json=body)
        assert r.status_code == 201 and r.json()["limit_usd"] == 2 and r.json()["spent_usd"] is None, r.text
        r = admin(g, "PATCH", f"/admin/budgets/{r.json()['id']}", json={"limit_usd": 3})
        assert r.status_code == 200 and r.json()["limit_usd"] == 3, r.text
        assert admin(g, "DELETE", f"/admin/budgets/{r.json()['id']}").status_code == 200
    finally:
        g.stop()
        valkey.stop()


# ---- PII policy ------------------------------------------------------------------------------------
def test_a_tenant_admin_cannot_mint_a_key_whose_pii_policy_lifts_its_tenants(tmp_root, services, module_mock):
    """The operator held a tenant to a PII policy that redacts e-mail addresses; the tenant's
    admin (no policy on its own key) minted a key naming the operator's policy "off" — a key's
    policy wins over its tenant's — and that key's requests reached the provider unscrubbed."""
    ta = tenant()
    pii = {
        "policies": {"strict": {"entities": {"email": "redact"}}, "off": {"entities": {}}},
        "tenants": {ta: "strict"},
    }
    g = Gateway(tmp_root, cfg(module_mock, pii=pii), services)
    try:
        boss = new_key(g, tenant=ta, scopes=["admin"])
        r = as_key(g, boss["key"], "POST", "/admin/keys", json={"name": "leaky", "pii_policy": "off"})
        assert r.status_code == 403 and r.json()["error"]["param"] == "pii_policy", r.text
        child = as_key(g, boss["key"], "POST", "/admin/keys", json={"name": "plain"}).json()
        secret = "jane.doe@example.com"
        module_mock.clear()
        sdk(g, child).chat.completions.create(
            model="priced", messages=[{"role": "user", "content": f"mail {secret}"}], max_tokens=5
        )
        assert secret not in json.dumps(module_mock.last()["body"])  # the tenant's policy holds
        # the super-admin may still give a key a policy of its own
        assert new_key(g, tenant=ta, pii_policy="off")["pii_policy"] == "off"
    finally:
        g.stop()


# ---- alert receivers a tenant admin sets ----------------------------------------------------------
def test_a_tenant_admins_alert_receiver_cannot_reach_the_operators_private_network(tmp_root, services, module_mock):
    """The operator allowed private networks for alerts (its own receiver is internal): every
    tenant admin could then point its budgets' webhooks at the operator's private network and
    loopback too (a blind SSRF, POSTed on every threshold). A tenant admin's receivers are now
    held to public addresses when set and when delivered; the operator's still reach it."""
    from tests.test_policies import Receiver

    inside = Receiver()  # a service on the operator's loopback
    own = (services[0], services[1] + "?db=7")  # a Redis database of its own: its alerts, its sender
    g = Gateway(tmp_root, cfg(module_mock), own)  # (cfg: alerts.allow_private_networks)
    try:
        ta = tenant()
        boss, spender = new_key(g, tenant=ta, scopes=["admin"]), new_key(g, tenant=ta)
        body = {"scope": "key", "scope_value": spender["id"], "limit_usd": 1e-4, "webhook_url": inside.url}
        r = as_key(g, boss["key"], "POST", "/admin/budgets", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "webhook_url", r.text
        ok = as_key(g, boss["key"], "POST", "/admin/budgets", json={**body, "webhook_url": "https://8.8.8.8/hook"})
        assert ok.status_code == 201
        r = as_key(g, boss["key"], "PATCH", f"/admin/budgets/{ok.json()['id']}", json={"webhook_url": inside.url})
        assert r.status_code == 400 and r.json()["error"]["param"] == "webhook_url", r.text
        # one stored before this check (or a name that resolves inside later) is refused at delivery
        import asyncio

        import asyncpg

        async def point_inside() -> None:
            conn = await asyncpg.connect(services[0])
            await conn.execute("UPDATE budgets SET webhook_url = $2 WHERE id = $1", ok.json()["id"], inside.url)
            await conn.close()

        asyncio.run(point_inside())
        admin(g, "PATCH", f"/admin/budgets/{ok.json()['id']}", json={"thresholds": [0.05]}).raise_for_status()
        # (the super-admin's own budget on the same key alerts the operator's receiver, inside)
        operator = Receiver()
        locked = {"scope": "key", "scope_value": spender["id"], "limit_usd": 1e-4, "period": "daily"}
        admin(g, "POST", "/admin/budgets", json={**locked, "webhook_url": operator.url, "thresholds": [0.05]})
        sdk(g, spender).chat.completions.create(model="priced", messages=HELLO, max_tokens=1)
        wait_until(lambda: operator.received, 20, "the operator's alert")

        def tenant_alert_tried() -> bool:  # fired in the same settle: its delivery refused (or retried)
            return any("alert webhook" in line and ok.json()["id"] in line for line in g.log().splitlines())

        wait_until(tenant_alert_tried, 20, "the tenant's alert delivery attempted")
        assert inside.received == []
        operator.close()
    finally:
        g.stop()
        inside.close()


def test_spend_by_a_client_chosen_value_is_answered_a_bounded_number_of_groups(gw, services):
    """Spend grouped by user (customer, tag) had a row per value clients ever sent — as many as
    a client cares to invent, one per request — all in one answer. It now answers the most
    costly ``limit`` groups (default 1000, at most 10000) and says when there are more."""
    ta = tenant()
    boss, key = new_key(gw, tenant=ta, scopes=["admin"]), new_key(gw, tenant=ta)
    for i in range(4):
        sdk(gw, key).chat.completions.create(model="priced", messages=HELLO, max_tokens=5, user=f"u{i}-{ta}")
    wait_until(lambda: len(ledger_rows(services[0], "key_id = $1", key["id"])) == 4, 15, "ledger rows")
    page = as_key(gw, boss["key"], "GET", "/admin/spend", params={"group_by": "user", "limit": 2}).json()
    assert len(page["data"]) == 2 and page["has_more"] is True, page
    whole = as_key(gw, boss["key"], "GET", "/admin/spend", params={"group_by": "user"}).json()
    assert len(whole["data"]) == 4 and whole["has_more"] is False
    r = as_key(gw, boss["key"], "GET", "/admin/spend", params={"group_by": "user", "limit": 10_001})
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit"


def test_a_key_cannot_flood_the_append_only_access_log(gw, services):
    """Every admin API call — refused ones too, by any key, admin or not — is a row in the
    access log, which nothing may delete: a plain key calling /admin/keys in a loop grew it
    without bound (and a PostgreSQL write per call). A key's admin API calls (its minted keys'
    with them) are now at most 600 a minute; beyond, a 429 that writes nothing."""
    import asyncio

    import asyncpg

    key = new_key(gw, tenant=tenant())
    codes: list[int] = []
    minutes = set()
    with httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {key['key']}"}, timeout=30) as c:
        for _ in range(1300):
            minutes.add(int(time.time() // 60))
            r = c.get("/admin/keys")
            codes.append(r.status_code)
            if r.status_code == 429:
                assert r.json()["error"]["code"] == "rate_limit_exceeded" and int(r.headers["retry-after"]) >= 1
                break
    assert codes[0] == 403 and codes[-1] == 429, codes[-3:]

    async def logged() -> int:
        conn = await asyncpg.connect(services[0])
        try:
            return await conn.fetchval("SELECT count(*) FROM access_audit WHERE actor_key_id = $1", key["id"])
        finally:
            await conn.close()

    assert asyncio.run(logged()) <= 600 * len(minutes)


# ---- admission credit on a budget too small to lend ------------------------------------------------
def test_a_budget_too_small_to_lend_credit_is_not_held_by_a_lease_nobody_can_be_granted(gw, services):
    """A replica asked every budget for a lease, even one far too small ever to grant it: while
    the ask was on its way the renewer wrote it into the replica's lease key (it must, should
    it be granted), and for up to half a second every replica counted that never-granted
    lease as held — a request on a budget with nothing spent was refused "budget busy". A
    budget that cannot lend (limit < headroom × lease) is no longer asked."""
    from tests.test_admission_credit_attacks import Replica, hard_budget

    budget = hard_budget(5)  # five requests' estimates; a lease (4 of them, headroom 4) never fits

    async def run() -> object:
        a, b = Replica(services[1], budget), Replica(services[1], budget)
        await a.start()
        await b.start()
        try:
            admit = asyncio.ensure_future(a.admit())
            await asyncio.sleep(0)  # its ADMIT is on its way (and its ask counted) ...
            await asyncio.gather(admit, a.engine.credit.renew())  # ... when the renewer runs
            assert admit.result() is not None
            return await b.admit()  # nothing spent, one request in flight: room for four more
        finally:
            await a.engine.close()
            await b.engine.close()

    assert asyncio.run(run()) is not None


@pytest.mark.parametrize(
    "path",
    [
        "/admin/keys",
        "/admin/budgets",
        "/admin/spend?group_by=user&",
        "/admin/access-log",
        "/admin/escalations",
        "/admin/streams/ledger/dead-letters",
        "/v1/files",
    ],
)
def test_a_limit_of_digits_python_reads_but_int_refuses_is_a_400(gw, path):
    """``?limit=²`` passed every list's ``str.isdigit`` check and then ``int()`` raised: a 500
    with a stack trace on each list route (eight copies of the check; one now, core.http.query_limit)."""
    sep = "" if path.endswith("&") else "?"
    r = httpx.get(f"{gw.url}{path}{sep}limit=%C2%B2", headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit", r.text


# ---- attribution headers ------------------------------------------------------------------------
def test_a_non_ascii_attribution_header_is_read_as_utf8_and_bytes_that_are_not_utf8_as_latin1(gw, services):
    """x-gateway-user / -customer / -labels were read as latin-1: a client sending "José" in UTF-8
    (curl, Go) was attributed to "JosÃ©", which matched neither the key's allowed attribution
    values (a 403) nor any budget set on José. Bytes that are not UTF-8 are latin-1 (a JavaScript
    fetch and Python's http.client write "José" so): still José, never a 400."""
    key = new_key(gw, attribution={"user": ["José"], "customer": ["Zoë*"]})
    chat = f"{gw.url}/v1/chat/completions"
    body = {"model": "priced", "messages": HELLO, "max_tokens": 5}
    auth = {"Authorization": f"Bearer {key['key']}"}
    named = {"x-gateway-user": "José", "x-gateway-customer": "Zoë GmbH", "x-gateway-labels": "café,eu"}
    r = httpx.post(chat, json=body, headers={**auth, **{k: v.encode() for k, v in named.items()}}, timeout=30)
    assert r.status_code == 200, r.text
    rid = r.headers["x-request-id"]
    wait_until(lambda: ledger_rows(services[0], "request_id = $1", rid), timeout=10, what="ledger row")
    row = ledger_rows(services[0], "request_id = $1", rid)[0]
    assert (row["end_user"], row["customer"]) == ("José", "Zoë GmbH")
    assert "café" in (row["tags"] or []), row["tags"]
    r = httpx.post(chat, json=body, headers={**auth, "x-gateway-user": b"Jos\xe9"}, timeout=30)
    assert r.status_code == 200, r.text
    rid = r.headers["x-request-id"]
    wait_until(lambda: ledger_rows(services[0], "request_id = $1", rid), timeout=10, what="ledger row")
    assert ledger_rows(services[0], "request_id = $1", rid)[0]["end_user"] == "José"
