"""The admin erasure of a WhatsApp conversation marks it erased (the mark the gateway reads with a
turn's signed queue time, ``x-gateway-queued-at``) before it clears the conversation's memory.

A first turn (the conversation held nothing when it was loaded, so the seq floor that stops a
later turn cannot) answered while the erasure runs stores itself after the memory's erasure began:
only the mark can refuse it. Marked after the memory step, a turn stored between the two was kept,
and reached PostgreSQL after the erasure (stamped after the erasure's time, it is not one of the
turns "on their way" the erasure skips): the customer's words from before the erasure, kept.

The erasure is paused right after its memory step by a gateway launched with
``runtime.memory.Memory.forget_recent`` wrapped (it waits for a Redis key the test sets), and the
turn is answered there: the order is the gateway's own, the timing the test's.

The real stack: a gateway process (its channel worker off), the mock LLM, the mock Graph API."""

from __future__ import annotations

import textwrap
import threading
import urllib.parse
import uuid
from pathlib import Path

import httpx
import orjson
import pytest
import redis

from core import queued_proof
from runtime.memory import MEMORY_GROUP, MEMORY_STREAM
from tests.conftest import (
    MASTER_KEY,
    Gateway,
    environ,
    run_cli,
    wait_until,
)
from tests.test_channels_whatsapp import rows
from tests.test_wa_queued_erasure import KEY, SLOW, _account, _redis_now, _turn

TENANT = f"waord-{uuid.uuid4().hex[:6]}"
PNID = "8303"
# + conversation id: ":armed" (the erasure pauses after its memory step), ":held" (it does), ":go"
# (it goes on); ":writer" (the memory writer holds the conversation's turns), ":written" (it writes)
PAUSE = "test:erasure-pause:"

LAUNCHER = textwrap.dedent(
    """
    import asyncio
    import os
    import sys

    import orjson
    import redis.asyncio as aioredis

    from runtime import conversations, memory

    GATE = "test:erasure-pause:"
    _client = []


    def _redis():
        if not _client:
            _client.append(aioredis.from_url(os.environ["REDIS_URL"]))
        return _client[0]


    async def _wait_for(key):
        for _ in range(1200):  # bounded: the test lets it go on
            if await _redis().exists(key):
                return
            await asyncio.sleep(0.05)


    _forget_recent = memory.Memory.forget_recent


    async def forget_recent(self, tenant, agent_id, conversation_id):
        out = await _forget_recent(self, tenant, agent_id, conversation_id)
        gate = GATE + conversation_id
        if await _redis().delete(gate + ":armed"):  # (once: the erasure's first memory step)
            await _redis().set(gate + ":held", "1", ex=300)
            await _wait_for(gate + ":go")
        return out


    _write_turns = conversations.write_turns


    async def write_turns(conn, entries, key=None):
        # a memory writer behind the erasure (PostgreSQL slow, a busy replica): a turn of an armed
        # conversation reaches PostgreSQL once the test says the erasure is over
        for e in entries:
            gate = GATE + str(orjson.loads(e[b"r"]).get("external_id"))
            if await _redis().exists(gate + ":writer"):
                await _wait_for(gate + ":written")
        return await _write_turns(conn, entries, key)


    memory.Memory.forget_recent = forget_recent
    conversations.write_turns = write_turns

    from gateway.cli import main

    sys.exit(main())
    """
)


class PausingGateway(Gateway):
    """``gateway serve`` whose erasures pause after their memory step when the test arms it."""

    def __init__(self, tmp: Path, config: dict, urls: tuple[str, str]) -> None:
        env = {"GATEWAY_CHANNEL_WORKER": "0"}
        super().__init__(tmp, config, urls, launcher=LAUNCHER, launcher_name="pausing_gateway", env=env)


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock, graph):
    out = run_cli("keys", "create", "--name", "waord", "--tenant", TENANT, urls=services, tmp=tmp_root)
    assert out.returncode == 0, out.stderr
    key = out.stdout.splitlines()[0].strip()
    config = {
        "router": {"max_attempts": 1},
        "providers": [{"name": "llm", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k"]}],
        "models": [{"name": "agent-model", "deployments": [{"provider": "llm", "model": "m"}]}],
        "channels": {"whatsapp": {"ord": _account(TENANT, PNID, "WAORD_KEY", graph.url)}},
    }
    with environ({"WAORD_KEY": key}):
        g = PausingGateway(tmp_root, config, services)
    g.key = key
    try:
        body = {
            "name": "wabot",
            "tenant": TENANT,
            "model": "agent-model",
            "template": "You help {{ customer_number }}.",
            "variables": {"customer_number": {"type": "string", "required": False}},
        }
        r = httpx.post(
            f"{g.url}/admin/agents", json=body, headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=30
        )
        assert r.status_code == 201, r.text
        yield g
    finally:
        g.stop()


def _on_its_way(services, conv: str) -> bool:
    """Whether the memory stream holds a turn of the conversation its writers have not written yet
    (not delivered, or delivered and not acknowledged)."""
    r = redis.Redis.from_url(services[1])
    try:
        ours = [
            entry_id
            for entry_id, fields in r.xrange(MEMORY_STREAM)
            if orjson.loads(fields[b"r"]).get("external_id") == conv
        ]
        if not ours:
            return False
        group = next(g for g in r.xinfo_groups(MEMORY_STREAM) if g["name"].decode() == MEMORY_GROUP)
        delivered = tuple(int(p) for p in group["last-delivered-id"].decode().split("-"))
        pending = {p["message_id"] for p in r.xpending_range(MEMORY_STREAM, MEMORY_GROUP, "-", "+", 10_000)}
        return any(tuple(int(p) for p in i.decode().split("-")) > delivered or i in pending for i in ours)
    finally:
        r.close()


def test_a_first_turn_stored_while_the_erasure_clears_the_memory_is_refused_and_not_kept(gw, services, module_mock):
    wa_id = str(uuid.uuid4().int % 10**12 + 10**11)
    conv = f"wa:{PNID}:{wa_id}"
    queued = queued_proof.sign(TENANT, conv, _redis_now(services), KEY)  # queued before the erasure
    r = redis.Redis.from_url(services[1])
    r.set(f"{PAUSE}{conv}:armed", "1", ex=300)
    r.set(f"{PAUSE}{conv}:writer", "1", ex=300)
    answered: list[httpx.Response] = []
    erased: list[httpx.Response] = []
    call = threading.Thread(
        target=lambda: answered.append(_turn(gw, gw.key, conv, wa_id, "my card is 4111" + SLOW, queued))
    )
    path = f"/admin/agents/wabot/conversations/{urllib.parse.quote(conv, safe='')}"
    erase = threading.Thread(
        target=lambda: erased.append(
            httpx.delete(
                f"{gw.url}{path}",
                params={"tenant": TENANT},
                headers={"Authorization": f"Bearer {MASTER_KEY}"},
                timeout=120,
            )
        )
    )
    call.start()
    try:
        # the first turn loaded the (empty) conversation and waits for the model
        wait_until(
            lambda: any(wa_id in str(q["body"].get("messages")) for q in module_mock.requests()),
            what="the model asked",
        )
        erase.start()
        wait_until(lambda: r.exists(f"{PAUSE}{conv}:held"), what="the erasure past its memory step")
        call.join(60)  # the model answers, the turn stores itself: the erasure is between its steps
        assert answered and answered[0].status_code == 200, answered and answered[0].text
    finally:
        r.set(f"{PAUSE}{conv}:go", "1", ex=300)
        call.join(60)
        if erase.ident is not None:
            erase.join(120)
        r.set(f"{PAUSE}{conv}:written", "1", ex=300)  # the memory writer goes on, after the erasure
        r.close()
    assert erased and erased[0].status_code == 200, erased and erased[0].text
    wait_until(lambda: not _on_its_way(services, conv), what="the memory writers past the turn")
    kept = """SELECT m.content->>'content' AS words FROM messages m JOIN conversations c ON c.id = m.conversation_id
              WHERE c.tenant = $1 AND c.external_id = $2"""
    assert rows(services[0], kept, TENANT, conv) == []
    assert rows(services[0], "SELECT 1 FROM conversations WHERE tenant = $1 AND external_id = $2", TENANT, conv) == []
