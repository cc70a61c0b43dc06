"""A gateway stopped (SIGTERM) while a WhatsApp turn is in flight: the turn is answered once.

The channel's turns call the gateway over HTTP, its own address. uvicorn stops listening first
and runs the application's shutdown (where the channel stopped) after: a turn in flight then
called a gateway that was no longer there, and each shutdown used up one of its retries — with
none left, the message went to the dead letters and the customer got the fallback message, not
the answer. Now the application drains before the server stops listening (gateway/serving.py).

The real stack: a ``gateway serve`` process with the channel's worker inside (a Redis database
of its own: no other gateway of the session takes its jobs), the mock Graph API and the mock LLM.
The turn is pinned in flight by event: its image's download is held by the mock Graph API until
the test releases it, after the SIGTERM and after the gateway has begun its shutdown."""

from __future__ import annotations

import base64
import socket
import uuid

import redis

from tests.conftest import LOCAL_HTTP, Gateway, run_cli, wait_until
from tests.test_channels_whatsapp import FALLBACK, PNG, PNIDS, account, admin, new_wa_id, new_wamid, notification, post

DB = 8  # (this module's gateway's and its queues' own)


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def _setup(tmp_root, services, module_mock, graph, grace: str) -> tuple[tuple[str, str], dict, dict]:
    """(this module's database URLs, the gateway's config, its environment) for a fresh tenant."""
    own = (services[0], f"{services[1]}?db={DB}")
    redis.Redis.from_url(own[1]).flushdb()
    tenant = f"wa-drain-{uuid.uuid4().hex[:6]}"
    out = run_cli("keys", "create", "--name", "whatsapp-channel", "--tenant", tenant, urls=services, tmp=tmp_root)
    assert out.returncode == 0, out.stderr
    config = {
        "router": {"max_attempts": 1},
        "providers": [{"name": "llm", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k"]}],
        "models": [{"name": "agent-model", "deployments": [{"provider": "llm", "model": "m"}]}],
        "channels": {"whatsapp": {"acme": {**account("acme", graph_base_url=graph.url), "tenant": tenant}}},
    }
    env = {
        "GATEWAY_CHANNEL_WORKER": "1",
        "GATEWAY_WA_MAX_RETRIES": "0",  # (one failed attempt: the dead letters and the fallback message)
        "GATEWAY_WA_STOP_GRACE": grace,
        "WA_TEST_CHANNEL_KEY": out.stdout.splitlines()[0].strip(),
    }
    return own, config, env


def _image_in_flight(gw: Gateway, graph, tenant: str) -> str:
    """An image message posted, its turn held in flight (its download waits for a release): the wa_id."""
    body = {"name": "wabot", "tenant": tenant, "model": "agent-model", "template": "You help on whatsapp."}
    r = admin(gw, "POST", "/admin/agents", json=body)
    assert r.status_code == 201, r.text
    media = f"779{uuid.uuid4().int % 10**6:06d}"
    graph._post(
        "/_mock/media", {"id": media, "data_b64": base64.b64encode(PNG).decode(), "mime_type": "image/png", "hold": 1}
    )
    held_before = graph.stats().get("media_held", 0)
    wa_id = new_wa_id()
    image = {
        "from": wa_id,
        "id": new_wamid(),
        "type": "image",
        "image": {"id": media, "mime_type": "image/png", "caption": "Is this broken?"},
    }
    assert post(gw, "acme", notification([image], pnid=PNIDS["acme"])).status_code == 200
    wait_until(lambda: graph.stats().get("media_held", 0) > held_before, what="the turn in flight (its image)")
    return wa_id


def _dead_letters(url: str) -> int:
    return redis.Redis.from_url(url).xlen("gw:{gw}:q:wa-inbound:dead")


def test_a_turn_in_flight_at_sigterm_is_answered_once_against_a_gateway_still_serving(
    tmp_root, services, module_mock, graph
):
    own, config, env = _setup(tmp_root, services, module_mock, graph, grace="25")
    tenant = config["channels"]["whatsapp"]["acme"]["tenant"]
    gw = Gateway(tmp_root, config, own, env=env)
    try:
        wa_id = _image_in_flight(gw, graph, tenant)
        gw.terminate()
        # the gateway's shutdown has begun: it stopped listening (before), or it drains (now)
        wait_until(
            lambda: _refused(gw.port) or "draining before the server stops listening" in gw.log(),
            what="the gateway's shutdown under way",
        )
    finally:
        LOCAL_HTTP.post(f"{graph.url}/_mock/release")
        code = gw.stop()
    assert code in (0, 143), gw.log()
    texts = [s["text"] for s in graph.sent_to(wa_id)]
    assert texts == ["echo: Is this broken?"], texts
    assert FALLBACK not in texts
    assert _dead_letters(own[1]) == 0


def test_a_turn_that_cannot_finish_within_the_grace_goes_back_unchanged_and_the_next_start_answers_it_once(
    tmp_root, services, module_mock, graph
):
    """Its image never comes while the first gateway drains: past the grace the turn is put back
    as it was (its one attempt not used up: no retries are left), and the next start answers it."""
    own, config, env = _setup(tmp_root, services, module_mock, graph, grace="0.2")
    tenant = config["channels"]["whatsapp"]["acme"]["tenant"]
    first = Gateway(tmp_root, config, own, env=env)
    try:
        wa_id = _image_in_flight(first, graph, tenant)
    finally:
        code = first.stop()
    assert code in (0, 143), first.log()
    assert graph.sent_to(wa_id) == [] and _dead_letters(own[1]) == 0
    held_before = graph.stats().get("media_held", 0)
    second = Gateway(tmp_root, config, own, env=env)
    try:
        wait_until(lambda: graph.stats().get("media_held", 0) > held_before, what="the turn taken up again")
        LOCAL_HTTP.post(f"{graph.url}/_mock/release")
        wait_until(lambda: graph.sent_to(wa_id), what="the answer")
    finally:
        LOCAL_HTTP.post(f"{graph.url}/_mock/release")
        second.stop()
    texts = [s["text"] for s in graph.sent_to(wa_id)]
    assert texts == ["echo: Is this broken?"], texts
    assert _dead_letters(own[1]) == 0
