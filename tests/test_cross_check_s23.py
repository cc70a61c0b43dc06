"""Cross-check of the s23 merge (groups, prompts, perf, chan, rag and the lead's commits): how
the branches' changes meet. Real gateway processes over HTTP, real embedded PostgreSQL and
Valkey, the OpenAI SDK as client."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import MASTER_KEY
from tests.test_agents_admin import AgentGateway, call, config, create, unique


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    g = AgentGateway(tmp_root, config(module_mock), services)
    yield g
    g.stop()


def sdk(gw, key: str = MASTER_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)


@pytest.mark.parametrize("selector", ["\u00b2", "\u0663", "\U0001d7d1"])
def test_a_version_selector_of_non_ascii_digits_is_a_404_naming_model_not_a_500(gw, selector):
    """``agent:x@²`` — '²' passes str.isdigit() and int() raises: the on-demand version read
    (prompts branch) and the selection both took it for a version number, so the turn was a 500
    (server_error). A version number is ASCII digits; anything else is a label, and an unknown
    label is a 404 naming model."""
    name = unique("xc")
    assert create(gw, name=name).status_code == 201
    with pytest.raises(openai.NotFoundError) as err:
        sdk(gw).chat.completions.create(model=f"agent:{name}@{selector}", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["param"] == "model", err.value.body


@pytest.mark.parametrize(
    ("method", "path", "body", "param"),
    [
        ("PUT", "labels/production", {"variants": {"\u00b2": 50, "1": 50}}, "variants"),
        ("PUT", "labels/production", {"version": "\u00b2"}, "version"),
        ("GET", "versions/\u00b2", None, "version"),
    ],
)
def test_admin_version_numbers_of_non_ascii_digits_are_a_400_not_a_500(gw, method, path, body, param):
    """The same '²' where the admin API reads a version number: a 400 naming the field, the
    labels unchanged — not a 500."""
    name = unique("xc")
    assert create(gw, name=name).status_code == 201
    before = call(gw, "GET", f"/admin/agents/{name}").json()["labels"]
    resp = call(gw, method, f"/admin/agents/{name}/{path}", **({"json": body} if body is not None else {}))
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
    assert call(gw, "GET", f"/admin/agents/{name}").json()["labels"] == before


# ---- an agent's knowledge-base search when the embedding provider fails ----------------------
@pytest.fixture(scope="module")
def kb_gw(tmp_root, services, module_mock):
    from tests.conftest import gateway_config
    from tests.test_kb_api import start_gateway

    config = gateway_config(module_mock)
    config["models"] += [
        {"name": n, "deployments": [{"provider": "mock-openai", "model": f"{n}-model"}]} for n in ("short", "long")
    ]
    # the operator's rule: prompts of more than 2,000 tokens go to the long-context model
    config["models"].append(
        {"name": "auto", "rules": [{"when": {"prompt_tokens_over": 2000}, "use": "long"}, {"use": "short"}]}
    )
    config["models"].append(  # a dollar per million tokens
        {
            "name": "embed-priced",
            "mode": "embedding",
            "deployments": [
                {"provider": "mock-openai", "model": "mock-embedding-priced", "input_cost_per_token": 1e-6}
            ],
        }
    )
    g = start_gateway(tmp_root, module_mock, services, config=config)
    yield g
    g.stop()


@pytest.mark.parametrize("dims", [8, 16, 5000], ids=["same", "other-dimension", "unreadable-answer"])
def test_an_agent_turn_whose_question_embedding_fails_is_grounded_by_full_text_search(kb_gw, module_mock, dims):
    """rag made a failed or unusable query embedding (the provider down through its retries, an
    answer of NaN or > 4,000 dimensions, a vector of another dimension than the knowledge
    base's) fall back to full-text search — in the /v1 and admin searches only. An agent turn's
    search (grounding.search, the turn's sources and the knowledge_search tool) still used the
    vector as it came: another dimension compared with no chunk and found nothing, an unusable
    answer failed the whole search; every turn answered without its sources while the provider
    misbehaved. It now falls back to full-text search the same way."""
    from tests.test_kb_api import call as kb_call
    from tests.test_kb_api import create_kb, upload, wait_done

    kb = create_kb(kb_gw, embedding_model="embed-mock")
    doc = upload(kb_gw, kb["id"], "parking.txt", b"Parking is free for visitors on weekends.").json()
    assert wait_done(kb_gw, kb["id"], doc["id"])["status"] == "ready"
    name = unique("kbbot")
    body = {"name": name, "model": "gpt-mock", "template": "You help visitors.", "knowledge_bases": [kb["id"]]}
    assert kb_call(kb_gw, "POST", "/admin/agents", json=body).status_code == 201
    before = httpx.get(f"{module_mock.url}/_mock/config").json()["dims"]
    module_mock.configure(dims=dims)
    try:
        resp = sdk(kb_gw).chat.completions.create(
            model=f"agent:{name}", messages=[{"role": "user", "content": "Is parking free for visitors on weekends?"}]
        )
    finally:
        module_mock.configure(dims=before)
    embedded = [q for q in module_mock.requests() if q["path"] == "/v1/embeddings"]
    assert embedded, "the question was not embedded"
    citations = (resp.choices[0].message.model_extra or {}).get("citations")
    assert citations and citations[0]["document_id"] == doc["id"], resp.choices[0].message


def test_a_routing_rule_on_prompt_size_sees_an_agent_turns_sources_not_their_bound(kb_gw, module_mock):
    """Grounding moved after admission (the lead), and routing rules were made to count the most
    the sources could add (``grow_tokens``: 3,000 tokens of context and five sources' headers by
    default, ~4,160) instead of the sources found: with a rule sending prompts over 2,000 tokens
    to a long-context model, EVERY turn of an agent with a knowledge base — 'is parking free?'
    and one 10-token source — went to the long-context model (the operator's dearest, as a rule
    of that kind usually means). Before, the rule saw the sources found. The turn's group is
    now chosen again once its sources are in the prompt (admission reserved for the dearest
    group a rule can reach either way)."""
    from tests.test_kb_api import call as kb_call
    from tests.test_kb_api import create_kb, upload, wait_done

    kb = create_kb(kb_gw)
    doc = upload(kb_gw, kb["id"], "parking.txt", b"Parking is free for visitors on weekends.").json()
    assert wait_done(kb_gw, kb["id"], doc["id"])["status"] == "ready"
    name = unique("kbrule")
    body = {"name": name, "model": "auto", "template": "You help visitors.", "knowledge_bases": [kb["id"]]}
    assert kb_call(kb_gw, "POST", "/admin/agents", json=body).status_code == 201

    def served(question: str):
        module_mock.clear()
        resp = sdk(kb_gw).chat.completions.create(
            model=f"agent:{name}", messages=[{"role": "user", "content": question}]
        )
        chats = [q for q in module_mock.requests() if q["path"] == "/v1/chat/completions"]
        return resp, chats[-1]["body"]

    resp, sent = served("Is parking free for visitors on weekends?")
    assert resp.choices[0].message.model_extra.get("citations"), "the control: the source was found"
    assert "<sources>" in sent["messages"][0]["content"]
    assert sent["model"] == "short-model", sent["model"]
    # and a turn whose prompt is long does go to the long-context model
    _, sent = served("Is parking free for visitors on weekends? " + "Please tell me more. " * 500)
    assert sent["model"] == "long-model", sent["model"]


def test_a_file_attached_by_a_key_bound_to_a_customer_is_embedded_on_that_customers_budget(kb_gw, services):
    """rag made the attaching key pay for its files' embeddings (its budgets, its ledger rows),
    but the ingestion ran for a bare identity of the key: a key minted for one customer
    (attribution {customer: [acme]}: every request of it is acme's, on acme's budgets) had its
    files embedded with no customer at all — acme's hard budget, spent, stopped its chats but
    not its ingestion (up to the tenant's 10 GB of files, on a priced model), and the ledger's
    spend by customer missed it. The job now carries the key's fixed attribution values (user,
    customer, agent), so the embedding calls are the customer's as its chats are."""
    from tests.test_kb_api import call as kb_call
    from tests.test_kb_api import create_kb
    from tests.test_policies import ledger_rows
    from tests.test_rag_review_s23 import attach, settled

    tenant, customer = unique("cust"), unique("acme")
    kb = create_kb(kb_gw, MASTER_KEY, tenant=tenant, embedding_model="embed-priced")
    budget = {"scope": "customer", "scope_value": customer, "tenant": tenant, "limit_usd": 1e-6}
    r = kb_call(kb_gw, "POST", "/admin/budgets", json=budget)
    assert r.status_code == 201, r.text
    r = kb_call(
        kb_gw,
        "POST",
        "/admin/keys",
        json={"name": unique("k"), "tenant": tenant, "scopes": ["admin"], "attribution": {"customer": [customer]}},
    )
    assert r.status_code == 201, r.text
    key = r.json()
    text = " ".join(f"word{i}" for i in range(3000)).encode()  # ~3,000 tokens: ~$0.003, past the budget
    with sdk(kb_gw, key["key"]) as c:
        f, _ = attach(c, kb["id"], "a.txt", text)
        done = settled(c, kb["id"], f.id)
    rows = ledger_rows(services[0], "key_id = $1 AND workflow = 'kb-ingest'", key["id"])
    assert all(row["customer"] == customer for row in rows), [(row["customer"], row["status"]) for row in rows]
    assert done.status == "failed", done  # the customer's hard budget refused the embedding calls


# ---- the prompts branch's storage bound ---------------------------------------------------------
@pytest.fixture(scope="module")
def quota_gw(tmp_root, services, module_mock):
    cfg = config(module_mock)
    cfg["policies"] = {"max_prompt_versions_per_tenant": 3}
    g = AgentGateway(tmp_root, cfg, services)
    yield g
    g.stop()


def test_a_tenant_admin_cannot_store_prompt_versions_past_the_quota_by_archiving_and_recreating(quota_gw, services):
    """policies.max_prompt_versions_per_tenant (and _bytes) bound what a tenant stores, counted
    over its ACTIVE agents ('archive an agent it no longer uses to make room'). Versions cannot
    be deleted (a trigger refuses it) and nothing purges an archived agent's, so a tenant admin
    that archives and re-creates an agent in a loop stores versions without bound in the
    operator's PostgreSQL (here: four rounds of a quota of 3 stored 12). The quota now counts
    every version the tenant stores, archived agents' included."""
    from tests.test_agents_admin import db, new_key

    tenant, name = unique("quota"), unique("loop")
    admin = new_key(quota_gw, tenant, admin=True)
    assert create(quota_gw, admin, name=name).status_code == 201
    for i in (2, 3):
        r = call(quota_gw, "POST", f"/admin/agents/{name}/versions", admin, json={"template": f"v{i} {{{{ who }}}}"})
        assert r.status_code == 201, r.text
    for _ in range(3):
        assert call(quota_gw, "DELETE", f"/admin/agents/{name}", admin).status_code in (200, 404)
        r = create(quota_gw, admin, name=name)  # archived: its versions still count
        assert r.status_code == 400 and r.json()["error"]["param"] == "template", r.text
    stored = db(services[0], "SELECT count(*) AS n FROM prompt_versions WHERE tenant = $1", tenant)[0]["n"]
    assert stored <= 3, f"{stored} prompt versions stored for a tenant whose quota is 3"
