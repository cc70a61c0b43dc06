"""The lead's own changes of session 23 after an attacker's review: each test is named for what
a client (or a document's author) tried, on a real gateway over HTTP with the OpenAI SDK or
httpx as client."""

from __future__ import annotations

import uuid

import openai
import pytest

from tests.conftest import MASTER_KEY, gateway_config, wait_until
from tests.test_kb_api import call, create_kb, start_gateway, upload, wait_done
from tests.test_policies import new_key

LONG_OVER = 1500  # prompt tokens past which the routing group sends a prompt to its long model


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    config = gateway_config(module_mock)
    config["models"] += [
        {
            "name": "auto-len",
            "rules": [{"when": {"prompt_tokens_over": LONG_OVER}, "use": "len-long"}, {"use": "len-short"}],
        },
        {"name": "len-long", "deployments": [{"provider": "mock-openai", "model": "mock-long"}]},
        {"name": "len-short", "deployments": [{"provider": "mock-openai", "model": "mock-short"}]},
        {
            "name": "chat-priced",
            "deployments": [
                {"provider": "mock-openai", "model": "mock-priced", "input_cost_per_token": 1e-6,
                 "output_cost_per_token": 1e-6}
            ],
        },
    ]  # fmt: skip
    g = start_gateway(tmp_root, module_mock, services, config=config)
    yield g
    g.stop()


def sdk(gw, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=60)


def test_section_titles_of_many_token_characters_stay_within_what_admission_reserved(gw, module_mock, services):
    """An agent's turn reserves (hard budget admission) the most its knowledge-base sources can
    add, counting a source's section title as at most 200 tokens since the prompt cut it at 200
    characters. A document's author chooses its headings: 200 Egyptian hieroglyphs are 800
    tokens, so such sources added ~1,200 tokens more than the reservation (a hard budget
    overshot by each such turn). Titles are cut at 200 bytes now (a token is a byte at least):
    what the turn reserved covers the grounded prompt the provider is sent."""
    import threading

    import redis

    from core.tokens import count_prompt

    tenant = f"sr-{uuid.uuid4().hex[:6]}"
    kb = create_kb(gw, MASTER_KEY, tenant=tenant, embedding_model="embed-mock")
    heading = "\U00013000" * 200  # 4 tokens a character (o200k)
    text = "".join(f"# {heading}{i}\n\nParking is free for visitors on weekends, gate {i}.\n\n" for i in range(5))
    doc = upload(gw, kb["id"], "parking.md", text.encode()).json()
    assert wait_done(gw, kb["id"], doc["id"])["status"] == "ready"
    name = f"bot-{uuid.uuid4().hex[:6]}"
    body = {"name": name, "model": "chat-priced", "template": "You help.", "knowledge_bases": [kb["id"]],
            "retrieval": {"max_context_tokens": 100, "top_k": 5, "threshold": 0.0}}  # fmt: skip
    made = call(gw, "POST", "/admin/agents", json={**body, "tenant": tenant})
    assert made.status_code == 201, made.text
    key = new_key(gw, tenant=tenant)
    budget = call(gw, "POST", "/admin/budgets", json={"scope": "key", "scope_value": key["id"], "limit_usd": 1.0,
                                                      "tenant": tenant})  # fmt: skip
    assert budget.status_code == 201, budget.text
    module_mock.clear()
    ask = [{"role": "user", "content": "Is parking free for visitors?"}]
    answers: list = []
    done = threading.Thread(
        target=lambda: answers.append(
            sdk(gw, key["key"]).chat.completions.create(model=f"agent:{name}", messages=ask, max_tokens=10)
        )
    )
    module_mock.configure(ttft_ms=2000)  # the turn waits at the provider while its reservation is read
    done.start()
    r = redis.Redis.from_url(services[1])
    try:
        sent: list = []
        wait_until(
            lambda: (
                sent.extend(q["body"] for q in module_mock.requests() if q["path"] == "/v1/chat/completions") or sent
            ),
            timeout=20,
            what="the turn at the provider",
        )
        reserved = sum(int(r.get(k) or 0) for k in r.scan_iter(f"gw:{{gw}}:budget:{budget.json()['id']}:*reserved"))
    finally:
        done.join(30)
        r.close()
        module_mock.configure(ttft_ms=0)
    assert answers, "the turn was not answered"
    assert "\U00013000" in sent[0]["messages"][0]["content"]  # the sources are in the prompt
    tokens = count_prompt(sent[0])
    assert reserved >= (tokens + 10) * 1000, (reserved, tokens)  # 1e-6 USD a token, in nano-USD


def test_an_agent_turn_whose_image_part_carries_a_non_text_text_field_is_answered(gw, module_mock):
    """The turn's question for the knowledge-base search joined every content part's ``text``:
    an image part with ``"text": 5`` or ``null`` (which the chat validation lets through as an
    extra field) raised a TypeError — a 500 to the client, after its admission. Only text
    parts' strings make the question now."""
    import httpx

    tenant = f"sq-{uuid.uuid4().hex[:6]}"
    kb = create_kb(gw, MASTER_KEY, tenant=tenant, embedding_model="embed-mock")
    doc = upload(gw, kb["id"], "p.txt", b"Parking is free for visitors on weekends.").json()
    assert wait_done(gw, kb["id"], doc["id"])["status"] == "ready"
    name = f"bot-{uuid.uuid4().hex[:6]}"
    made = call(gw, "POST", "/admin/agents", json={"name": name, "model": "gpt-mock", "template": "You help.",
                                                   "knowledge_bases": [kb["id"]], "tenant": tenant})  # fmt: skip
    assert made.status_code == 201, made.text
    key = new_key(gw, tenant=tenant)
    image = {"type": "image_url", "image_url": {"url": "https://example.com/y.png"}}
    for odd in (5, None, ["x"]):
        parts = [{"type": "text", "text": "Is parking free?"}, {**image, "text": odd}]
        ask = {"model": f"agent:{name}", "messages": [{"role": "user", "content": parts}]}
        r = httpx.post(f"{gw.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key['key']}"}, json=ask)
        assert r.status_code == 200, (odd, r.text)
        assert r.json()["choices"][0]["message"].get("citations"), r.text  # searched with the text part


def test_a_short_agent_turn_with_few_sources_goes_to_the_groups_short_model(gw, module_mock):
    """Routing rules ran before the search (which now follows admission) and counted the most
    the sources could add (``bound``: ``max_context_tokens`` and five headers): an agent whose
    sources could take ~2,500 tokens had every turn — a one-line question, a one-sentence source
    — sent to the long (dearer) model of a group that sends only prompts over 1,500 tokens there,
    where before this session's change the rule saw the grounded prompt. The group is chosen
    again once the sources are in."""
    tenant = f"sr-{uuid.uuid4().hex[:6]}"
    kb = create_kb(gw, MASTER_KEY, tenant=tenant, embedding_model="embed-mock")
    doc = upload(gw, kb["id"], "p.txt", b"Parking is free for visitors on weekends.").json()
    assert wait_done(gw, kb["id"], doc["id"])["status"] == "ready"
    name = f"bot-{uuid.uuid4().hex[:6]}"
    body = {"name": name, "model": "auto-len", "template": "You help.", "knowledge_bases": [kb["id"]],
            "retrieval": {"max_context_tokens": 1400}}  # fmt: skip
    made = call(gw, "POST", "/admin/agents", json={**body, "tenant": tenant})
    assert made.status_code == 201, made.text
    key = new_key(gw, tenant=tenant)
    ask = [{"role": "user", "content": "Is parking free?"}]  # (the mock's embeddings: a hash of the text)
    raw = sdk(gw, key["key"]).chat.completions.with_raw_response.create(model=f"agent:{name}", messages=ask)
    assert raw.parse().choices[0].message.model_extra.get("citations"), raw.text  # grounded
    assert raw.headers["x-gateway-deployment"] == "mock-openai/mock-short"


def test_an_attribution_header_a_client_wrote_in_latin1_is_read_not_refused(gw, services):
    """Clients write a header's non-ASCII text in one of two ways: UTF-8 (curl, Go) or latin-1
    (a JavaScript fetch — the OpenAI Node SDK's transport — and Python's http.client, which
    ``requests`` uses: each character below U+0100 one byte). This session's change read the
    attribution headers as UTF-8 and refused anything else with a 400, so a Node or ``requests``
    client sending ``x-gateway-user: José`` (worked before, read as latin-1) was refused. Bytes
    that are not UTF-8 are read as latin-1 now; UTF-8 stays UTF-8."""
    import http.client
    import json
    from urllib.parse import urlsplit

    from tests.test_policies import ledger_rows

    key = new_key(gw)
    where = urlsplit(gw.url)
    body = json.dumps({"model": "gpt-mock", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
    for how in ("latin-1", "utf-8"):
        conn = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
        try:
            headers = {"Authorization": f"Bearer {key['key']}", "Content-Type": "application/json"}
            if how == "latin-1":  # what http.client does with a str value
                headers |= {"x-gateway-user": "José", "x-gateway-customer": "Zoë GmbH", "x-gateway-labels": "café"}
            else:  # bytes as given
                headers |= {"x-gateway-user": "José".encode(), "x-gateway-customer": "Zoë GmbH".encode(),
                            "x-gateway-labels": "café".encode()}  # fmt: skip
            conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
            r = conn.getresponse()
            text = r.read().decode()
            assert r.status == 200, (how, text)
            rid = r.getheader("x-request-id")
        finally:
            conn.close()
        wait_until(lambda rid=rid: ledger_rows(services[0], "request_id = $1", rid), timeout=10, what="ledger row")
        row = ledger_rows(services[0], "request_id = $1", rid)[0]
        assert (row["end_user"], row["customer"]) == ("José", "Zoë GmbH"), (how, row)
        assert "café" in (row["tags"] or []), (how, row["tags"])
