"""An erased WhatsApp conversation leaves its customer's number in none of the channel's records.

A WhatsApp conversation's id is ``wa:<phone_number_id>:<wa_id>``, and ``wa_id`` is the customer's
phone number. After an erasure (the admin API) its message records keep their statuses under the
erasure's tag (conversation and customer), its channel state (``whatsapp_conversations``) is gone,
its escalations hold the tag (an open one resolved), the queues' dead letters naming it are
dropped, and the Redis aliases of the number are deleted. Another conversation — another customer,
the same customer on the account's other business number, another tenant's — keeps everything.
A customer who writes again is answered as a new conversation.

The real stack: a gateway process with the channel worker inside, two tenants' accounts, the mock
Graph API (loadtest/mock_graph.py, posting delivery statuses back) and the mock LLM."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import pytest
import redis

from tests.conftest import MASTER_KEY, Gateway, environ, run_cli, wait_until
from tests.test_channels_whatsapp import notification, post, rows, text
from tests.test_wa_dead_letters_erasure import _account, _admin, _erase, _tag, _wa_id

RUN = uuid.uuid4().hex[:6]
TENANT_A = f"wanum-a-{RUN}"
TENANT_B = f"wanum-b-{RUN}"
PNID_A, PNID_A2, PNID_B = "8101", "8102", "8202"
SECRET_A, SECRET_B = "wanum-app-secret-0001", "wanum-app-secret-0002"
TOKEN = "graph-token-test"
TEAM = f"wanum-{RUN}"
ASK_PERSON = "I want to talk to a person please"
ENV = {
    "GATEWAY_CHANNEL_WORKER": "1",
    "GATEWAY_WA_VISIBILITY_TIMEOUT": "2",
    "GATEWAY_WA_MAX_RETRIES": "1",
    "GATEWAY_WA_BACKOFF": "0.2",
}


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock, graph):
    keys = {}
    for tenant, var in ((TENANT_A, "WANUM_KEY_A"), (TENANT_B, "WANUM_KEY_B")):
        out = run_cli("keys", "create", "--name", "whatsapp", "--tenant", tenant, urls=services, tmp=tmp_root)
        assert out.returncode == 0, out.stderr
        keys[var] = out.stdout.splitlines()[0].strip()
    config = {
        "router": {"max_attempts": 1, "circuit": {"failures": 1_000_000}},
        "hitl": {"sweep_interval_s": 0.2},
        "providers": [{"name": "llm", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k"]}],
        "models": [{"name": "agent-model", "deployments": [{"provider": "llm", "model": "m"}]}],
        "channels": {
            "whatsapp": {
                # tenant A's account serves two business numbers: one customer, two conversations
                "alpha": _account(TENANT_A, [PNID_A, PNID_A2], SECRET_A, "WANUM_KEY_A", graph.url),
                "bravo": _account(TENANT_B, [PNID_B], SECRET_B, "WANUM_KEY_B", graph.url),
            }
        },
    }
    with environ({**ENV, **keys}):
        g = Gateway(tmp_root, config, services)
    try:
        for tenant in (TENANT_A, TENANT_B):
            body = {
                "name": "wabot",
                "tenant": tenant,
                "model": "agent-model",
                "template": "You help.",
                "variables": {},
                "escalation": {"enabled": True, "threshold": 0.5, "team": TEAM, "hold_message": "Hold on."},
            }
            r = _admin(g, "POST", "/admin/agents", json=body)
            assert r.status_code == 201, r.text
        # delivery statuses of alpha's sends come back to its webhook, as Meta's do
        graph.configure(webhook_url=f"{g.url}/channels/whatsapp/alpha", app_secret=SECRET_A, statuses=True)
        yield g
    finally:
        graph.configure(statuses=False, webhook_url="")
        g.stop()


# ---- helpers ------------------------------------------------------------------------------------
SECRETS = {"alpha": SECRET_A, "bravo": SECRET_B}
PNIDS = {PNID_A: "alpha", PNID_A2: "alpha", PNID_B: "bravo"}


def _say(gw: Gateway, pnid: str, wa_id: str, words: str) -> None:
    acct = PNIDS[pnid]
    r = post(gw, acct, notification([text(wa_id, words)], pnid=pnid), secret=SECRETS[acct])
    assert r.status_code == 200, r.text


def _status(gw: Gateway, pnid: str, wamid: str, status: str, recipient: str, errors: list | None = None) -> None:
    st = {"id": wamid, "status": status, "timestamp": str(int(time.time())), "recipient_id": recipient}
    if errors:
        st["errors"] = errors
    acct = PNIDS[pnid]
    r = post(gw, acct, notification([], pnid=pnid, statuses=[st]), secret=SECRETS[acct])
    assert r.status_code == 200, r.text


def _texts(graph, wa_id: str) -> list[str]:
    return [s.get("text") or "" for s in graph.sent_to(wa_id)]


def _messages(services, tenant: str, number: str) -> list[dict]:
    """The tenant's WhatsApp message records that name the number (as customer or in the id)."""
    return rows(
        services[0],
        """SELECT wamid, direction, conversation_id, wa_id, status FROM whatsapp_messages
           WHERE tenant = $1 AND (wa_id = $2 OR conversation_id LIKE '%' || $2) ORDER BY id""",
        tenant,
        number,
    )


def _states(services, tenant: str, number: str) -> list[dict]:
    """The tenant's WhatsApp conversation states of the number."""
    return rows(
        services[0],
        """SELECT phone_number_id, wa_id, conversation_id, last_inbound_at FROM whatsapp_conversations
           WHERE tenant = $1 AND (wa_id = $2 OR conversation_id LIKE '%' || $2) ORDER BY phone_number_id""",
        tenant,
        number,
    )


def _escalations(services, tenant: str, conversations: list[str]) -> list[dict]:
    return rows(
        services[0],
        """SELECT id, conversation_id, status, outcome, question FROM escalations
           WHERE tenant = $1 AND conversation_id = ANY($2::text[]) ORDER BY created_at""",
        tenant,
        conversations,
    )


def _answered(graph, wa_id: str, n: int) -> None:
    wait_until(lambda: len(graph.sent_to(wa_id)) >= n, what=f"{n} messages sent to the customer")


# ---- the proof list -----------------------------------------------------------------------------
def test_an_erasure_leaves_the_number_in_no_message_record_or_conversation_state_of_its_conversation(
    gw, graph, services
):
    """The message records of the erased conversation kept the customer's number (their ``wa_id``
    and their conversation id) and its state row kept it as its key: the erasure nulled only the
    words. Now the records stay (their delivery statuses, as many as before) under the erasure's
    tag, and the state is gone. The same customer's conversation on the account's other business
    number, another customer's, and tenant B's of the same number keep theirs."""
    ada, bob = _wa_id(), _wa_id()
    conv = f"wa:{PNID_A}:{ada}"
    for pnid, who in ((PNID_A, ada), (PNID_A2, ada), (PNID_B, ada), (PNID_A, bob)):
        before = len(graph.sent_to(who))
        _say(gw, pnid, who, f"hello from {who} on {pnid}")
        _answered(graph, who, before + 1)
    outs = "SELECT status FROM whatsapp_messages WHERE tenant = $1 AND direction = 'out' AND wa_id = ANY($2::text[])"
    wait_until(  # (the mock Graph posts alpha's sends' statuses back: all in before the records are compared)
        lambda: [r["status"] for r in rows(services[0], outs, TENANT_A, [ada, bob])] == ["read"] * 3,
        what="the answers' statuses",
    )
    erased = [m for m in _messages(services, TENANT_A, ada) if m["conversation_id"] == conv]
    assert sorted(m["direction"] for m in erased) == ["in", "out"]
    sent = next(m["wamid"] for m in erased if m["direction"] == "out")
    kept = {
        "a2": [m for m in _messages(services, TENANT_A, ada) if m["conversation_id"] != conv],
        "b": _messages(services, TENANT_B, ada),
        "bob": _messages(services, TENANT_A, bob),
        "states": _states(services, TENANT_A, ada)[1:] + _states(services, TENANT_B, ada),
        "bob_state": _states(services, TENANT_A, bob),
    }
    assert [s["phone_number_id"] for s in _states(services, TENANT_A, ada)] == [PNID_A, PNID_A2]
    assert all(kept.values())

    r = _erase(gw, TENANT_A, conv)
    assert r.status_code == 200, r.text

    tag = _tag(TENANT_A, conv)
    assert [m for m in _messages(services, TENANT_A, ada) if m["conversation_id"] == conv] == []
    now = rows(
        services[0],
        "SELECT wamid, direction, conversation_id, wa_id, status FROM whatsapp_messages WHERE tenant = $1"
        " AND conversation_id = $2 ORDER BY id",
        TENANT_A,
        tag,
    )
    assert now == [{**m, "conversation_id": tag, "wa_id": tag} for m in erased]  # statuses kept, all of them
    assert [s["phone_number_id"] for s in _states(services, TENANT_A, ada)] == [PNID_A2]
    assert kept == {
        "a2": [m for m in _messages(services, TENANT_A, ada) if m["conversation_id"] != conv],
        "b": _messages(services, TENANT_B, ada),
        "bob": _messages(services, TENANT_A, bob),
        "states": _states(services, TENANT_A, ada) + _states(services, TENANT_B, ada),
        "bob_state": _states(services, TENANT_A, bob),
    }

    # Meta's late statuses of an erased message name the number: they move its status, nothing else
    _status(gw, PNID_A, sent, "failed", ada, errors=[{"code": 131026, "title": "undeliverable"}])
    wait_until(
        lambda: (
            rows(services[0], "SELECT status FROM whatsapp_messages WHERE wamid = $1", sent)[0]["status"] == "failed"
        ),
        what="the late status",
    )
    assert [m for m in _messages(services, TENANT_A, ada) if m["conversation_id"] == conv] == []
    assert rows(services[0], "SELECT wa_id FROM whatsapp_messages WHERE wamid = $1", sent) == [{"wa_id": tag}]

    # the customer writes again: a new conversation (its own state and window), answered
    before = len(graph.sent_to(ada))
    _say(gw, PNID_A, ada, "hello again")
    _answered(graph, ada, before + 1)
    assert _texts(graph, ada)[-1] == "echo: hello again"
    state = [s for s in _states(services, TENANT_A, ada) if s["phone_number_id"] == PNID_A]
    assert len(state) == 1 and state[0]["conversation_id"] == conv and state[0]["last_inbound_at"] is not None


def test_a_late_status_of_a_send_never_recorded_keeps_no_number(gw, services):
    """A status naming a wamid the records do not know (a send whose POST got no answer is
    recorded without its wamid; Meta's statuses of it come later, perhaps after the erasure of
    its conversation) was recorded with its recipient's number, in a row no erasure finds (it
    names no conversation). It is kept without the number."""
    ada = _wa_id()
    wamid = f"wamid.LATE{uuid.uuid4().hex}"
    _status(gw, PNID_A, wamid, "delivered", ada)
    found = "SELECT wa_id, conversation_id, status FROM whatsapp_messages WHERE tenant = $1 AND wamid = $2"
    wait_until(lambda: rows(services[0], found, TENANT_A, wamid), what="the status recorded")
    assert rows(services[0], found, TENANT_A, wamid) == [
        {"wa_id": None, "conversation_id": None, "status": "delivered"}
    ]
    assert _messages(services, TENANT_A, ada) == []


def test_an_erased_conversations_escalation_keeps_the_tag_and_its_customer_is_answered_again(gw, graph, services):
    """The customer asked for a person (an escalation opened, the conversation held), then to be
    erased. The escalation kept the conversation's id — the number — and stayed open, holding the
    conversation: the customer's next message got the hold message, not an answer. Now the
    escalation stays (for the team's statistics) with the tag as its conversation, resolved
    (``erased``); the customer is answered again, and a second escalation and erasure of the same
    customer end the same way. Another customer's open escalation is untouched."""
    ada, bob = _wa_id(), _wa_id()
    conv, other = f"wa:{PNID_A}:{ada}", f"wa:{PNID_A}:{bob}"
    tag = _tag(TENANT_A, conv)
    for who in (ada, bob):
        _say(gw, PNID_A, who, ASK_PERSON)
    wait_until(lambda: len(_escalations(services, TENANT_A, [conv, other])) == 2, what="the two escalations")
    bobs = _escalations(services, TENANT_A, [other])
    for round_ in (1, 2):
        opened = _escalations(services, TENANT_A, [conv])
        assert [(e["status"], e["question"] is not None) for e in opened] == [("queued", True)]
        r = _erase(gw, TENANT_A, conv)
        assert r.status_code == 200, r.text
        assert _escalations(services, TENANT_A, [conv]) == []
        closed = _escalations(services, TENANT_A, [tag])
        assert len(closed) == round_ and closed[-1]["id"] == opened[0]["id"]
        assert {(e["status"], e["outcome"], e["question"]) for e in closed} == {("resolved", "erased", None)}
        # the customer writes again: answered by the agent, not held for a person
        before = len(graph.sent_to(ada))
        _say(gw, PNID_A, ada, f"hello again {round_}")
        _answered(graph, ada, before + 1)
        assert _texts(graph, ada)[-1] == f"echo: hello again {round_}"
        if round_ == 1:  # and asks for a person again: a new escalation of the same id
            _say(gw, PNID_A, ada, ASK_PERSON)
            wait_until(lambda: _escalations(services, TENANT_A, [conv]), what="the second escalation")
    assert _escalations(services, TENANT_A, [other]) == bobs


def test_a_turn_under_way_when_its_conversation_is_erased_keeps_no_number(gw, graph, services):
    """The erasure comes while the customer's turn waits for the agent's answer: the turn had
    recorded its message and the conversation's state, and kept both with the number after the
    erasure. Its message now holds the tag, and the state it stored again is gone."""
    ada = _wa_id()
    conv = f"wa:{PNID_A}:{ada}"
    _say(gw, PNID_A, ada, "hello")
    _answered(graph, ada, 1)
    _say(gw, PNID_A, ada, 'slow one [[mock:{"delay_ms": 3000}]]')
    recorded = "SELECT 1 FROM whatsapp_messages WHERE tenant = $1 AND conversation_id = $2 AND body LIKE 'slow one%'"
    wait_until(lambda: rows(services[0], recorded, TENANT_A, conv), what="the turn under way")
    assert _erase(gw, TENANT_A, conv).status_code == 200
    tag = _tag(TENANT_A, conv)
    tagged = "SELECT count(*) AS n FROM whatsapp_messages WHERE tenant = $1 AND conversation_id = $2"
    # (the first answer's and the slow turn's message: 3 records, all tagged once the turn has ended)
    wait_until(lambda: rows(services[0], tagged, TENANT_A, tag) == [{"n": 3}], what="the turn's message tagged")
    assert _messages(services, TENANT_A, ada) == [] and _states(services, TENANT_A, ada) == []
    assert len(graph.sent_to(ada)) == 1


def test_what_a_turn_records_after_its_conversations_erasure_keeps_no_number(gw, services):
    """A turn that was under way when its conversation was erased and recorded its messages after
    it (the channel's write path, ``InboundRecords``: the message and the conversation's state
    again) cleared only their words and the profile name when it found the erasure: the number
    stayed as the records' customer and conversation, and as the state's key. Its messages hold
    the erasure's tag now and the state is deleted; the customer's conversation on another
    business number is untouched."""
    from channels.whatsapp import store
    from core.erasure_key import conversation_tag

    tenant, ada = f"wanum-turn-{RUN}", _wa_id()
    conv, other = f"wa:{PNID_A}:{ada}", f"wa:{PNID_A2}:{ada}"

    def message(pnid: str) -> dict:
        wamid = f"wamid.AFTER{uuid.uuid4().hex}"
        return {"account": "alpha", "pnid": pnid, "wa_id": ada, "wamid": wamid, "ts": time.time(), "type": "text",
                "text": "my card is 4111", "name": "Ada"}  # fmt: skip

    async def go() -> None:
        pool = await asyncpg.create_pool(services[0], min_size=1, max_size=2)
        try:
            records = store.InboundRecords(pool)
            turn, kept = message(PNID_A), message(PNID_A2)
            await records.record(tenant, "wabot", [turn])
            await records.record(tenant, "wabot", [kept])
            await store.forget_turn_words(pool, tenant, conv, [turn["wamid"]])
        finally:
            await pool.close()

    asyncio.run(go())
    tag = conversation_tag(tenant, conv)
    assert _states(services, tenant, ada) == [
        {"phone_number_id": PNID_A2, "wa_id": ada, "conversation_id": other, "last_inbound_at": ANY_TIME}
    ]
    found = rows(services[0], "SELECT conversation_id, wa_id, body FROM whatsapp_messages WHERE tenant = $1", tenant)
    assert sorted(found, key=str) == sorted(
        [{"conversation_id": tag, "wa_id": tag, "body": None},
         {"conversation_id": other, "wa_id": ada, "body": "my card is 4111"}], key=str
    )  # fmt: skip


class _AnyTime:
    def __eq__(self, other) -> bool:
        return other is not None


ANY_TIME = _AnyTime()


def test_an_erasure_drops_the_status_dead_letters_that_name_the_number(gw, services):
    """A delivery status whose job died stays in the status queue's dead letters, naming its
    recipient (here: a window failure of a send whose record never came). Those of the erased
    conversation were left there; they go now. Another customer's stays."""
    ada, bob = _wa_id(), _wa_id()
    dead = "gw:{gw}:q:wa-status:dead"
    r = redis.Redis.from_url(services[1])

    def letters(who: str) -> list[bytes]:
        return [i for i, f in r.xrange(dead) if who.encode() in f[b"m"]]

    try:
        for who in (ada, bob):  # retried with the status queue's backoff, then dead (both at once)
            _status(gw, PNID_A, f"wamid.GONE{uuid.uuid4().hex}", "failed", who, errors=[{"code": 131047}])
        wait_until(
            lambda: (len(letters(ada)), len(letters(bob))) == (1, 1), what="the statuses' dead letters", timeout=90
        )
        assert _erase(gw, TENANT_A, f"wa:{PNID_A}:{ada}").status_code == 200
        assert (len(letters(ada)), len(letters(bob))) == (0, 1)
    finally:
        if gone := letters(bob):
            r.xdel(dead, *gone)
        r.close()


def test_an_erasure_deletes_the_alias_that_holds_the_customers_number(gw, graph, services, monkeypatch):
    """An admin's send to a number Meta knows by another WhatsApp id (the customer's, whose
    conversation it is) leaves an alias in Redis for 90 days: the typed number's key holding the
    customer's id. The erasure of the customer's conversation left it; it goes now. Another
    customer's alias stays."""
    monkeypatch.setenv("GATEWAY_MASTER_KEY", MASTER_KEY)  # (names keyed as the gateway keys them)
    from channels.whatsapp.sender import alias_index_key, alias_key

    ada, bob = _wa_id(), _wa_id()
    typed = {ada: _wa_id(), bob: _wa_id()}
    template = {"account": "alpha", "name": f"hello_{RUN}", "language": "en_US"}
    made = _admin(gw, "POST", "/admin/channels/whatsapp/templates", json=template)
    assert made.status_code == 201, made.text
    r = redis.Redis.from_url(services[1])
    graph.configure(wa_ids={number: who for who, number in typed.items()})
    try:
        for who, number in typed.items():
            body = {"account": "alpha", "phone_number_id": PNID_A, "to": number, "template": {"name": f"hello_{RUN}"}}
            sent = _admin(gw, "POST", "/admin/channels/whatsapp/send", json=body)
            assert sent.status_code == 202, sent.text
            key = alias_key("alpha", PNID_A, number)
            wait_until(lambda key=key, who=who: r.get(key) == who.encode(), what="the alias")
        assert _erase(gw, TENANT_A, f"wa:{PNID_A}:{ada}").status_code == 200
        assert r.get(alias_key("alpha", PNID_A, typed[ada])) is None
        assert r.get(alias_key("alpha", PNID_A, typed[bob])) == bob.encode()
        # Nor is any index of the alias left: each set's name hashes a conversation id, which holds a
        # number, with no key (hashing every number finds it). The typed number's stayed 90 days.
        for number in (ada, typed[ada]):
            assert not r.exists(alias_index_key(TENANT_A, f"wa:{PNID_A}:{number}")), number
        for number in (bob, typed[bob]):
            assert r.exists(alias_index_key(TENANT_A, f"wa:{PNID_A}:{number}")), number
    finally:
        graph.configure(wa_ids={})
        r.close()


def test_an_erasure_of_one_typed_number_leaves_the_customers_other_alias_to_the_customers_erasure(
    gw, graph, services, monkeypatch
):
    """Two numbers typed by admins that Meta knows as one customer: an alias each, both indexed
    under the customer's conversation. The erasure of one typed number's conversation deleted the
    customer's whole alias index with it (the index named it), so the customer's own erasure later
    no longer found the other typed number's alias, which holds the customer's id: it stayed 90
    days. The typed number's erasure takes only its own alias out of the customer's index."""
    monkeypatch.setenv("GATEWAY_MASTER_KEY", MASTER_KEY)  # (names keyed as the gateway keys them)
    from channels.whatsapp.sender import alias_index_key, alias_key

    ada, first, second = _wa_id(), _wa_id(), _wa_id()
    name = f"hello_two_{RUN}"
    template = {"account": "alpha", "name": name, "language": "en_US"}
    made = _admin(gw, "POST", "/admin/channels/whatsapp/templates", json=template)
    assert made.status_code == 201, made.text
    r = redis.Redis.from_url(services[1])
    graph.configure(wa_ids={first: ada, second: ada})
    try:
        for number in (first, second):
            body = {"account": "alpha", "phone_number_id": PNID_A, "to": number, "template": {"name": name}}
            sent = _admin(gw, "POST", "/admin/channels/whatsapp/send", json=body)
            assert sent.status_code == 202, sent.text
            key = alias_key("alpha", PNID_A, number)
            wait_until(lambda key=key: r.get(key) == ada.encode(), what="the alias")
        assert _erase(gw, TENANT_A, f"wa:{PNID_A}:{first}").status_code == 200
        assert r.get(alias_key("alpha", PNID_A, first)) is None
        assert r.get(alias_key("alpha", PNID_A, second)) == ada.encode()  # (another number's: its erasure's)
        assert not r.exists(alias_index_key(TENANT_A, f"wa:{PNID_A}:{first}"))
        assert _erase(gw, TENANT_A, f"wa:{PNID_A}:{ada}").status_code == 200
        assert r.get(alias_key("alpha", PNID_A, second)) is None
        for number in (ada, first, second):
            assert not r.exists(alias_index_key(TENANT_A, f"wa:{PNID_A}:{number}")), number
    finally:
        graph.configure(wa_ids={})
        r.close()


def test_the_erasures_updates_of_the_channel_records_use_their_indexes(gw, services):
    """On tables of 100,000 rows each (one tenant, many conversations) the erasure's UPDATE of the
    message records, DELETE of the conversation states and UPDATE of the escalations read by
    index, never the whole table."""
    from runtime import erased_records

    tenant = f"wanum-plan-{RUN}"

    async def go() -> dict[str, str]:
        conn = await asyncpg.connect(services[0])
        try:
            async with conn.transaction():
                await conn.execute(
                    """INSERT INTO whatsapp_messages (tenant, account, wamid, direction, conversation_id, wa_id)
                       SELECT $1, 'acct', 'wamid.' || i, 'in', 'wa:1:' || (i % 20000), (i % 20000)::text
                       FROM generate_series(1, 100000) i""",
                    tenant,
                )
                await conn.execute(
                    """INSERT INTO whatsapp_conversations (tenant, account, phone_number_id, wa_id, conversation_id,
                                                           agent)
                       SELECT $1, 'acct', '1', i::text, 'wa:1:' || i, 'bot' FROM generate_series(1, 100000) i""",
                    tenant,
                )
                await conn.execute(
                    """INSERT INTO escalations (id, tenant, agent_id, agent, conversation_id, status, sla_first_s,
                                                sla_resolve_s)
                       SELECT 'esc_plan_' || i, $1, 'agent_1', 'bot', 'wa:1:' || i, 'resolved', 60, 600
                       FROM generate_series(1, 100000) i""",
                    tenant,
                )
                for table in ("whatsapp_messages", "whatsapp_conversations", "escalations"):
                    await conn.execute(f"ANALYZE {table}")
                plans = {}
                args = {
                    "_WA_MESSAGES": (tenant, ["wa:1:77"], ["erased:x"], None),
                    "_WA_CONVERSATIONS": (tenant, ["wa:1:77"], None),
                    "_ESCALATIONS": (tenant, ["agent_1"], ["wa:1:77"], ["erased:x"], None),
                }
                for name, params in args.items():
                    sql = getattr(erased_records, name)
                    found = await conn.fetch("EXPLAIN (ANALYZE, COSTS OFF) " + sql, *params)
                    plans[name] = "\n".join(r[0] for r in found)
                raise _Rollback(plans)
        except _Rollback as done:
            return done.plans
        finally:
            await conn.close()

    plans = asyncio.run(go())
    for name, plan in plans.items():
        assert "Seq Scan" not in plan, f"{name}:\n{plan}"
    assert "whatsapp_messages_conv" in plans["_WA_MESSAGES"], plans["_WA_MESSAGES"]
    assert "whatsapp_conversations_cid" in plans["_WA_CONVERSATIONS"], plans["_WA_CONVERSATIONS"]
    assert "escalations_tenant_agent_conversation" in plans["_ESCALATIONS"], plans["_ESCALATIONS"]


class _Rollback(Exception):
    def __init__(self, plans: dict[str, str]) -> None:
        super().__init__("rolled back")
        self.plans = plans


def test_an_erasure_repeated_after_redis_failed_to_release_its_hold_releases_it(gw, graph, services, monkeypatch):
    """The erasure resolves the open escalation in its transaction and releases its hold in Redis
    after the commit. When Redis failed there (a 503: "erasing is safe to repeat"), the repeated
    erasure no longer found the escalation open and left the hold: the customer's next message
    got the hold message instead of the agent's answer. Now a repeated erasure releases the holds
    of the escalations an erasure of the conversation resolved."""
    monkeypatch.setenv("GATEWAY_MASTER_KEY", MASTER_KEY)  # (names keyed as the gateway keys them)
    from runtime.hitl.held import held_key

    ada = _wa_id()
    conv = f"wa:{PNID_A}:{ada}"
    _say(gw, PNID_A, ada, ASK_PERSON)
    wait_until(lambda: _escalations(services, TENANT_A, [conv]), what="the escalation")
    assert _erase(gw, TENANT_A, conv).status_code == 200
    [esc] = rows(
        services[0],
        "SELECT agent_id, id FROM escalations WHERE tenant = $1 AND conversation_id = $2",
        TENANT_A,
        _tag(TENANT_A, conv),
    )
    r = redis.Redis.from_url(services[1])
    try:  # the state the erasure left when Redis refused the release: committed, the hold still set
        r.set(held_key(TENANT_A, esc["agent_id"], conv), esc["id"], ex=3600)
        assert _erase(gw, TENANT_A, conv).status_code == 200
        assert r.get(held_key(TENANT_A, esc["agent_id"], conv)) is None
    finally:
        r.close()
    before = len(graph.sent_to(ada))
    _say(gw, PNID_A, ada, "hello after the repeated erasure")
    _answered(graph, ada, before + 1)
    assert _texts(graph, ada)[-1] == "echo: hello after the repeated erasure"


def test_a_status_an_older_release_kept_with_its_recipients_number_loses_it_at_the_upgrade(services):
    """An older release kept a status of a wamid it did not know with the recipient's number and
    no conversation: no erasure finds that row, so the number stayed for good. The upgrade's
    migration takes the number off those rows (their statuses stay); a linked record keeps its
    customer until its conversation is erased."""
    from gateway.db import migrate, migration_files

    [sql] = [sql for version, _, sql in migration_files() if version == 17]
    tenant, number = f"wanum-old-{uuid.uuid4().hex[:6]}", _wa_id()

    async def go():
        conn = await asyncpg.connect(services[0])
        try:
            await migrate(conn)  # (the rows below are the older release's: written before the upgrade's SQL runs)
            await conn.execute(
                """INSERT INTO whatsapp_messages (tenant, account, wamid, direction, conversation_id, wa_id, status,
                                                  status_rank)
                   VALUES ($1, 'alpha', $2, 'out', NULL, $3, 'delivered', 2),
                          ($1, 'alpha', $4, 'out', $5, $3, 'read', 3)""",
                tenant,
                f"wamid.old-{uuid.uuid4().hex[:8]}",
                number,
                f"wamid.linked-{uuid.uuid4().hex[:8]}",
                f"wa:{PNID_A}:{number}",
            )
            await conn.execute(sql)
            return await conn.fetch(
                "SELECT conversation_id, wa_id, status FROM whatsapp_messages WHERE tenant = $1 ORDER BY id", tenant
            )
        finally:
            await conn.close()

    got = [tuple(r) for r in asyncio.run(go())]
    assert got == [(None, None, "delivered"), (f"wa:{PNID_A}:{number}", number, "read")], got


def test_a_turns_answer_sent_while_its_conversation_is_erased_keeps_no_number(gw, graph, services):
    """The erasure comes while the turn's answer is on its way to Meta (its POST answered late):
    the turn's last check was before the send, so the answer's record — written after the
    erasure — kept the customer's number, the conversation's id and the answer itself. Now the
    turn checks again once the answer is out, and its records go as the erasure's own did."""
    ada = _wa_id()
    conv = f"wa:{PNID_A}:{ada}"
    graph.configure(text_answer_delays_ms=[1500])  # (below the module's 2 s visibility timeout)
    try:
        _say(gw, PNID_A, ada, "hello")
        wait_until(lambda: graph.sent_to(ada), what="the answer's POST at Graph")  # (listed before its answer)
        assert _erase(gw, TENANT_A, conv).status_code == 200
        out = "SELECT body FROM whatsapp_messages WHERE tenant = $1 AND conversation_id = $2 AND direction = 'out'"
        wait_until(lambda: rows(services[0], out, TENANT_A, _tag(TENANT_A, conv)), what="the answer's record tagged")
        assert rows(services[0], out, TENANT_A, _tag(TENANT_A, conv)) == [{"body": None}]
        assert _messages(services, TENANT_A, ada) == [] and _states(services, TENANT_A, ada) == []
    finally:
        graph.configure(text_answer_delays_ms=[])
