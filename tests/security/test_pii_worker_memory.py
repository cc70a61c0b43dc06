"""A PII analysis worker's memory is bounded: spaCy keeps every distinct word it has read in its
vocabulary and string store, so a stream of requests full of distinct tokens (IP addresses,
made-up words) grew every replica's worker until it was killed, failing every tenant's requests
that needed analysis. A worker grown past ``pii.worker_max_growth_mb`` is replaced by a fresh
one between calls; requests keep being served, and scrubbed, throughout.

Through real HTTP: a gateway process over the embedded PostgreSQL and Valkey, the mock provider
recording what left. No time is asserted: the recycling is seen in the counter and in the
worker's process id.
"""

from __future__ import annotations

import random
import threading

import httpx
import pytest

from tests.conftest import Gateway, gateway_config, wait_until
from tests.security.test_pii_attacks import _worker_pids

EMAIL = "jane.roe@example.org"
GROWTH_MB = 8  # the smallest bound the config takes: a few requests of distinct addresses pass it
PII = {
    "worker_max_growth_mb": GROWTH_MB,
    "policies": {"default": {"entities": {"email": "pseudonymize", "ip_address": "pseudonymize"}}},
}


@pytest.fixture(scope="module")
def gw(tmp_root, services, mock):
    g = Gateway(tmp_root, gateway_config(mock, pii=PII), services)
    yield g
    g.stop()


def _recycles(gw: Gateway) -> float:
    for line in httpx.get(f"{gw.url}/metrics").text.splitlines():
        if line.startswith("gateway_pii_worker_recycles_total "):
            return float(line.split()[1])
    return 0.0


def _addresses(rnd: random.Random, n: int) -> list[str]:
    """Distinct addresses with ports: each a new word for spaCy (a bare dotted quad is read by its
    shape since the s31 change, one word for all of them, and no longer grows the vocabulary)."""
    return [
        f"{rnd.randint(1, 223)}.{rnd.randint(0, 255)}.{rnd.randint(0, 255)}.{rnd.randint(1, 254)}:"
        f"{rnd.randint(1024, 65535)}"
        for _ in range(n)
    ]


def _chat(gw: Gateway, key: str, content: str) -> httpx.Response:
    body = {"model": "gpt-mock", "messages": [{"role": "user", "content": content}]}
    return httpx.post(
        f"{gw.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=body, timeout=120
    )


def test_worker_grown_by_distinct_words_is_recycled_and_requests_are_still_scrubbed(gw, api_key, mock):
    r = _chat(gw, api_key, f"mail {EMAIL} first")
    assert r.status_code == 200, r.text  # the worker is ready
    (first,) = _worker_pids(gw)
    assert _recycles(gw) == 0
    rnd = random.Random(26)
    sent: list[str] = []  # a sample of each request's addresses
    for _ in range(40):  # ≈ 2.5 MB of new words per request: the bound is passed after a few
        mock.clear()
        results: list[httpx.Response] = []
        batches = [_addresses(rnd, 6000) for _ in range(2)]

        def send(addresses: list[str], results: list[httpx.Response] = results) -> None:
            results.append(_chat(gw, api_key, f"from {EMAIL}: " + ", ".join(addresses)))

        threads = [threading.Thread(target=send, args=(b,)) for b in batches]  # one may be in flight as it goes
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert [x.status_code for x in results] == [200, 200], [x.text[:300] for x in results]
        left = "\n".join(str(m["body"]) for m in mock.requests())
        assert len(mock.requests()) == 2 and EMAIL not in left
        sample = [a for b in batches for a in b[::500]]
        assert not [a for a in sample if a in left]  # every address left scrubbed
        sent += sample
        if _recycles(gw) >= 1:
            break
    assert _recycles(gw) == 1, "the worker was never recycled"
    # the old worker is stopped once it has answered what it was sent; a fresh one serves
    wait_until(lambda: _worker_pids(gw) and first not in _worker_pids(gw), timeout=60, what="the old worker to stop")
    (second,) = _worker_pids(gw)
    mock.clear()
    r = _chat(gw, api_key, f"and now mail {EMAIL} from {sent[0]}")
    assert r.status_code == 200, r.text
    assert EMAIL not in str(mock.last()["body"]) and sent[0] not in str(mock.last()["body"])
    assert _worker_pids(gw) == [second]
    assert "grew by" in gw.log() and EMAIL not in gw.log() and sent[0] not in gw.log()
