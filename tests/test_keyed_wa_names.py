"""WhatsApp's Redis keys, media folders, in-flight notes, holds and dead-letter tags are named by
keyed hashes, never by a plain hash of the conversation (which gives the customer's number back).

A WhatsApp conversation's id is ``wa:<phone_number_id>:<customer's number>``. The channel named
its erasure mark, its send states' and aliases' indexes, its media folder and its in-flight notes
by ``sha256(tenant NUL id)[:32]``, an alias by ``sha256(account|pnid|number)[:32]``, a hold by
``blake2b(tenant NUL agent NUL id)`` and a dead letter's tag by ``blake2b(tenant NUL id)``: a
reviewer who could read a key name (or a note) hashed every number of a country and had the
customer's in under a second. Now each is a keyed hash (``core.erasure_key.name_hash``, keyed
with the deployment's erasure key).

An upgrade loses nothing and leaves nothing: what an older release wrote under the plain names is
renamed when a channel worker starts (``channels.whatsapp.names.upgrade``; holds:
``runtime.hitl.held.upgrade``), and an erasure deletes under both names (what a replica of the
older release wrote after that start). The erasure mark keeps its guarantee across it: a turn
queued before an erasure the older release marked is refused after the upgrade.

The real stack: a gateway process with the channel worker inside (a second one started to play
the upgraded replica), two tenants' accounts, the mock Graph API and the mock LLM."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
import time
import urllib.parse
import uuid
from pathlib import Path

import httpx
import orjson
import pytest
import redis

from core import erasure_key, queued_proof
from tests.conftest import MASTER_KEY, Gateway, environ, run_cli, wait_until
from tests.test_channels_whatsapp import notification, post, rows, text

RUN = uuid.uuid4().hex[:6]
TENANT_A = f"keyed-a-{RUN}"
TENANT_B = f"keyed-b-{RUN}"
PNID_A, PNID_B = "8401", "8402"
SECRET_A, SECRET_B = "keyed-app-secret-0001", "keyed-app-secret-0002"
TOKEN = "graph-token-test"
TEAM = f"keyed-{RUN}"
ASK_PERSON = "I want to talk to a person please"
ENV = {
    "GATEWAY_CHANNEL_WORKER": "1",
    "GATEWAY_WA_VISIBILITY_TIMEOUT": "2",
    "GATEWAY_WA_MAX_RETRIES": "1",
    "GATEWAY_WA_BACKOFF": "0.2",
}
GATEWAY_KEY = {"GATEWAY_MASTER_KEY": MASTER_KEY}  # this process names things as the gateway does
DEAD = "gw:{gw}:q:wa-inbound:dead"
NOTES = "gw:{gw}:wa:inflight"
MEDIA = ("data", "channels", "whatsapp")
# The agent's memory of a conversation is named by the same plain hash as a hold was
# (``runtime.memory.keys``): not the channel's, and left as it is here (another change's).
MEMORY = "gw:{gw}:mem:"


# ---- what an older release named (its functions, as they were) ---------------------------------
def old_digest(tenant: str, conversation: str) -> str:
    return hashlib.sha256(f"{tenant}\x00{conversation}".encode()).hexdigest()[:32]


def old_held(tenant: str, agent_id: str, conversation: str) -> str:
    return hashlib.blake2b(f"{tenant}\x00{agent_id}\x00{conversation}".encode(), digest_size=16).hexdigest()


def old_alias(account: str, pnid: str, number: str) -> str:
    return hashlib.sha256(f"{account}|{pnid}|{number}".encode()).hexdigest()[:32]


def old_tag(tenant: str, conversation: str) -> str:
    return hashlib.blake2b(f"{tenant}\x00{conversation}".encode(), digest_size=16).hexdigest()


def old_names(tenant: str, conversation: str) -> dict[str, str]:
    return {
        "erased": f"gw:{{gw}}:wa:erased:{old_digest(tenant, conversation)}",
        "index": f"gw:{{gw}}:wa:outs:{old_digest(tenant, conversation)}",
        "aliases": f"gw:{{gw}}:wa:aliases:{old_digest(tenant, conversation)}",
    }


def _tenant_folder(tmp_root: Path, tenant: str) -> Path:
    return tmp_root.joinpath(*MEDIA) / hashlib.sha256(tenant.encode()).hexdigest()[:16]


# ---- the stack ----------------------------------------------------------------------------------
def _account(tenant: str, pnid: str, secret: str, key_var: str, graph_url: str) -> dict:
    return {
        "tenant": tenant,
        "phone_numbers": {pnid: "wabot"},
        "app_secret": secret,
        "verify_token": "verify-token-0123",
        "access_token": TOKEN,
        "api_key": f"${{{key_var}}}",
        "graph_base_url": graph_url,
    }


@pytest.fixture(scope="module")
def stack(tmp_root, services, module_mock, graph):
    keys = {}
    for tenant, var in ((TENANT_A, "KEYED_KEY_A"), (TENANT_B, "KEYED_KEY_B")):
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
                "alpha": _account(TENANT_A, PNID_A, SECRET_A, "KEYED_KEY_A", graph.url),
                "bravo": _account(TENANT_B, PNID_B, SECRET_B, "KEYED_KEY_B", graph.url),
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
        yield {"gw": g, "config": config, "keys": keys}
    finally:
        g.stop()


def _admin(gw: Gateway, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, f"{gw.url}{path}", headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=30, **kw)


def _erase(gw: Gateway, tenant: str, conversation: str) -> None:
    quoted = urllib.parse.quote(conversation, safe="")
    r = _admin(gw, "DELETE", f"/admin/agents/wabot/conversations/{quoted}", params={"tenant": tenant})
    assert r.status_code == 200, r.text


def _wa_id() -> str:
    return str(random.randint(10**11, 10**12 - 1))


def _say(gw: Gateway, acct: str, wa_id: str, words: str) -> None:
    pnid, secret = {"alpha": (PNID_A, SECRET_A), "bravo": (PNID_B, SECRET_B)}[acct]
    r = post(gw, acct, notification([text(wa_id, words)], pnid=pnid), secret=secret)
    assert r.status_code == 200, r.text


def _send_file(gw: Gateway, graph, acct: str, wa_id: str, data: bytes) -> None:
    media_id = uuid.uuid4().hex
    graph._post(
        "/_mock/media", {"id": media_id, "data_b64": base64.b64encode(data).decode(), "mime_type": "application/pdf"}
    )
    msg = {"from": wa_id, "id": f"wamid.F{uuid.uuid4().hex}", "timestamp": str(int(time.time())), "type": "document"}
    msg["document"] = {"id": media_id, "mime_type": "application/pdf", "filename": "bill.pdf"}
    pnid, secret = {"alpha": (PNID_A, SECRET_A), "bravo": (PNID_B, SECRET_B)}[acct]
    before = len(graph.sent_to(wa_id))
    assert post(gw, acct, notification([msg], pnid=pnid), secret=secret).status_code == 200
    wait_until(lambda: len(graph.sent_to(wa_id)) > before, what=f"the answer to {wa_id}'s document")


def _escalation(services, tenant: str, conversation: str) -> dict:
    found: list[dict] = []

    def opened() -> bool:
        found[:] = rows(
            services[0],
            "SELECT agent_id, id FROM escalations WHERE tenant = $1 AND conversation_id = $2 AND status <> 'resolved'",
            tenant,
            conversation,
        )
        return bool(found)

    wait_until(opened, what="the escalation")
    return found[0]


def _keys(services) -> list[str]:
    r = redis.Redis.from_url(services[1])
    try:
        return [k.decode() for k in r.scan_iter(count=1000)]
    finally:
        r.close()


def _notes(services) -> list[bytes]:
    r = redis.Redis.from_url(services[1])
    try:
        return r.zrange(NOTES, 0, -1)
    finally:
        r.close()


def _tags(services) -> list[bytes]:
    r = redis.Redis.from_url(services[1])
    try:
        return [f[b"t"] for stream in (f"{DEAD}:tags", f"{DEAD}:tags0") for _, f in r.xrange(stream)]
    finally:
        r.close()


def _paths(tmp_root: Path) -> list[str]:
    return [str(p) for p in tmp_root.joinpath(*MEDIA).rglob("*")]


def _anywhere(services, tmp_root: Path, secret: str) -> list[str]:
    """Where ``secret`` (a name an older release gave) appears: Redis's key names, the in-flight
    notes, the dead letters' tags, the media paths."""
    found = [k for k in _keys(services) if secret in k and not k.startswith(MEMORY)]
    found += [m.decode() for m in _notes(services) if secret.encode() in m]
    found += [t.decode() for t in _tags(services) if secret.encode() in t]
    return found + [p for p in _paths(tmp_root) if secret in p]


# ---- the proof list -----------------------------------------------------------------------------
def test_two_tenants_name_the_same_conversation_differently_and_no_name_is_the_plain_hash():
    from channels.whatsapp import content, dead_letters, erasure, inflight, sender, store
    from runtime.hitl import held

    conv = "wa:8401:491700000001"
    with environ(GATEWAY_KEY):
        names = {
            t: [
                erasure.erased_key(t, conv),
                sender.index_key(t, conv),
                sender.alias_index_key(t, conv),
                str(content.conversation_folder(Path("/r"), t, conv)),
                dead_letters.tag(t, conv),
                held.held_key(t, "agt_1", conv),
            ]
            for t in (TENANT_A, TENANT_B)
        }
        note = asyncio.run(_a_note(inflight, conv))
        alias = sender.alias_key("alpha", "8401", "491700000001")
        # under another key (a deployment's own), other names: they are keyed
        with environ({"GATEWAY_MASTER_KEY": "another-deployment"}):
            elsewhere = store.conversation_digest(TENANT_A, conv)
    assert all(a != b for a, b in zip(names[TENANT_A], names[TENANT_B], strict=True))
    for tenant, made in names.items():
        plain = {old_digest(tenant, conv), old_held(tenant, "agt_1", conv), old_tag(tenant, conv)}
        assert not [n for n in made for p in plain if p in n], made
    assert old_digest(TENANT_A, conv).encode() not in note and b"491700000001" not in note
    assert old_alias("alpha", "8401", "491700000001") not in alias
    with environ(GATEWAY_KEY):
        assert elsewhere != store.conversation_digest(TENANT_A, conv)


async def _a_note(inflight, conv: str) -> bytes:
    class Recorder:
        async def eval(self, script, n, key, member, lease):
            self.member = member

    r = Recorder()
    await inflight.note(r, TENANT_A, conv, "alpha", "deliver:human_reply:x", 1, 1000)
    return r.member


def test_a_whole_flow_leaves_no_plain_hash_of_the_conversation_in_any_name(stack, graph, services, tmp_root):
    """The same number writes to two tenants (a document each: media folders and send states),
    asks tenant A for a person (a hold), is sent a template at a number Meta knows it by (an
    alias and its indexes), and tenant A's conversation is erased (its mark). No Redis key, note,
    tag or media path holds the plain hash of either conversation (nor of the hold, nor of the
    alias) before or after the erasure; the keyed names are the ones in use."""
    from channels.whatsapp import content, erasure, sender
    from runtime.hitl import held

    gw = stack["gw"]
    ada, typed = _wa_id(), _wa_id()
    conv_a, conv_b = f"wa:{PNID_A}:{ada}", f"wa:{PNID_B}:{ada}"
    _send_file(gw, graph, "alpha", ada, f"%PDF a {uuid.uuid4().hex}".encode())
    _send_file(gw, graph, "bravo", ada, f"%PDF b {uuid.uuid4().hex}".encode())
    _say(gw, "alpha", ada, ASK_PERSON)
    esc = _escalation(services, TENANT_A, conv_a)
    template = {"account": "alpha", "name": f"hello_{RUN}", "language": "en_US"}
    assert _admin(gw, "POST", "/admin/channels/whatsapp/templates", json=template).status_code == 201
    graph.configure(wa_ids={typed: ada})
    try:
        body = {"account": "alpha", "phone_number_id": PNID_A, "to": typed, "template": {"name": f"hello_{RUN}"}}
        assert _admin(gw, "POST", "/admin/channels/whatsapp/send", json=body).status_code == 202
        with environ(GATEWAY_KEY):
            alias = sender.alias_key("alpha", PNID_A, typed)
        wait_until(lambda: alias in _keys(services), what="the alias")
    finally:
        graph.configure(wa_ids={})
    plain = [
        old_digest(TENANT_A, conv_a),
        old_digest(TENANT_B, conv_b),
        old_digest(TENANT_A, f"wa:{PNID_A}:{typed}"),
        old_held(TENANT_A, esc["agent_id"], conv_a),
        old_alias("alpha", PNID_A, typed),
    ]
    with environ(GATEWAY_KEY):
        in_use = [
            sender.index_key(TENANT_A, conv_a),
            sender.index_key(TENANT_B, conv_b),
            sender.alias_index_key(TENANT_A, conv_a),
            held.held_key(TENANT_A, esc["agent_id"], conv_a),
        ]
        root = tmp_root.joinpath(*MEDIA)
        folders = [content.conversation_folder(root, t, c) for t, c in ((TENANT_A, conv_a), (TENANT_B, conv_b))]
        mark = erasure.erased_key(TENANT_A, conv_a)
    keys = _keys(services)
    assert [k for k in in_use if k not in keys] == []
    assert all(f.is_dir() for f in folders), folders
    assert {p: _anywhere(services, tmp_root, p) for p in plain} == {p: [] for p in plain}

    _erase(gw, TENANT_A, conv_a)
    keys = _keys(services)
    assert mark in keys and in_use[1] in keys and in_use[0] not in keys
    assert not folders[0].exists() and folders[1].is_dir()
    assert {p: _anywhere(services, tmp_root, p) for p in plain} == {p: [] for p in plain}


# ---- the upgrade --------------------------------------------------------------------------------
def _write_older_release(services, tmp_root: Path, tenant: str, number: str, hold: tuple[str, str] | None) -> dict:
    """What an older release kept of the conversation, under its names: a turn's send state (the
    answer) in the conversation's index, an alias of the number in its aliases' index, a stored
    document, an in-flight note of a person's reply, a dead letter tagged with the plain tag, and
    (``hold``: the gateway's hold of an open escalation, (agent id, escalation id)) the hold,
    renamed to the plain name."""
    conv = f"wa:{PNID_A}:{number}"
    names = old_names(tenant, conv)
    with environ(GATEWAY_KEY):
        from channels.whatsapp import sender
        from runtime.hitl import held

        state = sender.state_key("alpha", f"turn:wamid.OLD{uuid.uuid4().hex}")
        hold_key = held.held_key(tenant, hold[0], conv) if hold else None
    alias = f"gw:{{gw}}:wa:alias:{old_alias('alpha', PNID_A, number)}"
    folder = _tenant_folder(tmp_root, tenant) / f"c-{old_digest(tenant, conv)}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{uuid.uuid4().hex}.pdf").write_bytes(b"%PDF the older release's")
    note = {"t": tenant, "d": old_digest(tenant, conv), "h": "0" * 64, "a": "alpha", "k": "deliver:x", "q": 1, "n": "o"}
    letter = {
        "id": uuid.uuid4().hex,
        "payload": {"tenant": tenant, "account": "alpha", "pnid": PNID_A, "wa_id": number},
    }
    r = redis.Redis.from_url(services[1])
    try:
        r.hset(state, mapping={"started": "1", "reply": f"the answer to {number}"})
        r.expire(state, 600)
        r.sadd(names["index"], state)
        r.set(alias, number, ex=600)
        r.sadd(names["aliases"], alias)
        r.zadd(NOTES, {orjson.dumps(note): time.time() * 1000 + 600_000})
        from core.dead_tags import DEAD_TAGGED

        r.eval(DEAD_TAGGED, 2, DEAD, f"{DEAD}:tags", 10_000, old_tag(tenant, conv), "m", orjson.dumps(letter))
        if hold:
            assert r.rename(hold_key, f"gw:{{gw}}:hitl:held:{old_held(tenant, hold[0], conv)}")
    finally:
        r.close()
    secrets = [old_digest(tenant, conv), old_alias("alpha", PNID_A, number), old_tag(tenant, conv)]
    if hold:
        secrets.append(old_held(tenant, hold[0], conv))
    return {"conv": conv, "state": state, "secrets": secrets, "folder": folder}


def _left(services, tmp_root: Path, older: dict) -> dict:
    """What is left of the older release's data, under either name."""
    r = redis.Redis.from_url(services[1])
    try:
        state = r.hgetall(older["state"])
    finally:
        r.close()
    conv = older["conv"]
    with environ(GATEWAY_KEY):
        from channels.whatsapp import content, store

        keyed = store.conversation_digest(TENANT_A, conv)
        folder = content.conversation_folder(tmp_root.joinpath(*MEDIA), TENANT_A, conv)
    return {
        "state": state,
        "plain": {s: _anywhere(services, tmp_root, s) for s in older["secrets"]},
        "keyed": [k for k in _keys(services) if keyed in k and ":wa:erased:" not in k],  # (the mark stays)
        "files": [str(p) for p in (folder, older["folder"]) if p.exists()],
    }


def _upgraded_replica(stack, tmp_root, services) -> None:
    """A replica of this release starts (its channel worker renames what the older one named) and
    stops. As on the first start of this release in a deployment: the marks that a pass over Redis
    found nothing to rename (``names.DONE``, ``held.UPGRADE_DONE``; the module's gateway left them)
    are cleared."""
    from channels.whatsapp import names
    from runtime.hitl import held

    r = redis.Redis.from_url(services[1])
    try:
        r.delete(names.DONE, held.UPGRADE_DONE)
    finally:
        r.close()
    with environ({**ENV, **stack["keys"]}):
        g = Gateway(tmp_root, stack["config"], services)
    g.stop()


def test_an_erasure_after_the_upgrade_deletes_what_the_older_release_wrote_under_either_name(
    stack, graph, services, tmp_root
):
    """Carl's data is written as the older release wrote it, then a replica of this release
    starts: it is renamed (nothing under the plain names, all of it under the keyed ones, the hold
    still holding). Dora's is written after that start (a replica of the older release still
    running): not renamed. Erasing either conversation leaves nothing under either name."""
    gw = stack["gw"]
    carl, dora = _wa_id(), _wa_id()
    _say(gw, "alpha", carl, ASK_PERSON)
    esc = _escalation(services, TENANT_A, f"wa:{PNID_A}:{carl}")
    older = _write_older_release(services, tmp_root, TENANT_A, carl, (esc["agent_id"], esc["id"]))
    _upgraded_replica(stack, tmp_root, services)

    renamed = _left(services, tmp_root, older)
    assert renamed["state"]  # (not erased yet)
    # (the dead letter's plain tag is not renamed: it goes with its letter, which an erasure drops by
    # either tag, and the letter holds the number itself)
    tag = old_tag(TENANT_A, older["conv"])
    assert renamed["plain"] == {s: ([tag] if s == tag else []) for s in older["secrets"]}
    assert renamed["files"] == [renamed["files"][0]] and "c-k" in renamed["files"][0]
    with environ(GATEWAY_KEY):
        from channels.whatsapp import sender, store
        from runtime.hitl import held

        keyed = store.conversation_digest(TENANT_A, older["conv"])
        hold = held.held_key(TENANT_A, esc["agent_id"], older["conv"])
        index = sender.index_key(TENANT_A, older["conv"])
    r = redis.Redis.from_url(services[1])
    try:
        assert r.get(hold) == esc["id"].encode()
        assert older["state"].encode() in r.smembers(index)  # (merged with the turn of this release's)
        assert [n for n in _notes(services) if keyed.encode() in n]
    finally:
        r.close()
    # the conversation is still held after the upgrade: the customer's message joins the escalation
    joined = "SELECT 1 FROM escalations WHERE id = $1 AND customer_messages > 0"
    assert not rows(services[0], joined, esc["id"])
    _say(gw, "alpha", carl, "are you there")
    wait_until(lambda: rows(services[0], joined, esc["id"]), what="the message joining the held escalation")
    assert "echo: are you there" not in [m.get("text") for m in graph.sent_to(carl)]

    later = _write_older_release(services, tmp_root, TENANT_A, dora, None)
    for who, data in ((carl, older), (dora, later)):
        _erase(gw, TENANT_A, data["conv"])
        left = _left(services, tmp_root, data)
        assert left == {"state": {}, "plain": {s: [] for s in data["secrets"]}, "keyed": [], "files": []}, who


def test_a_turn_queued_before_an_erasure_the_older_release_marked_is_refused_after_the_upgrade(
    stack, services, tmp_root
):
    """The older release's mark (8 days) of an erasure: before the upgrade's renaming the worker's
    check reads it under either name; after it the mark is under the keyed name (the gateway's
    check, ``gateway.agent_stage``, reads that one), with its time and its time to live, and a turn
    queued before it is refused with 409 ``conversation_erased``, one queued after it is not."""
    from channels.whatsapp import erasure

    eve = _wa_id()
    conv = f"wa:{PNID_A}:{eve}"
    r = redis.Redis.from_url(services[1])
    try:
        seconds, micros = r.time()
        mark = f"{seconds}.{micros:06d}"
        r.set(old_names(TENANT_A, conv)["erased"], mark, ex=8 * 86400)
    finally:
        r.close()
    queued = erasure_key.mark_micros(mark) - 1

    async def worker_check() -> bool:
        import redis.asyncio as aioredis

        ar = aioredis.from_url(services[1])
        try:
            return await erasure.erased_since(ar, TENANT_A, conv, queued)
        finally:
            await ar.aclose()

    with environ(GATEWAY_KEY):
        assert asyncio.run(worker_check())  # (not renamed yet: read under the older name too)
    _upgraded_replica(stack, tmp_root, services)
    with environ(GATEWAY_KEY):
        key = erasure.erased_key(TENANT_A, conv)
        assert asyncio.run(worker_check())
    r = redis.Redis.from_url(services[1])
    try:
        assert r.get(key) == mark.encode() and 0 < r.ttl(key) <= 8 * 86400
        assert not r.exists(old_names(TENANT_A, conv)["erased"])
    finally:
        r.close()
    signing = erasure_key._key("", MASTER_KEY, "")
    for at, status in ((queued, 409), (queued + 2, 200)):
        resp = httpx.post(
            f"{stack['gw'].url}/v1/chat/completions",
            json={
                "model": "agent:wabot",
                "messages": [{"role": "user", "content": "hi"}],
                "metadata": {"conversation_id": conv},
            },
            headers={
                "Authorization": f"Bearer {stack['keys']['KEYED_KEY_A']}",
                queued_proof.HEADER: queued_proof.sign(TENANT_A, conv, at, signing),
            },
            timeout=30,
        )
        assert resp.status_code == status, resp.text
        if status == 409:
            assert resp.json()["error"]["code"] == "conversation_erased"


def test_a_process_whose_erasure_key_is_not_the_deployments_says_so_in_the_log(services, caplog):
    """Names are keyed, so a process with another key (a worker run apart without the deployment's
    key, a master key rotated without ``GATEWAY_ERASURE_KEY``) names a conversation's keys and
    folders differently, and the others' erasures miss what it writes: it says so, loudly. The
    first process leaves the keyed hash of nothing in Redis (no key in it); the others compare."""
    url = f"{services[1]}?db=11"  # (a database of its own: the suite's gateways share the first)

    async def same() -> bool:
        import redis.asyncio as aioredis

        ar = aioredis.from_url(url)
        try:
            return await erasure_key.same_key_as_deployment(ar)
        finally:
            await ar.aclose()

    r = redis.Redis.from_url(url)
    try:
        r.delete(erasure_key.KEY_CHECK)
        with environ(GATEWAY_KEY):
            assert asyncio.run(same()) and asyncio.run(same())
        assert "erasure key is not" not in caplog.text
        with environ({"GATEWAY_MASTER_KEY": "a-rotated-master-key"}):
            assert not asyncio.run(same())
        assert "erasure key is not the one the deployment's names were made with" in caplog.text
        assert MASTER_KEY.encode() not in r.get(erasure_key.KEY_CHECK)
    finally:
        r.delete(erasure_key.KEY_CHECK)
        r.close()


def test_the_renaming_pass_over_redis_is_not_repeated_at_every_start_once_it_found_nothing(services, tmp_path):
    """A pass reads the whole keyspace (``SCAN``, a page a round trip): one that renamed something
    (an older release's replica may still be writing) is made again at the next start, one that
    found nothing marks the work done (for a week), and the starts after it make none."""
    from channels.whatsapp import names

    url = f"{services[1]}?db=11"  # (a database of its own)
    legacy = "gw:{gw}:wa:erased:" + old_digest(TENANT_A, "wa:1:2")

    async def start() -> names.Upgraded:
        import redis.asyncio as aioredis

        ar = aioredis.from_url(url)
        try:
            return await names.upgrade(ar, tmp_path)
        finally:
            await ar.aclose()

    r = redis.Redis.from_url(url)
    try:
        r.delete(names.DONE)
        r.set(legacy, "1700000000.000001", ex=600)
        with environ(GATEWAY_KEY):
            assert start_keys(start) == 1 and not r.exists(names.DONE)
            assert start_keys(start) == 0 and 0 < r.ttl(names.DONE) <= names.DONE_TTL
            r.set(legacy, "1700000000.000002", ex=600)  # (not looked for again: erased under both names)
            assert start_keys(start) == 0 and r.exists(legacy)
    finally:
        r.delete(names.DONE, legacy)
        r.close()


def start_keys(start) -> int:
    return asyncio.run(start()).keys
