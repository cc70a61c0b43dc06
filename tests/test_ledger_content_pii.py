"""With ``policies.log_content`` the audit record keeps only what was sent, scrubbed. A request
refused at the PII scrub (a blocked entity, more than one request may check) or before it (a
model its key may not use) sent nothing and was never checked: its record carried the raw body
into the Redis ledger stream (and, with Redis away, the local spool), personal data and all.
Real gateway over HTTP, the OpenAI SDK, the mock provider; the stream is read as entries are
appended (the ledger writer deletes them once they are in PostgreSQL, which has no content column),
the spool file of a gateway whose own Valkey is stopped as it is written."""

from __future__ import annotations

import threading

import openai
import orjson
import pytest
import redis

from gateway.embedded import EmbeddedValkey
from policies.engine import LEDGER_STREAM
from tests.conftest import Gateway, wait_until
from tests.test_tools_review_s22 import ToolServer, agent, call, http_tool, new_key, run_record, unique

TENANT = unique("ledgerpii")
EMAIL = "dana.private@example.org"
CARD = "4111 1111 1111 1111"


class StreamTap:
    """Every ledger record appended while it runs, read as it is appended (blocking reads from
    an id just before the tap started, so none is missed between two reads)."""

    def __init__(self, url: str) -> None:
        self._redis = redis.Redis.from_url(url)
        self._last = f"{int(self._redis.time()[0]) * 1000 - 1000}-0"
        self.records: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for _, entries in self._redis.xread({LEDGER_STREAM: self._last}, block=100) or ():
                for entry_id, fields in entries:
                    self._last = entry_id
                    if b"r" in fields:
                        self.records.append(orjson.loads(fields[b"r"]))

    def of(self, request_id: str) -> list[dict]:
        """The records of one request, once there is one (agent turns: one a step)."""
        wait_until(lambda: any(r["request_id"] == request_id for r in self.records), timeout=30, what="its record")
        return [r for r in self.records if r["request_id"] == request_id]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._redis.close()


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    config = {
        "router": {"max_attempts": 1},
        "policies": {"log_content": True},
        "providers": [{"name": "pp", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k"]}],
        "models": [
            {"name": "m1", "deployments": [{"provider": "pp", "model": "m"}]},
            {"name": "agent-model", "deployments": [{"provider": "pp", "model": "m"}]},
        ],
        "pii": {
            "workers": 0,
            "policies": {
                "strict": {"entities": {"email": "redact", "phone": "redact", "credit_card": "block"}},
            },
            "tenants": {TENANT: "strict"},
        },
    }
    g = Gateway(tmp_root, config, services)
    yield g
    g.stop()


@pytest.fixture
def tap(services):
    t = StreamTap(services[1])
    yield t
    t.close()


def _send(gw, key: str, text: str, model: str = "m1") -> str:
    """The request id of one chat request, answered or refused."""
    c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=60)
    try:
        raw = c.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": text}])
    except openai.APIStatusError as err:
        assert err.status_code < 500, err.response.text  # refused, never a server error
        return err.response.headers["x-request-id"]
    return raw.headers["x-request-id"]


def test_a_served_request_keeps_its_content_scrubbed(gw, tap):
    rid = _send(gw, new_key(gw, TENANT), f"Write to {EMAIL} please")
    (rec,) = tap.of(rid)
    assert rec["status"] == 200 and rec["content"], rec
    text = orjson.dumps(rec["content"]).decode()
    assert "Write to" in text and EMAIL not in text  # the body as it left: scrubbed


@pytest.mark.parametrize(
    "text, code",
    [
        (f"My card is {CARD}, mail {EMAIL}", "pii_blocked"),
        (f"Mail {EMAIL}: " + " ".join(f"({200 + i % 700}) 555-{i:04d}" for i in range(600)), "pii_too_much_to_check"),
    ],
    ids=["blocked", "too_much_to_check"],
)
def test_a_request_refused_at_the_scrub_keeps_no_content(gw, tap, text, code):
    rid = _send(gw, new_key(gw, TENANT), text)
    (rec,) = tap.of(rid)
    assert rec["status"] == 400 and rec["error_code"] == code, rec
    assert "content" not in rec
    raw = orjson.dumps(rec).decode()
    assert EMAIL not in raw and "1111" not in raw and "555-0001" not in raw


def test_a_request_refused_before_the_scrub_keeps_no_content(gw, tap):
    """A key that may not use the model: refused at routing, before the scrub ran."""
    resp = call(gw, "POST", "/admin/keys", json={"name": unique("k"), "tenant": TENANT, "models": ["agent-model"]})
    assert resp.status_code == 201, resp.text
    rid = _send(gw, resp.json()["key"], f"Write to {EMAIL} please", model="m1")
    (rec,) = tap.of(rid)
    assert rec["status"] == 403 and "content" not in rec, rec
    assert EMAIL not in orjson.dumps(rec).decode()


@pytest.fixture(scope="module")
def tools(tmp_root):
    server = ToolServer(tmp_root)
    yield server
    server.stop()


def test_an_agent_step_refused_before_its_scrub_keeps_no_tool_result(gw, tap, tools):
    """The step after the tools ran, refused at admission (the key's one request a minute): its
    record kept the body of the step before, which by then held the tool's raw results."""
    tool = http_tool("contacts", f"{tools.url}/directory", {"count": {"type": "string"}})
    name = agent(gw, TENANT, [tool])
    resp = call(gw, "POST", "/admin/keys", json={"name": unique("k"), "tenant": TENANT, "rpm": 1})
    assert resp.status_code == 201, resp.text
    directive = "[[mock:" + orjson.dumps({"tool_calls": [{"name": "contacts", "arguments": {"count": "3"}}]}).decode()
    rid = _send(gw, resp.json()["key"], f"Find my contacts {directive}]]", model=f"agent:{name}")
    assert [r for r in tools.requests() if r["path"] == "/directory"], "the tool ran"
    wait_until(lambda: len(tap.of(rid)) == 2, timeout=30, what="both steps' records")
    first, second = sorted(tap.of(rid), key=lambda r: r["step"])
    assert first["status"] == 200 and first["content"]  # step 1 was sent: its content is kept
    assert second["status"] == 429 and "content" not in second, second
    assert "555-0001" not in orjson.dumps(second).decode()


@pytest.fixture(scope="module")
def lone(tmp_root, services, module_mock):
    """A gateway on a Valkey of its own (stopped by the test: its settles then go to the spool),
    going on without limits while Redis is away (``fail_open``)."""
    valkey = EmbeddedValkey(tmp_root / unique("valkey"))
    valkey.acquire()
    config = {
        "router": {"max_attempts": 1},
        "policies": {"log_content": True, "fail_open": True},
        "providers": [{"name": "pp", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k"]}],
        "models": [{"name": "m1", "deployments": [{"provider": "pp", "model": "m"}]}],
        "pii": {
            "workers": 0,
            "policies": {"strict": {"entities": {"email": "redact", "credit_card": "block"}}},
            "tenants": {TENANT: "strict"},
        },
    }
    try:
        g = Gateway(tmp_root, config, (services[0], valkey.url))
    except BaseException:
        valkey.release()
        raise
    up = {"valkey": True}
    yield g, valkey, up
    g.stop()
    if up["valkey"]:  # (released once: a second release would signal a pid file's stale pid)
        valkey.release()


def _spooled(tmp_root, request_id: str) -> list[dict]:
    lines = [line for p in (tmp_root / "data").glob("ledger-spool-*") for line in p.read_bytes().splitlines()]
    return [r for r in map(orjson.loads, filter(None, lines)) if r.get("request_id") == request_id]


def test_with_redis_away_the_spool_keeps_scrubbed_content_and_none_of_a_refused_request(lone, tmp_root):
    gw, valkey, up = lone
    key = new_key(gw, TENANT)
    _send(gw, key, "hello")  # the key known to the process before Redis goes
    valkey.release()  # the last user: the server shuts down
    up["valkey"] = False
    served = _send(gw, key, f"Write to {EMAIL} please")
    refused = _send(gw, key, f"My card is {CARD}, mail {EMAIL}")
    wait_until(lambda: _spooled(tmp_root, served) and _spooled(tmp_root, refused), timeout=30, what="both spooled")
    (ok,) = _spooled(tmp_root, served)
    assert ok["status"] == 200 and ok["content"] and EMAIL not in orjson.dumps(ok).decode()
    (no,) = _spooled(tmp_root, refused)
    assert no["status"] == 400 and no["error_code"] == "pii_blocked" and "content" not in no, no
    assert EMAIL not in orjson.dumps(no).decode() and "1111" not in orjson.dumps(no).decode()


def test_a_step_refused_after_the_tools_ran_answers_degraded_not_with_an_error_to_retry(gw, tap, tools):
    """Step 2 refused at its admission (the key's one request a minute) after the tool ran: the
    client got 429, which the OpenAI SDKs retry on their own — the whole turn again, the tool's
    side effects (an order, a refund) included. The turn now answers degraded; the refused step
    keeps its own audit record and the run record shows it."""
    tool = http_tool("contacts", f"{tools.url}/directory", {"count": {"type": "string"}})
    name = agent(gw, TENANT, [tool])
    resp = call(gw, "POST", "/admin/keys", json={"name": unique("k"), "tenant": TENANT, "rpm": 1})
    assert resp.status_code == 201, resp.text
    directive = "[[mock:" + orjson.dumps({"tool_calls": [{"name": "contacts", "arguments": {"count": "2"}}]}).decode()
    c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=resp.json()["key"], max_retries=0, timeout=60)
    raw = c.chat.completions.with_raw_response.create(
        model=f"agent:{name}", messages=[{"role": "user", "content": f"Find my contacts {directive}]]"}]
    )
    answer = raw.parse()
    assert raw.headers["x-gateway-degraded"] == "true"
    assert answer.choices[0].message.content == "I could not finish this request."
    assert answer.choices[0].finish_reason == "stop"
    rid = raw.headers["x-request-id"]
    wait_until(lambda: len(tap.of(rid)) == 2, timeout=30, what="both steps' records")
    assert sorted((r["step"], r["status"]) for r in tap.of(rid)) == [(1, 200), (2, 429)]
    record = run_record(gw, rid)
    assert record["status"] == 200 and record["degraded"] is True, record
    kinds = [(s["kind"], s.get("status")) for s in record["steps"]]
    assert ("tool", "ok") in kinds and ("model", "429") in kinds, kinds
