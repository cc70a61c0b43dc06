"""Attacks on admission credit (policies/credit.py): two PolicyEngines — two replicas — over the
embedded Valkey, driven request by request so each interleaving is exact."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import httpx
import orjson
import pytest
from redis.exceptions import RedisError

from core.config import parse_config
from core.fastredis import PipelinedRedis
from core.types import RequestContext, Route
from policies.budgets import NANO, Budget, BudgetCache
from policies.engine import PolicyEngine
from tests.conftest import Gateway, wait_until
from tests.test_policies import admin, cfg, new_key

ESTIMATE = 1000 * NANO // 1_000_000  # 1000 output tokens at 1e-6 USD (prompts are free)


class Replica:
    def __init__(self, redis_url: str, budget: Budget | None, **config) -> None:
        data = {"policies": {"lease_requests": 4, "lease_headroom": 4}, **config}
        self.redis = PipelinedRedis(redis_url)
        cache = BudgetCache(None, None)
        if budget is not None:
            cache.by_scope = {(budget.tenant, budget.scope, budget.scope_value): [budget]}
        self.engine = PolicyEngine(parse_config(data), self.redis, cache, router=None)
        for model in ("priced", "metered"):
            self.engine._prices[model] = (0.0, 1e-6)

    async def start(self) -> None:  # the renewer is driven by hand (engine.credit.renew())
        await self.engine.start()
        if self.engine.credit is not None:
            self.engine.credit._task.cancel()

    async def admit(self, model: str = "priced", user: str | None = None) -> RequestContext | None:
        ctx = RequestContext(uuid.uuid4().hex, "chat", {"model": model, "messages": [], "max_tokens": 1000}, 0.0)
        ctx.model = model
        ctx.max_output = 1000
        ctx._prompt_tokens = 0
        attr = {"tenant": "t", "key": None, "user": user, "tags": []}
        ctx.extra["attr"] = attr
        try:
            await self.engine.admit(ctx, attr)
        except Exception as exc:  # refused
            if getattr(exc, "status", 0) == 429:
                return None
            raise
        return ctx


def hard_budget(limit_estimates: int) -> Budget:
    return Budget(uuid.uuid4().hex, "t", "tenant", "t", limit_estimates * ESTIMATE / NANO, "daily", (), None)


async def lease_value(redis: PipelinedRedis, replica: Replica, budget: Budget) -> int:
    own = replica.engine.credit.lease_keys(budget.keys()[1])[1]
    return int(await redis.execute("GET", own) or 0)


def test_attack_a_request_that_takes_no_lease_still_counts_every_replicas_lease(services):
    """A request that cannot lease (a tokens-per-minute limit, a small rpm, a replica with
    local admission off) must count the budget's leases like any other check: else the budget
    leased to replica A is admitted again by replica B, and spend passes a hard limit."""
    budget = hard_budget(40)

    async def run() -> tuple[int, int]:
        limits = {"limits": {"model": {"metered": {"tpm": 10**9}}}}
        a, b = Replica(services[1], budget, **limits), Replica(services[1], budget, **limits)
        await a.start()
        await b.start()
        # A leases (1 request + 4 of credit), and admits 4 more from it: 5 estimates in flight.
        held = [await a.admit() for _ in range(5)]
        assert all(held) and a.engine.credit.local_admits == 4
        # B's requests under a tokens-per-minute limit cannot lease; they go to Redis each time.
        admitted = 0
        for _ in range(45):
            if await b.admit("metered") is not None:
                admitted += 1
        await a.engine.close()
        await b.engine.close()
        return len(held), admitted

    in_flight, admitted = asyncio.run(run())
    assert in_flight + admitted <= 40, (in_flight, admitted)


def test_attack_renewal_never_deletes_or_lowers_a_lease_granted_after_it_looked(services):
    """The renewer decides (delete an idle lease key, or set it to what is still needed) and an
    ADMIT that grants a new lease may reach Redis before the renewer's command: the lease must
    still be counted afterwards, or the replica admits from credit no other replica sees."""
    budget = hard_budget(1000)

    async def run() -> tuple[int, int]:
        a = Replica(services[1], budget)
        await a.start()
        credit = a.engine.credit
        first = await a.admit()  # a lease
        await a.engine.settle(first, first.extra["attr"], 0.0)
        for c in credit.budgets.values():
            c.expires = 0.0  # its credit has expired: the lease is idle, the renewer deletes it
        renew = asyncio.ensure_future(credit.renew())
        admit = asyncio.ensure_future(a.admit())  # runs right after the renewer looked
        await asyncio.gather(renew, admit)
        assert admit.result() is not None
        (c,) = credit.budgets.values()
        need = c.remaining + c.outstanding
        value = await lease_value(a.redis, a, budget)
        await a.engine.close()
        return need, value

    need, value = asyncio.run(run())
    assert need > 0
    assert value >= need, (need, value)


def test_attack_concurrent_lease_requests_of_one_replica_are_all_counted(services):
    """Several ADMITs of one replica asking for a lease at once (its credit ran out under load):
    each script must count what the others already hold, and the lease key must hold every
    one of their requests."""
    budget = hard_budget(1000)

    async def run() -> tuple[int, int]:
        a = Replica(services[1], budget)
        await a.start()
        credit = a.engine.credit
        ctxs = await asyncio.gather(*(a.admit() for _ in range(6)))
        assert all(ctxs)
        (c,) = credit.budgets.values()
        need = c.remaining + c.outstanding
        value = await lease_value(a.redis, a, budget)
        await a.engine.close()
        return need, value

    need, value = asyncio.run(run())
    assert value >= need, (need, value)


def test_attack_renewer_keeps_a_lease_alive_while_lease_requests_are_always_in_flight(services):
    """Near the limit no lease is granted, so only the renewer refreshes a lease key that still
    holds requests in flight; it must not skip a key because an ADMIT is on its way."""
    budget = hard_budget(17)  # room for one lease of 4, then none

    async def run() -> int:
        a = Replica(services[1], budget)
        await a.start()
        credit = a.engine.credit
        assert await a.admit() is not None  # a lease; its request stays in flight
        for c in credit.budgets.values():
            c.expires = 0.0  # its credit expired: the next request asks Redis (and gets no lease)
        own = credit.lease_keys(budget.keys()[1])[1]
        await a.redis.execute("PEXPIRE", own, 300)  # about to expire unless renewed
        asking = asyncio.ensure_future(a.admit())  # an ADMIT on its way while the renewer runs
        await asyncio.sleep(0)
        await credit.renew()
        await asyncio.sleep(0.5)
        await asking
        value = await lease_value(a.redis, a, budget)
        await a.engine.close()
        return value

    assert asyncio.run(run()) > 0


def test_attack_varying_user_does_not_drain_a_shared_rate_window_with_leases(services):
    """A caller that names a new end user on every request (a fresh per-user window, never any
    credit for it) sends every request to Redis: each must not lease the shared (model) window
    again and throw the previous lease away, or one key burns the model's limit for everyone
    at five (33 by default) times its request rate."""

    async def run() -> int:
        model = f"m{uuid.uuid4().hex[:6]}"
        a = Replica(services[1], None, limits={"user": {"rpm": 1000}, "model": {model: {"rpm": 1000}}})
        a.engine._prices[model] = (0.0, 0.0)
        await a.start()
        for i in range(10):
            assert await a.admit(model, user=f"u{i}") is not None
        slot = int(time.time() * 1000) // 60_000
        counted = 0
        for s in (slot - 1, slot):
            counted += int(await a.redis.execute("GET", f"gw:{{gw}}:rl:model:{model}:r:{s}") or 0)
        await a.engine.close()
        return counted

    counted = asyncio.run(run())
    assert counted <= 10 + 4, counted  # the 10 requests, and at most one lease of 4


def test_attack_a_request_in_flight_at_the_period_rollover_settles_where_it_reserved(services, monkeypatch):
    """A request admitted before midnight and settled after it: its reservation (or lease) is
    released where it was made. Released from the new period's counter instead, it frees room
    other requests hold there (a hard budget then admits past its limit), and the old lease
    keeps the request in flight forever (renewed, and counted, until the process ends)."""
    budget = hard_budget(1000)

    async def run() -> tuple[int, int, int]:
        plain = Replica(services[1], budget, policies={"local_admission": False})
        leasing = Replica(services[1], budget)
        await plain.start()
        await leasing.start()
        before = [await plain.admit(), await leasing.admit()]
        assert before[1].extra.get("leased")
        real = Budget.keys

        def tomorrow(self, now=None):
            return real(self, (now or datetime.now(UTC)) + timedelta(days=1))

        monkeypatch.setattr(Budget, "keys", tomorrow)
        new_reserved = budget.keys()[1]
        await plain.redis.execute("SET", new_reserved, 3 * ESTIMATE)  # the new day's requests in flight
        for replica, ctx in zip((plain, leasing), before, strict=True):
            await replica.engine.settle(ctx, ctx.extra["attr"], 0.0)
        held_new = int(await plain.redis.execute("GET", new_reserved) or 0)
        monkeypatch.setattr(Budget, "keys", real)
        held_old = int(await plain.redis.execute("GET", budget.keys()[1]) or 0)
        outstanding = sum(c.outstanding for c in leasing.engine.credit.budgets.values())
        await plain.engine.close()
        await leasing.engine.close()
        return held_new, held_old, outstanding

    held_new, held_old, outstanding = asyncio.run(run())
    assert (held_new, held_old, outstanding) == (3 * ESTIMATE, 0, 0)


def test_attack_credit_granted_under_a_higher_limit_admits_nothing_once_it_is_lowered(services):
    """An admin lowers a budget (to what is already held) and a model's requests per minute (to
    what is already counted): a replica holding credit granted under the old limits must not
    admit from it any more."""
    budget = hard_budget(1000)

    async def refused(r: Replica, n: int, model: str = "priced") -> int:
        return [await r.admit(model) for _ in range(n)].count(None)

    async def run() -> tuple[int, int]:
        a = Replica(services[1], budget)
        await a.start()
        assert await a.admit() is not None  # a lease of 4 requests' estimates
        lowered = Budget(budget.id, "t", "tenant", "t", ESTIMATE / NANO, "daily", (), None)
        a.engine.budgets.by_scope = {("t", "tenant", "t"): [lowered]}
        budget_refused = await refused(a, 3)
        await a.engine.close()

        model = f"m{uuid.uuid4().hex[:6]}"
        b = Replica(services[1], None, limits={"model": {model: {"rpm": 100_000}}})
        await b.start()
        assert await b.admit(model) is not None  # a lease of 4 requests
        b.engine.limits = parse_config({"limits": {"model": {model: {"rpm": 64}}}}).limits
        slot = int(time.time() * 1000) // 60_000
        for s in (slot, slot + 1):  # 64 counted (this minute and the next, should it turn meanwhile)
            await b.redis.execute("SET", f"gw:{{gw}}:rl:model:{model}:r:{s}", 64, "PX", 180_000)
        rate_refused = await refused(b, 3, model)
        await b.engine.close()
        return budget_refused, rate_refused

    assert asyncio.run(run()) == (3, 3)


def test_attack_a_stream_abandoned_before_its_end_is_still_charged(tmp_root, services, module_mock):
    """A client that reads a stream's answer and hangs up before its end (before the usage
    chunk and [DONE]) must still pay for what it was sent: settled with no usage, the request
    cost nothing, and any budget could be read through for free one stream at a time."""
    gw = Gateway(tmp_root, cfg(module_mock), services)
    try:
        key = new_key(gw, budget_usd=1.0, budget_period="daily")
        content = "a b c d e f g h i j k l m n o p " + '[[mock:{"chunk_ms": 150, "chunks": 16}]]'
        body = orjson.dumps(
            {"model": "priced", "stream": True, "max_tokens": 64, "messages": [{"role": "user", "content": content}]}
        )
        sock = socket.create_connection(("127.0.0.1", gw.port))
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + key["key"].encode() + b"\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        seen = b""
        while seen.count(b'"content"') < 4:  # part of the answer
            seen += sock.recv(65536)
        sock.close()

        def budget() -> dict:
            return admin(gw, "GET", f"/admin/budgets/{key['budget_id']}").json()

        wait_until(lambda: budget()["reserved_usd"] == 0 and budget()["leased_usd"] == 0, timeout=15, what="settled")
        assert budget()["spent_usd"] > 0
    finally:
        gw.stop()


def test_attack_embeddings_input_with_more_tokens_than_its_character_estimate_cannot_pass_a_hard_budget(
    tmp_root, services, module_mock
):
    """ "a a a ..." is a token every two characters (emoji, several a character): reserved at a
    third of its characters, one embeddings request costs more than its reservation and spend
    passes a hard budget. Under a hard budget the reservation is an upper bound (a token per
    UTF-8 byte at most)."""
    config = cfg(module_mock)
    config["models"].append(
        {
            "name": "emb",
            "mode": "embedding",
            "deployments": [{"provider": "pp", "model": "e", "input_cost_per_token": 1e-6}],
        }
    )
    gw = Gateway(tmp_root, config, services)
    try:
        key = new_key(gw, budget_usd=0.0025, budget_period="daily")  # 2500 tokens
        r = httpx.post(  # 6000 characters, reserved as 2003 tokens; 3000 tokens
            f"{gw.url}/v1/embeddings",
            headers={"Authorization": f"Bearer {key['key']}"},
            json={"model": "emb", "input": "a " * 3000},
        )
        assert r.status_code in (200, 429), r.text
        state = admin(gw, "GET", f"/admin/budgets/{key['budget_id']}").json()
        assert state["spent_usd"] <= 0.0025, state
    finally:
        gw.stop()


def _priced_route() -> Route:
    return Route("priced", "pp", "pp/m", "m", None, state=SimpleNamespace(input_cost=0.0, output_cost=1e-6))


def test_a_settle_redis_did_not_take_counts_its_spend_and_frees_its_reservation_once_when_the_spool_replays(
    services, tmp_path
):
    """Redis away at settle time: the record was spooled and written to PostgreSQL later, but
    the spend never reached the budget's counter (a budget overshot by it) and the reservation
    held budget until the period ended. The spooled record now carries the settlement, applied
    once when the spool replays — however often the replay runs."""

    from policies.ledger import LedgerWriter, Spool

    budget = hard_budget(100)
    spent_key, reserved_key, _, _ = budget.keys()

    async def run():
        pool, redis = await stores(services)
        a = Replica(services[1], budget, policies={"local_admission": False})
        await a.start()
        ctx = await a.admit()
        assert int(await redis.get(reserved_key)) == ESTIMATE
        line = await _settle_while_redis_is_away(a, ctx)
        spool = Spool(tmp_path / f"ledger-spool-{uuid.uuid4().hex[:6]}-1.jsonl")
        spool.append(line)
        writer = LedgerWriter(redis, PipelinedRedis(services[1]), pool, spool)
        await writer._replay()
        first = (int(await redis.get(spent_key) or 0), int(await redis.get(reserved_key) or 0))
        spool.append(line)  # the same record again (a replay that stopped before unlinking)
        await writer._replay()
        second = (int(await redis.get(spent_key) or 0), int(await redis.get(reserved_key) or 0))
        rows = await pool.fetchval("SELECT count(*) FROM ledger WHERE request_id = $1", ctx.request_id)
        left = await redis.zcard(f"{reserved_key}:exp")
        await a.engine.close()
        await redis.aclose()
        await pool.close()
        return first, second, rows, left

    first, second, rows, left = asyncio.run(run())
    assert first == (300 * NANO // 1_000_000, 0), first  # spend counted, reservation freed
    assert second == first  # not twice
    assert rows == 1 and left == 0


async def stores(services):
    """A pool over the migrated database, and a redis-py client (the caller closes both)."""
    import asyncpg
    import redis.asyncio as aioredis

    from gateway.db import migrate

    pool = await asyncpg.create_pool(services[0], min_size=1, max_size=2)
    async with pool.acquire() as conn:
        await migrate(conn)
    return pool, aioredis.from_url(services[1])


async def _settle_while_redis_is_away(a: Replica, ctx: RequestContext, completion_tokens: int | None = 300) -> bytes:
    """Settles ``ctx`` (``completion_tokens`` output tokens of the priced model, unless None)
    over a connection to a port nobody listens on; returns the record the gateway spools for it
    (gateway/pipeline.py)."""
    from core.types import Usage

    if completion_tokens is not None:
        ctx.route, ctx.usage, ctx.status = _priced_route(), Usage(0, completion_tokens), 200
    live = a.engine._redis
    a.engine._redis = PipelinedRedis(f"redis://127.0.0.1:{_closed_port()}", timeout=0.5)
    try:
        with pytest.raises(RedisError):
            await a.engine.settle(ctx, ctx.extra["attr"], 0.01)
    finally:
        a.engine._redis = live
    return a.engine.spooled(ctx, ctx.extra["attr"], 0.01)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_leased_requests_spooled_settlement_is_applied_once_even_when_postgres_fails_after_it(services, tmp_path):
    """A leased request's settlement cannot be checked against a reservation (its estimate was in
    the replica's lease): it is counted when the spool replays, and the spool forgets it before
    writing to PostgreSQL, so a replay that fails there and runs again counts it once."""
    import asyncpg

    from policies.ledger import LedgerWriter, Spool

    budget = hard_budget(1000)
    spent_key = budget.keys()[0]

    async def run():
        pool, redis = await stores(services)
        a = Replica(services[1], budget)
        await a.start()
        ctx = await a.admit()
        assert ctx.extra.get("leased")
        line = await _settle_while_redis_is_away(a, ctx)
        spool = Spool(tmp_path / f"ledger-spool-{uuid.uuid4().hex[:6]}-1.jsonl")
        spool.append(line)
        closed = await asyncpg.create_pool(services[0], min_size=1, max_size=1)
        await closed.close()  # PostgreSQL "away": the replay stops after the settlement
        try:
            await LedgerWriter(redis, PipelinedRedis(services[1]), closed, spool)._replay()
            raise AssertionError("the replay wrote to a closed pool")
        except asyncpg.InterfaceError:
            pass
        once = int(await redis.get(spent_key) or 0)
        await LedgerWriter(redis, PipelinedRedis(services[1]), pool, spool)._replay()
        again = int(await redis.get(spent_key) or 0)
        rows = await pool.fetchval("SELECT count(*) FROM ledger WHERE request_id = $1", ctx.request_id)
        await a.engine.close()
        await redis.aclose()
        await pool.close()
        return once, again, rows

    once, again, rows = asyncio.run(run())
    assert once == again == 300 * NANO // 1_000_000 and rows == 1
