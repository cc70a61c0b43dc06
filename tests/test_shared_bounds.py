"""What one tenant, or a webhook, can make the resources every tenant shares do: real gateways,
the embedded PostgreSQL and Valkey, the VAPI simulator's messages over HTTP, the admin API.

Attacks tried (each a test below):
- an erasure in progress (held here by a test connection, as an erasure holds it) kept every
  VAPI webhook of its tenant, and of the other tenants of its lock bucket, waiting up to the
  driver's 30 s each on a pooled connection: ten of them held the pool (the outbound call's
  record: tests/test_vapirep_spool.py);
- a tenant admin's spend report without a range, its experiments report and its escalation
  statistics from years back each held a pooled connection up to 30 s (a table lock held by a
  test connection makes them wait as a long scan would), and ten at once held the pool;
- ``/admin/budgets`` read Redis two to three round trips per budget;
- a learned-answers knowledge base grew past the tenant's storage caps (each approved answer a
  document no cap counted);
- a tenant admin's erasures sent at once during a slow one each waited for the erasure lock on a
  pooled connection: they held the pool;
- a spend report 'to' a date within the default window of year 1 overflowed (500);
- two first approvals of an agent's answers at once: the second created the agent's learned-answers
  knowledge base again (500).

No test waits on the clock: the locks are held until the gateway has answered, the timeouts are
PostgreSQL's; bounds in seconds are hang guards only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
import uuid

import aiohttp
import asyncpg
import httpx
import openai
import orjson
import pytest
import redis

from core.erasure_key import ERASURE_LOCK_CLASS, LOCK_ERASURE
from loadtest.vapi_sim import VapiCall
from tests.conftest import LOCAL_HTTP, MASTER_KEY, Gateway, run_cli
from tests.test_channels_vapi import VAPI_KEY, MockVapiApi
from tests.test_vapirep_caps import until_no_live_report_slots

RUN = uuid.uuid4().hex[:6]
TENANT = f"bnd-{RUN}"
OTHER = f"bnd-other-{RUN}"
AGENT = f"bot-{RUN}"
TOKEN = "vapi-bounds-token-0123456789"
BOUND = 60.0  # seconds: a hang guard only, never a timing assertion


def admin(gw: Gateway, method: str, path: str, key: str = MASTER_KEY, **kw) -> httpx.Response:
    return LOCAL_HTTP.request(
        method, f"{gw.url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=BOUND, **kw
    )


def _config(mock, server: dict, vapi_key: str | None = None, api: MockVapiApi | None = None, **extra) -> dict:
    cfg = {
        "router": {"max_attempts": 1},
        "server": server,
        "providers": [{"name": "pp", "kind": "openai", "base_url": f"{mock.url}/v1", "api_keys": ["k"]}],
        "models": [{"name": "bound-model", "deployments": [{"provider": "pp", "model": "m"}]}],
        **extra,
    }
    if vapi_key is not None:
        cfg["channels"] = {
            "vapi": {
                "main": {
                    "tenant": TENANT,
                    "api_key": vapi_key,
                    "public_url": "https://gw.example.com",
                    "auth": {"bearer_token": TOKEN},
                    "phone_numbers": {"pn_main": AGENT},
                    "default_agent": AGENT,
                    "vapi_api_url": api.url,
                    "vapi_api_key": VAPI_KEY,
                    "outbound_phone_number_id": "pn_main",
                }
            }
        }
    return cfg


@pytest.fixture(scope="module")
def env(tmp_root, services, module_mock):
    out = run_cli("keys", "create", "--name", f"vapi-{RUN}", "--tenant", TENANT, urls=services, tmp=tmp_root)
    assert out.returncode == 0, out.stderr
    vapi_key = out.stdout.splitlines()[0].strip()
    api = MockVapiApi(tmp_root)
    # short bounds (PostgreSQL's timeouts: what a test holds a lock past), one file of storage
    gw = Gateway(
        tmp_root,
        _config(
            module_mock,
            {"erasure_lock_wait_s": 0.2, "admin_report_timeout_s": 0.3},
            vapi_key,
            api,
            policies={"max_files_per_tenant": 1},
        ),
        services,
    )
    # a long statement timeout: reports held by a test's lock stay running while it looks (the caps
    # hold across the gateways of one Redis: none of an earlier module's left, tests/test_vapirep_caps.py)
    until_no_live_report_slots(services[1])
    capped = Gateway(
        tmp_root,
        _config(module_mock, {"admin_report_timeout_s": 30, "admin_reports_per_tenant": 2, "admin_reports_total": 3}),
        services,
    )
    keys = {}
    for tenant in (TENANT, OTHER):
        r = admin(gw, "POST", "/admin/keys", json={"name": f"adm-{tenant}", "tenant": tenant, "scopes": ["admin"]})
        assert r.status_code == 201, r.text
        keys[tenant] = r.json()["key"]
    r = admin(gw, "POST", "/admin/keys", json={"name": f"user-{RUN}", "tenant": TENANT})
    assert r.status_code == 201, r.text
    body = {
        "name": AGENT,
        "model": "bound-model",
        "tenant": TENANT,
        "template": "You answer for Acme.",
        "escalation": {"enabled": True, "threshold": 0.5, "hold_message": "A person will reply here."},
    }
    assert admin(gw, "POST", "/admin/agents", json=body).status_code == 201
    yield {
        "gw": gw,
        "capped": capped,
        "api": api,
        "db": services[0],
        "redis": services[1],
        "admin": keys,
        "key": r.json()["key"],
    }
    capped.stop()
    gw.stop()
    api.stop()


class Held:
    """A test connection holding a lock in an open transaction (``sql``) until ``release``."""

    def __init__(self, database_url: str, sql: str, *args) -> None:
        self.url, self.sql, self.args = database_url, sql, args

    async def __aenter__(self) -> Held:
        self.conn = await asyncpg.connect(self.url)
        self.tx = self.conn.transaction()
        await self.tx.start()
        await self.conn.execute(self.sql, *self.args)
        return self

    async def release(self) -> None:
        if not self.conn.is_closed():
            await self.tx.rollback()
            await self.conn.close()

    async def __aexit__(self, *exc) -> None:
        await self.release()


# ---- erasure lock waits ---------------------------------------------------------------------------
async def _event(session: aiohttp.ClientSession, gw: Gateway, call: VapiCall, message: dict):
    body = {"message": {**message, "call": call.call(), "phoneNumber": call.phone, "customer": call.customer}}
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    async with session.post(f"{gw.url}/channels/vapi/main/events", data=orjson.dumps(body), headers=headers) as resp:
        return resp.status, orjson.loads(await resp.read()), resp.headers


def _call_rows(db: str, call_id: str) -> list[dict]:
    async def go():
        conn = await asyncpg.connect(db)
        try:
            return [
                dict(r) for r in await conn.fetch("SELECT status, cost_usd FROM vapi_calls WHERE call_id = $1", call_id)
            ]
        finally:
            await conn.close()

    return asyncio.run(go())


REPORT = {"type": "end-of-call-report", "endedReason": "customer-ended-call", "cost": 0.25, "durationSeconds": 30}


def test_vapi_webhooks_wait_a_bounded_time_for_an_erasure_and_are_spooled(env):
    """An erasure of the tenant holds its lock (here: the test's connection, exclusively, as
    ``runtime.conversations.lock_erasures`` does): VAPI's status updates and end-of-call report
    wait ``server.erasure_lock_wait_s`` at most, then are answered 200 and spooled (nothing
    stored meanwhile; a 503 lost a report VAPI did not send again: tests/test_vapirep_spool.py);
    once the erasure is over the spool's writer stores them, and the report VAPI sends again
    changes nothing. The call's assistant-request is answered meanwhile (its ringing record
    skipped): a 503 there would lose the call."""
    gw = env["gw"]

    async def scenario():
        async with aiohttp.ClientSession() as session:
            call = VapiCall(session, f"{gw.url}/channels/vapi/main", {}, phone_number_id="pn_main")
            async with Held(env["db"], LOCK_ERASURE, TENANT) as erasure:
                ringing = await asyncio.wait_for(_event(session, gw, call, {"type": "assistant-request"}), BOUND)
                rang = await asyncio.wait_for(
                    _event(session, gw, call, {"type": "status-update", "status": "ringing"}), BOUND
                )
                status = await asyncio.wait_for(
                    _event(session, gw, call, {"type": "status-update", "status": "in-progress"}), BOUND
                )
                report = await asyncio.wait_for(_event(session, gw, call, REPORT), BOUND)
                stored_meanwhile = await asyncio.to_thread(_call_rows, env["db"], call.call_id)
                await erasure.release()
            for _ in range(int(BOUND / 0.05)):  # until the spool's writer stored the report (a hang guard)
                if await asyncio.to_thread(_call_rows, env["db"], call.call_id) == [
                    {"status": "ended", "cost_usd": pytest.approx(0.25)}
                ]:
                    break
                await asyncio.sleep(0.05)
            report_again = await _event(session, gw, call, REPORT)
            return call.call_id, ringing, rang, status, report, stored_meanwhile, report_again

    call_id, ringing, rang, status, report, meanwhile, report_again = asyncio.run(scenario())
    # (the call's assistant is answered all the same: its record is the next status update's)
    assert ringing[0] == 200 and ringing[1]["assistant"]["model"]["model"] == f"agent:{AGENT}"
    assert rang[:2] == status[:2] == (200, {"spooled": True})
    assert report[:2] == (200, {"stored": False, "spooled": True})
    assert meanwhile == []
    assert report_again[:2] == (200, {"stored": False})
    assert _call_rows(env["db"], call_id) == [{"status": "ended", "cost_usd": pytest.approx(0.25)}]


# ---- heavy admin reads ----------------------------------------------------------------------------
def _report_times_out(env, table: str, path: str) -> None:
    """``path`` (a tenant admin's report) while ``table`` is locked by a test connection: 503
    ``report_timeout`` once ``server.admin_report_timeout_s`` is out, its connection given back."""

    async def scenario():
        async with Held(env["db"], f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"):
            return await asyncio.to_thread(admin, env["gw"], "GET", path, env["admin"][TENANT])

    r = asyncio.run(scenario())
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "report_timeout"
    assert admin(env["gw"], "GET", path, env["admin"][TENANT]).status_code == 200  # (the lock gone)


def test_a_tenant_admins_spend_report_is_cut_at_the_report_timeout(env):
    _report_times_out(env, "ledger", "/admin/spend?group_by=agent")


def test_a_tenant_admins_experiments_report_is_cut_at_the_report_timeout(env):
    _report_times_out(env, "experiments", f"/admin/agents/{AGENT}/experiments")


def test_escalation_stats_from_years_back_are_cut_at_the_report_timeout(env):
    _report_times_out(env, "escalations", "/admin/escalations/stats?from=2000-01-01T00:00:00Z")


def test_spend_without_a_range_reads_a_bounded_window_and_says_which(env):
    """Without 'from', the last ``server.spend_default_days`` (31) up to 'to' or now: the range
    read is in the answer (JSON 'from'; CSV ``x-gateway-spend-from``)."""
    key = env["admin"][TENANT]
    before = time.time()
    body = admin(env["gw"], "GET", "/admin/spend", key).json()
    start = _ts(body["from"])
    assert before - 31 * 86400 - 5 <= start <= time.time() - 31 * 86400 + 5
    assert body["to"] is None
    body = admin(env["gw"], "GET", "/admin/spend?to=2026-03-01T00:00:00Z", key).json()
    assert _ts(body["from"]) == _ts("2026-01-29T00:00:00+00:00")
    csv = admin(env["gw"], "GET", "/admin/spend?format=csv&to=2026-03-01T00:00:00Z", key)
    assert _ts(csv.headers["x-gateway-spend-from"]) == _ts("2026-01-29T00:00:00+00:00")
    explicit = admin(env["gw"], "GET", "/admin/spend?from=2020-01-01T00:00:00Z", key).json()
    assert _ts(explicit["from"]) == _ts("2020-01-01T00:00:00+00:00")


def test_spend_to_the_first_days_of_year_one_is_not_a_server_error(env):
    """'to' a valid date within 31 days of the earliest one Python holds: the default window
    reached before it (an OverflowError: 500, a stack trace in the log). The window starts at the
    earliest date instead."""
    key = env["admin"][TENANT]
    r = admin(env["gw"], "GET", "/admin/spend?to=0001-01-05T00:00:00Z", key)
    assert r.status_code == 200, r.text
    assert r.json()["data"] == [] and _ts(r.json()["from"]) == _ts("0001-01-01T00:00:00+00:00")


def _ts(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_a_tenant_admin_runs_at_most_its_cap_of_heavy_reports_at_once(env):
    """Two experiments reports of a tenant held by a lock (the cap: 2): its third report, any
    kind, is answered 429 ``too_many_reports`` with retry-after, at once, without a connection;
    another tenant's report runs; once the two are done the tenant's next one runs."""
    gw, key = env["capped"], env["admin"][TENANT]
    path = f"/admin/agents/{AGENT}/experiments"

    async def waiting(conn: asyncpg.Connection) -> int:
        return await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE relation = 'experiments'::regclass AND NOT granted"
        )

    async def scenario():
        pool = concurrent.futures.ThreadPoolExecutor(2)
        loop = asyncio.get_running_loop()
        async with Held(env["db"], "LOCK TABLE experiments IN ACCESS EXCLUSIVE MODE") as held:
            running = [loop.run_in_executor(pool, admin, gw, "GET", path, key) for _ in range(2)]
            for _ in range(int(BOUND / 0.05)):  # until both wait on the lock (a hang guard)
                if await waiting(held.conn) == 2:
                    break
                await asyncio.sleep(0.05)
            third = await asyncio.to_thread(admin, gw, "GET", "/admin/spend", key)
            other = await asyncio.to_thread(admin, gw, "GET", "/admin/spend", env["admin"][OTHER])
            await held.release()
            done = await asyncio.gather(*running)
        pool.shutdown()
        return third, other, done

    third, other, done = asyncio.run(scenario())
    assert third.status_code == 429, third.text
    assert third.json()["error"]["code"] == "too_many_reports" and third.headers["retry-after"] == "1"
    assert other.status_code == 200
    assert [r.status_code for r in done] == [200, 200]
    assert admin(gw, "GET", "/admin/spend", key).status_code == 200


def test_tenants_together_run_at_most_the_servers_cap_of_heavy_reports_at_once(env):
    """Each tenant under its own cap, tenants together could still hold the pool (the tenants'
    caps times the tenants): two of one tenant's reports and one of another's, held by a lock, fill
    the server's cap (``server.admin_reports_total``: 3 here), so the other tenant's second report,
    within its own cap, is answered 429 ``too_many_reports`` at once; once they are done it runs."""
    gw = env["capped"]
    keys = [env["admin"][TENANT], env["admin"][TENANT], env["admin"][OTHER]]
    agent = {"name": AGENT, "model": "bound-model", "tenant": OTHER, "template": "You answer for Other."}
    assert admin(gw, "POST", "/admin/agents", json=agent).status_code in (201, 409)
    path = f"/admin/agents/{AGENT}/experiments"

    async def waiting(conn: asyncpg.Connection) -> int:
        return await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE relation = 'experiments'::regclass AND NOT granted"
        )

    async def scenario():
        pool = concurrent.futures.ThreadPoolExecutor(3)
        loop = asyncio.get_running_loop()
        async with Held(env["db"], "LOCK TABLE experiments IN ACCESS EXCLUSIVE MODE") as held:
            running = [loop.run_in_executor(pool, admin, gw, "GET", path, k) for k in keys]
            for _ in range(int(BOUND / 0.05)):  # until the three wait on the lock (a hang guard)
                if await waiting(held.conn) >= 3 or any(r.done() for r in running):
                    break
                await asyncio.sleep(0.05)
            fourth = await asyncio.to_thread(admin, gw, "GET", path, keys[2])
            await held.release()
            done = await asyncio.gather(*running)
        pool.shutdown()
        return fourth, done

    fourth, done = asyncio.run(scenario())
    assert fourth.status_code == 429, fourth.text
    assert fourth.json()["error"]["code"] == "too_many_reports" and fourth.headers["retry-after"] == "1"
    assert [r.status_code for r in done] == [200, 200, 200]
    assert admin(gw, "GET", "/admin/spend", keys[2]).status_code == 200


def test_a_tenant_admin_runs_at_most_its_cap_of_erasures_at_once(env):
    """An erasure waits for its tenant's erasure lock (here held by a test connection, as a slow
    erasure holds it) on a pooled connection: a tenant admin's erasures sent at once held the
    pool, every tenant's requests waiting behind them. Two wait (``server.erasures_per_tenant``);
    the third is answered 429 ``too_many_erasures`` with retry-after at once, having erased
    nothing; once the lock is free the two are done and the third, sent again, too."""
    gw, key = env["capped"], env["admin"][TENANT]
    paths = [f"/admin/agents/{AGENT}/conversations/erase-{uuid.uuid4().hex[:8]}" for _ in range(3)]

    async def waiting(conn: asyncpg.Connection) -> int:  # (erasures: the lock's exclusive waiters)
        return await conn.fetchval(
            """SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = $1::bigint::oid
                 AND objsubid = 2 AND mode = 'ExclusiveLock' AND NOT granted""",
            ERASURE_LOCK_CLASS,
        )

    async def scenario():
        pool = concurrent.futures.ThreadPoolExecutor(3)
        loop = asyncio.get_running_loop()
        async with Held(env["db"], LOCK_ERASURE, TENANT) as held:
            running = [loop.run_in_executor(pool, admin, gw, "DELETE", p, key) for p in paths]
            for _ in range(int(BOUND / 0.05)):  # until one is answered or three wait (a hang guard)
                if any(r.done() for r in running) or await waiting(held.conn) >= 3:
                    break
                await asyncio.sleep(0.05)
            for _ in range(int(BOUND / 0.05)):  # the others waiting on the lock (a hang guard)
                if await waiting(held.conn) >= 2:
                    break
                await asyncio.sleep(0.05)
            during = await waiting(held.conn), [r.result() for r in running if r.done()]
            await held.release()
            done = await asyncio.gather(*running)
        pool.shutdown()
        return during, done

    (waiters, answered), done = asyncio.run(scenario())
    assert waiters == 2 and len(answered) == 1, (waiters, [r.text for r in answered])
    refused = answered[0]
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "too_many_erasures" and refused.headers["retry-after"] == "1"
    assert sorted(r.status_code for r in done) == [200, 200, 429]
    again = [p for p, r in zip(paths, done, strict=True) if r.status_code == 429]
    assert admin(gw, "DELETE", again[0], key).status_code == 200


# ---- /admin/budgets and Redis -----------------------------------------------------------------------
def test_a_page_of_budgets_is_read_from_redis_in_one_round_trip_with_the_same_answers(env):
    """Three budgets with spend, a reservation, a live lease and an expired one (still in the
    set), an alert fired: ``GET /admin/budgets`` shows what Redis counts, as before, and the
    gateway sent Redis one command naming their keys (Valkey's MONITOR, a sentinel after the
    answer: every command before it has been seen)."""
    gw, key = env["gw"], env["admin"][TENANT]
    made = []
    for value in ("a", "b", "c"):
        body = {"scope": "user", "scope_value": f"{value}-{RUN}", "limit_usd": 10, "thresholds": [0.5, 0.8]}
        r = admin(gw, "POST", "/admin/budgets", key, json=body)
        assert r.status_code == 201, r.text
        made.append(r.json())
    r = redis.Redis.from_url(env["redis"])
    first = made[0]
    base = f"gw:{{gw}}:budget:{first['id']}:{first['period_id']}"
    r.set(f"{base}:spent", 6 * 10**9)
    r.set(f"{base}:reserved", 2 * 10**9)
    r.set(f"{base}:lease:one", 10**9)
    r.sadd(f"{base}:reserved:leases", f"{base}:lease:one", f"{base}:lease:gone")
    r.set(f"{base}:alert:{10 * 10**9}:0.5", 1)

    ids = {b["id"] for b in made}
    monitor = r.monitor()
    with monitor as m:
        listed = admin(gw, "GET", "/admin/budgets", key).json()["data"]
        sentinel = f"sentinel-{uuid.uuid4().hex}"
        redis.Redis.from_url(env["redis"]).echo(sentinel)
        commands = []
        for _ in range(100_000):  # (a hang guard: the sentinel comes)
            seen = m.next_command()
            if sentinel in seen["command"]:
                break
            if seen.get("client_type") != "lua" and any(i in seen["command"] for i in ids):
                commands.append(seen["command"])
    states = {b["id"]: b for b in listed}
    assert len(commands) == 1, commands
    a = states[first["id"]]
    assert (a["spent_usd"], a["reserved_usd"], a["leased_usd"], a["remaining_usd"]) == (6.0, 2.0, 1.0, 4.0)
    assert a["alerts_fired"] == [0.5]
    for other in made[1:]:
        s = states[other["id"]]
        assert (s["spent_usd"], s["reserved_usd"], s["leased_usd"], s["alerts_fired"]) == (0.0, 0.0, 0.0, [])
    one = admin(gw, "GET", f"/admin/budgets/{first['id']}", key).json()
    assert {k: one[k] for k in ("spent_usd", "leased_usd", "alerts_fired")} == {
        "spent_usd": 6.0,
        "leased_usd": 1.0,
        "alerts_fired": [0.5],
    }


# ---- learned answers ------------------------------------------------------------------------------
def _learned_example(env, question: str, answer: str, agent: str = AGENT) -> str:
    """A customer asks for a person; the tenant's admin resolves it with an answer: the pending
    learned example's id."""
    gw, key = env["gw"], env["admin"][TENANT]
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=env["key"], max_retries=0, timeout=BOUND)
    raw = client.chat.completions.with_raw_response.create(
        model=f"agent:{agent}",
        messages=[{"role": "user", "content": f"talk to a person: {question}"}],
        metadata={"conversation_id": f"c-{uuid.uuid4().hex[:8]}"},
    )
    esc_id = raw.headers.get("x-gateway-escalation")
    assert esc_id, raw.parse().choices[0].message.content
    assert admin(gw, "POST", f"/admin/escalations/{esc_id}/claim", key).status_code == 200
    r = admin(gw, "POST", f"/admin/escalations/{esc_id}/resolve", key, json={"corrected_answer": answer})
    assert r.status_code == 200, r.text
    return r.json()["learned_example"]["id"]


def test_learned_answers_count_toward_the_tenants_storage_caps(env):
    """``policies.max_files_per_tenant`` is 1: the first approved answer is the tenant's one
    document (its learned-answers knowledge base's), the second is refused (400
    ``too_many_files``) and stays pending, indexing nothing."""
    gw, key = env["gw"], env["admin"][TENANT]
    first = _learned_example(env, "Do you ship to Iceland?", "Yes, within 6 working days.")
    second = _learned_example(env, "Do you ship to Chile?", "Yes, within 12 working days.")
    r = admin(gw, "POST", f"/admin/agents/{AGENT}/learned/{first}/approve", key)
    assert r.status_code == 200, r.text
    kb_id = r.json()["kb_id"]
    r = admin(gw, "POST", f"/admin/agents/{AGENT}/learned/{second}/approve", key)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "too_many_files" and r.json()["error"]["param"] == "id"
    pending = admin(gw, "GET", f"/admin/agents/{AGENT}/learned?status=pending", key).json()["data"]
    assert [e["id"] for e in pending] == [second]
    docs = admin(gw, "GET", f"/admin/knowledge-bases/{kb_id}/documents", key).json()["data"]
    assert len(docs) == 1


def test_two_first_approvals_of_an_agent_at_once_make_one_learned_answers_knowledge_base(env):
    """The agent has no learned-answers knowledge base yet; two of its answers are approved at
    once. Both looked for it, found none, and waited for the tenant's knowledge-base lock (here
    held by a test connection until both wait): the second then created one of the same name,
    refused by the store (500, a stack trace in the log). It finds the first's once it has the
    lock: both approved, into one knowledge base."""
    from gateway.hitl_service import LEARNED_KB_PREFIX

    gw, key = env["capped"], env["admin"][TENANT]  # (the default storage caps)
    agent = f"twice-{RUN}"
    body = {
        "name": agent,
        "model": "bound-model",
        "tenant": TENANT,
        "template": "You answer for Acme.",
        "escalation": {"enabled": True, "threshold": 0.5, "hold_message": "A person will reply here."},
    }
    # (made where its turns run: the other gateway learns of it by pub/sub, maybe after the turn)
    assert admin(env["gw"], "POST", "/admin/agents", json=body).status_code == 201
    examples = [_learned_example(env, f"Open on day {n}?", f"Yes, on day {n}.", agent) for n in (1, 2)]

    async def waiting(conn: asyncpg.Connection) -> int:
        return await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            "AND pg_backend_pid() = ANY(pg_blocking_pids(pid))"
        )

    async def scenario():
        pool = concurrent.futures.ThreadPoolExecutor(2)
        loop = asyncio.get_running_loop()
        lock = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))"
        async with Held(env["db"], lock, f"knowledge_bases:{TENANT}") as held:
            running = [
                loop.run_in_executor(pool, admin, gw, "POST", f"/admin/agents/{agent}/learned/{e}/approve", key)
                for e in examples
            ]
            for _ in range(int(BOUND / 0.05)):  # until both wait behind the lock (a hang guard)
                if any(r.done() for r in running) or await waiting(held.conn) >= 2:
                    break
                await asyncio.sleep(0.05)
            await held.release()
            done = await asyncio.gather(*running)
        pool.shutdown()
        conn = await asyncpg.connect(env["db"])
        try:
            made = await conn.fetchval(
                "SELECT count(*) FROM knowledge_bases WHERE tenant = $1 AND name = $2",
                TENANT,
                LEARNED_KB_PREFIX + agent,
            )
        finally:
            await conn.close()
        return done, made

    done, made = asyncio.run(scenario())
    assert [r.status_code for r in done] == [200, 200], [r.text for r in done]
    assert made == 1 and done[0].json()["kb_id"] == done[1].json()["kb_id"]
