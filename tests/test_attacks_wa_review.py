"""Attacks tried in the review of the Idempotency-Key and the WhatsApp throughput work: each test
is named for the hostile input or failure it tries, and fails on the code before its fix."""

from __future__ import annotations

import asyncio

import pytest

from channels.config import whatsapp_accounts

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
