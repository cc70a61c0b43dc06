"""Review s24 (rev2): attacks on conversation erasure, the per-tenant storage quota and the fair
kb-ingest queue, each reproduced before its fix."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import urllib.parse
import uuid

import asyncpg
import httpx
import openai
import pytest

from runtime import conversations
from tests.conftest import Gateway, wait_until
from tests.pg_locks import blocked_by
from tests.test_agents_e2e import config
from tests.test_channels_vapi import admin as _admin
from tests.test_channels_whatsapp import rows as _rows
from tests.test_conversation_erasure import _record
from tests.test_policies import new_key
from tests.test_wa_dead_letters_erasure import _tag


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    g = Gateway(tmp_root, config(module_mock), services)
    yield g
    g.stop()


def _agent_with_key(gw: Gateway, tenant: str) -> tuple[str, str, str]:
    admin_key = new_key(gw, tenant=tenant, scopes=["admin"])["key"]
    chat_key = new_key(gw, tenant=tenant)["key"]
    agent = f"bot-{uuid.uuid4().hex[:6]}"
    body = {"name": agent, "model": "agent-model", "template": "You help.", "variables": {}}
    assert _admin(gw, "POST", "/admin/agents", admin_key, json=body).status_code == 201
    return agent, admin_key, chat_key


# ---- conversation erasure -------------------------------------------------------------------


def test_a_memory_batch_in_flight_while_its_conversation_is_erased_is_not_written_back(gw, services):
    """The memory writer's transaction and the erasure's interleave: the batch had read the table
    of erasures (nothing yet) and inserted the conversation's turns, uncommitted, when the
    erasure ran (it found no conversation to delete, or deleted the row the batch then inserted
    anew) — both committed, and the erased turns were in PostgreSQL for good."""

    async def go():
        pool = await asyncpg.create_pool(services[0], min_size=2, max_size=4)
        tenant, agent_id = f"t-{uuid.uuid4().hex[:6]}", f"agt_{uuid.uuid4().hex[:8]}"
        try:

            async def messages(conv: str) -> list[str]:
                rows = await pool.fetch(
                    """SELECT m.content->>'content' AS words FROM messages m JOIN conversations c
                       ON c.id = m.conversation_id WHERE c.tenant = $1 AND c.external_id = $2""",
                    tenant,
                    conv,
                )
                return [r["words"] for r in rows]

            async def waiting_or_done(task: asyncio.Task, holder_pid: int) -> None:
                for _ in range(500):  # until the other transaction waits behind the holder, or is done
                    if task.done():
                        return
                    if await blocked_by(pool, holder_pid):
                        return
                    await asyncio.sleep(0.02)
                raise AssertionError("the other transaction neither waited nor finished")

            async def erase(conv: str):
                async with pool.acquire() as conn, conn.transaction():
                    return await conversations.erase(conn, tenant, agent_id, conv, time.time())

            # 1. the batch first (a new conversation: its row exists only in the batch's transaction)
            conv = f"new-{uuid.uuid4().hex[:6]}"
            async with pool.acquire() as writer:
                tx = writer.transaction()
                await tx.start()
                await conversations.write_turns(writer, [_record(tenant, agent_id, conv, time.time() - 1, 1, "4111")])
                erasing = asyncio.create_task(erase(conv))
                await waiting_or_done(erasing, writer.get_server_pid())
                await tx.commit()
            await erasing
            assert await messages(conv) == []

            # 2. the erasure first (an existing conversation: the batch re-inserts the deleted row)
            conv = f"old-{uuid.uuid4().hex[:6]}"
            async with pool.acquire() as conn, conn.transaction():
                await conversations.write_turns(conn, [_record(tenant, agent_id, conv, time.time() - 2, 1, "one")])
            late = [_record(tenant, agent_id, conv, time.time() - 1, 2, "4111 again")]
            async with pool.acquire() as eraser:
                tx = eraser.transaction()
                await tx.start()
                await conversations.erase(eraser, tenant, agent_id, conv, time.time())

                async def write():
                    async with pool.acquire() as conn, conn.transaction():
                        await conversations.write_turns(conn, late)

                writing = asyncio.create_task(write())
                await waiting_or_done(writing, eraser.get_server_pid())
                await tx.commit()
            await writing
            assert await messages(conv) == []
        finally:
            await pool.close()

    asyncio.run(go())


def test_erasing_a_channel_conversation_erases_its_channel_records_content(gw, services):
    """A WhatsApp conversation (``wa:…``) or a VAPI call (``vapi:…``) keeps the customer's words a
    second time in the channel's records (whatsapp_messages.body, vapi_calls.transcript and
    summary), which the admin API reads back (GET /admin/channels/whatsapp/messages,
    /admin/channels/vapi/calls/{id}): erasing the conversation left all of it."""
    tenant = f"erase-ch-{uuid.uuid4().hex[:6]}"
    agent, admin_key, _ = _agent_with_key(gw, tenant)
    wa, call = f"wa:1555:4477{uuid.uuid4().int % 10**6}", f"call-{uuid.uuid4().hex[:8]}"
    other = f"wa:1555:4499{uuid.uuid4().int % 10**6}"

    async def seed():
        conn = await asyncpg.connect(services[0])
        try:
            for conv, words in ((wa, "my card is 4111"), (other, "keep me")):
                await conn.execute(
                    """INSERT INTO whatsapp_messages
                           (tenant, account, wamid, direction, conversation_id, wa_id, body, status)
                       VALUES ($1, 'acct', $2, 'in', $3, '4477', $4, 'received')""",
                    tenant,
                    f"wamid.{uuid.uuid4().hex}",
                    conv,
                    words,
                )
            await conn.execute(
                """INSERT INTO vapi_calls
                       (id, tenant, account, call_id, conversation_id, transcript, summary, recording_url)
                   VALUES ($1, $2, 'acct', $3, $4, 'my card is 4111', 'card 4111', 'https://r.example/1.wav')""",
                f"vcall_{uuid.uuid4().hex[:12]}",
                tenant,
                call,
                f"vapi:{call}",
            )
        finally:
            await conn.close()

    asyncio.run(seed())
    for conv in (wa, f"vapi:{call}"):
        r = _admin(gw, "DELETE", f"/admin/agents/{agent}/conversations/{urllib.parse.quote(conv)}", admin_key)
        assert r.status_code == 200, r.text
    listed = _rows(services[0], "SELECT conversation_id, body FROM whatsapp_messages WHERE tenant = $1", tenant)
    bodies = {m["conversation_id"]: m["body"] for m in listed}
    # the record stays (statuses, counts), its words go, and its id (the number): the erasure's tag
    assert bodies == {_tag(tenant, wa): None, other: "keep me"}
    left = _rows(services[0], "SELECT transcript, summary, recording_url FROM vapi_calls WHERE tenant = $1", tenant)
    assert left == [{"transcript": None, "summary": None, "recording_url": None}]


def test_a_conversation_whose_id_has_a_slash_can_be_erased(gw, services, module_mock):
    """Conversation ids are any text of 1-256 characters (``metadata.conversation_id``); the
    erasure route took the id as one path segment, so ``acme/cust-1`` (sent as ``acme%2Fcust-1``
    or not) was a 404 of the router: such a conversation could never be erased."""
    tenant = f"erase-sl-{uuid.uuid4().hex[:6]}"
    agent, admin_key, chat_key = _agent_with_key(gw, tenant)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=chat_key, max_retries=0)
    conv = f"acme/cust-{uuid.uuid4().hex[:6]}"
    words = [{"role": "user", "content": "my card is 4111"}]
    client.chat.completions.create(model=f"agent:{agent}", messages=words, metadata={"conversation_id": conv})
    stored = """SELECT count(*) AS n FROM messages m JOIN conversations c ON c.id = m.conversation_id
                WHERE c.external_id = $1"""
    wait_until(lambda: _rows(services[0], stored, conv) == [{"n": 2}], what="the turn stored")
    path = f"/admin/agents/{agent}/conversations/{urllib.parse.quote(conv, safe='')}"
    r = _admin(gw, "DELETE", path, admin_key)
    assert r.status_code == 200, r.text
    assert r.json()["conversation_id"] == conv and r.json()["messages"] == 2
    assert _rows(services[0], stored, conv) == [{"n": 0}]
    r = _admin(gw, "GET", f"{path}/messages", admin_key)
    assert r.status_code == 200 and r.json()["data"] == []


def test_the_memory_writer_does_not_read_every_erasure_in_each_batch(gw, services):
    """Every memory batch skips the turns of erased conversations; written as a join, the planner
    hashed the whole table of erasures for each batch (a sequential scan: 100 ms a batch at
    200,000 erasures, growing with every erasure ever made). One index lookup per turn now."""

    async def go():
        conn = await asyncpg.connect(services[0])
        tenant = f"many-{uuid.uuid4().hex[:6]}"
        try:
            await conn.execute(
                """INSERT INTO erased_conversations (tenant, agent_id, external_hash, erased_at)
                   SELECT $1, 'agt_x', md5(i::text) || md5((i + 1)::text), now() FROM generate_series(1, 50000) i""",
                tenant,
            )
            await conn.execute("ANALYZE erased_conversations")
            entries = [_record(tenant, "agt_x", f"c-{i}", time.time(), 1, "hi") for i in range(500)]
            async with conn.transaction():
                await conn.execute(conversations.MEMORY_RAW_DDL)
                rows = [(e[b"r"].decode(), 1) for e in entries]
                await conn.copy_records_to_table("memory_raw", records=rows, columns=("r", "s"))
                plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + conversations._SKIP_ERASED))
        finally:
            await conn.execute("DELETE FROM erased_conversations WHERE tenant = $1", tenant)
            await conn.close()
        assert "Seq Scan on erased_conversations" not in plan, plan
        assert "Index" in plan, plan

    asyncio.run(go())


def test_a_conversation_with_an_agent_since_deleted_can_still_be_erased(gw, services, module_mock):
    """Deleting an agent archives it and frees its name; its conversations stay in PostgreSQL. The
    erasure looked up active agents only, so once the agent was deleted a customer's conversation
    with it could never be erased (404), and once a new agent took the name, the erasure took the
    new agent's conversation of that id and kept the old one."""
    tenant = f"erase-arch-{uuid.uuid4().hex[:6]}"
    agent, admin_key, chat_key = _agent_with_key(gw, tenant)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=chat_key, max_retries=0)
    conv1, conv2 = f"cust-{uuid.uuid4().hex[:6]}", f"cust-{uuid.uuid4().hex[:6]}"
    words = [{"role": "user", "content": "my card is 4111"}]
    for conv in (conv1, conv2):
        client.chat.completions.create(model=f"agent:{agent}", messages=words, metadata={"conversation_id": conv})
    stored = """SELECT count(*) AS n FROM messages m JOIN conversations c ON c.id = m.conversation_id
                WHERE c.tenant = $1 AND c.external_id = $2"""
    for conv in (conv1, conv2):
        wait_until(lambda c=conv: _rows(services[0], stored, tenant, c) == [{"n": 2}], what="the turns stored")
    assert _admin(gw, "DELETE", f"/admin/agents/{agent}", admin_key).status_code == 200

    r = _admin(gw, "DELETE", f"/admin/agents/{agent}/conversations/{conv1}", admin_key)
    assert r.status_code == 200, r.text  # the agent is gone, its conversation was not
    assert r.json()["messages"] == 2
    assert _rows(services[0], stored, tenant, conv1) == [{"n": 0}]

    body = {"name": agent, "model": "agent-model", "template": "You help.", "variables": {}}
    assert _admin(gw, "POST", "/admin/agents", admin_key, json=body).status_code == 201
    client.chat.completions.create(model=f"agent:{agent}", messages=words, metadata={"conversation_id": conv2})
    wait_until(lambda: _rows(services[0], stored, tenant, conv2) == [{"n": 4}], what="the new agent's turn stored")
    r = _admin(gw, "DELETE", f"/admin/agents/{agent}/conversations/{conv2}", admin_key)
    assert r.status_code == 200, r.text
    assert _rows(services[0], stored, tenant, conv2) == [{"n": 0}]  # the old agent's and the new one's
    # another tenant's admin still finds no agent of that name
    other = new_key(gw, tenant=f"other-{uuid.uuid4().hex[:6]}", scopes=["admin"])["key"]
    assert _admin(gw, "DELETE", f"/admin/agents/{agent}/conversations/{conv2}", other).status_code == 404


def test_erasing_a_conversation_erases_its_escalations_words(gw, services):
    """An escalation keeps the customer's message that escalated (``question``), the AI's draft,
    the person's answer and the context shown (GET /admin/escalations/{id}): all of it stayed
    after the conversation was erased."""
    tenant = f"erase-esc-{uuid.uuid4().hex[:6]}"
    agent, admin_key, _ = _agent_with_key(gw, tenant)
    conv, other = f"cust-{uuid.uuid4().hex[:6]}", f"cust-{uuid.uuid4().hex[:6]}"
    agent_id = _rows(services[0], "SELECT id FROM agents WHERE tenant = $1 AND name = $2", tenant, agent)[0]["id"]
    for c in (conv, other):
        _rows(
            services[0],
            """INSERT INTO escalations (id, tenant, agent_id, agent, conversation_id, question, draft,
                                        corrected_answer, context, status, sla_first_s, sla_resolve_s)
               VALUES ($1, $2, $3, $4, $5, 'my card is 4111', 'your card 4111', 'ok 4111', '{"v": "4111"}',
                       'resolved', 60, 600)""",
            f"esc_{uuid.uuid4().hex[:12]}",
            tenant,
            agent_id,
            agent,
            c,
        )
    r = _admin(gw, "DELETE", f"/admin/agents/{agent}/conversations/{conv}", admin_key)
    assert r.status_code == 200, r.text
    left = _rows(
        services[0],
        """SELECT conversation_id, question, draft, corrected_answer, context::text AS context, status
           FROM escalations WHERE tenant = $1 ORDER BY conversation_id <> $2""",
        tenant,
        other,
    )
    assert left == [
        {
            "conversation_id": other,
            "question": "my card is 4111",
            "draft": "your card 4111",
            "corrected_answer": "ok 4111",
            "context": '{"v": "4111"}',
            "status": "resolved",
        },
        {
            "conversation_id": _tag(tenant, conv),  # (the record stays, for the team's statistics)
            "question": None,
            "draft": None,
            "corrected_answer": None,
            "context": "{}",
            "status": "resolved",
        },
    ]


class _Rollback(Exception):
    pass


def test_a_memory_batch_of_many_tenants_holds_a_bounded_number_of_erasure_locks(gw, services):
    """(The lock above, per tenant of a batch, would make a batch of 500 tenants hold 500 locks,
    and a few replicas' batches at once could exhaust PostgreSQL's lock table: tenants share
    ERASURE_LOCK_BUCKETS locks.)"""

    async def go():
        conn = await asyncpg.connect(services[0])
        try:
            entries = [_record(f"many-{i}", "agt_x", "c", time.time(), 1, "hi") for i in range(500)]
            async with conn.transaction():
                await conversations.write_turns(conn, entries)
                held = await conn.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
                )
                raise _Rollback  # (nothing of it stays)
        except _Rollback:
            pass
        finally:
            await conn.close()
        assert 1 <= held <= conversations.ERASURE_LOCK_BUCKETS

    asyncio.run(go())


# ---- storage quota: what is on the disk while uploads are received ---------------------------


@pytest.fixture(scope="module")
def quota_gw(tmp_root, services, module_mock):
    from tests.conftest import gateway_config
    from tests.test_kb_api import start_gateway

    config = gateway_config(module_mock)
    config["policies"] = {**config.get("policies", {}), "max_files_per_tenant": 3, "max_file_bytes_per_tenant": 1000}
    g = start_gateway(tmp_root, module_mock, services, worker=False, config=config)
    yield g
    g.stop()


def _open_upload(gw: Gateway, key: str, sent: int) -> socket.socket:
    """A /v1/files upload whose client has sent the headers and ``sent`` bytes of the file, and
    then goes quiet (a slow client, or one keeping the upload open on purpose)."""
    boundary = "rev2boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nassistants\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="f.txt"\r\n'
        "Content-Type: text/plain\r\n\r\n"
    ).encode()
    request = (
        f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    body = head + b"x" * sent
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    sock.sendall(request + f"{len(body):x}\r\n".encode() + body + b"\r\n")
    return sock


def _status(sock: socket.socket) -> int | None:
    """The status the gateway answered with, None while it has not answered."""
    sock.setblocking(False)
    try:
        data = sock.recv(65536)
    except BlockingIOError:
        return None
    finally:
        sock.setblocking(True)
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else -1


def _incoming(tmp_root, before: frozenset = frozenset()) -> list:
    """The uploads being received (under the data directory every gateway of the suite shares:
    those there before the test, ``before``, are not this test's)."""
    incoming = tmp_root / "data" / "files" / "incoming"
    return [p for p in incoming.glob("upload-*") if p not in before] if incoming.is_dir() else []


def _incoming_bytes(tmp_root, before: frozenset = frozenset()) -> int:
    total = 0
    for p in _incoming(tmp_root, before):
        with contextlib.suppress(OSError):
            total += p.stat().st_size
    return total


def test_an_upload_is_cut_off_once_it_is_past_the_tenants_room(quota_gw, tmp_root):
    """The quota was checked before the body (is the tenant full already?) and after it (does
    this one fit?), but never while it came in: a tenant with 1,000 bytes of room had a 50 MB
    upload streamed to the disk whole before it was refused — and as many at once as it opened."""
    key = new_key(quota_gw, tenant=f"room-{uuid.uuid4().hex[:6]}")["key"]
    before = frozenset(_incoming(tmp_root))
    sock = _open_upload(quota_gw, key, 5000)
    try:
        status: list = []

        def settled() -> bool:
            if (got := _status(sock)) is not None:
                status.append(got)
            return bool(status) or _incoming_bytes(tmp_root, before) >= 4000

        wait_until(settled, what="an answer, or the bytes on the disk")
        assert status == [400]  # too_many_files, without waiting for the rest of the body
        wait_until(lambda: not _incoming(tmp_root, before), what="the partial upload removed")
    finally:
        sock.close()


def test_a_tenant_has_a_bounded_number_of_uploads_in_flight(quota_gw, tmp_root):
    """Each upload below the tenant's room was accepted and streamed to the disk while its client
    took its time: a tenant (any key of it: /v1/files) could keep thousands open, holding
    thousands of times its room on the disk every tenant shares. Past storage_quota's bound of
    uploads in flight per tenant and process, it is refused (429) before its body is read."""
    from gateway import storage_quota

    key = new_key(quota_gw, tenant=f"many-{uuid.uuid4().hex[:6]}")["key"]
    n = storage_quota.MAX_UPLOADS_IN_FLIGHT
    before = frozenset(_incoming(tmp_root))
    socks = [_open_upload(quota_gw, key, 100) for _ in range(n + 2)]
    try:
        answered: dict[int, int] = {}

        def settled() -> bool:
            for i, s in enumerate(socks):
                if i not in answered and (status := _status(s)) is not None:
                    answered[i] = status
            return len(answered) >= 2 or len(_incoming(tmp_root, before)) >= n + 2

        wait_until(settled, what="the uploads past the bound refused, or all of them on the disk")
        assert sorted(answered.values()) == [429, 429]
        # another tenant is not held up by this one
        other = new_key(quota_gw, tenant=f"other-{uuid.uuid4().hex[:6]}")["key"]
        r = httpx.post(
            f"{quota_gw.url}/v1/files",
            headers={"Authorization": f"Bearer {other}"},
            data={"purpose": "assistants"},
            files={"file": ("a.txt", b"hello")},
            timeout=30,
        )
        assert r.status_code == 200, r.text
    finally:
        for s in socks:
            s.close()
    wait_until(lambda: not _incoming(tmp_root, before), what="the abandoned uploads removed")


def test_a_second_erasure_from_a_replica_whose_clock_is_behind_does_not_undo_the_first(gw, services):
    """An erasure repeated (the admin retried, or another replica took the second request) set the
    recorded time to the later request's clock, even when that clock was behind: turns recorded
    before the first erasure and still on their way were then written back."""

    async def go():
        pool = await asyncpg.create_pool(services[0], min_size=1, max_size=2)
        tenant, agent_id, conv = f"t-{uuid.uuid4().hex[:6]}", f"agt_{uuid.uuid4().hex[:8]}", "c-skew"
        try:
            first = time.time()
            for at in (first, first - 10):  # the second replica's clock is 10 s behind
                async with pool.acquire() as conn, conn.transaction():
                    await conversations.erase(conn, tenant, agent_id, conv, at)
            async with pool.acquire() as conn, conn.transaction():  # recorded before the first erasure
                await conversations.write_turns(conn, [_record(tenant, agent_id, conv, first - 5, 1, "4111")])
            n = await pool.fetchval("SELECT count(*) FROM messages WHERE tenant = $1", tenant)
            assert n == 0
        finally:
            await pool.close()

    asyncio.run(go())
