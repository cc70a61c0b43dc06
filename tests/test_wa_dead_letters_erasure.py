"""An erasure (the admin API) and a retention drop a WhatsApp conversation's dead letters from the
channel's inbound queue: a customer's message whose turn failed after its last retry, and a send
to them that did, kept in Redis for an admin to replay. For the conversation's tenant only: another
conversation's letters stay, and so do another tenant's, whatever id its admin names.

The real stack: a gateway process with the channel worker inside and two tenants' accounts, the
mock Graph API (loadtest/mock_graph.py) and the mock LLM (loadtest/mock_provider.py). A turn is
made to fail by a fault directive in the customer's own message (the mock LLM answers 500, for
that conversation only); a send by one in its text (the mock Graph answers 500)."""

from __future__ import annotations

import base64
import hashlib
import random
import time
import urllib.parse
import uuid

import orjson
import pytest
import redis

from tests.conftest import MASTER_KEY, Gateway, environ, run_cli, wait_until
from tests.test_channels_whatsapp import execute, notification, post, rows, text

TENANT_A = f"wadl-a-{uuid.uuid4().hex[:6]}"
TENANT_B = f"wadl-b-{uuid.uuid4().hex[:6]}"
PNID_A, PNID_B, PNID_C = "7101", "7202", "7303"
SECRET_A, SECRET_B, SECRET_C = "alpha-app-secret-0001", "bravo-app-secret-0002", "charlie-app-secret-03"
NUMBERS = {"alpha": (PNID_A, SECRET_A), "bravo": (PNID_B, SECRET_B), "charlie": (PNID_C, SECRET_C)}
DEAD = "gw:{gw}:q:wa-inbound:dead"
TOKEN = "graph-token-test"
FAIL_TURN = ' [[mock:{"status": 500}]]'  # the mock LLM fails this turn, every try
FAIL_SEND = ' [[graph:{"error": 500, "times": 10}]]'  # the mock Graph fails this send, every try
ENV = {
    "GATEWAY_CHANNEL_WORKER": "1",
    "GATEWAY_WA_VISIBILITY_TIMEOUT": "2",
    "GATEWAY_WA_MAX_RETRIES": "1",
    "GATEWAY_WA_BACKOFF": "0.2",
    "GATEWAY_RETENTION_SWEEP_INTERVAL": "1",
}


def _account(tenant: str, pnid: str | list[str], secret: str, key_var: str, graph_url: str) -> dict:
    """A WhatsApp account of the channel config (one business number, or several), its API key
    read from ``key_var`` (shared by the WhatsApp erasure modules)."""
    return {
        "tenant": tenant,
        "phone_numbers": dict.fromkeys([pnid] if isinstance(pnid, str) else pnid, "wabot"),
        "app_secret": secret,
        "verify_token": "verify-token-0123",
        "access_token": TOKEN,
        "api_key": f"${{{key_var}}}",
        "graph_base_url": graph_url,
    }


def _legacy_letter(wa_id: str, words: str) -> dict:
    """A dead letter as the release before the tags wrote it: the job and its failure time alone."""
    payload = {"kind": "in", "account": "alpha", "pnid": PNID_A, "display": "", "wa_id": wa_id, "name": None}
    payload |= {"wamid": f"wamid.OLD{uuid.uuid4().hex}", "ts": time.time(), "type": "text", "text": words}
    msg = {"id": uuid.uuid4().hex, "payload": payload, "key": f"alpha:{PNID_A}:{wa_id}", "attempt": 2}
    msg |= {"enqueued_at": time.time(), "error": "GatewayUnavailable: 502"}
    return {"m": orjson.dumps(msg), "failed_at": f"{time.time():.3f}"}


@pytest.fixture(scope="module")
def legacy(services):
    """Two dead letters left untagged by the previous release, there before the gateway starts (its
    queue tags them once: the mark that it did is cleared, as on a first start of this release)."""
    wa_ids = {"erased": _wa_id(), "kept": _wa_id()}
    r = redis.Redis.from_url(services[1])
    try:
        r.delete(f"{DEAD}:tags0:done", f"{DEAD}:tags0:lock")
        for which, wa_id in wa_ids.items():
            r.xadd(DEAD, _legacy_letter(wa_id, f"legacy words of the {which} one"))
    finally:
        r.close()
    return wa_ids


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock, graph, legacy):
    keys = {}
    for tenant, var in ((TENANT_A, "WADL_KEY_A"), (TENANT_B, "WADL_KEY_B")):
        out = run_cli("keys", "create", "--name", "whatsapp", "--tenant", tenant, urls=services, tmp=tmp_root)
        assert out.returncode == 0, out.stderr
        keys[var] = out.stdout.splitlines()[0].strip()
    config = {
        # (the turns made to fail here would open the model's circuit: every turn after them,
        # of any test of the module, then waited out its 15 s cooldown)
        "router": {"max_attempts": 1, "circuit": {"failures": 1_000_000}},
        "providers": [{"name": "llm", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k"]}],
        "models": [{"name": "agent-model", "deployments": [{"provider": "llm", "model": "m"}]}],
        "channels": {
            "whatsapp": {
                "alpha": _account(TENANT_A, PNID_A, SECRET_A, "WADL_KEY_A", graph.url),
                "bravo": _account(TENANT_B, PNID_B, SECRET_B, "WADL_KEY_B", graph.url),
                # tenant A's too, its bursts gathered for 3 s: a message waits in the queue that long
                "charlie": {**_account(TENANT_A, PNID_C, SECRET_C, "WADL_KEY_A", graph.url), "debounce": 3},
            }
        },
    }
    with environ({**ENV, **keys}):
        g = Gateway(tmp_root, config, services)
    try:
        for tenant, memory in ((TENANT_A, {"retention_days": 30, "ttl_s": 30 * 86400}), (TENANT_B, {})):
            body = {
                "name": "wabot",
                "tenant": tenant,
                "model": "agent-model",
                "template": "You help.",
                "variables": {},
                "memory": memory,
            }
            r = _admin(g, "POST", "/admin/agents", json=body)
            assert r.status_code == 201, r.text
        yield g
    finally:
        g.stop()


# ---- helpers ------------------------------------------------------------------------------------
def _admin(gw: Gateway, method: str, path: str, **kw):
    import httpx

    return httpx.request(method, f"{gw.url}{path}", headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=30, **kw)


def _wa_id() -> str:
    return str(random.randint(10**11, 10**12 - 1))


def _say(gw: Gateway, acct: str, wa_id: str, words: str) -> None:
    pnid, secret = NUMBERS[acct]
    r = post(gw, acct, notification([text(wa_id, words)], pnid=pnid), secret=secret)
    assert r.status_code == 200, r.text


def _dead_words(services) -> dict[tuple[str, str], list[str]]:
    """The inbound queue's dead letters, by (account, customer): the words each keeps."""
    r = redis.Redis.from_url(services[1])
    try:
        out: dict[tuple[str, str], list[str]] = {}
        for _, fields in r.xrange(DEAD):
            payload = orjson.loads(fields[b"m"])["payload"]
            out.setdefault((payload.get("account"), payload.get("wa_id")), []).append(payload.get("text") or "")
        return out
    finally:
        r.close()


def _wait_dead(services, acct: str, wa_id: str, n: int = 1, timeout: float = 30.0) -> list[str]:
    wait_until(
        lambda: len(_dead_words(services).get((acct, wa_id), [])) >= n, timeout, what=f"{n} dead letters of {wa_id}"
    )
    return _dead_words(services)[(acct, wa_id)]


def _erase(gw: Gateway, tenant: str, conversation: str):
    quoted = urllib.parse.quote(conversation, safe="")
    return _admin(gw, "DELETE", f"/admin/agents/wabot/conversations/{quoted}", params={"tenant": tenant})


# ---- the proof list -----------------------------------------------------------------------------
def test_an_erasure_drops_the_conversations_inbound_and_send_dead_letters_of_its_tenant_only(gw, graph, services):
    ada, bob = _wa_id(), _wa_id()
    _say(gw, "alpha", ada, "my card is 4111 1111" + FAIL_TURN)
    _say(gw, "alpha", bob, "bob's own words" + FAIL_TURN)
    _say(gw, "bravo", ada, "the same number at another tenant" + FAIL_TURN)
    _wait_dead(services, "alpha", ada)
    # a send to Ada (the window is open: she wrote) that fails after its last retry too
    r = _admin(
        gw, "POST", "/admin/channels/whatsapp/send", json={"account": "alpha", "to": ada, "text": "hi" + FAIL_SEND}
    )
    assert r.status_code == 202, r.text
    assert len(_wait_dead(services, "alpha", ada, 2)) == 2
    _wait_dead(services, "alpha", bob)
    _wait_dead(services, "bravo", ada)

    r = _erase(gw, TENANT_A, f"wa:{PNID_A}:{ada}")
    assert r.status_code == 200, r.text
    left = _dead_words(services)
    assert ("alpha", ada) not in left
    assert left[("alpha", bob)] == ["bob's own words" + FAIL_TURN]
    assert left[("bravo", ada)] == ["the same number at another tenant" + FAIL_TURN]
    listed = _admin(gw, "GET", "/admin/queues/wa-inbound/dead-letters", params={"limit": 1000}).json()["data"]
    assert not [d for d in listed if d["payload"].get("wa_id") == ada and d["payload"].get("account") == "alpha"]

    # tenant A naming tenant B's conversation erases nothing of B's; B's own erasure does
    assert _erase(gw, TENANT_A, f"wa:{PNID_B}:{ada}").status_code == 200
    assert ("bravo", ada) in _dead_words(services)
    assert _erase(gw, TENANT_B, f"wa:{PNID_B}:{ada}").status_code == 200
    left = _dead_words(services)
    assert ("bravo", ada) not in left and ("alpha", bob) in left


def test_an_erasure_drops_the_dead_letters_the_previous_release_left_untagged(gw, services, legacy):
    def tagged() -> bool:
        r = redis.Redis.from_url(services[1])
        try:
            return bool(r.exists(f"{DEAD}:tags0:done"))
        finally:
            r.close()

    wait_until(tagged, what="the older dead letters tagged")
    assert _dead_words(services)[("alpha", legacy["erased"])] == ["legacy words of the erased one"]
    assert _erase(gw, TENANT_A, f"wa:{PNID_A}:{legacy['erased']}").status_code == 200
    left = _dead_words(services)
    assert ("alpha", legacy["erased"]) not in left
    assert left[("alpha", legacy["kept"])] == ["legacy words of the kept one"]


def _wait_stored(services, external_ids) -> None:
    """Until tenant A's conversations are in PostgreSQL (the memory writer has moved them)."""
    wanted = set(external_ids)

    def stored() -> bool:
        got = rows(services[0], "SELECT external_id FROM conversations WHERE tenant = $1", TENANT_A)
        return wanted <= {r["external_id"] for r in got}

    wait_until(stored, what="the conversations in PostgreSQL")


def _retire(services, external_id: str) -> None:
    """Tenant A's conversation made 31 days silent, until the gateway's retention sweeper deleted it."""
    execute(
        services[0],
        f"UPDATE conversations SET last_at = now() - interval '31 days' "
        f"WHERE tenant = '{TENANT_A}' AND external_id = '{external_id}'",
    )

    def swept() -> bool:
        got = rows(
            services[0], "SELECT 1 FROM conversations WHERE tenant = $1 AND external_id = $2", TENANT_A, external_id
        )
        return not got

    wait_until(swept, what="the old conversation deleted by the retention")


def test_retention_drops_the_dead_letters_of_the_conversations_it_deletes(gw, graph, module_mock, services):
    """Tenant A's agent keeps conversations 30 days; the gateway's own sweeper (every second
    here) deletes one moved back 31 days, and its dead letter with it. A recent conversation of
    the same agent and tenant B's of the same number keep theirs."""
    old, recent = _wa_id(), _wa_id()
    for wa_id in (old, recent):
        _say(gw, "alpha", wa_id, "hello")  # answered: the conversation is stored
        wait_until(lambda w=wa_id: graph.sent_to(w), what=f"the answer to {wa_id}")
        _say(gw, "alpha", wa_id, f"words of {wa_id}" + FAIL_TURN)
        _wait_dead(services, "alpha", wa_id)
    _say(gw, "bravo", old, "tenant B's words" + FAIL_TURN)
    _wait_dead(services, "bravo", old)

    convs = {w: f"wa:{PNID_A}:{w}" for w in (old, recent)}

    _wait_stored(services, convs.values())
    for wa_id in (old, recent):  # (their runs and ledger rows: the old one's as old as it)
        wait_until(lambda w=wa_id: all(_holding(services, TENANT_A, w).values()), what=f"the records of {wa_id}")
    for table, column in (("runs", "created_at"), ("ledger", "ts")):
        execute(
            services[0],
            f"UPDATE {table} SET {column} = {column} - interval '31 days' "
            f"WHERE tenant = '{TENANT_A}' AND conversation_id = '{convs[old]}'",
        )
    _retire(services, convs[old])
    left = _dead_words(services)
    assert ("alpha", old) not in left
    assert left[("alpha", recent)] == [f"words of {recent}" + FAIL_TURN]
    assert left[("bravo", old)] == ["tenant B's words" + FAIL_TURN]
    # its runs and ledger rows stay, with its tag in place of the number; the recent one's keep theirs
    assert _holding(services, TENANT_A, old) == {"ledger": [], "runs": []}
    tag = _tag(TENANT_A, convs[old])
    assert rows(services[0], "SELECT count(*) AS n FROM runs WHERE conversation_id = $1", tag)[0]["n"] > 0
    assert all(_holding(services, TENANT_A, recent).values())


def _dead_payloads(services, acct: str, wa_id: str) -> list[dict]:
    r = redis.Redis.from_url(services[1])
    try:
        found = (orjson.loads(fields[b"m"])["payload"] for _, fields in r.xrange(DEAD))
        return [p for p in found if p.get("account") == acct and p.get("wa_id") == wa_id]
    finally:
        r.close()


def test_the_letters_of_an_account_removed_from_the_config_are_still_its_tenants_to_erase(gw, services):
    """An account taken out of the config (or moved to another tenant) dies with every job it had
    queued: the worker no longer knows it. Those letters hold the customer's words and stay its
    tenant's to erase: the tenant is the one the job was queued for, not the config's now. Here a
    job queued by the webhook (a real one's payload) is put back on the queue as an account the
    worker does not know; tenant B naming the same conversation id drops nothing of it."""
    import asyncio

    import redis.asyncio as aioredis

    from core.queue import Queue

    ada = _wa_id()
    _say(gw, "alpha", ada, "words queued before the account went" + FAIL_TURN)
    _wait_dead(services, "alpha", ada)
    (queued,) = _dead_payloads(services, "alpha", ada)
    assert queued.get("tenant") == TENANT_A  # the webhook names the tenant it queued for
    gone = {**queued, "account": "gone", "wamid": f"wamid.G{uuid.uuid4().hex}", "text": "the gone account's words"}

    async def enqueue() -> None:
        r = aioredis.from_url(services[1])
        try:
            await Queue(r, "wa-inbound", ordered=True).enqueue(gone, key=f"gone:{PNID_A}:{ada}")
        finally:
            await r.aclose()

    asyncio.run(enqueue())
    wait_until(lambda: _dead_payloads(services, "gone", ada), 60, what="the removed account's job dead")
    assert _erase(gw, TENANT_B, f"wa:{PNID_A}:{ada}").status_code == 200
    assert _dead_payloads(services, "gone", ada)
    assert _erase(gw, TENANT_A, f"wa:{PNID_A}:{ada}").status_code == 200
    assert _dead_payloads(services, "gone", ada) == [] and _dead_payloads(services, "alpha", ada) == []


# ---- the files a customer sent (channels/whatsapp/content.py) ----------------------------------
MEDIA_ROOT = ("data", "channels", "whatsapp")


def _send_file(gw: Gateway, graph, acct: str, wa_id: str, data: bytes, kind: str = "document") -> str:
    """The customer sends a file (a document or a voice note); the turn is answered (so it is kept).
    The message's wamid."""
    mime = {"document": "application/pdf", "audio": "audio/ogg"}[kind]
    media_id = uuid.uuid4().hex
    graph._post("/_mock/media", {"id": media_id, "data_b64": base64.b64encode(data).decode(), "mime_type": mime})
    body = {"id": media_id, "mime_type": mime} | ({"filename": "bill.pdf"} if kind == "document" else {"voice": True})
    msg = {"from": wa_id, "id": f"wamid.F{uuid.uuid4().hex}", "timestamp": str(int(time.time())), "type": kind}
    pnid, secret = NUMBERS[acct]
    before = len(graph.sent_to(wa_id))
    r = post(gw, acct, notification([msg | {kind: body}], pnid=pnid), secret=secret)
    assert r.status_code == 200, r.text
    wait_until(lambda: len(graph.sent_to(wa_id)) > before, what=f"the answer to {wa_id}'s {kind}")
    return msg["id"]


def _files_holding(tmp_root, data: bytes) -> list:
    root = tmp_root.joinpath(*MEDIA_ROOT)
    return [p for p in root.rglob("*") if p.is_file() and p.read_bytes() == data]


def test_an_erasure_deletes_the_files_the_customer_sent_and_no_one_elses(gw, graph, services, tmp_root):
    """Ada (tenant A) sends a voice note and a document Bob (same tenant) sends too, byte for byte;
    the same number at tenant B sends a document. Erasing Ada's conversation deletes her files
    only: Bob keeps his copy of the shared document, tenant B its file."""
    ada, bob = _wa_id(), _wa_id()
    voice, shared, bobs, other = (f"{w} {uuid.uuid4().hex}".encode() for w in ("OggS ada", "%PDF", "%PDF b", "%PDF o"))
    _send_file(gw, graph, "alpha", ada, voice, "audio")
    _send_file(gw, graph, "alpha", ada, shared)
    _send_file(gw, graph, "alpha", bob, shared)
    _send_file(gw, graph, "alpha", bob, bobs)
    _send_file(gw, graph, "bravo", ada, other)
    assert _files_holding(tmp_root, voice) and _files_holding(tmp_root, other)

    assert _erase(gw, TENANT_A, f"wa:{PNID_A}:{ada}").status_code == 200
    assert _files_holding(tmp_root, voice) == []
    assert len(_files_holding(tmp_root, shared)) == 1  # Bob's
    assert _files_holding(tmp_root, bobs) and _files_holding(tmp_root, other)
    # Bob's conversation still has what it sent: erasing it now deletes the shared document too
    assert _erase(gw, TENANT_A, f"wa:{PNID_A}:{bob}").status_code == 200
    assert _files_holding(tmp_root, shared) == [] and _files_holding(tmp_root, bobs) == []
    assert _files_holding(tmp_root, other)


def test_attack_a_crafted_conversation_id_deletes_nothing_outside_its_own_folder(gw, services, tmp_root):
    """The id is the admin's: traversal, a tenant's folder, the media root — none is a path."""
    root = tmp_root.joinpath(*MEDIA_ROOT)
    root.mkdir(parents=True, exist_ok=True)
    bait = [tmp_root / "data" / "bait.txt", root / "bait.txt"]
    for p in bait:
        p.write_bytes(b"keep me")
    for crafted in ("wa:../../bait.txt", "wa:/", "wa:..", "wa:*", f"wa:{PNID_A}:../../../data"):
        assert _erase(gw, TENANT_A, crafted).status_code == 200
    assert all(p.read_bytes() == b"keep me" for p in bait)


def test_retention_deletes_the_files_of_the_conversations_it_deletes(gw, graph, services, tmp_root):
    old, recent = _wa_id(), _wa_id()
    files = {w: f"%PDF {w} {uuid.uuid4().hex}".encode() for w in (old, recent)}
    others = f"%PDF tenant B {uuid.uuid4().hex}".encode()
    turns = {w: _send_file(gw, graph, "alpha", w, data) for w, data in files.items()}
    others_turn = _send_file(gw, graph, "bravo", old, others)
    convs = {w: f"wa:{PNID_A}:{w}" for w in (old, recent)}

    _wait_stored(services, convs.values())
    assert _files_holding(tmp_root, files[old])
    _retire(services, convs[old])
    assert _files_holding(tmp_root, files[old]) == []
    assert _files_holding(tmp_root, files[recent]) and _files_holding(tmp_root, others)
    # the turns' send states (the answer sent) go with the old conversation only
    assert _turn_replies(services, [("alpha", turns[old]), ("alpha", turns[recent]), ("bravo", others_turn)]) == [
        False,
        True,
        True,
    ]


# ---- the sender's per-turn state in Redis (channels/whatsapp/sender.py) -------------------------
def _turn_replies(services, turns: list[tuple[str, str]]) -> list[bool]:
    """Whether each (account, wamid) turn's send state still holds the answer sent."""
    from channels.whatsapp.sender import state_key

    r = redis.Redis.from_url(services[1])
    try:
        return [bool(r.hget(state_key(acct, f"turn:{wamid}"), "reply")) for acct, wamid in turns]
    finally:
        r.close()


def test_an_erasure_deletes_the_send_states_of_the_conversations_turns_and_no_one_elses(gw, graph, services):
    """A turn's send state keeps the agent's answer 8 days (a retry sends it, never asks anew):
    erasing Ada's conversation deletes her turns' states; Bob's and tenant B's stay."""
    ada, bob = _wa_id(), _wa_id()
    turns = []
    for acct, wa_id in (("alpha", ada), ("alpha", ada), ("alpha", bob), ("bravo", ada)):
        msg = text(wa_id, f"a question from {wa_id}")
        pnid, secret = NUMBERS[acct]
        before = len(graph.sent_to(wa_id))
        assert post(gw, acct, notification([msg], pnid=pnid), secret=secret).status_code == 200
        wait_until(lambda w=wa_id, n=before: len(graph.sent_to(w)) > n, what=f"the answer to {wa_id}")
        turns.append((acct, msg["id"]))
    wait_until(lambda: all(_turn_replies(services, turns)), what="the turns' answers noted")

    assert _erase(gw, TENANT_A, f"wa:{PNID_A}:{ada}").status_code == 200
    assert _turn_replies(services, turns) == [False, False, True, True]


def test_an_erasure_deletes_the_send_states_an_older_release_kept_unindexed(gw, graph, services, monkeypatch):
    """States kept before the conversation's index existed (its index is deleted here, as the
    previous release never wrote one) are found by the conversation's inbound messages."""
    monkeypatch.setenv("GATEWAY_MASTER_KEY", MASTER_KEY)  # (names keyed as the gateway keys them)
    from channels.whatsapp.sender import index_key

    ada, bob = _wa_id(), _wa_id()
    turns = []
    for wa_id in (ada, bob):
        msg = text(wa_id, f"an older question from {wa_id}")
        before = len(graph.sent_to(wa_id))
        assert post(gw, "alpha", notification([msg], pnid=PNID_A), secret=SECRET_A).status_code == 200
        wait_until(lambda w=wa_id, n=before: len(graph.sent_to(w)) > n, what=f"the answer to {wa_id}")
        turns.append(("alpha", msg["id"]))
    wait_until(lambda: all(_turn_replies(services, turns)), what="the turns' answers noted")
    r = redis.Redis.from_url(services[1])
    try:
        assert r.delete(*(index_key(TENANT_A, f"wa:{PNID_A}:{w}") for w in (ada, bob))) == 2
    finally:
        r.close()

    assert _erase(gw, TENANT_A, f"wa:{PNID_A}:{ada}").status_code == 200
    assert _turn_replies(services, turns) == [False, True]


# ---- runs and ledger: the customer's number is not kept after an erasure -------------------------
LEDGER, RUNS = "gw:{gw}:ledger", "gw:{gw}:runs"


def _tag(tenant: str, conversation: str) -> str:
    """The tag the gateway puts in place of an erased id (its key: derived from the master key)."""
    from core import erasure_key

    return erasure_key.conversation_tag(tenant, conversation, erasure_key._key("", MASTER_KEY, ""))


def _holding(services, tenant: str, wa_id: str) -> dict[str, list[dict]]:
    """The tenant's runs and ledger rows that name the number anywhere an id is kept."""
    like = f"%{wa_id}%"
    return {
        "ledger": rows(
            services[0],
            """SELECT request_id, conversation_id, end_user, customer FROM ledger WHERE tenant = $1
               AND (conversation_id LIKE $2 OR end_user LIKE $2 OR customer LIKE $2)""",
            tenant,
            like,
        ),
        "runs": rows(
            services[0], "SELECT request_id FROM runs WHERE tenant = $1 AND conversation_id LIKE $2", tenant, like
        ),
    }


def _in_flight(conversation: str, wa_id: str, ts: float) -> tuple[dict, dict]:
    """A ledger record and a run of a turn of the conversation, as their writers find them."""
    rid = f"req_{uuid.uuid4().hex}"
    ledger = {
        "request_id": rid, "ts": ts, "tenant": TENANT_A, "user": wa_id, "customer": wa_id, "agent": "wabot",
        "endpoint": "/v1/chat/completions", "model": "agent:wabot", "status": 200, "prompt_tokens": 7,
        "completion_tokens": 3, "cost_usd": 0.25, "latency_ms": 5.0, "step": 1, "conversation_id": conversation,
    }  # fmt: skip
    run = {"request_id": rid, "tenant": TENANT_A, "agent": "wabot", "agent_id": None, "conversation_id": conversation,
           "status": 200, "steps": [], "latency_ms": 5.0, "ts": ts}  # fmt: skip
    return ledger, run


def test_an_erasure_leaves_no_number_in_the_runs_and_ledger_of_its_tenant(gw, graph, services):
    """A WhatsApp conversation's id holds the customer's number, and its turns' ledger rows name
    them as end user and customer too. After the erasure the tenant's runs and ledger rows (kept:
    tokens and cost) hold the conversation's keyed tag instead — those written before it, a turn's
    records still in the streams when it came (written after it), and the writers' dead letters.
    Tenant B's rows of the same number stay as they are; the erasure's record is a keyed hash."""
    ada = _wa_id()
    conv = f"wa:{PNID_A}:{ada}"
    for acct in ("alpha", "bravo"):
        _say(gw, acct, ada, "hello")
        n = 1 if acct == "alpha" else 2
        wait_until(lambda n=n: len(graph.sent_to(ada)) >= n, what=f"{acct}'s answer")
    for tenant in (TENANT_A, TENANT_B):
        wait_until(lambda t=tenant: all(_holding(services, t, ada).values()), what=f"{tenant}'s runs and ledger rows")
    agent_id = rows(services[0], "SELECT id FROM agents WHERE tenant = $1 AND name = 'wabot'", TENANT_A)[0]["id"]
    spent = "SELECT count(*) AS n, sum(cost_usd) AS cost, sum(prompt_tokens) AS tokens FROM ledger WHERE tenant = $1"
    before = rows(services[0], spent, TENANT_A)
    b_before = _holding(services, TENANT_B, ada)
    ours = {t: [x["request_id"] for x in found] for t, found in _holding(services, TENANT_A, ada).items()}
    r = redis.Redis.from_url(services[1])
    try:
        # a refused record of each writer, kept as a dead letter
        dead_ledger, dead_run = _in_flight(conv, ada, time.time() - 60)
        dead_run["agent_id"] = agent_id
        r.xadd(f"{LEDGER}:dead", {"r": orjson.dumps(dead_ledger), "error": "22P02"})
        r.xadd(f"{RUNS}:dead", {"r": orjson.dumps(dead_run), "error": "22P02"})
        erased = _erase(gw, TENANT_A, conv)
        assert erased.status_code == 200, erased.text
        # a turn answered just before the erasure whose records reach the writers after it
        ledger, run = _in_flight(conv, ada, time.time() - 2)
        run["agent_id"] = agent_id
        r.xadd(LEDGER, {"r": orjson.dumps(ledger)})
        r.xadd(RUNS, {"r": orjson.dumps(run)})
        landed = """SELECT (SELECT count(*) FROM ledger WHERE request_id = $1)
                         + (SELECT count(*) FROM runs WHERE request_id = $1) AS n"""
        wait_until(lambda: rows(services[0], landed, ledger["request_id"]) == [{"n": 2}], what="the late records")

        assert _holding(services, TENANT_A, ada) == {"ledger": [], "runs": []}
        tag = _tag(TENANT_A, conv)
        tagged = rows(
            services[0],
            "SELECT DISTINCT conversation_id, end_user, customer FROM ledger WHERE request_id = ANY($1::text[])",
            [*ours["ledger"], ledger["request_id"]],
        )
        assert tagged == [{"conversation_id": tag, "end_user": tag, "customer": tag}]
        runs = "SELECT DISTINCT conversation_id FROM runs WHERE request_id = ANY($1::text[])"
        assert rows(services[0], runs, [*ours["runs"], run["request_id"]]) == [{"conversation_id": tag}]
        after = rows(services[0], spent, TENANT_A)[0]  # the money is all there (one late record more)
        assert (after["n"], after["tokens"]) == (before[0]["n"] + 1, (before[0]["tokens"] or 0) + 7)
        assert _holding(services, TENANT_B, ada) == b_before
        # the dead letters: rewritten, none names the number
        for stream in (f"{LEDGER}:dead", f"{RUNS}:dead"):
            found = [orjson.loads(f[b"r"]) for _, f in r.xrange(stream) if TENANT_A.encode() in f[b"r"]]
            assert found and all(ada not in orjson.dumps(x).decode() for x in found), found
            assert {x["conversation_id"] for x in found} == {tag}
        # the erasure's own records (the agent's, and every agent's: a WhatsApp customer's
        # conversation): a keyed hash, not the id's plain SHA-256
        kept = """SELECT agent_id = '*' AS every_agent, keyed FROM erased_conversations
                  WHERE tenant = $1 AND external_hash = $2 ORDER BY 1"""
        assert rows(services[0], kept, TENANT_A, tag.removeprefix("erased:")) == [
            {"every_agent": False, "keyed": True},
            {"every_agent": True, "keyed": True},
        ]
        # nor the access audit's record of the erasure: the tag in place of the id
        audited = rows(services[0], "SELECT path FROM access_audit WHERE path LIKE $1", f"%{tag}%")
        assert audited and rows(services[0], "SELECT 1 FROM access_audit WHERE path LIKE $1", f"%{ada}%") == []
        plain = hashlib.sha256(conv.encode()).hexdigest()
        assert rows(services[0], "SELECT 1 FROM erased_conversations WHERE external_hash = $1", plain) == []
    finally:
        for stream in (f"{LEDGER}:dead", f"{RUNS}:dead"):
            gone = [i for i, f in r.xrange(stream) if TENANT_A.encode() in f.get(b"r", b"")]
            if gone:
                r.xdel(stream, *gone)
        r.close()


def _erased_jobs(gw: Gateway, acct: str) -> float:
    """The channel's jobs dropped because their conversation was erased after they were queued."""
    import httpx

    want = f'gateway_whatsapp_turns_total{{account="{acct}",outcome="erased"}} '
    found = [line for line in httpx.get(f"{gw.url}/metrics").text.splitlines() if line.startswith(want)]
    return float(found[0].split()[-1]) if found else 0.0


def test_a_message_queued_before_the_erasure_does_not_store_the_conversation_again(gw, graph, services):
    """A customer's message still in the channel's queue when their conversation is erased (here:
    waiting for its burst to end) was handled afterwards and stored it all again — the message's
    words, the conversation in memory, an answer sent. It is the erased conversation's: dropped."""
    ada = _wa_id()
    conv = f"wa:{PNID_C}:{ada}"
    _say(gw, "charlie", ada, "hello")
    wait_until(lambda: graph.sent_to(ada), what="the first answer")
    _wait_stored(services, [conv])
    before = _erased_jobs(gw, "charlie")
    _say(gw, "charlie", ada, "my card is 4111")  # (queued: the burst waits 3 s)
    assert _erase(gw, TENANT_A, conv).status_code == 200
    wait_until(
        lambda: _erased_jobs(gw, "charlie") > before or len(graph.sent_to(ada)) > 1, what="the queued message handled"
    )
    assert len(graph.sent_to(ada)) == 1
    stored = "SELECT 1 FROM conversations WHERE tenant = $1 AND external_id = $2"
    assert rows(services[0], stored, TENANT_A, conv) == []
    words = "SELECT body FROM whatsapp_messages WHERE tenant = $1 AND conversation_id = $2 AND body IS NOT NULL"
    assert rows(services[0], words, TENANT_A, conv) == []
    # the customer writes again after the erasure: a new conversation, answered and stored
    _say(gw, "charlie", ada, "hello again")
    wait_until(lambda: len(graph.sent_to(ada)) == 2, what="the new conversation's answer")
    _wait_stored(services, [conv])


def test_a_turn_under_way_when_its_conversation_is_erased_sends_nothing_and_keeps_nothing(gw, graph, services):
    """The erasure comes while the customer's turn waits for the agent's answer (the model takes
    3 s here): the answer was sent afterwards, to a customer who asked to be forgotten, and kept
    as the turn's state. The turn ends without it; the conversation is not stored again."""
    ada = _wa_id()
    conv = f"wa:{PNID_A}:{ada}"
    _say(gw, "alpha", ada, "hello")
    wait_until(lambda: graph.sent_to(ada), what="the first answer")
    _wait_stored(services, [conv])
    before = _erased_jobs(gw, "alpha")
    _say(gw, "alpha", ada, 'my card is 4111 [[mock:{"delay_ms": 3000}]]')
    recorded = "SELECT 1 FROM whatsapp_messages WHERE tenant = $1 AND conversation_id = $2 AND body LIKE '%4111%'"
    wait_until(lambda: rows(services[0], recorded, TENANT_A, conv), what="the turn under way")
    assert _erase(gw, TENANT_A, conv).status_code == 200
    wait_until(lambda: _erased_jobs(gw, "alpha") > before or len(graph.sent_to(ada)) > 1, what="the turn ended")
    assert len(graph.sent_to(ada)) == 1
    words = "SELECT body FROM whatsapp_messages WHERE tenant = $1 AND conversation_id = $2 AND body IS NOT NULL"
    assert rows(services[0], words, TENANT_A, conv) == []
    stored = "SELECT 1 FROM conversations WHERE tenant = $1 AND external_id = $2"
    assert rows(services[0], stored, TENANT_A, conv) == []


def test_a_message_queued_after_an_erasure_by_a_webhook_whose_clock_is_behind_is_not_dropped(services, monkeypatch):
    """The erasure's mark and a job's queue time are both Redis's clock: a webhook host 2 s behind
    queues the customer's NEW message (after the erasure) and the worker keeps it, while a job
    queued before the mark by a host 2 s ahead is still the erased conversation's."""
    import asyncio

    import redis.asyncio as aioredis

    from channels.whatsapp import erasure
    from core import queue

    tenant, conv = f"clock-{uuid.uuid4().hex[:6]}", f"wa:{PNID_A}:{_wa_id()}"
    real = time.time

    async def go() -> tuple[bool, bool]:
        r = aioredis.from_url(services[1])
        q = queue.Queue(r, f"clock-{uuid.uuid4().hex[:8]}", ordered=True)
        try:
            monkeypatch.setattr(queue.time, "time", lambda: real() + 2.0)  # a webhook host 2 s ahead
            await q.enqueue({"text": "before the erasure"}, key=conv)
            await erasure.mark_erased(r, tenant, [conv])  # the erasure
            monkeypatch.setattr(queue.time, "time", lambda: real() - 2.0)  # the webhook host, 2 s behind
            await q.enqueue({"text": "a new message"}, key=conv)
            monkeypatch.setattr(queue.time, "time", real)
            older, newer = [
                queue._job(orjson.loads(m)) for m in await r.lrange(q._list_key(queue._digest(conv)), 0, -1)
            ]
            return (
                await erasure.erased_since(r, tenant, conv, older.queued_us),
                await erasure.erased_since(r, tenant, conv, newer.queued_us),
            )
        finally:
            await r.delete(erasure.erased_key(tenant, conv))
            async for k in r.scan_iter(match=f"{q.stream}*"):
                await r.delete(k)
            await r.aclose()

    assert asyncio.run(go()) == (True, False)
