"""An erasure that meets another transaction in the opposite lock order is served, never a 500.

PostgreSQL breaks a deadlock by aborting one of its transactions. The erasure
(``DELETE /admin/agents/{name}/conversations/{id}``) took the rows of the conversation's copies
(its escalations, its WhatsApp records: ``runtime.conversations.forget_copies``) before the
tenant's erasure lock and its conversation row last, while a retention sweep took the
conversation's row first and the copies after it, and a WhatsApp send recorded again under the
same message id took the erasure's lock (shared) before the record: each waited for the other,
and when the erasure was the one aborted its caller got a 500. Now every one of them takes the
erasure's lock first; an erasure aborted anyway (a deadlock, a serialization failure) is tried
again a few times, then answered with the retryable 503: a customer's message delivered again
(its record takes the channel state's row, then the message's, and no erasure lock) still
deadlocks with it, and is the real deadlock its retry is tested with.

Each race holds the other side's transaction open after its first step until the erasure waits
for it (``pg_blocking_pids``), then lets it go on: the order is the test's, never a timing's. The
other side's connections wait ``DEADLOCK_TIMEOUT`` before they look for a deadlock, the
gateway's the server's default (a second): in a deadlock, the erasure is the one aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import UTC, datetime

import asyncpg
import pytest

from channels.whatsapp import store
from gateway import conversation_retention
from gateway.db import tenant_transaction
from tests.conftest import Gateway
from tests.test_agents_e2e import config
from tests.test_channels_vapi import admin as _admin
from tests.test_channels_whatsapp import rows as _rows
from tests.test_privacy_s25 import _agent_with_key, _seed_conversation, _seed_words, _words

BOUND = 60.0  # seconds: a hang guard only, never a timing assertion
DEADLOCK_TIMEOUT = "20s"  # the test's side looks for a deadlock only long after the erasure did


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    g = Gateway(tmp_root, config(module_mock), services)
    yield g
    g.stop()


class _Held:
    """A connection whose transaction pauses after the first statement named ``after``
    (``reached`` set) until ``go`` is set."""

    def __init__(self, conn: asyncpg.Connection, after: str) -> None:
        self._conn = conn
        self._after = after
        self.reached = asyncio.Event()
        self.go = asyncio.Event()

    def __getattr__(self, name: str):
        attr = getattr(self._conn, name)
        if name != self._after:
            return attr

        async def call(*args, **kw):
            out = await attr(*args, **kw)
            if not self.reached.is_set():
                self.reached.set()
                await self.go.wait()
            return out

        return call


async def _pool(dsn: str) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        dsn, min_size=1, max_size=4, server_settings={"deadlock_timeout": DEADLOCK_TIMEOUT}
    )


async def _until_blocked_by(pool: asyncpg.Pool, pid: int, erasure: asyncio.Future) -> None:
    """Until a backend (the erasure's) waits for ``pid``'s locks, or the erasure answered."""
    for _ in range(int(BOUND / 0.01)):
        if erasure.done():
            return
        if await pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))", pid):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the erasure neither waited for the other side nor answered")


async def _race(pool: asyncpg.Pool, held: _Held, pid: int, side: asyncio.Future, erase) -> tuple:
    """The other side (``side``) paused after its first step; the erasure asked meanwhile; once
    the erasure waits for the side, the side goes on. Both results (the side's, the erasure's)."""
    await asyncio.wait_for(
        asyncio.wait({asyncio.ensure_future(held.reached.wait()), side}, return_when="FIRST_COMPLETED"), BOUND
    )
    assert not side.done(), side.result()
    erasure = asyncio.ensure_future(asyncio.to_thread(erase))
    await _until_blocked_by(pool, pid, erasure)
    held.go.set()
    return tuple(await asyncio.wait_for(asyncio.gather(side, erasure, return_exceptions=True), BOUND))


def _retries(gw: Gateway) -> int:
    """How many transactions the gateway ran again (``gateway.db.retried``): none, when the two
    sides take their locks in one order."""
    return gw.log().count("tried again")


def test_an_erasure_and_a_retention_sweep_of_the_same_conversation_both_finish(gw, services, monkeypatch):
    """The retention took the conversation's row, then the copies' rows; the erasure the copies',
    then the row: the erasure was aborted (500). Now the retention takes the tenant's erasure lock
    (shared) first, the erasure its own first, so one waits for the other's commit."""
    tenant = f"dl-ret-{uuid.uuid4().hex[:6]}"
    agent, agent_id, admin_key, _ = _agent_with_key(gw, tenant, retention_days=1)
    conv = f"customer-{uuid.uuid4().hex[:8]}"

    async def main():
        pool = await _pool(services[0])
        try:
            async with pool.acquire() as conn:
                await _seed_conversation(conn, tenant, agent_id, conv, 30)
                await _seed_words(conn, tenant, agent_id, agent, conv, 30)
            pids: list[int] = []
            holder: list[_Held] = []

            @contextlib.asynccontextmanager
            async def paused(p, t):
                async with tenant_transaction(p, t) as conn:
                    pids.append(conn.get_server_pid())
                    holder.append(_Held(conn, "fetch"))  # (after its batch of conversations is taken)
                    yield holder[0]

            monkeypatch.setattr(conversation_retention, "tenant_transaction", paused)
            sweep = asyncio.ensure_future(
                conversation_retention._delete_batch(pool, None, None, None, tenant, agent_id, 1)
            )
            for _ in range(int(BOUND / 0.01)):
                if holder or sweep.done():
                    break
                await asyncio.sleep(0.01)
            assert holder, sweep.result()
            return await _race(
                pool,
                holder[0],
                pids[0],
                sweep,
                lambda: _admin(gw, "DELETE", f"/admin/agents/{agent}/conversations/{conv}", admin_key),
            )
        finally:
            await pool.close()

    retried = _retries(gw)
    swept, erased = asyncio.run(main())
    assert swept == 1, swept
    assert erased.status_code == 200, erased.text
    assert _retries(gw) == retried, "the two deadlocked (the erasure was tried again)"
    assert _rows(services[0], "SELECT 1 FROM conversations WHERE tenant = $1", tenant) == []
    words = _words(services, tenant)
    assert words and all(w is None for w, _ in words.values()), words
    # (a call's record keeps its conversation's id: its caller's number is what holds the tag)
    assert all(c.startswith("erased:") for kind, c in words if kind != "call"), words
    kept = _rows(services[0], "SELECT agent_id FROM erased_conversations WHERE tenant = $1", tenant)
    assert kept == [{"agent_id": agent_id}]


def test_a_whatsapp_send_recorded_again_while_its_conversation_is_erased_both_finish(gw, services):
    """A send recorded a second time under the same wamid (a person's reply: its batch takes the
    erasure's lock shared, then upserts the record) while the erasure had cleared the record's
    words (the row locked) and waited for its lock: each waited for the other, the erasure was
    aborted (500). Now the erasure takes its lock before it touches a record."""
    tenant = f"dl-wa-{uuid.uuid4().hex[:6]}"
    agent, _, admin_key, _ = _agent_with_key(gw, tenant)
    number = f"4477{uuid.uuid4().int % 10**8:08d}"
    conv = store.conversation_id("1555", number)
    wamid = f"wamid.{uuid.uuid4().hex}"

    async def main():
        pool = await _pool(services[0])
        try:
            async with pool.acquire() as conn:
                await conn.execute(
                    """INSERT INTO whatsapp_messages (tenant, account, wamid, direction, conversation_id, wa_id, kind,
                                                      body, status, status_rank)
                       VALUES ($1, 'acct', $2, 'out', $3, $4, 'text', 'your card 4111 is blocked', 'sent', 1)""",
                    tenant,
                    wamid,
                    conv,
                    number,
                )
            sending = store.Conversation(tenant, "acct", "1555", number, conv, agent, None, None, asked_us=1)
            row = (tenant, "acct", wamid, conv, number, "text", "your card 4111 is blocked", None, "sent")
            row += (store.RANK["sent"], None, "h" * 64, sending.asked_us)  # (a hash no erasure has: checked)
            async with pool.acquire() as conn:
                held = _Held(conn, "execute")  # (after its tenants' shared lock)
                pid = conn.get_server_pid()
                side = asyncio.ensure_future(store.OutboundRecords(pool)._write_rows(held, [row]))
                return await _race(
                    pool,
                    held,
                    pid,
                    side,
                    lambda: _admin(gw, "DELETE", f"/admin/agents/{agent}/conversations/{conv}", admin_key),
                )
        finally:
            await pool.close()

    retried = _retries(gw)
    recorded, erased = asyncio.run(main())
    assert recorded == [None], recorded
    assert erased.status_code == 200, erased.text
    assert _retries(gw) == retried, "the two deadlocked (the erasure was tried again)"
    kept = _rows(services[0], "SELECT conversation_id, wa_id, body FROM whatsapp_messages WHERE tenant = $1", tenant)
    assert len(kept) == 1 and kept[0]["body"] is None, kept
    assert kept[0]["conversation_id"].startswith("erased:") and kept[0]["wa_id"] == kept[0]["conversation_id"], kept


@contextlib.contextmanager
def _aborting(dsn: str, tenant: str, times: int, sqlstate: str):
    """The erasure's transactions of ``tenant`` aborted by PostgreSQL (``sqlstate``: 40P01 a
    deadlock's victim, 40001 a serialization failure) the first ``times`` times, from a trigger
    on the erasure's record; yields how many times the erasure tried so far (a sequence: not
    rolled back with the transaction it counts)."""
    name = f"dl_abort_{uuid.uuid4().hex[:8]}"

    async def run(*sql: str) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            for statement in sql:
                await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(
        run(
            f"CREATE SEQUENCE {name}",
            f"""CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
                BEGIN
                  IF NEW.tenant = '{tenant}' THEN
                    IF nextval('{name}') <= {int(times)} THEN
                      RAISE EXCEPTION 'aborted by the test' USING ERRCODE = '{sqlstate}';
                    END IF;
                  END IF;
                  RETURN NEW;
                END $$""",
            f"CREATE TRIGGER {name} BEFORE INSERT ON erased_conversations FOR EACH ROW EXECUTE FUNCTION {name}()",
        )
    )
    try:
        yield lambda: _rows(dsn, f"SELECT CASE WHEN is_called THEN last_value ELSE 0 END AS n FROM {name}")[0]["n"]
    finally:
        asyncio.run(
            run(f"DROP TRIGGER {name} ON erased_conversations", f"DROP FUNCTION {name}()", f"DROP SEQUENCE {name}")
        )


def _erasable(gw: Gateway, services, tenant: str) -> tuple[str, str, str, str]:
    """An agent of ``tenant`` with a stored conversation and its words in an escalation."""
    agent, agent_id, admin_key, _ = _agent_with_key(gw, tenant)
    conv = f"customer-{uuid.uuid4().hex[:8]}"

    async def seed():
        conn = await asyncpg.connect(services[0])
        try:
            await _seed_conversation(conn, tenant, agent_id, conv, 0)
            await _seed_words(conn, tenant, agent_id, agent, conv, 0)
        finally:
            await conn.close()

    asyncio.run(seed())
    return agent, agent_id, admin_key, conv


def test_an_erasure_postgresql_aborts_is_tried_again_and_erases(gw, services):
    """A deadlock's victim: the erasure's transaction was answered 500. Now it runs again whole
    (its Redis steps are not repeated: their times are the erasure's), and erases."""
    tenant = f"dl-retry-{uuid.uuid4().hex[:6]}"
    agent, agent_id, admin_key, conv = _erasable(gw, services, tenant)
    with _aborting(services[0], tenant, 2, "40P01") as tries:
        r = _admin(gw, "DELETE", f"/admin/agents/{agent}/conversations/{conv}", admin_key)
        assert r.status_code == 200, r.text
        assert tries() == 3
    assert _retries(gw) >= 2  # (logged, the reason's name only)
    assert r.json()["messages"] == 1, r.json()
    assert _rows(services[0], "SELECT 1 FROM conversations WHERE tenant = $1", tenant) == []
    assert all(w is None for w, _ in _words(services, tenant).values()), _words(services, tenant)
    kept = _rows(services[0], "SELECT agent_id FROM erased_conversations WHERE tenant = $1", tenant)
    assert kept == [{"agent_id": agent_id}]


def test_an_erasure_postgresql_keeps_aborting_answers_the_retryable_503_and_erases_when_repeated(gw, services):
    """Aborted on every try (a serialization failure here): a bounded number of tries, then the
    erasure's "try again" answer (503, as when Redis is away), not a 500; nothing half done (the
    transaction rolled back), and the erasure repeated later erases."""
    tenant = f"dl-503-{uuid.uuid4().hex[:6]}"
    agent, _, admin_key, conv = _erasable(gw, services, tenant)
    path = f"/admin/agents/{agent}/conversations/{conv}"
    with _aborting(services[0], tenant, 1000, "40001") as tries:
        r = _admin(gw, "DELETE", path, admin_key)
        assert r.status_code == 503, r.text
        assert tries() == 3
    error = r.json()["error"]
    assert error["code"] == "service_unavailable" and "safe to repeat" in error["message"], error
    assert "SerializationError" in error["message"] and tenant not in error["message"], error
    assert _rows(services[0], "SELECT count(*) AS n FROM conversations WHERE tenant = $1", tenant) == [{"n": 1}]
    r = _admin(gw, "DELETE", path, admin_key)
    assert r.status_code == 200, r.text
    assert _rows(services[0], "SELECT 1 FROM conversations WHERE tenant = $1", tenant) == []
    assert all(w is None for w, _ in _words(services, tenant).values()), _words(services, tenant)


def test_a_whatsapp_message_delivered_again_while_its_conversation_is_erased_deadlocks_and_is_tried_again(gw, services):
    """A customer's message Meta delivers a second time (the same wamid) while the erasure runs:
    its record upserts the conversation's channel state, then meets the message's record, whose
    words the erasure cleared (the row locked) before it reached the state: a deadlock PostgreSQL
    breaks by aborting the erasure (the message's record takes no erasure lock). The erasure was
    answered 500; now it is tried again and erases."""
    tenant = f"dl-in-{uuid.uuid4().hex[:6]}"
    agent, _, admin_key, _ = _agent_with_key(gw, tenant)
    number = f"4478{uuid.uuid4().int % 10**8:08d}"
    conv = store.conversation_id("1555", number)
    wamid = f"wamid.{uuid.uuid4().hex}"
    words = "my card 4111 was stolen"

    async def main():
        pool = await _pool(services[0])
        try:
            async with pool.acquire() as conn:
                await conn.execute(
                    """INSERT INTO whatsapp_conversations (tenant, account, phone_number_id, wa_id, conversation_id,
                                                           agent, profile_name, last_inbound_at)
                       VALUES ($1, 'acct', '1555', $2, $3, $4, 'Ann', now())""",
                    tenant,
                    number,
                    conv,
                    agent,
                )
                await conn.execute(
                    """INSERT INTO whatsapp_messages (tenant, account, wamid, direction, conversation_id, wa_id, kind,
                                                      body)
                       VALUES ($1, 'acct', $2, 'in', $3, $4, 'text', $5)""",
                    tenant,
                    wamid,
                    conv,
                    number,
                    words,
                )
            again = [{"wamid": wamid, "type": "text", "text": words, "ts": 0.0}]
            row = (tenant, "acct", "1555", number, conv, agent, "Ann", datetime.now(UTC), again)
            async with pool.acquire() as conn:
                tx = conn.transaction()
                await tx.start()
                # (the record's first step: the conversation's channel state, held)
                await conn.execute(
                    "SELECT 1 FROM whatsapp_conversations WHERE tenant = $1 AND conversation_id = $2 FOR UPDATE",
                    tenant,
                    conv,
                )
                erasure = asyncio.ensure_future(
                    asyncio.to_thread(_admin, gw, "DELETE", f"/admin/agents/{agent}/conversations/{conv}", admin_key)
                )
                await _until_blocked_by(pool, conn.get_server_pid(), erasure)
                assert not erasure.done(), erasure.result().text
                recorded = await store.InboundRecords(pool)._write_rows(conn, [row])  # (waits for the erasure)
                await tx.commit()
            return recorded, await asyncio.wait_for(erasure, BOUND)
        finally:
            await pool.close()

    retried = _retries(gw)
    recorded, erased = asyncio.run(main())
    assert [fresh for _, fresh in recorded] == [0], recorded  # (delivered again: not a new message)
    assert erased.status_code == 200, erased.text
    assert _retries(gw) == retried + 1
    kept = _rows(services[0], "SELECT conversation_id, wa_id, body FROM whatsapp_messages WHERE tenant = $1", tenant)
    assert len(kept) == 1 and kept[0]["body"] is None and kept[0]["conversation_id"].startswith("erased:"), kept
    assert _rows(services[0], "SELECT 1 FROM whatsapp_conversations WHERE tenant = $1", tenant) == []
