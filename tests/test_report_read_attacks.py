"""Attacks on the report and read endpoints (``POST /v1/feedback`` and the experiment reports of
``GET /admin/agents/{name}/experiments``) from an attacker's review: what a tenant's key can do to
move another agent's experiment or to learn what it may not use. Real gateway process, real
PostgreSQL and Valkey."""

from __future__ import annotations

import pytest

from tests.conftest import wait_until
from tests.test_agents_admin import AgentGateway, call, config, create, new_key, seed_turns, unique


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    g = AgentGateway(tmp_root, config(module_mock), services)
    yield g
    g.stop()


def _restricted_key(gw, tenant: str, models: list[str]) -> str:
    resp = call(gw, "POST", "/admin/keys", json={"name": unique("k"), "tenant": tenant, "models": models})
    assert resp.status_code == 201, resp.text
    return resp.json()["key"]


def _experiment(gw, services, admin_key: str, tenant: str) -> str:
    """An agent with an experiment on ``production`` (versions 1 and 2), and ten conversations
    per arm seeded in the ledger (``conv-<i>``: the ids any client of the tenant might choose)."""
    name = unique("ab")
    assert create(gw, admin_key, name=name).status_code == 201
    call(gw, "POST", f"/admin/agents/{name}/versions", admin_key, json={"template": "Be brief, {{ who }}."})
    started = call(gw, "PUT", f"/admin/agents/{name}/labels/production", admin_key, json={"variants": {"1": 1, "2": 1}})
    assert started.status_code == 200, started.text
    rows = [(f"req-{name}-{i}", "1" if i < 10 else "2", f"conv-{i}") for i in range(20)]
    seed_turns(services[0], tenant, name, rows)
    return name


def _arms(gw, admin_key: str, name: str) -> dict:
    report = call(gw, "GET", f"/admin/agents/{name}/experiments", admin_key)
    assert report.status_code == 200, report.text
    return {a["variant"]: a for a in report.json()["data"][0]["variants"]}


def test_attack_feedback_naming_another_agent_does_not_vote_in_this_agents_experiment(gw, services):
    """A key of the tenant that may use only agent ``widget`` sends feedback on ``conv-0`` …
    ``conv-9``, naming ``widget`` (whose conversations they may well be: conversation ids are per
    agent, and clients pick the same ones). The experiment report of ``ab`` joined feedback to its turns by
    conversation id alone, whatever agent the feedback named: thumbs down on ``ab``'s variant 1
    came from a key that may not even call ``ab``."""
    tenant = unique("fbx")
    admin_key = new_key(gw, tenant, admin=True)
    name = _experiment(gw, services, admin_key, tenant)
    widget = unique("widget")
    assert create(gw, admin_key, name=widget).status_code == 201
    key = _restricted_key(gw, tenant, [f"agent:{widget}"])
    for i in range(10):
        body = {"conversation_id": f"conv-{i}", "agent": widget, "thumbs": "down"}
        assert call(gw, "POST", "/v1/feedback", key, json=body).status_code == 201
    arms = _arms(gw, admin_key, name)
    assert arms["1"]["feedback"] == 0 and arms["1"]["thumbs_down"] == 0, arms["1"]


def test_attack_feedback_naming_an_agent_the_key_may_not_use_is_not_found(gw, services):
    """A key restricted to one agent names another agent of its tenant in feedback: it was
    stored against that agent (201), and the 404 for a name that does not exist told the key
    which agents its tenant has, which ``GET /v1/models`` keeps from it."""
    tenant = unique("fbn")
    admin_key = new_key(gw, tenant, admin=True)
    allowed, hidden = unique("widget"), unique("internal")
    for name in (allowed, hidden):
        assert create(gw, admin_key, name=name).status_code == 201
    key = _restricted_key(gw, tenant, [f"agent:{allowed}"])
    ok = call(gw, "POST", "/v1/feedback", key, json={"conversation_id": "c1", "agent": allowed, "thumbs": 1})
    assert ok.status_code == 201, ok.text
    found = call(gw, "POST", "/v1/feedback", key, json={"conversation_id": "c1", "agent": hidden, "thumbs": 1})
    missing = call(gw, "POST", "/v1/feedback", key, json={"conversation_id": "c1", "agent": unique("x"), "thumbs": 1})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "agent"
    assert found.status_code == 404, found.text
    assert found.json()["error"]["param"] == "agent"
    assert found.json()["error"]["message"] == f"No agent named {hidden!r}."


@pytest.fixture(scope="module")
def gw_ruled(tmp_root, services, module_mock):
    """A gateway whose group ``gpt-tier`` routes by the request's metadata (``tier: gold``) and
    has no route for any other request: the operator's routing policy, which the client's
    metadata decides."""
    cfg = config(module_mock)
    cfg["models"].append({"name": "gpt-tier", "rules": [{"when": {"metadata": {"tier": "gold"}}, "use": "gpt-mock"}]})
    g = AgentGateway(tmp_root, cfg, services)
    yield g
    g.stop()


def test_attack_an_agent_turn_refused_before_admission_is_not_recorded_as_the_agent_its_metadata_names(
    gw_ruled, services
):
    """A key that may use agent ``b`` only sends ``b`` a turn whose metadata says ``agent: a``
    and that no routing rule of ``b``'s model serves (400 ``no_matching_rule``). The turn was
    recorded (as every refused request is) with ``b``'s variant and conversation but the agent
    the client named: a turn in ``a``'s experiment, in the arm the client picks by its
    conversation id — and its request id one the client may then vote on. An agent's turns are
    its own whatever the client says, refused ones included."""
    gw = gw_ruled
    tenant = unique("turn")
    admin_key = new_key(gw, tenant, admin=True)
    a, b = unique("a"), unique("b")
    assert create(gw, admin_key, name=a).status_code == 201
    assert create(gw, admin_key, name=b, model="gpt-tier").status_code == 201
    for name in (a, b):
        call(gw, "POST", f"/admin/agents/{name}/versions", admin_key, json={"template": "Be brief, {{ who }}."})
        split = call(
            gw, "PUT", f"/admin/agents/{name}/labels/production", admin_key, json={"variants": {"1": 1, "2": 1}}
        )
        assert split.status_code == 200, split.text
    key = _restricted_key(gw, tenant, [f"agent:{b}"])
    body = {
        "model": f"agent:{b}",
        "messages": [{"role": "user", "content": "hi"}],
        "metadata": {"agent": a, "conversation_id": "c-1"},
    }
    refused = call(gw, "POST", "/v1/chat/completions", key, json=body)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "no_matching_rule", refused.text
    rid = refused.headers["x-request-id"]
    wait_until(
        lambda: call(gw, "GET", f"/admin/requests/{rid}", admin_key).status_code == 200, timeout=30, what="ledger row"
    )
    record = call(gw, "GET", f"/admin/requests/{rid}", admin_key).json()
    assert record["variant"] in ("1", "2")  # the turn was b's, in one of b's arms
    assert record["agent"] == b, record["agent"]
    assert sum(arm["turns"] for arm in _arms(gw, admin_key, a).values()) == 0


@pytest.mark.parametrize("agent", ["agent:", "@prod", "agent:@prod"])
def test_attack_feedback_agent_that_names_no_agent_is_a_400(gw, services, agent):
    """``agent`` is an agent's name, as a model name (``agent:<name>@<label>``) or bare. One that
    names no agent once its prefix and label are cut was stored as feedback naming none (201):
    feedback that counts for every agent of the tenant, from a field the client filled in."""
    key = new_key(gw, unique("fbe"))
    resp = call(gw, "POST", "/v1/feedback", key, json={"conversation_id": "c1", "agent": agent, "thumbs": 1})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "agent"


def test_a_stopped_experiments_report_does_not_count_feedback_sent_after_it_stopped(gw, services):
    """An experiment is stopped (variant 2 promoted): its report is what the decision was made
    on. Feedback sent later on its conversations (a client voting on, or a key flooding, the old
    conversation ids) still counted — the report's feedback had a start but no end, and a later
    vote replaced the one given while the experiment ran — so the stopped experiment's figures
    (and its significance test) kept moving after the decision."""
    tenant = unique("fbs")
    admin_key = new_key(gw, tenant, admin=True)
    name = _experiment(gw, services, admin_key, tenant)
    key = new_key(gw, tenant)
    for i in range(5):
        body = {"conversation_id": f"conv-{i}", "agent": name, "thumbs": "up"}
        assert call(gw, "POST", "/v1/feedback", key, json=body).status_code == 201
    stop = call(gw, "POST", f"/admin/agents/{name}/experiments/production/stop", admin_key, json={"promote": "2"})
    assert stop.status_code == 200, stop.text
    before = _arms(gw, admin_key, name)
    for i in range(10):
        for body in ({"conversation_id": f"conv-{i}", "agent": name}, {"conversation_id": f"conv-{i}"}):
            assert call(gw, "POST", "/v1/feedback", key, json=body | {"thumbs": "down"}).status_code == 201
    assert (
        call(gw, "POST", "/v1/feedback", key, json={"request_id": f"req-{name}-3", "thumbs": "down"}).status_code == 201
    )
    after = _arms(gw, admin_key, name)
    assert after == before
    assert after["1"]["thumbs_up"] == 5 and after["1"]["thumbs_down"] == 0, after["1"]


def test_attack_feedback_naming_no_agent_from_a_key_limited_to_another_agent_does_not_vote(gw, services):
    """A key that may use only agent ``widget`` sends feedback on ``conv-0`` … ``conv-9`` without
    naming an agent: feedback naming none counted for every agent of the tenant, so it voted in
    ``ab``'s experiment, which the key may not call. It is kept (201, as any feedback: the answer
    tells nothing of which conversations exist) and counts only for the agents the key could use;
    a key that may use ``ab`` (or every model) still votes without naming it."""
    tenant = unique("fbz")
    admin_key = new_key(gw, tenant, admin=True)
    name = _experiment(gw, services, admin_key, tenant)
    widget = unique("widget")
    assert create(gw, admin_key, name=widget).status_code == 201
    limited = _restricted_key(gw, tenant, [f"agent:{widget}"])
    for i in range(10):
        sent = call(gw, "POST", "/v1/feedback", limited, json={"conversation_id": f"conv-{i}", "thumbs": "down"})
        assert sent.status_code == 201, sent.text
    assert (
        call(gw, "POST", "/v1/feedback", limited, json={"request_id": f"req-{name}-1", "thumbs": "down"}).status_code
        == 201
    )
    arms = _arms(gw, admin_key, name)
    assert arms["1"]["feedback"] == 0 and arms["1"]["thumbs_down"] == 0, arms["1"]
    allowed = _restricted_key(gw, tenant, [f"agent:{name}"])
    for i in range(3):
        assert (
            call(gw, "POST", "/v1/feedback", allowed, json={"conversation_id": f"conv-{i}", "thumbs": "up"}).status_code
            == 201
        )
    unrestricted = new_key(gw, tenant)
    for i in range(10, 12):
        body = {"conversation_id": f"conv-{i}", "thumbs": "up"}
        assert call(gw, "POST", "/v1/feedback", unrestricted, json=body).status_code == 201
    arms = _arms(gw, admin_key, name)
    assert (arms["1"]["thumbs_up"], arms["1"]["thumbs_down"]) == (3, 0), arms["1"]
    assert (arms["2"]["thumbs_up"], arms["2"]["thumbs_down"]) == (2, 0), arms["2"]
