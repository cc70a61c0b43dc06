"""A VAPI account's spool holds a bounded number of bytes, not only of records (rev6).

The spool (``channels.vapi.spool``) keeps in Redis every record an erasure's lock kept out, up to
``MAX_RECORDS`` (100 000) per account. An end-of-call report holds its transcript (200 000
characters: up to 800 kB in UTF-8) and summary: a webhook sender (one account's bearer token) that
sent reports while any erasure of a tenant sharing the lock's bucket held it could pile tens of
gigabytes into the Redis every tenant shares. Now the bytes are bounded too (``MAX_BYTES``), past
it 503 as past the record count, and the space comes back as records are written or dropped.

The real Valkey; the bound lowered in this process (``MAX_BYTES``) so the test stays small.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import orjson
import redis.asyncio as aioredis

from channels.vapi import spool
from core.erasure_key import ErasureInProgress

RUN = uuid.uuid4().hex[:6]
TENANT = f"rev6-spool-{RUN}"
BIG = "é" * 50_000  # (a transcript: 100 kB in UTF-8)


def _record(n: int) -> dict:
    return {
        "kind": "report",
        "tenant": TENANT,
        "account": "main",
        "conversation_id": f"vapi:call-{n}",
        "agent": None,
        "info": {"call_id": f"call-{n}"},
        "report": {"transcript": BIG},
    }


async def _held(client, list_key: str) -> int:
    return sum(len(raw) for raw in await client.lrange(list_key, 0, -1))


def test_a_webhook_sender_cannot_pile_more_bytes_than_the_bound_into_the_spool(services, monkeypatch):
    monkeypatch.setattr(spool, "MAX_BYTES", 1_000_000, raising=False)

    async def scenario():
        client = aioredis.Redis.from_url(services[1])
        list_key = spool.key(TENANT, "main")
        try:
            store = spool.Spool(client)
            kept = refused = 0
            for n in range(30):  # (30 reports of 100 kB: three times the bound)
                try:
                    await store.put(_record(n), ErasureInProgress("erasure"))
                    kept += 1
                except ErasureInProgress:
                    refused += 1
            full = await _held(client, list_key)
            # the space comes back: the writer takes the head, an erasure drops its conversation's
            head = await store.head(list_key)
            await store.remove(list_key, head)
            await spool.drop(client, TENANT, [orjson.loads(await store.head(list_key))["conversation_id"]])
            again = 0
            for n in range(30, 33):
                try:
                    await store.put(_record(n), ErasureInProgress("erasure"))
                    again += 1
                except ErasureInProgress:
                    pass
            left = await client.lrange(list_key, 0, -1)
            for raw in left:  # (emptied as the writer would: the count goes with the last)
                await store.remove(list_key, raw)
            count = await client.get(spool.bytes_key(list_key)) if hasattr(spool, "bytes_key") else None
            return kept, refused, full, again, count
        finally:
            await client.delete(list_key)
            await client.aclose()

    kept, refused, full, again, count = asyncio.run(scenario())
    assert refused > 0 and full <= 1_000_000, (kept, refused, full)
    assert kept >= 9  # (a bound of bytes, not of one record)
    assert again == 2  # (two records' room given back)
    assert count is None


def test_a_count_left_by_a_list_deleted_meanwhile_refuses_nothing(services, monkeypatch):
    """A full list deleted by other means (an operator's DEL) leaves its count behind: the next
    record finds the list empty and is taken."""
    monkeypatch.setattr(spool, "MAX_BYTES", 1_000_000, raising=False)

    async def scenario():
        client = aioredis.Redis.from_url(services[1])
        list_key = spool.key(TENANT, "other")
        try:
            store = spool.Spool(client)
            record = {**_record(0), "account": "other"}
            for _ in range(12):  # (past the bound)
                with contextlib.suppress(ErasureInProgress):
                    await store.put(record, ErasureInProgress("erasure"))
            await client.delete(list_key)  # (the count stays)
            await store.put(record, ErasureInProgress("erasure"))
            return await client.llen(list_key)
        finally:
            await client.delete(list_key, spool.bytes_key(list_key))
            await client.aclose()

    assert asyncio.run(scenario()) == 1
