"""An idempotent request that outlived its claim with no repeat in between (an independent review found it)."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import redis.asyncio as aioredis

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


def test_a_tenants_stored_answers_are_bounded_in_bytes_oldest_evicted_first(tmp_root, services, module_mock):
    """Every answer to a request with an Idempotency-Key was kept for the whole ttl (a day),
    whatever their number: a client sending one key per request (our channel workers do) grew
    Redis by every answer — the Redis budgets and rate limits need. A tenant's answers are
    bounded in bytes: the oldest are evicted first (a retry of one runs again, as after the
    ttl), the newest still replay, another tenant's answers are not touched, and an answer
    larger than the whole bound is not stored (its key released: no 409, a retry runs)."""
    bound = 6000
    g = Gateway(tmp_root, {**_config(module_mock), "server": {"idempotency_max_bytes_per_tenant": bound}}, services)
    try:
        tenant_a = new_key(g, tenant=f"a-{uuid.uuid4().hex[:6]}")["key"]
        tenant_b = new_key(g, tenant=f"b-{uuid.uuid4().hex[:6]}")["key"]

        def send(k, idem, text):
            body = {"model": "m", "messages": [{"role": "user", "content": text}]}
            headers = {"Authorization": f"Bearer {k}", "Idempotency-Key": idem}
            r = httpx.post(f"{g.url}/v1/chat/completions", json=body, headers=headers, timeout=30)
            assert r.status_code == 200, r.text
            return r

        run = uuid.uuid4().hex[:8]
        b_first = send(tenant_b, f"b-{run}", f"tenant b {run}")
        filler = "x" * 400  # each answer echoes it: ~1 KB stored
        first = [send(tenant_a, f"a-{run}-{i}", f"{i} {run} {filler}") for i in range(20)]
        calls = _calls(module_mock)
        last = send(tenant_a, f"a-{run}-19", f"19 {run} {filler}")
        assert last.headers.get("x-gateway-idempotent-replay") == "true", "the newest answer was not kept"
        again = send(tenant_a, f"a-{run}-0", f"0 {run} {filler}")
        assert again.headers.get("x-gateway-idempotent-replay") is None, "the oldest answer outlived the bound"
        assert _calls(module_mock) == calls + 1 and again.json()["id"] != first[0].json()["id"]
        b_again = send(tenant_b, f"b-{run}", f"tenant b {run}")
        assert b_again.headers.get("x-gateway-idempotent-replay") == "true", "another tenant's answer was evicted"
        assert b_again.json()["id"] == b_first.json()["id"]

        huge = f"huge {run} " + "y" * (bound * 2)
        send(tenant_a, f"a-{run}-huge", huge)
        calls = _calls(module_mock)
        retry = send(tenant_a, f"a-{run}-huge", huge)  # released, not held as in progress
        assert retry.headers.get("x-gateway-idempotent-replay") is None and _calls(module_mock) == calls + 1
    finally:
        g.stop()


def test_an_answer_larger_than_the_bound_evicts_none_of_the_tenants_other_answers(tmp_root, services, module_mock):
    """An answer larger than the whole bound can never be stored, yet the store script first
    evicted the tenant's stored answers (up to 100) to make room, then refused it: one long
    answer wiped every other retry's answer of the tenant (their retries ran the model again)."""
    bound = 6000
    g = Gateway(tmp_root, {**_config(module_mock), "server": {"idempotency_max_bytes_per_tenant": bound}}, services)
    try:
        k = new_key(g, tenant=f"h-{uuid.uuid4().hex[:6]}")["key"]
        run = uuid.uuid4().hex[:8]

        def send(idem, text):
            body = {"model": "m", "messages": [{"role": "user", "content": text}]}
            headers = {"Authorization": f"Bearer {k}", "Idempotency-Key": idem}
            r = httpx.post(f"{g.url}/v1/chat/completions", json=body, headers=headers, timeout=30)
            assert r.status_code == 200, r.text
            return r

        small = send(f"s-{run}", f"small {run}")
        send(f"h-{run}", f"huge {run} " + "y" * (bound * 2))  # not stored: larger than the bound
        calls = _calls(module_mock)
        again = send(f"s-{run}", f"small {run}")
        assert again.headers.get("x-gateway-idempotent-replay") == "true", "the huge answer evicted the small one"
        assert again.json()["id"] == small.json()["id"] and _calls(module_mock) == calls
    finally:
        g.stop()


def test_the_byte_count_does_not_outlive_the_tenants_index(services):
    """A store refused at the bound (100 evictions were not enough) wrote the tenant's byte
    count with a fresh ttl but left the index's expiry as it was: when the index expired, the
    count still held the bytes of answers no longer in it, and every store after (each
    refreshing it again) was refused or counted them — the tenant locked out of storing answers
    for as long as it kept sending them, though nothing of its was stored."""
    from types import SimpleNamespace

    from gateway.idempotency import Idempotency

    async def main():
        cap = 40_000
        cfg = SimpleNamespace(idempotency_ttl_s=3, idempotency_lock_s=3, idempotency_max_bytes_per_tenant=cap)
        idem = Idempotency(services[1], cfg)
        redis = aioredis.from_url(services[1])
        run = uuid.uuid4().hex
        tenant = f"gw:{{gw}}:idem-tenant:{run[:32]}"
        key = f"gw:{{gw}}:idem:{run}:"

        async def store(name: str, size: int) -> None:
            await idem._store(key + name, tenant, b"P-marker", "h", 200, [], False, b"x" * size)

        try:
            for i in range(150):  # 150 answers of ~250 bytes
                await store(f"s{i}", 200)
            await asyncio.sleep(1.2)  # (each answer expires 3 s after it was stored, the index with the last)
            await store("big", cap - 5000)  # 100 evicted, 50 left: still no room, refused
            assert await redis.exists(key + "big") == 0
            deadline = asyncio.get_running_loop().time() + 10
            while await redis.exists(tenant + ":index"):  # every answer expired, the index with them
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.05)
            await store("after", cap - 5000)  # nothing of the tenant is stored: it fits
            assert await redis.exists(key + "after") == 1, "refused: the count kept the bytes of expired answers"
        finally:
            await redis.aclose()
            await idem.close()

    asyncio.run(main())


def test_evicting_an_expired_entry_does_not_delete_a_newer_answer_under_the_same_key(services):
    """The index still held an expired answer's entry (at most 100 leave it a call, and the
    index lives while the tenant stores) when the same key was answered again (a client may
    reuse a key after the ttl): the eviction loop reached the stale entry and deleted the key —
    the newer, live answer — though forgetting the expired entries alone made room. Its retry
    ran the model again."""
    from types import SimpleNamespace

    from gateway.idempotency import Idempotency

    async def main():
        cap, ttl = 200_000, 3
        cfg = SimpleNamespace(idempotency_ttl_s=ttl, idempotency_lock_s=ttl, idempotency_max_bytes_per_tenant=cap)
        idem = Idempotency(services[1], cfg)
        redis = aioredis.from_url(services[1])
        run = uuid.uuid4().hex
        tenant = f"gw:{{gw}}:idem-tenant:{run[:32]}"
        index = tenant + ":index"
        key = f"gw:{{gw}}:idem:{run}:"

        async def store(name: str, size: int) -> None:
            await idem._store(key + name, tenant, b"P-marker", "h", 200, [], False, b"x" * size)

        async def until(check) -> None:
            deadline = asyncio.get_running_loop().time() + 10
            while not await check():
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.05)

        try:
            for i in range(350):  # they expire first: ahead of the key's entry in the index
                await store(f"f{i}", 100)
            last_filler = max(score for _, score in await redis.zrange(index, 0, -1, withscores=True))
            await asyncio.sleep(1.1)
            await store("k", 300)

            async def fillers_expired():
                return (await redis.time())[0] >= last_filler

            async def first_answer_gone():
                return not await redis.exists(key + "k")

            await until(fillers_expired)  # (the key's answer not yet)
            await store("x", 100)  # (the tenant keeps storing: its index lives on; 100 entries go)
            assert await redis.exists(key + "k"), "too slow: the key's first answer expired before x was stored"
            await until(first_answer_gone)
            await store("k", 500)  # the key answered again; 100 more go: 150 fillers, the stale entry remain
            fresh = await redis.get(key + "k")
            assert fresh is not None and await redis.exists(key + "x"), "too slow: the live answers expired"
            live = await redis.strlen(key + "x") + len(fresh)
            overhead = len(fresh) - 500
            # 100 fillers leave the index, then the eviction loop meets 50 and the stale entry:
            # forgetting them makes room, no live answer need go
            await store("big", cap - live - overhead - 10)
            assert await redis.exists(key + "big") == 1
            assert await redis.get(key + "k") == fresh, "the live answer was deleted for an expired entry"
        finally:
            await redis.aclose()
            await idem.close()

    asyncio.run(main())


def test_a_shorter_ttl_elsewhere_does_not_drop_longer_lived_answers_from_the_bound(services):
    """Two gateway processes with different ``idempotency_ttl_s`` (a rollout that lowers it): a
    store by the shorter one set the tenant's index and count to expire with its own answer, so
    the longer-lived answers, still in Redis, left the count: the tenant then stored up to a
    whole further bound beside them, past its bound, until they expired."""
    from types import SimpleNamespace

    from gateway.idempotency import Idempotency

    async def main():
        cap = 50_000
        long = Idempotency(services[1], SimpleNamespace(idempotency_ttl_s=30, idempotency_max_bytes_per_tenant=cap))
        short = Idempotency(services[1], SimpleNamespace(idempotency_ttl_s=1, idempotency_max_bytes_per_tenant=cap))
        redis = aioredis.from_url(services[1])
        run = uuid.uuid4().hex
        tenant = f"gw:{{gw}}:idem-tenant:{run[:32]}"
        key = f"gw:{{gw}}:idem:{run}:"

        async def store(idem, name: str, size: int) -> None:
            await idem._store(key + name, tenant, b"P-marker", "h", 200, [], False, b"x" * size)

        try:
            await store(long, "a", 30_000)  # lives 30 s
            await store(short, "b", 100)  # lives 1 s
            await asyncio.sleep(2.1)
            await store(long, "c", 30_000)  # with a, past the bound: a (the oldest) must go
            stored = sum([await redis.strlen(key + n) for n in ("a", "b", "c")])
            assert stored <= cap, f"{stored} bytes stored for a bound of {cap}"
        finally:
            await redis.aclose()
            await long.close()
            await short.close()

    asyncio.run(main())
