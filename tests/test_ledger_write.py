"""The ledger's PostgreSQL side: records as the stream holds them, COPYed and taken apart in SQL."""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import asyncpg
import orjson

from gateway.db import migrate
from policies.ledger import Spool, write_records


def _record(**over) -> dict:
    rec = {
        "request_id": f"req_{uuid.uuid4().hex}",
        "client_request_id": "client-id-1",
        "ts": time.time(),
        "tenant": "acme",
        "user": "u-1",
        "agent": "support",
        "workflow": None,
        "customer": "c-9",
        "key_id": "key_1",
        "tags": ["a", "b"],
        "endpoint": "chat",
        "model": "gpt",
        "served_model": "gpt",
        "provider": "p",
        "deployment": "p/m",
        "attempts": 2,
        "fallbacks": 1,
        "stream": True,
        "status": 200,
        "error_code": None,
        "prompt_tokens": 11,
        "completion_tokens": 7,
        "cached_tokens": 3,
        "usage_estimated": False,
        "cost_usd": 1.25e-5,
        "latency_ms": 12.5,
        "ttft_ms": 3.25,
        "pii_entities": {"EMAIL": 2},
    }
    rec.update(over)
    return rec


def test_records_land_with_every_field_once_and_spool_replays(services, tmp_path):
    async def main():
        conn = await asyncpg.connect(services[0])
        try:
            await migrate(conn)
            a, b = _record(), _record(tags=[], pii_entities=None, ttft_ms=None, stream=False, status=429)
            raw = [orjson.dumps(a), orjson.dumps(b)]
            await write_records(conn, raw)
            await write_records(conn, raw)  # a batch written twice counts once
            rows = {
                r["request_id"]: r
                for r in await conn.fetch(
                    "SELECT * FROM ledger WHERE request_id = ANY($1)", [a["request_id"], b["request_id"]]
                )
            }
            assert len(rows) == 2
            ra, rb = rows[a["request_id"]], rows[b["request_id"]]
            assert ra["end_user"] == "u-1" and ra["tags"] == ["a", "b"] and ra["attempts"] == 2 and ra["stream"] is True
            assert (
                ra["cost_usd"] == 1.25e-5 and ra["ttft_ms"] == 3.25 and orjson.loads(ra["pii_entities"]) == {"EMAIL": 2}
            )
            assert abs(ra["ts"].timestamp() - a["ts"]) < 1e-3 and ra["workflow"] is None
            # The caller's id is kept beside the gateway's, and is no key: both records landed.
            assert ra["client_request_id"] == rb["client_request_id"] == "client-id-1"
            assert rb["tags"] == [] and rb["pii_entities"] is None and rb["ttft_ms"] is None and rb["status"] == 429
            # Records Redis could not take wait in the spool file and reach PostgreSQL on replay.
            spool = Spool(tmp_path / "ledger-spool-1.jsonl")
            c = _record()
            spool.append(orjson.dumps(c))
            pool = await asyncpg.create_pool(services[0], min_size=1, max_size=2)
            try:
                assert await spool.replay(pool) == 1
            finally:
                await pool.close()
            assert await conn.fetchval("SELECT count(*) FROM ledger WHERE request_id = $1", c["request_id"]) == 1
            assert not [p for p in tmp_path.glob("ledger-spool-*") if p.suffix != ".lock"]
        finally:
            await conn.close()

    asyncio.run(main())


def test_a_spooled_record_postgres_refuses_goes_to_the_dead_letters_and_the_rest_is_written(services, tmp_path):
    """One record of a spool that PostgreSQL refuses (a count beyond the column's int4) used to
    fail the whole spool at every replay: none of the records written while Redis was away ever
    reached the ledger."""
    from policies.ledger import Spool

    async def main():
        pool = await asyncpg.create_pool(services[0], min_size=1, max_size=2)
        async with pool.acquire() as conn:
            await migrate(conn)
        good = [_record(), _record()]
        bad = _record(prompt_tokens=2**40, content=[{"role": "user", "content": "my secret"}])
        spool = Spool(tmp_path / "ledger-spool-1.jsonl")
        for rec in (good[0], bad, good[1]):
            spool.append(orjson.dumps(rec))
        assert await spool.replay(pool) == 3
        ids = [r["request_id"] for r in (*good, bad)]
        written = await pool.fetchval("SELECT count(*) FROM ledger WHERE request_id = ANY($1)", ids)
        await pool.close()
        return written

    assert asyncio.run(main()) == 2
    dead = (tmp_path / "ledger-dead.jsonl").read_bytes().splitlines()
    assert len(dead) == 1 and orjson.loads(dead[0])["error"] == "22003" and b"my secret" not in dead[0]
    assert not [p for p in tmp_path.glob("ledger-spool-*") if p.suffix != ".lock"]  # the spool is done


def test_a_refused_record_appended_while_an_erasure_rewrites_the_dead_letters_is_not_lost(
    services, tmp_path, monkeypatch
):
    """An erasure rewrites ``ledger-dead.jsonl`` (a new file renamed over it). A spooled record
    PostgreSQL refuses while the rewrite reads the old file was appended to the old file and lost
    with it at the rename. The append takes the lock the rewrite holds: it waits, then lands in the
    new file. (Here the spool's replay runs in a thread of its own when the rewrite has read the old
    file and is about to rename the new one over it; the wait for it is bounded.)"""
    import threading

    from core import locked_lines
    from runtime import erased_records

    spool = Spool(tmp_path / "ledger-spool-1.jsonl")
    erased = _record(tenant="t-erase", conversation_id="wa:pn:15550001111", user="15550001111")
    spool.dead_path.write_bytes(orjson.dumps(erased) + b"\n")
    refused = _record(prompt_tokens=2**40)
    spool.append(orjson.dumps(refused))

    def replay() -> None:
        async def go() -> None:
            pool = await asyncpg.create_pool(services[0], min_size=1, max_size=2)
            try:
                await spool.replay(pool)
            finally:
                await pool.close()

        asyncio.run(go())

    appender = threading.Thread(target=replay)

    class Os:  # locked_lines' os, whose rename over the old file first lets the replay run
        def __getattr__(self, name: str):
            return getattr(os, name)

        def replace(self, src, dst) -> None:
            appender.start()
            appender.join(timeout=3)  # the append, unlocked, would be done by now
            os.replace(src, dst)

    asyncio.run(_migrated(services[0]))
    monkeypatch.setattr(locked_lines, "os", Os())
    assert erased_records.retag_dead_file(spool.dead_path, "t-erase", ["wa:pn:15550001111"]) == 1
    appender.join(timeout=60)
    lines = [orjson.loads(x) for x in spool.dead_path.read_bytes().splitlines()]
    assert [x["request_id"] for x in lines] == [erased["request_id"], refused["request_id"]]
    assert lines[0]["conversation_id"].startswith("erased:") and lines[0]["user"] == lines[0]["conversation_id"]
    assert b"15550001111" not in spool.dead_path.read_bytes()


async def _migrated(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn)
    finally:
        await conn.close()


def test_a_refused_record_waiting_for_the_dead_letters_lock_does_not_stall_the_event_loop(
    services, tmp_path, monkeypatch
):
    """An erasure's rewrite of ``ledger-dead.jsonl`` holds its lock while it copies the whole file
    (seconds for a large one). The spool's replay runs on the replica's event loop: a refused
    record's append waiting for that lock there stalled every request of the replica until the
    rewrite was done. The append waits in a thread: the loop runs on meanwhile. (The lock is held
    here by a thread that lets go as soon as the loop runs while the append waits, or after a
    bound.)"""
    import threading

    from core import locked_lines

    spool = Spool(tmp_path / "ledger-spool-1.jsonl")
    refused = _record(prompt_tokens=2**40)
    spool.append(orjson.dumps(refused))
    held, release, waiting = threading.Event(), threading.Event(), threading.Event()
    released_by_loop: list[bool] = []

    def holder() -> None:
        with locked_lines.locked(spool.dead_path):
            held.set()
            released_by_loop.append(release.wait(timeout=10))

    real_append = locked_lines.append_new

    def append(path, lines, key_of) -> int:
        waiting.set()
        return real_append(path, lines, key_of)

    monkeypatch.setattr(locked_lines, "append_new", append)

    async def main() -> int:
        pool = await asyncpg.create_pool(services[0], min_size=1, max_size=2)
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
            thread = threading.Thread(target=holder)
            thread.start()
            assert held.wait(timeout=10)
            replay = asyncio.create_task(spool.replay(pool))
            for _ in range(3000):  # the loop runs while the append waits for the lock
                if waiting.is_set():
                    break
                await asyncio.sleep(0.01)
            release.set()
            written = await replay
            await asyncio.to_thread(thread.join, 30)
            return written
        finally:
            await pool.close()

    assert asyncio.run(main()) == 1
    assert released_by_loop == [True]
    dead = spool.dead_path.read_bytes().splitlines()
    assert [orjson.loads(x)["request_id"] for x in dead] == [refused["request_id"]]


def test_a_rewrite_killed_before_its_rename_leaves_no_copy_of_the_dead_letters_behind(tmp_path):
    """A process SIGKILLed in an erasure's rewrite of ``ledger-dead.jsonl`` after writing the new
    file and before renaming it loses nothing (the old file is whole) but left the new one, a
    full copy of the dead letters, in the data directory for good: a later erasure rewrote only
    ``ledger-dead.jsonl``, so the copy kept that conversation's customer number. The next rewrite
    (under the lock no rewrite in progress can hold then) removes what a killed one left."""
    import signal
    import subprocess
    import sys

    from runtime import erased_records

    dead = tmp_path / "ledger-dead.jsonl"
    first = _record(tenant="t-kill", conversation_id="wa:pn:15550002222", user="15550002222")
    second = _record(tenant="t-kill", conversation_id="wa:pn:15550003333", user="15550003333")
    dead.write_bytes(orjson.dumps(first) + b"\n" + orjson.dumps(second) + b"\n")
    before = dead.read_bytes()
    child = """
import os, signal, sys
from pathlib import Path
from core import locked_lines
from runtime import erased_records

class Os:  # dies where a SIGKILL between the new file's fsync and its rename would stop it
    def __getattr__(self, name):
        return getattr(os, name)

    def replace(self, src, dst):
        os.kill(os.getpid(), signal.SIGKILL)

locked_lines.os = Os()
erased_records.retag_dead_file(Path(sys.argv[1]), "t-kill", ["wa:pn:15550002222"], b"k" * 32)
"""
    done = subprocess.run([sys.executable, "-c", child, str(dead)], cwd=os.getcwd(), timeout=60)
    assert done.returncode == -signal.SIGKILL
    assert dead.read_bytes() == before  # nothing lost, nothing doubled
    assert [p.name for p in tmp_path.glob("ledger-dead.jsonl.*.tmp")]  # what it left

    assert erased_records.retag_dead_file(dead, "t-kill", ["wa:pn:15550003333"], b"k" * 32) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger-dead.jsonl", "ledger-dead.jsonl.lock"]
    assert b"15550003333" not in dead.read_bytes()
    lines = [orjson.loads(x) for x in dead.read_bytes().splitlines()]
    assert [x["request_id"] for x in lines] == [first["request_id"], second["request_id"]]


def test_a_rewrite_that_changes_no_line_writes_no_copy_of_the_dead_letters(tmp_path, monkeypatch):
    """Every erasure and every retention batch served by a replica rewrites its
    ``ledger-dead.jsonl`` for the conversations it names; most name none of its lines. Such a
    rewrite wrote a whole copy of the file (and threw it away) while holding the lock the spool's
    appends wait for: 100 MB written per batch for a 100 MB file. It writes from the first line
    it changes: nothing when it changes none, and the file is left as it was."""
    from core import locked_lines
    from runtime import erased_records

    dead = tmp_path / "ledger-dead.jsonl"
    lines = [
        _record(tenant="t-copy", conversation_id=f"wa:pn:1555000{i:04d}", user=f"1555000{i:04d}") for i in range(50)
    ]
    dead.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines) + b"not json\n")
    before, inode = dead.read_bytes(), dead.stat().st_ino
    opened: list[str] = []

    class Os:  # locked_lines' os, noting the files it creates
        def __getattr__(self, name: str):
            return getattr(os, name)

        def open(self, file, flags, *args):
            if flags & os.O_CREAT and not str(file).endswith(".lock"):
                opened.append(os.path.basename(file))
            return os.open(file, flags, *args)

    monkeypatch.setattr(locked_lines, "os", Os())
    assert erased_records.retag_dead_file(dead, "t-copy", ["wa:pn:none"], b"k" * 32) == 0
    assert erased_records.retag_dead_file(dead, "other", ["wa:pn:15550000007"], b"k" * 32) == 0
    assert opened == []
    assert (dead.read_bytes(), dead.stat().st_ino) == (before, inode)

    assert erased_records.retag_dead_file(dead, "t-copy", ["wa:pn:15550000030"], b"k" * 32) == 1
    assert len(opened) == 1
    after = dead.read_bytes().splitlines()
    assert len(after) == 51 and after[:30] == before.splitlines()[:30] and after[31:] == before.splitlines()[31:]
    assert orjson.loads(after[30])["conversation_id"].startswith("erased:") and b"15550000030" not in dead.read_bytes()


def test_two_processes_rewriting_and_one_appending_to_the_dead_letters_at_once_lose_nothing(tmp_path):
    """Two workers sharing a data directory (``--workers 2``) serve an erasure each while a third
    appends refused records: every line is there once, each erased conversation holds its tag."""
    import subprocess
    import sys

    dead = tmp_path / "ledger-dead.jsonl"
    recs = [
        _record(tenant="t-two", conversation_id=f"wa:pn:1555111{i:04d}", user=f"1555111{i:04d}") for i in range(3000)
    ]
    dead.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in recs))
    rewrite = """
import sys
from pathlib import Path
from runtime import erased_records
for i in range(int(sys.argv[2]), 3000, 2):
    if i % 300 == int(sys.argv[2]):
        erased_records.retag_dead_file(Path(sys.argv[1]), "t-two", [f"wa:pn:1555111{i:04d}"], b"k" * 32)
"""
    append = """
import sys
from pathlib import Path
from core import locked_lines
for i in range(200):
    locked_lines.append(Path(sys.argv[1]), [b'{"appended": %d}' % i])
"""
    procs = [subprocess.Popen([sys.executable, "-c", rewrite, str(dead), str(k)], cwd=os.getcwd()) for k in (0, 1)]
    procs.append(subprocess.Popen([sys.executable, "-c", append, str(dead)], cwd=os.getcwd()))
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    lines = [orjson.loads(x) for x in dead.read_bytes().splitlines()]
    assert sorted(x["appended"] for x in lines if "appended" in x) == list(range(200))
    kept = [x for x in lines if "appended" not in x]
    assert [x["request_id"] for x in kept] == [r["request_id"] for r in recs]
    erased = {i for i in range(3000) if i % 300 in (0, 1)}
    assert {i for i, x in enumerate(kept) if x["conversation_id"].startswith("erased:")} == erased
    assert not list(tmp_path.glob("*.tmp"))


def test_an_erasure_takes_the_number_out_of_a_dead_letter_of_a_record_a_crash_cut_short(services, tmp_path):
    """A process killed while appending to its spool leaves a line cut short; the replay sends it
    to PostgreSQL, which refuses it, and its dead letter keeps its text (``unparsable``): the
    tenant, the end user, the conversation id — a WhatsApp customer's number. An erasure of that
    conversation rewrote the parsed dead letters only: the number stayed in the file. A cut
    record's text that names the tenant and the conversation (its id, or the number it ends with)
    is replaced by the conversation's tag."""
    from runtime import erased_records

    spool = Spool(tmp_path / "ledger-spool-1.jsonl")
    mine = orjson.dumps(_record(tenant="t-cut", conversation_id="wa:pn:15550004444", user="15550004444"))
    cut_early = orjson.dumps(_record(tenant="t-cut", user="15550004444", conversation_id="wa:pn:15550004444"))
    other = orjson.dumps(_record(tenant="t-cut", conversation_id="wa:pn:15550005555", user="15550005555"))
    for raw, at in ((mine, -30), (cut_early, cut_early.index(b'"agent"')), (other, -30)):
        spool.append(raw[:at])  # (what a SIGKILL in the middle of the write leaves, then its newline)

    async def main() -> int:
        pool = await asyncpg.create_pool(services[0], min_size=1, max_size=2)
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
            return await spool.replay(pool)
        finally:
            await pool.close()

    assert asyncio.run(main()) == 3
    dead = spool.dead_path.read_bytes().splitlines()
    assert [orjson.loads(x).get("error") for x in dead] == ["22P02"] * 3 and b"15550004444" in dead[0]
    assert erased_records.retag_dead_file(spool.dead_path, "t-cut", ["wa:pn:15550004444"], b"k" * 32) == 2
    assert erased_records.retag_dead_file(spool.dead_path, "t-other", ["wa:pn:15550005555"], b"k" * 32) == 0
    text = spool.dead_path.read_bytes()
    assert b"15550004444" not in text and b"15550005555" in text
    lines = [orjson.loads(x) for x in text.splitlines()]
    assert lines[0]["unparsable"] == lines[1]["unparsable"] and lines[0]["unparsable"].startswith("erased:")
