"""An idempotent request that outlived its claim with no repeat in between (an independent review found it)."""

from __future__ import annotations

import uuid

import httpx

from tests.conftest import Gateway
from tests.test_idempotency import _calls, _config
from tests.test_policies import new_key


def test_a_request_that_outlived_its_claim_with_no_repeat_still_stores_its_answer(tmp_root, services, module_mock):
    """Nobody claimed the key after A's claim expired: A's answer is the only one, yet the
    compare-and-set refuses it (GET is nil, not A's marker) and a client retry runs the model
    a second time (second model call, second charge)."""
    g = Gateway(tmp_root, {**_config(module_mock), "server": {"idempotency_lock_s": 1}}, services)
    try:
        k = new_key(g)["key"]
        idem = uuid.uuid4().hex
        body = {"model": "m", "messages": [{"role": "user", "content": f"outlived {idem}"}]}
        headers = {"Authorization": f"Bearer {k}", "Idempotency-Key": idem}
        module_mock.configure(ttft_ms=3000)
        try:
            a = httpx.post(f"{g.url}/v1/chat/completions", json=body, headers=headers, timeout=60)
        finally:
            module_mock.configure(ttft_ms=0)
        assert a.status_code == 200
        calls = _calls(module_mock)
        retry = httpx.post(f"{g.url}/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert retry.status_code == 200
        assert _calls(module_mock) == calls, "the retry ran the model again"
        assert retry.headers.get("x-gateway-idempotent-replay") == "true"
        assert retry.json()["id"] == a.json()["id"]
    finally:
        g.stop()
