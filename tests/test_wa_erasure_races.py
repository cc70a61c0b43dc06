"""Sends to a WhatsApp customer that race their conversation's erasure keep nothing of the
customer, and an erasure through one agent leaves no other agent's state of the customer behind.

- A person's reply to an escalation checked the escalation, then stored and sent the reply: an
  erasure in between left the reply stored under the conversation's id (the customer's number) as
  a new conversation, and the deliverer, finding no channel state (the erasure deleted it),
  reported the reply "stored" though the customer never got it. Now the reply is refused (409
  ``conversation_erased``, naming the escalation) and nothing of it is kept.
- A reply, or an admin's send, still out at Graph when the erasure landed wrote its record (the
  number, the words) and the channel's state after the erasure. Now every send path reads the
  erasure's mark once its send is over and what the send wrote goes as the erasure's own did.
- The conversation id is the customer's (``wa:<phone_number_id>:<wa_id>``) whichever agent served
  it: an erasure through agent X deleted the channel's state of the customer but left agent Y's
  conversation and its open escalation naming the number. Now it erases the customer's
  conversation with every agent of the tenant.

The reply is paused right after its escalation check by a gateway launched with
``gateway.admin_escalations.EscalationAdmin._send`` wrapped (it waits for a Redis key the test sets); a
send is held open at the mock Graph API until the test releases it. The real stack: that gateway
process with its channel worker, the mock LLM, the mock Graph API."""

from __future__ import annotations

import hashlib
import textwrap
import threading
import uuid
from pathlib import Path

import httpx
import orjson
import pytest
import redis

from channels.whatsapp import inflight, sender
from runtime.memory import keys as memory_keys
from tests.conftest import (
    LOCAL_HTTP,
    MASTER_KEY,
    Gateway,
    environ,
    run_cli,
    wait_until,
)
from tests.test_channels_whatsapp import notification, post, rows, text
from tests.test_wa_dead_letters_erasure import DEAD, _account, _tag

RUN = uuid.uuid4().hex[:6]
TENANT, OTHER = f"warace-a-{RUN}", f"warace-b-{RUN}"
PNID, OTHER_PNID = "8401", "8402"
SECRET, OTHER_SECRET = "warace-app-secret-0001", "warace-app-secret-0002"
ASK_PERSON = "I want to talk to a person please"
GATE = "test:reply-pause:"
HANDOFF = "A person will answer."
FALLBACK = "Sorry, something went wrong; a person will get back to you."
NOTHING = {"whatsapp_messages": [], "whatsapp_conversations": [], "conversations": []}
ENV = {
    "GATEWAY_CHANNEL_WORKER": "1",
    "GATEWAY_WA_VISIBILITY_TIMEOUT": "90",  # (a send held at Graph is not taken over meanwhile)
    "GATEWAY_WA_MAX_RETRIES": "1",
    "GATEWAY_WA_BACKOFF": "0.2",
}

LAUNCHER = textwrap.dedent(
    """
    import asyncio
    import os
    import sys

    import redis.asyncio as aioredis

    from gateway import admin  # (first: admin_escalations is imported by it)
    from gateway import admin_escalations

    GATE = "test:reply-pause:"
    _client = []


    def _redis():
        if not _client:
            _client.append(aioredis.from_url(os.environ["REDIS_URL"]))
        return _client[0]


    _send = admin_escalations.EscalationAdmin._send


    async def send(self, request, esc, text, *args):
        # (after the escalation's check, its transaction over: before the reply is stored and sent)
        gate = GATE + esc["id"]
        if await _redis().delete(gate + ":armed"):
            await _redis().set(gate + ":held", "1", ex=300)
            for _ in range(1200):  # bounded: the test lets it go on
                if await _redis().exists(gate + ":go"):
                    break
                await asyncio.sleep(0.05)
        return await _send(self, request, esc, text, *args)


    admin_escalations.EscalationAdmin._send = send

    from runtime import memory

    _forget_recent = memory.Memory.forget_recent


    async def forget_recent(self, tenant, agent_id, conversation_id):
        # (an erasure paused after its mark and memory step, before its transaction)
        out = await _forget_recent(self, tenant, agent_id, conversation_id)
        gate = "test:erasure-pause:" + conversation_id
        if await _redis().delete(gate + ":armed"):
            await _redis().set(gate + ":held", "1", ex=300)
            for _ in range(1200):  # bounded: the test lets it go on
                if await _redis().exists(gate + ":go"):
                    break
                await asyncio.sleep(0.05)
        return out


    memory.Memory.forget_recent = forget_recent

    from channels.whatsapp import erasure

    _after_send = erasure.after_send


    async def after_send(redis, pool, tenant, conversation, *args):
        # (PostgreSQL failing as the send's check would clean up: once, when the test arms it)
        if await _redis().delete("test:after-send-fails:" + conversation):
            raise OSError("the check failed (test)")
        # (the process killed between the send and its check: nothing after the send runs)
        if await _redis().delete("test:after-send-never:" + conversation):
            return False
        # (the process killed there for real: its in-flight note is left)
        if await _redis().delete("test:after-send-dies:" + conversation):
            os.kill(os.getpid(), 9)
        return await _after_send(redis, pool, tenant, conversation, *args)


    erasure.after_send = after_send

    from gateway.cli import main

    sys.exit(main())
    """
)


class PausingGateway(Gateway):
    """``gateway serve`` (its channel worker on) whose replies pause after their escalation check
    when the test arms it."""

    def __init__(self, tmp: Path, config: dict, urls: tuple[str, str], env: dict | None = None) -> None:
        env = {**ENV, **(env or {})}
        super().__init__(tmp, config, urls, launcher=LAUNCHER, launcher_name="reply_pausing_gateway", env=env)


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock, graph):
    keys = {}
    for tenant, var in ((TENANT, "WARACE_KEY_A"), (OTHER, "WARACE_KEY_B")):
        out = run_cli("keys", "create", "--name", "whatsapp", "--tenant", tenant, urls=services, tmp=tmp_root)
        assert out.returncode == 0, out.stderr
        keys[var] = out.stdout.splitlines()[0].strip()
    config = {
        "router": {"max_attempts": 1, "circuit": {"failures": 1_000_000}},
        "providers": [{"name": "llm", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k"]}],
        "models": [{"name": "agent-model", "deployments": [{"provider": "llm", "model": "m"}]}],
        "channels": {
            "whatsapp": {
                "alpha": {**_account(TENANT, PNID, SECRET, "WARACE_KEY_A", graph.url), "fallback_message": FALLBACK},
                "bravo": _account(OTHER, OTHER_PNID, OTHER_SECRET, "WARACE_KEY_B", graph.url),
            }
        },
    }
    with environ(keys):
        g = PausingGateway(tmp_root, config, services)
    g.keys, g.config = keys, config
    try:
        for tenant in (TENANT, OTHER):
            for name in ("wabot", "wabot2"):  # wabot answers the business numbers; wabot2 is another agent
                body = {
                    "name": name,
                    "tenant": tenant,
                    "model": "agent-model",
                    "template": "You help.",
                    "variables": {},
                    "escalation": {"enabled": True, "threshold": 0.5, "handoff_message": HANDOFF},
                }
                r = _admin(g, "POST", "/admin/agents", json=body)
                assert r.status_code == 201, r.text
        yield g
    finally:
        g.stop()


# ---- helpers ------------------------------------------------------------------------------------
def _record(services, wamid: str) -> list[dict]:
    """The message record of ``wamid`` in the module's tenant: who it names, and its words."""
    sql = "SELECT conversation_id, wa_id, body FROM whatsapp_messages WHERE tenant = $1 AND wamid = $2"
    return rows(services[0], sql, TENANT, wamid)


def _tagged(conv: str) -> list[dict]:
    """``_record`` of a message of ``conv`` after its erasure: the tag, no number, no words."""
    tag = _tag(TENANT, conv)
    return [{"conversation_id": tag, "wa_id": tag, "body": None}]


def _admin(gw, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, f"{gw.url}{path}", headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=90, **kw)


def _wa_id() -> str:
    return str(uuid.uuid4().int % 10**12 + 10**11)


def _say(gw, pnid: str, wa_id: str, words: str) -> None:
    acct, secret = ("alpha", SECRET) if pnid == PNID else ("bravo", OTHER_SECRET)
    r = post(gw, acct, notification([text(wa_id, words)], pnid=pnid), secret=secret)
    assert r.status_code == 200, r.text


def _erase(gw, tenant: str, conversation: str, agent: str = "wabot") -> httpx.Response:
    quoted = conversation.replace(":", "%3A")
    return _admin(gw, "DELETE", f"/admin/agents/{agent}/conversations/{quoted}", params={"tenant": tenant})


def _texts(graph, wa_id: str) -> list[str]:
    return [s.get("text") or "" for s in graph.sent_to(wa_id) if s["type"] == "text"]


def _escalations(services, tenant: str, conversations: list[str]) -> list[dict]:
    return rows(
        services[0],
        """SELECT e.id, a.name AS agent, e.conversation_id, e.status, e.outcome, e.question
           FROM escalations e JOIN agents a ON a.id = e.agent_id
           WHERE e.tenant = $1 AND e.conversation_id = ANY($2::text[]) ORDER BY e.created_at""",
        tenant,
        conversations,
    )


def _escalated(gw, graph, services, wa_id: str) -> str:
    """The customer asks for a person: the escalation's id (claimed), once the handoff reached them."""
    conv = f"wa:{PNID}:{wa_id}"
    _say(gw, PNID, wa_id, ASK_PERSON)
    wait_until(lambda: _escalations(services, TENANT, [conv]), what="the escalation")
    wait_until(lambda: HANDOFF in _texts(graph, wa_id), what="the handoff message sent")
    esc = _escalations(services, TENANT, [conv])[0]["id"]
    assert _admin(gw, "POST", f"/admin/escalations/{esc}/claim").status_code == 200
    return esc


def _naming(services, tenant: str, number: str) -> dict[str, list]:
    """What the tenant's channel records and conversation memory hold of the number."""
    like = f"%{number}%"
    return {
        "whatsapp_messages": rows(
            services[0],
            """SELECT wamid, direction, body FROM whatsapp_messages
               WHERE tenant = $1 AND (wa_id = $2 OR conversation_id LIKE $3)""",
            tenant,
            number,
            like,
        ),
        "whatsapp_conversations": rows(
            services[0],
            "SELECT conversation_id FROM whatsapp_conversations WHERE tenant = $1 AND conversation_id LIKE $2",
            tenant,
            like,
        ),
        "conversations": rows(
            services[0],
            "SELECT agent_id FROM conversations WHERE tenant = $1 AND external_id LIKE $2",
            tenant,
            like,
        ),
    }


def _window(services, tenant: str, agent: str, conversation: str) -> list[bytes]:
    agent_id = rows(services[0], "SELECT id FROM agents WHERE tenant = $1 AND name = $2", tenant, agent)[0]["id"]
    r = redis.Redis.from_url(services[1])
    try:
        return r.lrange(memory_keys(tenant, agent_id, conversation)[0], 0, -1)
    finally:
        r.close()


def _hold_next_text(graph, wa_id: str) -> None:
    """The next free-form text to the number is answered only once the test releases it."""
    graph.configure(text_answer_delays_ms=[0] * len(_texts(graph, wa_id)) + [-1])


def _release(graph) -> None:
    LOCAL_HTTP.post(f"{graph.url}/_mock/release").raise_for_status()


def _in_thread(fn) -> tuple[threading.Thread, list]:
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    return t, out


# ---- the races ----------------------------------------------------------------------------------
def test_a_reply_whose_conversation_is_erased_after_its_check_is_refused_and_keeps_nothing(gw, graph, services):
    """The erasure runs to its end between the reply's escalation check and its store and send:
    the reply is refused (409 ``conversation_erased``, naming the escalation), it reaches neither
    the memory (no new conversation under the number) nor the customer, and the admin is not told
    it was stored."""
    ada = _wa_id()
    conv = f"wa:{PNID}:{ada}"
    esc = _escalated(gw, graph, services, ada)
    r = redis.Redis.from_url(services[1])
    r.set(f"{GATE}{esc}:armed", "1", ex=300)
    words = f"a person answers {uuid.uuid4().hex[:8]}"
    t, out = _in_thread(lambda: _admin(gw, "POST", f"/admin/escalations/{esc}/reply", json={"text": words}))
    try:
        wait_until(lambda: r.exists(f"{GATE}{esc}:held"), what="the reply paused after its check")
        assert _erase(gw, TENANT, conv).status_code == 200
    finally:
        r.set(f"{GATE}{esc}:go", "1", ex=300)
        t.join(90)
        r.close()
    assert out and out[0].status_code == 409, out and out[0].text
    err = out[0].json()["error"]
    assert err["code"] == "conversation_erased" and esc in err["message"], err
    assert words not in _texts(graph, ada)
    assert _naming(services, TENANT, ada) == NOTHING
    assert _window(services, TENANT, "wabot", conv) == []
    held = rows(
        services[0],
        "SELECT count(*) AS n FROM messages WHERE tenant = $1 AND content::text LIKE $2",
        TENANT,
        f"%{words}%",
    )
    assert held == [{"n": 0}]


def test_a_reply_while_the_erasure_is_under_way_is_refused_and_keeps_nothing(gw, graph, services):
    """The erasure began (its mark set, its memory step done) and has not committed when the
    reply comes: the escalation is still open, the channel's state still there. The reply is the
    erased conversation's: refused (409 ``conversation_erased``), not sent, not kept."""
    ada = _wa_id()
    conv = f"wa:{PNID}:{ada}"
    esc = _escalated(gw, graph, services, ada)
    words = f"a person answers {uuid.uuid4().hex[:8]}"
    out = _reply_while_erasure_paused(gw, services, conv, esc, words)
    assert out.status_code == 409, out.text
    err = out.json()["error"]
    assert err["code"] == "conversation_erased" and esc in err["message"], err
    assert words not in _texts(graph, ada)
    assert _naming(services, TENANT, ada) == NOTHING
    assert _window(services, TENANT, "wabot", conv) == []


def _reply_while_erasure_paused(gw, services, conv: str, esc: str, words: str, agent: str = "wabot"):
    """A person's reply sent while the erasure of ``conv`` (through ``agent``) is paused before its
    transaction (the launcher's gate, its memory step done); the erasure then goes on and
    succeeds. The reply's response."""
    gate = f"test:erasure-pause:{conv}"
    r = redis.Redis.from_url(services[1])
    r.set(f"{gate}:armed", "1", ex=300)
    t, erased = _in_thread(lambda: _erase(gw, TENANT, conv, agent=agent))
    try:
        wait_until(lambda: r.exists(f"{gate}:held"), what="the erasure paused before its transaction")
        out = _admin(gw, "POST", f"/admin/escalations/{esc}/reply", json={"text": words})
    finally:
        r.set(f"{gate}:go", "1", ex=300)
        t.join(90)
        r.close()
    assert erased and erased[0].status_code == 200, erased and erased[0].text
    return out


def test_a_reply_out_at_graph_when_the_erasure_lands_keeps_no_number(gw, graph, services):
    """The reply's send is held open at Graph while the erasure runs: the customer has the message
    (the admin is told it was sent), but its record, written after the erasure, holds the tag
    without the words, and no channel state of the number is left."""
    out = _reply_out_at_graph_while_erased(gw, graph, services)
    assert out.json()["delivery"]["status"] == "sent"


def test_a_reply_whose_process_dies_before_its_post_send_check_keeps_no_number(gw, graph, services):
    """As above, but the gateway serving the reply is killed (SIGKILL) once the send is over and
    before its check (``erasure.after_send``): nothing retries a person's reply, so the record the
    send wrote after the erasure kept the customer's number and the words. Its record is written
    as the erasure's own were left, whatever runs after it. (The kill is emulated by the launcher:
    the check never runs, as after a kill; the module's gateway serves the other tests.)"""
    r = redis.Redis.from_url(services[1])
    try:
        _reply_out_at_graph_while_erased(gw, graph, services, never_checked=r)
    finally:
        r.close()


def test_a_reply_whose_process_is_killed_before_its_check_leaves_no_send_state_or_alias(
    tmp_root, gw, graph, services, monkeypatch
):
    """A person's reply held open at Graph while its conversation is erased, Meta answering for the
    number with another WhatsApp id; the gateway serving it is killed (SIGKILL) once the send is over,
    before its post-send check. Its send state (the pieces' wamids, 8 days) and the alias of the
    customer's number (90 days), written after the erasure, stayed in Redis: nothing retried that
    path. Now the send was noted in flight before it went, and a live channel worker runs the check
    of the note whose lease ran out (the test ends the lease: the victim's is long)."""
    monkeypatch.setenv("GATEWAY_MASTER_KEY", MASTER_KEY)  # (names keyed as the gateway keys them)
    ada, alt = _wa_id(), _wa_id()
    conv = f"wa:{PNID}:{ada}"
    esc = _escalated(gw, graph, services, ada)
    words = f"a person answers {uuid.uuid4().hex[:8]}"
    with environ(gw.keys):
        victim = PausingGateway(tmp_root, gw.config, services, env={"GATEWAY_WA_DELIVERY_LEASE": "600"})
    r = redis.Redis.from_url(services[1])
    try:
        r.set(f"test:after-send-dies:{conv}", "1", ex=300)
        graph.configure(wa_ids={ada: alt})  # (Meta names the customer otherwise: an alias is kept)
        _hold_next_text(graph, ada)
        t, _ = _in_thread(
            lambda: _quietly(lambda: _admin(victim, "POST", f"/admin/escalations/{esc}/reply", json={"text": words}))
        )
        try:
            wait_until(lambda: words in _texts(graph, ada), what="the reply's POST at Graph")
            assert _erase(gw, TENANT, conv).status_code == 200
        finally:
            _release(graph)
            t.join(90)
        assert victim.proc.wait(30) == -9  # (killed between its send and its check)
        digest = hashlib.sha256(f"{conv}|{esc}|{words}".encode()).hexdigest()[:32]
        left = [
            sender.state_key("alpha", f"deliver:human_reply:{digest}"),
            sender.alias_key("alpha", PNID, ada),
            sender.index_key(TENANT, conv),
            sender.alias_index_key(TENANT, conv),
        ]
        assert r.exists(*left), "the dead reply's send wrote no state: nothing tried"
        for note in r.zrange(inflight.KEY, 0, -1):  # (its lease ended: the victim is dead)
            if inflight.names(note, TENANT, conv):
                r.zadd(inflight.KEY, {note: 0})
        try:
            wait_until(lambda: r.exists(*left) == 0, what="the dead reply's send state and alias forgotten")
        except TimeoutError:
            raise AssertionError([k for k in left if r.exists(k)]) from None
        assert [n for n in r.zrange(inflight.KEY, 0, -1) if inflight.names(n, TENANT, conv)] == []
    finally:
        r.delete(f"test:after-send-dies:{conv}")
        graph.configure(text_answer_delays_ms=[], wa_ids={})
        victim.stop()
        r.close()
    wamid = next(s["wamid"] for s in graph.sent_to(ada) if s.get("text") == words)
    assert _record(services, wamid) == _tagged(conv)
    assert _naming(services, TENANT, ada) == NOTHING


def _quietly(fn):
    try:
        return fn()
    except httpx.HTTPError as exc:  # (its process was killed under it)
        return exc


def _reply_out_at_graph_while_erased(gw, graph, services, never_checked=None):
    """A person's reply held open at Graph while its conversation is erased; then its record holds
    the tag without the words, and no channel state of the number is left. ``never_checked`` (a
    Redis client): the launcher skips the send's post-send check, as after a kill. The reply's
    response."""
    ada = _wa_id()
    conv = f"wa:{PNID}:{ada}"
    esc = _escalated(gw, graph, services, ada)
    words = f"a person answers {uuid.uuid4().hex[:8]}"
    if never_checked is not None:
        never_checked.set(f"test:after-send-never:{conv}", "1", ex=300)
    _hold_next_text(graph, ada)
    try:
        t, out = _in_thread(lambda: _admin(gw, "POST", f"/admin/escalations/{esc}/reply", json={"text": words}))
        try:
            wait_until(lambda: words in _texts(graph, ada), what="the reply's POST at Graph")
            assert _erase(gw, TENANT, conv).status_code == 200
        finally:
            _release(graph)
            t.join(90)
    finally:
        graph.configure(text_answer_delays_ms=[])
        if never_checked is not None:
            never_checked.delete(f"test:after-send-never:{conv}")
    assert out and out[0].status_code == 200, out and out[0].text
    wamid = next(s["wamid"] for s in graph.sent_to(ada) if s.get("text") == words)
    assert _record(services, wamid) == _tagged(conv)
    assert _naming(services, TENANT, ada) == NOTHING
    if never_checked is None:  # (its send state, made anew by the send after the erasure, is gone too)
        digest = hashlib.sha256(f"{conv}|{esc}|{words}".encode()).hexdigest()[:32]
        r = redis.Redis.from_url(services[1])
        try:
            assert not r.exists(sender.state_key("alpha", f"deliver:human_reply:{digest}"))
        finally:
            r.close()
    return out[0]


def test_an_admin_send_out_at_graph_when_the_erasure_lands_keeps_no_number(gw, graph, services):
    """An admin's send (``POST /admin/channels/whatsapp/send``) held open at Graph while the
    erasure runs: its record and the conversation state it made again are written after the
    erasure; they go as the erasure's own did. Another customer's conversation keeps its own."""
    ada, bob = _wa_id(), _wa_id()
    for who in (ada, bob):
        _say(gw, PNID, who, "hello")
        wait_until(lambda who=who: _texts(graph, who), what="the answer")
    conv = f"wa:{PNID}:{ada}"
    wait_until(lambda: _naming(services, TENANT, bob)["conversations"], what="bob's conversation in PostgreSQL")
    bobs = _naming(services, TENANT, bob)
    words = f"an admin writes {uuid.uuid4().hex[:8]}"
    _hold_next_text(graph, ada)
    try:
        body = {"account": "alpha", "to": ada, "text": words}
        r = _admin(gw, "POST", "/admin/channels/whatsapp/send", json=body)
        assert r.status_code in (200, 202), r.text
        wait_until(lambda: words in _texts(graph, ada), what="the send's POST at Graph")
        assert _erase(gw, TENANT, conv).status_code == 200
    finally:
        _release(graph)
        graph.configure(text_answer_delays_ms=[])
    wamid = next(s["wamid"] for s in graph.sent_to(ada) if s.get("text") == words)
    wait_until(
        lambda: _record(services, wamid) == _tagged(conv),
        what="the send's record tagged",
    )
    assert _naming(services, TENANT, ada) == NOTHING
    assert _naming(services, TENANT, bob) == bobs


# ---- one customer, two agents -------------------------------------------------------------------
def _rest_turn(gw, key: str, agent: str, conv: str, wa_id: str, words: str) -> httpx.Response:
    """A turn of another agent on the customer's conversation id, with the channel's key."""
    headers = {"Authorization": f"Bearer {key}", "x-gateway-user": wa_id, "x-gateway-customer": wa_id}
    body = {
        "model": f"agent:{agent}",
        "messages": [{"role": "user", "content": words}],
        "metadata": {"conversation_id": conv},
    }
    return httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers, timeout=60)


def test_erasing_through_one_agent_erases_the_customers_conversation_with_every_agent(gw, graph, services):
    """The customer talked to wabot (the business number's agent) and to wabot2 (the same
    conversation id), and asked wabot2 for a person. Erased through wabot: wabot2's conversation,
    its window and its escalation no longer hold the number (the escalation holds the tag,
    resolved ``erased``), as wabot's and the channel's state do not. Another customer and the
    other tenant's same number keep theirs."""
    ada, bob = _wa_id(), _wa_id()
    conv, bobs_conv = f"wa:{PNID}:{ada}", f"wa:{PNID}:{bob}"
    _say(gw, PNID, ada, "hello")
    wait_until(lambda: _texts(graph, ada), what="wabot's answer")
    for who, c in ((ada, conv), (bob, bobs_conv)):
        assert _rest_turn(gw, gw.keys["WARACE_KEY_A"], "wabot2", c, who, "hello two").status_code == 200
        assert _rest_turn(gw, gw.keys["WARACE_KEY_A"], "wabot2", c, who, ASK_PERSON).status_code == 200
    other_conv = f"wa:{OTHER_PNID}:{ada}"
    assert _rest_turn(gw, gw.keys["WARACE_KEY_B"], "wabot2", other_conv, ada, ASK_PERSON).status_code == 200
    wait_until(lambda: _escalations(services, TENANT, [conv]), what="wabot2's escalation")
    wait_until(
        lambda: len(_naming(services, TENANT, ada)["conversations"]) == 2,
        what="both agents' conversations in PostgreSQL",
    )
    opened = _escalations(services, TENANT, [conv])
    assert [e["agent"] for e in opened] == ["wabot2"]
    bobs = _escalations(services, TENANT, [bobs_conv])
    others = _escalations(services, OTHER, [other_conv])
    assert len(bobs) == 1 and len(others) == 1

    assert _erase(gw, TENANT, conv, agent="wabot").status_code == 200

    assert _escalations(services, TENANT, [conv]) == []
    closed = _escalations(services, TENANT, [_tag(TENANT, conv)])
    assert [(e["id"], e["agent"], e["status"], e["outcome"], e["question"]) for e in closed] == [
        (opened[0]["id"], "wabot2", "resolved", "erased", None)
    ]
    assert _naming(services, TENANT, ada) == NOTHING
    assert _window(services, TENANT, "wabot2", conv) == [] and _window(services, TENANT, "wabot", conv) == []
    # the customer's next turn with wabot2 is answered (no hold left by the escalation)
    again = _rest_turn(gw, gw.keys["WARACE_KEY_A"], "wabot2", conv, ada, "hello again")
    assert again.status_code == 200 and "x-gateway-escalation" not in again.headers, again.text
    assert _escalations(services, TENANT, [bobs_conv]) == bobs
    assert _window(services, TENANT, "wabot2", bobs_conv) != []
    assert _escalations(services, OTHER, [other_conv]) == others


def _letters(services, wa_id: str) -> list[dict]:
    """The inbound queue's dead letters naming the number."""
    r = redis.Redis.from_url(services[1])
    try:
        return [p for _, f in r.xrange(DEAD) if (p := orjson.loads(f[b"m"])["payload"]).get("wa_id") == wa_id]
    finally:
        r.close()


def _erased_sends(gw) -> float:
    """The worker's count of the account's turns and sends dropped for an erasure (``/metrics``)."""
    r = httpx.get(f"{gw.url}/metrics", headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=30)
    prefix = 'gateway_whatsapp_turns_total{account="alpha",outcome="erased"}'
    return sum(float(line.split()[-1]) for line in r.text.splitlines() if line.startswith(prefix))


def test_an_admin_send_graph_refuses_as_the_erasure_lands_leaves_no_dead_letter(gw, graph, services):
    """An admin's send that Graph refuses (a client error: the job dies, no retry) while the
    erasure runs: its dead letter, written after the erasure dropped the conversation's, held
    the number and the words. Now the failed send reads the mark too, and its job ends without a
    dead letter."""
    ada = _wa_id()
    _say(gw, PNID, ada, "hello")
    wait_until(lambda: _texts(graph, ada), what="the answer")
    conv = f"wa:{PNID}:{ada}"
    before = _erased_sends(gw)
    refused = LOCAL_HTTP.get(f"{graph.url}/_mock/stats").json().get("error_131026", 0)
    words = 'an admin writes [[graph:{"error": 131026, "delay_ms": -1}]]'
    try:
        r = _admin(gw, "POST", "/admin/channels/whatsapp/send", json={"account": "alpha", "to": ada, "text": words})
        assert r.status_code in (200, 202), r.text
        wait_until(
            lambda: LOCAL_HTTP.get(f"{graph.url}/_mock/stats").json().get("error_131026", 0) > refused,
            what="the send's POST at Graph",
        )
        assert _erase(gw, TENANT, conv).status_code == 200
    finally:
        _release(graph)
    # (over either way: dropped for the erasure, or dead after its last try)
    wait_until(lambda: _erased_sends(gw) > before or _letters(services, ada), what="the failed send's job over")
    assert _letters(services, ada) == []
    assert _naming(services, TENANT, ada) == NOTHING


def test_a_reply_graph_fails_as_the_erasure_lands_is_not_queued_for_later(gw, graph, services):
    """The reply's send fails at Graph (a server error, held open) while the erasure runs: it used
    to go on the conversation's queue, as a job queued after the erasure's mark, so the worker sent
    it later and made the customer's channel state again. Now the failed send reads the mark: the
    reply is refused (409 ``conversation_erased``) and nothing of it is queued or kept."""
    ada = _wa_id()
    conv = f"wa:{PNID}:{ada}"
    esc = _escalated(gw, graph, services, ada)
    failed = LOCAL_HTTP.get(f"{graph.url}/_mock/stats").json().get("error_500", 0)
    words = f'a person answers {uuid.uuid4().hex[:8]} [[graph:{{"error": 500, "delay_ms": -1}}]]'
    t, out = _in_thread(lambda: _admin(gw, "POST", f"/admin/escalations/{esc}/reply", json={"text": words}))
    try:
        wait_until(
            lambda: LOCAL_HTTP.get(f"{graph.url}/_mock/stats").json().get("error_500", 0) > failed,
            what="the reply's POST at Graph",
        )
        assert _erase(gw, TENANT, conv).status_code == 200
    finally:
        _release(graph)
        t.join(90)
    assert out and out[0].status_code == 409, out and out[0].text
    assert out[0].json()["error"]["code"] == "conversation_erased"
    # The customer writes again: their conversation's queue is ordered, so once this is answered
    # a job queued before it for the reply would have been sent (the directive fails once only).
    _say(gw, PNID, ada, "hello again")
    wait_until(lambda: "echo: hello again" in _texts(graph, ada), what="the new conversation answered")
    assert words not in _texts(graph, ada)
    sql = "SELECT count(*) AS n FROM whatsapp_messages WHERE tenant = $1 AND body = $2"
    assert rows(services[0], sql, TENANT, words) == [{"n": 0}]


def test_an_admin_send_whose_later_piece_fails_as_the_erasure_lands_keeps_no_number(gw, graph, services):
    """An admin's send of two pieces: the first is held open at Graph while the erasure runs, then
    answered (its record written after the erasure, with the words and the number), the second is
    refused (the job dies). The failed send's check tagged only the records without a wamid: the
    first piece's record kept the number and the words. Now every piece the send's states hold is
    tagged too."""
    ada = _wa_id()
    _say(gw, PNID, ada, "hello")
    wait_until(lambda: _texts(graph, ada), what="the answer")
    conv = f"wa:{PNID}:{ada}"
    before = _erased_sends(gw)
    head = f"First piece {uuid.uuid4().hex[:8]}."
    words = head + " Filler words here." * 215 + 'second piece [[graph:{"error": 131026}]]'
    _hold_next_text(graph, ada)
    try:
        r = _admin(gw, "POST", "/admin/channels/whatsapp/send", json={"account": "alpha", "to": ada, "text": words})
        assert r.status_code in (200, 202), r.text
        wait_until(lambda: any(t.startswith(head) for t in _texts(graph, ada)), what="the first piece's POST")
        assert _erase(gw, TENANT, conv).status_code == 200
    finally:
        _release(graph)
        graph.configure(text_answer_delays_ms=[])
    wait_until(lambda: _erased_sends(gw) > before or _letters(services, ada), what="the failed send's job over")
    wamid = next(s["wamid"] for s in graph.sent_to(ada) if (s.get("text") or "").startswith(head))
    assert _record(services, wamid) == _tagged(conv)
    assert _letters(services, ada) == []
    assert _naming(services, TENANT, ada) == NOTHING


def test_a_reply_to_a_conversation_erased_days_ago_is_not_refused(gw, graph, services):
    """The customer's conversation was erased (its mark is kept 8 days); the customer wrote again
    and asked for a person, of the business number's agent and of an agent the tenant made after
    the erasure. The reply's check took the erasure for one not committed yet when it found no
    record of it at or after the mark: but the erasure marks the conversation again once it has
    committed (its second channel step), so after every erasure that finished, every reply to the
    conversation was refused (409 ``conversation_erased``) until the mark expired — and an agent
    made since has no record of it at all. Now a reply is refused only when its escalation was
    there when the erasure's mark was set (the erased conversation's, not resolved yet)."""
    ada = _wa_id()
    conv = f"wa:{PNID}:{ada}"
    _say(gw, PNID, ada, "hello")
    wait_until(lambda: _texts(graph, ada), what="the answer")
    assert _erase(gw, TENANT, conv).status_code == 200
    esc = _escalated(gw, graph, services, ada)
    words = f"a person answers {uuid.uuid4().hex[:8]}"
    r = _admin(gw, "POST", f"/admin/escalations/{esc}/reply", json={"text": words})
    assert r.status_code == 200, r.text
    assert r.json()["delivery"]["status"] == "sent" and words in _texts(graph, ada)

    name = f"wanew{uuid.uuid4().hex[:6]}"
    body = {
        "name": name,
        "tenant": TENANT,
        "model": "agent-model",
        "template": "You help.",
        "variables": {},
        "escalation": {"enabled": True, "threshold": 0.5, "handoff_message": HANDOFF},
    }
    assert _admin(gw, "POST", "/admin/agents", json=body).status_code == 201
    assert _rest_turn(gw, gw.keys["WARACE_KEY_A"], name, conv, ada, ASK_PERSON).status_code == 200
    wait_until(lambda: [e for e in _escalations(services, TENANT, [conv]) if e["agent"] == name], what="escalation")
    esc = next(e["id"] for e in _escalations(services, TENANT, [conv]) if e["agent"] == name)
    assert _admin(gw, "POST", f"/admin/escalations/{esc}/claim").status_code == 200
    words = f"a person answers again {uuid.uuid4().hex[:8]}"
    r = _admin(gw, "POST", f"/admin/escalations/{esc}/reply", json={"text": words})
    assert r.status_code == 200, r.text
    assert r.json()["delivery"]["status"] == "sent" and words in _texts(graph, ada)


def test_a_send_whose_erasure_check_failed_is_cleaned_when_its_retry_is_dropped(gw, graph, services):
    """An admin's send held open at Graph while the erasure runs; once it is answered (its record
    written after the erasure, with the number and the words) its check fails (PostgreSQL away
    for a moment; a worker stopped there is the same): the job is tried again, and that try,
    queued before the erasure, is dropped — leaving the first try's record naming the number.
    Now a dropped job that was tried before cleans what its tries wrote, as the check would
    have."""
    ada = _wa_id()
    _say(gw, PNID, ada, "hello")
    wait_until(lambda: _texts(graph, ada), what="the answer")
    conv = f"wa:{PNID}:{ada}"
    before = _erased_sends(gw)
    words = f"an admin writes {uuid.uuid4().hex[:8]}"
    r = redis.Redis.from_url(services[1])
    _hold_next_text(graph, ada)
    try:
        body = {"account": "alpha", "to": ada, "text": words}
        assert _admin(gw, "POST", "/admin/channels/whatsapp/send", json=body).status_code in (200, 202)
        wait_until(lambda: words in _texts(graph, ada), what="the send's POST at Graph")
        assert _erase(gw, TENANT, conv).status_code == 200
        r.set(f"test:after-send-fails:{conv}", "1", ex=300)
    finally:
        _release(graph)
        graph.configure(text_answer_delays_ms=[])
    wait_until(lambda: not r.exists(f"test:after-send-fails:{conv}"), what="the failed check")
    wait_until(lambda: _erased_sends(gw) > before or _letters(services, ada), what="the retry dropped")
    r.close()
    wamid = next(s["wamid"] for s in graph.sent_to(ada) if s.get("text") == words)
    wait_until(
        lambda: _record(services, wamid) == _tagged(conv),
        what="the send's record tagged",
    )
    assert _letters(services, ada) == []
    assert _naming(services, TENANT, ada) == NOTHING


def test_a_fallback_message_out_at_graph_when_the_erasure_lands_keeps_no_number(gw, graph, services):
    """The customer's turn dies (the model refuses it) and the account's fallback message goes out
    (``Worker.on_dead``), held open at Graph while the erasure runs: its record, written after
    the erasure, held the number and the words, and the conversation's channel state was made
    again — the one send path that did not read the erasure's mark once it was over. Now it does."""
    ada = _wa_id()
    conv = f"wa:{PNID}:{ada}"
    _say(gw, PNID, ada, "hello")
    wait_until(lambda: _texts(graph, ada), what="the answer")
    _hold_next_text(graph, ada)
    try:
        _say(gw, PNID, ada, 'this fails [[mock:{"status": 400}]]')
        wait_until(lambda: FALLBACK in _texts(graph, ada), what="the fallback's POST at Graph")
        assert _erase(gw, TENANT, conv).status_code == 200
    finally:
        _release(graph)
        graph.configure(text_answer_delays_ms=[])
    wamid = next(s["wamid"] for s in graph.sent_to(ada) if s.get("text") == FALLBACK)
    wait_until(
        lambda: _record(services, wamid) == _tagged(conv),
        what="the fallback's record tagged",
    )
    assert _naming(services, TENANT, ada) == NOTHING


# ---- an API client's conversation ---------------------------------------------------------------
def _api_escalated(gw, services) -> tuple[str, str]:
    """An API client's conversation with wabot2 (no channel marks it) asks for a person: its id and
    the escalation's (claimed)."""
    conv = f"api-{uuid.uuid4().hex[:8]}"
    asked = _rest_turn(gw, gw.keys["WARACE_KEY_A"], "wabot2", conv, _wa_id(), ASK_PERSON)
    assert asked.status_code == 200, asked.text
    wait_until(lambda: _escalations(services, TENANT, [conv]), what="the escalation")
    esc = _escalations(services, TENANT, [conv])[0]["id"]
    assert _admin(gw, "POST", f"/admin/escalations/{esc}/claim").status_code == 200
    return conv, esc


def _kept_words(services, words: str) -> list[dict]:
    return rows(
        services[0],
        "SELECT count(*) AS n FROM messages WHERE tenant = $1 AND content::text LIKE $2",
        TENANT,
        f"%{words}%",
    )


def test_a_reply_to_an_api_conversation_erased_after_its_check_is_refused_and_keeps_nothing(gw, services):
    """As for a WhatsApp customer: the erasure of an API client's conversation runs to its end
    between the reply's escalation check and its store. The reply was stored under the id after
    the erasure (a new conversation holding the person's words about the erased one); now it is
    refused (409 ``conversation_erased``) and nothing of it is kept."""
    conv, esc = _api_escalated(gw, services)
    r = redis.Redis.from_url(services[1])
    r.set(f"{GATE}{esc}:armed", "1", ex=300)
    words = f"a person answers {uuid.uuid4().hex[:8]}"
    t, out = _in_thread(lambda: _admin(gw, "POST", f"/admin/escalations/{esc}/reply", json={"text": words}))
    try:
        wait_until(lambda: r.exists(f"{GATE}{esc}:held"), what="the reply paused after its check")
        assert _erase(gw, TENANT, conv, agent="wabot2").status_code == 200
    finally:
        r.set(f"{GATE}{esc}:go", "1", ex=300)
        t.join(90)
        r.close()
    assert out and out[0].status_code == 409, out and out[0].text
    err = out[0].json()["error"]
    assert err["code"] == "conversation_erased" and esc in err["message"], err
    assert _window(services, TENANT, "wabot2", conv) == []
    assert _kept_words(services, words) == [{"n": 0}]


def test_a_reply_to_an_api_conversation_while_its_erasure_is_under_way_is_refused(gw, services):
    """The erasure began (its memory step done) and has not committed when the reply comes (the
    escalation still open): the reply is the erased conversation's, refused and not kept."""
    conv, esc = _api_escalated(gw, services)
    words = f"a person answers {uuid.uuid4().hex[:8]}"
    out = _reply_while_erasure_paused(gw, services, conv, esc, words, agent="wabot2")
    assert out.status_code == 409, out.text
    assert out.json()["error"]["code"] == "conversation_erased"
    assert _window(services, TENANT, "wabot2", conv) == []
    assert _kept_words(services, words) == [{"n": 0}]
