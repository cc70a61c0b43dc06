"""Attack (erasure across a rolling upgrade): the keyed names of the WhatsApp channel
(``channels.whatsapp.names``) read an older release's erasure marks under both names, but an older
release's replica still running reads only its own (plain-hash) name.

A customer asks for erasure; a replica of this release marks it (``erasure.mark_erased``) under the
keyed name only. A job of the conversation queued before the erasure (a message the customer sent
just before asking) is taken by a replica of the older release still running: its check reads the
plain-hash mark, finds none, runs the turn, sends the answer and writes the channel's records and
send states under its plain names after the erasure, which nothing erases again (the renaming pass
renames them to the keyed names: kept).
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid

import pytest
import redis.asyncio as aioredis

from tests.conftest import MASTER_KEY, environ


def _older_release_mark(tenant: str, conversation: str) -> str:
    """The erasure mark an older release's replica reads (its ``erased_key``, as it was)."""
    return "gw:{gw}:wa:erased:" + hashlib.sha256(f"{tenant}\x00{conversation}".encode()).hexdigest()[:32]


@pytest.mark.xfail(
    strict=True,
    reason=(
        "rev7: mark_erased writes the keyed mark only; an older release's replica (rolling upgrade) "
        "reads the plain-hash mark and runs a turn queued before the erasure. Writing the plain-hash "
        "mark too re-exposes a hash of the number (for ERASED_TTL, or a shorter TTL the lead chooses), "
        "and names._MOVE_MARK would then delete it: a decision for the lead, not this review"
    ),
)
def test_an_erasure_by_this_release_is_seen_by_an_older_release_replica_still_running(services):
    from channels.whatsapp import erasure

    tenant = f"rev7-{uuid.uuid4().hex[:6]}"
    conversation = f"wa:8401:1555{uuid.uuid4().int % 10**7:07d}"

    async def main() -> bytes | None:
        redis = aioredis.from_url(services[1])
        try:
            await erasure.mark_erased(redis, tenant, [conversation])
            assert await redis.get(erasure.erased_key(tenant, conversation)) is not None  # (ours: marked)
            return await redis.get(_older_release_mark(tenant, conversation))
        finally:
            await redis.aclose()

    with environ({"GATEWAY_MASTER_KEY": MASTER_KEY}):
        assert asyncio.run(main()) is not None
