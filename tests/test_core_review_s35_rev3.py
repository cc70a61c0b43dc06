"""The session-35 core review reviewed again as an attacker (rev3): hard budgets' reservations
for images, and the spooled settlement of a request whose admit reply timed out. Each test is
one fault that was found, named for it.

Real gateway processes over HTTP, the embedded PostgreSQL and Valkey, the mock providers of
loadtest/ (real HTTP servers speaking OpenAI's and Anthropic's wire formats).
"""

from __future__ import annotations

import asyncio
import uuid

import httpx
import openai
import orjson
import pytest

from tests.conftest import LOCAL_HTTP, Gateway, MockProvider, started
from tests.test_core_review_s35 import PRICES, ReplyHolder, RequestContextFor, _budget, _provider, _row
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


def test_a_spooled_settlement_of_a_request_whose_admit_reply_timed_out_releases_its_reservation(services, tmp_path):
    """Redis slow or going away: ADMIT ran (the reservation made) but its reply did not come in
    time, and the settle that followed failed too, so its record was spooled. The spooled
    settlement counted the cost but never released the reservation (``held`` 0: the admit may not
    have made one), which then held the hard budget until its hold ran out (an hour by default) —
    every request of a flaky minute at once, refusing the budget's requests with
    ``budget_reserved``. The replay now releases the reservation when it is there, and counts the
    cost either way."""
    from core.errors import ServiceUnavailable
    from core.fastredis import PipelinedRedis
    from policies.budgets import NANO
    from policies.ledger import LedgerWriter, Spool
    from tests.test_admission_credit_attacks import (
        ESTIMATE,
        Replica,
        _settle_while_redis_is_away,
        hard_budget,
        stores,
    )

    budget = hard_budget(3)
    spent_key, reserved_key, _, _ = budget.keys()

    async def run() -> tuple[int, int, int, int, int]:
        pool, direct = await stores(services)
        proxy = ReplyHolder(services[1].removeprefix("unix://"))
        url = await proxy.start()
        a = Replica(services[1], budget, policies={"local_admission": False})
        await a.engine._redis.close()
        a.engine._redis = PipelinedRedis(url, timeout=0.5)
        await a.start()  # (the scripts loaded through the proxy, replies passed)
        await a.engine._redis.close()
        proxy.hold = True  # the next connection's replies are kept back
        ctx = RequestContextFor(a)
        with pytest.raises(ServiceUnavailable):
            await a.engine.admit(ctx, ctx.extra["attr"])
        await proxy.held.wait()  # ADMIT ran: its reply came, and was kept back
        reserved_after_admit = int(await direct.get(reserved_key) or 0)
        line = await _settle_while_redis_is_away(a, ctx)
        spool = Spool(tmp_path / f"ledger-spool-{uuid.uuid4().hex[:6]}-1.jsonl")
        spool.append(line)
        writer = LedgerWriter(direct, PipelinedRedis(services[1]), pool, spool)
        await writer._replay()
        spool.append(line)  # the same record again (a replay that stopped before unlinking)
        await writer._replay()
        spent = int(await direct.get(spent_key) or 0)
        reserved = int(await direct.get(reserved_key) or 0)
        members = int(await direct.zcard(f"{reserved_key}:exp"))
        await a.engine.close()
        await proxy.close()
        await direct.aclose()
        await pool.close()
        return reserved_after_admit, spent, reserved, members, 300 * NANO // 1_000_000

    reserved_after_admit, spent, reserved, members, cost = asyncio.run(run())
    assert reserved_after_admit == ESTIMATE  # the admit did reserve
    assert spent == cost  # counted, once
    assert (reserved, members) == (0, 0)  # and the reservation released


@pytest.fixture(scope="module")
def openai_gw(tmp_root, services, module_mock):
    cfg = {
        "router": {"max_attempts": 1, "circuit": {"failures": 100000}},
        "providers": [_provider("oair3", module_mock)],
        "models": [{"name": "priced", "deployments": [{"provider": "oair3", "model": "m", **PRICES}]}],
    }
    with started(Gateway(tmp_root, cfg, services)) as (gw,):
        yield gw


_BIG = "lorem ipsum dolor sit amet " * 10_000  # 50,000 tokens, 270 KB


@pytest.mark.parametrize(
    "where",
    ["refusal part", "refusal field", "legacy function_call", "legacy functions"],
)
def test_prompt_text_outside_content_cannot_carry_a_request_past_a_hard_budget(openai_gw, where):
    """A hard budget reserves the prompt as ``core.tokens.count_prompt`` counts it, which read
    only text parts, tool calls and tools. OpenAI also takes (and bills as prompt) an assistant
    message's ``refusal`` parts and ``refusal`` field, its legacy ``function_call`` and the
    legacy ``functions`` definitions: a few hundred kilobytes there were reserved as nothing,
    and spend passed the hard limit by 2.5 times."""
    key = new_key(openai_gw, budget_usd=0.02, budget_period="none")
    usage = {"prompt_tokens": 50_010, "total_tokens": 50_015}  # what OpenAI bills for the body
    directive = "go [[mock:" + orjson.dumps({"usage": usage}).decode() + "]]"
    body: dict = {"model": "priced", "max_tokens": 5}
    before = {"role": "user", "content": "hi"}
    if where == "refusal part":
        body["messages"] = [
            before,
            {"role": "assistant", "content": [{"type": "refusal", "refusal": _BIG}]},
            {"role": "user", "content": directive},
        ]
    elif where == "refusal field":
        body["messages"] = [
            before,
            {"role": "assistant", "content": "no", "refusal": _BIG},
            {"role": "user", "content": directive},
        ]
    elif where == "legacy function_call":
        body["messages"] = [
            before,
            {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": _BIG}},
            {"role": "function", "name": "f", "content": "done"},
            {"role": "user", "content": directive},
        ]
    else:
        body["functions"] = [{"name": "f", "description": _BIG, "parameters": {"type": "object"}}]
        body["messages"] = [{"role": "user", "content": directive}]
    r = httpx.post(
        f"{openai_gw.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key['key']}"},
        timeout=30,
    )
    assert r.status_code in (200, 429), r.text
    state = _budget(openai_gw, key["budget_id"])
    assert state["spent_usd"] <= 0.02, (state, r.text)
    assert r.status_code == 429 and r.json()["error"]["code"] == "budget_too_small", r.text


def test_media_parts_of_other_kinds_cannot_carry_a_request_past_a_hard_budget(openai_gw):
    """Only ``image_url``, ``input_audio`` and ``file`` parts reserved ``media_part_tokens``; any
    other kind of part was reserved as nothing, though OpenAI-compatible servers take more media
    (vLLM: ``video_url``, ``audio_url``, ``image_embeds``) and bill them as prompt tokens: fifty
    of them passed a hard limit. Every part that is not text now reserves as media."""
    key = new_key(openai_gw, budget_usd=0.02, budget_period="none")
    usage = {"prompt_tokens": 50 * 1600, "total_tokens": 50 * 1600 + 5}
    text = {"type": "text", "text": "describe [[mock:" + orjson.dumps({"usage": usage}).decode() + "]]"}
    clips = [{"type": "video_url", "video_url": {"url": "https://clip.example/x.mp4"}}] * 50
    r = httpx.post(
        f"{openai_gw.url}/v1/chat/completions",
        json={"model": "priced", "max_tokens": 5, "messages": [{"role": "user", "content": [*clips, text]}]},
        headers={"Authorization": f"Bearer {key['key']}"},
        timeout=30,
    )
    assert r.status_code in (200, 429), r.text
    state = _budget(openai_gw, key["budget_id"])
    assert state["spent_usd"] <= 0.02, (state, r.text)
    assert r.status_code == 429 and r.json()["error"]["code"] == "budget_too_small", r.text


def _anthropic_event(data: dict) -> str:
    return f"event: {data['type']}\ndata: " + orjson.dumps(data).decode() + "\n\n"


def test_an_anthropic_stream_without_message_delta_tells_the_client_the_usage_it_was_charged(
    tmp_root, services, api_key
):
    """A stream that ends (``message_stop``) without ``message_delta``, the one event with the
    output count, is charged the gateway's estimate of what was sent. A client that asked for
    ``include_usage`` got two usage chunks: first ``message_start``'s count (one output token),
    then the estimate — the first is what most clients keep, and it was not what was charged."""
    mock = MockProvider(tmp_root)
    start = {"id": "msg_1", "type": "message", "role": "assistant", "model": "c", "content": []}
    start["usage"] = {"input_tokens": 3, "output_tokens": 1}
    pieces = [
        _anthropic_event({"type": "message_start", "message": start}),
        _anthropic_event({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        *(
            _anthropic_event(
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": f"word{i} "}}
            )
            for i in range(40)
        ),
        _anthropic_event({"type": "content_block_stop", "index": 0}),
        _anthropic_event({"type": "message_stop"}),
    ]
    cfg = {
        "router": {"max_attempts": 1},
        "providers": [_provider("antnd", mock, "anthropic")],
        "models": [{"name": "claude-nd", "deployments": [{"provider": "antnd", "model": "c", **PRICES}]}],
    }
    rid = f"ant-nodelta-{uuid.uuid4().hex[:8]}"
    with started(mock, Gateway(tmp_root, cfg, services)) as (_, gw):
        LOCAL_HTTP.post(f"{mock.url}/_mock/config", json={"raw": {"pieces": pieces}}).raise_for_status()
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=api_key, max_retries=0, timeout=30)
        stream = client.chat.completions.create(
            model="claude-nd",
            stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-request-id": rid},
        )
        usages = [c.usage for c in stream if c.usage is not None]
        row = _row(services, rid)
    assert len(usages) == 1, usages
    assert usages[0].completion_tokens == row["completion_tokens"] >= 40, (usages, row)


def test_estimating_a_huge_embeddings_input_without_usage_does_not_hold_the_replica(monkeypatch):
    """An embeddings answer whose provider reports no usage is estimated by counting its input
    with tiktoken (about a second per MB of text like "aaaa…"). Whether to count off the event
    loop was decided by the answer's size, and the answer to an 8 MB text (one vector, from a
    server that truncates long inputs) is a few kilobytes: the input was counted on the loop,
    holding every other request of the replica for seconds."""
    import threading

    from core.types import RequestContext, Usage
    from gateway import pipeline
    from gateway.usage import OFF_LOOP_BYTES

    where: list[bool] = []

    def estimating(ctx, raw):
        where.append(threading.current_thread() is threading.main_thread())
        return Usage(prompt_tokens=1)

    monkeypatch.setattr(pipeline, "estimate_usage", estimating)
    vector = orjson.dumps({"object": "list", "data": [{"embedding": "AAAA" * 2048, "index": 0}]})
    for size in (OFF_LOOP_BYTES, 100):
        body = {"model": "m", "input": "a" * size}
        ctx = RequestContext("r", "embeddings", body, 0.0, body_bytes=size + 30)
        asyncio.run(pipeline._estimate(ctx, vector))
    assert where == [False, True]


def test_estimating_a_huge_rerank_request_without_usage_does_not_hold_the_replica(monkeypatch):
    """A rerank answer whose provider reports no tokens (many rerank servers report none, or
    only search units) is estimated by counting the query and documents with tiktoken, on the
    event loop whatever their size: up to 8 MB of documents held every other request of the
    replica for seconds. A large request is counted in a worker thread, a small one on the loop."""
    import threading

    from core.types import RequestContext
    from gateway import rerank
    from gateway.usage import OFF_LOOP_BYTES

    where: list[bool] = []

    def counting(text):
        where.append(threading.current_thread() is threading.main_thread())
        return 1

    monkeypatch.setattr(rerank, "count_text", counting)
    for size in (OFF_LOOP_BYTES, 100):
        body = {"model": "m", "query": "q", "documents": ["a" * size]}
        ctx = RequestContext("r", "rerank", body, 0.0, body_bytes=size + 40)
        asyncio.run(rerank.estimate_usage(ctx))
        assert ctx.usage.prompt_tokens == 2
    assert where == [False, False, True, True]
