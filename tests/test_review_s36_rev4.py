"""Second review of the s36 merges (rev1's escalations, rev3's reservations, rev2's bounds, mine3's
VAPI and reports), as an attacker and a billing auditor: real gateways over the embedded
PostgreSQL and Valkey, the OpenAI SDK, the admin API.

Attacks tried (each a test below):
- a conversation erased while a later turn's escalation (the window loaded from Redis: no
  ``since``) was on its way to PostgreSQL: the erasure's transaction ran whole between the turn's
  Redis check and its write, and the escalation was opened after it with the erased customer's
  words, the conversation held for a person;
- a stream over the relay's bound, from a provider reporting no usage, compacted as it went
  (``gateway.usage.compact``): the tool calls of every choice but the first, calls past
  ``MAX_STREAMED_CALLS`` or with an index that is not an int, and arguments sent as an object
  were dropped, so the estimate (what is charged) left them out (the end-to-end case:
  ``tests/test_routing_review_s22.py``, ``..._counts_the_tool_calls_of_every_choice``);
- a long tool call streamed in small deltas: each delta was appended to the call's arguments by
  copying them whole (``merge_calls``), on the event loop, at every compaction — quadratic in
  the arguments' length (a stream of 44 MB with 1 MB of arguments: ~10 s of compaction, 7x
  the linear relay's; 89 MB: ~60 s, one compaction holding the loop for ~3.7 s). The test
  counts the characters copied, not the time.

No test waits on the clock: the interleavings are held by a test connection's locks until the
other sessions wait behind it (``tests.pg_locks.blocked_by``); bounds in seconds are hang guards.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import uuid

import asyncpg
import openai
import orjson
import pytest

from core.types import RequestContext
from tests.conftest import Gateway
from tests.pg_locks import blocked_by
from tests.test_agents_e2e import config
from tests.test_channels_vapi import admin as _admin
from tests.test_channels_whatsapp import rows as _rows
from tests.test_policies import new_key

BOUND = 60.0  # seconds: a hang guard only, never a timing assertion


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    # (an escalating turn waits for the erasure lock erasure_lock_wait_s, then spools: other test
    # files' erasures share its buckets, and a full run's could make it spool, not wait here)
    g = Gateway(tmp_root, config(module_mock, server={"erasure_lock_wait_s": 30}), services)
    yield g
    g.stop()


# ---- escalations and erasures ---------------------------------------------------------------------
async def _until(check, what: str) -> None:
    for _ in range(int(BOUND / 0.02)):  # (a hang guard)
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(what)


def test_attack_a_later_turns_escalation_written_after_its_conversations_erasure_committed(gw, services):
    """A conversation's second turn (its window in Redis: ``seq`` known, no ``since``) asks for a
    person; its escalation passes the Redis check (``memory.erased_since``: not erased yet), then
    its write waits (here: on a test transaction's uncommitted escalation of the same conversation,
    as it would on a busy pool). The admin erases the conversation meanwhile: the erasure's
    transaction finds no escalation to resolve and commits. The turn's escalation was then written
    — the customer's words and id in the queue, the conversation held — where no erasure finds it.
    Every escalation must be written under the erasure's lock (shared) after reading the erasures
    since the turn checked Redis: the erasure then waits for it and resolves it."""
    db = services[0]
    tenant = f"rev4-esc-{uuid.uuid4().hex[:6]}"
    admin_key = new_key(gw, tenant=tenant, scopes=["admin"])["key"]
    agent = f"bot-{uuid.uuid4().hex[:6]}"
    body = {"name": agent, "model": "agent-model", "template": "You help.", "variables": {}}
    body["escalation"] = {"enabled": True, "threshold": 0.5}
    r = _admin(gw, "POST", "/admin/agents", admin_key, json=body)
    assert r.status_code == 201, r.text
    agent_id = r.json()["id"]
    conv = f"c-{uuid.uuid4().hex[:8]}"
    key = new_key(gw, tenant=tenant)["key"]
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=BOUND)

    def turn(words: str):
        return client.chat.completions.with_raw_response.create(
            model=f"agent:{agent}", messages=[{"role": "user", "content": words}], metadata={"conversation_id": conv}
        )

    first = turn("hello, where is my parcel?")
    assert first.headers.get("x-gateway-escalation") is None  # (a window in Redis for the second turn)

    async def scenario():
        holder = await asyncpg.connect(db)
        pool = concurrent.futures.ThreadPoolExecutor(2)
        loop = asyncio.get_running_loop()
        try:
            tx = holder.transaction()
            await tx.start()
            await holder.execute(
                """INSERT INTO escalations (id, tenant, agent_id, agent, conversation_id, question,
                                           sla_first_s, sla_resolve_s)
                   VALUES ($1, $2, $3, $4, $5, 'the test holding the conversation''s open escalation', 60, 600)""",
                f"esc_hold_{uuid.uuid4().hex[:8]}",
                tenant,
                agent_id,
                agent,
                conv,
            )
            second = loop.run_in_executor(pool, turn, "my card is 4111 1111 1111 1111, talk to a person")
            pid = holder.get_server_pid()
            await _until(
                lambda: blocked_by(holder, pid) if not second.done() else _true(),
                "the second turn's escalation never waited",
            )
            assert not second.done(), second.result()
            path = f"/admin/agents/{agent}/conversations/{conv}"
            erasing = loop.run_in_executor(pool, lambda: _admin(gw, "DELETE", path, admin_key))
            # (done, or waiting behind the turn that waits behind the holder: under the erasure's lock)
            await _until(
                lambda: _true() if erasing.done() else _at_least(blocked_by(holder, pid), 2),
                "the erasure neither finished nor waited",
            )
            await tx.rollback()
            return await asyncio.wait_for(second, BOUND), await asyncio.wait_for(erasing, BOUND)
        finally:
            await holder.close()
            pool.shutdown(wait=False)

    second, erased = asyncio.run(scenario())
    assert erased.status_code == 200, erased.text
    assert second.http_response.status_code == 200
    left = _rows(
        db,
        """SELECT status, question FROM escalations
           WHERE tenant = $1 AND (status <> 'resolved' OR question LIKE '%4111%')""",
        tenant,
    )
    assert left == [], left


async def _true() -> bool:
    return True


async def _at_least(count, n: int) -> bool:
    return await count >= n


# ---- the usage estimate of a compacted stream ------------------------------------------------------
def _ev(*choices: dict) -> bytes:
    return b"data: " + orjson.dumps({"choices": list(choices)}) + b"\n\n"


def _calls(*calls: dict, index: int = 0) -> dict:
    return {"index": index, "delta": {"tool_calls": list(calls)}}


def test_attack_a_compacted_stream_counts_every_tool_call_text_the_client_was_sent():
    """What the estimate counts of a stream is the same whether or not the relay compacted what
    it kept on the way (once, or again and again), and an agent's stored answer (the first
    choice's calls, each with an id) is the same too."""
    from gateway.tools_loop import _streamed_answer
    from gateway.usage import MAX_STREAMED_CALLS, compact, estimate_stream_usage

    chunks = [
        _ev({"index": 0, "delta": {"role": "assistant", "content": "Looking."}}),
        _ev(_calls({"index": 0, "id": "c0", "type": "function", "function": {"name": "lookup", "arguments": ""}})),
        _ev(_calls({"index": 0, "function": {"arguments": '{"order": "A-17"}'}})),
        # another choice's calls (n > 1): the client was sent them
        _ev(_calls({"index": 0, "id": "d0", "function": {"name": "a", "arguments": "choice two " * 50}}, index=1)),
        # an index that is not an int, arguments sent as an object
        _ev(_calls({"index": "7", "id": "x", "function": {"name": "odd", "arguments": "odd index " * 50}})),
        _ev(_calls({"index": 0, "function": {"arguments": {"as": "an object " * 50}}})),
        # more calls than are assembled, each with its words
        *[
            _ev(_calls({"index": 10 + i, "id": f"m{i}", "function": {"name": "many", "arguments": f"call {i} " * 5}}))
            for i in range(MAX_STREAMED_CALLS + 20)
        ],
        b"data: [DONE]\n\n",
    ]

    def counted(kept: list[bytes]) -> int:
        ctx = RequestContext("r", "chat", {"model": "m", "messages": []}, 0.0)
        return estimate_stream_usage(ctx, kept).completion_tokens

    whole = counted(chunks)
    assert counted([compact(chunks)]) == whole
    again = compact([compact(chunks[:5]), *chunks[5:40]])
    assert counted([compact([again, *chunks[40:]])]) == whole
    assert _streamed_answer([compact(chunks)]) == _streamed_answer(chunks)
    assert _streamed_answer([compact([again, *chunks[40:]])]) == _streamed_answer(chunks)


class _Piece(str):
    """A delta's text that counts the characters copied when it is appended to another text
    (``text + piece`` asks the piece first: it is a subclass of the text's type)."""

    copied = 0

    def __radd__(self, other: str) -> str:
        _Piece.copied += len(other)
        return str.__add__(other, self)


def test_attack_a_long_streamed_tool_call_is_assembled_in_linear_work():
    """Twenty thousand deltas of one call's arguments (as a provider streams a long call): what
    assembling them copies is bounded by a multiple of their length, not by the length times the
    number of deltas."""
    from gateway.usage import assembled_calls, merge_calls

    calls: dict[int, dict] = {}
    start = {"index": 0, "id": "c0", "type": "function", "function": {"name": "f", "arguments": ""}}
    merge_calls({"choices": [{"index": 0, "delta": {"tool_calls": [start]}}]}, calls)
    _Piece.copied = 0
    n = 20_000
    for _ in range(n):
        d = {"index": 0, "function": {"arguments": _Piece(" word")}}
        merge_calls({"choices": [{"index": 0, "delta": {"tool_calls": [d]}}]}, calls)
    (call,) = assembled_calls(calls)
    assert call["function"]["arguments"] == " word" * n
    assert _Piece.copied <= 4 * len(" word") * n, _Piece.copied
