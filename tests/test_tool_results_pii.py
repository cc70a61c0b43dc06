"""A tool result that holds more than one request may check for personal data (the PII bounds:
``pii.max_phone_checks``, ``pii.max_analysed_chars``) is withheld from the model, not sent
unchecked and not turned into a failed turn: the tool has run (a search, an order, a refund),
and a client told 400 retries the turn and runs it again. The same holds for a tool result the
policy blocks, for the model's own tool-call arguments, and at a fallback group whose policy is
stricter than the step's. Real gateway over HTTP, the OpenAI SDK, the mock provider and
loadtest/mock_tools.py's contact directory."""

from __future__ import annotations

import json

import openai
import pytest

from tests.conftest import Gateway
from tests.test_tools_review_s22 import ToolServer, agent, call, http_tool, new_key, run_record, unique

TENANT = unique("toolpii")


@pytest.fixture(scope="module")
def tools(tmp_root):
    server = ToolServer(tmp_root)
    yield server
    server.stop()


def _config(module_mock, **pii) -> dict:
    """One mock model group; the tenant's PII policy redacts phones and emails (``pii``: more settings)."""
    return {
        "router": {"max_attempts": 1},
        "providers": [{"name": "pp", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k"]}],
        "models": [{"name": "agent-model", "deployments": [{"provider": "pp", "model": "m"}]}],
        "pii": {
            "workers": 0,
            "timeout_s": 30,  # (a loaded machine's in-process analysis: 5 s gave 503 pii_unavailable)
            **pii,
            "policies": {"phones": {"entities": {"phone": "redact", "email": "redact"}}},
            "tenants": {TENANT: "phones"},
        },
    }


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    g = Gateway(tmp_root, _config(module_mock), services)
    yield g
    g.stop()


def _contacts_agent(gw, tools, **kw) -> str:
    """An agent of the tenant whose one tool is the contact directory (``count`` contacts)."""
    tool = http_tool("contacts", f"{tools.url}/directory", {"count": {"type": "string"}})
    return agent(gw, TENANT, [tool], **kw)


def _turn(gw, key: str, name: str, *counts: int) -> tuple[str, str]:
    """One turn whose model calls the directory once per count, in one step: (answer, request id)."""
    calls = [{"name": "contacts", "arguments": {"count": str(count)}} for count in counts]
    directive = "[[mock:" + json.dumps({"tool_calls": calls}) + "]]"
    c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=60)
    raw = c.chat.completions.with_raw_response.create(
        model=f"agent:{name}", messages=[{"role": "user", "content": f"Find my contacts {directive}"}]
    )
    return raw.parse().choices[0].message.content or "", raw.headers["x-request-id"]


def _tool_messages(module_mock) -> list[str]:
    second = module_mock.requests()[-1]["body"]["messages"]
    return [m["content"] for m in second if m.get("role") == "tool"]


def test_a_tool_result_too_costly_to_check_is_withheld_and_the_turn_answers(gw, tools, module_mock):
    key = new_key(gw, TENANT)
    name = _contacts_agent(gw, tools)
    module_mock.clear()
    _turn(gw, key, name, 600)  # ~600 distinct numbers: past pii.max_phone_checks (1000 checks)
    assert [r for r in tools.requests() if r["path"] == "/directory"], "the tool ran"
    results = _tool_messages(module_mock)
    assert len(results) == 1 and "withheld" in results[0]
    assert "555-" not in json.dumps(module_mock.requests()[-1]["body"])  # nothing of it went unchecked


def test_a_small_tool_result_is_still_scrubbed_and_sent(gw, tools, module_mock):
    key = new_key(gw, TENANT)
    name = _contacts_agent(gw, tools)
    module_mock.clear()
    _turn(gw, key, name, 3)
    results = _tool_messages(module_mock)
    assert len(results) == 1 and "withheld" not in results[0] and "Contact 1" in results[0]
    assert "555-0001" not in results[0]  # its numbers were scrubbed


def test_a_client_message_too_costly_to_check_is_still_refused(gw, module_mock):
    """Only a tool result of the turn's own steps is withheld; the client's own text is refused."""
    key = new_key(gw, TENANT)
    name = agent(gw, TENANT, [])
    text = " ".join(f"({200 + i % 700}) 555-{i:04d}" for i in range(600))
    c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model=f"agent:{name}", messages=[{"role": "user", "content": text}])
    assert err.value.code == "pii_too_much_to_check"


def test_the_run_record_says_the_result_was_withheld(gw, tools, module_mock):
    key = new_key(gw, TENANT)
    name = _contacts_agent(gw, tools)
    _, rid = _turn(gw, key, name, 600)
    withheld = [s for s in run_record(gw, rid)["steps"] if s["kind"] == "scrub"]
    assert withheld and withheld[0]["status"] == "withheld" and withheld[0]["name"] == "contacts"


@pytest.fixture(scope="module")
def small_gw(tmp_root, services, module_mock):
    """A gateway whose per-request text bound (pii.max_analysed_chars) is its smallest."""
    g = Gateway(tmp_root, _config(module_mock, max_analysed_chars=1024), services)
    yield g
    g.stop()


def test_a_result_past_the_text_bound_is_withheld_though_the_system_prompt_is_longer(small_gw, tools, module_mock):
    """The text bound's refusal named the longest field, not the one whose text is checked: an
    agent whose prompt (prose, nothing to check) is longer than the tool result got the turn
    refused naming messages[0].content, a message the client never sent, after the tool ran."""
    key = new_key(small_gw, TENANT)
    name = _contacts_agent(small_gw, tools, template="You help the user find their contacts. " * 500)
    module_mock.clear()
    _turn(small_gw, key, name, 100)  # ~2.7 KB of numbers: past 1024 characters to check; the prompt is 20 KB
    assert [r for r in tools.requests() if r["path"] == "/directory"], "the tool ran"
    results = _tool_messages(module_mock)
    assert len(results) == 1 and "withheld" in results[0]
    assert "555-" not in json.dumps(module_mock.requests()[-1]["body"])


def test_many_results_past_the_bound_in_one_step_cost_at_most_three_scrubs(gw, tools, module_mock):
    """Every scrub may spend a whole request's PII budget before it is refused: a model steered to
    call a tool that answers with hundreds of numbers 32 times in one step made the gateway scrub
    33 times, a budget each. After the step's second refusal, every result not yet withheld is
    withheld unchecked (here the small third one too): three scrubs at most."""
    key = new_key(gw, TENANT)
    name = _contacts_agent(gw, tools)
    module_mock.clear()
    _turn(gw, key, name, 600, 601, 3)
    results = _tool_messages(module_mock)
    assert len(results) == 3 and all("withheld" in r for r in results), results
    assert "555-" not in json.dumps(module_mock.requests()[-1]["body"])


@pytest.fixture(scope="module")
def fallback_gw(tmp_root, services, module_mock):
    """The agents' group always fails (503); its fallback group has a stricter PII policy, which
    blocks phone numbers the tenant's policy lets through."""
    down = {"x-mock": json.dumps({"status": 503})}
    config = {
        "router": {"max_attempts": 2},
        "providers": [
            {"name": "down", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k"], "headers": down},
            {"name": "pp", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k"]},
        ],
        "models": [
            {"name": "agent-model", "deployments": [{"provider": "down", "model": "m"}], "fallbacks": ["strict-model"]},
            {"name": "strict-model", "deployments": [{"provider": "pp", "model": "m-strict"}]},
            {  # a step whose prompt outgrows it goes to the strict group
                "name": "small-model",
                "deployments": [{"provider": "pp", "model": "m-small", "context_window": 1000}],
                "context_window_fallbacks": ["strict-model"],
            },
        ],
        "pii": {
            "workers": 0,
            "timeout_s": 60,  # (a loaded machine's first analysis in a fresh process: not what is tested)
            "policies": {
                "emails": {"entities": {"email": "redact"}},
                "strict": {"entities": {"phone": "block", "email": "redact"}},
            },
            "tenants": {TENANT: "emails"},
            "models": {"strict-model": "strict"},
        },
    }
    g = Gateway(tmp_root, config, services)
    yield g
    g.stop()


@pytest.mark.parametrize("count, why", [(600, "more text or numbers"), (3, "policy forbids")], ids=["bound", "blocked"])
def test_a_fallback_groups_stricter_policy_withholds_the_tool_result_and_the_turn_answers(
    fallback_gw, tools, module_mock, count, why
):
    """The fallback group's policy refused a tool result its own group's let through (past the
    bound, or blocked): the turn failed with 400 after the tool ran, and the client's retry ran
    it again. The result is withheld from that group's model instead, as at the step's scrub."""
    key = new_key(fallback_gw, TENANT)
    name = _contacts_agent(fallback_gw, tools)
    module_mock.clear()
    before = len([r for r in tools.requests() if r["path"] == "/directory"])
    answer, rid = _turn(fallback_gw, key, name, count)
    assert len([r for r in tools.requests() if r["path"] == "/directory"]) == before + 1, "the tool ran once"
    last = module_mock.requests()[-1]["body"]
    assert last["model"] == "m-strict"  # served by the fallback group
    results = _tool_messages(module_mock)
    assert len(results) == 1 and "withheld" in results[0] and why in results[0], results
    assert "555-" not in json.dumps(last) and "withheld" in answer
    steps = [s for s in run_record(fallback_gw, rid)["steps"] if s["kind"] == "scrub"]
    assert steps and steps[0]["status"] == "withheld" and steps[0]["name"] == "contacts", steps


def test_tool_call_arguments_too_costly_to_check_are_withheld_and_the_turn_answers(gw, tools, module_mock):
    """The model's own tool-call arguments (the assistant message of the step) past the bound:
    the refusal named them, not a tool result, and the turn failed with 400 after the tool ran.
    (The client's message holds the directive with every digit JSON-escaped: no number for the
    scrub to check there; the mock decodes it into arguments full of numbers.)"""
    key = new_key(gw, TENANT)
    tool = http_tool("note", f"{tools.url}/health", {"text": {"type": "string"}}, method="POST")
    name = agent(gw, TENANT, [tool])
    numbers = " ".join(f"({200 + i % 700}) 555-{i:04d}" for i in range(600))
    plan = json.dumps({"tool_calls": [{"name": "note", "arguments": {"text": numbers}}]})
    directive = "[[mock:" + plan.translate({ord(d): f"\\u{ord(d):04x}" for d in "0123456789"}) + "]]"
    assert "555" not in directive
    module_mock.clear()
    before = len([r for r in tools.requests() if r["path"] == "/health"])
    c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=60)
    raw = c.chat.completions.with_raw_response.create(
        model=f"agent:{name}", messages=[{"role": "user", "content": f"Note this {directive}"}]
    )
    assert len([r for r in tools.requests() if r["path"] == "/health"]) == before + 1, "the tool ran once"
    assert raw.parse().choices[0].message.content.startswith("tool result:")
    last = module_mock.requests()[-1]["body"]
    (call_message,) = [m for m in last["messages"] if m.get("tool_calls")]
    assert call_message["tool_calls"][0]["function"]["arguments"] == "{}"  # withheld, the call kept
    assert "555-" not in json.dumps(last)
    steps = [s for s in run_record(gw, raw.headers["x-request-id"])["steps"] if s["kind"] == "scrub"]
    assert [(s["name"], s["part"], s["status"]) for s in steps] == [("note", "arguments", "withheld")], steps


def test_a_tool_result_the_policy_blocks_is_withheld_at_the_steps_scrub(fallback_gw, tools, module_mock):
    """A blocked entity in a tool result, found at the step's own scrub (the key's policy blocks
    phone numbers for every group): withheld, not a 400 after the tool ran."""
    body = {"name": unique("k"), "tenant": TENANT, "pii_policy": "strict"}
    resp = call(fallback_gw, "POST", "/admin/keys", json=body)
    assert resp.status_code == 201, resp.text
    name = _contacts_agent(fallback_gw, tools)
    module_mock.clear()
    answer, rid = _turn(fallback_gw, resp.json()["key"], name, 3)
    assert "policy forbids" in answer  # the model read the withheld note (the mock echoes it)
    results = _tool_messages(module_mock)
    assert len(results) == 1 and "policy forbids" in results[0], results
    assert "555-" not in json.dumps(module_mock.requests()[-1]["body"])
    steps = [s for s in run_record(fallback_gw, rid)["steps"] if s["kind"] == "scrub"]
    assert [(s["name"], s["part"], s["error"]) for s in steps] == [("contacts", "result", "pii_blocked")], steps


def test_a_fallback_groups_policy_refusing_the_clients_message_after_the_tools_ran_degrades(
    fallback_gw, tools, module_mock
):
    """The step after the tools ran outgrew its group's context window and went to the strict
    group, whose policy blocks the phone number in the client's own message (its own group's let
    it through): a 400 then had the client retry the turn and run its tools again. An agent with
    a fallback message answers with it, degraded, as when every deployment fails."""
    tool = http_tool("contacts", f"{tools.url}/directory", {"count": {"type": "string"}})
    name = unique("deg")
    body = {"name": name, "model": "small-model", "template": "You help.", "tenant": TENANT, "tools": [tool]}
    body["fallback_message"] = "Sorry, I cannot answer that right now."
    assert call(fallback_gw, "POST", "/admin/agents", json=body).status_code == 201
    key = new_key(fallback_gw, TENANT)
    directive = "[[mock:" + json.dumps({"tool_calls": [{"name": "contacts", "arguments": {"count": "200"}}]}) + "]]"
    module_mock.clear()
    before = len([r for r in tools.requests() if r["path"] == "/directory"])
    c = openai.OpenAI(base_url=f"{fallback_gw.url}/v1", api_key=key, max_retries=0, timeout=60)
    raw = c.chat.completions.with_raw_response.create(
        model=f"agent:{name}", messages=[{"role": "user", "content": f"Call me at (212) 555-0147 {directive}"}]
    )
    assert raw.parse().choices[0].message.content == body["fallback_message"]
    assert raw.headers["x-gateway-degraded"] == "true"
    assert len([r for r in tools.requests() if r["path"] == "/directory"]) == before + 1, "the tool ran once"
    assert [r["body"]["model"] for r in module_mock.requests()] == ["m-small"]  # nothing reached the strict group
    run = run_record(fallback_gw, raw.headers["x-request-id"])
    assert run["degraded"] is True
    assert [s.get("error") for s in run["steps"] if s["kind"] == "model"] == [None, "pii_blocked"], run["steps"]


@pytest.fixture(scope="module")
def uncached_gw(tmp_root, services, module_mock):
    """No findings cache (pii.cache_size 0: as a busy gateway whose cache turned over between a
    turn's steps) and the smallest analysis bound, so a step's scrub counts the client's text
    again. The tenant's own group checks every text for phone numbers; ``down-model`` always fails
    (503) over to ``phone-model``, whose policy alone checks for them (a fallback group's policy
    counts all the client's text again)."""
    config = _config(module_mock, cache_size=0, max_analysed_chars=1024)
    config["router"]["max_attempts"] = 2
    down = {"x-mock": json.dumps({"status": 503})}
    config["providers"].append(
        {"name": "down", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k"], "headers": down}
    )
    config["models"] += [
        {"name": "down-model", "deployments": [{"provider": "down", "model": "m"}], "fallbacks": ["phone-model"]},
        {"name": "phone-model", "deployments": [{"provider": "pp", "model": "m-phone"}]},
    ]
    config["pii"]["policies"]["emails"] = {"entities": {"email": "redact"}}
    config["pii"]["models"] = {"down-model": "emails", "phone-model": "phones"}
    g = Gateway(tmp_root, config, services)
    yield g
    g.stop()


@pytest.mark.parametrize("model", ["agent-model", "down-model"], ids=["step", "fallback"])
def test_a_bound_the_tool_result_crossed_withholds_it_even_when_the_refusal_names_the_clients_larger_text(
    uncached_gw, tools, module_mock, model
):
    """``pii_too_much_to_check`` for characters names the text with the most to check, not the
    one that crossed the bound: the client's message (checked and sent alone at step 1) with a
    smaller tool result added past it was refused naming the client's message, and the turn
    failed with 400 after the tool ran (the client's retry runs it again)."""
    key = new_key(uncached_gw, TENANT)
    tool = http_tool("contacts", f"{tools.url}/directory", {"count": {"type": "string"}})
    name = unique("big")
    body = {"name": name, "model": model, "template": "You help.", "tenant": TENANT, "tools": [tool]}
    assert call(uncached_gw, "POST", "/admin/agents", json=body).status_code == 201
    directive = "[[mock:" + json.dumps({"tool_calls": [{"name": "contacts", "arguments": {"count": "15"}}]}) + "]]"
    text = "My numbers: " + " ".join(f"({300 + i}) 555-{i:04d}" for i in range(40)) + f" {directive}"
    module_mock.clear()
    before = len([r for r in tools.requests() if r["path"] == "/directory"])
    c = openai.OpenAI(base_url=f"{uncached_gw.url}/v1", api_key=key, max_retries=0, timeout=60)
    raw = c.chat.completions.with_raw_response.create(
        model=f"agent:{name}", messages=[{"role": "user", "content": text}]
    )
    assert len([r for r in tools.requests() if r["path"] == "/directory"]) == before + 1, "the tool ran once"
    assert "withheld" in (raw.parse().choices[0].message.content or "")
    results = _tool_messages(module_mock)
    assert len(results) == 1 and "withheld" in results[0], results
    assert module_mock.requests()[-1]["body"]["model"] == ("m" if model == "agent-model" else "m-phone")
    last = json.dumps(module_mock.requests()[-1]["body"])
    assert "Contact 1:" not in last  # nothing of the result went unchecked
    steps = [s for s in run_record(uncached_gw, raw.headers["x-request-id"])["steps"] if s["kind"] == "scrub"]
    assert [(s["name"], s["part"], s["status"]) for s in steps] == [("contacts", "result", "withheld")], steps
