"""A WhatsApp turn that reaches the gateway while (or after) its conversation is erased stores
nothing: the worker checks the erasure's mark before it calls the gateway, but an erasure landing
between that check and the gateway's memory read made the gateway answer the customer's message
from before the erasure as the first turn of a new conversation, and store it (memory, the run,
the ledger row naming the number), in the clear, after the erasure.

The worker now sends the message's queue time signed (``x-gateway-queued-at``,
``core.queued_proof``); the gateway refuses (409 ``conversation_erased``) a turn whose conversation
was erased since, before any model call or store, and its memory store refuses one erased while it
was answered. These tests place the erasure exactly there: they call the gateway themselves with
the header the worker sends (signed for a time before an erasure they have just done), and run the
worker's own turn in this process with the erasure made after its check.

The real stack: a gateway process (its channel worker off), the mock LLM, the mock Graph API."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import threading
import time
import urllib.parse
import uuid

import httpx
import openai
import pytest
import redis

from core import erasure_key, queued_proof
from runtime.memory import keys as memory_keys
from tests.conftest import MASTER_KEY, Gateway, environ, run_cli, wait_until
from tests.test_channels_whatsapp import rows
from tests.test_wa_dead_letters_erasure import _account as _shared_account
from tests.test_wa_dead_letters_erasure import _holding

TENANT = f"waq-a-{uuid.uuid4().hex[:6]}"
OTHER = f"waq-b-{uuid.uuid4().hex[:6]}"
PNID, OTHER_PNID = "8101", "8202"
TOKEN = "graph-token-test"
KEY = erasure_key._key("", MASTER_KEY, "")  # the gateway's erasure key (derived from its master key)
SLOW = ' [[mock:{"delay_ms": 3000}]]'  # the mock LLM takes 3 s over this turn


def _account(tenant: str, pnid: str, key_var: str, graph_url: str) -> dict:
    return _shared_account(tenant, pnid, f"app-secret-{pnid}-0001", key_var, graph_url)


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock, graph):
    keys = {}
    for tenant, var in ((TENANT, "WAQ_KEY_A"), (OTHER, "WAQ_KEY_B"), (TENANT, "WAQ_PLAIN")):
        out = run_cli("keys", "create", "--name", var.lower(), "--tenant", tenant, urls=services, tmp=tmp_root)
        assert out.returncode == 0, out.stderr
        keys[var] = out.stdout.splitlines()[0].strip()
    config = {
        "router": {"max_attempts": 1},
        "providers": [{"name": "llm", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k"]}],
        "models": [{"name": "agent-model", "deployments": [{"provider": "llm", "model": "m"}]}],
        "channels": {
            "whatsapp": {
                "alpha": _account(TENANT, PNID, "WAQ_KEY_A", graph.url),
                "bravo": _account(OTHER, OTHER_PNID, "WAQ_KEY_B", graph.url),
            }
        },
    }
    with environ({"GATEWAY_CHANNEL_WORKER": "0", **keys}):
        g = Gateway(tmp_root, config, services)
    g.keys = keys
    try:
        for tenant in (TENANT, OTHER):
            body = {
                "name": "wabot",
                "tenant": tenant,
                "model": "agent-model",
                "template": "You help {{ customer_number }}.",
                "variables": {"customer_number": {"type": "string", "required": False}},
            }
            r = _admin(g, "POST", "/admin/agents", json=body)
            assert r.status_code == 201, r.text
        yield g
    finally:
        g.stop()


# ---- helpers ------------------------------------------------------------------------------------
def _admin(gw: Gateway, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, f"{gw.url}{path}", headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=30, **kw)


def _wa_id() -> str:
    return str(uuid.uuid4().int % 10**12 + 10**11)


def _erase(gw: Gateway, tenant: str, conversation: str) -> None:
    quoted = urllib.parse.quote(conversation, safe="")
    r = _admin(gw, "DELETE", f"/admin/agents/wabot/conversations/{quoted}", params={"tenant": tenant})
    assert r.status_code == 200, r.text


def _redis_now(services) -> int:
    """Redis's clock in µs: the clock a job's queue time and an erasure's mark are on."""
    r = redis.Redis.from_url(services[1])
    try:
        sec, usec = r.time()
        return sec * 1_000_000 + usec
    finally:
        r.close()


def _turn(gw: Gateway, key: str, conv: str, wa_id: str, words: str, queued: str | None) -> httpx.Response:
    """The turn as the worker sends it (``channels.gateway_client``)."""
    headers = {"Authorization": f"Bearer {key}", "x-gateway-user": wa_id, "x-gateway-customer": wa_id}
    if queued is not None:
        headers[queued_proof.HEADER] = queued
    body = {
        "model": "agent:wabot",
        "messages": [{"role": "user", "content": words}],
        "metadata": {"conversation_id": conv},
        "variables": {"customer_number": wa_id, "channel": "whatsapp"},
    }
    return httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers, timeout=60)


def _agent_id(services, tenant: str) -> str:
    return rows(services[0], "SELECT id FROM agents WHERE tenant = $1 AND name = 'wabot'", tenant)[0]["id"]


def _in_memory(services, tenant: str, conv: str) -> bool:
    """Whether Redis holds the conversation's window (a stored turn puts it there before answering)."""
    window, _ = memory_keys(tenant, _agent_id(services, tenant), conv)
    r = redis.Redis.from_url(services[1])
    try:
        return bool(r.exists(window, f"{window}:w"))
    finally:
        r.close()


def _in_postgres(services, tenant: str, conv: str) -> bool:
    found = rows(services[0], "SELECT 1 FROM conversations WHERE tenant = $1 AND external_id = $2", tenant, conv)
    return bool(found)


def _ledger_row(services, request_id: str) -> dict:
    sql = "SELECT status, error_code, conversation_id, end_user, customer FROM ledger WHERE request_id = $1"
    wait_until(lambda: rows(services[0], sql, request_id), what="the refused turn's ledger row")
    return rows(services[0], sql, request_id)[0]


def _answered(gw: Gateway, conv: str, wa_id: str) -> None:
    """An earlier turn of the conversation, answered and stored."""
    r = _turn(gw, gw.keys["WAQ_KEY_A"], conv, wa_id, "hello", None)
    assert r.status_code == 200, r.text


# ---- the proof list -----------------------------------------------------------------------------
@pytest.mark.parametrize("first", [True, False], ids=["first_turn", "later_turn"])
def test_a_turn_queued_before_an_erasure_that_reaches_the_gateway_after_it_is_refused_and_stores_nothing(
    gw, services, module_mock, first
):
    wa_id = _wa_id()
    conv = f"wa:{PNID}:{wa_id}"
    if not first:
        _answered(gw, conv, wa_id)
    queued_us = _redis_now(services)  # the customer's message is queued; the worker checks: not erased
    _erase(gw, TENANT, conv)  # the erasure lands now, before the gateway reads the conversation
    before = len(module_mock.requests())
    r = _turn(gw, gw.keys["WAQ_KEY_A"], conv, wa_id, "my card is 4111", queued_proof.sign(TENANT, conv, queued_us, KEY))
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "conversation_erased"
    assert wa_id not in r.text
    assert len(module_mock.requests()) == before  # no model call
    # its audit record is kept (a refusal is recorded) under the conversation's tag, not the number
    tag = erasure_key.conversation_tag(TENANT, conv, KEY)
    row = _ledger_row(services, r.headers["x-request-id"])
    assert row == {
        "status": 409,
        "error_code": "conversation_erased",
        "conversation_id": None,
        "end_user": tag,
        "customer": tag,
    }
    assert not _in_memory(services, TENANT, conv)
    assert not _in_postgres(services, TENANT, conv)
    assert _holding(services, TENANT, wa_id) == {"ledger": [], "runs": []}


def test_the_refusal_is_an_openai_conflict_for_the_sdk(gw, services):
    wa_id = _wa_id()
    conv = f"wa:{PNID}:{wa_id}"
    queued_us = _redis_now(services)
    _erase(gw, TENANT, conv)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.keys["WAQ_KEY_A"], max_retries=0)
    with pytest.raises(openai.ConflictError) as caught:
        client.chat.completions.create(
            model="agent:wabot",
            messages=[{"role": "user", "content": "hello"}],
            extra_body={"metadata": {"conversation_id": conv}},
            extra_headers={queued_proof.HEADER: queued_proof.sign(TENANT, conv, queued_us, KEY)},
        )
    assert caught.value.code == "conversation_erased"
    assert not _in_memory(services, TENANT, conv)


def test_a_first_turn_whose_conversation_is_erased_while_it_is_answered_is_not_stored(gw, services, module_mock):
    """The erasure comes after the gateway read the (empty) conversation, while the model answers:
    the turn's store refuses it (the seq floor that guards a conversation that held messages
    cannot: there were none)."""
    wa_id = _wa_id()
    conv = f"wa:{PNID}:{wa_id}"
    queued = queued_proof.sign(TENANT, conv, _redis_now(services), KEY)
    out: list[httpx.Response] = []
    call = threading.Thread(
        target=lambda: out.append(_turn(gw, gw.keys["WAQ_KEY_A"], conv, wa_id, "my card is 4111" + SLOW, queued))
    )
    call.start()
    try:
        wait_until(
            lambda: any(wa_id in str(r["body"].get("messages")) for r in module_mock.requests()),
            what="the model asked",
        )
        _erase(gw, TENANT, conv)
    finally:
        call.join(60)
    assert out and out[0].status_code == 200, out and out[0].text  # (the worker drops the answer: erased since)
    assert not _in_memory(services, TENANT, conv)
    assert not _in_postgres(services, TENANT, conv)


def test_a_message_queued_after_the_erasure_is_answered_and_stored(gw, services):
    """The customer writes again after the erasure: a new conversation, served as before."""
    wa_id = _wa_id()
    conv = f"wa:{PNID}:{wa_id}"
    _answered(gw, conv, wa_id)
    _erase(gw, TENANT, conv)
    queued = queued_proof.sign(TENANT, conv, _redis_now(services), KEY)
    r = _turn(gw, gw.keys["WAQ_KEY_A"], conv, wa_id, "hello again", queued)
    assert r.status_code == 200, r.text
    assert _in_memory(services, TENANT, conv)
    wait_until(lambda: _in_postgres(services, TENANT, conv), what="the new conversation stored")


def _forged(conv: str, wa_id: str, now: int) -> dict[str, str]:
    good = queued_proof.sign(TENANT, conv, now, KEY)
    later = now + 60_000_000
    return {
        "garbage": "yesterday",
        "no_proof": str(later),
        "tampered_time": f"{later}.{good.split('.')[1]}",
        "tampered_proof": good[:-1] + ("0" if good[-1] != "0" else "1"),
        "another_conversation": queued_proof.sign(TENANT, f"wa:{PNID}:{_wa_id()}", later, KEY),
        "another_tenant": queued_proof.sign(OTHER, conv, later, KEY),
        "another_key": queued_proof.sign(TENANT, conv, later, b"not the deployment's key"),
        "the_erasure_key_itself": f"{later}."
        + hmac.new(KEY, f"{TENANT}\x00{conv}\x00{later}".encode(), hashlib.sha256).hexdigest(),
    }


@pytest.mark.parametrize(
    "how",
    [
        "garbage",
        "no_proof",
        "tampered_time",
        "tampered_proof",
        "another_conversation",
        "another_tenant",
        "another_key",
        "the_erasure_key_itself",
    ],
)
def test_attack_a_forged_queue_time_is_refused_and_stores_nothing(gw, services, module_mock, how):
    """A client of the tenant (the channel's key leaked, say) that makes its turn look queued after
    an erasure would store the erased conversation's words again: a queue time the deployment did
    not sign for this tenant's conversation is refused with 400 naming the header."""
    wa_id = _wa_id()
    conv = f"wa:{PNID}:{wa_id}"
    now = _redis_now(services)
    _erase(gw, TENANT, conv)
    before = len(module_mock.requests())
    r = _turn(gw, gw.keys["WAQ_KEY_A"], conv, wa_id, "words", _forged(conv, wa_id, now)[how])
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == queued_proof.HEADER and err["type"] == "invalid_request_error"
    assert len(module_mock.requests()) == before
    assert not _in_memory(services, TENANT, conv)


def test_attack_a_queue_time_is_honoured_only_on_a_channel_conversation_of_a_channel_key(gw, services):
    wa_id = _wa_id()
    conv = f"wa:{PNID}:{wa_id}"
    queued = queued_proof.sign(TENANT, conv, _redis_now(services), KEY)
    # another key of the tenant may not hold the channel's conversations at all
    r = _turn(gw, gw.keys["WAQ_PLAIN"], conv, wa_id, "words", queued)
    assert r.status_code == 403, r.text
    # on a conversation of no channel the header means nothing a client should send
    plain = f"support-{uuid.uuid4().hex[:8]}"
    r = _turn(gw, gw.keys["WAQ_PLAIN"], plain, wa_id, "words", queued_proof.sign(TENANT, plain, 1, KEY))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == queued_proof.HEADER
    assert not _in_memory(services, TENANT, plain)
    # the other tenant's channel key with this tenant's signed header, on its own id of the number
    other_conv = f"wa:{OTHER_PNID}:{wa_id}"
    r = _turn(gw, gw.keys["WAQ_KEY_B"], other_conv, wa_id, "words", queued)
    assert r.status_code == 400, r.text


# ---- the worker ---------------------------------------------------------------------------------
def test_the_worker_sends_the_queue_time_and_drops_the_turn_the_gateway_refuses(gw, graph, services, tmp_path):
    """The worker's own turn, in this process, against the real gateway: the erasure is made after
    the worker's check and before its call (its gateway client's ``turn``). The gateway refuses the
    turn; the worker drops the job (no send, no retry, no dead letter: the ``erased`` outcome) and
    the gateway stored nothing of it."""
    import asyncpg
    import redis.asyncio as aioredis

    from channels.config import whatsapp_accounts
    from channels.whatsapp import metrics
    from channels.whatsapp.channel import WhatsApp
    from core.queue import Job

    wa_id = _wa_id()
    conv = f"wa:{PNID}:{wa_id}"
    raw = _account(TENANT, PNID, "WAQ_KEY_A", graph.url) | {"api_key": gw.keys["WAQ_KEY_A"]}
    accounts = whatsapp_accounts({"alpha": raw})
    erased = metrics.turns.get("alpha", "erased")
    payload = {
        "kind": "in", "account": "alpha", "tenant": TENANT, "pnid": PNID, "display": "15550008101",
        "wa_id": wa_id, "name": "Ada", "wamid": f"wamid.Q{uuid.uuid4().hex}", "ts": time.time(), "type": "text",
        "text": "my card is 4111", "media": None, "reply_id": None,
    }  # fmt: skip

    async def main() -> tuple[int, float]:
        r = aioredis.from_url(services[1])
        pool = await asyncpg.create_pool(services[0], min_size=1, max_size=4)
        channel = WhatsApp(accounts, redis=r, pool=pool, data_dir=tmp_path, gateway_url=gw.url, redis_url=services[1])
        real_turn = channel.gateway.turn
        sent_headers: list[str | None] = []

        async def turn(**kw):
            sent_headers.append(kw.get("queued_at"))
            await asyncio.to_thread(_erase, gw, TENANT, conv)  # after the worker's check
            return await real_turn(**kw)

        channel.gateway.turn = turn
        counted = erased._value.get()
        try:
            sec, usec = await r.time()
            job = Job("job-1", payload, f"alpha:{PNID}:{wa_id}", 1, time.time(), sec * 1_000_000 + usec)
            await channel.worker.handle(job)  # (raises on a retry or a fatal failure)
        finally:
            await channel.stop()
            await pool.close()
            await r.aclose()
        assert sent_headers and sent_headers[0] is not None
        assert queued_proof.verify(sent_headers[0], TENANT, conv) == job.queued_us
        return erased._value.get() - counted

    assert os.environ.get("GATEWAY_ERASURE_KEY") is None  # (this process signs with the gateway's key)
    with environ({"GATEWAY_MASTER_KEY": MASTER_KEY, "GATEWAY_DATA_DIR": str(tmp_path)}):
        assert asyncio.run(main()) == 1
    assert graph.sent_to(wa_id) == []
    # the gateway refused it (its audit record, under the conversation's tag) and stored nothing
    tag = erasure_key.conversation_tag(TENANT, conv, KEY)
    refused = "SELECT 1 FROM ledger WHERE tenant = $1 AND status = 409 AND end_user = $2 AND customer = $2"
    wait_until(lambda: rows(services[0], refused, TENANT, tag), what="the refused turn's ledger row")
    assert not _in_memory(services, TENANT, conv)
    assert not _in_postgres(services, TENANT, conv)
    words = "SELECT body FROM whatsapp_messages WHERE tenant = $1 AND conversation_id = $2 AND body IS NOT NULL"
    assert rows(services[0], words, TENANT, conv) == []
    assert _holding(services, TENANT, wa_id) == {"ledger": [], "runs": []}


def test_a_worker_whose_erasure_key_is_not_the_gateways_still_gets_its_turns_answered(gw, services):
    """A channel worker run apart from the gateway without its erasure key (no
    ``GATEWAY_ERASURE_KEY`` nor ``GATEWAY_MASTER_KEY``) signs with a key of its own: the gateway
    refuses the header (400), and the worker's client sends the turn again without it (as before
    the header existed, logged) instead of failing every turn into the fallback message."""
    from channels.gateway_client import UNPROVEN, GatewayClient

    unproven = UNPROVEN._value.get()
    wa_id = _wa_id()
    conv = f"wa:{PNID}:{wa_id}"
    queued = queued_proof.sign(TENANT, conv, _redis_now(services), b"the worker's own data-dir key")

    async def main():
        client = GatewayClient(gw.url)
        try:
            return await client.turn(
                api_key=gw.keys["WAQ_KEY_A"],
                agent="wabot",
                conversation_id=conv,
                content="hello",
                variables={"customer_number": wa_id},
                customer=wa_id,
                queued_at=queued,
            )
        finally:
            await client.close()

    assert asyncio.run(main()).text == "echo: hello"
    assert _in_memory(services, TENANT, conv)
    # the hole it leaves open is counted, not only logged: an operator can alert on it
    assert UNPROVEN._value.get() == unproven + 1


def test_a_turn_sent_again_with_another_queue_time_gets_the_first_answer(gw, services, module_mock):
    """The queue time answers or refuses a turn, it shapes no answer: the same turn (Idempotency-Key)
    first tried without it (a worker before the upgrade) or with another is replayed, not refused
    with 422 (which would end the customer's turn with the fallback message)."""
    wa_id = _wa_id()
    conv = f"wa:{PNID}:{wa_id}"
    body = {
        "model": "agent:wabot",
        "messages": [{"role": "user", "content": "hello"}],
        "metadata": {"conversation_id": conv},
    }
    base = {"Authorization": f"Bearer {gw.keys['WAQ_KEY_A']}", "Idempotency-Key": f"wa-{uuid.uuid4().hex}"}
    url = f"{gw.url}/v1/chat/completions"
    first = httpx.post(url, json=body, headers=base, timeout=60)
    assert first.status_code == 200, first.text
    queued = queued_proof.sign(TENANT, conv, _redis_now(services), KEY)
    again = httpx.post(url, json=body, headers={**base, queued_proof.HEADER: queued}, timeout=60)
    assert again.status_code == 200, again.text
    assert again.headers.get("x-gateway-idempotent-replay") == "true"
    assert again.json()["choices"] == first.json()["choices"]


def test_a_first_turn_erased_while_it_is_answered_opens_no_escalation(gw, services, module_mock):
    """A first turn that asks for a person, its conversation erased while the model answers: the
    escalation would keep the customer's words (its question, the draft) in PostgreSQL after the
    erasure and hold the customer's next conversation for a person. The check that stops a turn
    that loaded a conversation holding messages cannot (it loaded none); the signed queue time
    and the channel's mark do."""
    name = f"wahitl{uuid.uuid4().hex[:6]}"
    body = {
        "name": name,
        "tenant": TENANT,
        "model": "agent-model",
        "template": "You help.",
        "escalation": {"enabled": True, "threshold": 0.5},
    }
    r = _admin(gw, "POST", "/admin/agents", json=body)
    assert r.status_code == 201, r.text
    wa_id = _wa_id()
    conv = f"wa:{PNID}:{wa_id}"
    queued = queued_proof.sign(TENANT, conv, _redis_now(services), KEY)
    headers = {
        "Authorization": f"Bearer {gw.keys['WAQ_KEY_A']}",
        "x-gateway-user": wa_id,
        "x-gateway-customer": wa_id,
        queued_proof.HEADER: queued,
    }
    turn = {
        "model": f"agent:{name}",
        "messages": [{"role": "user", "content": f"talk to a person: my card is 4111 ({wa_id})" + SLOW}],
        "metadata": {"conversation_id": conv},
    }
    out: list[httpx.Response] = []
    call = threading.Thread(
        target=lambda: out.append(httpx.post(f"{gw.url}/v1/chat/completions", json=turn, headers=headers, timeout=60))
    )
    call.start()
    try:
        wait_until(
            lambda: any(wa_id in str(q["body"].get("messages")) for q in module_mock.requests()),
            what="the model asked",
        )
        quoted = urllib.parse.quote(conv, safe="")
        r = _admin(gw, "DELETE", f"/admin/agents/{name}/conversations/{quoted}", params={"tenant": TENANT})
        assert r.status_code == 200, r.text
    finally:
        call.join(60)
    assert out and out[0].status_code == 200, out and out[0].text
    assert "x-gateway-escalation" not in out[0].headers
    sql = "SELECT id, question FROM escalations WHERE tenant = $1 AND conversation_id = $2"
    assert rows(services[0], sql, TENANT, conv) == []
