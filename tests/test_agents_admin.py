"""The agent admin API, feedback and the CLI over real HTTP on a real gateway (embedded PostgreSQL
and Valkey), and the registry's cross-replica reloads.

The gateway runs from a small launcher that mounts gateway/admin_agents.py's routes and the
feedback handler unless the app already does, so these tests hold before and after the wiring.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
import yaml

from tests.conftest import LOCAL_HTTP, MASTER_KEY, ROOT, MockProvider, Proc, free_port, wait_until

LAUNCHER = textwrap.dedent(
    """
    from gateway import admin_agents, feedback
    from gateway.app import create_app as _create


    def create_app():
        app = _create()
        router = app.admin.app.router
        if not any(getattr(r, "path", None) == "/admin/agents" for r in router.routes):
            router.routes.extend(admin_agents.routes(app.admin))
        if "/v1/feedback" not in app._routes:
            async def handle(scope, receive, send, rid, crid):
                await feedback.feedback(app.svc, scope, receive, send, rid, crid)

            app._routes["/v1/feedback"] = ("POST", handle)
        return app
    """
)


class AgentGateway(Proc):
    def __init__(self, tmp: Path, config: dict, urls: tuple[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (tmp / "agents_launcher.py").write_text(LAUNCHER)
        cfg_path = tmp / f"agents-gateway-{self.port}.yaml"
        cfg_path.write_text(yaml.safe_dump(config))
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(tmp), str(ROOT)]),
            "GATEWAY_CONFIG": str(cfg_path),
            "DATABASE_URL": urls[0],
            "REDIS_URL": urls[1],
            "GATEWAY_MASTER_KEY": MASTER_KEY,
            "GATEWAY_DATA_DIR": str(tmp / "data"),
        }
        args = [
            sys.executable,
            "-m",
            "uvicorn",
            "agents_launcher:create_app",
            "--factory",
            "--port",
            str(self.port),
            "--lifespan",
            "on",
            "--no-access-log",
        ]
        super().__init__(args, env, tmp / f"agents-gateway-{self.port}.log")
        try:
            wait_until(
                lambda: LOCAL_HTTP.get(f"{self.url}/readyz").status_code == 200, timeout=60, what="gateway ready"
            )
        except TimeoutError:
            self.stop()
            raise RuntimeError("gateway did not start:\n" + self.log()) from None


def config(mock: MockProvider) -> dict:
    return {
        "router": {"max_attempts": 1},
        "providers": [{"name": "mock", "kind": "openai", "base_url": f"{mock.url}/v1", "api_keys": ["k"]}],
        "models": [
            {"name": "gpt-mock", "deployments": [{"provider": "mock", "model": "mock-gpt"}]},
            {"name": "embed-mock", "mode": "embedding", "deployments": [{"provider": "mock", "model": "mock-emb"}]},
        ],
    }


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    g = AgentGateway(tmp_root, config(module_mock), services)
    yield g
    g.stop()


def call(gw, method: str, path: str, key: str = MASTER_KEY, **kw) -> httpx.Response:
    return LOCAL_HTTP.request(method, f"{gw.url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=30, **kw)


def unique(prefix: str = "a") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def new_key(gw, tenant: str, admin: bool = False) -> str:
    body = {"name": unique("k"), "tenant": tenant, **({"scopes": ["admin"]} if admin else {})}
    resp = call(gw, "POST", "/admin/keys", json=body)
    assert resp.status_code == 201, resp.text
    return resp.json()["key"]


def create(gw, key: str = MASTER_KEY, **body) -> httpx.Response:
    body.setdefault("model", "gpt-mock")
    if "template" not in body and "template_id" not in body:
        body["template"] = "You help {{ who }}."
        body.setdefault("defaults", {"who": "everyone"})
    return call(gw, "POST", "/admin/agents", key, json=body)


def db(database_url: str, sql: str, *args):
    async def go():
        conn = await asyncpg.connect(database_url)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    return asyncio.run(go())


# ---- agents ---------------------------------------------------------------------------------------
def test_create_from_the_library_makes_version_1_labelled_latest_and_production(gw):
    name = unique("support")
    resp = create(gw, name=name, template_id="support", defaults={"company_name": "Acme"}, max_steps=4)
    assert resp.status_code == 201, resp.text
    agent = resp.json()
    assert agent["id"].startswith("agt_") and agent["name"] == name and agent["tenant"] == "default"
    assert agent["labels"] == {"latest": {"1": 1}, "production": {"1": 1}}
    assert agent["max_steps"] == 4 and agent["latest_version"] == 1
    got = call(gw, "GET", f"/admin/agents/{name}").json()
    assert got["id"] == agent["id"] and got["defaults"] == {"company_name": "Acme"}
    listed = call(gw, "GET", "/admin/agents").json()["data"]
    assert name in {a["name"] for a in listed}
    v1 = call(gw, "GET", f"/admin/agents/{name}/versions/1").json()
    assert "customer support assistant" in v1["template"] and "company_name" in v1["variables"]
    assert v1["labels"] == ["latest", "production"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": "Bad Name"}, "name"),
        ({"name": "x" * 65}, "name"),
        ({"model": "no-such-model"}, "model"),
        ({"model": "embed-mock"}, "model"),
        ({"template": "a", "template_id": "support"}, "template"),
        ({"template_id": "nope"}, "template_id"),
        ({"template": "{{ ''.__class__ }}"}, "template"),
        ({"template": "{% set x = 1 %}"}, "template"),
        ({"template": "x" * 70000}, "template"),
        ({"variables": {"who": {"type": "float"}}}, "variables.who.type"),
        ({"defaults": {"who": 5}}, "defaults.who"),
        ({"max_steps": 0}, "max_steps"),
        ({"max_steps": 21}, "max_steps"),
        ({"memory": {"window_turns": 0}}, "memory.window_turns"),
        ({"builtins": ["rm_rf"]}, "builtins"),
        ({"tools": [{"kind": "http", "name": "x"}]}, None),
        ({"fallback_message": ""}, "fallback_message"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_input_is_a_400_naming_the_field_and_stores_nothing(gw, services, body, param):
    name = body.pop("name", None) or unique("bad")
    resp = create(gw, name=name, **body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    if param is not None:
        assert err["param"] == param, err
    else:
        assert err["param"].startswith("tools"), err
    assert not db(services[0], "SELECT 1 FROM agents WHERE name = $1", name)


def test_duplicate_name_refused_archived_name_reusable(gw):
    name = unique()
    assert create(gw, name=name).status_code == 201
    dup = create(gw, name=name)
    assert dup.status_code == 400 and dup.json()["error"]["code"] == "agent_exists"
    assert call(gw, "DELETE", f"/admin/agents/{name}").json()["deleted"] is True
    assert call(gw, "GET", f"/admin/agents/{name}").status_code == 404
    assert create(gw, name=name).status_code == 201


def test_patch_changes_settings_but_not_the_name(gw):
    name = unique()
    create(gw, name=name)
    resp = call(gw, "PATCH", f"/admin/agents/{name}", json={"max_steps": 7, "fallback_message": "Back soon."})
    assert resp.status_code == 200, resp.text
    assert resp.json()["max_steps"] == 7 and resp.json()["fallback_message"] == "Back soon."
    assert resp.json()["defaults"] == {"who": "everyone"}  # untouched settings stay
    bad = call(gw, "PATCH", f"/admin/agents/{name}", json={"name": "other"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "name"


# ---- versions and labels ------------------------------------------------------------------------------
def test_versions_labels_diff_and_immutability(gw, services):
    name = unique()
    create(gw, name=name, template="line one\nline two {{ who }}\n")
    v2 = call(
        gw,
        "POST",
        f"/admin/agents/{name}/versions",
        json={"template": "line one\nline 2 {{ who }} {{ mood }}\n", "variables": {"mood": {"type": "string",
              "default": "calm"}}, "note": "friendlier", "labels": ["staging"]},
    )  # fmt: skip
    assert v2.status_code == 201, v2.text
    assert v2.json()["version"] == 2 and v2.json()["labels"] == ["latest", "staging"]
    agent = call(gw, "GET", f"/admin/agents/{name}").json()
    assert agent["labels"] == {"latest": {"2": 1}, "production": {"1": 1}, "staging": {"2": 1}}
    versions = call(gw, "GET", f"/admin/agents/{name}/versions").json()["data"]
    assert [v["version"] for v in versions] == [2, 1]
    assert versions[0]["note"] == "friendlier" and versions[0]["labels"] == ["latest", "staging"]
    d = call(gw, "GET", f"/admin/agents/{name}/diff", params={"from": 1, "to": 2}).json()
    assert "-line two {{ who }}" in d["template"] and "+line 2 {{ who }} {{ mood }}" in d["template"]
    assert d["variables_added"] == ["mood"]
    assert call(gw, "GET", f"/admin/agents/{name}/diff", params={"from": 1, "to": 9}).status_code == 404
    assert call(gw, "GET", f"/admin/agents/{name}/diff", params={"from": 1}).status_code == 400
    # rollback: production back and forth
    assert call(gw, "PUT", f"/admin/agents/{name}/labels/production", json={"version": 2}).status_code == 200
    assert call(gw, "GET", f"/admin/agents/{name}").json()["labels"]["production"] == {"2": 1}
    # a saved version never changes, even in SQL
    with pytest.raises(asyncpg.RaiseError):
        db(services[0], "UPDATE prompt_versions SET template = 'x' WHERE version = 1")
    with pytest.raises(asyncpg.RaiseError):
        db(services[0], "DELETE FROM prompt_versions")


@pytest.mark.parametrize(
    ("label", "body", "status", "param"),
    [
        ("production", {"version": 9}, 404, "version"),
        ("production", {"variants": {"1": 0, "2": 50}}, 400, "variants.1"),
        ("production", {"variants": {"1": -5}}, 400, "variants.1"),
        ("production", {"variants": {"1": 1.5}}, 400, "variants.1"),
        ("production", {"variants": {"x": 1}}, 400, "variants"),
        ("production", {"variants": {}}, 400, "variants"),
        ("production", {"variants": {"1": 50, "9": 50}}, 404, "version"),
        ("production", {}, 400, "version"),
        ("production", {"version": 1, "variants": {"1": 1}}, 400, "version"),
        ("latest", {"version": 1}, 400, "label"),
        ("Bad%20Label", {"version": 1}, 400, "label"),
        ("123", {"version": 1}, 400, "label"),
    ],
)
def test_bad_label_moves_are_refused_and_change_nothing(gw, label, body, status, param):
    name = unique()
    create(gw, name=name)
    call(gw, "POST", f"/admin/agents/{name}/versions", json={"template": "v2 {{ who }}"})
    before = call(gw, "GET", f"/admin/agents/{name}").json()["labels"]
    resp = call(gw, "PUT", f"/admin/agents/{name}/labels/{label}", json=body)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["param"] == param
    assert call(gw, "GET", f"/admin/agents/{name}").json()["labels"] == before


# ---- tenants ------------------------------------------------------------------------------------------
def test_tenant_admins_see_and_change_only_their_own_agents(gw):
    acme, globex = unique("acme"), unique("globex")
    acme_admin, globex_admin = new_key(gw, acme, admin=True), new_key(gw, globex, admin=True)
    shared = unique("shared")
    assert create(gw, acme_admin, name=shared).json()["tenant"] == acme
    assert create(gw, globex_admin, name=shared).json()["tenant"] == globex  # same name, other tenant
    assert create(gw, acme_admin, name=unique(), tenant=globex).status_code == 403
    only = unique("only")
    create(gw, acme_admin, name=only)
    assert {a["tenant"] for a in call(gw, "GET", "/admin/agents", acme_admin).json()["data"]} == {acme}
    assert call(gw, "GET", f"/admin/agents/{only}", globex_admin).status_code == 404
    for method, path, body in [
        ("PATCH", f"/admin/agents/{only}", {"max_steps": 2}),
        ("POST", f"/admin/agents/{only}/versions", {"template": "hijack"}),
        ("PUT", f"/admin/agents/{only}/labels/production", {"version": 1}),
        ("DELETE", f"/admin/agents/{only}", None),
    ]:
        assert call(gw, method, path, globex_admin, json=body).status_code == 404
    assert call(gw, "GET", f"/admin/agents/{only}", acme_admin).json()["max_steps"] == 5
    # the super-admin sees both, and names the tenant when a name is ambiguous
    assert call(gw, "GET", f"/admin/agents/{shared}").json()["error"]["code"] == "ambiguous_agent"
    assert call(gw, "GET", f"/admin/agents/{shared}", params={"tenant": globex}).json()["tenant"] == globex
    # a plain key has no admin scope
    assert call(gw, "GET", "/admin/agents", new_key(gw, acme)).status_code == 403


# ---- feedback and experiments ---------------------------------------------------------------------------
def test_feedback_validation(gw):
    key = new_key(gw, unique("fb"))
    for body, param in [
        ({"thumbs": "up"}, "request_id"),
        ({"request_id": "r1"}, "thumbs"),
        ({"request_id": "r1", "thumbs": "sideways"}, "thumbs"),
        ({"request_id": "r1", "thumbs": [1]}, "thumbs"),
        ({"request_id": "r1", "score": 1.5}, "score"),
        ({"request_id": "r1", "score": True}, "score"),
        ({"request_id": "r1", "resolved": "yes"}, "resolved"),
        ({"request_id": "r1", "text": "x" * 4001}, "text"),
        ({"request_id": "r\n1", "thumbs": 1}, "request_id"),
        ({"request_id": "r1", "thumbs": 1, "agent": "no-such-agent"}, "agent"),
        ({"request_id": "r1", "thumbs": 1, "extra": 1}, "extra"),
    ]:
        resp = call(gw, "POST", "/v1/feedback", key, json=body)
        assert resp.status_code in (400, 404), (body, resp.text)
        assert resp.json()["error"]["param"] == param, body
    assert call(gw, "POST", "/v1/feedback", "sk-wrong", json={"request_id": "r", "thumbs": 1}).status_code == 401
    ok = call(gw, "POST", "/v1/feedback", key, json={"request_id": "r1", "thumbs": "down", "score": 0.2, "text": "meh"})
    assert ok.status_code == 201 and ok.json()["object"] == "feedback" and ok.json()["id"].startswith("fb_")


def test_feedback_is_rate_limited_per_key_before_anything_is_stored(gw, services):
    tenant = unique("fbrl")
    resp = call(gw, "POST", "/admin/keys", json={"name": unique("k"), "tenant": tenant, "rpm": 3})
    key = resp.json()["key"]
    codes: list[int] = []
    for _ in range(2):  # a minute boundary may split one burst; never two in a row
        burst = [call(gw, "POST", "/v1/feedback", key, json={"request_id": "r", "thumbs": 1}) for _ in range(5)]
        codes += [r.status_code for r in burst]
        if burst[-1].status_code == 429:
            break
    assert codes[-1] == 429 and codes[-2] == 429 and set(codes) == {201, 429}, codes
    refused = call(gw, "POST", "/v1/feedback", key, json={"request_id": "r9", "thumbs": 1})
    if refused.status_code == 429:
        assert refused.json()["error"]["type"] == "rate_limit_error" and int(refused.headers["retry-after"]) >= 1

    async def stored() -> int:
        conn = await asyncpg.connect(services[0])
        try:
            return await conn.fetchval("SELECT count(*) FROM feedback WHERE tenant = $1", tenant)
        finally:
            await conn.close()

    assert asyncio.run(stored()) == codes.count(201) + (refused.status_code == 201)
    other = new_key(gw, tenant)  # another key has its own window
    assert call(gw, "POST", "/v1/feedback", other, json={"request_id": "r1", "thumbs": 1}).status_code == 201


def test_feedback_keys_minted_by_a_limited_key_share_its_window(gw):
    """A tenant admin limited to 3 a minute mints children (each inheriting rpm 3): their
    feedback calls count in its window too, so minting does not multiply its allowance."""
    tenant = unique("fbmint")
    resp = call(gw, "POST", "/admin/keys", json={"name": unique("k"), "tenant": tenant, "rpm": 3, "scopes": ["admin"]})
    boss = resp.json()["key"]
    kids = []
    for _ in range(3):
        r = call(gw, "POST", "/admin/keys", boss, json={"name": unique("kid")})
        assert r.status_code == 201, r.text
        kids.append(r.json()["key"])
    codes = [
        call(gw, "POST", "/v1/feedback", kid, json={"request_id": "r", "thumbs": 1}).status_code for kid in kids * 3
    ]
    # one minute window (a minute boundary in the burst may let a second window's worth in)
    assert codes.count(201) <= 6 and 429 in codes, codes


def seed_turns(database_url: str, tenant: str, agent: str, rows: list[tuple[str, str, str]]) -> None:
    """Ledger rows as the agent stage writes them: (request_id, variant, conversation_id), two
    steps each."""

    async def go():
        conn = await asyncpg.connect(database_url)
        try:
            await conn.executemany(
                """INSERT INTO ledger (request_id, step, ts, tenant, agent, endpoint, model, status, prompt_tokens,
                                      completion_tokens, cost_usd, latency_ms, prompt_version, variant,
                                      conversation_id)
                   VALUES ($1, $2, now(), $3, $4, 'chat', 'gpt-mock', 200, 10, 5, 0.001, $5, $6, $7, $8)""",
                [
                    (rid, step, tenant, agent, 100.0 + step, int(variant), variant, conv)
                    for rid, variant, conv in rows
                    for step in (1, 2)
                ],
            )
        finally:
            await conn.close()

    asyncio.run(go())


def test_experiment_report_on_seeded_turns_and_feedback_then_stop_promotes(gw, services):
    tenant = unique("exp")
    admin_key, key = new_key(gw, tenant, admin=True), new_key(gw, tenant)
    name = unique("ab")
    create(gw, admin_key, name=name)
    call(gw, "POST", f"/admin/agents/{name}/versions", admin_key, json={"template": "Be brief, {{ who }}."})
    started = call(
        gw, "PUT", f"/admin/agents/{name}/labels/production", admin_key, json={"variants": {"1": 50, "2": 50}}
    )
    assert started.status_code == 200 and started.json()["experiment_id"].startswith("exp_")
    same = call(gw, "PUT", f"/admin/agents/{name}/labels/production", admin_key, json={"variants": {"1": 50, "2": 50}})
    assert same.json()["experiment_id"] == started.json()["experiment_id"]  # the same arms: it goes on
    rows = []
    for i in range(60):
        variant = "1" if i < 30 else "2"
        rows += [(f"req-{name}-{i}-a", variant, f"conv-{name}-{i}"), (f"req-{name}-{i}-b", variant, f"conv-{name}-{i}")]
    seed_turns(services[0], tenant, name, rows)
    # variant 1: 10 of 30 up; variant 2: 25 of 30 up (by request id, and by conversation id)
    for i in range(60):
        up = (i < 10) if i < 30 else (i < 55)
        body = {"thumbs": "up" if up else "down", "score": 0.9 if up else 0.3, "agent": name}
        body |= {"request_id": f"req-{name}-{i}-a"} if i % 2 else {"conversation_id": f"conv-{name}-{i}"}
        assert call(gw, "POST", "/v1/feedback", key, json=body).status_code == 201
    # another tenant naming these ids reaches nothing of this tenant's
    intruder = new_key(gw, unique("intruder"))
    for i in range(30):
        call(gw, "POST", "/v1/feedback", intruder, json={"request_id": f"req-{name}-{i}-a", "thumbs": "up"})
    report = call(gw, "GET", f"/admin/agents/{name}/experiments", admin_key).json()["data"][0]
    arms = {a["variant"]: a for a in report["variants"]}
    assert arms["1"]["conversations"] == 30 and arms["1"]["turns"] == 60
    assert arms["1"]["thumbs_up"] == 10 and arms["2"]["thumbs_up"] == 25
    assert arms["1"]["feedback_rate"] == 1.0 and arms["2"]["tokens"] == 60 * 2 * 15
    assert arms["1"]["latency_ms_p50"] is not None
    (test,) = report["tests"]
    assert test["metric"] == "thumbs_up_rate" and test["significant"] and test["better"] == "2"
    assert test["p_value"] < 0.001 and test["still_needed_per_arm"] == 0
    assert report["stopped_at"] is None
    # stop: promote variant 2
    bad = call(gw, "POST", f"/admin/agents/{name}/experiments/production/stop", admin_key, json={"promote": "7"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "promote"
    stop = call(gw, "POST", f"/admin/agents/{name}/experiments/production/stop", admin_key, json={"promote": "2"})
    assert stop.status_code == 200, stop.text
    assert stop.json()["promoted"] == "2" and stop.json()["stopped_at"] is not None
    assert call(gw, "GET", f"/admin/agents/{name}", admin_key).json()["labels"]["production"] == {"2": 1}
    again = call(gw, "POST", f"/admin/agents/{name}/experiments/production/stop", admin_key, json={"promote": "2"})
    assert again.status_code == 404


def test_prompt_template_library(gw):
    data = call(gw, "GET", "/admin/prompt-templates").json()["data"]
    by_id = {t["id"]: t for t in data}
    assert {"sales", "support", "receptionist", "faq"} <= set(by_id)
    assert all(v["description"] for v in by_id["receptionist"]["variables"].values())


# ---- the registry across replicas ----------------------------------------------------------------------
def test_a_moved_label_reaches_every_registry_and_the_poll_catches_a_missed_message(gw, services):
    from runtime import prompts
    from runtime.agent_registry import AgentRegistry
    from runtime.agents import VERSION_KEY

    name = unique("reg")
    tool = {
        "kind": "http",
        "name": "order_status",
        "description": "Look an order up.",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
        "config": {"url": "https://api.example.com/orders/{order_id}", "allowed_hosts": ["api.example.com"]},
    }
    made = create(gw, name=name, tools=[tool], builtins=["escalate_to_human"])
    assert made.status_code == 201, made.text
    assert made.json()["tools"][0]["name"] == "order_status" and made.json()["builtins"] == ["escalate_to_human"]
    call(gw, "POST", f"/admin/agents/{name}/versions", json={"template": "second {{ who }}"})

    async def go():
        pool = await asyncpg.create_pool(services[0], min_size=1, max_size=2)
        redis = aioredis.from_url(services[1])
        regs = [AgentRegistry(pool, redis), AgentRegistry(pool, redis)]
        try:
            for r in regs:
                await r.start()
            assert all(prompts.select(r.get("default", name), None, "c").version.version == 1 for r in regs)
            assert [t.name for t in regs[0].get("default", name).tools] == ["order_status"]
            assert regs[0].get("default", name).builtins == ("escalate_to_human",)
            assert name in {a.name for a in regs[1].for_tenant("default")}

            async def until(check) -> None:
                for _ in range(200):
                    if check():
                        return
                    await asyncio.sleep(0.05)
                raise AssertionError("registry did not follow")

            moved = await asyncio.to_thread(
                call, gw, "PUT", f"/admin/agents/{name}/labels/production", json={"version": 2}
            )
            assert moved.status_code == 200
            for r in regs:
                await until(lambda r=r: r.get("default", name).labels["production"] == {2: 1})
            # a change whose message is lost: only the version counter says so
            async with pool.acquire() as conn:
                await conn.execute(
                    """UPDATE prompt_labels SET target = '{"1": 1}' WHERE label = 'production'
                       AND agent_id = (SELECT id FROM agents WHERE name = $1)""",
                    name,
                )
            await redis.incr(VERSION_KEY)
            for r in regs:
                await until(lambda r=r: r.get("default", name).labels["production"] == {1: 1})
            # archived: gone from every registry
            await asyncio.to_thread(call, gw, "DELETE", f"/admin/agents/{name}")
            for r in regs:
                await until(lambda r=r: r.get("default", name) is None)
        finally:
            for r in regs:
                await r.stop()
            await redis.aclose()
            await pool.close()

    asyncio.run(go())


# ---- the CLI ------------------------------------------------------------------------------------------
_CLI = (
    "import argparse, sys\n"
    "from gateway import cli_agents\n"
    "parser = argparse.ArgumentParser(prog='gateway')\n"
    "cli_agents.add_parser(parser.add_subparsers(dest='cmd', required=True))\n"
    "sys.exit(cli_agents.run(parser.parse_args(sys.argv[1:])))\n"
)


def agents_cli(*args: str, urls: tuple[str, str] | None, tmp: Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``gateway agents ...`` through gateway/cli_agents.py's own parser and runner (``urls``
    None: no DATABASE_URL / REDIS_URL, as on a machine that runs ``make run``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "GATEWAY_CONFIG")}
    env["GATEWAY_DATA_DIR"] = str(tmp / "data")
    if urls is not None:
        env.update(DATABASE_URL=urls[0], REDIS_URL=urls[1])
    return subprocess.run(
        [sys.executable, "-c", _CLI, "agents", *args], env=env, capture_output=True, text=True, timeout=120, cwd=cwd
    )


def test_cli_create_checks_model_against_the_demo_config(tmp_path):
    """On `make run`'s machine (embedded database, no config: the demo) the issue's own example
    `gateway agents create --model gpt-4o-mini` created an agent whose every call then got 404:
    the CLI checked --model only against --config / $GATEWAY_CONFIG. It now finds the config as
    `gateway serve` does and refuses before starting anything (no database was started: the data
    directory stays empty)."""
    out = agents_cli(
        "create", "--name", "support", "--model", "gpt-4o-mini", "--template", "support",
        urls=None, tmp=tmp_path, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    assert "'gpt-4o-mini' is not a chat model group" in out.stderr and "demo-gpt" in out.stderr
    assert "demo-embedding" not in out.stderr  # only chat groups are offered
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_cli_create_checks_model_against_gateway_yaml(gw, services, tmp_path, module_mock):
    """./gateway.yaml is what `gateway serve` runs when no config is named: --model is held to it."""
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(config(module_mock)))
    tenant = unique("clicfg")
    refused = agents_cli(
        "create", "--name", "a", "--model", "demo-gpt", "--template", "faq", "--tenant", tenant,
        urls=services, tmp=tmp_path, cwd=tmp_path,
    )  # fmt: skip
    assert refused.returncode == 1 and "'demo-gpt' is not a chat model group of gateway.yaml" in refused.stderr
    embedding = agents_cli(
        "create", "--name", "a", "--model", "embed-mock", "--template", "faq", "--tenant", tenant,
        urls=services, tmp=tmp_path, cwd=tmp_path,
    )  # fmt: skip
    assert embedding.returncode == 1 and "not a chat model group" in embedding.stderr
    made = agents_cli(
        "create", "--name", "a", "--model", "gpt-mock", "--template", "faq", "--tenant", tenant,
        "--var", "organization=Acme", urls=services, tmp=tmp_path, cwd=tmp_path,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "agent:a" in made.stdout


def test_cli_create_list_versions_and_label(gw, services, tmp_root):
    tenant = unique("cli")
    name = unique("cli")
    out = agents_cli(
        "create", "--name", name, "--model", "gpt-mock", "--template", "faq", "--tenant", tenant,
        "--var", "organization=Acme", "--var", "max_words=80", urls=services, tmp=tmp_root,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"agent:{name}" in out.stdout
    admin_key = new_key(gw, tenant, admin=True)
    agent = call(gw, "GET", f"/admin/agents/{name}", admin_key).json()
    assert agent["defaults"] == {"organization": "Acme", "max_words": 80}
    call(gw, "POST", f"/admin/agents/{name}/versions", admin_key, json={"template": "v2 {{ organization }}"})
    listed = agents_cli("list", "--tenant", tenant, urls=services, tmp=tmp_root)
    assert name in listed.stdout
    versions = agents_cli("versions", name, "--tenant", tenant, urls=services, tmp=tmp_root)
    assert versions.returncode == 0 and "from the faq template" in versions.stdout
    label = agents_cli("label", name, "staging", "2", "--tenant", tenant, urls=services, tmp=tmp_root)
    assert label.returncode == 0, label.stderr
    assert call(gw, "GET", f"/admin/agents/{name}", admin_key).json()["labels"]["staging"] == {"2": 1}
    bad = agents_cli("label", name, "staging", "9", "--tenant", tenant, urls=services, tmp=tmp_root)
    assert bad.returncode == 1 and "no prompt version 9" in bad.stderr
    dup = agents_cli(
        "create", "--name", name, "--model", "gpt-mock", "--template", "faq", "--tenant", tenant,
        urls=services, tmp=tmp_root,
    )  # fmt: skip
    assert dup.returncode == 1 and "exists already" in dup.stderr


def test_cli_change_whose_announcement_fails_is_kept_and_says_so(gw, services, tmp_root):
    """(Failed before: the change was committed, then the announcement's ConnectionError ended the
    command with a traceback and exit status 1, inviting the operator to make it again.)"""
    tenant, name = unique("cli"), unique("cli")
    dead = (services[0], "redis://127.0.0.1:1/0")  # nothing listens there
    out = agents_cli(
        "create", "--name", name, "--model", "gpt-mock", "--template", "faq", "--tenant", tenant,
        "--var", "organization=Acme", "--var", "max_words=80", urls=dead, tmp=tmp_root,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "warning: saved, but the gateway processes were not told" in out.stderr
    admin_key = new_key(gw, tenant, admin=True)
    assert call(gw, "GET", f"/admin/agents/{name}", admin_key).status_code == 200  # (committed)
