"""VAPI records an erasure's lock keeps out are accepted, spooled in Redis and written afterwards.

An erasure of a tenant's conversations holds the tenant's erasure lock (here: a test connection
holds it exclusively, as ``runtime.conversations`` does). A webhook waits
``server.erasure_lock_wait_s`` for it at most; answered 503 then, an end-of-call report VAPI did
not send again was lost, and the record of an outbound call VAPI had placed waited up to the
driver's 30 s and failed. Now they are answered (200, 201) and spooled; the spool's writer waits
for the lock, then writes them — unless their conversation was erased meanwhile: dropped, never
written. An erasure drops its conversations' spooled records (the caller's number and words).

No test waits on the clock: the lock is held until the gateway answered and the writer waits on
it (``tests.pg_locks.blocked_by``); bounds in seconds are hang guards only.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import aiohttp
import asyncpg
import orjson
import pytest
import redis

from channels.vapi import spool
from core.erasure_key import LOCK_ERASURE, _key, conversation_tag
from loadtest.vapi_sim import VapiCall
from runtime import conversations
from tests.conftest import LOCAL_HTTP, MASTER_KEY, Gateway, run_cli
from tests.pg_locks import blocked_by
from tests.test_channels_vapi import VAPI_KEY, MockVapiApi

RUN = uuid.uuid4().hex[:6]
TENANT = f"vrep-{RUN}"
AGENT = f"bot-{RUN}"
TOKEN = "vapi-spool-token-0123456789abc"
BOUND = 60.0  # seconds: a hang guard only, never a timing assertion
NUMBER = "+14155550123"  # (the simulator's caller)
WORDS = "I am Ann, my card is 4111."
REPORT = {
    "type": "end-of-call-report",
    "endedReason": "customer-ended-call",
    "cost": 0.25,
    "durationSeconds": 30,
    "artifact": {"transcript": WORDS},
}


def admin(gw: Gateway, method: str, path: str, key: str = MASTER_KEY, **kw):
    return LOCAL_HTTP.request(
        method, f"{gw.url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=BOUND, **kw
    )


@pytest.fixture(scope="module")
def env(tmp_root, services, module_mock):
    out = run_cli("keys", "create", "--name", f"vapi-{RUN}", "--tenant", TENANT, urls=services, tmp=tmp_root)
    assert out.returncode == 0, out.stderr
    vapi_key = out.stdout.splitlines()[0].strip()
    api = MockVapiApi(tmp_root)
    cfg = {
        "router": {"max_attempts": 1},
        "server": {"erasure_lock_wait_s": 0.2},
        "providers": [{"name": "pp", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k"]}],
        "models": [{"name": "vrep-model", "deployments": [{"provider": "pp", "model": "m"}]}],
        "channels": {
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
        },
    }
    gw = Gateway(tmp_root, cfg, services)
    body = {"name": AGENT, "model": "vrep-model", "tenant": TENANT, "template": "You answer for Acme."}
    r = admin(gw, "POST", "/admin/agents", json=body)
    assert r.status_code == 201, r.text
    yield {"gw": gw, "api": api, "db": services[0], "redis": services[1], "agent_id": r.json()["id"]}
    gw.stop()
    api.stop()


class Held:
    """A test connection holding the tenant's erasure lock in an open transaction."""

    def __init__(self, database_url: str) -> None:
        self.url = database_url

    async def __aenter__(self) -> Held:
        self.conn = await asyncpg.connect(self.url)
        self.tx = self.conn.transaction()
        await self.tx.start()
        await self.conn.execute(LOCK_ERASURE, TENANT)
        return self

    async def end(self, commit: bool = False) -> None:
        if not self.conn.is_closed():
            await (self.tx.commit() if commit else self.tx.rollback())
            await self.conn.close()

    async def __aexit__(self, *exc) -> None:
        await self.end()

    async def until_blocking(self, n: int, also: asyncio.Future | None = None) -> None:
        """Until ``n`` sessions wait behind the lock (or ``also`` is done); a hang guard."""
        for _ in range(int(BOUND / 0.05)):
            if (also is not None and also.done()) or await blocked_by(self.conn, self.conn.get_server_pid()) >= n:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{n} sessions never waited on the erasure lock")


async def _event(session: aiohttp.ClientSession, gw: Gateway, call: VapiCall, message: dict):
    body = {"message": {**message, "call": call.call(), "phoneNumber": call.phone, "customer": call.customer}}
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    async with session.post(f"{gw.url}/channels/vapi/main/events", data=orjson.dumps(body), headers=headers) as resp:
        return resp.status, orjson.loads(await resp.read())


def _spooled(env) -> list[bytes]:
    client = redis.Redis.from_url(env["redis"])
    try:
        return client.lrange(spool.key(TENANT, "main"), 0, -1)
    finally:
        client.close()


async def _until_spool_empty(env) -> None:
    for _ in range(int(BOUND / 0.05)):  # (a hang guard)
        if not await asyncio.to_thread(_spooled, env):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the spool was never written")


async def _rows(db: str, sql: str, *args) -> list[dict]:
    conn = await asyncpg.connect(db)
    try:
        return [dict(r) for r in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


def _call(session: aiohttp.ClientSession, gw: Gateway) -> VapiCall:
    return VapiCall(session, f"{gw.url}/channels/vapi/main", {}, phone_number_id="pn_main", customer=NUMBER)


CALL_SQL = "SELECT status, cost_usd, transcript, customer_number FROM vapi_calls WHERE call_id = $1"
LEDGER_SQL = "SELECT cost_usd FROM ledger WHERE endpoint = 'vapi.call' AND conversation_id = $1"


def test_a_report_an_erasure_keeps_out_is_accepted_and_written_once_the_lock_is_free(env):
    """A status update and the end-of-call report while an erasure holds the tenant's lock past
    ``server.erasure_lock_wait_s``: both answered 200 (spooled), nothing written meanwhile, the
    writer waiting on the lock; the lock released, the call's record and ledger record appear."""
    gw = env["gw"]

    async def scenario():
        async with aiohttp.ClientSession() as session:
            call = _call(session, gw)
            async with Held(env["db"]) as erasure:
                status = await asyncio.wait_for(
                    _event(session, gw, call, {"type": "status-update", "status": "in-progress"}), BOUND
                )
                report = await asyncio.wait_for(_event(session, gw, call, REPORT), BOUND)
                await erasure.until_blocking(1)  # (the writer, waiting for the lock)
                meanwhile = await _rows(env["db"], CALL_SQL, call.call_id)
                spooled = await asyncio.to_thread(_spooled, env)
            await _until_spool_empty(env)
            rows = await _rows(env["db"], CALL_SQL, call.call_id)
            ledger = await _rows(env["db"], LEDGER_SQL, f"vapi:{call.call_id}")
            return status, report, meanwhile, spooled, rows, ledger

    status, report, meanwhile, spooled, rows, ledger = asyncio.run(scenario())
    assert status == (200, {"spooled": True})
    assert report == (200, {"stored": False, "spooled": True})
    assert meanwhile == [] and len(spooled) == 2
    assert rows == [
        {"status": "ended", "cost_usd": pytest.approx(0.25), "transcript": WORDS, "customer_number": NUMBER}
    ]
    assert ledger == [{"cost_usd": pytest.approx(0.25)}]


# (a call's ledger record, by its conversation's id or its tag: $2 the id, $3 the tag)
ERASED_LEDGER_SQL = (
    "SELECT conversation_id, cost_usd FROM ledger WHERE tenant = $1 AND endpoint = 'vapi.call' "
    "AND conversation_id IN ($2, $3)"
)


def _tag(call: VapiCall) -> str:
    return conversation_tag(TENANT, f"vapi:{call.call_id}", _key("", MASTER_KEY, ""))


def test_a_spooled_report_of_a_conversation_erased_meanwhile_keeps_its_cost_not_its_words(env):
    """The report is spooled while the erasure holds the lock; the erasure (in the lock holder's
    transaction: ``runtime.conversations.erase``, as the admin erasure runs it) erases the call's
    conversation and commits; the writer, granted the lock, writes the report as one sent after the
    erasure: the call's duration and cost kept (its record, its ledger record), never its words nor
    its caller's number (rev6: it was dropped whole, the ledger lost the call's cost), and nothing
    of it left in the spool."""
    gw = env["gw"]
    key = _key("", MASTER_KEY, "")  # (the gateways' erasure key: derived from their master key)

    async def scenario():
        async with aiohttp.ClientSession() as session:
            call = _call(session, gw)
            async with Held(env["db"]) as erasure:
                report = await asyncio.wait_for(_event(session, gw, call, REPORT), BOUND)
                await erasure.until_blocking(1)
                await erasure.conn.execute("SELECT set_config('gateway.tenant', $1, true)", TENANT)
                await conversations.erase(
                    erasure.conn, TENANT, env["agent_id"], f"vapi:{call.call_id}", time.time(), key=key
                )
                await erasure.end(commit=True)
            await _until_spool_empty(env)
            rows = await _rows(env["db"], CALL_SQL, call.call_id)
            ledger = await _rows(env["db"], ERASED_LEDGER_SQL, TENANT, f"vapi:{call.call_id}", _tag(call))
            return report, rows, ledger

    report, rows, ledger = asyncio.run(scenario())
    assert report == (200, {"stored": False, "spooled": True})
    assert len(rows) == 1, rows
    assert rows[0]["status"] == "ended" and rows[0]["cost_usd"] == pytest.approx(0.25)
    assert rows[0]["transcript"] is None and not rows[0]["customer_number"].startswith("+")
    # (its conversation's tag, as the erasure leaves the rows it finds: not the erased call's id)
    assert ledger == [{"conversation_id": ledger[0]["conversation_id"], "cost_usd": pytest.approx(0.25)}], ledger
    assert ledger[0]["conversation_id"].startswith("erased:") and NUMBER not in str(ledger)
    assert not any(NUMBER.encode() in raw or b"4111" in raw for raw in _spooled(env))


def test_an_erasure_drops_its_conversations_spooled_records(env):
    """The report is spooled; the admin erasure of the call's conversation, before it waits for the
    lock, has dropped it from the spool (its caller's number and words): none is left there while
    it waits. Once the lock is free, the call's record (whichever of the writer and the erasure
    goes first) holds neither the words nor the number."""
    gw = env["gw"]

    async def scenario():
        async with aiohttp.ClientSession() as session:
            call = _call(session, gw)
            conversation = f"vapi:{call.call_id}"
            async with Held(env["db"]) as erasure:
                report = await asyncio.wait_for(_event(session, gw, call, REPORT), BOUND)
                spooled_before = await asyncio.to_thread(_spooled, env)
                await erasure.until_blocking(1)  # (the writer)
                erasing = asyncio.ensure_future(
                    asyncio.to_thread(admin, gw, "DELETE", f"/admin/agents/{AGENT}/conversations/{conversation}")
                )
                await erasure.until_blocking(2, also=erasing)  # (and the erasure)
                spooled_during = await asyncio.to_thread(_spooled, env)
            erased = await erasing
            await _until_spool_empty(env)
            rows = await _rows(env["db"], CALL_SQL, call.call_id)
            return report, spooled_before, spooled_during, erased, rows

    report, before, during, erased, rows = asyncio.run(scenario())
    assert report == (200, {"stored": False, "spooled": True})
    assert any(NUMBER.encode() in raw for raw in before)
    assert erased.status_code == 200, erased.text
    assert not any(NUMBER.encode() in raw or b"4111" in raw for raw in during)
    assert all(r["transcript"] is None and not (r["customer_number"] or "").startswith("+") for r in rows)


def test_an_outbound_calls_record_during_an_erasure_is_spooled_not_waited_for(env):
    """An outbound call placed while an erasure holds the tenant's lock: its record waited for the
    lock without bound (up to the driver's 30 s, then failed, the call placed all the same). Now
    the admin is answered 201 at once (the call placed once), the record spooled and written once
    the lock is free."""
    gw, api = env["gw"], env["api"]
    placed = len(api.requests())

    async def scenario():
        async with Held(env["db"]):
            body = {"account": "main", "to": "+14155550142"}
            placing = asyncio.ensure_future(
                asyncio.to_thread(admin, gw, "POST", "/admin/channels/vapi/calls", json=body)
            )
            done, _ = await asyncio.wait({placing}, timeout=BOUND)  # (a hang guard)
            answered_while_held = bool(done)
            r = await placing
        await _until_spool_empty(env)
        rows = await _rows(
            env["db"], "SELECT direction, status FROM vapi_calls WHERE call_id = $1", r.json()["call_id"]
        )
        return answered_while_held, r, rows

    answered, r, rows = asyncio.run(scenario())
    assert answered and r.status_code == 201, r.text
    assert r.json()["direction"] == "outbound" and r.json()["status"] == "queued"
    assert len(api.requests()) == placed + 1
    assert rows == [{"direction": "outbound", "status": "queued"}]


def test_an_erasure_keeps_the_cost_of_a_report_spooled_behind_another_record(env):
    """rev6: the erasure of a call's conversation dropped its spooled records whole. A report the
    writer had not read yet (the writer waiting, holding the call's status update, the head of the
    list) went with them: the ledger lost the call's cost, no budget counted it. Now the erasure
    keeps the report without its words nor its caller's number, and the writer writes it after
    the erasure: the call's cost in the ledger under its conversation's tag, nothing of its words
    or number anywhere (the spool, the record, the ledger)."""
    gw = env["gw"]

    async def scenario():
        async with aiohttp.ClientSession() as session:
            call = _call(session, gw)
            conversation = f"vapi:{call.call_id}"
            async with Held(env["db"]) as erasure:
                status = await asyncio.wait_for(
                    _event(session, gw, call, {"type": "status-update", "status": "in-progress"}), BOUND
                )
                await erasure.until_blocking(1)  # (the writer, holding the status update)
                report = await asyncio.wait_for(_event(session, gw, call, {**REPORT, "cost": 0.37}), BOUND)
                erasing = asyncio.ensure_future(
                    asyncio.to_thread(admin, gw, "DELETE", f"/admin/agents/{AGENT}/conversations/{conversation}")
                )
                await erasure.until_blocking(2, also=erasing)  # (and the erasure)
                spooled_during = await asyncio.to_thread(_spooled, env)
            erased = await erasing
            await _until_spool_empty(env)
            rows = await _rows(env["db"], CALL_SQL, call.call_id)
            ledger = await _rows(env["db"], ERASED_LEDGER_SQL, TENANT, conversation, _tag(call))
            return status, report, spooled_during, erased, rows, ledger

    status, report, during, erased, rows, ledger = asyncio.run(scenario())
    assert status == (200, {"spooled": True}) and report == (200, {"stored": False, "spooled": True})
    assert erased.status_code == 200, erased.text
    assert not any(NUMBER.encode() in raw or b"4111" in raw for raw in during)
    assert len(rows) == 1 and rows[0]["cost_usd"] == pytest.approx(0.37), rows
    assert rows[0]["transcript"] is None and not (rows[0]["customer_number"] or "").startswith("+")
    assert len(ledger) == 1 and ledger[0]["cost_usd"] == pytest.approx(0.37), ledger
    assert ledger[0]["conversation_id"].startswith("erased:")
