"""The session-35 core review reviewed again as an attacker (rev3): hard budgets' reservations
for images. Each test is one fault that was found, named for it.

Real gateway processes over HTTP, the embedded PostgreSQL and Valkey, the mock providers of
loadtest/ (real HTTP servers speaking OpenAI's and Anthropic's wire formats).
"""

from __future__ import annotations

import httpx
import orjson
import pytest

from tests.conftest import Gateway, started
from tests.test_core_review_s35 import PRICES, _budget, _provider
from tests.test_policies import new_key


@pytest.fixture(scope="module")
def claude_gw(tmp_root, services, module_mock):
    cfg = {
        "router": {"max_attempts": 1, "circuit": {"failures": 100000}},
        "providers": [_provider("antr3", module_mock, "anthropic")],
        "models": [{"name": "claude-priced", "deployments": [{"provider": "antr3", "model": "c", **PRICES}]}],
    }
    with started(Gateway(tmp_root, cfg, services)) as (gw,):
        yield gw


def test_low_detail_images_cannot_carry_a_request_past_a_hard_budget_on_a_provider_that_ignores_detail(claude_gw):
    """A hard budget reserved an image part marked ``detail: low`` as 85 prompt tokens (what
    OpenAI's gpt-4o bills for one). Anthropic has no such setting: the translation drops it, and
    Claude bills an image by its size, up to ~1,600 tokens (OpenAI's gpt-4o-mini bills a
    low-detail image as 2,833). Fifty image URLs marked low were admitted on a reservation of a
    twentieth of their cost, and spend passed the hard limit. Every image part now reserves
    ``policies.media_part_tokens``."""
    key = new_key(claude_gw, budget_usd=0.02, budget_period="none")
    usage = {"input_tokens": 50 * 1600}  # what Claude bills for fifty images of ~1.2 megapixels
    image = {"url": "https://img.example/x.png", "detail": "low"}
    low = [{"type": "image_url", "image_url": image}] * 50
    text = {"type": "text", "text": "describe [[mock:" + orjson.dumps({"usage": usage}).decode() + "]]"}
    r = httpx.post(
        f"{claude_gw.url}/v1/chat/completions",
        json={"model": "claude-priced", "max_tokens": 5, "messages": [{"role": "user", "content": [*low, text]}]},
        headers={"Authorization": f"Bearer {key['key']}"},
        timeout=30,
    )
    assert r.status_code in (200, 429), r.text
    state = _budget(claude_gw, key["budget_id"])
    assert state["spent_usd"] <= 0.02, (state, r.text)
    assert r.status_code == 429 and r.json()["error"]["code"] == "budget_too_small", r.text
