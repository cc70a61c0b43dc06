"""The VAPI channel end to end: a real gateway process with a VAPI account, the VAPI simulator
(loadtest/vapi_sim.py) playing calls over HTTP, the mock LLM, a real HTTP tool server and the
mock of VAPI's REST API; call records and ledger rows read from the embedded PostgreSQL.

Attacks tried (each a test below): no / wrong / wrong-scheme credentials and an unknown account
(401, nothing stored); an oversized body (413, nothing stored); a tool-calls message with too
many calls or a bad id (400, no tool runs); a forged status after the call ended (no change);
a recording URL that is not https (dropped); a call id that is not an id (not stored); another
tenant's admin placing calls from or listing this account (404 / nothing seen).

Attacks added by the security review (each named for its attack): a web caller's metadata
overriding the tenant's agent variables, and forging or replaying the gateway's metadata
signature; a web caller's `customer.number` used as the caller's number (prompt, ledger,
callbacks); unbounded callbacks (no reference, many references); guessing the server
credential without limit from one address, and locking VAPI out through its shared egress
addresses; telling unknown accounts from known ones by the work done; one credential shared by
two tenants' accounts; a revoked account key still answering assistant-requests, running tools
and placing calls, and the gateway's 401 showing a piece of that key to VAPI; VAPI's objects on
`/v1` reaching the provider; call fields of the wrong type (a 500); telephony cost escaping
budgets; outbound calls in a loop or to any number; admin variables JSON cannot carry (a 500).
"""

from __future__ import annotations

import asyncio
import sys
import uuid

import aiohttp
import asyncpg
import httpx
import openai
import pytest

from loadtest.vapi_sim import VapiCall
from tests.conftest import LOCAL_HTTP, MASTER_KEY, Gateway, Proc, free_port, refused_start, run_cli, wait_until
from tests.test_agents_e2e import ToolServer

TOKEN = "vapi-server-token-0123456789"
SECRET = "vapi-secret-abcdefghijklmnop"
VAPI_KEY = "vapi-private-key-0001"
PUBLIC_URL = "https://gw.example.com"
RUN = uuid.uuid4().hex[:6]
TENANT = f"voice-{RUN}"
AGENT = f"reception-{RUN}"
PLAIN = f"plain-{RUN}"  # an agent without tools: streams live
TEMPLATE = "You answer calls for Acme.{% if caller_number %} Caller: {{ caller_number }}.{% endif %}"
VARIABLES = {"caller_number": {"type": "string", "required": False}, "plan": {"type": "string", "required": False}}
VARS = f"vars-{RUN}"  # an agent whose prompt shows its variables; the tenant's default plan is "basic"
VARS_TEMPLATE = "Plan={{ plan }} Order={{ order_id }} Caller={{ caller_number }}."
VARS_VARIABLES = {n: {"type": "string", "required": False} for n in ("plan", "order_id", "caller_number")}
PROBE = "203.0.113.7"  # the address a credential-guessing test claims (X-Forwarded-For, trusted proxy)


class MockVapiApi(Proc):
    def __init__(self, tmp) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "loadtest.vapi_sim", "api", "--port", str(self.port), "--api-key", VAPI_KEY]
        super().__init__(args, {}, tmp / f"vapi-api-{self.port}.log")
        wait_until(lambda: LOCAL_HTTP.get(f"{self.url}/health").status_code == 200, what="mock VAPI API")

    def requests(self) -> list[dict]:
        return LOCAL_HTTP.get(f"{self.url}/_requests").json()["requests"]


def admin(gw: Gateway, method: str, path: str, key: str = MASTER_KEY, **kw) -> httpx.Response:
    return LOCAL_HTTP.request(method, f"{gw.url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=30, **kw)


def query(database_url: str, sql: str, *args) -> list[dict]:
    async def go():
        conn = await asyncpg.connect(database_url)
        try:
            return [dict(r) for r in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    return asyncio.run(go())


@pytest.fixture(scope="module")
def env(tmp_root, services, module_mock):
    tools = ToolServer(tmp_root)
    api = MockVapiApi(tmp_root)
    out = run_cli("keys", "create", "--name", f"vapi-{RUN}", "--tenant", TENANT, urls=services, tmp=tmp_root)
    assert out.returncode == 0, out.stderr
    key = out.stdout.splitlines()[0].strip()
    out = run_cli("keys", "create", "--name", f"vapi-spare-{RUN}", "--tenant", TENANT, urls=services, tmp=tmp_root)
    assert out.returncode == 0, out.stderr
    spare_key = out.stdout.splitlines()[0].strip()
    spare_id = out.stdout.split("(id ", 1)[1].split(";", 1)[0]
    config = {
        "router": {"max_attempts": 1},
        # failed credentials count per address: 127.0.0.1 is a trusted proxy so a test can claim
        # another address; a slow refill so the throttle test does not race the clock
        "server": {"trusted_proxies": ["127.0.0.1/32"], "failed_auth_per_minute": 1, "failed_auth_burst": 30},
        "providers": [{"name": "pp", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k"]}],
        "models": [{"name": "voice-model", "deployments": [{"provider": "pp", "model": "m"}]}],
        "channels": {
            "vapi": {
                "main": {
                    "tenant": TENANT,
                    "api_key": key,
                    "public_url": PUBLIC_URL,
                    "auth": {"bearer_token": TOKEN, "secret": SECRET},
                    "phone_numbers": {
                        "pn_main": AGENT,
                        "pn_plain": PLAIN,
                        "pn_ghost": f"ghost-{RUN}",
                        "pn_vars": VARS,
                    },
                    "metadata_variables": ["order_id"],
                    "default_agent": AGENT,
                    "transfer_number": "+14155550100",
                    "vapi_api_url": api.url,
                    "vapi_api_key": VAPI_KEY,
                    "outbound_phone_number_id": "pn_main",
                    "assistant": {"firstMessage": "Acme, how can I help?", "voice": {"provider": "11labs"}},
                    "max_body_bytes": 64 * 1024,
                },
                # an account of its own key, revoked by a test
                "spare": {
                    "tenant": TENANT,
                    "api_key": spare_key,
                    "public_url": PUBLIC_URL,
                    "auth": {"bearer_token": TOKEN},
                    "default_agent": AGENT,
                    "vapi_api_url": api.url,
                    "vapi_api_key": VAPI_KEY,
                    "outbound_phone_number_id": "pn_main",
                    "outbound_per_minute": 2,
                    "outbound_prefixes": ["+1415", "+1650"],
                },
            }
        },
    }
    gw = Gateway(tmp_root, config, services)
    tool = {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "kind": "http",
        "config": {
            "method": "GET",
            "url": f"{tools.url}/weather?city={{city}}",
            "allowed_hosts": ["127.0.0.1"],
            "allow_private_networks": True,
        },
    }
    for name, extra in (
        (AGENT, {"tools": [tool]}),
        (PLAIN, {}),
        (VARS, {"template": VARS_TEMPLATE, "variables": VARS_VARIABLES, "defaults": {"plan": "basic"}}),
    ):
        body = {"name": name, "model": "voice-model", "template": TEMPLATE, "variables": VARIABLES, "tenant": TENANT}
        r = admin(gw, "POST", "/admin/agents", json={**body, **extra})
        assert r.status_code == 201, r.text
    yield {
        "gw": gw,
        "tools": tools,
        "api": api,
        "mock": module_mock,
        "db": services[0],
        "redis": services[1],
        "key": key,
        "config": config,
        "spare_id": spare_id,
    }
    gw.stop()
    api.stop()
    tools.stop()


def base(env) -> str:
    return f"{env['gw'].url}/channels/vapi/main"


async def _play(env, fn, headers=None, **kw):
    async with aiohttp.ClientSession() as session:
        headers = headers or {"Authorization": f"Bearer {TOKEN}"}
        call = VapiCall(session, base(env), headers, follow_assistant=False, **kw)
        return await fn(call)


def play(env, fn, **kw):
    return asyncio.run(_play(env, fn, **kw))


def test_full_simulated_call_with_tool_call_and_duplicated_report(env):
    mock = env["mock"]

    async def scenario(call: VapiCall):
        result = await call.play(
            ["Hello there", "What about tomorrow"],
            tool_calls=[
                {"id": "call_weather_1", "name": "get_weather", "arguments": {"city": "Paris"}},
                {"id": "call_unknown_2", "name": "launch_rockets", "arguments": {}},
            ],
        )
        return call, result

    mock.clear()
    call, result = play(env, scenario, phone_number_id="pn_main")
    # assistant-request: the agent's assistant, VAPI's custom LLM pointing back at the channel
    assistant = result.assistant["assistant"]
    assert assistant["model"]["provider"] == "custom-llm"
    assert assistant["model"]["url"] == f"{PUBLIC_URL}/channels/vapi/main"
    assert assistant["model"]["model"] == f"agent:{AGENT}"
    assert assistant["model"]["tools"] == [{"type": "transferCall"}]
    assert assistant["firstMessage"] == "Acme, how can I help?"
    assert assistant["server"]["url"] == f"{PUBLIC_URL}/channels/vapi/main/events"
    # both turns answered, streamed (the agent ran its own tool in the gateway each turn)
    assert [t.status for t in result.turns] == [200, 200], (result.turns[0].answer, mock.requests()[-1])
    assert all(t.answer and t.ttft_ms is not None for t in result.turns)
    # VAPI's tool-calls: one result per call, ids exactly as sent, in order
    assert result.statuses == [200]
    results = result.tool_results["results"]
    assert [r["toolCallId"] for r in results] == ["call_weather_1", "call_unknown_2"]
    assert "Paris" in results[0]["result"] and "error" not in results[0]
    assert "unknown tool" in results[1]["error"] and "result" not in results[1]
    # memory holds the call: the second turn's prompt has each user message once, no VAPI copy
    final = [r for r in mock.requests() if r["body"]["messages"][-1]["role"] == "tool"][-1]["body"]
    users = [m["content"] for m in final["messages"] if m["role"] == "user"]
    assert users == ["Hello there", "What about tomorrow"]
    assert final["messages"][0]["role"] == "system" and "+14155550123" in final["messages"][0]["content"]
    # the end-of-call report, sent twice: stored once
    assert [r["status"] for r in result.reports] == [200, 200]
    assert [r["stored"] for r in result.reports] == [True, False]
    rows = query(env["db"], "SELECT * FROM vapi_calls WHERE call_id = $1", call.call_id)
    assert len(rows) == 1
    row = rows[0]
    assert (row["tenant"], row["account"], row["agent"], row["status"]) == (TENANT, "main", AGENT, "ended")
    assert row["conversation_id"] == f"vapi:{call.call_id}"
    assert row["duration_s"] == 42.0 and row["cost_usd"] == pytest.approx(0.1234)
    assert "User: Hello there" in row["transcript"]
    assert row["recording_url"] == f"https://storage.vapi.example/{call.call_id}.wav"
    assert row["customer_number"] == "+14155550123" and row["summary"] == "A simulated call."
    ledger = query(
        env["db"], "SELECT * FROM ledger WHERE endpoint = 'vapi.call' AND conversation_id = $1", row["conversation_id"]
    )
    assert len(ledger) == 1
    assert (ledger[0]["tenant"], ledger[0]["agent"], ledger[0]["customer"]) == (TENANT, AGENT, "+14155550123")
    assert ledger[0]["cost_usd"] == pytest.approx(0.1234) and ledger[0]["request_id"] == row["id"]
    # the model turns of the call are in the ledger too, under the same conversation
    wait_until(
        lambda: query(
            env["db"], "SELECT 1 FROM ledger WHERE endpoint = 'chat' AND conversation_id = $1", row["conversation_id"]
        ),
        timeout=15,
        what="the call's model turns in the ledger",
    )
    # a status-update arriving after the report changes nothing
    status, _ = asyncio.run(
        _play(
            env,
            lambda c: c.event({"type": "status-update", "status": "in-progress"}),
            call_id=call.call_id,
            phone_number_id="pn_main",
        )
    )
    assert status == 200
    assert query(env["db"], "SELECT status FROM vapi_calls WHERE call_id = $1", call.call_id) == [{"status": "ended"}]
    # the call is listed for the admin
    listed = admin(env["gw"], "GET", f"/admin/channels/vapi/calls?tenant={TENANT}").json()["data"]
    entry = next(c for c in listed if c["call_id"] == call.call_id)
    assert "transcript" not in entry and entry["transcript_chars"] == len(row["transcript"])
    record = admin(env["gw"], "GET", f"/admin/channels/vapi/calls/{row['id']}").json()
    assert record["transcript"] == row["transcript"] and record["cost_usd"] == pytest.approx(0.1234)


def test_transfer_destination_is_the_human_line(env):
    status, answer = play(env, lambda c: c.event({"type": "transfer-destination-request"}))
    assert status == 200
    assert answer["destination"]["type"] == "number" and answer["destination"]["number"] == "+14155550100"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-0123456789"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"X-Vapi-Secret": "wrong-secret-0123456789"},
        {"X-Vapi-Secret": f"{SECRET}x"},
    ],
)
def test_bad_credentials_rejected_and_nothing_stored(env, headers):
    call_id = str(uuid.uuid4())
    report = {"message": {"type": "end-of-call-report", "call": {"id": call_id}, "cost": 5}}
    for suffix in ("events", "chat/completions"):
        r = httpx.post(f"{base(env)}/{suffix}", json=report, headers=headers, timeout=10)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "invalid_vapi_credential"
    assert query(env["db"], "SELECT 1 FROM vapi_calls WHERE call_id = $1", call_id) == []
    assert 'gateway_vapi_refused_total{endpoint="events"}' in httpx.get(f"{env['gw'].url}/metrics").text


def test_unknown_account_looks_like_a_bad_credential(env):
    r = httpx.post(f"{env['gw'].url}/channels/vapi/nope/events", json={}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 401


def test_secret_header_alone_is_accepted(env):
    status, answer = play(
        env, lambda c: c.event({"type": "transfer-destination-request"}), headers={"X-Vapi-Secret": SECRET}
    )
    assert status == 200 and answer["destination"]["number"] == "+14155550100"


def test_oversized_body_refused_and_nothing_stored(env):
    call_id = str(uuid.uuid4())
    body = {
        "message": {"type": "end-of-call-report", "call": {"id": call_id}, "artifact": {"transcript": "x" * 70_000}}
    }
    r = httpx.post(f"{base(env)}/events", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 413
    assert query(env["db"], "SELECT 1 FROM vapi_calls WHERE call_id = $1", call_id) == []


def test_streaming_relayed_as_openai_chunks(env):
    """The OpenAI SDK, as VAPI is, on the channel's custom-LLM URL: the answer arrives as several
    chat.completion.chunk events relayed from the gateway."""
    client = openai.OpenAI(base_url=base(env), api_key=TOKEN, max_retries=0, timeout=30)
    call = {"id": str(uuid.uuid4()), "type": "inboundPhoneCall", "phoneNumberId": "pn_plain"}
    stream = client.chat.completions.with_raw_response.create(
        model="ignored",
        messages=[{"role": "system", "content": "VAPI's own prompt"}, {"role": "user", "content": "stream me"}],
        stream=True,
        extra_body={"call": call, "customer": {"number": "+14155550177"}, "metadata": {"plan": "gold"}},
    )
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.headers["x-gateway-agent"] == PLAIN
    chunks = list(stream.parse())
    assert len(chunks) >= 3
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "stream me" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    sent = env["mock"].last()["body"]
    assert [m["role"] for m in sent["messages"]] == ["system", "user"]  # VAPI's system message dropped
    assert "+14155550177" in sent["messages"][0]["content"]
    assert "call" not in sent and "customer" not in sent  # VAPI's objects never reach the provider


def test_gateway_errors_relayed_as_they_are(env):
    """The gateway's OpenAI-shaped error reaches VAPI unchanged (status, body, request id)."""
    client = openai.OpenAI(base_url=base(env), api_key=TOKEN, max_retries=0, timeout=30)
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(
            model="x",
            messages=[{"role": "user", "content": "hello?"}],
            stream=True,
            extra_body={"call": {"id": str(uuid.uuid4()), "phoneNumberId": "pn_ghost"}},
        )
    assert exc.value.code == "model_not_found" and exc.value.request_id.startswith("req_")


def test_vapi_pointed_straight_at_v1(env):
    """The documented alternative: VAPI's custom LLM at the gateway's /v1 with a gateway key and
    model agent:<name>. Stateless (VAPI's transcript), call facts as variables, VAPI's objects
    kept from the provider."""
    client = openai.OpenAI(base_url=f"{env['gw'].url}/v1", api_key=env["key"], max_retries=0, timeout=30)
    stream = client.chat.completions.create(
        model=f"agent:{PLAIN}",
        messages=[{"role": "user", "content": "direct"}],
        stream=True,
        extra_body={"call": {"id": str(uuid.uuid4())}, "customer": {"number": "+14155550188"}},
    )
    assert "direct" in "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    sent = env["mock"].last()["body"]
    assert "+14155550188" in sent["messages"][0]["content"] and "call" not in sent


def test_tool_call_ids_match_exactly(env):
    ids = ["call_Z9", "x" * 128, "weird id #1 ü", "call_Z9"]
    calls = [{"id": i, "name": "get_weather", "arguments": {"city": f"C{n}"}} for n, i in enumerate(ids)]
    calls[2]["arguments"] = {"town": "nowhere"}  # fails the tool's schema: an error for that id only
    status, answer = play(env, lambda c: c.tool_calls(calls), phone_number_id="pn_main")
    assert status == 200
    assert [r["toolCallId"] for r in answer["results"]] == ids
    assert ["result" in r for r in answer["results"]] == [True, True, False, True]
    assert "city" in answer["results"][2]["error"]


@pytest.mark.parametrize(
    "calls, param",
    [
        ([{"id": "x" * 129, "type": "function", "function": {"name": "get_weather", "arguments": {}}}], ".id"),
        ([{"id": "", "type": "function", "function": {"name": "get_weather", "arguments": {}}}], ".id"),
        ([{"id": 7, "type": "function", "function": {"name": "get_weather", "arguments": {}}}], ".id"),
        ([{"id": f"c{i}", "function": {"name": "get_weather", "arguments": {}}} for i in range(17)], "toolCallList"),
        ([], "toolCallList"),
    ],
)
def test_bad_tool_calls_refused_before_any_tool_runs(env, calls, param):
    tools = env["tools"]
    before = len(tools.requests())
    r = httpx.post(
        f"{base(env)}/events",
        json={"message": {"type": "tool-calls", "toolCallList": calls, "call": {"id": str(uuid.uuid4())}}},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert r.status_code == 400
    assert param in r.json()["error"]["param"]
    assert len(tools.requests()) == before


def test_untrusted_report_fields_are_checked(env):
    call_id = str(uuid.uuid4())
    bad = {
        "type": "end-of-call-report",
        "call": {"id": call_id, "customer": {"number": "not a number"}},
        "cost": float("1e300"),
        "durationSeconds": -5,
        "artifact": {"recordingUrl": "http://169.254.169.254/latest", "transcript": "a\x00b"},
    }
    r = httpx.post(f"{base(env)}/events", json={"message": bad}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json()["stored"] is True
    row = query(env["db"], "SELECT * FROM vapi_calls WHERE call_id = $1", call_id)[0]
    assert row["cost_usd"] is None and row["duration_s"] is None and row["recording_url"] is None
    assert row["customer_number"] is None and row["transcript"] == "a\ufffdb"
    # a call id that is no id is not stored at all
    r = httpx.post(
        f"{base(env)}/events",
        json={"message": {"type": "end-of-call-report", "call": {"id": "../../etc passwd"}}},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert r.status_code == 200 and r.json()["stored"] is False


def test_outbound_call_through_vapi_api(env):
    gw, api = env["gw"], env["api"]
    r = admin(
        gw,
        "POST",
        "/admin/channels/vapi/calls",
        json={"account": "main", "to": "+14155550199", "variables": {"plan": "gold"}},
    )
    assert r.status_code == 201, r.text
    record = r.json()
    assert record["direction"] == "outbound" and record["status"] == "queued" and record["tenant"] == TENANT
    sent = api.requests()[-1]
    assert sent["headers"]["authorization"] == f"Bearer {VAPI_KEY}"
    assert sent["body"]["customer"] == {"number": "+14155550199"}
    assert sent["body"]["phoneNumberId"] == "pn_main"
    assert sent["body"]["assistant"]["model"]["provider"] == "custom-llm"
    metadata = dict(sent["body"]["metadata"])
    assert len(metadata.pop("gateway_signature")) == 64 and metadata == {"plan": "gold"}
    assert record["metadata"] == {"plan": "gold"}  # the signature is VAPI's to echo, not stored
    listed = admin(gw, "GET", f"/admin/channels/vapi/calls?tenant={TENANT}&account=main").json()["data"]
    assert record["call_id"] in {c["call_id"] for c in listed}
    # bad input: a 400 naming the field; VAPI's refusal: 502, nothing recorded
    for body, param in (
        ({"account": "main", "to": "12345"}, "to"),
        ({"account": "main", "to": "+14155550199", "agent": "someone-else"}, "agent"),
        ({"account": "main", "to": "+14155550199", "voice": "x"}, "voice"),
        ({"account": "main", "to": "+14155550199", "variables": {"a b": 1}}, "variables.a b"),
    ):
        r = admin(gw, "POST", "/admin/channels/vapi/calls", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    count = len(admin(gw, "GET", f"/admin/channels/vapi/calls?tenant={TENANT}").json()["data"])
    r = admin(gw, "POST", "/admin/channels/vapi/calls", json={"account": "main", "to": "+14155550000"})
    assert r.status_code == 502
    assert len(admin(gw, "GET", f"/admin/channels/vapi/calls?tenant={TENANT}").json()["data"]) == count


def test_another_tenant_cannot_use_or_see_the_account(env):
    gw = env["gw"]
    r = admin(gw, "POST", "/admin/keys", json={"name": "other-admin", "tenant": f"other-{RUN}", "scopes": ["admin"]})
    other = r.json()["key"]
    r = admin(gw, "POST", "/admin/channels/vapi/calls", key=other, json={"account": "main", "to": "+14155550199"})
    assert r.status_code == 404
    r = admin(gw, "GET", "/admin/channels/vapi/calls", key=other)
    assert r.status_code == 200 and r.json()["data"] == []
    r = admin(gw, "GET", "/admin/channels/vapi/calls?account=main", key=other)
    assert r.status_code == 404
    mine = admin(gw, "POST", "/admin/channels/vapi/calls", json={"account": "main", "to": "+14155550199"}).json()
    assert admin(gw, "GET", f"/admin/channels/vapi/calls/{mine['id']}").status_code == 200
    assert admin(gw, "GET", f"/admin/channels/vapi/calls/{mine['id']}", key=other).status_code == 404


def test_human_reply_delivery_reports_or_calls_back(env):
    """The deliverer through runtime.delivery's registry, over the real call records: a live
    call cannot be spoken into; an ended one is reported, or called back (once per reference)
    through VAPI's API when the account says so. A conversation that is no VAPI call is not
    this channel's, whatever its id looks like."""
    from channels.vapi import VapiChannel, VapiDeliverer, parse_accounts
    from channels.vapi.calls import CallStore
    from channels.vapi.wire import CallInfo
    from gateway.db import tenant_transaction
    from gateway.vapi_channel import _Deliverer
    from runtime.delivery import Delivery, Outbound

    settings = {
        "tenant": TENANT,
        "api_key": env["key"],
        "public_url": PUBLIC_URL,
        "auth": {"bearer_token": TOKEN},
        "default_agent": AGENT,
        "vapi_api_url": env["api"].url,
        "vapi_api_key": VAPI_KEY,
        "outbound_phone_number_id": "pn_main",
    }
    accounts = parse_accounts({"main": {**settings, "delivery": "callback"}, "quiet": settings})

    async def go():
        pool = await asyncpg.create_pool(env["db"], min_size=1, max_size=2)
        try:
            store = CallStore(lambda tenant: tenant_transaction(pool, tenant))
            channel = VapiChannel(accounts, store, events=None, upstream=None)
            await channel.start()
            delivery = Delivery()
            delivery.register("vapi", _Deliverer(VapiDeliverer(channel)))
            live, ended, quiet, web = (str(uuid.uuid4()) for _ in range(4))
            for account, call_id, status, kind in (
                ("main", live, "in-progress", None),
                ("main", ended, "ended", None),
                ("quiet", quiet, "ended", None),
                ("main", web, "ended", "webCall"),  # a number a web visitor wrote
            ):
                info = CallInfo(call_id=call_id, customer_number="+14155550166", call_type=kind)
                await store.upsert(TENANT, account, info, AGENT, status)

            def reply(call_id: str, ref: str | None = "esc_1") -> Outbound:
                return Outbound(TENANT, AGENT, f"vapi:{call_id}", "A human says hello.", ref=ref)

            out = {
                "live": await delivery.deliver(reply(live)),
                "quiet": await delivery.deliver(reply(quiet)),
                "ended": await delivery.deliver(reply(ended)),
                "again": await delivery.deliver(reply(ended)),
                "other tenant": await delivery.deliver(Outbound("someone-else", AGENT, f"vapi:{ended}", "x")),
                "not a call": await delivery.deliver(reply(str(uuid.uuid4()))),
                # attacks: callbacks without bound
                "web": await delivery.deliver(reply(web)),
                "no ref": await delivery.deliver(reply(ended, ref=None)),
                "more refs": [await delivery.deliver(reply(ended, ref=f"esc_{n}")) for n in (2, 3, 4, 5)],
            }
            await channel.stop()
            return out
        finally:
            await pool.close()

    before = len(env["api"].requests())
    out = asyncio.run(go())
    assert (out["live"].channel, out["live"].status) == ("vapi", "failed") and "in progress" in out["live"].detail
    assert out["quiet"].status == "failed" and out["quiet"].detail == "call ended; no outbound path"
    assert out["ended"].status == "sent" and out["again"].status == "sent"
    assert (out["other tenant"].channel, out["not a call"].channel) == ("api", "api")
    assert out["web"].status == "failed" and "web call" in out["web"].detail
    assert out["no ref"].status == "failed" and "reference" in out["no ref"].detail
    assert [d.status for d in out["more refs"]] == ["sent", "sent", "failed", "failed"]
    assert "called back 3 times" in out["more refs"][2].detail
    calls = env["api"].requests()[before:]
    assert len(calls) == 3  # esc_1 once (repeated: not again), esc_2, esc_3; then the per-call bound
    assert all(c["body"]["customer"] == {"number": "+14155550166"} for c in calls)
    assert calls[0]["body"]["assistant"]["firstMessage"] == "A human says hello."
    assert (
        out["ended"].detail
        == query(
            env["db"], "SELECT call_id FROM vapi_calls WHERE metadata->>'reply_ref' = 'esc_1' AND tenant = $1", TENANT
        )[0]["call_id"]
    )


def test_account_settings_problems_name_their_path():
    from channels.vapi import parse_accounts
    from core.config import ConfigError

    good = {"tenant": "t", "api_key": "sk-gw-01234567", "public_url": PUBLIC_URL, "auth": {"secret": SECRET}}
    assert parse_accounts({"main": good})["main"].agent_for("a", "p") is None
    with pytest.raises(ConfigError) as exc:
        parse_accounts(
            {
                "no-auth": {**good, "auth": {}},
                "short": {**good, "auth": {"bearer_token": "short"}},
                "url": {**good, "public_url": "ftp://x"},
                "number": {**good, "transfer_number": "555-0100"},
                "model": {**good, "assistant": {"model": {"provider": "openai"}}},
                "agent": {**good, "phone_numbers": {"pn_1": "Not An Agent"}},
                "extra": {**good, "surprise": 1},
                "bad name/..": good,
            }
        )
    text = "\n".join(exc.value.problems)
    for where in (
        "channels.vapi.no-auth.auth:",
        "channels.vapi.short.auth.bearer_token:",
        "channels.vapi.url.public_url:",
        "channels.vapi.number.transfer_number:",
        "channels.vapi.model.assistant:",
        "channels.vapi.agent.phone_numbers:",
        "channels.vapi.extra.surprise:",
        "channels.vapi.bad name/..:",
    ):
        assert where in text, text
    assert SECRET not in text and "sk-gw-01234567" not in text  # secrets never in the problems


def test_one_credential_shared_by_two_tenants_accounts_is_refused():
    """The credential picks the tenant: two tenants' accounts with one credential would let
    either's VAPI side write the other's calls, ledger and budgets. Same tenant: allowed."""
    from channels.vapi import parse_accounts
    from core.config import ConfigError

    good = {"tenant": "t", "api_key": "sk-gw-01234567", "public_url": PUBLIC_URL, "auth": {"secret": SECRET}}
    assert len(parse_accounts({"a": good, "b": good})) == 2
    with pytest.raises(ConfigError) as exc:
        parse_accounts({"a": good, "b": {**good, "tenant": "u", "auth": {"bearer_token": TOKEN, "secret": SECRET}}})
    assert exc.value.problems == [
        "channels.vapi.b.auth: the same credential as account 'a' of another tenant; "
        "each tenant's accounts need their own"
    ]


def test_check_config_names_account_problems(tmp_root):
    import subprocess

    import yaml

    path = tmp_root / "vapi-bad-account.yaml"
    path.write_text(yaml.safe_dump({"channels": {"vapi": {"main": {"tenant": "t", "api_key": "sk-gw-01234567"}}}}))
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1
    assert "channels.vapi.main.public_url" in out.stderr and "channels.vapi.main.auth" in out.stderr


def test_a_gateway_with_a_wrong_account_key_does_not_start(tmp_root, services, module_mock):
    config = {
        "providers": [{"name": "pp", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k"]}],
        "models": [{"name": "m", "deployments": [{"provider": "pp", "model": "m"}]}],
        "channels": {
            "vapi": {
                "main": {
                    "tenant": TENANT,
                    "api_key": "sk-gw-not-a-key",
                    "public_url": PUBLIC_URL,
                    "auth": {"secret": SECRET},
                }
            }
        },
    }
    out = refused_start(tmp_root, config, services)
    assert "channels.vapi.main.api_key: not an active key" in out


def test_the_agent_is_the_accounts_choice(env):
    """The call's phone number picks the agent; a `model` VAPI sends picks one only among the
    account's own agents; a message type nobody knows is counted as `other`, not by its name."""

    def agent_of(body: dict) -> str:
        r = httpx.post(
            f"{base(env)}/chat/completions",
            json={"messages": [{"role": "user", "content": "who answers"}], "stream": False, **body},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        return r.headers["x-gateway-agent"]

    assert agent_of({"call": {"id": str(uuid.uuid4()), "phoneNumberId": "pn_plain"}}) == PLAIN
    assert agent_of({"model": f"agent:{PLAIN}"}) == PLAIN  # no call id: stateless, the account's agent
    assert agent_of({"model": "agent:someone-elses-agent"}) == AGENT  # not the account's: the default
    r = httpx.post(
        f"{base(env)}/events",
        json={"message": {"type": "totally-new-type-\u0000"}},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert r.status_code == 200 and r.json() == {}
    metrics = httpx.get(f"{env['gw'].url}/metrics").text
    assert 'gateway_vapi_events_total{type="other"}' in metrics and "totally-new-type" not in metrics


# ---- attacks (security review) -----------------------------------------------------------------


def _account(env, name: str = "main"):
    from channels.vapi import parse_accounts

    return parse_accounts(env["config"]["channels"]["vapi"])[name]


def _prompt_of(env, body: dict, headers: dict | None = None) -> str:
    r = httpx.post(
        f"{base(env)}/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "stream": False, **body},
        headers=headers or {"Authorization": f"Bearer {TOKEN}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-gateway-agent"] == VARS
    return env["mock"].last()["body"]["messages"][0]["content"]


def test_web_caller_metadata_cannot_override_the_tenants_agent_variables(env):
    """A web call is started by any visitor holding the assistant's public key, with whatever
    metadata and `customer` it likes. Its metadata must not set prompt variables beyond the
    account's `metadata_variables` (here `order_id`), nor win over the agent's defaults; its
    customer number is no caller id. A call the gateway placed carries signed metadata, taken
    whole; a forged or re-used signature counts for nothing."""
    from channels.vapi import wire

    web = {"id": str(uuid.uuid4()), "type": "webCall", "phoneNumberId": "pn_vars"}
    hostile = {"plan": "platinum", "order_id": "A-1", "gateway_signature": "0" * 64}
    prompt = _prompt_of(
        env, {"call": {**web, "metadata": hostile}, "metadata": hostile, "customer": {"number": "+14155550142"}}
    )
    assert prompt == "Plan=basic Order=A-1 Caller=."
    # the gateway's own signature (an outbound call it placed): the admin's variables count
    account = _account(env)
    signed = wire.sign_metadata(account, {"plan": "gold", "order_id": "B-2"}, "+14155550143")
    phone = {"id": str(uuid.uuid4()), "type": "outboundPhoneCall", "phoneNumberId": "pn_vars"}
    prompt = _prompt_of(
        env,
        {
            "call": {**phone, "metadata": signed},
            "metadata": {"plan": "platinum"},
            "customer": {"number": "+14155550143"},
        },
    )
    assert prompt == "Plan=gold Order=B-2 Caller=+14155550143."
    # a signed set with one value changed, signed with another account's key, or replayed on a
    # call to another number or on a web call: not trusted
    other_key = wire.sign_metadata(_account(env, "spare"), {"plan": "platinum"}, "+14155550143")
    for forged, customer, kind in (
        ({**signed, "plan": "platinum"}, "+14155550143", "outboundPhoneCall"),
        (other_key, "+14155550143", "outboundPhoneCall"),
        (signed, "+14155550149", "outboundPhoneCall"),
        (signed, "+14155550143", "webCall"),
    ):
        call = {**phone, "id": str(uuid.uuid4()), "type": kind, "metadata": forged}
        prompt = _prompt_of(env, {"call": call, "customer": {"number": customer}})
        assert prompt.startswith("Plan=basic "), prompt


def test_failed_vapi_credentials_are_throttled_per_client_address(env):
    """Guessing the server credential from one address: after the burst, 429 with retry-after,
    before any comparison (the right credential from that address is refused too, so guessing
    on tells nothing); other addresses are not affected; and an address VAPI called from
    (shared by every VAPI customer) cannot be made to lock VAPI out."""
    probe = {"X-Forwarded-For": PROBE}
    statuses = []
    for i in range(40):
        r = httpx.post(
            f"{base(env)}/events", json={}, headers={**probe, "Authorization": f"Bearer guess-{i:020d}"}, timeout=10
        )
        statuses.append(r.status_code)
        if r.status_code == 429:
            break
    assert statuses[0] == 401 and statuses[-1] == 429, statuses
    assert r.json()["error"]["code"] == "too_many_failed_authentications" and int(r.headers["retry-after"]) >= 1
    right = {"Authorization": f"Bearer {TOKEN}"}
    message = {"message": {"type": "transfer-destination-request"}}
    assert httpx.post(f"{base(env)}/events", json=message, headers={**probe, **right}).status_code == 429
    elsewhere = {"X-Forwarded-For": "198.51.100.9", **right}
    assert httpx.post(f"{base(env)}/events", json=message, headers=elsewhere).status_code == 200
    # VAPI's egress addresses are shared by every VAPI customer: failures made to come from an
    # address that presented the right credential do not lock VAPI out (they still fail)
    shared = {"X-Forwarded-For": "198.51.100.10"}
    assert httpx.post(f"{base(env)}/events", json=message, headers={**shared, **right}).status_code == 200
    for i in range(40):
        bad = {**shared, "Authorization": f"Bearer guess-{i:020d}"}
        assert httpx.post(f"{base(env)}/events", json={}, headers=bad).status_code == 401
    assert httpx.post(f"{base(env)}/events", json=message, headers={**shared, **right}).status_code == 200


def test_unknown_account_costs_the_same_comparisons_as_a_known_one(monkeypatch):
    """Account names cannot be told apart by timing: an unknown account makes the same
    constant-time comparisons as an account with both credentials, and never passes."""
    import hmac

    from channels.vapi import parse_accounts, wire

    account = parse_accounts(
        {
            "a": {
                "tenant": "t",
                "api_key": "sk-gw-01234567",
                "public_url": PUBLIC_URL,
                "auth": {"bearer_token": TOKEN, "secret": SECRET},
            }
        }
    )["a"]
    counted = []
    real = hmac.compare_digest
    monkeypatch.setattr(wire.hmac, "compare_digest", lambda a, b: counted.append(1) or real(a, b))
    scope = {"headers": [(b"authorization", f"Bearer {TOKEN}".encode()), (b"x-vapi-secret", SECRET.encode())]}
    assert wire.authentic(account, scope) is True
    known = len(counted)
    assert wire.authentic(None, scope) is False and wire.authentic(None, {"headers": []}) is False
    assert known == 2 and len(counted) == 3 * known


def test_vapi_objects_on_v1_never_reach_the_provider(env):
    """VAPI at /v1 (or any client): `customer` / `phoneNumber` without a `call` object, or a
    `call` that is no object, must not go to the provider beside the scrubbed messages."""
    client = openai.OpenAI(base_url=f"{env['gw'].url}/v1", api_key=env["key"], max_retries=0, timeout=30)
    for extra in (
        {"customer": {"number": "+14155550144", "name": "Jane Roe"}},
        {"call": "c-1", "phoneNumber": {"number": "+14155550100"}, "customer": "Jane Roe"},
    ):
        client.chat.completions.create(
            model=f"agent:{PLAIN}", messages=[{"role": "user", "content": "hi"}], extra_body=extra
        )
        sent = env["mock"].last()["body"]
        assert not {"call", "phoneNumber", "customer"} & set(sent), sent.keys()
        assert "Jane Roe" not in str(sent)


def test_telephony_cost_counts_in_budgets_once_and_hard_budgets_then_refuse(env):
    """A call's cost (VAPI's end-of-call report) used to reach only the ledger: a customer with
    a hard budget could talk on for free. Now it counts in the budgets its ledger record falls
    under, once per call however often the report comes, and the next turn is refused, and so
    is an outbound call to that customer."""
    gw, customer = env["gw"], "+14155550155"
    r = admin(
        gw,
        "POST",
        "/admin/budgets",
        json={"tenant": TENANT, "scope": "customer", "scope_value": customer, "limit_usd": 1.0, "period": "monthly"},
    )
    assert r.status_code == 201, r.text
    budget = r.json()["id"]
    spent = lambda: admin(gw, "GET", f"/admin/budgets/{budget}").json()["spent_usd"]  # noqa: E731

    def report(call_id: str, cost: float) -> dict:
        call = {"id": call_id, "type": "inboundPhoneCall", "customer": {"number": customer}}
        message = {"type": "end-of-call-report", "call": call, "cost": cost, "durationSeconds": 60}
        r = httpx.post(f"{base(env)}/events", json={"message": message}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200, r.text
        return r.json()

    first = str(uuid.uuid4())
    assert report(first, 0.75) == {"stored": True}
    assert report(first, 0.75) == {"stored": False}  # VAPI's retry: nothing counted twice
    assert spent() == pytest.approx(0.75)
    assert report(str(uuid.uuid4()), 0.5) == {"stored": True}
    assert spent() == pytest.approx(1.25)
    r = httpx.post(
        f"{base(env)}/chat/completions",
        json={
            "messages": [{"role": "user", "content": "still there?"}],
            "stream": False,
            "call": {"id": str(uuid.uuid4()), "type": "inboundPhoneCall", "phoneNumberId": "pn_plain"},
            "customer": {"number": customer},
        },
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=30,
    )
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota", r.text
    # nor is the customer called (an outbound call is telephony the budget would be charged)
    before = len(env["api"].requests())
    r = admin(gw, "POST", "/admin/channels/vapi/calls", json={"account": "main", "to": customer})
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota", r.text
    assert "no call is placed" in r.json()["error"]["message"] and len(env["api"].requests()) == before


def test_outbound_calls_are_paced_per_account_and_kept_to_its_prefixes(env):
    """A tenant admin (or a stream of callbacks) placing calls in a loop: past the account's
    `outbound_per_minute`, 429 with retry-after and nothing sent to VAPI; a number outside its
    `outbound_prefixes` is refused; a number the admin API cannot carry exactly (10**30) is a
    400, not a 500."""
    api = env["api"]
    body = {"account": "spare", "to": "+14155550199"}
    r = admin(env["gw"], "POST", "/admin/channels/vapi/calls", json={**body, "variables": {"n": 10**30}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "variables.n", r.text
    before = len(api.requests())
    # a number outside the account's outbound_prefixes (a premium line abroad): 400, nothing sent
    r = admin(env["gw"], "POST", "/admin/channels/vapi/calls", json={**body, "to": "+88213000000"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "destination_not_allowed", r.text
    statuses = [admin(env["gw"], "POST", "/admin/channels/vapi/calls", json=body).status_code for _ in range(3)]
    assert statuses == [201, 201, 429]
    r = admin(env["gw"], "POST", "/admin/channels/vapi/calls", json=body)
    assert r.json()["error"]["code"] == "vapi_outbound_rate_limited" and int(r.headers["retry-after"]) >= 1
    assert len(api.requests()) == before + 2


def test_revoked_account_key_stops_its_tools_and_outbound_calls(env):
    """The account key is re-checked through the gateway's key cache: once revoked, the
    account's tool-calls run nothing and no outbound call is placed (no restart needed)."""
    spare = f"{env['gw'].url}/channels/vapi/spare/events"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    calls = [{"id": "t1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]
    message = {"message": {"type": "tool-calls", "toolCallList": calls, "call": {"id": str(uuid.uuid4())}}}

    def tool_result() -> dict:
        r = httpx.post(spare, json=message, headers=auth, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["results"][0]

    assert "Oslo" in tool_result()["result"]  # the account works while its key is active
    assert admin(env["gw"], "DELETE", f"/admin/keys/{env['spare_id']}").status_code == 200
    wait_until(lambda: "error" in tool_result(), timeout=15, what="the revocation noticed")
    before = len(env["tools"].requests()), len(env["api"].requests())
    assert tool_result() == {"toolCallId": "t1", "error": "the agent is not available"}
    turn = httpx.post(
        f"{env['gw'].url}/channels/vapi/spare/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "stream": True},
        headers=auth,
        timeout=30,
    )
    assert turn.status_code == 401 and turn.json()["error"]["code"] == "vapi_account_key_refused"
    assert "***" not in turn.text  # no piece of the account's key reaches VAPI
    ask = {"message": {"type": "assistant-request", "call": {"id": str(uuid.uuid4()), "type": "inboundPhoneCall"}}}
    assert httpx.post(spare, json=ask, headers=auth, timeout=30).json() == {"error": "This line is not available."}
    r = admin(env["gw"], "POST", "/admin/channels/vapi/calls", json={"account": "spare", "to": "+14155550199"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "vapi_account_key_inactive"
    assert (len(env["tools"].requests()), len(env["api"].requests())) == before


def test_call_fields_of_the_wrong_type_are_ignored_not_a_500(env):
    """`call.type` as an array (unhashable) once made the channel and /v1 answer 500."""
    hostile = {"id": str(uuid.uuid4()), "type": ["webCall"], "phoneNumberId": {"x": 1}, "metadata": [1]}
    r = httpx.post(
        f"{base(env)}/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "stream": False, "call": hostile, "customer": []},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    r = httpx.post(
        f"{base(env)}/events",
        json={"message": {"type": "status-update", "status": ["ended"], "call": hostile}},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    client = openai.OpenAI(base_url=f"{env['gw'].url}/v1", api_key=env["key"], max_retries=0, timeout=30)
    client.chat.completions.create(
        model=f"agent:{PLAIN}", messages=[{"role": "user", "content": "hi"}], extra_body={"call": hostile}
    )


# ---- an erased call leaves no caller's number ---------------------------------------------------
LEDGER_STREAM = "gw:{gw}:ledger"


def _erase_call(env, call: VapiCall) -> str:
    """Erases the call's conversation through the admin API (while it goes on); its id."""
    conv = f"vapi:{call.call_id}"
    gone = admin(env["gw"], "DELETE", f"/admin/agents/{PLAIN}/conversations/{conv}", params={"tenant": TENANT})
    assert gone.status_code == 200, gone.text
    return conv


def _erasure_tag(conversation: str) -> str:
    """The tag the gateway puts in place of an erased id (its key: derived from the master key)."""
    from core import erasure_key

    return erasure_key.conversation_tag(TENANT, conversation, erasure_key._key("", MASTER_KEY, ""))


def _number_rows(env, number: str) -> list[dict]:
    """The tenant's ledger rows and call records that name the number."""
    ledger = query(
        env["db"],
        "SELECT request_id, conversation_id, end_user, customer FROM ledger WHERE tenant = $1 "
        "AND (end_user = $2 OR customer = $2) ORDER BY request_id",
        TENANT,
        number,
    )
    calls = query(env["db"], "SELECT conversation_id FROM vapi_calls WHERE customer_number = $1", number)
    return ledger + calls


def _turn_record(conversation: str, number: str, ts: float) -> dict:
    """A ledger record of a model turn of the call, as the writer finds it in the stream."""
    return {
        "request_id": f"req_{uuid.uuid4().hex}", "ts": ts, "tenant": TENANT, "user": number, "customer": number,
        "agent": PLAIN, "endpoint": "chat", "model": f"agent:{PLAIN}", "status": 200, "prompt_tokens": 7,
        "completion_tokens": 3, "cost_usd": 0.25, "latency_ms": 5.0, "step": 1, "conversation_id": conversation,
    }  # fmt: skip


def test_an_erased_call_keeps_no_callers_number_but_the_callers_other_call_does(env, tmp_root):
    """A call's conversation id (``vapi:<call id>``) does not hold its caller's number, so the
    erasure's retag of "the id or its last part" left it everywhere: the call's record, and the
    ledger rows of its model turns (end user and customer) and of its telephony (customer). Now
    the call's record and its ledger rows hold the erasure's tag instead — those written before,
    a turn's record still in the ledger stream when it came, the ledger's dead letters in Redis
    and in this replica's ``ledger-dead.jsonl`` — while the caller's other call (another
    conversation) keeps the number, and the cost is all still there."""
    import time

    import orjson
    import redis

    from core import locked_lines

    number = f"+1415{uuid.uuid4().int % 10**7:07d}"
    played = [play(env, lambda c: c.play(["Hello", "Thanks"]), phone_number_id="pn_plain", customer=number)]
    played.append(play(env, lambda c: c.play(["Hello again"]), phone_number_id="pn_plain", customer=number))
    erased, kept = (f"vapi:{r.call_id}" for r in played)
    assert all(t.status == 200 for r in played for t in r.turns)
    turns = "SELECT count(*) AS n FROM ledger WHERE endpoint = 'chat' AND conversation_id = $1"
    for conv, n in ((erased, 2), (kept, 1)):
        wait_until(lambda c=conv, n=n: query(env["db"], turns, c) == [{"n": n}], what="the call's model turns")
    ours = [
        x["request_id"] for x in _number_rows(env, number) if x.get("request_id") and x["conversation_id"] == erased
    ]
    assert len(ours) == 3  # two model turns and the telephony, all naming the number
    spent = "SELECT count(*) AS n, sum(cost_usd) AS cost FROM ledger WHERE tenant = $1 AND conversation_id = $2"
    before = query(env["db"], spent, TENANT, erased)[0]
    tag = _erasure_tag(erased)
    r = redis.Redis.from_url(env["redis"])
    dead_file = tmp_root / "data" / "ledger-dead.jsonl"
    others = [orjson.dumps(_turn_record(kept, number, time.time()) | {"error": "22P02"})]
    try:
        # refused records: one in Redis, one in the replica's file (beside another call's)
        dead = _turn_record(erased, number, time.time() - 60)
        r.xadd(f"{LEDGER_STREAM}:dead", {"r": orjson.dumps(dead), "error": "22P02"})
        locked_lines.append(dead_file, [others[0], orjson.dumps(dead | {"error": "22P02"})])

        late = _turn_record(erased, number, time.time())  # a turn answered just before the erasure
        gone = admin(env["gw"], "DELETE", f"/admin/agents/{PLAIN}/conversations/{erased}", params={"tenant": TENANT})
        assert gone.status_code == 200, gone.text
        r.xadd(LEDGER_STREAM, {"r": orjson.dumps(late)})  # its record reaches the writer after it
        landed = "SELECT conversation_id, end_user, customer FROM ledger WHERE request_id = $1"
        wait_until(lambda: query(env["db"], landed, late["request_id"]), what="the late record")

        left = _number_rows(env, number)
        assert {x["conversation_id"] for x in left} == {kept}, left  # the other call's rows and record only
        tagged = query(
            env["db"],
            "SELECT DISTINCT conversation_id, end_user, customer FROM ledger WHERE request_id = ANY($1::text[])",
            [*ours, late["request_id"]],
        )
        assert {x["conversation_id"] for x in tagged} == {tag}
        assert {x["customer"] for x in tagged} == {tag} and {x["end_user"] for x in tagged} <= {tag, None}
        record = query(env["db"], "SELECT customer_number, cost_usd FROM vapi_calls WHERE conversation_id = $1", erased)
        assert record[0]["customer_number"] == tag and record[0]["cost_usd"] is not None
        after = query(env["db"], spent, TENANT, tag)[0]  # the money is all there (one late record more)
        assert after["n"] == before["n"] + 1 and after["cost"] == pytest.approx(before["cost"] + 0.25)
        # the dead letters: rewritten, none names the number or the call
        letters = [orjson.loads(f[b"r"]) for _, f in r.xrange(f"{LEDGER_STREAM}:dead") if TENANT.encode() in f[b"r"]]
        ours_dead = [x for x in letters if x["request_id"] == dead["request_id"]]
        assert [(x["conversation_id"], x["user"], x["customer"]) for x in ours_dead] == [(tag, tag, tag)]
        lines = dead_file.read_bytes().splitlines()
        assert others[0] in lines and not any(erased.encode() in x for x in lines)
        [in_file] = [orjson.loads(x) for x in lines if dead["request_id"].encode() in x]
        assert (in_file["conversation_id"], in_file["user"], in_file["customer"]) == (tag, tag, tag)
    finally:
        stale = [i for i, f in r.xrange(f"{LEDGER_STREAM}:dead") if TENANT.encode() in f.get(b"r", b"")]
        if stale:
            r.xdel(f"{LEDGER_STREAM}:dead", *stale)
        r.close()
        dead_file.unlink(missing_ok=True)


def test_the_erasures_party_rule_names_the_channels_caller_in_a_call_and_nothing_else(services):
    """What the erasure tags in a ``vapi:`` conversation's ledger rows (``names_party``, and its
    SQL twin the writers and the retag run): the caller as the channel names them — the number
    (E.164), the account's keyed pseudonym of it, a web call's own id — and no other value, nor
    any of these in a conversation that is not a call. Pinned to the channel's own formats."""
    from channels.vapi import llm, parse_accounts
    from channels.vapi.wire import CallInfo
    from core.erasure_key import names_party, names_party_sql

    settings = {
        "tenant": TENANT,
        "api_key": "sk-any-key-0001",
        "public_url": PUBLIC_URL,
        "auth": {"bearer_token": TOKEN},
    }
    accounts = parse_accounts({"named": settings, "pseudonymous": {**settings, "attribute_customer": False}})
    number, conv = "+14155550177", "vapi:c-1"
    named = llm.end_user(accounts["named"], CallInfo(call_id="c-1", customer_number=number))
    pseudonym = llm.end_user(accounts["pseudonymous"], CallInfo(call_id="c-1", customer_number=number))
    web = llm.end_user(accounts["named"], CallInfo(call_id="c-1", call_type="webCall"))
    assert (named, pseudonym.startswith("vapi-caller:"), web) == (number, True, "vapi-call:c-1")
    cases = {
        (conv, number): True,
        (conv, pseudonym): True,
        (conv, web): True,
        (conv, conv): True,
        (conv, "vapi-call:c-2"): False,  # another call
        (conv, "+1415"): False,
        (conv, "14155550177"): False,
        (conv, number + "\n"): False,
        (conv, "acme"): False,
        (conv, ""): False,
        (conv, None): False,
        ("chat-1", number): False,  # not a call: only the id or its last part
        ("chat-1", pseudonym): False,
        ("wa:pn:15550001111", "15550001111"): True,
    }
    assert {case: names_party(*case) for case in cases} == cases

    async def in_sql() -> dict:
        conn = await asyncpg.connect(services[0])
        try:
            sql = f"SELECT coalesce({names_party_sql('$1::text', '$2::text')}, false)"
            return {case: await conn.fetchval(sql, *case) for case in cases}
        finally:
            await conn.close()

    assert asyncio.run(in_sql()) == cases


def test_no_callback_is_placed_to_an_erased_calls_caller(env):
    """An erased call's record holds the erasure's tag as its caller's number: a human's reply to
    its conversation is reported undelivered, never a callback placed to the tag."""
    from channels.vapi import VapiChannel, VapiDeliverer, parse_accounts
    from channels.vapi.calls import CallStore
    from channels.vapi.wire import CallInfo
    from gateway.db import tenant_transaction

    settings = {
        "tenant": TENANT, "api_key": env["key"], "public_url": PUBLIC_URL, "auth": {"bearer_token": TOKEN},
        "default_agent": AGENT, "vapi_api_url": env["api"].url, "vapi_api_key": VAPI_KEY,
        "outbound_phone_number_id": "pn_main", "delivery": "callback",
    }  # fmt: skip
    call_id = str(uuid.uuid4())
    conv = f"vapi:{call_id}"

    async def go():
        pool = await asyncpg.create_pool(env["db"], min_size=1, max_size=2)
        try:
            store = CallStore(lambda tenant: tenant_transaction(pool, tenant))
            channel = VapiChannel(parse_accounts({"main": settings}), store, events=None, upstream=None)
            await channel.start()
            await store.upsert(
                TENANT, "main", CallInfo(call_id=call_id, customer_number=_erasure_tag(conv)), AGENT, "ended"
            )
            try:
                return await VapiDeliverer(channel).outcome(TENANT, conv, "A human says hello.", ref="esc_1")
            finally:
                await channel.stop()
        finally:
            await pool.close()

    before = len(env["api"].requests())
    assert asyncio.run(go()) == ("failed", "call ended; its caller's number was erased")
    assert len(env["api"].requests()) == before


def test_a_call_erased_while_live_does_not_get_its_callers_number_back_from_vapis_later_events(env):
    """A call erased while it is still going on: VAPI goes on sending its status updates and then
    its end-of-call report, each with the caller's number. The record keeps the erasure's tag (a
    status update fills only what is unknown: a NULL number would have been filled again), and
    the report's ledger record (the call's telephony) names the tag, not the number, and holds the
    tag as its conversation, as the erasure leaves the rows it finds (rev6: the erased call's id)."""
    number = f"+1650{uuid.uuid4().int % 10**7:07d}"

    async def scenario(call: VapiCall):
        await call.assistant_request()
        await call.event({"type": "status-update", "status": "in-progress"})
        conv = _erase_call(env, call)
        await call.event({"type": "status-update", "status": "forwarding"})
        return conv, await call.end()

    conv, reports = play(env, scenario, phone_number_id="pn_plain", customer=number)
    assert [r["stored"] for r in reports] == [True, False]
    tag = _erasure_tag(conv)
    record = query(
        env["db"], "SELECT customer_number, status, cost_usd FROM vapi_calls WHERE conversation_id = $1", conv
    )
    assert record == [{"customer_number": tag, "status": "ended", "cost_usd": pytest.approx(0.1234)}]
    telephony = query(
        env["db"],
        "SELECT customer, conversation_id FROM ledger WHERE endpoint = 'vapi.call' AND conversation_id IN ($1, $2)",
        conv,
        tag,
    )
    assert telephony == [{"customer": tag, "conversation_id": tag}]
    assert _number_rows(env, number) == []


def test_a_call_erased_while_live_still_counts_in_its_callers_budget(env):
    """The end-of-call report of a call erased while it went on: its record holds the erasure's
    tag as the caller's number, and the call's cost used to be counted under that tag, so the
    caller's budget missed the call. It is counted under the number the report names (counted
    in Redis only: the record and the ledger keep the tag)."""
    number = f"+1650{uuid.uuid4().int % 10**7:07d}"
    r = admin(
        env["gw"],
        "POST",
        "/admin/budgets",
        json={"tenant": TENANT, "scope": "customer", "scope_value": number, "limit_usd": 5.0, "period": "monthly"},
    )
    assert r.status_code == 201, r.text
    budget = r.json()["id"]

    async def scenario(call: VapiCall):
        await call.assistant_request()
        await call.event({"type": "status-update", "status": "in-progress"})
        conv = _erase_call(env, call)
        return conv, await call.end()

    conv, reports = play(env, scenario, phone_number_id="pn_plain", customer=number)
    assert [r["stored"] for r in reports] == [True, False]
    record = query(env["db"], "SELECT customer_number, cost_usd FROM vapi_calls WHERE conversation_id = $1", conv)
    assert record == [{"customer_number": _erasure_tag(conv), "cost_usd": pytest.approx(0.1234)}]
    spent = admin(env["gw"], "GET", f"/admin/budgets/{budget}").json()["spent_usd"]
    assert spent == pytest.approx(0.1234)
    assert _number_rows(env, number) == []


def test_the_erasures_party_rule_says_the_same_in_python_and_sql_on_generated_values(services):
    """``names_party`` (the dead letters' retag in Redis and on disk) and ``names_party_sql`` (the
    ledger's retag and writers) on many generated conversation ids and values, of the characters
    where a regex in Python and one in PostgreSQL may differ: other scripts' digits, full-width
    plus and digits, newlines and carriage returns (``$``), leading zeros, ``+0``, upper-case hex,
    the prefixes of the channel's forms, lengths up to the number's bounds and far past them. A
    disagreement is a row tagged in one place and not in the other."""
    import random

    from core.erasure_key import names_party, names_party_sql

    rng = random.Random(20261127)
    atoms = [
        "0",
        "1",
        "5",
        "9",
        "+",
        "\uff0b",
        "\u0663",
        "\uff11",
        "\u09e7",
        "\n",
        "\r",
        " ",
        ":",
        "a",
        "f",
        "A",
        "g",
        "vapi:",
        "vapi-caller:",
        "vapi-call:",
        "c-1",
        "wa:",
        "\u00e9",
        "\u200b",
        "$",
        "^",
        ".",
    ]
    hexes = "0123456789abcdef"

    def value() -> str:
        kind = rng.randrange(6)
        if kind == 0:
            return "+" + "".join(rng.choice("0123456789") for _ in range(rng.randrange(0, 20)))
        if kind == 1:
            return "vapi-caller:" + "".join(rng.choice(hexes + "AF") for _ in range(rng.choice([23, 24, 24, 25])))
        if kind == 2:  # a valid form with one atom put somewhere in it
            base = rng.choice(["+14155550177", "vapi-caller:" + "ab" * 12, "vapi-call:c-1"])
            at = rng.randrange(len(base) + 1)
            return base[:at] + rng.choice(atoms) + base[at:]
        if kind == 3:
            return "+" + "9" * rng.choice([14, 15, 16, 200, 5000])
        return "".join(rng.choice(atoms) for _ in range(rng.randrange(0, 8)))

    convs = ["vapi:c-1", "vapi:", "VAPI:c-1", "vapi:+14155550177", "wa:pn:15550001111", "chat-1", "vapi:c-1\n"]
    cases = [(rng.choice(convs), value()) for _ in range(6000)]
    cases += [(c, v) for c in convs for v in ("+14155550177", "vapi-call:c-1", "vapi-call:", "+0155550177")]
    expected = [names_party(c, v) for c, v in cases]
    assert any(expected) and not all(expected)

    async def in_sql() -> list:
        conn = await asyncpg.connect(services[0])
        try:
            rows = await conn.fetch(
                f"SELECT coalesce({names_party_sql('c', 'v')}, false) AS party, n "
                "FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS t(c, v, n) ORDER BY n",
                [c for c, _ in cases],
                [v for _, v in cases],
            )
            return [r["party"] for r in rows]
        finally:
            await conn.close()

    got = asyncio.run(in_sql())
    assert [case for case, a, b in zip(cases, expected, got, strict=True) if a != b] == []


def test_a_call_erased_while_live_does_not_get_its_words_back_from_vapis_end_of_call_report(env):
    """An erasure clears a call's transcript, summary and recording link (the conversation's
    words). A call erased while it is still going on then gets its end-of-call report from VAPI,
    with the whole call's transcript (the words said before the erasure too), its summary and its
    recording: stored as they came, they undid the erasure. A report of a call whose conversation
    was erased after the call began keeps the call's duration and cost, not its words."""
    number = f"+1650{uuid.uuid4().int % 10**7:07d}"

    async def scenario(call: VapiCall):
        await call.assistant_request()
        await call.event({"type": "status-update", "status": "in-progress"})
        turn = await call.say("my secret word is marmalade")
        assert turn.status == 200
        conv = _erase_call(env, call)
        return conv, await call.end()

    conv, reports = play(env, scenario, phone_number_id="pn_plain", customer=number)
    assert [r["stored"] for r in reports] == [True, False]
    record = query(
        env["db"],
        "SELECT transcript, summary, recording_url, cost_usd, duration_s, status FROM vapi_calls "
        "WHERE conversation_id = $1",
        conv,
    )
    assert record == [
        {
            "transcript": None,
            "summary": None,
            "recording_url": None,
            "cost_usd": pytest.approx(0.1234),
            "duration_s": pytest.approx(42.0),
            "status": "ended",
        }
    ]


def test_a_calls_report_keeps_its_words_when_only_an_earlier_call_of_the_same_id_was_erased(env):
    """The words go only when the erasure came after the call began: an erasure recorded before
    the call's record (the conversation erased, then VAPI's call) leaves its report as it is."""

    async def scenario(call: VapiCall):
        conv = f"vapi:{call.call_id}"
        gone = admin(env["gw"], "DELETE", f"/admin/agents/{PLAIN}/conversations/{conv}", params={"tenant": TENANT})
        assert gone.status_code in (200, 404), gone.text
        await call.assistant_request()
        turn = await call.say("hello there")
        assert turn.status == 200
        return conv, await call.end()

    conv, reports = play(env, scenario, phone_number_id="pn_plain")
    assert [r["stored"] for r in reports] == [True, False]
    record = query(env["db"], "SELECT transcript, summary FROM vapi_calls WHERE conversation_id = $1", conv)
    assert record[0]["summary"] == "A simulated call." and "hello there" in record[0]["transcript"]
