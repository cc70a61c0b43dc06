"""Attacks tried in the review of the Idempotency-Key and the WhatsApp throughput work: each test
is named for the hostile input or failure it tries, and fails on the code before its fix."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from channels.config import whatsapp_accounts
from tests import test_idempotency
from tests.test_policies import admin, new_key

ACCOUNT = {
    "agent": "bot",
    "app_secret": "secret-0123456789",
    "verify_token": "verify-0123456789",
    "access_token": "token-0123456789",
    "api_key": "sk-channel-0123456789",
}


async def _http_server(answer_request):
    """A raw HTTP/1.1 server: ``answer_request(n)`` (n counts requests over all connections) gives
    the answer's bytes, or None to close the connection without answering."""
    seen: list[bytes] = []

    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                seen.append(body)
                answer = answer_request(len(seen))
                if answer is None:  # read it (and, for all the client knows, acted on it), then gone
                    break
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(conn, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], seen


def _ok(doc: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(doc), doc)


def test_attack_a_graph_send_whose_connection_breaks_unanswered_is_not_sent_twice():
    """A send written on a kept-alive connection that then closes without an answer may have
    reached the customer (Graph read it): it is reported as maybe sent, never silently sent
    again on a new connection (core/h1.py's resend is for requests that can be repeated)."""
    from channels.whatsapp.graph import Graph, GraphUnreachable

    async def go():
        server, port, seen = await _http_server(
            lambda n: None if n == 2 else _ok(b'{"messages": [{"id": "wamid.%d"}]}' % n)
        )
        acct = whatsapp_accounts({"x": {**ACCOUNT, "graph_base_url": f"http://127.0.0.1:{port}"}})["x"]
        graph = Graph()
        try:
            assert await graph.send(acct, "111", "15550001", {"type": "text", "text": {"body": "one"}}) == "wamid.1"
            with pytest.raises(GraphUnreachable) as exc:  # on the kept-alive connection
                await graph.send(acct, "111", "15550001", {"type": "text", "text": {"body": "two"}})
            assert exc.value.sent_maybe
            await asyncio.sleep(0.1)
            return len(seen)
        finally:
            await graph.close()
            server.close()

    assert asyncio.run(go()) == 2  # "two" reached Graph once


# ---- Idempotency-Key (gateway/idempotency.py), through a real gateway process ------------------


# The gateway, agent and key fixtures of tests/test_idempotency.py.
gw, agent, key = test_idempotency.gw, test_idempotency.agent, test_idempotency.key


def test_attack_a_replay_is_not_served_to_a_request_whose_gateway_headers_differ(gw, agent, key, module_mock):
    """The x-gateway-* headers shape the answer as much as the body does (the conversation whose
    memory the agent reads, routing constraints, attribution): the same key and body with another
    x-gateway-conversation is another request (422), not the first conversation's answer."""
    body = {"model": f"agent:{agent}", "messages": [{"role": "user", "content": "what did I tell you?"}]}
    idem = uuid.uuid4().hex
    first = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}", "Idempotency-Key": idem, "x-gateway-conversation": "alice-1"},
        timeout=30,
    )
    assert first.status_code == 200, first.text
    calls = len(module_mock.requests())
    other = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}", "Idempotency-Key": idem, "x-gateway-conversation": "mallory-1"},
        timeout=30,
    )
    assert other.status_code == 422, other.text
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert "x-gateway-idempotent-replay" not in other.headers
    assert len(module_mock.requests()) == calls
    # the same headers (in another case and order) still replay
    again = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json=body,
        headers={"X-Gateway-Conversation": "alice-1", "idempotency-key": idem, "Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert again.status_code == 200 and again.headers["x-gateway-idempotent-replay"] == "true"
    assert again.content == first.content


def test_attack_a_whatsapp_turn_retried_with_other_content_is_answered_not_dead_lettered(gw, agent, key, module_mock):
    """A turn's try that died after the gateway answered is retried; its content is built again
    and may differ (an image that could be downloaded then cannot now: a line of text instead).
    That retry is answered (a turn of its own), not refused with 422 and dead-lettered — which
    would send the customer the fallback message. The same content still gets the stored answer."""
    from channels.gateway_client import GatewayClient
    from channels.whatsapp.worker import turn_idempotency_key

    head = {"account": "acme", "wamid": f"wamid.{uuid.uuid4().hex}"}
    conv = f"c-{uuid.uuid4().hex[:8]}"

    async def go():
        client = GatewayClient(gw.url)
        try:
            out = []
            for content in ("[photo]", "[photo]", "[image could not be downloaded]"):
                idem = turn_idempotency_key(head, 1, agent, content, {})
                turn = dict(api_key=key, agent=agent, conversation_id=conv, variables={}, idempotency_key=idem)
                out.append(await client.turn(content=content, **turn))
            return out
        finally:
            await client.close()

    calls = len(module_mock.requests())
    first, replayed, other = asyncio.run(go())
    assert replayed.text == first.text and replayed.request_id != first.request_id
    assert other.text and other.text != first.text
    assert len(module_mock.requests()) == calls + 2  # the replay made no model call


def test_attack_replays_are_not_an_unmetered_way_around_the_keys_rate_limit(gw, module_mock):
    """A replay makes no model call and costs nothing, but it is a request: it counts in the key's
    requests-per-minute window, so a key cannot fetch a stored answer (up to 4 MiB) without end
    past its rate limit. Refused replays are OpenAI's 429 with retry-after."""
    limited = new_key(gw, rpm=2)["key"]
    body = {"model": "m", "messages": [{"role": "user", "content": "a long answer, once"}]}
    headers = {"Authorization": f"Bearer {limited}", "Idempotency-Key": uuid.uuid4().hex}
    first = httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert first.status_code == 200, first.text
    replay = httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert replay.status_code == 200 and replay.headers["x-gateway-idempotent-replay"] == "true"
    refused = httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["type"] and int(refused.headers["retry-after"]) >= 1


def test_attack_a_revoked_key_gets_no_replay_and_another_key_never_reads_one(gw, module_mock):
    """The stored answer belongs to the API key that asked: once that key is revoked its replays
    are refused (401, as any request of it), and another key of the same tenant sending the same
    Idempotency-Key and body runs its own request instead of reading the first key's answer."""
    owner, other = new_key(gw), new_key(gw)
    body = {"model": "m", "messages": [{"role": "user", "content": "private answer"}]}
    idem = uuid.uuid4().hex
    first = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {owner['key']}", "Idempotency-Key": idem},
        timeout=30,
    )
    assert first.status_code == 200, first.text
    theirs = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {other['key']}", "Idempotency-Key": idem},
        timeout=30,
    )
    assert theirs.status_code == 200 and "x-gateway-idempotent-replay" not in theirs.headers
    assert admin(gw, "DELETE", f"/admin/keys/{owner['id']}").json()["revoked"] is True
    revoked = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {owner['key']}", "Idempotency-Key": idem},
        timeout=30,
    )
    assert revoked.status_code == 401, revoked.text
    assert "x-gateway-idempotent-replay" not in revoked.headers
