"""Routing, providers and the wire format, reviewed as an attacker (session 22).

Each test is one hostile or broken input that was tried: what an upstream provider (or
whatever answers at its address) or a client sends, and what the client of the gateway must
see instead of a 500, a stalled or bloated replica, or a key taken out of rotation for ever.
Real gateway processes over HTTP, the OpenAI SDK as the client, the mock provider of loadtest/.
"""

from __future__ import annotations

import uuid

import httpx
import openai
import orjson
import pytest

from tests.conftest import Gateway, MockProvider, started

HELLO = [{"role": "user", "content": "hello"}]
TIMEOUTS = {"first_byte": 5, "idle": 5, "total": 20}


def _provider(name: str, mock: MockProvider, kind: str = "openai") -> dict:
    return {
        "name": name,
        "kind": kind,
        "base_url": f"{mock.url}/v1" if kind == "openai" else mock.url,
        # unique per run: key health is shared through the suite's Redis
        "api_keys": [f"{name}-{uuid.uuid4().hex[:10]}"],
        "timeouts": TIMEOUTS,
    }


@pytest.fixture(scope="module")
def mocks(tmp_root):
    procs = {"bad": MockProvider(tmp_root), "good": MockProvider(tmp_root)}
    yield procs
    for p in procs.values():
        p.stop()


@pytest.fixture(scope="module")
def gw(tmp_root, services, mocks):
    bad, good = mocks["bad"], mocks["good"]
    cfg = {
        "router": {
            "max_attempts": 4,
            "key_cooldown": 30,  # a 429 without a usable retry-after: longer than the router waits
            "backoff": {"base": 0.01, "max": 0.02},
            "circuit": {"failures": 100000, "window": 10, "cooldown": 0.5},
        },
        "providers": [
            _provider("bad-oa", bad),
            _provider("bad-an", bad, "anthropic"),
            _provider("good", good),
            *[_provider(f"lim{i}", bad) for i in range(5)],
        ],
        "models": [
            {"name": "oa", "fallbacks": ["safe"], "deployments": [{"provider": "bad-oa", "model": "x"}]},
            {"name": "an", "fallbacks": ["safe"], "deployments": [{"provider": "bad-an", "model": "y"}]},
            {"name": "oa-solo", "deployments": [{"provider": "bad-oa", "model": "x-solo"}]},
            {"name": "an-solo", "deployments": [{"provider": "bad-an", "model": "y-solo"}]},
            {"name": "safe", "deployments": [{"provider": "good", "model": "z"}]},
            *[{"name": f"lim{i}", "deployments": [{"provider": f"lim{i}", "model": "l"}]} for i in range(5)],
        ],
    }
    with started(Gateway(tmp_root, cfg, services)) as (g,):
        yield g


@pytest.fixture
def bad(mocks):
    yield mocks["bad"]
    mocks["bad"].configure(raw=None, fail_rate=0, fail_status=500, retry_after=1.0)


@pytest.fixture
def sdk(gw, api_key):
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key=api_key, max_retries=0, timeout=60) as c:
        yield c


def _sse(*objs) -> list[str]:
    return [f"data: {orjson.dumps(o).decode()}\n\n" for o in objs]


def _chunk(delta: dict, finish=None) -> dict:
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "x",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def _peak_rss_kib(gw: Gateway) -> int:
    for line in open(f"/proc/{gw.proc.pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _stream_events(gw: Gateway, api_key: str, model: str) -> list[bytes]:
    """The data of every event the gateway streamed, read raw (no SDK in between)."""
    body = {"model": model, "messages": HELLO, "stream": True}
    with httpx.stream(
        "POST",
        f"{gw.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=60,
    ) as resp:
        assert resp.status_code == 200, resp.read()
        raw = resp.read()
    return [e[6:] for e in raw.split(b"\n\n") if e.startswith(b"data: ")]


# ---- Retry-After and rate-limit resets from the upstream ---------------------------------------


@pytest.mark.parametrize(
    ("i", "value"),
    [(0, "inf"), (1, "1e12"), (2, "Fri, 31 Dec 9999 23:59:59 GMT"), (3, "nan"), (4, "soon")],
)
def test_a_providers_absurd_retry_after_neither_fails_the_request_nor_retires_the_key_for_ever(bad, sdk, i, value):
    """A 429 whose ``retry-after`` is infinite, centuries away or no number or date: the client gets
    a 429 with a usable ``retry-after`` (not a 500), and the key cools down for a bounded time
    (at most an hour), here and in every replica that hears of it — not for ever."""
    bad.configure(fail_rate=1, fail_status=429, retry_after=value)
    with pytest.raises(openai.RateLimitError) as first:
        sdk.chat.completions.create(model=f"lim{i}", messages=HELLO)
    told = first.value.response.headers.get("retry-after")  # (none for a value that is no number)
    assert told is None or 1 <= int(told) <= 3600
    # the key is cooling down: the next request is refused without calling the provider, and
    # says when to come back — within the bound
    seen = len(bad.requests())
    with pytest.raises(openai.RateLimitError) as second:
        sdk.chat.completions.create(model=f"lim{i}", messages=HELLO)
    assert 1 <= int(second.value.response.headers["retry-after"]) <= 3600
    assert len(bad.requests()) == seen


# ---- A provider answering garbage ------------------------------------------------------------


@pytest.mark.parametrize("model", ["oa", "an"])
def test_an_endless_sse_line_before_any_content_is_cut_off_and_falls_back(gw, bad, sdk, model):
    """A provider that streams one line without end (no event ever completes): the gateway
    stops reading at a bound instead of buffering until the total timeout (hundreds of MB,
    copied again with every read), and falls back to the healthy group unseen."""
    before = _peak_rss_kib(gw)
    bad.configure(raw={"pieces": ['data: {"choices": [{"delta": {"content": "'], "flood": 160 * 1024 * 1024})
    raw = sdk.chat.completions.with_raw_response.create(model=model, messages=HELLO, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert text == "echo: hello"
    assert raw.headers["x-gateway-deployment"] == "good/z"
    assert _peak_rss_kib(gw) - before < 96 * 1024, "the endless line was buffered"


def test_the_sse_splitter_cuts_events_as_before_across_any_split_of_the_bytes():
    """The bounded splitter finds the same events as splitting the whole buffer again on every
    read did (CRLF framing and a boundary cut between two reads included)."""
    import random

    from core.sse import EventSplitter, EventTooLarge

    rnd = random.Random(7)
    for _ in range(3000):
        text = b"".join(rnd.choice([b"a", b"b", b":", b"\n", b"\r\n"]) for _ in range(rnd.randint(0, 30)))
        cuts = sorted(rnd.sample(range(len(text) + 1), min(len(text) + 1, rnd.randint(0, 8))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        splitter, got = EventSplitter(), []
        for piece in pieces:
            got += splitter.feed(piece)
        whole = text.replace(b"\r\n", b"\n").split(b"\n\n")
        rest = whole.pop()
        assert got == [e + b"\n\n" for e in whole if e] and splitter.rest == rest, pieces
    splitter = EventSplitter(limit=1000)
    with pytest.raises(EventTooLarge):
        for _ in range(100):
            splitter.feed(b"data: " + b"x" * 100)


def test_an_endless_sse_line_after_content_ends_the_stream_with_an_error_event(gw, api_key, bad):
    before = _peak_rss_kib(gw)
    first = _sse(_chunk({"role": "assistant", "content": "partial"}))
    bad.configure(raw={"pieces": [*first, 'data: {"choices": [{"delta": {"content": "'], "flood": 160 * 1024 * 1024})
    events = _stream_events(gw, api_key, "oa")
    assert orjson.loads(events[0])["choices"][0]["delta"]["content"] == "partial"
    err = orjson.loads(events[-1])["error"]
    assert err["code"] == "upstream_bad_response", err
    assert _peak_rss_kib(gw) - before < 96 * 1024, "the endless line was buffered"


def _anthropic_event(kind: str, data: object) -> str:
    return f"event: {kind}\ndata: {orjson.dumps(data).decode()}\n\n"


_MESSAGE_START = _anthropic_event(
    "message_start",
    {"type": "message_start", "message": {"id": "m1", "model": "y", "usage": {"input_tokens": 3, "output_tokens": 1}}},
)
_ANTHROPIC_GARBAGE = {
    "content-not-blocks": (False, "application/json", [orjson.dumps({"id": "m", "content": [1, "x"]}).decode()]),
    "tool-use-without-id": (
        False,
        "application/json",
        [orjson.dumps({"id": "m", "content": [{"type": "tool_use", "name": "f"}]}).decode()],
    ),
    "error-event-as-text": (True, "text/event-stream", [_anthropic_event("error", {"type": "error", "error": "busy"})]),
    "message-not-an-object": (
        True,
        "text/event-stream",
        [_anthropic_event("message_start", {"type": "message_start", "message": "x"})],
    ),
    "block-not-an-object": (
        True,
        "text/event-stream",
        [_MESSAGE_START, _anthropic_event("content_block_start", {"type": "content_block_start", "content_block": 7})],
    ),
}


@pytest.mark.parametrize("case", sorted(_ANTHROPIC_GARBAGE))
def test_an_anthropic_answer_of_the_wrong_shape_falls_back_instead_of_a_500(bad, sdk, case):
    """An Anthropic answer whose blocks, error or message are not the objects the translation
    expects: a provider failure (502 upstream_bad_response), so the request falls back to the
    healthy group — never an unhandled error that ends the request with a 500 and no fallback."""
    stream, ctype, pieces = _ANTHROPIC_GARBAGE[case]
    bad.configure(raw={"content_type": ctype, "pieces": pieces})
    if stream:
        raw = sdk.chat.completions.with_raw_response.create(model="an", messages=HELLO, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    else:
        raw = sdk.chat.completions.with_raw_response.create(model="an", messages=HELLO)
        text = raw.parse().choices[0].message.content
    assert text == "echo: hello"
    assert raw.headers["x-gateway-deployment"] == "good/z"
    with pytest.raises(openai.InternalServerError) as exc:  # no fallback: the failure, as a 502
        sdk.chat.completions.create(model="an-solo", messages=HELLO, stream=stream)
    assert exc.value.status_code == 502 and exc.value.code == "upstream_bad_response"


def test_an_openai_chunk_of_an_unexpected_shape_is_relayed_not_a_500(gw, api_key, bad):
    """A relay passes on what it cannot read (the client's parser is the one to judge): chunks
    whose ``choices`` or ``delta`` are not what OpenAI sends reach the client, then ``[DONE]``;
    the gateway's usage estimate skips them instead of failing the request."""
    odd = [{"id": "c", "choices": "zz"}, {"id": "c", "choices": [1, {"delta": "x"}]}]
    bad.configure(raw={"pieces": [*_sse(*odd), "data: [DONE]\n\n"]})
    events = _stream_events(gw, api_key, "oa-solo")
    assert [orjson.loads(e) for e in events[:-1]] == odd and events[-1] == b"[DONE]"


def test_an_openai_answer_of_an_unexpected_shape_without_usage_is_relayed_not_a_500(gw, api_key, bad):
    body = {"id": "c", "object": "chat.completion", "choices": [1, {"message": "x"}, {"message": {"tool_calls": "t"}}]}
    bad.configure(raw={"content_type": "application/json", "pieces": [orjson.dumps(body).decode()]})
    resp = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": "oa-solo", "messages": HELLO},
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    assert resp.json() == body


# ---- What commits a stream -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("reasoning_content", "thinking"),
        ("reasoning", "thinking"),
        ("audio", {"id": "a1", "data": "UklGRg==", "transcript": "hi"}),  # gpt-4o-audio
        ("images", [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}}]),  # OpenRouter
    ],
)
def test_reasoning_deltas_reach_the_client_as_they_come(gw, api_key, bad, field, value):
    """A reasoning model behind an OpenAI-compatible server (vLLM, DeepSeek, OpenRouter) streams
    its reasoning for minutes before the first word of the answer. Those deltas are content for
    the client: relayed as they come, not held back (a client or load balancer seeing nothing
    for minutes gives up) — and so is any other delta a server adds (audio, images), which
    would otherwise be held until the bound on what is held ends the stream. Here the provider
    breaks off after that delta: the client has it, then the error event that ends the stream."""
    pieces = _sse(_chunk({"role": "assistant", "content": ""}), _chunk({field: value}))
    bad.configure(raw={"pieces": pieces})
    events = _stream_events(gw, api_key, "oa-solo")
    assert orjson.loads(events[1])["choices"][0]["delta"] == {field: value}
    assert orjson.loads(events[-1])["error"]["code"] == "upstream_disconnected"


def test_a_flood_of_events_without_content_is_not_held_in_memory_before_the_first_content(gw, bad, sdk):
    """Events that carry nothing for the client (keep-alive comments, empty deltas) are held until
    the first content, so a failure can still fall back unseen — but not without bound: past a
    few MiB of them the answer is a bad one, and the request falls back."""
    before = _peak_rss_kib(gw)
    empty = _sse(_chunk({}))[0]
    bad.configure(raw={"pieces": [": keep-alive\n\n"], "fill": empty, "flood": 160 * 1024 * 1024})
    raw = sdk.chat.completions.with_raw_response.create(model="oa", messages=HELLO, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert text == "echo: hello"
    assert raw.headers["x-gateway-deployment"] == "good/z"
    assert _peak_rss_kib(gw) - before < 96 * 1024, "the events before the first content were all held"


# ---- Failure classes -------------------------------------------------------------------------


def test_a_provider_out_of_credit_402_is_a_provider_failure_that_falls_back(bad, sdk):
    """402 Payment Required (OpenRouter, DeepSeek and others when the operator's balance runs
    out) is the provider refusing the gateway's account, not a bad request: the router falls
    back, and without a fallback the client gets a 502 — never a 400 blaming its request."""
    bad.configure(fail_rate=1, fail_status=402)
    raw = sdk.chat.completions.with_raw_response.create(model="oa", messages=HELLO)
    assert raw.parse().choices[0].message.content == "echo: hello"
    assert raw.headers["x-gateway-deployment"] == "good/z"
    with pytest.raises(openai.InternalServerError) as exc:
        sdk.chat.completions.create(model="oa-solo", messages=HELLO)
    assert exc.value.status_code == 502


# ---- Client fields that reach the provider ---------------------------------------------------


def test_a_client_cannot_buy_a_dearer_service_tier_than_the_gateway_prices(mocks, sdk):
    """``service_tier: "priority"`` (or ``"scale"``) makes OpenAI bill more than its list price
    for every token, while the gateway prices the request — and holds budgets — at list price:
    a client could spend past a hard budget. Tiers at or below list price pass through."""
    good = mocks["good"]
    good.clear()
    for tier in ("priority", "scale"):
        with pytest.raises(openai.BadRequestError) as exc:
            sdk.chat.completions.create(model="safe", messages=HELLO, service_tier=tier)
        assert exc.value.body["param"] == "service_tier"
    assert good.requests() == []
    for tier in ("auto", "default", "flex"):
        sdk.chat.completions.create(model="safe", messages=HELLO, service_tier=tier)
        assert good.last()["body"]["service_tier"] == tier


def _nested(depth: int) -> dict:
    value: object = 1
    for _ in range(depth):
        value = {"a": value}
    return value  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("model", "where"),
    # (metadata is not sent to Anthropic: nothing to encode there)
    [
        ("safe", "metadata"),
        ("safe", "tool-parameters"),
        ("safe", "json-schema"),
        ("an-solo", "tool-parameters"),
        ("an-solo", "json-schema"),
    ],
)
def test_a_body_nested_too_deep_to_send_on_is_the_clients_400_not_a_provider_failure(gw, api_key, mocks, model, where):
    """JSON nested 300 deep is read (the parser allows 1024) but cannot be encoded again for the
    provider (the encoder stops at 255). That is the client's request at fault: a 400 naming it,
    no provider called — not a 500, and never a provider failure, which would be retried on every
    deployment and count towards opening their circuits for every other client."""
    body = {"model": model, "messages": HELLO}
    if where == "metadata":
        body["metadata"] = {"k": _nested(300)}
    elif where == "tool-parameters":
        body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": _nested(300)}}]
    else:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": _nested(300)}}
    import json

    for m in mocks.values():
        m.clear()
    resp = httpx.post(
        f"{gw.url}/v1/chat/completions",
        content=json.dumps(body),
        headers={"Authorization": f"Bearer {api_key}", "content-type": "application/json"},
        timeout=60,
    )
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert all(m.requests() == [] for m in mocks.values())


def test_a_tool_type_anthropic_cannot_take_is_the_clients_400(gw, api_key, mocks):
    """A non-function tool (``{"type": "custom"}``: OpenAI's newer tool kinds) for a model served by
    Anthropic: a 400 naming the field, no provider called — not an unhandled KeyError (a 500)."""
    for m in mocks.values():
        m.clear()
    resp = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": "an-solo", "messages": HELLO, "tools": [{"type": "custom", "custom": {"name": "grammar"}}]},
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=60,
    )
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "tools[0].type"
    assert all(m.requests() == [] for m in mocks.values())


def test_a_long_stream_is_not_kept_whole_in_memory_while_it_is_relayed(gw, api_key, bad):
    """Every chunk relayed was also kept (for the usage estimate and an agent's stored answer)
    until the stream ended: a provider streaming for its whole total timeout — or just a very
    long answer — held the replica's memory in proportion. What is kept is now bounded, and
    the usage estimate still counts the whole answer."""
    before = _peak_rss_kib(gw)
    first = _sse(_chunk({"role": "assistant", "content": "one two three"}))
    empty = _sse(_chunk({}))[0]
    bad.configure(raw={"pieces": first, "fill": empty, "flood": 160 * 1024 * 1024})
    events = _stream_events(gw, api_key, "oa-solo")
    assert orjson.loads(events[0])["choices"][0]["delta"]["content"] == "one two three"
    # the provider hangs up after its flood; a loaded host may relay it past the total timeout
    # first: either way the stream ends with an error event, and what is measured is the memory
    assert orjson.loads(events[-1])["error"]["code"] in ("upstream_disconnected", "upstream_timeout")
    assert _peak_rss_kib(gw) - before < 96 * 1024, "the relayed stream was kept whole"


def test_a_compacted_stream_still_has_its_whole_answer_counted(gw, api_key, bad):
    """A long answer from a provider that reports no usage: what was kept of it is compacted on
    the way, and the estimate still counts every word the client was sent."""
    word = _sse(_chunk({"content": " word"}))[0]
    flood = 8 * 1024 * 1024
    bad.configure(raw={"pieces": [], "fill": word, "flood": flood})
    rid = f"long-{uuid.uuid4().hex[:8]}"
    body = {"model": "oa-solo", "messages": HELLO, "stream": True}
    headers = {"Authorization": f"Bearer {api_key}", "x-request-id": rid}
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body, headers=headers, timeout=60) as resp:
        sent = resp.read().count(b'"content":" word"')
    words = sent
    assert words > flood // len(word) * 0.9

    def line() -> dict | None:
        for entry in gw.log().splitlines():
            if rid in entry and entry.startswith("{"):
                return orjson.loads(entry)
        return None

    from tests.conftest import wait_until

    wait_until(lambda: line() is not None, timeout=10, what="the request's log line")
    assert line()["usage_estimated"] is True
    assert 0.9 * words <= line()["completion_tokens"] <= 1.1 * words


def test_attack_a_compacted_stream_still_counts_the_tool_calls_of_every_choice(gw, api_key, bad):
    """``n`` answers whose words are tool calls, from a provider that reports no usage: the
    compaction kept only the first choice's calls (what an agent stores), so every other choice's
    arguments the client was sent went uncounted once the stream passed the relay's bound — the
    request charged a fraction of what it used. (s36 rev4)"""
    piece = {"tool_calls": [{"index": 0, "function": {"arguments": " word"}}]}
    fill = _sse({**_chunk(piece), "choices": [{"index": 1, "delta": piece, "finish_reason": None}]})[0]
    flood = 8 * 1024 * 1024
    bad.configure(raw={"pieces": _sse(_chunk({"role": "assistant", "content": "one"})), "fill": fill, "flood": flood})
    rid = f"calls-{uuid.uuid4().hex[:8]}"
    body = {"model": "oa-solo", "messages": HELLO, "stream": True, "n": 2}
    headers = {"Authorization": f"Bearer {api_key}", "x-request-id": rid}
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body, headers=headers, timeout=60) as resp:
        words = resp.read().count(b'"arguments":" word"')
    assert words > flood // len(fill) * 0.9

    def line() -> dict | None:
        for entry in gw.log().splitlines():
            if rid in entry and entry.startswith("{"):
                return orjson.loads(entry)
        return None

    from tests.conftest import wait_until

    wait_until(lambda: line() is not None, timeout=10, what="the request's log line")
    assert line()["usage_estimated"] is True
    assert 0.9 * words <= line()["completion_tokens"] <= 1.1 * words + 10, (words, line()["completion_tokens"])


def test_a_provider_writing_data_without_the_optional_space_is_relayed_whole(sdk, bad):
    """``data:{...}`` (no space after the colon) is valid SSE, sent by Spring-based proxies and
    some providers: the stream, its usage and its ``[DONE]`` are understood, and the client
    gets OpenAI's own framing (clients that expect the space exist)."""
    chunks = [_chunk({"role": "assistant", "content": ""}), _chunk({"content": "hi there"}), _chunk({}, "stop")]
    usage = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "x", "choices": []}
    usage["usage"] = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    pieces = [f"data:{orjson.dumps(c).decode()}\n\n" for c in [*chunks, usage]] + ["data:[DONE]\n\n"]
    bad.configure(raw={"pieces": pieces})
    stream = sdk.chat.completions.create(
        model="oa-solo", messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    got = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == "hi there"
    assert got[-1].usage is not None and got[-1].usage.completion_tokens == 2


def test_anthropic_out_of_credit_is_a_provider_failure_that_falls_back(bad, sdk):
    """Anthropic answers an exhausted balance with a 400 invalid_request_error ("Your credit
    balance is too low ..."): the operator's account, not the client's request. The router
    falls back; without a fallback the client gets a 502, never a 400 blaming its request."""
    low = "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing."
    err = {"type": "error", "error": {"type": "invalid_request_error", "message": low}}
    bad.configure(raw={"status": 400, "content_type": "application/json", "pieces": [orjson.dumps(err).decode()]})
    raw = sdk.chat.completions.with_raw_response.create(model="an", messages=HELLO)
    assert raw.parse().choices[0].message.content == "echo: hello"
    assert raw.headers["x-gateway-deployment"] == "good/z"
    with pytest.raises(openai.InternalServerError) as exc:
        sdk.chat.completions.create(model="an-solo", messages=HELLO)
    assert exc.value.status_code == 502


def test_a_cooldown_stored_centuries_long_before_the_bound_does_not_retire_the_key(tmp_root, services, mocks, api_key):
    """Health events stored in Redis by a replica before retry-after was bounded (a key cooled
    for 31,000 years, with a TTL to match) are read by every replica that starts: a replica
    believes a stored cooldown only up to the bound, so the key comes back."""
    import hashlib
    import time

    import redis

    key = f"stored-{uuid.uuid4().hex[:10]}"
    kid = hashlib.sha256(key.encode()).hexdigest()[:12]
    event = {"t": "key", "p": "stored", "k": kid, "until": time.time() + 1e12}
    with redis.Redis.from_url(services[1]) as r:
        r.set(f"gateway:health:key:stored:{kid}:", orjson.dumps(event), px=10**14)
    provider = {**_provider("stored", mocks["good"]), "api_keys": [key]}
    cfg = {"providers": [provider], "models": [{"name": "m", "deployments": [{"provider": "stored", "model": "s"}]}]}
    with started(Gateway(tmp_root, cfg, services)) as (g,):
        client = openai.OpenAI(base_url=f"{g.url}/v1", api_key=api_key, max_retries=0, timeout=60)
        try:
            client.chat.completions.create(model="m", messages=HELLO)
        except openai.RateLimitError as exc:
            assert int(exc.response.headers["retry-after"]) <= 3600


def test_a_client_that_asked_for_usage_gets_it_when_the_provider_sends_none(sdk, bad):
    """``stream_options.include_usage``: the last chunk before ``[DONE]`` carries the usage. A
    provider that ignores the option (some OpenAI-compatible servers) sends none; the client
    then gets the gateway's estimate — the count it is billed — instead of no usage at all."""
    chunks = [_chunk({"role": "assistant", "content": ""}), _chunk({"content": "one two three"}), _chunk({}, "stop")]
    bad.configure(raw={"pieces": [*_sse(*chunks), "data: [DONE]\n\n"]})
    got = list(
        sdk.chat.completions.create(
            model="oa-solo", messages=HELLO, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == "one two three"
    assert got[-1].choices == [] and got[-1].usage is not None
    assert got[-1].usage.completion_tokens >= 3 and got[-1].usage.prompt_tokens > 0


def test_a_stream_that_fails_inside_the_gateway_still_ends_with_an_error_event(tmp_root, services, mocks, api_key):
    """Whatever fails while a stream is relayed — here the restoring of pseudonyms tripping over
    a provider's ``tool_calls`` that is not a list — the client hears a terminal error event, not
    a connection cut mid-body (which the SDK reports as a network error, if at all)."""
    bad = mocks["bad"]
    cfg = {
        "providers": [_provider("p", bad)],
        "models": [{"name": "m", "deployments": [{"provider": "p", "model": "x"}]}],
        "pii": {"policies": {"default": {"entities": {"email": "pseudonymize"}}}},
    }
    pad = ": keep-alive\n\n" * 40_000  # (the bad chunk comes in a later read than the first content)
    first, odd = _sse(_chunk({"role": "assistant", "content": "hello"}), _chunk({"tool_calls": 5}))
    bad.configure(raw={"pieces": [first, pad, odd, "data: [DONE]\n\n"]})
    try:
        with started(Gateway(tmp_root, cfg, services)) as (g,):
            body = {"model": "m", "messages": [{"role": "user", "content": "mail jane.roe@example.org"}]}
            body["stream"] = True
            with httpx.stream(
                "POST",
                f"{g.url}/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {api_key}"},
                timeout=60,  # (httpx's default 5 s between reads: 560 KB of padding on a loaded machine)
            ) as resp:
                assert resp.status_code == 200
                raw = resp.read()
    finally:
        bad.configure(raw=None)
    events = [e[6:] for e in raw.split(b"\n\n") if e.startswith(b"data: ")]
    assert orjson.loads(events[0])["choices"][0]["delta"]["content"] == "hello"
    assert orjson.loads(events[-1])["error"]["type"] == "server_error"


def test_a_tool_choice_naming_a_function_without_its_name_is_the_clients_400(gw, api_key):
    """``tool_choice: {"function": {}}`` (no ``type``, no name) passed validation and failed the
    Anthropic translation with a KeyError: a 500. It is the client's 400, naming the field."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    for model in ("an-solo", "safe"):
        resp = httpx.post(
            f"{gw.url}/v1/chat/completions",
            json={"model": model, "messages": HELLO, "tools": [tool], "tool_choice": {"function": {}}},
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=60,
        )
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == "tool_choice.function.name"


def test_counting_a_huge_prompt_does_not_hold_the_replica(monkeypatch):
    """A prompt's tokens are counted when something needs them (a context window, a rule, a hard
    budget). tiktoken takes about a second per MB of text like "aaaa…"; counted on the event
    loop, one client's 6 MB body held every other request of the replica for seconds (a small
    request waited 2.7 s of the big one's 2.9 s). A prompt of OFF_LOOP_BYTES or more is counted
    in a worker thread before routing; a small one stays on the loop (a thread hop costs more)."""
    import asyncio
    import threading

    from core.types import RequestContext
    from gateway import usage

    where: list[bool] = []

    def counting(body, known=None):
        where.append(threading.current_thread() is threading.main_thread())
        return 7

    monkeypatch.setattr(usage, "count_prompt", counting)
    for size, on_loop in ((usage.OFF_LOOP_BYTES, False), (100, None)):
        body = {"model": "m", "messages": [{"role": "user", "content": "a" * size}]}
        ctx = RequestContext("r", "chat", body, 0.0, body_bytes=size + 50)
        asyncio.run(usage.count_prompt_off_loop(ctx))
        if on_loop is None:  # small: left for whoever needs it, on the loop
            assert ctx._prompt_tokens is None
        else:
            assert ctx._prompt_tokens == 7 and where == [on_loop]


@pytest.mark.parametrize(("after_content", "name"), [(False, '"error" '), (True, '"error" '), (False, '"\\u0065rror"')])
def test_an_error_event_written_with_spaces_is_cleaned_of_keys_and_hosts(gw, api_key, bad, after_content, name):
    """The provider's error events have their message cleaned of keys and hosts. One written
    ``{"error" : {...}}`` (valid JSON, a space before the colon) slipped past the adapter's
    byte check and was raised by the gateway's own commit check — uncleaned: the client read
    the key fragment and the internal host the provider echoed. (A key spelled with a JSON
    escape, ``"\\u0065rror"``, is still caught by the commit check, which cleans it too.)"""
    key = _provider("x", bad)["api_keys"][0]  # (any key-shaped text: the scrubber's patterns)
    leak = f"Incorrect API key provided: sk-proj-{'A1b2' * 10}. Contact admin@10.1.2.3 at http://internal.corp:8080/x"
    err_event = "data: {" + name + ': {"message": ' + orjson.dumps(leak).decode() + ', "type": "server_error"}}\n\n'
    first = _sse(_chunk({"role": "assistant", "content": "partial"})) if after_content else []
    bad.configure(raw={"pieces": [*first, err_event]})
    body = {"model": "oa-solo", "messages": HELLO, "stream": True}
    resp = httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {api_key}"})
    text = resp.text
    assert "Incorrect API key provided" in text
    assert "A1b2A1b2" not in text and "10.1.2.3" not in text and "internal.corp" not in text, text
    assert key not in text


@pytest.mark.parametrize("stream", [False, True])
def test_estimating_a_huge_answer_without_usage_does_not_hold_the_replica(monkeypatch, stream):
    """A provider that reports no usage has its answer counted by the gateway (tiktoken, about a
    second per MB of text like "aaaa…"). On the event loop, one 4 MB answer held every other
    request of the replica (a small request waited 3.1 of 3.3 s); an answer of OFF_LOOP_BYTES
    or more is counted in a worker thread, a small one on the loop."""
    import asyncio
    import threading

    from core.types import RequestContext, Usage
    from gateway import pipeline
    from gateway.usage import OFF_LOOP_BYTES

    where: list[bool] = []

    def estimating(ctx, raw):
        where.append(threading.current_thread() is threading.main_thread())
        return Usage(prompt_tokens=1, completion_tokens=2)

    monkeypatch.setattr(pipeline, "estimate_stream_usage" if stream else "estimate_usage", estimating)
    ctx = RequestContext("r", "chat", {"model": "m", "messages": []}, 0.0)
    for size in (OFF_LOOP_BYTES, 100):
        raw = b"a" * size
        if stream:
            asyncio.run(pipeline._estimate_stream(ctx, [raw], size))
        else:
            asyncio.run(pipeline._estimate(ctx, raw))
    assert where == [False, True]
