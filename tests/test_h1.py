"""core/h1.py, the upstream HTTP client, against real sockets on loopback: pooling and the
stale-connection retry, streaming as bytes arrive, bodies delimited by the connection's end,
broken answers and the idle timeout."""

from __future__ import annotations

import asyncio

import pytest

from core.h1 import H1Client, H1Error

HEADERS = b"Content-Type: application/json\r\n"


class Server:
    """A scripted HTTP/1.1 server: ``handler(reader, writer)`` answers each request."""

    def __init__(self, handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []

    async def __aenter__(self):
        async def serve(reader, writer):
            self.connections += 1
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    self.requests.append(head + await reader.readexactly(length))
                    if not await self.handler(reader, writer):
                        break
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1/chat"
        return self

    async def __aexit__(self, *exc):
        self.server.close()


def run(coro):
    return asyncio.run(coro)


def test_keep_alive_reuse_and_retry_of_a_connection_the_server_closed():
    async def main():
        async def answer(reader, writer):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            return len(server.requests) != 2  # after the 2nd answer the server closes, unannounced

        async with Server(answer) as server:
            client = H1Client()
            for _ in range(2):
                resp = await client.post(server.url, b"{}", HEADERS, 1, 1, 10)
                assert (resp.status, await resp.read()) == (200, b"ok")
            assert server.connections == 1  # the second request reused the first connection
            await asyncio.sleep(0.05)  # the server has closed it by now
            resp = await client.post(server.url, b'{"a": 1}', HEADERS, 1, 1, 10)
            assert await resp.read() == b"ok"
            assert server.connections == 2
            assert server.requests[-1].endswith(b'{"a": 1}')
            assert b"Host: 127.0.0.1:" in server.requests[0] and b"POST /v1/chat HTTP/1.1" in server.requests[0]
            await client.close()

    run(main())


def test_a_chunked_stream_arrives_as_it_is_sent():
    async def main():
        gate = asyncio.Event()

        async def stream(reader, writer):
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n")
            writer.write(b"7\r\ndata: 1\r\n")
            await writer.drain()
            await gate.wait()  # the second chunk only once the client has seen the first
            writer.write(b"7\r\ndata: 2\r\n0\r\n\r\n")
            await writer.drain()
            return True

        async with Server(stream) as server:
            client = H1Client()
            resp = await client.post(server.url, b"{}", HEADERS, 1, 5, 10)
            assert resp.headers.get("content-type") == "text/event-stream"
            got = []
            async for data in resp.content.iter_any():
                got.append(data)
                gate.set()
            resp.release()
            assert got == [b"data: 1", b"data: 2"]
            await client.close()

    run(main())


def test_a_body_delimited_by_the_end_of_the_connection():
    async def close_delimited(reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nwhole body")
        await writer.drain()
        return False

    async def main():
        async with Server(close_delimited) as server:
            client = H1Client()
            resp = await client.post(server.url, b"{}", HEADERS, 1, 1, 10)
            assert await resp.read() == b"whole body"
            await client.close()

    run(main())


def test_an_answer_cut_short_and_a_silent_server_fail():
    async def cut(reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        return False

    async def silent(reader, writer):
        await asyncio.sleep(5)
        return False

    async def main():
        async with Server(cut) as server:
            client = H1Client()
            resp = await client.post(server.url, b"{}", HEADERS, 1, 1, 10)
            with pytest.raises(H1Error):
                await resp.read()
        async with Server(silent) as server:
            with pytest.raises(TimeoutError):
                await client.post(server.url, b"{}", HEADERS, 1, 0.2, 10)
        with pytest.raises(H1Error) as info:
            await client.post("http://127.0.0.1:1/x", b"{}", HEADERS, 1, 1, 10)
        assert info.value.connect
        await client.close()

    run(main())


def test_a_request_the_server_drops_unanswered_on_a_reused_connection_is_sent_once_more():
    async def main():
        seen = []

        async def serve(reader, writer):
            served = 0
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    seen.append(await reader.readexactly(length))
                    if served == 1:  # the second request on a connection: closed, unanswered
                        break
                    served += 1
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    await writer.drain()
            except asyncio.IncompleteReadError:
                pass
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        client = H1Client()
        assert await (await client.post(url, b"1", HEADERS, 1, 1, 10)).read() == b"ok"
        assert await (await client.post(url, b"2", HEADERS, 1, 1, 10)).read() == b"ok"
        assert seen == [b"1", b"2", b"2"]  # the second went out twice: dropped, then sent anew
        await client.close()
        server.close()

    run(main())


def test_attack_an_endless_response_head_is_cut_off():
    """A provider (or whatever answers at its address) that sends headers without end — many
    small ones, or one that never finishes — fails the call at a bound instead of growing the
    gateway's memory; a sane answer on the same client still works."""

    async def many(reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(300)))
        writer.write(b"Content-Length: 2\r\n\r\n{}")
        await writer.drain()
        return True

    async def endless(reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nX-Long: ")
        for _ in range(40):  # 40 x 4 KiB of one header's value, never ended
            writer.write(b"a" * 4096)
            await writer.drain()
            await asyncio.sleep(0.005)
        await asyncio.sleep(5)
        return False

    async def sane(reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(100)))
        writer.write(b"Content-Length: 2\r\n\r\n{}")
        await writer.drain()
        return True

    async def main():
        client = H1Client()
        async with Server(many) as server:
            with pytest.raises(H1Error, match="more than 256"):
                await client.post(server.url, b"{}", HEADERS, 1, 2, 10)
        async with Server(endless) as server:
            with pytest.raises(H1Error, match="longer than"):
                await client.post(server.url, b"{}", HEADERS, 1, 2, 10)
        async with Server(sane) as server:
            resp = await client.post(server.url, b"{}", HEADERS, 1, 2, 10)
            assert resp.status == 200 and await resp.read() == b"{}" and len(resp.headers) == 101
        await client.close()

    run(main())


def test_attack_an_endless_trailer_is_cut_off():
    """After a chunked body's last chunk, trailer fields are a head again: one that never ends
    (the parser keeps its value whole, growing the gateway's memory) fails the call at the
    head's bound instead of lasting until the call's deadline."""

    async def endless(reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-Trailer: ")
        for _ in range(40):  # 40 x 4 KiB of one trailer's value, never ended
            writer.write(b"a" * 4096)
            await writer.drain()
            await asyncio.sleep(0.005)
        await asyncio.sleep(5)
        return False

    async def main():
        client = H1Client()
        async with Server(endless) as server:
            resp = await client.post(server.url, b"{}", HEADERS, 1, 2, 10)
            with pytest.raises(H1Error, match="longer than"):
                await resp.read()
        await client.close()

    run(main())
