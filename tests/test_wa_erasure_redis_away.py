"""A WhatsApp turn's signed queue time (``x-gateway-queued-at``) asks the gateway whether its
conversation was erased since; the answer is in Redis (the channel's mark, read with the memory).
When that read fails the gateway cannot tell: it must not answer the turn as it answers one
without history (the customer's words from before an erasure sent to the model provider, the
answer produced and recorded under the number), but refuse it for now (503: the worker retries,
and its own check then finds the mark).

A gateway on a Valkey of its own, going on without limits while Redis is away
(``policies.fail_open``, so nothing else stops the turn), the mock LLM and the mock Graph API."""

from __future__ import annotations

import urllib.parse
import uuid

import httpx
import pytest

from core import queued_proof
from gateway.embedded import EmbeddedValkey
from tests.conftest import MASTER_KEY, Gateway, environ, run_cli
from tests.test_wa_queued_erasure import KEY, _account, _turn

TENANT = f"waaway-{uuid.uuid4().hex[:6]}"
PNID = "8404"


@pytest.fixture(scope="module")
def lone(tmp_root, services, module_mock, graph):
    valkey = EmbeddedValkey(tmp_root / f"valkey-{uuid.uuid4().hex[:6]}")
    valkey.acquire()
    out = run_cli("keys", "create", "--name", "waaway", "--tenant", TENANT, urls=services, tmp=tmp_root)
    assert out.returncode == 0, out.stderr
    key = out.stdout.splitlines()[0].strip()
    config = {
        "router": {"max_attempts": 1},
        "policies": {"fail_open": True},
        "providers": [{"name": "llm", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k"]}],
        "models": [{"name": "agent-model", "deployments": [{"provider": "llm", "model": "m"}]}],
        "channels": {"whatsapp": {"away": _account(TENANT, PNID, "WAAWAY_KEY", graph.url)}},
    }
    try:
        with environ({"WAAWAY_KEY": key, "GATEWAY_CHANNEL_WORKER": "0"}):
            g = Gateway(tmp_root, config, (services[0], valkey.url))
    except BaseException:
        valkey.release()
        raise
    g.key = key
    up = {"valkey": True}
    try:
        body = {"name": "wabot", "tenant": TENANT, "model": "agent-model", "template": "You help.", "variables": {}}
        admin = {"Authorization": f"Bearer {MASTER_KEY}"}
        r = httpx.post(f"{g.url}/admin/agents", json=body, headers=admin, timeout=30)
        assert r.status_code == 201, r.text
        yield g, valkey, up
    finally:
        g.stop()
        if up["valkey"]:
            valkey.release()


def test_a_signed_turn_whose_erasure_mark_cannot_be_read_is_refused_for_now_not_answered(lone, module_mock):
    gw, valkey, up = lone
    wa_id = str(uuid.uuid4().int % 10**12 + 10**11)
    conv = f"wa:{PNID}:{wa_id}"
    r = _turn(gw, gw.key, f"wa:{PNID}:{wa_id}1", wa_id, "hello", None)  # (the key known to the process)
    assert r.status_code == 200, r.text
    import redis

    client = redis.Redis.from_url(valkey.url)
    sec, usec = client.time()
    client.close()
    queued = queued_proof.sign(TENANT, conv, sec * 1_000_000 + usec, KEY)  # queued before the erasure
    quoted = urllib.parse.quote(conv, safe="")
    r = httpx.delete(
        f"{gw.url}/admin/agents/wabot/conversations/{quoted}",
        params={"tenant": TENANT},
        headers={"Authorization": f"Bearer {MASTER_KEY}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    valkey.release()  # Redis goes: the mark cannot be read
    up["valkey"] = False
    before = len(module_mock.requests())
    r = _turn(gw, gw.key, conv, wa_id, "my card is 4111", queued)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] == "server_error"
    assert wa_id not in r.text
    # the customer's words from before the erasure went to no model
    assert len(module_mock.requests()) == before
