"""The WhatsApp worker's group-committed writes (channels/whatsapp/store.py) against the embedded
PostgreSQL: each caller gets its own row's result, and a row that cannot be written fails its
own caller only."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg

from channels.whatsapp import store
from gateway.db import migrate


def _msg(account: str, wa_id: str, text: str = "hi", wamid: str | None = None) -> dict:
    return {
        "account": account,
        "pnid": "555",
        "wa_id": wa_id,
        "wamid": wamid or f"wamid.{uuid.uuid4().hex}",
        "ts": time.time(),
        "type": "text",
        "text": text,
        "name": f"N{wa_id}",
    }


def _counted(recorder):
    """Records the size of every statement the recorder writes."""
    sizes: list[int] = []
    write = recorder._write_rows

    async def counted(conn, rows):
        sizes.append(len(rows))
        return await write(conn, rows)

    recorder._write_rows = counted
    return sizes


async def _pool(services):
    pool = await store.create_pool(services[0], max_size=4)
    async with pool.acquire() as conn:
        await migrate(conn)
    return pool


def test_concurrent_turns_share_a_statement_and_each_gets_its_own_conversation(services):
    async def go():
        pool = await _pool(services)
        try:
            tenant, account = f"t-{uuid.uuid4().hex[:6]}", "acct"
            rec = store.InboundRecords(pool)
            sizes = _counted(rec)
            firsts = [_msg(account, str(10**11 + i)) for i in range(6)]
            # two turns of conversation 0 at once: one upsert of a row per statement, so two
            out = await asyncio.gather(
                *(rec.record(tenant, "bot", [m]) for m in firsts),
                rec.record(tenant, "bot", [_msg(account, firsts[0]["wa_id"])]),
            )
            for (conv, fresh), m in zip(out, [*firsts, firsts[0]], strict=True):
                assert conv.wa_id == m["wa_id"] and conv.tenant == tenant and fresh == 1
                assert conv.name == f"N{m['wa_id']}" and conv.window_open()
            assert sizes == [6, 1]
            again = await rec.record(tenant, "bot", [firsts[3]])  # a redelivery: nothing new
            assert again[1] == 0 and again[0].wa_id == firsts[3]["wa_id"]
        finally:
            await pool.close()

    asyncio.run(go())


def test_a_row_that_cannot_be_written_fails_its_own_send_only(services):
    async def go():
        pool = await _pool(services)
        try:
            tenant = f"t-{uuid.uuid4().hex[:6]}"
            conv, _ = await store.InboundRecords(pool).record(tenant, "bot", [_msg("acct", "123456789012")])
            out = store.OutboundRecords(pool)
            sizes = _counted(out)
            wamids = [f"wamid.OUT{uuid.uuid4().hex}" for _ in range(4)]
            results = await asyncio.gather(
                *(out.record(conv, w, "text", f"piece {i}", None, "sent") for i, w in enumerate(wamids)),
                out.record(conv, "wamid.BAD", "text", "a NUL \x00 PostgreSQL refuses", None, "sent"),
                return_exceptions=True,
            )
            assert results[:4] == [None] * 4
            assert isinstance(results[4], asyncpg.PostgresError)
            assert sizes == [5, 1, 1, 1, 1, 1]  # one statement, then row by row after it failed
            conn = await asyncpg.connect(services[0])
            try:
                rows = await conn.fetch(
                    "SELECT wamid, body FROM whatsapp_messages WHERE tenant = $1 AND direction = 'out' ORDER BY id",
                    tenant,
                )
            finally:
                await conn.close()
            assert [(r["wamid"], r["body"]) for r in rows] == [(w, f"piece {i}") for i, w in enumerate(wamids)]
        finally:
            await pool.close()

    asyncio.run(go())
