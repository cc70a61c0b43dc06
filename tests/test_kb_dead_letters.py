"""Dead letters of the ingestion queue, deterministically: one gateway queues uploads but
consumes none (``GATEWAY_KB_WORKER=0``), their stored files are removed, and only then does a
consuming gateway start — every job fails for good, lands in the dead-letter stream, and the
admin routes retry and drop it. (Its own module: no other gateway may consume meanwhile.)"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.test_kb_api import call, create_kb, start_gateway, upload, wait_done


@pytest.fixture(scope="module")
def uploader(tmp_root, services, module_mock):
    g = start_gateway(tmp_root, module_mock, services, worker=False)
    yield g
    g.stop()


def test_dead_letters_after_max_retries_then_retry_and_drop(uploader, tmp_root, services, module_mock):
    kb = create_kb(uploader)
    docs = []
    for i in range(2):
        content = f"Document {i} {uuid.uuid4().hex}: its file disappears.\n".encode()
        r = upload(uploader, kb["id"], f"gone-{i}.txt", content)
        assert r.status_code == 202 and r.json()["status"] == "queued"
        docs.append(r.json())
    for d in docs:
        stored = list((tmp_root / "data").glob(f"kb/*/{d['id']}"))
        assert len(stored) == 1
        stored[0].unlink()
    assert call(uploader, "GET", f"/admin/knowledge-bases/{kb['id']}/documents/{docs[0]['id']}").json()["status"] == (
        "queued"
    )
    worker = start_gateway(tmp_root, module_mock, services)
    try:
        failed = [wait_done(uploader, kb["id"], d["id"], timeout=120) for d in docs]
        for r in failed:
            assert r["status"] == "failed", r
            assert "no longer on the server" in r["reason"] and r["reason_code"] == "file_missing"
        dead = {}

        def dead_listed() -> bool:
            letters = call(uploader, "GET", "/admin/queues/kb-ingest/dead-letters").json()["data"]
            dead.update({d["payload"]["document_id"]: d for d in letters})
            return all(r["id"] in dead for r in failed)

        wait_until(dead_listed, timeout=30, what="dead letters")
        letter = dead[failed[0]["id"]]
        assert letter["attempt"] == 3 and "FileNotFoundError" in letter["error"]
        stats = call(uploader, "GET", "/admin/queues/kb-ingest").json()
        assert stats["dead_letters"] >= 2 and stats["retries"] >= 4
        # the file is back: a retried dead letter now succeeds
        Path(letter["payload"]["path"]).write_bytes(b"The file is back: restored from a backup.\n")
        r = call(uploader, "POST", f"/admin/queues/kb-ingest/dead-letters/{letter['id']}/retry")
        assert r.status_code == 200 and r.json()["retried"]
        # the retried document no longer reads as failed: a client polling it took the stale
        # failure for the retry's outcome (so did this test, when the worker was slower than it)
        now = call(uploader, "GET", f"/admin/knowledge-bases/{kb['id']}/documents/{failed[0]['id']}").json()
        assert now["status"] in ("queued", "processing", "ready") and now["reason_code"] is None, now
        done = wait_done(uploader, kb["id"], failed[0]["id"])
        assert done["status"] == "ready" and done["reason_code"] is None
        assert call(uploader, "POST", f"/admin/queues/kb-ingest/dead-letters/{letter['id']}/retry").status_code == 404
        other = dead[failed[1]["id"]]
        assert call(uploader, "DELETE", f"/admin/queues/kb-ingest/dead-letters/{other['id']}").status_code == 200
        letters = call(uploader, "GET", "/admin/queues/kb-ingest/dead-letters").json()["data"]
        assert other["id"] not in {d["id"] for d in letters}
        assert call(uploader, "GET", "/admin/queues/nope").status_code == 404
    finally:
        worker.stop()
