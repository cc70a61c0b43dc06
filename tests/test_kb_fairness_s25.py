"""Within a tenant, knowledge bases take turns on the ingestion queue, through real gateway
processes: a knowledge base's one document is ready while another knowledge base of the same
tenant that queued many before it still has most of them waiting. Documents are queued by a
gateway that consumes none, then one gateway consumes; ingestion is slowed by the mock
provider's latency, so what is compared is counts, never times. (Its own module: no other
gateway may consume meanwhile.)"""

from __future__ import annotations

import uuid

import pytest

from tests.conftest import wait_until
from tests.test_kb_api import create_kb, start_gateway, upload, wait_done
from tests.test_kb_fairness import SLOW_MS, _doc, _queue_idle, _statuses, _tenant_kb, own_queue


@pytest.fixture(scope="module")
def uploader(tmp_root, services, module_mock):
    own_queue(services)
    g = start_gateway(tmp_root, module_mock, services, worker=False)
    yield g
    g.stop()


def test_a_knowledge_bases_one_document_is_not_stuck_behind_another_kbs_many(uploader, tmp_root, services, module_mock):
    many = 12
    tenant = f"fair-kb-{uuid.uuid4().hex[:6]}"
    big = _tenant_kb(uploader, tenant)
    small = create_kb(uploader, tenant=tenant, embedding_model="embed-mock")
    module_mock.configure(ttft_ms=SLOW_MS)
    try:
        for n in range(many):
            assert upload(uploader, big["id"], f"big{n}.txt", _doc(n)).status_code == 202
        late = upload(uploader, small["id"], "small.txt", _doc(99)).json()  # after all of big's
        worker = start_gateway(tmp_root, module_mock, services)
        try:
            assert wait_done(uploader, small["id"], late["id"], timeout=60)["status"] == "ready"
            waiting = sum(s in ("queued", "processing") for s in _statuses(uploader, big["id"]))
            print(
                f"fairness: {waiting} of the big knowledge base's {many} documents waiting when the small one's was"
                " ready"
            )
            # In turn, the small one's went with the big one's first (two workers): the rest wait.
            # (In arrival order within the tenant it went after all 12.)
            assert waiting >= many - 3, waiting
            wait_until(lambda: _statuses(uploader, big["id"]) == ["ready"] * many, timeout=60, what="all of big's")
            wait_until(lambda: _queue_idle(uploader), timeout=30, what="the queue idle")
        finally:
            worker.stop()
    finally:
        module_mock.configure(ttft_ms=0)
