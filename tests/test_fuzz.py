"""Fuzzing the public endpoints: whatever arrives, the answer is OpenAI-shaped, never a 500,
never a stack trace, and stored state does not change."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
CHAT_FIELDS = [
    "model",
    "messages",
    "stream",
    "stream_options",
    "n",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "tools",
    "tool_choice",
    "response_format",
    "seed",
    "logprobs",
    "top_logprobs",
    "user",
    "metadata",
]
ROLES = st.sampled_from(["system", "user", "assistant", "tool", "developer", "robot", "", None])
message = st.fixed_dictionaries(
    {"role": ROLES},
    optional={
        "content": json_values | st.text(max_size=40),
        "tool_call_id": json_values,
        "tool_calls": json_values,
        "name": json_values,
    },
)
chat_body = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["gpt-mock", "claude-mock", "embed-mock", "missing"]) | json_values,
        "messages": st.lists(message, max_size=3) | json_values,
        **{f: json_values for f in CHAT_FIELDS[2:]},
    },
)
embed_body = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["embed-mock", "gpt-mock", "claude-mock"]) | json_values,
        "input": json_values | st.lists(st.text(max_size=10), max_size=3) | st.lists(st.integers(), max_size=3),
        "encoding_format": st.sampled_from(["float", "base64", "hex"]) | json_values,
        "dimensions": json_values,
    },
)

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def _key_rows(database_url: str) -> list:
    async def go():
        conn = await asyncpg.connect(database_url)
        try:
            return [tuple(r) for r in await conn.fetch("SELECT * FROM api_keys ORDER BY id")]
        finally:
            await conn.close()

    return asyncio.run(go())


@pytest.fixture(scope="module")
def fuzz_http(gateway, api_key):
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as c:
        yield c


@pytest.fixture(scope="module", autouse=True)
def state_unchanged(services, gateway):
    before = _key_rows(services[0])
    yield
    assert _key_rows(services[0]) == before


def _check(resp: httpx.Response) -> None:
    assert resp.status_code != 500, resp.text
    assert "Traceback" not in resp.text
    if resp.status_code == 200:
        return
    body = resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert resp.status_code in (400, 401, 404, 405, 413, 429, 502, 503, 504), resp.status_code
    if resp.status_code >= 502:  # only what the provider did may surface as 5xx
        assert body["error"]["type"] == "upstream_error", body


@FUZZ
@given(body=chat_body)
def test_fuzz_chat_structured(fuzz_http, body):
    _check(fuzz_http.post("/v1/chat/completions", content=json.dumps(body)))


@FUZZ
@given(body=embed_body)
def test_fuzz_embeddings_structured(fuzz_http, body):
    _check(fuzz_http.post("/v1/embeddings", content=json.dumps(body)))


@FUZZ
@given(raw=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_fuzz_raw_bodies(fuzz_http, raw):
    for path in ("/v1/chat/completions", "/v1/embeddings"):
        _check(fuzz_http.post(path, content=raw))


@FUZZ
@given(
    model=st.text(max_size=40), auth=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60)
)
def test_fuzz_model_paths_and_auth_headers(fuzz_http, gateway, model, auth):
    from urllib.parse import quote

    _check(fuzz_http.get("/v1/models/" + quote(model, safe="")))
    resp = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        headers={"Authorization": auth.strip() or "-"},
        json={"model": "gpt-mock", "messages": [{"role": "user", "content": "x"}]},
    )
    assert resp.status_code in (200, 401)
    _check(resp)
