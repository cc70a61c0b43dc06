"""A VAPI call's end-of-call report and the erasure of its conversation, in every order.

The report writes the call's record (its transcript, summary and recording link; a record it
creates, its caller's number too) after reading the erasures of the conversation; the erasure
tags the call records it finds (the tag as the caller's number) and clears their words. Run at
once, each read the other's state from before its commit: the erasure found no record (the
report's was not committed) or one without words, and the report found no erasure. The
erased caller's words and number were kept.

Each race holds one side's transaction open with its work done (not committed) while the other
runs, then lets it commit: the order is the test's, never a timing's. The sides are the channel's
``CallStore.report`` and the admin erasure's PostgreSQL part (``runtime.conversations.erase``)
on the embedded PostgreSQL, each in a tenant transaction as the gateway runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import asyncpg
import pytest

from channels.vapi import calls, wire
from core.erasure_key import conversation_tag
from gateway.db import migrate, tenant_transaction
from runtime import conversations

NUMBER = "+4915123456780"
AGENT_ID = "agt_vapirace"
BOUND = 60.0  # seconds: a hang guard only, never a timing assertion
REPORT = calls.Report("customer-ended-call", 42.0, 0.1, "I am Ann, card 4111.", "https://r.example/a.wav",
                      "Ann called about card 4111.", None)  # fmt: skip


@pytest.fixture
def db(services, monkeypatch) -> str:
    monkeypatch.setenv("GATEWAY_ERASURE_KEY", "vapi-report-erasure-test-key")  # (the same for both sides)

    async def up() -> None:
        conn = await asyncpg.connect(services[0])
        try:
            await migrate(conn)
        finally:
            await conn.close()

    asyncio.run(up())
    return services[0]


class _Side:
    """One side's transactions: its connections' server pids, and (``held``) a pause before its
    commit (``worked`` set: its work is done) until ``go`` is set. ``after_first``: the pause is
    after its first statement instead."""

    def __init__(self, pool: asyncpg.Pool, held: bool = False, after_first: bool = False) -> None:
        self.pool = pool
        self.pids: list[int] = []
        self.held = held
        self.after_first = after_first
        self.worked = asyncio.Event()
        self.go = asyncio.Event()

    @contextlib.asynccontextmanager
    async def tx(self, tenant: str | None):
        async with tenant_transaction(self.pool, tenant) as conn:
            self.pids.append(conn.get_server_pid())
            yield _PausedAfterFirst(conn, self) if self.after_first else conn
            if self.held:
                self.worked.set()
                await self.go.wait()

    async def report(self, tenant: str, info: wire.CallInfo) -> dict | None:
        return await calls.CallStore(self.tx).report(tenant, "vp", info, "bot", REPORT, True)

    async def erase(self, tenant: str, conversation: str) -> dict:
        async with self.tx(tenant) as conn:
            return await conversations.erase(conn, tenant, AGENT_ID, conversation, time.time())


class _PausedAfterFirst:
    """A connection whose first statement is followed by a pause (``worked`` set) until ``go``."""

    def __init__(self, conn: asyncpg.Connection, side: _Side) -> None:
        self._conn = conn
        self._side = side

    def __getattr__(self, name: str):
        attr = getattr(self._conn, name)
        if name not in ("execute", "fetch", "fetchrow", "fetchval"):
            return attr

        async def call(*args, **kw):
            out = await attr(*args, **kw)
            if not self._side.worked.is_set():
                self._side.worked.set()
                await self._side.go.wait()
            return out

        return call


async def _reached(side: _Side, task: asyncio.Task) -> None:
    """Until ``side`` paused with its work done (or its task ended: its failure is read later)."""
    waiting = asyncio.ensure_future(side.worked.wait())
    await asyncio.wait_for(asyncio.wait({waiting, task}, return_when=asyncio.FIRST_COMPLETED), BOUND)
    waiting.cancel()


async def _until_waiting(pool: asyncpg.Pool, side: _Side, task: asyncio.Task) -> None:
    """Until ``side``'s connection waits on a lock, or its task is done (the code before the fix:
    it did not wait); bounded."""
    for _ in range(int(BOUND / 0.05)):
        if task.done():
            return
        if side.pids and await pool.fetchval(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", side.pids[-1]
        ):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the side neither waited on a lock nor finished")


async def _one_open_while_the_other_runs(pool: asyncpg.Pool, first, second) -> None:
    """``first(side)`` does its work and holds its transaction open; ``second(side)`` runs (and
    waits, or not) meanwhile; then the first commits and both finish."""
    holding, running = _Side(pool, held=True), _Side(pool)
    held = asyncio.ensure_future(first(holding))
    await _reached(holding, held)
    assert not held.done(), held.result()
    other = asyncio.ensure_future(second(running))
    await _until_waiting(pool, running, other)
    holding.go.set()
    await asyncio.wait_for(asyncio.gather(held, other), BOUND)


def _call(number: str | None) -> tuple[wire.CallInfo, str]:
    call_id = f"call-{uuid.uuid4().hex[:12]}"
    kind = "inboundPhoneCall" if number else "webCall"
    return wire.CallInfo(call_id=call_id, call_type=kind, customer_number=number), f"vapi:{call_id}"


async def _kept(pool: asyncpg.Pool, tenant: str, info: wire.CallInfo) -> tuple[list[dict], int, int]:
    """The call's record; the tenant's telephony ledger records; those naming the number."""
    record = await pool.fetch(
        """SELECT customer_number, transcript, summary, recording_url, duration_s FROM vapi_calls
           WHERE tenant = $1 AND call_id = $2""",
        tenant,
        info.call_id,
    )
    ledger = await pool.fetchval("SELECT count(*) FROM ledger WHERE tenant = $1 AND endpoint = 'vapi.call'", tenant)
    named = await pool.fetchval(
        "SELECT count(*) FROM ledger WHERE tenant = $1 AND (customer = $2 OR end_user = $2)", tenant, NUMBER
    )
    return [dict(r) for r in record], ledger, named


@pytest.mark.parametrize("before", ["no record", "a record with the number", "a web call's record"])
@pytest.mark.parametrize("order", ["erasure open", "report open", "erasure first", "report first"])
def test_a_call_report_and_its_conversations_erasure_keep_no_words_nor_number_in_any_order(db, before, order):
    """Whichever commits first, and whether a status update recorded the call before (with the
    caller's number, or a web call's without one) or the report is the call's first record: the
    record keeps the report's duration, not its words, and the tag as its caller's number; no
    ledger record names the number. "… open": that side's transaction is held open with its
    work done while the other runs."""
    number = None if before == "a web call's record" else NUMBER
    info, conv = _call(number)
    tenant = f"vrace-{uuid.uuid4().hex[:8]}"

    async def go() -> tuple[list[dict], int, int]:
        pool = await asyncpg.create_pool(db, min_size=2, max_size=4)
        try:
            if before != "no record":
                await calls.CallStore(lambda t: tenant_transaction(pool, t)).upsert(
                    tenant, "vp", info, "bot", "in-progress"
                )

            async def report(side: _Side) -> None:
                await side.report(tenant, info)

            async def erase(side: _Side) -> None:
                await side.erase(tenant, conv)

            if order == "erasure open":
                await _one_open_while_the_other_runs(pool, erase, report)
            elif order == "report open":
                await _one_open_while_the_other_runs(pool, report, erase)
            else:
                sides = (erase, report) if order == "erasure first" else (report, erase)
                for side in sides:
                    await side(_Side(pool))
            return await _kept(pool, tenant, info)
        finally:
            await pool.close()

    record, ledger, named = asyncio.run(go())
    assert record == [
        {"customer_number": conversation_tag(tenant, conv) if number else None, "transcript": None, "summary": None,
         "recording_url": None, "duration_s": 42.0}
    ]  # fmt: skip
    assert (ledger, named) == (1, 0)  # (the call's cost is kept, under the tag)


def test_a_repeated_report_holding_its_lock_and_an_erasure_of_its_call_both_finish(db):
    """VAPI sends the report again (a retry) while the call's conversation is erased. The report
    takes its tenant's erasure lock shared first thing; an erasure that locked the call's record
    (clearing its words) before it took that lock exclusively, and a report that then waited for
    the record, waited for each other (a deadlock: one of them failed). The repeated report is
    paused after its first statement while the erasure runs to its lock."""
    info, conv = _call(NUMBER)
    tenant = f"vrace-{uuid.uuid4().hex[:8]}"

    async def go() -> tuple[dict | None, tuple]:
        pool = await asyncpg.create_pool(db, min_size=2, max_size=4)
        try:
            assert await _Side(pool).report(tenant, info) is not None  # the first report: its words
            again = _Side(pool, after_first=True)
            reporting = asyncio.ensure_future(again.report(tenant, info))
            await _reached(again, reporting)
            eraser = _Side(pool)
            erasing = asyncio.ensure_future(eraser.erase(tenant, conv))
            await _until_waiting(pool, eraser, erasing)
            again.go.set()
            repeated, _ = await asyncio.wait_for(asyncio.gather(reporting, erasing), BOUND)
            return repeated, await _kept(pool, tenant, info)
        finally:
            await pool.close()

    repeated, (record, ledger, named) = asyncio.run(go())
    assert repeated is None  # (a repeated report changes nothing)
    assert record == [
        {"customer_number": conversation_tag(tenant, conv), "transcript": None, "summary": None, "recording_url": None,
         "duration_s": 42.0}
    ]  # fmt: skip
    assert (ledger, named) == (1, 0)


def test_a_status_update_recording_the_call_while_its_conversation_is_erased_keeps_no_number(db):
    """VAPI's status update that is the call's first record (with the caller's number) while the
    call's conversation is erased: the erasure did not see the record (not committed), so the
    record kept the number, and the call's report then put it in its ledger record. The status
    update's transaction is held open with its record written while the erasure runs."""
    info, conv = _call(NUMBER)
    tenant = f"vrace-{uuid.uuid4().hex[:8]}"

    async def go() -> tuple[list[dict], int, int]:
        pool = await asyncpg.create_pool(db, min_size=2, max_size=4)
        try:

            async def update(side: _Side) -> None:
                await calls.CallStore(side.tx).upsert(tenant, "vp", info, "bot", "in-progress")

            async def erase(side: _Side) -> None:
                await side.erase(tenant, conv)

            await _one_open_while_the_other_runs(pool, update, erase)
            await _Side(pool).report(tenant, info)
            return await _kept(pool, tenant, info)
        finally:
            await pool.close()

    record, ledger, named = asyncio.run(go())
    assert record == [
        {"customer_number": conversation_tag(tenant, conv), "transcript": None, "summary": None, "recording_url": None,
         "duration_s": 42.0}
    ]  # fmt: skip
    assert (ledger, named) == (1, 0)


@pytest.mark.parametrize("before", ["no record", "a record without the number"])
@pytest.mark.parametrize("then", ["a status update", "a status update and the report"])
def test_attack_a_late_status_update_of_a_call_whose_conversation_was_erased_keeps_no_number(db, before, then):
    """The call's conversation is erased (its model turns named it) while the gateway holds no
    record of the call (no assistant-request), or one without the caller's number; then a status
    update of the call under way (VAPI's, sent late) names the number. It created the record with
    the number, or filled it in, not the tag; and the report, finding a record created after the
    erasure, kept the transcript, summary and recording link and wrote the number in its ledger
    record. A call's conversation is its own (VAPI's call id): a status past the call's start
    comes from the call the erasure was of, as a report that creates the record does."""
    info, conv = _call(NUMBER)
    tenant = f"vrace-{uuid.uuid4().hex[:8]}"

    async def go() -> tuple[list[dict], int, int]:
        pool = await asyncpg.create_pool(db, min_size=2, max_size=4)
        store = calls.CallStore(lambda t: tenant_transaction(pool, t))
        try:
            if before == "a record without the number":
                await store.upsert(tenant, "vp", wire.CallInfo(call_id=info.call_id), "bot", "ringing")
            await _Side(pool).erase(tenant, conv)
            await store.upsert(tenant, "vp", info, "bot", "forwarding")
            if then == "a status update and the report":
                await _Side(pool).report(tenant, info)
            return await _kept(pool, tenant, info)
        finally:
            await pool.close()

    record, ledger, named = asyncio.run(go())
    reported = then == "a status update and the report"
    assert record == [
        {"customer_number": conversation_tag(tenant, conv), "transcript": None, "summary": None, "recording_url": None,
         "duration_s": 42.0 if reported else None}
    ]  # fmt: skip
    assert (ledger, named) == (int(reported), 0)


@pytest.mark.parametrize("status", ["queued", "ringing", "in-progress"])
@pytest.mark.parametrize("number", [NUMBER, None], ids=["phone call", "web call"])
def test_attack_a_call_first_recorded_after_its_conversations_erasure_keeps_no_number_nor_words(db, status, number):
    """The call's conversation (VAPI's call id: this call's alone) is erased before the gateway
    holds any record of the call; then VAPI's status update, sent late (``queued`` or ``ringing``
    too: VAPI retries), is the call's first record, and the report follows. A ``queued`` or
    ``ringing`` first record kept the caller's number (it was taken for the call's start), and the
    report, comparing the erasure's time (Redis's clock) with the record's ``created_at``
    (PostgreSQL's) found the erasure older than the call and kept the transcript, summary and
    recording link — a web call's (no number to tag) whatever the status. Any erasure of a call's
    conversation is of that call: its record keeps the tag and no words, whatever came first."""
    info, conv = _call(number)
    tenant = f"vrace-{uuid.uuid4().hex[:8]}"

    async def go() -> tuple[list[dict], int, int]:
        pool = await asyncpg.create_pool(db, min_size=2, max_size=4)
        store = calls.CallStore(lambda t: tenant_transaction(pool, t))
        try:
            await _Side(pool).erase(tenant, conv)
            await store.upsert(tenant, "vp", info, "bot", status)
            await _Side(pool).report(tenant, info)
            return await _kept(pool, tenant, info)
        finally:
            await pool.close()

    record, ledger, named = asyncio.run(go())
    assert record == [
        {"customer_number": conversation_tag(tenant, conv) if number else None, "transcript": None, "summary": None,
         "recording_url": None, "duration_s": 42.0}
    ]  # fmt: skip
    assert (ledger, named) == (1, 0)


def test_a_late_ringing_update_filling_in_the_number_after_the_erasure_keeps_the_tag(db):
    """A record without the caller's number (a ``queued`` update), then the erasure (the record
    has no number to tag), then a late ``ringing`` update naming the number: it filled the number
    in (a status of the call's start was taken as before any erasure)."""
    info, conv = _call(NUMBER)
    tenant = f"vrace-{uuid.uuid4().hex[:8]}"

    async def go() -> list[dict]:
        pool = await asyncpg.create_pool(db, min_size=2, max_size=4)
        store = calls.CallStore(lambda t: tenant_transaction(pool, t))
        try:
            await store.upsert(tenant, "vp", wire.CallInfo(call_id=info.call_id), "bot", "queued")
            await _Side(pool).erase(tenant, conv)
            await store.upsert(tenant, "vp", info, "bot", "ringing")
            return (await _kept(pool, tenant, info))[0]
        finally:
            await pool.close()

    (record,) = asyncio.run(go())
    assert record["customer_number"] == conversation_tag(tenant, conv)


@pytest.mark.parametrize("number", [NUMBER, None], ids=["phone call", "web call"])
@pytest.mark.parametrize("skew_s", [-3600.0, 3600.0], ids=["redis behind", "redis ahead"])
def test_an_erasure_after_the_calls_start_counts_whatever_the_two_clocks_say(db, skew_s, number):
    """The call starts (its assistant-request: the record with the caller's number), then its
    conversation is erased with Redis's clock an hour behind (or ahead of) PostgreSQL's, then a
    status update and the report come. The report compared the erasure's time (Redis's clock)
    with the record's ``created_at`` (PostgreSQL's): an erasure stamped before the record, by a
    clock behind, was taken for an erasure before the call, and a web call's words (no number for
    the erasure to tag) stayed. The erasure times are compared with erasure times only."""
    info, conv = _call(number)
    tenant = f"vrace-{uuid.uuid4().hex[:8]}"

    async def go() -> tuple[list[dict], int, int]:
        pool = await asyncpg.create_pool(db, min_size=2, max_size=4)
        store = calls.CallStore(lambda t: tenant_transaction(pool, t))
        try:
            await store.upsert(tenant, "vp", info, "bot", "ringing", begins=True)
            async with tenant_transaction(pool, tenant) as conn:
                await conversations.erase(conn, tenant, AGENT_ID, conv, time.time() + skew_s)
            await store.upsert(tenant, "vp", info, "bot", "in-progress")
            await _Side(pool).report(tenant, info)
            return await _kept(pool, tenant, info)
        finally:
            await pool.close()

    record, ledger, named = asyncio.run(go())
    assert record == [
        {"customer_number": conversation_tag(tenant, conv) if number else None, "transcript": None, "summary": None,
         "recording_url": None, "duration_s": 42.0}
    ]  # fmt: skip
    assert (ledger, named) == (1, 0)


def test_an_erasure_before_the_calls_start_is_not_of_the_call(db):
    """The other side: an erasure recorded before the gateway saw the call start (its
    assistant-request) is not of the call; its number and words stay."""
    info, conv = _call(NUMBER)
    tenant = f"vrace-{uuid.uuid4().hex[:8]}"

    async def go() -> list[dict]:
        pool = await asyncpg.create_pool(db, min_size=2, max_size=4)
        store = calls.CallStore(lambda t: tenant_transaction(pool, t))
        try:
            await _Side(pool).erase(tenant, conv)
            await store.upsert(tenant, "vp", info, "bot", "ringing", begins=True)
            await store.upsert(tenant, "vp", info, "bot", "in-progress")
            await _Side(pool).report(tenant, info)
            return (await _kept(pool, tenant, info))[0]
        finally:
            await pool.close()

    (record,) = asyncio.run(go())
    assert record["customer_number"] == NUMBER and record["transcript"] == REPORT.transcript
