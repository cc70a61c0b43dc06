"""A tool result that holds more than one request may check for personal data (the PII bounds:
``pii.max_phone_checks``, ``pii.max_analysed_chars``) is withheld from the model, not sent
unchecked and not turned into a failed turn: the tool has run (a search, an order, a refund),
and a client told 400 retries the turn and runs it again. Real gateway over HTTP, the OpenAI
SDK, the mock provider and loadtest/mock_tools.py's contact directory."""

from __future__ import annotations

import json

import openai
import pytest

from tests.conftest import Gateway
from tests.test_tools_review_s22 import ToolServer, agent, call, http_tool, new_key, unique

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
    from tests.conftest import wait_until

    key = new_key(gw, TENANT)
    name = _contacts_agent(gw, tools)
    _, rid = _turn(gw, key, name, 600)
    found: dict = {}

    def recorded() -> bool:
        r = call(gw, "GET", f"/admin/runs/{rid}")
        found.update(r.json() if r.status_code == 200 else {})
        return bool(found)

    wait_until(recorded, timeout=15, what="the run record")
    withheld = [s for s in found["steps"] if s["kind"] == "scrub"]
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
