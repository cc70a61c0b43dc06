"""A person's reply whose erasure check Redis does not answer (a partitioned or stalled Redis: no
error, no answer) is answered in bounded time, not left waiting with its escalation locked.

The reply takes Redis's time, then reads the conversation's erasure mark, inside the escalation
check's transaction (its row locked, a PostgreSQL connection held). Neither call had a timeout
(the gateway's Redis client has no socket timeout), and since the erasure of API conversations
began to be checked every reply asks: a Redis that stopped answering held each reply, its
transaction and its connection for as long as it stayed silent. Now a call Redis does not answer
counts as one that failed: an API conversation's reply is stored unchecked when the time is out
of reach (as when Redis refuses the call), and refused for now (503) when the mark is.

The gateway process is launched with ``admin_escalations.redis_now_us`` or ``erasure_mark_us``
waiting for good (as a call to a Redis that never answers) while a file the test writes names
it. The real stack otherwise: the mock LLM, the embedded PostgreSQL and Valkey."""

from __future__ import annotations

import textwrap
import uuid
from pathlib import Path

import httpx
import pytest

from tests.conftest import MASTER_KEY, Gateway, wait_until
from tests.test_channels_whatsapp import rows

RUN = uuid.uuid4().hex[:6]
TENANT = f"rhang-{RUN}"
ASK_PERSON = "I want to talk to a person please"
HANDOFF = "A person will answer."

LAUNCHER = textwrap.dedent(
    """
    import asyncio
    import os
    import sys

    from gateway import admin  # (first: admin_escalations is imported by it)
    from gateway import admin_escalations


    def _silent(name):
        try:
            with open(os.environ["RHANG_SILENT"]) as f:
                return f.read().strip() == name
        except FileNotFoundError:
            return False


    _now, _mark = admin_escalations.redis_now_us, admin_escalations.erasure_mark_us


    async def redis_now_us(redis):
        if _silent("time"):
            await asyncio.Event().wait()  # a Redis that never answers
        return await _now(redis)


    async def erasure_mark_us(redis, *args):
        if _silent("mark"):
            await asyncio.Event().wait()
        return await _mark(redis, *args)


    admin_escalations.redis_now_us = redis_now_us
    admin_escalations.erasure_mark_us = erasure_mark_us

    from gateway.cli import main

    sys.exit(main())
    """
)


class LaunchedGateway(Gateway):
    def __init__(self, tmp: Path, config: dict, urls: tuple[str, str], silent: Path) -> None:
        self.silent = silent
        env = {"GATEWAY_CHANNEL_WORKER": "0", "RHANG_SILENT": str(silent)}
        super().__init__(tmp, config, urls, launcher=LAUNCHER, launcher_name="rhang_gateway", env=env)


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    config = {
        "router": {"max_attempts": 1},
        "providers": [{"name": "llm", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k"]}],
        "models": [{"name": "agent-model", "deployments": [{"provider": "llm", "model": "m"}]}],
    }
    g = LaunchedGateway(tmp_root, config, services, tmp_root / f"rhang-silent-{RUN}")
    try:
        r = _admin(g, "POST", "/admin/keys", json={"name": "web", "tenant": TENANT})
        assert r.status_code == 201, r.text
        g.web_key = r.json()["key"]
        body = {
            "name": "helper",
            "tenant": TENANT,
            "model": "agent-model",
            "template": "You help.",
            "escalation": {"enabled": True, "threshold": 0.5, "handoff_message": HANDOFF},
        }
        r = _admin(g, "POST", "/admin/agents", json=body)
        assert r.status_code == 201, r.text
        yield g
    finally:
        g.stop()


def _admin(gw, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, f"{gw.url}{path}", headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=30, **kw)


def _escalated(gw, services, conv: str) -> str:
    body = {
        "model": "agent:helper",
        "messages": [{"role": "user", "content": ASK_PERSON}],
        "metadata": {"conversation_id": conv},
    }
    r = httpx.post(
        f"{gw.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {gw.web_key}"}, timeout=60
    )
    assert r.status_code == 200, r.text
    sql = "SELECT id FROM escalations WHERE tenant = $1 AND conversation_id = $2"
    wait_until(lambda: rows(services[0], sql, TENANT, conv), what="the escalation")
    esc = rows(services[0], sql, TENANT, conv)[0]["id"]
    assert _admin(gw, "POST", f"/admin/escalations/{esc}/claim").status_code == 200
    return esc


def _reply(gw, esc: str, words: str, silent: str) -> httpx.Response:
    gw.silent.write_text(silent)
    try:
        return _admin(gw, "POST", f"/admin/escalations/{esc}/reply", json={"text": words})
    finally:
        gw.silent.unlink()


def _words(gw, esc: str) -> list:
    r = _admin(gw, "GET", f"/admin/escalations/{esc}")
    assert r.status_code == 200, r.text
    return [m.get("content") for m in r.json()["conversation"]]


def test_a_reply_whose_redis_time_is_not_answered_is_stored_unchecked(gw, services):
    esc = _escalated(gw, services, f"web-{uuid.uuid4().hex[:10]}")
    words = f"a person answers {uuid.uuid4().hex[:8]}"
    r = _reply(gw, esc, words, "time")
    assert r.status_code == 200, r.text
    assert r.json()["delivery"]["status"] == "stored", r.text
    assert words in _words(gw, esc)


def test_a_reply_whose_erasure_mark_is_not_answered_is_refused_for_now(gw, services):
    esc = _escalated(gw, services, f"web-{uuid.uuid4().hex[:10]}")
    words = f"a person answers {uuid.uuid4().hex[:8]}"
    r = _reply(gw, esc, words, "mark")
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] and "could not be sent just now" in r.json()["error"]["message"]
    assert words not in _words(gw, esc)
    # (the escalation was not left locked: the same reply goes through once Redis answers)
    r = _admin(gw, "POST", f"/admin/escalations/{esc}/reply", json={"text": words})
    assert r.status_code == 200, r.text
    assert words in _words(gw, esc)
