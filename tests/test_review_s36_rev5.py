"""Review of the s36 merges (stream, corestore, rev4): attacks on the output cap of a hard budget's
streams and on a client's hang-up, each found wrong before its fix.

Providers are the mock's verbatim ``raw`` streams (exactly these events, no usage unless given),
so each case is one fixed sequence of events, never a timing."""

from __future__ import annotations

import httpx
import openai
import orjson
import pytest

from tests.conftest import Gateway, MockProvider, wait_until
from tests.test_policies import ledger_rows, new_key

LONG_EMAIL = "konstantinos.papadopoulos-anagnostopoulos@department-of-ophthalmology.university-hospital.example.org"


def config(mock: MockProvider) -> dict:
    return {
        "router": {"max_attempts": 1},
        "policies": {"local_admission": False},
        "pii": {"policies": {"default": {"entities": {}}, "pseudo": {"entities": {"email": "pseudonymize"}}}},
        "providers": [{"name": "pp", "kind": "openai", "base_url": f"{mock.url}/v1", "api_keys": ["k"]}],
        "models": [
            {
                "name": name,
                "deployments": [
                    {"provider": "pp", "model": "m", "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}
                ],
            }
            for name in ("priced", "priced-pii")
        ],
    }


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    cfg = config(module_mock)
    cfg["pii"]["models"] = {"priced-pii": "pseudo"}
    g = Gateway(tmp_root, cfg, services)
    yield g
    g.stop()


def _chunk(choices: list[dict], **extra) -> str:
    body = {"id": "chatcmpl-raw", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": choices}
    return "data: " + orjson.dumps({**body, **extra}).decode() + "\n\n"


def _delta(index: int, finish: str | None = None, **delta) -> dict:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}


def _raw(pieces: list[str], prefix: str = "hi") -> list[dict]:
    plan = {"raw": {"status": 200, "content_type": "text/event-stream", "pieces": pieces}}
    return [{"role": "user", "content": f"{prefix} [[mock:{orjson.dumps(plan).decode()}]]"}]


def _ledger(services, rid: str) -> dict:
    wait_until(lambda: ledger_rows(services[0], "request_id = $1", rid), timeout=15, what="ledger row")
    return ledger_rows(services[0], "request_id = $1", rid)[0]


def test_attack_stream_of_refusal_deltas_is_counted_and_cut(gw, services):
    """A provider ignoring max_tokens that streams a refusal (``delta.refusal``, as OpenAI sends one
    under structured outputs) was neither counted by the cap nor by the usage estimate: the stream
    ran on past the reservation, and was charged no output at all."""
    key = new_key(gw, budget_usd=0.05, budget_period="daily")
    pieces = [_chunk([_delta(0, role="assistant", refusal="")])]
    pieces += [_chunk([_delta(0, refusal="I am sorry, but I cannot help with that request. ")]) for _ in range(60)]
    pieces += [_chunk([_delta(0, "stop")]), "data: [DONE]\n\n"]
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key["key"], max_retries=0, timeout=60)
    resp = client.chat.completions.with_raw_response.create(
        model="priced", stream=True, max_tokens=30, messages=_raw(pieces)
    )
    chunks = list(resp.parse())
    refusal = "".join(c.choices[0].delta.refusal or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"], finishes  # cut at the reservation, as OpenAI ends one at max_tokens
    assert refusal.startswith("I am sorry") and len(refusal) < 60 * 50 // 4
    row = _ledger(services, resp.headers["x-request-id"])
    assert 0 < row["completion_tokens"] <= 30, row["completion_tokens"]  # the refusal sent is charged


def test_attack_unstreamed_refusal_is_charged(gw, services):
    """A whole answer holding only a refusal, from a provider that reports no usage: its text is
    the output the client got, and is counted."""
    key = new_key(gw, budget_usd=1.0, budget_period="daily")
    answer = {
        "id": "chatcmpl-raw",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "refusal": "I cannot help with that. " * 20},
                "finish_reason": "stop",
            }
        ],
    }
    plan = {"raw": {"status": 200, "content_type": "application/json", "pieces": [orjson.dumps(answer).decode()]}}
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key["key"], max_retries=0, timeout=60)
    resp = client.chat.completions.with_raw_response.create(
        model="priced", messages=[{"role": "user", "content": f"hi [[mock:{orjson.dumps(plan).decode()}]]"}]
    )
    assert resp.parse().choices[0].message.refusal.startswith("I cannot help")
    row = _ledger(services, resp.headers["x-request-id"])
    assert row["completion_tokens"] >= 100, row["completion_tokens"]


def test_attack_stream_cut_of_two_choices_ends_only_the_unfinished_one(gw):
    """n=2: choice 0 finished (``stop``) early, choice 1 ran past the reservation. The cut sent a
    ``length`` chunk for every choice seen, choice 0 a second time: its client's finish_reason
    turned from ``stop`` to ``length``."""
    key = new_key(gw, budget_usd=0.05, budget_period="daily")
    pieces = [_chunk([_delta(0, role="assistant", content=""), _delta(1, role="assistant", content="")])]
    pieces += [_chunk([_delta(0, content="Short answer.")]), _chunk([_delta(0, "stop")])]
    pieces += [_chunk([_delta(1, content="and on and on and on ")]) for _ in range(60)]
    pieces += [_chunk([_delta(1, "stop")]), "data: [DONE]\n\n"]
    body = {"model": "priced", "stream": True, "n": 2, "max_tokens": 10, "messages": _raw(pieces)}
    with httpx.stream(
        "POST", f"{gw.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key['key']}"}
    ) as resp:
        raw = b"".join(resp.iter_bytes())
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    finishes: dict[int, list[str]] = {}
    for event in events[:-1]:
        for choice in orjson.loads(event[6:])["choices"]:
            if choice.get("finish_reason"):
                finishes.setdefault(choice["index"], []).append(choice["finish_reason"])
    assert finishes == {0: ["stop"], 1: ["length"]}, finishes


def test_attack_stream_with_restored_pseudonyms_is_not_cut_below_its_max_tokens(gw):
    """The cap counted the text after the gateway restored its pseudonyms: a provider that kept to
    ``max_tokens`` (20 tokens of ``<EMAIL_1>``, ended ``stop``) was cut as past the reservation
    once each placeholder became a 26-token address, and its client lost the end of the answer."""
    key = new_key(gw, budget_usd=0.05, budget_period="daily")
    pieces = [_chunk([_delta(0, role="assistant", content="")])]
    pieces += [_chunk([_delta(0, content=" <EMAIL_1>")]) for _ in range(4)]
    pieces += [_chunk([_delta(0, "stop")])]
    pieces += [_chunk([], usage={"prompt_tokens": 5, "completion_tokens": 20, "total_tokens": 25})]
    pieces += ["data: [DONE]\n\n"]
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key["key"], max_retries=0, timeout=60)
    chunks = list(
        client.chat.completions.create(
            model="priced-pii",
            stream=True,
            max_tokens=30,
            stream_options={"include_usage": True},
            messages=_raw(pieces, prefix=f"mail {LONG_EMAIL}"),
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text.count(LONG_EMAIL) == 4, text
    assert finishes == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20


@pytest.mark.xfail(
    strict=True,
    reason="left for the lead: the cap counts with o200k, not the provider's tokenizer; a provider whose "
    "tokens are longer (the mock's are words) is cut inside its own max_tokens",
)
def test_attack_stream_of_a_provider_keeping_to_max_tokens_is_not_cut(gw):
    """The mock keeps to max_tokens=40 in its own tokens (words) and ends its 30-word answer with
    ``stop`` (usage: 30); the cap counts the same text as ~60 o200k tokens and cuts it at 40."""
    key = new_key(gw, budget_usd=0.05, budget_period="daily")
    plan = {"reply_words": 30, "chunks": 30}
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key["key"], max_retries=0, timeout=60)
    chunks = list(
        client.chat.completions.create(
            model="priced",
            stream=True,
            max_tokens=40,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": f"hi [[mock:{orjson.dumps(plan).decode()}]]"}],
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"] and text.split() == [f"w{i}" for i in range(30)], (finishes, text)
