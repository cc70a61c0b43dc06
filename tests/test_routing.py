"""Routing that never drops a request: real mock-provider processes with injected faults,
real gateway processes, the OpenAI SDK as the client."""

from __future__ import annotations

import asyncio
import collections
import json
import re
import uuid

import httpx
import openai
import pytest

from tests.conftest import Gateway, MockProvider, run_cli, started

FAST = {
    "backoff": {"base": 0.01, "max": 0.05},
    "circuit": {"failures": 3, "window": 10, "cooldown": 0.5},
    "key_cooldown": 0.5,
    "max_attempts": 8,
}
HELLO = [{"role": "user", "content": "hello"}]


def provider(name: str, mock: MockProvider, keys: list[str] | None = None, kind: str = "openai") -> dict:
    base = f"{mock.url}/v1" if kind == "openai" else mock.url
    # Keys are unique per test: health (cooldowns, circuits) is shared through the suite's Redis.
    return {
        "name": name,
        "kind": kind,
        "base_url": base,
        "api_keys": keys or [f"{name}-{uuid.uuid4().hex[:8]}"],
        "timeouts": {"first_byte": 2, "idle": 2, "total": 10},
    }


def config(providers: list[dict], models: list[dict], **router) -> dict:
    return {"router": {**FAST, **router}, "providers": providers, "models": models}


def sdk(gw: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=30)


def served_by(client: openai.OpenAI, model: str, n: int, **kw) -> collections.Counter:
    seen: collections.Counter = collections.Counter()
    for _ in range(n):
        raw = client.chat.completions.with_raw_response.create(model=model, messages=HELLO, **kw)
        seen[raw.headers["x-gateway-deployment"]] += 1
    return seen


def metric(gw: Gateway, pattern: str) -> float:
    text = httpx.get(f"{gw.url}/metrics").text
    total = 0.0
    for m in re.finditer(pattern + r" ([0-9.e+]+)", text):
        total += float(m.group(1))
    return total


@pytest.fixture(scope="module")
def mocks(tmp_root):
    """healthy, slow, failing half the time, always 429 (with headers), cutting streams before content."""
    procs = {
        "healthy": MockProvider(tmp_root),
        "slow": MockProvider(tmp_root, "--ttft-ms", "40"),
        "flaky": MockProvider(tmp_root, "--fail-rate", "0.5", "--fail-status", "500"),
        "limited": MockProvider(tmp_root, "--fail-rate", "1", "--fail-status", "429", "--retry-after", "1"),
        "cutter": MockProvider(tmp_root, "--cut-after", "1"),
        "broken": MockProvider(tmp_root, "--fail-rate", "1", "--fail-status", "503"),
    }
    yield procs
    for p in procs.values():
        p.stop()


def test_weighted_traffic_shares_follow_the_weights(tmp_root, services, api_key, mocks):
    cfg = config(
        [provider("a", mocks["healthy"]), provider("b", mocks["slow"])],
        [
            {
                "name": "m",
                "deployments": [
                    {"provider": "a", "model": "x", "weight": 3},
                    {"provider": "b", "model": "y", "weight": 1},
                ],
            }
        ],
    )
    with started(Gateway(tmp_root, cfg, services)) as (gw,):
        seen = served_by(sdk(gw, api_key), "m", 400)
    share = seen["a/x"] / 400
    assert 0.67 <= share <= 0.83, seen


def test_two_thousand_requests_through_faulty_providers_with_zero_client_errors(tmp_root, services, api_key, mocks):
    cfg = config(
        [provider(n, mocks[n]) for n in ("healthy", "slow", "flaky", "limited", "cutter")],
        [
            {
                "name": "m",
                "deployments": [
                    {"provider": n, "model": f"model-{n}"} for n in ("healthy", "slow", "flaky", "limited", "cutter")
                ],
            }
        ],
    )
    for m in mocks.values():
        httpx.delete(f"{m.url}/_mock/stats")

    async def run(gw: Gateway) -> tuple[collections.Counter, list]:
        client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=api_key, max_retries=0, timeout=30)
        sem = asyncio.Semaphore(32)
        seen: collections.Counter = collections.Counter()
        errors: list = []

        async def one(i: int) -> None:
            async with sem:
                try:
                    if i % 2:
                        stream = await client.chat.completions.create(model="m", messages=HELLO, stream=True)
                        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
                        assert text == "echo: hello", text
                        seen[stream.response.headers["x-gateway-deployment"]] += 1
                    else:
                        raw = await client.chat.completions.with_raw_response.create(model="m", messages=HELLO)
                        assert raw.parse().choices[0].message.content == "echo: hello"
                        seen[raw.headers["x-gateway-deployment"]] += 1
                except Exception as exc:
                    errors.append(repr(exc))

        await asyncio.gather(*(one(i) for i in range(2000)))
        await client.close()
        return seen, errors

    with started(Gateway(tmp_root, cfg, services)) as (gw,):
        seen, errors = asyncio.run(run(gw))
        assert errors == [], errors[:5]
        assert sum(seen.values()) == 2000
        # Only deployments that can answer do: the always-429 one and the stream cutter never
        # complete a request... except the cutter's non-streamed answers, which it does not cut.
        assert set(seen) <= {"healthy/model-healthy", "slow/model-slow", "flaky/model-flaky", "cutter/model-cutter"}
        assert seen["healthy/model-healthy"] > 300 and seen["slow/model-slow"] > 300
        # The rate-limited key was cooled down instead of being hammered on every request.
        limited = httpx.get(f"{mocks['limited'].url}/_mock/stats").json().get("429", 0)
        assert limited < 200, limited
        assert metric(gw, r'gateway_key_cooldowns_total\{provider="limited",reason="rate_limited"\}') >= 1
        assert metric(gw, r"gateway_retries_total\{model=\"m\"\}") > 0


def test_circuit_opens_then_probes_with_one_request(tmp_root, services, api_key, mocks):
    broken = mocks["broken"]
    cfg = config(
        [provider("bad", broken), provider("good", mocks["healthy"])],
        [
            {
                "name": "m",
                "deployments": [
                    {"provider": "bad", "model": "x", "weight": 100},
                    {"provider": "good", "model": "y", "weight": 1},
                ],
            }
        ],
        circuit={"failures": 3, "window": 30, "cooldown": 1.5},
    )
    with started(Gateway(tmp_root, cfg, services)) as (gw,):
        httpx.delete(f"{broken.url}/_mock/stats")
        client = sdk(gw, api_key)
        seen = served_by(client, "m", 30)
        assert seen == {"good/y": 30}
        failures = httpx.get(f"{broken.url}/_mock/stats").json().get("503", 0)
        assert failures == 3, "after 3 failures the circuit is open and the deployment skipped"
        assert metric(gw, r'gateway_circuit_state\{deployment="bad/x"\}') == 2
        import time

        time.sleep(1.7)  # the cooldown passes: exactly one probe goes to the broken deployment
        served_by(client, "m", 20)
        assert httpx.get(f"{broken.url}/_mock/stats").json().get("503", 0) == 4


def test_rate_limited_key_is_cooled_and_the_next_key_used_at_once(tmp_root, services, api_key):
    mock = MockProvider(tmp_root, "--rpm", "3")
    cfg = config(
        [provider("p", mock, keys=["k1", "k2"])], [{"name": "m", "deployments": [{"provider": "p", "model": "x"}]}]
    )
    with started(mock, Gateway(tmp_root, cfg, services)) as (_, gw):
        client = sdk(gw, api_key)
        attempts = []
        for _ in range(6):
            raw = client.chat.completions.with_raw_response.create(model="m", messages=HELLO)
            attempts.append(int(raw.headers["x-gateway-attempts"]))
        used = collections.Counter(r["headers"]["authorization"] for r in mock.requests())
        assert used == {"Bearer k1": 3, "Bearer k2": 3}, used
        # remaining=0 in the headers already retires a key before it ever returns 429
        assert attempts == [1] * 6
        with pytest.raises(openai.RateLimitError) as exc:
            client.chat.completions.create(model="m", messages=HELLO)
        assert int(exc.value.response.headers["retry-after"]) >= 1


def test_key_rejected_by_provider_is_taken_out_of_rotation(tmp_root, services, api_key):
    mock = MockProvider(tmp_root, "--api-keys", "good-key")
    cfg = config(
        [provider("p", mock, keys=["revoked-key", "good-key"])],
        [{"name": "m", "deployments": [{"provider": "p", "model": "x"}]}],
    )
    with started(mock, Gateway(tmp_root, cfg, services)) as (_, gw):
        served_by(sdk(gw, api_key), "m", 10)
        used = collections.Counter(r["headers"]["authorization"] for r in mock.requests())
        assert used["Bearer revoked-key"] == 1 and used["Bearer good-key"] == 10
        assert metric(gw, r'gateway_key_cooldowns_total\{provider="p",reason="auth_failed"\}') == 1


def test_fallback_chain_serves_when_the_group_fails(tmp_root, services, api_key, mocks):
    cfg = config(
        [provider("bad", mocks["broken"]), provider("good", mocks["healthy"])],
        [
            {"name": "primary", "fallbacks": ["backup"], "deployments": [{"provider": "bad", "model": "x"}]},
            {"name": "backup", "deployments": [{"provider": "good", "model": "y"}]},
        ],
        max_attempts=3,
    )
    with started(Gateway(tmp_root, cfg, services)) as (gw,):
        raw = sdk(gw, api_key).chat.completions.with_raw_response.create(model="primary", messages=HELLO)
        assert raw.headers["x-gateway-deployment"] == "good/y"
        assert int(raw.headers["x-gateway-attempts"]) >= 2
        assert metric(gw, r'gateway_fallbacks_total\{model="primary",to="backup"\}') == 1


def test_streams_fall_back_invisibly_before_the_first_content(tmp_root, services, api_key, mocks):
    cfg = config(
        [provider("cut", mocks["cutter"]), provider("good", mocks["healthy"])],
        [
            {
                "name": "m",
                "deployments": [{"provider": "cut", "model": "x", "weight": 50}, {"provider": "good", "model": "y"}],
            }
        ],
        circuit={"failures": 1000, "window": 10, "cooldown": 1},
    )
    with started(Gateway(tmp_root, cfg, services)) as (gw,):
        client = sdk(gw, api_key)
        for _ in range(10):
            stream = client.chat.completions.create(model="m", messages=HELLO, stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            assert text == "echo: hello"
            assert stream.response.headers["x-gateway-deployment"] == "good/y"


def test_client_errors_are_never_retried(tmp_root, services, api_key):
    mock = MockProvider(tmp_root, "--fail-rate", "1", "--fail-status", "400")
    other = MockProvider(tmp_root)
    cfg = config(
        [provider("p", mock), provider("q", other)],
        [
            {"name": "m", "fallbacks": ["n"], "deployments": [{"provider": "p", "model": "x"}]},
            {"name": "n", "deployments": [{"provider": "q", "model": "y"}]},
        ],
    )
    with started(mock, other, Gateway(tmp_root, cfg, services)) as (_, _, gw):
        with pytest.raises(openai.BadRequestError):
            sdk(gw, api_key).chat.completions.create(model="m", messages=HELLO)
        assert len(mock.requests()) == 1 and other.requests() == []


def test_context_window_errors_take_their_own_chain(tmp_root, services, api_key):
    small = MockProvider(tmp_root, "--fail-rate", "1", "--fail-status", "400", "--fail-code", "context_length_exceeded")
    large = MockProvider(tmp_root)
    cfg = config(
        [provider("s", small), provider("l", large)],
        [
            {"name": "m", "context_window_fallbacks": ["big"], "deployments": [{"provider": "s", "model": "x"}]},
            {"name": "big", "deployments": [{"provider": "l", "model": "y"}]},
        ],
    )
    with started(small, large, Gateway(tmp_root, cfg, services)) as (_, _, gw):
        raw = sdk(gw, api_key).chat.completions.with_raw_response.create(model="m", messages=HELLO)
        assert raw.headers["x-gateway-deployment"] == "l/y"


def test_context_window_is_checked_before_the_call(tmp_root, services, api_key, mocks):
    cfg = config(
        [provider("a", mocks["healthy"]), provider("b", mocks["slow"])],
        [
            {
                "name": "m",
                "deployments": [
                    {"provider": "a", "model": "short", "context_window": 60},
                    {"provider": "b", "model": "long", "context_window": 100000},
                ],
            },
            {"name": "tiny", "deployments": [{"provider": "a", "model": "short", "context_window": 60}]},
        ],
    )
    long_prompt = [{"role": "user", "content": "word " * 200}]
    with started(Gateway(tmp_root, cfg, services)) as (gw,):
        client = sdk(gw, api_key)
        for _ in range(10):
            raw = client.chat.completions.with_raw_response.create(model="m", messages=long_prompt)
            assert raw.headers["x-gateway-deployment"] == "b/long"
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="tiny", messages=long_prompt)
        assert exc.value.code == "context_length_exceeded"


def test_zdr_key_never_reaches_a_deployment_without_it(tmp_root, services, mocks):
    out = run_cli("keys", "create", "--name", "zdr-only", "--require-tag", "zdr", urls=services, tmp=tmp_root)
    key = out.stdout.split()[0]
    cfg = config(
        [provider("a", mocks["healthy"]), provider("b", mocks["slow"])],
        [
            {
                "name": "m",
                "deployments": [
                    {"provider": "a", "model": "plain", "weight": 10},
                    {"provider": "b", "model": "private", "tags": ["zdr"]},
                ],
            },
            {"name": "nozdr", "deployments": [{"provider": "a", "model": "plain"}]},
        ],
    )
    with started(Gateway(tmp_root, cfg, services)) as (gw,):
        client = sdk(gw, key)
        assert served_by(client, "m", 20) == {"b/private": 20}
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="nozdr", messages=HELLO)
        assert exc.value.code == "no_deployment_meets_constraints" and "zdr" in exc.value.message


def test_strategies_cost_latency_usage_and_per_request_override(tmp_root, services, api_key, mocks):
    cheap = {"input_cost_per_token": 1e-7, "output_cost_per_token": 2e-7}
    pricey = {"input_cost_per_token": 5e-6, "output_cost_per_token": 1e-5}
    limited = MockProvider(tmp_root, "--rpm", "1000")
    roomy = MockProvider(tmp_root, "--rpm", "100000")
    # Slower than the module's "slow" (40 ms): on a loaded machine the healthy mock's own answer
    # can take 40 ms now and then, and the latency strategy would then rightly prefer the other.
    slower = MockProvider(tmp_root, "--ttft-ms", "250")
    cfg = config(
        [
            provider("fast", mocks["healthy"]),
            provider("slow", slower),
            provider("lim", limited),
            provider("roomy", roomy),
        ],
        [
            {
                "name": "by-cost",
                "strategy": "cost",
                "deployments": [
                    {"provider": "fast", "model": "p", **pricey},
                    {"provider": "slow", "model": "c", **cheap},
                ],
            },
            {
                "name": "by-latency",
                "strategy": "latency",
                "deployments": [{"provider": "fast", "model": "f"}, {"provider": "slow", "model": "s"}],
            },
            {
                "name": "by-usage",
                "strategy": "usage",
                "deployments": [{"provider": "lim", "model": "l"}, {"provider": "roomy", "model": "r"}],
            },
        ],
        latency_exploration=0.05,
    )
    with started(limited, roomy, slower, Gateway(tmp_root, cfg, services)) as (_, _, _, gw):
        client = sdk(gw, api_key)
        assert served_by(client, "by-cost", 10) == {"slow/c": 10}
        latency = served_by(client, "by-latency", 60)
        assert latency["fast/f"] >= 45, latency
        usage = served_by(client, "by-usage", 30)
        assert usage["roomy/r"] >= 25, usage
        override = served_by(client, "by-cost", 10, extra_headers={"x-gateway-strategy": "latency"})
        assert override["fast/p"] >= 8, override
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="by-cost", messages=HELLO, extra_headers={"x-gateway-strategy": "x"})
        assert exc.value.body["param"] == "x-gateway-strategy"


def test_rules_choose_the_group_from_the_request(tmp_root, services, api_key, mocks):
    m = mocks["healthy"]
    cfg = config(
        [provider("p", m)],
        [
            {
                "name": "auto",
                "rules": [
                    {"when": {"metadata": {"task": "classify"}}, "use": "cheap"},
                    {"when": {"has_tools": True}, "use": "tools"},
                    {"when": {"prompt_tokens_over": 100}, "use": "long"},
                    {"use": "general"},
                ],
            },
            *[
                {"name": n, "deployments": [{"provider": "p", "model": f"{n}-model"}]}
                for n in ("cheap", "tools", "long", "general")
            ],
        ],
    )
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with started(Gateway(tmp_root, cfg, services)) as (gw,):
        client = sdk(gw, api_key)

        def deployment(**kw) -> str:
            kw.setdefault("messages", HELLO)
            return client.chat.completions.with_raw_response.create(model="auto", **kw).headers["x-gateway-deployment"]

        assert deployment(metadata={"task": "classify"}) == "p/cheap-model"
        assert deployment(tools=[tool]) == "p/tools-model"
        assert deployment(messages=[{"role": "user", "content": "many words here " * 60}]) == "p/long-model"
        assert deployment() == "p/general-model"


def test_a_cooldown_seen_by_one_replica_is_honoured_by_another(tmp_root, services, api_key):
    mock = MockProvider(tmp_root, "--fail-rate", "1", "--fail-status", "429", "--retry-after", "30")
    cfg = config([provider("p", mock)], [{"name": "m", "deployments": [{"provider": "p", "model": "x"}]}])
    with started(mock, Gateway(tmp_root, cfg, services), Gateway(tmp_root, cfg, services)) as (_, a, b):
        with pytest.raises(openai.RateLimitError):
            sdk(a, api_key).chat.completions.create(model="m", messages=HELLO)
        assert len(mock.requests()) == 1

        def b_refuses_without_calling() -> bool:
            try:
                sdk(b, api_key).chat.completions.create(model="m", messages=HELLO)
            except openai.APIStatusError as exc:
                return exc.status_code == 429 and int(exc.response.headers["retry-after"]) > 20
            return False

        from tests.conftest import wait_until

        wait_until(b_refuses_without_calling, timeout=5, what="replica b to learn the cooldown")
        assert len(mock.requests()) == 1, "replica b must not hammer the rate-limited key"
        # A replica that starts later learns it from Redis.
        with started(Gateway(tmp_root, cfg, services)) as (c,):
            with pytest.raises(openai.RateLimitError):
                sdk(c, api_key).chat.completions.create(model="m", messages=HELLO)
        assert len(mock.requests()) == 1


def test_broken_stream_after_content_still_accounts_usage(tmp_root, services, api_key):
    mock = MockProvider(tmp_root, "--cut-after", "4", "--chunks", "8")
    cfg = config([provider("p", mock)], [{"name": "m", "deployments": [{"provider": "p", "model": "x"}]}])
    with started(mock, Gateway(tmp_root, cfg, services)) as (_, gw):
        with pytest.raises(openai.APIError):
            for _ in sdk(gw, api_key).chat.completions.create(
                model="m",
                stream=True,
                messages=[{"role": "user", "content": "one two three four five six"}],
                extra_headers={"x-request-id": "broken-usage"},
            ):
                pass

        def line() -> dict | None:
            for entry in gw.log().splitlines():
                if "broken-usage" in entry and entry.startswith("{"):
                    return json.loads(entry)
            return None

        from tests.conftest import wait_until

        wait_until(lambda: line() is not None, timeout=5, what="log line")
        entry = line()
        assert entry["usage_estimated"] is True
        assert entry["prompt_tokens"] > 0 and entry["completion_tokens"] > 0
        assert metric(gw, r'gateway_tokens_total\{kind="completion",model="m",provider="p"\}') > 0
