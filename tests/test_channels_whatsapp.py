"""The WhatsApp channel end to end: real gateway processes (with the channel worker inside, and a
separate `gateway channels worker` that is SIGKILLed), the mock Graph API (loadtest/mock_graph.py)
and the mock LLM (loadtest/mock_provider.py) as real HTTP servers, webhooks signed like Meta's.

Hostile inputs of the webhook are the `test_attack_*` tests."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import random
import signal
import sys
import time
import uuid

import asyncpg
import httpx
import orjson
import pytest

from tests.conftest import LOCAL_HTTP, MASTER_KEY, Gateway, Proc, free_port, run_cli, wait_until

TENANT = f"wa-{uuid.uuid4().hex[:6]}"
TOKEN = "graph-token-test"
SECRETS = {
    "acme": "acme-app-secret-0123",
    "beta": "beta-app-secret-4567",
    "burst": "burst-app-secret-89ab",
    "brief": "brief-app-secret-cdef",
}
PNIDS = {"acme": "1001", "beta": "2002", "burst": "3003", "brief": "4004"}
VERIFY = "verify-token-0123"
FALLBACK = "Sorry, we are having trouble. A person will get back to you."
ENV = {
    "GATEWAY_CHANNEL_WORKER": "1",
    "GATEWAY_WA_VISIBILITY_TIMEOUT": "2",
    "GATEWAY_WA_MAX_RETRIES": "1",
    "GATEWAY_WA_BACKOFF": "0.2",
}
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


class GraphMock(Proc):
    def __init__(self, tmp) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "loadtest.mock_graph", "--port", str(self.port), "--token", TOKEN]
        super().__init__(args, dict(os.environ), tmp / f"mock-graph-{self.port}.log")
        wait_until(lambda: LOCAL_HTTP.get(f"{self.url}/health").status_code == 200, what="mock graph")

    def _post(self, path: str, body: dict) -> None:
        LOCAL_HTTP.post(f"{self.url}{path}", json=body).raise_for_status()

    def configure(self, **cfg) -> None:
        self._post("/_mock/config", cfg)

    def sent_to(self, wa_id: str) -> list[dict]:
        return [s for s in LOCAL_HTTP.get(f"{self.url}/_mock/sent").json()["sent"] if s["to"] == wa_id]

    def reads(self) -> list[str]:
        return [r["message_id"] for r in LOCAL_HTTP.get(f"{self.url}/_mock/reads").json()["reads"]]

    def stats(self) -> dict:
        return LOCAL_HTTP.get(f"{self.url}/_mock/stats").json()


def account(name: str, **extra) -> dict:
    return {
        "tenant": TENANT,
        "phone_numbers": {PNIDS[name]: "wabot"},
        "app_secret": SECRETS[name],
        "verify_token": VERIFY,
        "access_token": TOKEN,
        "api_key": "${WA_TEST_CHANNEL_KEY}",
        "fallback_message": FALLBACK,
        **extra,
    }


@pytest.fixture(scope="module")
def wa(tmp_root, services, module_mock, graph):
    out = run_cli("keys", "create", "--name", "whatsapp-channel", "--tenant", TENANT, urls=services, tmp=tmp_root)
    assert out.returncode == 0, out.stderr
    saved = {k: os.environ.get(k) for k in (*ENV, "WA_TEST_CHANNEL_KEY")}
    channel_key = out.stdout.splitlines()[0].strip()
    os.environ.update(ENV, WA_TEST_CHANNEL_KEY=channel_key)
    graph_url = graph.url
    config = {
        "router": {"max_attempts": 1},
        "providers": [{"name": "llm", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k"]}],
        "models": [{"name": "agent-model", "deployments": [{"provider": "llm", "model": "m"}]}],
        "channels": {
            "whatsapp": {
                "acme": account(
                    "acme",
                    graph_base_url=graph_url,
                    window_template="reengage",
                    media_max_bytes=200_000,
                    media_hosts=[],
                ),
                "beta": account("beta", graph_base_url=graph_url, media_quota_bytes=40),
                "burst": account("burst", graph_base_url=graph_url, debounce=1.0),
                "brief": account("brief", graph_base_url=graph_url, window_template="reengage", max_reply_parts=1),
            }
        },
    }
    try:
        gw = Gateway(tmp_root, config, services)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    gw.channel_key = channel_key
    graph.configure(webhook_url=f"{gw.url}/channels/whatsapp/acme", app_secret=SECRETS["acme"])
    body = {
        "name": "wabot",
        "tenant": TENANT,
        "model": "agent-model",
        "template": "You help {{ customer_name }} ({{ customer_number }}) on {{ channel }}.",
        "variables": {
            "customer_name": {"type": "string", "required": False},
            "customer_number": {"type": "string", "required": False},
            "channel": {"type": "string", "required": False},
        },
    }
    r = admin(gw, "POST", "/admin/agents", json=body)
    assert r.status_code == 201, r.text
    yield gw
    gw.stop()


# ---- helpers -------------------------------------------------------------------------------


def admin(gw: Gateway, method: str, path: str, **kw) -> httpx.Response:
    return LOCAL_HTTP.request(
        method, f"{gw.url}{path}", headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=30, **kw
    )


def new_wa_id() -> str:
    return str(random.randint(10**11, 10**12 - 1))


def new_wamid() -> str:
    return f"wamid.TEST{uuid.uuid4().hex}"


def text(wa_id: str, body: str, *, wamid: str | None = None, ts: float | None = None) -> dict:
    return {
        "from": wa_id,
        "id": wamid or new_wamid(),
        "timestamp": str(int(ts if ts is not None else time.time())),
        "type": "text",
        "text": {"body": body},
    }


def notification(messages: list[dict], *, pnid: str, name: str = "Ada", statuses: list | None = None) -> dict:
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550001001", "phone_number_id": pnid},
        "contacts": [{"profile": {"name": name}, "wa_id": m["from"]} for m in messages if isinstance(m, dict)],
        "messages": messages,
    }
    if statuses is not None:
        value["statuses"] = statuses
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": "WABA", "changes": [{"field": "messages", "value": value}]}],
    }


def post(gw: Gateway, acct: str, doc, *, secret: str | None = None, raw: bytes | None = None) -> httpx.Response:
    raw = raw if raw is not None else orjson.dumps(doc)
    sig = "sha256=" + hmac.new((secret or SECRETS[acct]).encode(), raw, hashlib.sha256).hexdigest()
    return httpx.post(
        f"{gw.url}/channels/whatsapp/{acct}",
        content=raw,
        headers={"Content-Type": "application/json", "X-Hub-Signature-256": sig},
        timeout=30,
    )


def say(gw: Gateway, acct: str, wa_id: str, body: str, **kw) -> str:
    msg = text(wa_id, body, **kw)
    r = post(gw, acct, notification([msg], pnid=PNIDS[acct]))
    assert r.status_code == 200, r.text
    return msg["id"]


def wait_sent(graph: GraphMock, wa_id: str, n: int, timeout: float = 30) -> list[dict]:
    wait_until(lambda: len(graph.sent_to(wa_id)) >= n, timeout=timeout, what=f"{n} sends to {wa_id}")
    return graph.sent_to(wa_id)


def rows(database_url: str, sql: str, *args) -> list[dict]:
    async def go():
        conn = await asyncpg.connect(database_url)
        try:
            return [dict(r) for r in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    return asyncio.run(go())


def execute(database_url: str, sql: str) -> None:
    async def go():
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(go())


def queue_idle(gw: Gateway, name: str) -> bool:
    stats = admin(gw, "GET", f"/admin/queues/{name}").json()
    return stats["depth"] == 0 and stats["pending"] == 0 and stats["delayed"] == 0


def llm_requests(mock, wa_id: str) -> list[dict]:
    """The mock LLM's requests of one customer's conversation (its number is in the system prompt)."""
    out = []
    for r in mock.requests():
        msgs = r["body"].get("messages") or []
        if msgs and msgs[0].get("role") == "system" and wa_id in str(msgs[0].get("content")):
            out.append(r["body"])
    return out


# ---- the proof list ------------------------------------------------------------------------


def test_verification_handshake(wa):
    q = {"hub.mode": "subscribe", "hub.verify_token": VERIFY, "hub.challenge": "1158201444"}
    r = httpx.get(f"{wa.url}/channels/whatsapp/acme", params=q)
    assert r.status_code == 200 and r.text == "1158201444"
    assert r.headers["content-type"].startswith("text/plain")
    r = httpx.get(f"{wa.url}/channels/whatsapp/acme", params={**q, "hub.verify_token": "wrong-token-000"})
    assert r.status_code == 403
    assert httpx.get(f"{wa.url}/channels/whatsapp/nobody", params=q).status_code == 404


def test_conversation_of_several_turns_with_an_image_and_a_button_reply(wa, graph, module_mock, services):
    wa_id = new_wa_id()
    graph._post("/_mock/media", {"id": "7770001", "data_b64": base64.b64encode(PNG).decode(), "mime_type": "image/png"})
    first = say(wa, "acme", wa_id, "Hello there")
    assert wait_sent(graph, wa_id, 1)[0]["text"] == "echo: Hello there"
    image = {
        "from": wa_id,
        "id": new_wamid(),
        "timestamp": str(int(time.time())),
        "type": "image",
        "image": {"id": "7770001", "mime_type": "image/png", "sha256": "x", "caption": "What is this?"},
    }
    assert post(wa, "acme", notification([image], pnid="1001")).status_code == 200
    assert wait_sent(graph, wa_id, 2)[1]["text"] == "echo: What is this?"
    button = {
        "from": wa_id,
        "id": new_wamid(),
        "timestamp": str(int(time.time())),
        "type": "interactive",
        "interactive": {"type": "button_reply", "button_reply": {"id": "opt-yes", "title": "Yes please"}},
    }
    assert post(wa, "acme", notification([button], pnid="1001")).status_code == 200
    sent = wait_sent(graph, wa_id, 3)
    assert [s["text"] for s in sent] == ["echo: Hello there", "echo: What is this?", "echo: Yes please"]
    assert all(s["pnid"] == "1001" and s["type"] == "text" for s in sent)
    calls = llm_requests(module_mock, wa_id)
    assert len(calls) == 3
    system = calls[0]["messages"][0]["content"]
    assert "Ada" in system and "whatsapp" in system  # the customer's profile name and the channel
    parts = calls[1]["messages"][-1]["content"]  # the image reached the model as an image part
    assert {"type": "text", "text": "What is this?"} in parts
    image_part = next(p for p in parts if p["type"] == "image_url")
    assert image_part["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(PNG).decode()
    history = [m.get("content") for m in calls[2]["messages"]]  # memory: the earlier turns came back
    assert "Hello there" in history and "echo: Hello there" in history
    assert first in graph.reads()  # marked read
    conv = rows(services[0], "SELECT * FROM whatsapp_conversations WHERE tenant = $1 AND wa_id = $2", TENANT, wa_id)
    assert len(conv) == 1 and conv[0]["profile_name"] == "Ada" and conv[0]["conversation_id"] == f"wa:1001:{wa_id}"

    def directions():
        found = rows(
            services[0], "SELECT direction FROM whatsapp_messages WHERE tenant = $1 AND wa_id = $2", TENANT, wa_id
        )
        return sorted(m["direction"] for m in found) == ["in", "in", "in", "out", "out", "out"]

    wait_until(directions, what="message records")  # outbound rows are written after the send
    assert (stored := list((wa.log_path.parent / "data" / "channels" / "whatsapp").rglob("*.png"))) and stored[
        0
    ].read_bytes() == PNG


def test_documents_and_audio_reach_the_agent_as_stored_attachments(wa, graph, module_mock, tmp_root):
    pdf, ogg = b"%PDF-1.4 invoice", b"OggS voice note"
    graph._post(
        "/_mock/media", {"id": "7770002", "data_b64": base64.b64encode(pdf).decode(), "mime_type": "application/pdf"}
    )
    graph._post("/_mock/media", {"id": "7770003", "data_b64": base64.b64encode(ogg).decode(), "mime_type": "audio/ogg"})
    wa_id = new_wa_id()
    now = str(int(time.time()))
    doc = {
        "from": wa_id,
        "id": new_wamid(),
        "timestamp": now,
        "type": "document",
        "document": {"id": "7770002", "mime_type": "application/pdf", "filename": "invoice.pdf", "caption": "my bill"},
    }
    voice = {
        "from": wa_id,
        "id": new_wamid(),
        "timestamp": now,
        "type": "audio",
        "audio": {"id": "7770003", "mime_type": "audio/ogg; codecs=opus", "voice": True},
    }
    assert post(wa, "acme", notification([doc], pnid="1001")).status_code == 200
    wait_sent(graph, wa_id, 1)
    assert post(wa, "acme", notification([voice], pnid="1001")).status_code == 200
    wait_sent(graph, wa_id, 2)
    first, second = (c["messages"][-1]["content"] for c in llm_requests(module_mock, wa_id))
    digest = hashlib.sha256(pdf).hexdigest()
    expected = f"[attachment: document 'invoice.pdf' (application/pdf, {len(pdf)} bytes), ref wa-media:{digest[:24]}]"
    assert first == expected + "\nmy bill"
    assert second.startswith("[attachment: audio 'audio.ogg' (audio/ogg, 15 bytes)")
    stored = list((tmp_root / "data" / "channels" / "whatsapp").rglob(f"{digest}.pdf"))
    assert len(stored) == 1 and stored[0].read_bytes() == pdf


def test_bad_signature_is_refused_and_nothing_is_stored(wa, graph, services):
    wa_id = new_wa_id()
    msg = text(wa_id, "let me in")
    doc = notification([msg], pnid="1001")
    assert post(wa, "acme", doc, secret="not-the-app-secret").status_code == 401
    assert post(wa, "acme", doc, secret=SECRETS["beta"]).status_code == 401  # another account's secret
    raw = orjson.dumps(doc)
    unsigned = httpx.post(f"{wa.url}/channels/whatsapp/acme", content=raw, headers={"Content-Type": "application/json"})
    assert unsigned.status_code == 401 and unsigned.json()["error"]["code"] == "invalid_signature"
    # a valid signature over other bytes (re-serialised, one byte changed) is refused too
    sig = "sha256=" + hmac.new(SECRETS["acme"].encode(), raw, hashlib.sha256).hexdigest()
    tampered = raw.replace(b"let me in", b"let me on")
    r = httpx.post(f"{wa.url}/channels/whatsapp/acme", content=tampered, headers={"X-Hub-Signature-256": sig})
    assert r.status_code == 401
    assert rows(services[0], "SELECT 1 FROM whatsapp_messages WHERE wamid = $1", msg["id"]) == []
    metrics = httpx.get(f"{wa.url}/metrics").text
    assert 'gateway_whatsapp_webhook_total{account="acme",outcome="bad_signature"}' in metrics
    # nothing was remembered either: the same wamid, properly signed, is processed
    assert post(wa, "acme", doc).status_code == 200
    assert wait_sent(graph, wa_id, 1)[0]["text"] == "echo: let me in"


def test_duplicated_wamid_is_processed_once(wa, graph, module_mock, services):
    wa_id = new_wa_id()
    msg = text(wa_id, "only once")
    doc = notification([msg, msg], pnid="1001")  # a duplicate inside the batch
    for _ in range(3):  # and Meta's redeliveries
        assert post(wa, "acme", doc).status_code == 200
    wait_sent(graph, wa_id, 1)
    # a redelivery after the Redis dedupe and send state expired (8 days): the records still know it
    import redis

    from channels.whatsapp.sender import state_key
    from core.queue import _digest

    r = redis.Redis.from_url(services[1])
    try:
        wait_until(lambda: r.exists(state_key("acme", f"turn:{msg['id']}")), what="send state")
        assert (
            r.delete(f"gw:{{gw}}:q:wa-inbound:d:{_digest('acme:' + msg['id'])}", state_key("acme", f"turn:{msg['id']}"))
            == 2
        )
    finally:
        r.close()
    wait_until(
        lambda: rows(services[0], "SELECT 1 FROM whatsapp_messages WHERE reply_to = $1", msg["id"]), what="record"
    )
    assert post(wa, "acme", doc).status_code == 200
    say(wa, "acme", wa_id, "second message")  # ordered after every copy of the first
    sent = wait_sent(graph, wa_id, 2)
    assert [s["text"] for s in sent] == ["echo: only once", "echo: second message"]
    assert len(llm_requests(module_mock, wa_id)) == 2


def test_out_of_order_statuses_do_not_regress(wa, graph, services):
    graph.configure(statuses=True, status_order=["read", "delivered", "sent"])
    try:
        wa_id = new_wa_id()
        say(wa, "acme", wa_id, "track my delivery")
        wamid = wait_sent(graph, wa_id, 1)[0]["wamid"]

        def record():
            found = rows(services[0], "SELECT * FROM whatsapp_messages WHERE tenant = $1 AND wamid = $2", TENANT, wamid)
            return found[0] if found and found[0]["sent_at"] and found[0]["delivered_at"] else None

        wait_until(record, timeout=20, what="statuses recorded")
        row = record()
        assert row["status"] == "read" and row["read_at"] is not None and row["direction"] == "out"
        assert row["body"] == "echo: track my delivery"  # the send's record and the statuses are one row
    finally:
        graph.configure(statuses=False)
    late = {"id": wamid, "status": "delivered", "timestamp": str(int(time.time())), "recipient_id": wa_id}
    assert post(wa, "acme", notification([], pnid="1001", statuses=[late])).status_code == 200
    assert post(wa, "acme", notification([], pnid="1001", statuses=[{**late, "status": "sent"}])).status_code == 200
    wait_until(lambda: queue_idle(wa, "wa-status"), what="statuses processed")
    assert rows(services[0], "SELECT status FROM whatsapp_messages WHERE wamid = $1", wamid)[0]["status"] == "read"


def test_reply_outside_the_24_hour_window_sends_the_template_or_is_held(wa, graph, services):
    r = admin(
        wa,
        "POST",
        "/admin/channels/whatsapp/templates",
        json={"account": "acme", "name": "reengage", "language": "en_US", "variables": ["customer_name", "reply"]},
    )
    assert r.status_code == 201, r.text
    listed = admin(wa, "GET", "/admin/channels/whatsapp/templates", params={"account": "acme"}).json()["data"]
    assert [t["name"] for t in listed] == ["reengage"] and listed[0]["variables"] == ["customer_name", "reply"]
    old = time.time() - 25 * 3600  # a message whose window closed before it was answered
    wa_id = new_wa_id()
    say(wa, "acme", wa_id, "are you there?", ts=old)
    sent = wait_sent(graph, wa_id, 1)
    assert sent[0]["type"] == "template"
    tpl = sent[0]["template"]
    assert tpl["name"] == "reengage" and tpl["language"] == {"code": "en_US"}
    assert [p["text"] for p in tpl["components"][0]["parameters"]] == ["Ada", "echo: are you there?"]
    # Meta says the window is closed though we thought it open (131047): the template again
    wa_id2 = new_wa_id()
    graph._post("/_mock/window", {"wa_id": wa_id2, "open": False})
    say(wa, "acme", wa_id2, "hello again")
    assert wait_sent(graph, wa_id2, 1)[0]["type"] == "template"
    assert graph.stats().get("error_131047", 0) >= 1
    # an account without a window template holds the reply and reports it
    wa_id3 = new_wa_id()
    say(wa, "beta", wa_id3, "anyone?", ts=old)

    def held():
        r = admin(wa, "GET", "/admin/channels/whatsapp/messages", params={"account": "beta", "status": "held"})
        return [m for m in r.json()["data"] if m["wa_id"] == wa_id3]

    wait_until(held, timeout=20, what="held reply")
    assert held()[0]["body"] == "echo: anyone?" and "window" in held()[0]["error"]
    assert graph.sent_to(wa_id3) == []


def test_a_send_failed_later_for_the_closed_window_is_replaced_by_the_template(wa, graph, services):
    body = {"account": "acme", "name": "reengage", "language": "en_US", "variables": ["customer_name", "reply"]}
    assert admin(wa, "POST", "/admin/channels/whatsapp/templates", json=body).status_code == 201
    wa_id = new_wa_id()
    say(wa, "acme", wa_id, "late failure")
    wamid = wait_sent(graph, wa_id, 1)[0]["wamid"]
    wait_until(lambda: rows(services[0], "SELECT 1 FROM whatsapp_messages WHERE wamid = $1", wamid), what="record")
    failed = {
        "id": wamid,
        "status": "failed",
        "timestamp": str(int(time.time())),
        "recipient_id": wa_id,
        "errors": [{"code": 131047, "title": "Re-engagement message"}],
    }
    assert post(wa, "acme", notification([], pnid="1001", statuses=[failed])).status_code == 200
    sent = wait_sent(graph, wa_id, 2)
    assert sent[1]["type"] == "template"
    assert [p["text"] for p in sent[1]["template"]["components"][0]["parameters"]] == ["Ada", "echo: late failure"]
    row = rows(services[0], "SELECT status, error FROM whatsapp_messages WHERE wamid = $1", wamid)[0]
    assert row == {"status": "failed", "error": "131047"}
    # the same status again (Meta retries) sends nothing more
    assert post(wa, "acme", notification([], pnid="1001", statuses=[failed])).status_code == 200
    say(wa, "acme", wa_id, "still there?")
    assert wait_sent(graph, wa_id, 3)[2]["text"] == "echo: still there?"
    wait_until(lambda: queue_idle(wa, "wa-status"), what="statuses processed")
    assert len(graph.sent_to(wa_id)) == 3


def test_graph_throttling_backs_off_and_a_5xx_is_retried(wa, graph):
    wa_id = new_wa_id()
    graph._post("/_mock/faults", {"to": wa_id, "errors": [130429, 500]})
    say(wa, "acme", wa_id, "busy day")
    sent = wait_sent(graph, wa_id, 1)
    assert [s["text"] for s in sent] == ["echo: busy day"]
    stats = graph.stats()
    assert stats.get("error_130429", 0) >= 1 and stats.get("error_500", 0) >= 1


def test_a_burst_within_the_debounce_is_one_agent_turn(wa, graph, module_mock):
    wa_id = new_wa_id()
    for body in ("hi", "I have a question", "about my order"):
        say(wa, "burst", wa_id, body)
    sent = wait_sent(graph, wa_id, 1)
    calls = llm_requests(module_mock, wa_id)
    assert len(calls) == 1
    assert calls[0]["messages"][-1]["content"] == "hi\nI have a question\nabout my order"
    assert sent[0]["text"] == "echo: hi\nI have a question\nabout my order"
    say(wa, "burst", wa_id, "thanks")  # after the burst: a turn of its own
    assert [s["text"] for s in wait_sent(graph, wa_id, 2)][1] == "echo: thanks"
    assert len(llm_requests(module_mock, wa_id)) == 2


def test_after_the_last_retry_the_customer_gets_the_fallback_and_the_admin_can_replay(wa, graph, module_mock):
    module_mock.configure(fail_rate=1.0, fail_status=500)
    try:
        wa_id = new_wa_id()
        wamid = say(wa, "acme", wa_id, "please answer")
        assert wait_sent(graph, wa_id, 1)[0]["text"] == FALLBACK
    finally:
        module_mock.configure(fail_rate=0.0)
    dead = admin(wa, "GET", "/admin/queues/wa-inbound/dead-letters", params={"limit": 1000}).json()["data"]
    mine = [d for d in dead if d["payload"].get("wamid") == wamid]
    assert len(mine) == 1 and "502" in mine[0]["error"]
    r = admin(wa, "POST", f"/admin/queues/wa-inbound/dead-letters/{mine[0]['id']}/retry")
    assert r.status_code == 200, r.text
    sent = wait_sent(graph, wa_id, 2)
    assert sent[1]["text"] == "echo: please answer"


def test_sigkilled_worker_messages_are_each_answered_once(wa, graph, services, tmp_root, module_mock):
    cfg = next(wa.log_path.parent.glob(f"gateway-{wa.port}.yaml"))
    env = {
        **os.environ,
        **ENV,
        "DATABASE_URL": services[0],
        "REDIS_URL": services[1],
        "GATEWAY_URL": wa.url,
        "GATEWAY_DATA_DIR": str(tmp_root / "data"),
        "WA_TEST_CHANNEL_KEY": wa.channel_key,
    }
    worker = Proc(
        [sys.executable, "-m", "gateway", "channels", "worker", "--config", str(cfg)], env, tmp_root / "wa-worker.log"
    )
    try:
        wait_until(lambda: "channel worker running" in worker.log(), timeout=30, what="worker start")
        customers = [new_wa_id() for _ in range(8)]
        for c in customers:  # each turn's model call takes 2 s: the worker is killed holding some
            say(wa, "acme", c, f'slow {c} [[mock:{{"delay_ms": 2000}}]]')

        def worker_holds() -> int:
            import redis

            r = redis.Redis.from_url(services[1])
            try:
                info = r.xinfo_consumers("gw:{gw}:q:wa-inbound", "workers")
            finally:
                r.close()
            return sum(int(c["pending"]) for c in info if f"-{worker.proc.pid}-" in c["name"].decode())

        wait_until(worker_holds, timeout=20, what="the worker holding messages")
        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait(10)
        for c in customers:  # the gateway's own worker claims them after the visibility timeout
            wait_sent(graph, c, 1, timeout=60)
        say(wa, "acme", customers[0], "and now?")  # behind everything of that conversation
        wait_sent(graph, customers[0], 2)
        for c in customers:
            texts = [s["text"] for s in graph.sent_to(c)]
            assert texts.count(f"echo: slow {c}") == 1, texts
            # The killed worker's turns were still at the gateway: the redelivered ones carried
            # the same Idempotency-Key and got that answer back (409 while it ran), so the model
            # was called once per turn and the conversation's memory holds each turn once.
            slow = [b for b in llm_requests(module_mock, c) if b["messages"][-1]["content"].startswith("slow")]
            assert len(slow) == 1, [b["messages"][-1] for b in slow]
        users = [m["content"] for m in llm_requests(module_mock, customers[0])[-1]["messages"] if m["role"] == "user"]
        assert users == [f'slow {customers[0]} [[mock:{{"delay_ms": 2000}}]]', "and now?"], users
    finally:
        worker.stop()


def test_admin_send_paced_templates_to_a_list_and_text_only_inside_the_window(wa, graph):
    admin(
        wa,
        "POST",
        "/admin/channels/whatsapp/templates",
        json={"account": "acme", "name": "promo", "variables": ["code"]},
    )
    people = [new_wa_id() for _ in range(3)]
    body = {"account": "acme", "to": people, "template": {"name": "promo", "variables": {"code": "SPRING"}}}
    r = admin(wa, "POST", "/admin/channels/whatsapp/send", json=body)
    assert r.status_code == 202, r.text
    assert [d["to"] for d in r.json()["data"]] == people
    for p in people:
        s = wait_sent(graph, p, 1)[0]
        assert s["type"] == "template" and s["template"]["components"][0]["parameters"][0]["text"] == "SPRING"
    # free text to someone who never wrote: outside the window, held (never attempted)
    stranger = new_wa_id()
    r = admin(wa, "POST", "/admin/channels/whatsapp/send", json={"account": "acme", "to": stranger, "text": "hi!"})
    assert r.status_code == 202
    wait_until(
        lambda: any(
            m["wa_id"] == stranger
            for m in admin(
                wa, "GET", "/admin/channels/whatsapp/messages", params={"account": "acme", "status": "held"}
            ).json()["data"]
        ),
        what="held text",
    )
    assert graph.sent_to(stranger) == []
    # inside the window it is sent
    friend = new_wa_id()
    say(wa, "acme", friend, "hello")
    wait_sent(graph, friend, 1)
    r = admin(wa, "POST", "/admin/channels/whatsapp/send", json={"account": "acme", "to": friend, "text": "news!"})
    assert wait_sent(graph, friend, 2)[1]["text"] == "news!"
    bad = [
        {"account": "acme", "to": "x1", "text": "hi"},
        {"account": "acme", "to": [stranger] * 1001, "text": "hi"},
        {"account": "acme", "to": stranger},
        {"account": "acme", "to": stranger, "text": "hi", "template": {"name": "promo"}},
        {"account": "acme", "to": stranger, "template": {"name": "promo"}},  # its variable is missing
        {"account": "acme", "to": stranger, "text": "hi", "extra": 1},
    ]
    for b in bad:
        r = admin(wa, "POST", "/admin/channels/whatsapp/send", json=b)
        assert r.status_code == 400, (b, r.text)
    assert (
        admin(
            wa, "POST", "/admin/channels/whatsapp/send", json={"account": "zeta", "to": stranger, "text": "x"}
        ).status_code
        == 404
    )


def test_admin_of_another_tenant_does_not_see_the_account(wa):
    r = admin(wa, "POST", "/admin/keys", json={"name": "other-admin", "tenant": "someone-else", "scopes": ["admin"]})
    assert r.status_code == 201, r.text
    key = r.json()["key"]
    r = httpx.get(
        f"{wa.url}/admin/channels/whatsapp/templates",
        params={"account": "acme"},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert r.status_code == 404


# ---- attacks on the webhook ------------------------------------------------------------------


def test_attack_oversized_body_and_batch_are_refused(wa, services):
    wa_id = new_wa_id()
    big = notification([text(wa_id, "x" * 1000)], pnid="1001")
    raw = orjson.dumps(big).replace(b"x" * 1000, b"x" * (1024 * 1024))
    assert post(wa, "acme", None, raw=raw).status_code == 413
    many = notification([text(wa_id, "spam") for _ in range(501)], pnid="1001")
    assert post(wa, "acme", many).status_code == 400
    assert post(wa, "acme", None, raw=b"not json").status_code == 400
    assert post(wa, "acme", {"object": "page", "entry": []}).status_code == 400
    assert rows(services[0], "SELECT 1 FROM whatsapp_conversations WHERE wa_id = $1", wa_id) == []


def test_attack_another_accounts_number_is_ignored(wa, services, graph):
    wa_id = new_wa_id()
    # signed with acme's secret, but for beta's business number: not acme's to answer
    assert post(wa, "acme", notification([text(wa_id, "cross account")], pnid="2002")).status_code == 200
    say(wa, "acme", wa_id, "own number")
    wait_sent(graph, wa_id, 1)
    convs = rows(services[0], "SELECT account, phone_number_id FROM whatsapp_conversations WHERE wa_id = $1", wa_id)
    assert convs == [{"account": "acme", "phone_number_id": "1001"}]
    assert [s["text"] for s in graph.sent_to(wa_id)] == ["echo: own number"]


def test_attack_malformed_messages_are_skipped_not_half_used(wa, graph):
    wa_id = new_wa_id()
    bad = [
        {"from": "not-digits", "id": new_wamid(), "type": "text", "text": {"body": "x"}},
        {"from": wa_id, "id": "wamid with spaces", "type": "text", "text": {"body": "x"}},
        {"from": wa_id, "id": new_wamid(), "type": "image", "image": {"id": "../../etc/passwd"}},
        {"from": wa_id, "id": new_wamid(), "type": "location", "location": {"latitude": "NaN", "longitude": 1}},
        "a string",
    ]
    good = text(wa_id, "the only good one")
    assert post(wa, "acme", notification([*bad, good], pnid="1001")).status_code == 200
    assert [s["text"] for s in wait_sent(graph, wa_id, 1)] == ["echo: the only good one"]


def test_attack_media_ssrf_type_and_size_are_refused(wa, graph, module_mock):
    media = [
        ("8880001", PNG, "image/png", "http://169.254.169.254/latest/meta-data/"),  # off the Graph host
        ("8880002", b"<svg onload=alert(1)>", "image/svg+xml", None),  # not a type passed on
        ("8880003", PNG + b"\0" * 300_000, "image/png", None),  # over media_max_bytes
    ]
    for mid, data, mime, url in media:
        body = {"id": mid, "data_b64": base64.b64encode(data).decode(), "mime_type": mime}
        if url:
            body["url"] = url
        graph._post("/_mock/media", body)
    wa_id = new_wa_id()
    downloads = graph.stats().get("media_downloads", 0)
    for mid, *_ in media:
        msg = {
            "from": wa_id,
            "id": new_wamid(),
            "timestamp": str(int(time.time())),
            "type": "image",
            "image": {"id": mid, "mime_type": "image/png"},
        }
        assert post(wa, "acme", notification([msg], pnid="1001")).status_code == 200
    wait_sent(graph, wa_id, 3)
    contents = [c["messages"][-1]["content"] for c in llm_requests(module_mock, wa_id)]
    assert contents == [
        "[image not shown: media URL is not on an allowed host]",
        "[image not shown: media type not accepted]",
        "[image not shown: media too large]",
    ]
    assert graph.stats().get("media_downloads", 0) == downloads  # not one byte fetched


def test_attack_unknown_or_odd_account_paths(wa):
    raw = orjson.dumps(notification([], pnid="1001"))
    for path in ("nobody", "ACME", "acme%2F..%2Fbeta", "a" * 300, "%00"):
        r = httpx.post(f"{wa.url}/channels/whatsapp/{path}", content=raw, headers={"X-Hub-Signature-256": "sha256=0"})
        assert r.status_code == 404, path
    assert httpx.put(f"{wa.url}/channels/whatsapp/acme", content=raw).status_code == 405


def test_deliverer_sends_a_humans_reply_once_and_only_to_its_own_conversations(wa, graph, services, tmp_root):
    import redis.asyncio as aioredis

    from channels.config import whatsapp_accounts
    from channels.whatsapp import WhatsApp
    from gateway.channels_whatsapp import DeliveryAdapter
    from runtime.delivery import Delivery, Outbound

    wa_id = new_wa_id()
    say(wa, "acme", wa_id, "I want a person")
    wait_sent(graph, wa_id, 1)

    async def go():
        pool = await asyncpg.create_pool(services[0], min_size=1, max_size=2)
        redis = aioredis.from_url(services[1])
        acct = account("acme", graph_base_url=graph.url, api_key="sk-unused-000000")
        channel = WhatsApp(
            whatsapp_accounts({"acme": acct}), redis=redis, pool=pool, data_dir=tmp_root / "data", gateway_url=wa.url
        )
        delivery = Delivery()
        delivery.register("whatsapp", DeliveryAdapter(channel))
        conv = f"wa:1001:{wa_id}"
        try:
            first = await delivery.deliver(
                Outbound(TENANT, "wabot", conv, "A human here. How can I help?", ref="esc_1")
            )
            again = await delivery.deliver(
                Outbound(TENANT, "wabot", conv, "A human here. How can I help?", ref="esc_1")
            )
            unknown = await delivery.deliver(Outbound(TENANT, "wabot", "wa:1001:1", "hello?"))
            other_tenant = await delivery.deliver(Outbound("someone-else", "wabot", conv, "spoofed"))
        finally:
            await channel.stop()
            await redis.aclose()
            await pool.close()
        return first, again, unknown, other_tenant

    first, again, unknown, other_tenant = asyncio.run(go())
    assert first.channel == "whatsapp" and first.status == "sent" and first.detail.startswith("wamid.")
    assert again.channel == "whatsapp" and again.detail is None  # the same reply (ref) is not sent twice
    assert unknown.channel == "api" and other_tenant.channel == "api"  # not this channel's conversations
    assert [s["text"] for s in graph.sent_to(wa_id)] == ["echo: I want a person", "A human here. How can I help?"]


# ---- review (warev): attacks and races found after the first build ------------------------


def _register_reengage(gw: Gateway) -> None:
    body = {"account": "acme", "name": "reengage", "language": "en_US", "variables": ["customer_name", "reply"]}
    assert admin(gw, "POST", "/admin/channels/whatsapp/templates", json=body).status_code == 201


def test_attack_status_naming_an_inbound_wamid_changes_nothing(wa, graph, services):
    wa_id = new_wa_id()
    wamid = say(wa, "acme", wa_id, "my own message")
    wait_sent(graph, wa_id, 1)
    statuses = [
        {"id": wamid, "status": s, "timestamp": str(int(time.time())), "recipient_id": wa_id, "errors": e}
        for s, e in (("read", None), ("failed", [{"code": 131047}]))
    ]
    assert post(wa, "acme", notification([], pnid="1001", statuses=statuses)).status_code == 200
    wait_until(lambda: queue_idle(wa, "wa-status"), what="statuses processed")
    row = rows(
        services[0],
        "SELECT direction, status, error, read_at, failed_at FROM whatsapp_messages WHERE wamid = $1",
        wamid,
    )
    assert row == [{"direction": "in", "status": "received", "error": None, "read_at": None, "failed_at": None}]
    assert len(graph.sent_to(wa_id)) == 1  # and no window template was sent for it


def test_a_window_failure_status_that_beats_the_sends_own_record_still_gets_the_template(wa, graph):
    _register_reengage(wa)
    # Meta's failed status (131047) reaches the webhook and its worker before the sender has
    # recorded the send (the mock posts it, then waits before answering the send)
    graph.configure(statuses=True, status_order=["failed:131047"], status_first_ms=1500)
    try:
        wa_id = new_wa_id()
        say(wa, "acme", wa_id, "race me")
        sent = wait_sent(graph, wa_id, 2, timeout=40)
    finally:
        graph.configure(statuses=False, status_order=["sent", "delivered", "read"], status_first_ms=0)
    assert sent[0]["type"] == "text" and sent[1]["type"] == "template"
    assert [p["text"] for p in sent[1]["template"]["components"][0]["parameters"]] == ["Ada", "echo: race me"]


def test_attack_multiline_reply_and_name_through_the_window_template_are_one_line(wa, graph, services):
    _register_reengage(wa)
    wa_id = new_wa_id()
    msg = text(wa_id, "first line\n\nsecond\tline     spaced", ts=time.time() - 25 * 3600)
    doc = notification([msg], pnid="1001", name="Ada")
    doc["entry"][0]["changes"][0]["value"]["contacts"][0]["profile"]["name"] = "Ada\nLovelace"
    assert post(wa, "acme", doc).status_code == 200
    sent = wait_sent(graph, wa_id, 1)
    assert sent[0]["type"] == "template"  # Meta refuses (132018) a parameter with a new line or a tab
    params = [p["text"] for p in sent[0]["template"]["components"][0]["parameters"]]
    assert params == ["Ada Lovelace", "echo: first line second line spaced"]
    assert graph.stats().get("error_132018", 0) == 0


def test_a_humans_second_reply_in_one_escalation_and_the_same_words_to_another_customer_are_sent(
    wa, graph, services, tmp_root
):
    import redis.asyncio as aioredis

    from channels.config import whatsapp_accounts
    from channels.whatsapp import WhatsApp
    from gateway.channels_whatsapp import DeliveryAdapter
    from runtime.delivery import Delivery, Outbound

    a, b = new_wa_id(), new_wa_id()
    for wa_id in (a, b):
        say(wa, "acme", wa_id, "a person please")
        wait_sent(graph, wa_id, 1)

    async def go():
        pool = await asyncpg.create_pool(services[0], min_size=1, max_size=2)
        redis = aioredis.from_url(services[1])
        acct = account("acme", graph_base_url=graph.url, api_key="sk-unused-000000")
        channel = WhatsApp(
            whatsapp_accounts({"acme": acct}), redis=redis, pool=pool, data_dir=tmp_root / "data", gateway_url=wa.url
        )
        delivery = Delivery()
        delivery.register("whatsapp", DeliveryAdapter(channel))
        try:
            out = []
            for conv, words, ref in (
                (a, "Hello, I am Sam.", "esc_a"),
                (a, "Your refund is on its way.", "esc_a"),  # the same escalation's second reply
                (a, "Your refund is on its way.", "esc_a"),  # delivered again: not a new message
                (b, "Hello, I am Sam.", None),  # the same words, another customer, no ref
            ):
                out.append(await delivery.deliver(Outbound(TENANT, "wabot", f"wa:1001:{conv}", words, ref=ref)))
            return out
        finally:
            await channel.stop()
            await redis.aclose()
            await pool.close()

    out = asyncio.run(go())
    assert [o.status for o in out] == ["sent"] * 4
    assert [o.detail is not None for o in out] == [True, True, False, True]
    assert [s["text"] for s in graph.sent_to(a)][1:] == ["Hello, I am Sam.", "Your refund is on its way."]
    assert [s["text"] for s in graph.sent_to(b)][1:] == ["Hello, I am Sam."]


def test_attack_a_customer_cannot_fill_the_disk_past_the_accounts_media_quota(wa, graph, module_mock, tmp_root):
    first, second = b"%PDF-1.4 first bill 000000000", b"%PDF-1.4 second bill 11111111"  # 29 bytes each, quota 40
    for mid, data in (("7770101", first), ("7770102", second)):
        body = {"id": mid, "data_b64": base64.b64encode(data).decode(), "mime_type": "application/pdf"}
        graph._post("/_mock/media", body)
    wa_id = new_wa_id()
    for n, mid in enumerate(("7770101", "7770102"), 1):
        doc = {
            "from": wa_id,
            "id": new_wamid(),
            "timestamp": str(int(time.time())),
            "type": "document",
            "document": {"id": mid, "mime_type": "application/pdf", "filename": f"bill{n}.pdf"},
        }
        assert post(wa, "beta", notification([doc], pnid="2002")).status_code == 200
        wait_sent(graph, wa_id, n)
    kept, refused = (c["messages"][-1]["content"] for c in llm_requests(module_mock, wa_id))
    assert kept.startswith("[attachment: document 'bill1.pdf'")
    assert refused == "[document not kept: the media storage of this account is full]"
    root = tmp_root / "data" / "channels" / "whatsapp"
    assert len(list(root.rglob(f"{hashlib.sha256(first).hexdigest()}.pdf"))) == 1
    assert list(root.rglob(f"{hashlib.sha256(second).hexdigest()}.pdf")) == []


def test_a_message_arriving_after_a_dead_workers_answer_is_answered_not_absorbed(wa, graph, services):
    """A worker answered a burst of two (the answer is in the turn's state), then died before
    finishing it; a third message arrived meanwhile. The worker taking the turn over resends the
    stored answer for the two and answers the third on its own: it is not swallowed into a turn
    whose answer was made without it."""
    import redis as syncredis

    from channels.whatsapp.sender import STATE_TTL, state_key

    wa_id = new_wa_id()
    say(wa, "burst", wa_id, "hello")  # the conversation exists
    wait_sent(graph, wa_id, 1)
    msgs = [text(wa_id, body) for body in ("first", "second", "third")]
    r = syncredis.Redis.from_url(services[1])
    try:
        skey = state_key("burst", f"turn:{msgs[0]['id']}")
        r.hset(skey, mapping={"started": "1", "reply": "the answer to first and second", "n": "2"})
        r.expire(skey, STATE_TTL)
    finally:
        r.close()
    assert post(wa, "burst", notification(msgs, pnid=PNIDS["burst"])).status_code == 200
    sent = wait_sent(graph, wa_id, 3)
    assert [s["text"] for s in sent] == ["echo: hello", "the answer to first and second", "echo: third"]


def test_attack_replay_of_a_bursts_later_message_after_the_dedupe_expired_is_not_answered_again(wa, graph, services):
    import redis as syncredis

    wa_id = new_wa_id()
    first, second = text(wa_id, "one"), text(wa_id, "two")
    assert post(wa, "burst", notification([first, second], pnid=PNIDS["burst"])).status_code == 200
    assert [s["text"] for s in wait_sent(graph, wa_id, 1)] == ["echo: one\ntwo"]  # one turn for the burst
    # days later the dedupe key has expired; the captured, validly signed notification is replayed
    r = syncredis.Redis.from_url(services[1])
    try:
        digest = hashlib.sha256(f"burst:{second['id']}".encode()).hexdigest()[:32]
        assert r.delete(f"gw:{{gw}}:q:wa-inbound:d:{digest}") == 1
    finally:
        r.close()
    assert post(wa, "burst", notification([second], pnid=PNIDS["burst"])).status_code == 200
    wait_until(lambda: queue_idle(wa, "wa-inbound"), what="the replay processed")
    assert len(graph.sent_to(wa_id)) == 1


@pytest.mark.parametrize("second_piece_late", [False, True])
def test_a_long_answer_whose_pieces_all_fail_for_the_closed_window_goes_whole_as_templates(
    wa, graph, services, second_piece_late
):
    """Both pieces of a long answer fail later with 131047 (the window closed): one set of
    window templates carries the whole answer, each parameter within Meta's 1,024 characters.
    ``second_piece_late``: the mock answers the second piece's send 3 s late, so the first
    piece's failure is handled while the second is on its way (not yet recorded); its templates
    once carried the first piece only (the customer read the answer short)."""
    _register_reengage(wa)
    graph.configure(
        statuses=True, status_order=["failed:131047"], text_answer_delays_ms=[0, 3000] if second_piece_late else []
    )
    try:
        wa_id = new_wa_id()
        say(wa, "acme", wa_id, "Sentence number one. " * 195)  # echoed: two pieces of text
        whole = " ".join(("echo: " + "Sentence number one. " * 195).split())

        def both_failed() -> bool:
            got = rows(
                services[0],
                "SELECT count(*) AS n FROM whatsapp_messages WHERE wa_id = $1 AND kind = 'text' AND status = 'failed'",
                wa_id,
            )
            return got[0]["n"] == 2

        wait_until(both_failed, what="both pieces' failures recorded")
        wait_until(lambda: queue_idle(wa, "wa-status") and queue_idle(wa, "wa-inbound"), what="statuses processed")
    finally:
        graph.configure(statuses=False, status_order=["sent", "delivered", "read"], text_answer_delays_ms=[])
    sent = graph.sent_to(wa_id)
    types = [s["type"] for s in sent]
    assert types[:2] == ["text", "text"] and set(types[2:]) == {"template"}
    replies = [s["template"]["components"][0]["parameters"][1]["text"] for s in sent[2:]]
    assert all(len(r) <= 1024 for r in replies)
    assert " ".join(replies) == whole


def test_a_retry_after_the_window_template_went_sends_no_piece_of_the_answer_again(wa, graph, services):
    """Meta refuses the second free-form piece of a long answer at once (131047): the rest of
    the answer (one short sentence) goes as the window template. The job then fails before it
    ends (its record write fails: a PostgreSQL hiccup; a worker killed there does the same) and
    is retried. The retry took the key's "template" to mean the whole answer went as templates,
    cut the whole text (4,100 characters: five templates) and sent the four it had no field
    for: the customer read most of the answer a second time. Every try of a template key now
    cuts the text its first try sent."""
    _register_reengage(wa)
    wa_id = new_wa_id()
    directive = '[[graph:{"error": 131047, "times": 1}]]'
    body = "Sentence number one. " * 192 + f"The last words {directive} end here."  # echoed: 4,037 + 64
    assert len(body) == 4096
    fail_once = f"""
        CREATE SEQUENCE IF NOT EXISTS s24_fail_once;
        CREATE OR REPLACE FUNCTION s24_fail_once() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.wa_id = '{wa_id}' AND NEW.kind = 'template' AND nextval('s24_fail_once') = 1 THEN
                RAISE EXCEPTION 's24: the record write fails once';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER s24_fail_once BEFORE INSERT ON whatsapp_messages
            FOR EACH ROW EXECUTE FUNCTION s24_fail_once();
    """
    execute(services[0], fail_once)
    try:
        say(wa, "acme", wa_id, body)
        wait_until(lambda: len(graph.sent_to(wa_id)) >= 2, what="the text piece and the template")
        wait_until(lambda: rows(services[0], "SELECT is_called FROM s24_fail_once")[0]["is_called"], what="the failure")
        wait_until(lambda: queue_idle(wa, "wa-inbound"), what="the turn's retry done")
    finally:
        execute(
            services[0],
            "DROP TRIGGER IF EXISTS s24_fail_once ON whatsapp_messages; DROP FUNCTION IF EXISTS s24_fail_once();"
            " DROP SEQUENCE IF EXISTS s24_fail_once",
        )
    sent = graph.sent_to(wa_id)
    assert [s["type"] for s in sent] == ["text", "template"], [s["type"] for s in sent]
    assert sent[1]["template"]["components"][0]["parameters"][1]["text"] == "The last words " + directive + " end here."


def test_the_templates_of_an_answer_whose_pieces_both_failed_reach_the_customer_in_order(wa, graph, services):
    """Both free-form pieces of a long answer fail later for the closed window (131047): each
    failure status is a job of the (unordered) status queue, and both send the answer's window
    templates under one key. The first job's first template was throttled (130429, answered
    late); the second job, finding that piece taken, went on and sent the later pieces, and the
    first piece went last, on the first job's retry: the customer read the answer's beginning
    after its end. The templates of one answer now go out in order."""
    _register_reengage(wa)
    slow_throttle = '[[graph:{"error": 130429, "times": 1, "on": "template", "delay_ms": 2000}]]'
    graph.configure(statuses=True, status_order=["failed:131047"])
    try:
        wa_id = new_wa_id()
        body = slow_throttle + " " + "Sentence number one. " * 191
        body += "z" * (4095 - len(body)) + "."  # echoed: two pieces of text (4,092 and 9 characters)
        say(wa, "acme", wa_id, body)
        whole = " ".join(("echo: " + body).split())

        def params() -> list[str]:
            return [s["template"]["components"][0]["parameters"][1]["text"] for s in graph.sent_to(wa_id)[2:]]

        wait_until(lambda: len(" ".join(params())) >= len(whole), timeout=60, what="the whole answer's templates")
        wait_until(lambda: queue_idle(wa, "wa-status") and queue_idle(wa, "wa-inbound"), what="statuses processed")
    finally:
        graph.configure(statuses=False, status_order=["sent", "delivered", "read"])
    assert [s["type"] for s in graph.sent_to(wa_id)][:2] == ["text", "text"]
    assert " ".join(params()) == whole


def test_an_answer_one_free_form_message_carries_is_not_cut_when_it_goes_as_templates(wa, graph):
    """``max_reply_parts`` bounds the messages of one answer: 1 here, which carries 4,096
    characters of free-form text. Outside the window the answer goes as templates of 1,024
    characters, and their cut was bounded by the same number: the answer one text would have
    carried whole was cut after its first 1,024 characters, the rest dropped without a word
    and the send reported done. The templates now carry what the free-form pieces would."""
    body = {"account": "brief", "name": "reengage", "language": "en_US", "variables": ["reply"]}
    assert admin(wa, "POST", "/admin/channels/whatsapp/templates", json=body).status_code == 201
    wa_id = new_wa_id()
    sentences = " ".join(f"Point {i:02d} of the answer is here." for i in range(70))  # ~2,200 characters
    old = time.time() - 25 * 3600  # its window closed before it was answered
    say(wa, "brief", wa_id, sentences, ts=old)
    whole = "echo: " + sentences

    def params() -> list[str]:
        return [s["template"]["components"][0]["parameters"][0]["text"] for s in graph.sent_to(wa_id)]

    wait_sent(graph, wa_id, 1)
    wait_until(lambda: queue_idle(wa, "wa-inbound"), what="the turn done")
    assert all(s["type"] == "template" for s in graph.sent_to(wa_id))
    assert all(len(p) <= 1024 for p in params())
    assert " ".join(params()) == whole


def test_an_answer_that_reads_pending_reaches_the_customer_as_written(wa, graph, services):
    """The turn's send state holds its answer (``reply``) beside the pieces' fields, whose values
    ``pending`` / ``unknown`` mean a send of unknown fate. An answer that was the word "pending"
    was taken for one: recorded as a send of unknown fate, and rewritten to "unknown" in the
    state, so the retry after a throttled send told the customer "unknown"."""
    wa_id = new_wa_id()
    graph._post("/_mock/faults", {"to": wa_id, "errors": [130429]})
    say(wa, "acme", wa_id, 'Where is my order? [[mock:{"reply": "pending"}]]')
    wait_sent(graph, wa_id, 1)
    wait_until(lambda: queue_idle(wa, "wa-inbound"), what="the turn done")
    assert [s["text"] for s in graph.sent_to(wa_id)] == ["pending"]
    out = rows(services[0], "SELECT status FROM whatsapp_messages WHERE wa_id = $1 AND direction = 'out'", wa_id)
    assert [r["status"] for r in out] == ["sent"]


def test_attack_an_admin_send_retried_with_its_idempotency_key_reaches_each_customer_once(wa, graph):
    admin(
        wa,
        "POST",
        "/admin/channels/whatsapp/templates",
        json={"account": "acme", "name": "promo", "variables": ["code"]},
    )
    people = [new_wa_id() for _ in range(2)]
    body = {"account": "acme", "to": people, "template": {"name": "promo", "variables": {"code": "ONCE"}}}
    key = f"campaign-{uuid.uuid4().hex}"

    def send(doc, idem):
        headers = {"Authorization": f"Bearer {MASTER_KEY}", "Idempotency-Key": idem}
        return httpx.post(f"{wa.url}/admin/channels/whatsapp/send", json=doc, headers=headers, timeout=30)

    first = send(body, key)
    again = send({**body, "to": [*people, "15550009999"]}, key)
    assert first.status_code == again.status_code == 202
    assert [d["job_id"] for d in again.json()["data"][:2]] == [d["job_id"] for d in first.json()["data"]]
    for p in people:
        wait_sent(graph, p, 1)
    wait_until(lambda: queue_idle(wa, "wa-inbound"), what="sends done")
    assert [len(graph.sent_to(p)) for p in people] == [1, 1]
    bad = send(body, "a b")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "Idempotency-Key"


# ---- human in the loop through WhatsApp (issue #15) -------------------------------------------


def test_escalation_holds_the_whatsapp_conversation_and_the_humans_reply_reaches_the_customer(wa, graph, module_mock):
    """A customer asks for a person on WhatsApp: the agent hands over (the hand-off message is
    sent), the customer's next message joins the escalation without a model call (the hold
    message is sent), and the person's reply from the escalation API reaches the customer
    through the Graph API, once."""
    handoff, hold = "A colleague will take over here.", "Noted - a colleague has your conversation."
    settings = {"enabled": True, "threshold": 0.0, "phrases": ["talk to a person"], "team": "wa-desk"}
    r = admin(
        wa,
        "PATCH",
        "/admin/agents/wabot",
        json={"escalation": {**settings, "handoff_message": handoff, "hold_message": hold}},
    )
    assert r.status_code == 200, r.text
    desk = admin(wa, "POST", "/admin/keys", json={"name": "desk", "tenant": TENANT, "scopes": ["admin"]}).json()["key"]

    def as_desk(method: str, path: str, **kw) -> httpx.Response:
        return httpx.request(method, f"{wa.url}{path}", headers={"Authorization": f"Bearer {desk}"}, timeout=30, **kw)

    try:
        wa_id = new_wa_id()
        conv = f"wa:{PNIDS['acme']}:{wa_id}"
        # the agent registry picks the new settings up through pub/sub: retry the first message
        # (each a new wamid) until a hand-off comes back
        for attempt in range(20):
            say(wa, "acme", wa_id, f"I want to talk to a person ({attempt})")
            sent = wait_sent(graph, wa_id, attempt + 1)
            if sent[-1]["text"] == handoff:
                break
            time.sleep(0.25)
        else:
            raise AssertionError(f"no hand-off: {sent}")

        def queued() -> list[dict]:
            got = as_desk("GET", "/admin/escalations", params={"team": "wa-desk"}).json()["data"]
            return [e for e in got if e.get("conversation_id") == conv]

        wait_until(queued, what="the escalation in the queue")
        esc_id = queued()[0]["id"]
        calls = len(llm_requests(module_mock, wa_id))
        say(wa, "acme", wa_id, "Hello? Is anyone there?")
        held = wait_sent(graph, wa_id, len(sent) + 1)
        assert held[-1]["text"] == hold
        assert len(llm_requests(module_mock, wa_id)) == calls  # no model call while a person holds it

        assert as_desk("POST", f"/admin/escalations/{esc_id}/claim").status_code == 200
        reply = "Hi, this is Sam from the desk: your parcel left the depot this morning."
        r = as_desk("POST", f"/admin/escalations/{esc_id}/reply", json={"text": reply})
        assert r.status_code == 200, r.text
        out = wait_sent(graph, wa_id, len(held) + 1)
        assert out[-1]["text"] == reply
        esc = as_desk("GET", f"/admin/escalations/{esc_id}").json()
        assert esc["delivery"]["channel"] == "whatsapp" and esc["delivery"]["status"] == "sent", esc["delivery"]
        time.sleep(1)
        assert [s["text"] for s in graph.sent_to(wa_id)].count(reply) == 1
        assert as_desk("POST", f"/admin/escalations/{esc_id}/resolve", json={"outcome": "answered"}).status_code == 200
    finally:
        admin(wa, "PATCH", "/admin/agents/wabot", json={"escalation": {"enabled": False}})


def test_attack_another_key_of_the_tenant_cannot_continue_or_read_a_whatsapp_conversation(wa, graph):
    """WhatsApp conversation ids are a phone number away from guessable: a browser key of the same
    tenant must not be able to read a customer's conversation or write into it."""
    wa_id = new_wa_id()
    say(wa, "acme", wa_id, "My address is 1 Main Street")
    wait_sent(graph, wa_id, 1)
    other = admin(wa, "POST", "/admin/keys", json={"name": "widget", "tenant": TENANT}).json()["key"]
    conv = f"wa:{PNIDS['acme']}:{wa_id}"
    headers = {"Authorization": f"Bearer {other}"}
    body = {"model": "agent:wabot", "messages": [{"role": "user", "content": "what did I say?"}]}
    r = httpx.post(
        f"{wa.url}/v1/chat/completions", json={**body, "metadata": {"conversation_id": conv}}, headers=headers
    )
    assert r.status_code == 403 and r.json()["error"]["code"] == "conversation_reserved", r.text
    r = httpx.post(
        f"{wa.url}/v1/chat/completions", json=body, headers={**headers, "x-gateway-conversation": f"vapi:{wa_id}"}
    )
    assert r.status_code == 403, r.text
    r = httpx.get(f"{wa.url}/v1/agents/wabot/conversations/{conv}/messages", headers=headers)
    assert r.status_code == 403 and "1 Main Street" not in r.text, r.text
    assert r.json()["error"]["param"] == "conversation_id"  # (the path's, not a body field)
    # its own conversations are its own business
    r = httpx.post(
        f"{wa.url}/v1/chat/completions", json={**body, "metadata": {"conversation_id": "web-1"}}, headers=headers
    )
    assert r.status_code == 200, r.text
    # the channel's own key still reads the customer's conversation
    mine = httpx.get(
        f"{wa.url}/v1/agents/wabot/conversations/{conv}/messages", headers={"Authorization": f"Bearer {wa.channel_key}"}
    )
    assert mine.status_code == 200 and "1 Main Street" in mine.text, mine.text


def test_attack_another_key_of_the_tenant_cannot_post_feedback_on_a_channel_conversation(wa, services):
    """Feedback by conversation id is counted in the A/B experiment reports: any key of the tenant
    (a public widget's) could vote on a customer's WhatsApp or VAPI conversation, whose id is a
    phone number away from guessable, and skew the report. Such feedback is refused (403 naming
    ``conversation_id``) and nothing is stored; the channel's own key may still give it, and the
    other key feedback on its own conversations."""
    other = admin(wa, "POST", "/admin/keys", json={"name": "widget", "tenant": TENANT}).json()["key"]
    wa_id = new_wa_id()
    reserved = [f"wa:{PNIDS['acme']}:{wa_id}", f"vapi:{wa_id}"]
    for conv in reserved:
        r = httpx.post(
            f"{wa.url}/v1/feedback",
            json={"conversation_id": conv, "thumbs": "down", "text": "terrible"},
            headers={"Authorization": f"Bearer {other}"},
        )
        assert r.status_code == 403, r.text
        error = r.json()["error"]
        assert (error["param"], error["code"]) == ("conversation_id", "conversation_reserved"), error
    stored = "SELECT conversation_id FROM feedback WHERE tenant = $1 AND conversation_id = ANY($2::text[])"
    assert rows(services[0], stored, TENANT, reserved) == []

    r = httpx.post(
        f"{wa.url}/v1/feedback",
        json={"conversation_id": reserved[0], "thumbs": "up"},
        headers={"Authorization": f"Bearer {wa.channel_key}"},
    )
    assert r.status_code == 201, r.text
    own = f"web-{uuid.uuid4().hex[:8]}"
    r = httpx.post(
        f"{wa.url}/v1/feedback",
        json={"conversation_id": own, "thumbs": "up"},
        headers={"Authorization": f"Bearer {other}"},
    )
    assert r.status_code == 201, r.text
    kept = rows(services[0], stored, TENANT, [*reserved, own])
    assert sorted(x["conversation_id"] for x in kept) == sorted([reserved[0], own])


# A window template's approved body as Meta's WhatsApp Manager holds it (115 characters of its own).
_BRIEF_BODY = (
    "Hello! Here is our answer to the message you sent us earlier: {{1}} "
    "Reply to this message to go on with the conversation."
)


@pytest.mark.parametrize("registered_body", [True, False])
def test_a_long_answer_goes_as_templates_within_metas_1024_characters_filled_in(wa, graph, registered_body):
    """Meta refuses a template whose body with its parameters filled in runs past 1,024
    characters (132005). An answer outside the window went as templates whose `reply` alone held
    1,024 characters: with the template's own words, every one was refused, and the customer got
    none of the answer. The templates now carry what the body has room for: its own length when
    it was registered with its `body`, else a reserve of 200 characters. The mock knows the
    approved body, as Meta does, and refuses what Meta would."""
    tpl = {"account": "brief", "name": "reengage", "language": "en_US", "variables": ["reply"]}
    registered = {**tpl, "body": _BRIEF_BODY} if registered_body else tpl
    assert admin(wa, "POST", "/admin/channels/whatsapp/templates", json=registered).status_code == 201
    graph.configure(templates={"reengage": _BRIEF_BODY})
    try:
        wa_id = new_wa_id()
        sentences = " ".join(f"Point {i:02d} of the answer is here." for i in range(70))  # ~2,200 characters
        say(wa, "brief", wa_id, sentences, ts=time.time() - 25 * 3600)
        whole = "echo: " + sentences
        wait_sent(graph, wa_id, 1)
        wait_until(lambda: queue_idle(wa, "wa-inbound"), what="the turn done")
    finally:
        graph.configure(templates={})
        assert admin(wa, "POST", "/admin/channels/whatsapp/templates", json=tpl).status_code == 201
    params = [s["template"]["components"][0]["parameters"][0]["text"] for s in graph.sent_to(wa_id)]
    assert all(s["type"] == "template" for s in graph.sent_to(wa_id))
    assert all(len(_BRIEF_BODY.replace("{{1}}", p)) <= 1024 for p in params), [len(p) for p in params]
    assert " ".join(params) == whole
    if registered_body:  # the room is used: no more templates than the body's room needs
        assert len(params) == 3, [len(p) for p in params]


def test_a_template_body_is_checked_when_registered_and_when_sent(wa, graph):
    """A registered `body` numbers one placeholder per variable, in order, within 1,024
    characters; a proactive send whose values would take the filled-in body past Meta's 1,024 is
    a 400 naming the values, before anything is sent."""
    tpl = {"account": "acme", "name": "bodied", "variables": ["name", "code"]}
    for body in (
        "Hi {{1}}, no code here.",
        "Hi {{1}}, {{3}}.",
        "Hi {{2}}, {{1}} and {{3}}.",
        "x {{1}} {{2}}" + "y" * 1020,
    ):
        r = admin(wa, "POST", "/admin/channels/whatsapp/templates", json={**tpl, "body": body})
        assert r.status_code == 400 and r.json()["error"]["param"] == "body", (body[:40], r.text)
    good = "Hi {{1}}, your code is {{2}}. " + "Thanks for staying with us. " * 30  # 870 characters of its own
    made = admin(wa, "POST", "/admin/channels/whatsapp/templates", json={**tpl, "body": good})
    assert made.status_code == 201 and made.json()["body"] == good
    listed = admin(wa, "GET", "/admin/channels/whatsapp/templates", params={"account": "acme"}).json()["data"]
    assert [t["body"] for t in listed if t["name"] == "bodied"] == [good]
    to = new_wa_id()
    send = {
        "account": "acme",
        "to": to,
        "template": {"name": "bodied", "variables": {"name": "Ann", "code": "x" * 200}},
    }
    r = admin(wa, "POST", "/admin/channels/whatsapp/send", json=send)
    assert r.status_code == 400 and r.json()["error"]["param"] == "template.variables", r.text
    send["template"]["variables"]["code"] = "SPRING"
    assert admin(wa, "POST", "/admin/channels/whatsapp/send", json=send).status_code == 202
    assert wait_sent(graph, to, 1)[0]["type"] == "template"
    assert (
        admin(wa, "GET", "/admin/channels/whatsapp/messages", params={"account": "acme", "to": to}).status_code == 200
    )
