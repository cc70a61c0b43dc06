"""A knowledge-base document on a provider embedding model, under a PII policy, is ingested
whatever the per-request PII analysis bounds: its chunks go to the embeddings path in batches
of up to 256, and one batch is one request to the PII stage. With ``pii.max_phone_checks``
(1000 libphonenumber checks a request, ≈ 175 distinct numbers written as in the US) a
directory, price list or catalogue of a few hundred numbers was refused as a whole (400
``pii_too_much_to_check``) and the document failed, every time. A refused batch is now split
as a client would split it, each part bounded again; the numbers still never reach the
provider."""

from __future__ import annotations

import random

import phonenumbers
import pytest

from tests.conftest import gateway_config
from tests.test_kb_api import create_kb, start_gateway, upload, wait_done


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    config = gateway_config(module_mock)
    config["pii"] = {"policies": {"default": {"entities": {"phone": "pseudonymize"}}}}
    g = start_gateway(tmp_root, module_mock, services, config=config)
    yield g
    g.stop()


def _directory(n: int) -> tuple[str, list[str]]:
    """A branch directory of ``n`` distinct US numbers, and those libphonenumber holds valid."""
    rnd = random.Random(7)
    numbers = [f"({rnd.randint(201, 989)}) {rnd.randint(200, 999)}-{rnd.randint(1000, 9999)}" for _ in range(n)]
    lines = [f"Branch {i} answers the phone on {number} on weekdays." for i, number in enumerate(numbers)]
    valid = [x for x in numbers if phonenumbers.is_valid_number(phonenumbers.parse(x, "US"))]
    return "\n".join(lines), valid


def test_a_document_of_more_numbers_than_one_request_may_check_is_ingested_scrubbed(gw, module_mock):
    text, valid = _directory(400)  # ≈ 2,300 checks in all, a few hundred per chunk
    assert len(valid) > 150
    module_mock.clear()
    kb = create_kb(gw, embedding_model="embed-mock")
    doc = upload(gw, kb["id"], "branches.txt", text.encode()).json()
    done = wait_done(gw, kb["id"], doc["id"])
    assert done["status"] == "ready", done
    inputs = [
        t
        for r in module_mock.requests()
        if r["path"] == "/v1/embeddings"
        for t in (r["body"]["input"] if isinstance(r["body"]["input"], list) else [r["body"]["input"]])
    ]
    sent = "\n".join(inputs)
    assert "Branch 399 answers the phone" in sent  # the whole document was embedded
    assert not [x for x in valid if x in sent]  # and no number left
