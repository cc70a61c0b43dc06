"""Admin paths that depended on what they do not need (found by the s32 hardening review).

- A person's reply to an escalation took Redis's time (``redis_now_us``) before every reply, so a
  Redis that could not answer refused (503) replies to API clients' and VAPI calls'
  conversations too, though only a WhatsApp conversation's erasure is marked and compared with
  that time. Now only a reply to a conversation the erasure marks asks Redis for the time.
- Saving an agent's tools (POST / PATCH ``/admin/agents``) checked their schemas against the
  2020-12 metaschema on the event loop: up to ~1.1 s within the caps, during which every request
  of every tenant on the replica waited. Now the check runs in a worker thread, at most
  ``admin_agents.SCHEMA_CHECKS`` saves at a time (one), with the same 400s.

The gateway process is launched with Redis's clock failing as a dead Redis fails a call
(``admin_escalations.redis_now_us`` raising ``redis.exceptions.ConnectionError``; the rest of
Redis answers: the reply's memory write needs it, as it did before erasures were marked) and
with ``Draft202012Validator.check_schema`` wrapped to write down whether it ran on the main
thread (the event loop's). The real stack otherwise: the WhatsApp channel's key (whose
conversations the erasure marks), the mock LLM, the mock Graph API, the embedded PostgreSQL and
Valkey."""

from __future__ import annotations

import asyncio
import contextlib
import textwrap
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.conftest import (
    MASTER_KEY,
    Gateway,
    environ,
    run_cli,
    wait_until,
)
from tests.pg_locks import blocked_by
from tests.test_channels_whatsapp import rows
from tests.test_wa_dead_letters_erasure import _account

RUN = uuid.uuid4().hex[:6]
TENANT = f"s32-{RUN}"
PNID = "8432"
ASK_PERSON = "I want to talk to a person please"
HANDOFF = "A person will answer."

LAUNCHER = textwrap.dedent(
    """
    import os
    import sys
    import threading

    import redis.exceptions as redis_errors
    from jsonschema import Draft202012Validator

    from gateway import admin  # (first: admin_escalations is imported by it)
    from gateway import admin_escalations


    async def redis_now_us(redis):
        # Redis's clock out of reach, as a dead Redis fails a call
        raise redis_errors.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")


    admin_escalations.redis_now_us = redis_now_us

    _check_schema = Draft202012Validator.check_schema.__func__


    def check_schema(cls, schema, *args, **kwargs):
        on_main = threading.current_thread() is threading.main_thread()
        with open(os.environ["S32_SCHEMA_CHECKS"], "a") as f:
            f.write("main\\n" if on_main else "worker\\n")
        return _check_schema(cls, schema, *args, **kwargs)


    Draft202012Validator.check_schema = classmethod(check_schema)

    from gateway.cli import main

    sys.exit(main())
    """
)


class LaunchedGateway(Gateway):
    """The gateway as ``LAUNCHER`` patches it; its metaschema checks are written to ``checks``."""

    def __init__(self, tmp: Path, config: dict, urls: tuple[str, str], checks: Path) -> None:
        self.checks = checks
        env = {"GATEWAY_CHANNEL_WORKER": "0", "S32_SCHEMA_CHECKS": str(checks)}
        super().__init__(tmp, config, urls, launcher=LAUNCHER, launcher_name="s32_gateway", env=env)


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock, graph):
    out = run_cli("keys", "create", "--name", "whatsapp", "--tenant", TENANT, urls=services, tmp=tmp_root)
    assert out.returncode == 0, out.stderr
    channel_key = out.stdout.splitlines()[0].strip()
    config = {
        "router": {"max_attempts": 1},
        "providers": [{"name": "llm", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k"]}],
        "models": [{"name": "agent-model", "deployments": [{"provider": "llm", "model": "m"}]}],
        "channels": {"whatsapp": {"s32": _account(TENANT, PNID, "s32-app-secret-0001", "S32_KEY", graph.url)}},
    }
    checks = tmp_root / f"s32-schema-checks-{RUN}.log"
    with environ({"S32_KEY": channel_key}):
        g = LaunchedGateway(tmp_root, config, services, checks)
    g.channel_key = channel_key
    try:
        r = _admin(g, "POST", "/admin/keys", json={"name": "web", "tenant": TENANT})
        assert r.status_code == 201, r.text
        g.web_key = r.json()["key"]
        body = _agent(
            "helper", variables={}, escalation={"enabled": True, "threshold": 0.5, "handoff_message": HANDOFF}
        )
        r = _admin(g, "POST", "/admin/agents", json=body)
        assert r.status_code == 201, r.text
        yield g
    finally:
        g.stop()


def _agent(name: str, **settings) -> dict:
    """A create body of the module's tenant: ``name`` on ``agent-model``, and ``settings``."""
    return {"name": name, "tenant": TENANT, "model": "agent-model", "template": "You help.", **settings}


def _admin(gw, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, f"{gw.url}{path}", headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=60, **kw)


def _escalated(gw, services, key: str, conv: str, agent: str = "helper") -> str:
    """The customer of ``conv`` asks ``agent`` for a person (a turn with ``key``): the escalation's id, claimed."""
    body = {
        "model": f"agent:{agent}",
        "messages": [{"role": "user", "content": ASK_PERSON}],
        "metadata": {"conversation_id": conv},
    }
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert r.status_code == 200, r.text
    sql = "SELECT id FROM escalations WHERE tenant = $1 AND conversation_id = $2"
    wait_until(lambda: rows(services[0], sql, TENANT, conv), what="the escalation")
    esc = rows(services[0], sql, TENANT, conv)[0]["id"]
    assert _admin(gw, "POST", f"/admin/escalations/{esc}/claim").status_code == 200
    return esc


def _conversation(gw, esc: str) -> list[dict]:
    r = _admin(gw, "GET", f"/admin/escalations/{esc}")
    assert r.status_code == 200, r.text
    return r.json()["conversation"]


# ---- a person's reply, Redis's clock out of reach ---------------------------------------------------
@pytest.mark.parametrize("who", ["api", "vapi"])
def test_a_reply_to_a_conversation_no_channel_marks_does_not_need_redis_time(gw, services, who):
    """Redis's clock fails as a dead Redis fails a call: a person's reply (``/reply``, and
    ``/resolve`` with ``reply``) to an API client's or a VAPI call's conversation is stored and
    reported as before erasures were marked."""
    key = gw.web_key if who == "api" else gw.channel_key
    prefix = "web-" if who == "api" else "vapi:call-"
    conv = f"{prefix}{uuid.uuid4().hex[:10]}"
    esc = _escalated(gw, services, key, conv)
    words = f"a person answers {uuid.uuid4().hex[:8]}"
    r = _admin(gw, "POST", f"/admin/escalations/{esc}/reply", json={"text": words})
    assert r.status_code == 200, r.text
    assert (r.json()["delivery"]["channel"], r.json()["delivery"]["status"]) == ("api", "stored")
    assert words in [m.get("content") for m in _conversation(gw, esc)]

    later = f"and resolves it {uuid.uuid4().hex[:8]}"
    r = _admin(gw, "POST", f"/admin/escalations/{esc}/resolve", json={"reply": later})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "resolved" and r.json()["delivery"]["status"] == "stored", r.text
    assert later in [m.get("content") for m in _conversation(gw, esc)]


def test_a_reply_to_a_whatsapp_conversation_still_needs_redis_time(gw, services, graph):
    """The erasure marks a WhatsApp conversation on Redis's clock: a reply it cannot time is
    refused for now (503), neither stored nor sent, the escalation still open."""
    wa_id = str(uuid.uuid4().int % 10**12 + 10**11)
    conv = f"wa:{PNID}:{wa_id}"
    esc = _escalated(gw, services, gw.channel_key, conv)
    words = f"a person answers {uuid.uuid4().hex[:8]}"
    for path, body in (("reply", {"text": words}), ("resolve", {"reply": words})):
        r = _admin(gw, "POST", f"/admin/escalations/{esc}/{path}", json=body)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "server_error"
    assert words not in [m.get("content") for m in _conversation(gw, esc)]
    assert all(words not in (s.get("text") or "") for s in graph.sent_to(wa_id))
    state = _admin(gw, "GET", f"/admin/escalations/{esc}").json()
    assert state["status"] == "claimed" and state["delivery"] is None, state


# ---- tool schemas at save, off the event loop ---------------------------------------------------------
def _tool(name: str, parameters: dict) -> dict:
    config = {"url": "https://tools.invalid/x", "allowed_hosts": ["tools.invalid"], "method": "POST"}
    return {"name": name, "kind": "http", "description": "a tool", "parameters": parameters, "config": config}


def _checks(gw) -> list[str]:
    return gw.checks.read_text().split() if gw.checks.exists() else []


def test_saving_an_agents_tools_checks_their_schemas_off_the_event_loop(gw):
    """POST and PATCH with tools: every metaschema check ran in a worker thread, none on the main
    thread (the event loop's)."""
    before = len(_checks(gw))
    name = f"tooled-{uuid.uuid4().hex[:6]}"
    schema = {"type": "object", "properties": {"q": {"type": "string"}}}
    body = _agent(name, tools=[_tool("a", schema)])
    r = _admin(gw, "POST", "/admin/agents", json=body)
    assert r.status_code == 201, r.text
    r = _admin(gw, "PATCH", f"/admin/agents/{name}", json={"tools": [_tool("a", schema), _tool("b", schema)]})
    assert r.status_code == 200, r.text
    assert [t["name"] for t in r.json()["tools"]] == ["a", "b"], r.text
    assert _checks(gw)[before:] == ["worker"] * 3


@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_an_invalid_tool_schema_is_still_a_400_naming_it_and_stores_nothing(gw, method):
    name = f"badtool-{uuid.uuid4().hex[:6]}"
    good = _tool("a", {"type": "object"})
    bad = _tool("b", {"type": "object", "properties": {"q": {"type": "string", "minLength": -1}}})
    body = _agent(name, tools=[good])
    if method == "PATCH":
        assert _admin(gw, "POST", "/admin/agents", json=body).status_code == 201
        r = _admin(gw, "PATCH", f"/admin/agents/{name}", json={"tools": [good, bad]})
    else:
        r = _admin(gw, "POST", "/admin/agents", json={**body, "tools": [good, bad]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "invalid_tool",
        "tools[1].parameters.properties.q.minLength",
    ), error
    after = _admin(gw, "GET", f"/admin/agents/{name}", params={"tenant": TENANT})
    if method == "PATCH":
        assert [t["name"] for t in after.json()["tools"]] == ["a"], after.text
    else:
        assert after.status_code == 404, after.text


@contextlib.asynccontextmanager
async def _locked(services, lock: str) -> AsyncIterator[tuple[asyncpg.Connection, Callable[[], Awaitable[None]]]]:
    """Another session holding ``lock`` (a statement taking a lock to the end of its transaction,
    given ``TENANT``) until ``release()`` (its commit): its connection, to poll ``_waiting``."""
    holder = await asyncpg.connect(services[0])
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute(lock, TENANT)
        yield holder, tx.commit
    finally:
        await holder.close()


def _agents_locked(services):
    """The tenant's agents lock (``check_agent_room``'s, taken by every agent change) held."""
    return _locked(services, "SELECT pg_advisory_xact_lock(hashtext('gateway-agents:' || $1))")


def _storage_locked(services):
    """The tenant's storage lock (``storage_quota.lock``, taken by an approval's indexing after it
    locked the agent's row) held."""
    return _locked(services, "SELECT pg_advisory_xact_lock(hashtextextended('openai_files:' || $1, 0))")


async def _waiting(holder, n: int, tasks: list) -> None:
    """Until ``n`` transactions wait behind ``holder``'s lock, or one of ``tasks`` is done (a
    failure its test reads): bounded, then what the database's sessions were doing."""
    for _ in range(3000):  # (~60 s: a full run loads this host heavily)
        count = await blocked_by(holder, holder.get_server_pid())
        if count >= n or any(t.done() for t in tasks):
            return
        await asyncio.sleep(0.02)
    await holder.execute("SELECT pg_stat_clear_snapshot()")  # (not the transaction's first read)
    sessions = await holder.fetch(
        """SELECT state, wait_event_type, wait_event, left(query, 160) AS query FROM pg_stat_activity
           WHERE datname = current_database() AND pid <> pg_backend_pid()"""
    )
    raise AssertionError(f"{n} changes neither waited on a lock nor finished: {[dict(r) for r in sessions]}")


def test_two_patches_of_one_agent_at_once_both_keep_their_fields(gw, services):
    """Two admins change one agent at once, one its tools, the other its memory: each PATCH read
    the agent's settings, then wrote them back whole with its own field changed, so the one
    that committed last put the other's field back as it was (a tool an operator took away
    returned). Made to interleave by holding the tenant's agents lock (``check_agent_room``,
    taken by every change after it read the agent) until both wait on a lock."""
    name = f"twice-{uuid.uuid4().hex[:6]}"
    schema = {"type": "object"}
    body = _agent(name, tools=[_tool("a", schema)], memory={"window_turns": 5})
    assert _admin(gw, "POST", "/admin/agents", json=body).status_code == 201
    headers = {"Authorization": f"Bearer {MASTER_KEY}"}
    path = f"{gw.url}/admin/agents/{name}?tenant={TENANT}"

    async def go() -> list[httpx.Response]:
        async with (
            _agents_locked(services) as (holder, release),
            httpx.AsyncClient(headers=headers, timeout=60) as client,
        ):
            patches = [
                asyncio.create_task(client.patch(path, json={"tools": [_tool("a", schema), _tool("b", schema)]})),
                asyncio.create_task(client.patch(path, json={"memory": {"window_turns": 7}})),
            ]
            await _waiting(holder, 2, patches)
            await release()
            return await asyncio.gather(*patches)

    for r in asyncio.run(go()):
        assert r.status_code == 200, r.text
    agent = _admin(gw, "GET", f"/admin/agents/{name}", params={"tenant": TENANT}).json()
    assert [t["name"] for t in agent["tools"]] == ["a", "b"], agent
    assert agent["memory"]["window_turns"] == 7, agent


def test_approving_a_learned_answer_while_the_agent_is_patched_keeps_the_patch(gw, services):
    """The first approved answer of an agent attaches its learned-answers knowledge base: the
    settings of the agent read before (unlocked) with the knowledge base added, written back
    whole. A PATCH of its tools committed meanwhile was undone. Made to interleave by holding
    the tenant's agents lock (taken by the PATCH, with the agent's row) until the approval waits
    too."""
    name = f"learner-{uuid.uuid4().hex[:6]}"
    body = _agent(name, escalation={"enabled": True, "threshold": 0.5, "handoff_message": HANDOFF})
    assert _admin(gw, "POST", "/admin/agents", json=body).status_code == 201
    esc = _escalated(gw, services, gw.web_key, f"web-{uuid.uuid4().hex[:10]}", agent=name)
    answer = "We ship to Iceland within six working days."
    r = _admin(gw, "POST", f"/admin/escalations/{esc}/resolve", json={"corrected_answer": answer})
    assert r.status_code == 200, r.text
    example = r.json()["learned_example"]["id"]
    headers = {"Authorization": f"Bearer {MASTER_KEY}"}
    schema = {"type": "object"}

    async def go() -> list[httpx.Response]:
        async with (
            _agents_locked(services) as (holder, release),
            httpx.AsyncClient(base_url=gw.url, headers=headers, timeout=60) as client,
        ):
            patch = asyncio.create_task(
                client.patch(f"/admin/agents/{name}?tenant={TENANT}", json={"tools": [_tool("a", schema)]})
            )
            await _waiting(holder, 1, [patch])
            approve = asyncio.create_task(
                client.post(f"/admin/agents/{name}/learned/{example}/approve?tenant={TENANT}")
            )
            await _waiting(holder, 2, [patch, approve])
            await release()
            return await asyncio.gather(patch, approve)

    for r in asyncio.run(go()):
        assert r.status_code == 200, r.text
    kb = r.json()["kb_id"]
    agent = _admin(gw, "GET", f"/admin/agents/{name}", params={"tenant": TENANT}).json()
    assert kb in agent["knowledge_bases"], agent
    assert [t["name"] for t in agent.get("tools") or []] == ["a"], agent


def test_a_patch_while_a_learned_answer_is_being_approved_keeps_the_knowledge_base(gw, services):
    """The other order: the approval has locked the agent's row (attaching its learned-answers
    knowledge base) and waits on the tenant's storage lock, held here, when a PATCH of its tools
    comes: the PATCH waits for the approval's commit, then changes the agent as the approval left
    it. Both 200 (no deadlock: the PATCH takes the agent's row first, as the approval does), the
    agent with the knowledge base and the tools."""
    name = f"learner-{uuid.uuid4().hex[:6]}"
    body = _agent(name, escalation={"enabled": True, "threshold": 0.5, "handoff_message": HANDOFF})
    assert _admin(gw, "POST", "/admin/agents", json=body).status_code == 201
    esc = _escalated(gw, services, gw.web_key, f"web-{uuid.uuid4().hex[:10]}", agent=name)
    r = _admin(gw, "POST", f"/admin/escalations/{esc}/resolve", json={"corrected_answer": "Six working days."})
    assert r.status_code == 200, r.text
    example = r.json()["learned_example"]["id"]
    headers = {"Authorization": f"Bearer {MASTER_KEY}"}

    async def go() -> list[httpx.Response]:
        async with (
            _storage_locked(services) as (holder, release),
            httpx.AsyncClient(base_url=gw.url, headers=headers, timeout=60) as client,
        ):
            approve = asyncio.create_task(
                client.post(f"/admin/agents/{name}/learned/{example}/approve?tenant={TENANT}")
            )
            await _waiting(holder, 1, [approve])
            assert not approve.done(), approve.result().text  # (it waits on the storage lock)
            patch = asyncio.create_task(
                client.patch(f"/admin/agents/{name}?tenant={TENANT}", json={"tools": [_tool("a", {"type": "object"})]})
            )
            await _waiting(holder, 2, [approve, patch])
            assert not patch.done(), patch.result().text  # (it waits on the agent's row)
            await release()
            return await asyncio.gather(approve, patch)

    approved, patched = asyncio.run(go())
    assert approved.status_code == 200, approved.text
    assert patched.status_code == 200, patched.text
    kb = approved.json()["kb_id"]
    agent = _admin(gw, "GET", f"/admin/agents/{name}", params={"tenant": TENANT}).json()
    assert kb in agent["knowledge_bases"], agent
    assert [t["name"] for t in agent.get("tools") or []] == ["a"], agent


def test_one_save_checks_tool_schemas_at_a_time(monkeypatch):
    """Many saves at once wait for their turn on the event loop, not in the default executor: one
    check runs, the others have not taken a thread. (One, not two: the check is pure Python, so
    two threads finish no sooner than one after the other, and the event loop, which needs the
    GIL between them, was held ~15-20 ms a wake-up at the median and 90-240 ms at the 99th
    percentile with two running against ~1-5 and ~13-15 ms with one.) The admin object's own
    check, in this process; the executor counts what it was given to run."""
    from jsonschema import Draft202012Validator

    from gateway.admin_agents import SCHEMA_CHECKS, AgentAdmin

    assert SCHEMA_CHECKS == 1
    gate = threading.Event()
    real = Draft202012Validator.check_schema.__func__

    class Counting(ThreadPoolExecutor):
        submitted = 0

        def submit(self, fn, /, *args, **kwargs):
            Counting.submitted += 1
            return super().submit(fn, *args, **kwargs)

    def held(cls, schema, *args, **kwargs):
        gate.wait(30)  # bounded: released below once the count is read
        return real(cls, schema, *args, **kwargs)

    async def saves() -> list[dict]:
        executor = Counting(max_workers=8)
        asyncio.get_running_loop().set_default_executor(executor)
        admin = AgentAdmin(admin=None)
        data = {"tools": [_tool("a", {"type": "object"})]}
        tasks = [asyncio.create_task(admin.checked_settings(data, f"t{i}")) for i in range(6)]  # 6 tenants
        for _ in range(10):  # every task runs up to its wait (no thread finishes: the gate is shut)
            await asyncio.sleep(0)
        submitted = Counting.submitted
        gate.set()
        out = await asyncio.gather(*tasks)
        assert submitted == 1, submitted
        return out

    monkeypatch.setattr(Draft202012Validator, "check_schema", classmethod(held))
    try:
        settings = asyncio.run(saves())
    finally:
        gate.set()
    assert [s["tools"][0]["name"] for s in settings] == ["a"] * 6


def test_attack_one_tenant_saving_many_tools_at_once_does_not_hold_every_schema_check(monkeypatch):
    """A tenant admin sends many saves with tools at once (each up to ~1.1 s of checking at the
    caps, 600 admin calls a minute): its saves take their turn one at a time, so another tenant's
    save is checked next instead of waiting behind the whole queue. (In process, as above: the
    executor records whose check it was given to run, in order.)"""
    from gateway.admin_agents import TENANT_SAVES_WAITING, AgentAdmin

    class Recording(ThreadPoolExecutor):
        tenants: list[str] = []

        def submit(self, fn, /, *args, **kwargs):
            # asyncio.to_thread submits partial(context.run, check_settings, data)
            Recording.tenants.append(fn.args[-1]["tools"][0]["name"])
            return super().submit(fn, *args, **kwargs)

    async def saves() -> None:
        asyncio.get_running_loop().set_default_executor(Recording(max_workers=8))
        admin = AgentAdmin(admin=None)
        noisy = {"tools": [_tool("noisy", {"type": "object"})]}
        flood = [asyncio.create_task(admin.checked_settings(noisy, "noisy")) for _ in range(TENANT_SAVES_WAITING)]
        other = asyncio.create_task(admin.checked_settings({"tools": [_tool("quiet", {"type": "object"})]}, "quiet"))
        await asyncio.gather(*flood, other)  # (the flood's saves come first to their waits)
        assert admin._tenant_turns == {}  # nothing kept once no save waits

    asyncio.run(saves())
    assert Recording.tenants[:2] == ["noisy", "quiet"], Recording.tenants


def test_attack_one_tenant_cannot_queue_saves_without_bound(monkeypatch):
    """Saves come in faster than they are checked (600 admin calls a minute against about one
    check a second at the caps): each waiting save holds its parsed body (up to 256 KB of JSON),
    so one tenant's flood grew the replica's memory by the minute. A tenant has at most
    ``TENANT_SAVES_WAITING`` saves with tools checked or waiting; the next is a 429 naming
    ``tools`` (retry-after), stores nothing, and the others go on. The super-admin is not bound."""
    from jsonschema import Draft202012Validator

    from core.errors import RateLimited
    from gateway.admin_agents import TENANT_SAVES_WAITING, AgentAdmin

    gate = threading.Event()
    real = Draft202012Validator.check_schema.__func__

    def held(cls, schema, *args, **kwargs):
        gate.wait(30)  # bounded: released below once the refusals are read
        return real(cls, schema, *args, **kwargs)

    async def saves() -> tuple[list, list]:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=4))
        admin = AgentAdmin(admin=None)
        data = {"tools": [_tool("a", {"type": "object"})]}
        flood = [asyncio.create_task(admin.checked_settings(data, "noisy")) for _ in range(TENANT_SAVES_WAITING + 3)]
        operator = [asyncio.create_task(admin.checked_settings(data, None)) for _ in range(TENANT_SAVES_WAITING + 3)]
        for _ in range(10):  # every task runs up to its wait or its refusal
            await asyncio.sleep(0)
        refused = [t for t in flood + operator if t.done()]
        gate.set()
        out = await asyncio.gather(*flood, *operator, return_exceptions=True)
        assert admin._tenant_turns == {}
        return refused, out

    monkeypatch.setattr(Draft202012Validator, "check_schema", classmethod(held))
    try:
        refused, out = asyncio.run(saves())
    finally:
        gate.set()
    n = TENANT_SAVES_WAITING
    flood, operator = out[: n + 3], out[n + 3 :]
    assert len(refused) == 3 and all(isinstance(r, RateLimited) for r in flood[n:]), flood
    err = flood[n]
    assert (err.status, err.param, err.code) == (429, "tools", "too_many_saves"), err.payload()
    assert int(err.headers["retry-after"]) >= 1
    assert [s["tools"][0]["name"] for s in flood[:n] + operator] == ["a"] * (2 * n + 3)
