"""Attacks on reservation holds and spooled settlements (an independent review): each test failed before its fix."""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import orjson

from core.fastredis import PipelinedRedis
from core.types import Usage
from policies.budgets import NANO
from policies.ledger import LedgerWriter, Spool
from tests.test_admission_credit_attacks import (
    ESTIMATE,
    Replica,
    _priced_route,
    _settle_while_redis_is_away,
    hard_budget,
    stores,
)


async def _settle_fails(r: Replica, ctx) -> bytes:
    """settle with Redis away (what pipeline.settle does then): the spooled line."""
    return await _settle_while_redis_is_away(r, ctx, None)


def test_spooled_settlement_replayed_after_the_hold_is_never_counted(services, tmp_path):
    """A settle Redis did not take, replayed after the reservation's hold is over (an ADMIT
    released it first): SETTLE_LATE finds no member and drops the spend; a hard budget of 2
    estimates then admits 2 more full-cost requests: 3 estimates really spent."""
    budget = hard_budget(2)
    spent_key = budget.keys()[0]

    async def run():
        pool, redis = await stores(services)
        a = Replica(services[1], budget, policies={"local_admission": False, "reservation_hold_s": 0.5})
        await a.start()
        ctx = await a.admit()
        ctx.route, ctx.usage, ctx.status = _priced_route(), Usage(0, 1000), 200  # a full estimate
        line = await _settle_fails(a, ctx)
        spool = Spool(tmp_path / f"ledger-spool-{uuid.uuid4().hex[:6]}-1.jsonl")
        spool.append(line)
        await asyncio.sleep(0.7)  # Redis back after the hold; traffic admits before the spool replays
        others = [await a.admit() for _ in range(2)]
        await LedgerWriter(redis, PipelinedRedis(services[1]), pool, spool)._replay()
        after_replay = int(await redis.get(spent_key) or 0)
        for o in others:
            if o is not None:
                o.route, o.usage, o.status = _priced_route(), Usage(0, 1000), 200
                await a.engine.settle(o, o.extra["attr"], 0.01)
        spent = int(await redis.get(spent_key) or 0)
        rows = await pool.fetchval("SELECT count(*) FROM ledger WHERE request_id = $1", ctx.request_id)
        await a.engine.close()
        await redis.aclose()
        await pool.close()
        return after_replay, sum(o is not None for o in others), spent, rows

    after_replay, admitted_after, spent, rows = asyncio.run(run())
    print(
        f"\nspent after replay={after_replay} (real {ESTIMATE}); admitted after={admitted_after}; "
        f"counter={spent}; really spent={ESTIMATE * (1 + admitted_after)}; limit={2 * ESTIMATE}; ledger rows={rows}"
    )
    assert after_replay == ESTIMATE, "the spooled request's spend was dropped"


def test_a_long_outages_spool_is_applied_in_chunks_once_and_without_refused_requests(services, tmp_path):
    """Every request served or refused while Redis was away is spooled. A refused one has nothing
    to settle (no ``_settle``); the others are applied LATE_CHUNK to a Redis call (one call for
    all of them stalled Redis for seconds), once however often the spool is replayed."""
    from policies.ledger import LATE_CHUNK

    budget = hard_budget(10**6)
    spent_key = budget.keys()[0]

    async def run():
        pool, redis = await stores(services)
        a = Replica(services[1], budget, policies={"local_admission": False})
        await a.start()
        refused = await a.admit()
        refused.status = 503  # (no call, no cost, nothing reserved)
        refused.extra["reserved_nano"] = 0
        assert b'"_settle"' not in await _settle_fails(a, refused)
        ctx = await a.admit()
        ctx.route, ctx.usage, ctx.status = _priced_route(), Usage(0, 1), 200
        line = orjson.loads(await _settle_fails(a, ctx))
        spent, reserved, _, actual, ttl = line["_settle"][1][0]
        n = 2 * LATE_CHUNK + 100
        spool = Spool(tmp_path / f"ledger-spool-{uuid.uuid4().hex[:6]}-1.jsonl")
        for i in range(n):  # as many requests: leased ones (their cost is counted, no reservation)
            settle = [f"{ctx.request_id}-{i}:1", [[spent, reserved, 0, actual, ttl]]]
            rec = {**line, "request_id": f"req_{uuid.uuid4().hex}", "_settle": settle}
            spool.append(orjson.dumps(rec))
        before = await redis.info("commandstats")
        writer = LedgerWriter(redis, PipelinedRedis(services[1]), pool, spool)
        await writer._replay()
        after = await redis.info("commandstats")
        once = int(await redis.get(spent_key) or 0)
        spool.append(orjson.dumps({**rec, "request_id": f"req_{uuid.uuid4().hex}"}))  # one replayed again
        await writer._replay()
        again = int(await redis.get(spent_key) or 0)
        await a.engine.close()
        await redis.aclose()
        await pool.close()
        calls = after.get("cmdstat_eval", {}).get("calls", 0) - before.get("cmdstat_eval", {}).get("calls", 0)
        return n, once, again, calls, actual

    n, once, again, calls, actual = asyncio.run(run())
    assert calls == 3  # 1100 settlements, 500 to a call
    assert once == again == n * actual


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_replay_cut_short_by_the_processes_death_is_never_finished(services, tmp_path):
    """A process dies (SIGKILL, OOM) in the middle of replaying its spool: its records are in
    ``ledger-spool-<pid>.replaying``. No other process ever looks at a .replaying file of a dead
    pid (_orphans globs *.jsonl only): the audit records never reach PostgreSQL and their
    settlements are never applied."""
    budget = hard_budget(100)
    spent_key = budget.keys()[0]

    async def run():
        pool, redis = await stores(services)
        a = Replica(services[1], budget, policies={"local_admission": False})
        await a.start()
        ctx = await a.admit()
        ctx.route, ctx.usage, ctx.status = _priced_route(), Usage(0, 300), 200
        line = await _settle_fails(a, ctx)
        dead = tmp_path / f"ledger-spool-{_dead_pid()}.jsonl"
        Spool(dead).append(line)
        dead.rename(dead.with_suffix(".replaying"))  # where the dead process's replay had got to
        survivor = Spool(tmp_path / f"ledger-spool-{os.getpid()}.jsonl")
        writer = LedgerWriter(redis, PipelinedRedis(services[1]), pool, survivor)
        for _ in range(3):
            await writer._replay()
        rows = await pool.fetchval("SELECT count(*) FROM ledger WHERE request_id = $1", ctx.request_id)
        spent = int(await redis.get(spent_key) or 0)
        left = sorted(p.name for p in tmp_path.iterdir())
        await a.engine.close()
        await redis.aclose()
        await pool.close()
        return rows, spent, left

    rows, spent, left = asyncio.run(run())
    print(f"\nledger rows={rows} spent={spent} files left={left}")
    assert rows == 1 and spent == 300 * NANO // 1_000_000


def test_sound_a_reservation_released_by_its_hold_is_not_released_again_by_its_settle(services):
    budget = hard_budget(10)
    spent_key, reserved_key, _, _ = budget.keys()

    async def run():
        a = Replica(services[1], budget, policies={"local_admission": False, "reservation_hold_s": 0.3})
        await a.start()
        first = await a.admit()
        await asyncio.sleep(0.4)
        second = await a.admit()  # releases first's reservation (hold over), reserves its own
        first.route, first.usage, first.status = _priced_route(), Usage(0, 500), 200
        await a.engine.settle(first, first.extra["attr"], 0.01)
        reserved = int(await a.redis.execute("GET", reserved_key) or 0)
        spent = int(await a.redis.execute("GET", spent_key) or 0)
        await a.engine.close()
        return reserved, spent, second is not None

    reserved, spent, ok = asyncio.run(run())
    assert ok and reserved == ESTIMATE and spent == ESTIMATE // 2, (reserved, spent)


def test_a_replica_whose_clock_runs_ahead_releases_the_others_live_reservations(services):
    """hold_until comes from the admitting replica's clock, 'now' of the release from the next
    admitting replica's: a replica whose clock is ahead by more than the hold releases every
    reservation in flight on the others at once, and a hard budget admits past its limit."""
    from policies import engine as engine_module

    budget = hard_budget(2)
    spent_key = budget.keys()[0]

    async def run():
        pol = {"local_admission": False, "reservation_hold_s": 60}
        a, b = Replica(services[1], budget, policies=pol), Replica(services[1], budget, policies=pol)
        await a.start()
        await b.start()
        in_flight = [await a.admit(), await a.admit()]  # the whole budget, on replica A
        real = time.time

        class Ahead:  # replica B's clock: 61 s ahead
            def __getattr__(self, name):
                return getattr(__import__("time"), name)

            @staticmethod
            def time():
                return real() + 61

        engine_module.time = Ahead()
        try:
            more = [await b.admit(), await b.admit()]
        finally:
            engine_module.time = __import__("time")
        admitted = [c for c in in_flight + more if c is not None]
        for c in admitted:
            c.route, c.usage, c.status = _priced_route(), Usage(0, 1000), 200
            await (a if c in in_flight else b).engine.settle(c, c.extra["attr"], 0.01)
        spent = int(await a.redis.execute("GET", spent_key) or 0)
        await a.engine.close()
        await b.engine.close()
        return len(admitted), spent

    admitted, spent = asyncio.run(run())
    print(f"\nadmitted {admitted} full-estimate requests; spent={spent}, limit={2 * ESTIMATE}")
    assert spent <= 2 * ESTIMATE


def test_a_tag_named_twice_leaks_its_reservation_for_good(services):
    """metadata.tags ["x", "x"] (or x-gateway-labels "x,x"): the tag budget applies twice. ADMIT
    reserves the estimate twice but names one member (same estimate, request id, step); SETTLE
    releases it once (ZREM == 1 once). One estimate stays in <reserved> with no member: no
    hold ever frees it. Repeated, the budget is held by nothing and refuses everyone."""
    from policies.budgets import Budget

    budget = Budget(uuid.uuid4().hex, "t", "tag", "x", 3 * ESTIMATE / NANO, "none", (), None)
    spent_key, reserved_key, _, _ = budget.keys()

    async def run(local: bool):
        from core.types import RequestContext

        a = Replica(services[1], None, policies={"local_admission": local, "reservation_hold_s": 0.2})
        a.engine.budgets.by_scope = {("t", "tag", "x"): [budget]}
        await a.start()

        async def request(tags):
            ctx = RequestContext(uuid.uuid4().hex, "chat", {"model": "priced", "messages": [], "max_tokens": 1000}, 0.0)
            ctx.model, ctx.max_output, ctx._prompt_tokens = "priced", 1000, 0
            attr = {"tenant": "t", "key": None, "user": None, "tags": tags}
            try:
                await a.engine.admit(ctx, attr)
            except Exception as exc:
                return getattr(exc, "code", exc)
            ctx.route, ctx.usage, ctx.status = _priced_route(), Usage(0, 1), 200  # 1 token: cheap
            await a.engine.settle(ctx, attr, 0.01)
            return "ok"

        hostile = [await request(["x", "x"]) for _ in range(3)]
        await asyncio.sleep(0.3)  # every hold is over
        honest = await request(["x"])
        reserved = int(await a.redis.execute("GET", reserved_key) or 0)
        members = int(await a.redis.execute("ZCARD", reserved_key + ":exp"))
        spent = int(await a.redis.execute("GET", spent_key) or 0)
        ttl = int(await a.redis.execute("TTL", reserved_key))
        await a.redis.execute("DEL", reserved_key, spent_key, reserved_key + ":exp")
        await a.engine.close()
        return hostile, honest, reserved, members, spent, ttl

    for local in (False, True):
        hostile, honest, reserved, members, spent, ttl = asyncio.run(run(local))
        print(
            f"\nlocal_admission={local}: hostile={hostile} honest={honest!r} reserved={reserved} "
            f"(members {members}) spent={spent} limit={3 * ESTIMATE} reserved ttl={ttl}s"
        )
    assert honest == "ok"


def test_gateway_a_client_naming_a_tag_twice_locks_the_tag_budget_for_everyone(tmp_root, services, module_mock):
    """The same through a real gateway: a key holder sends a few cheap requests with
    metadata.tags "x,x"; the tag budget (period none) is then refused to every client, for good."""
    import httpx

    from tests.conftest import Gateway
    from tests.test_policies import admin, cfg, new_key

    gw = Gateway(tmp_root, cfg(module_mock), services)
    try:
        tenant = f"t{uuid.uuid4().hex[:6]}"
        tag = f"team-{uuid.uuid4().hex[:6]}"
        hostile, honest = new_key(gw, tenant=tenant), new_key(gw, tenant=tenant)
        b = admin(
            gw,
            "POST",
            "/admin/budgets",
            json={"tenant": tenant, "scope": "tag", "scope_value": tag, "limit_usd": 0.01, "period": "none"},
        )
        assert b.status_code == 201, b.text

        def send(key, tags, max_tokens):
            return httpx.post(
                f"{gw.url}/v1/chat/completions",
                headers={"Authorization": f"Bearer {key['key']}"},
                json={
                    "model": "priced",
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": max_tokens,
                    "metadata": {"tags": tags},
                },
                timeout=30,
            )

        codes = [send(hostile, f"{tag},{tag}", 1600).status_code for _ in range(4)]  # each reserves ~0.0032 USD
        state = admin(gw, "GET", f"/admin/budgets/{b.json()['id']}").json()
        r = send(honest, tag, 300)
        print(
            f"\nhostile: {codes}; budget now {state['spent_usd']:.6f} spent, {state['reserved_usd']:.6f} "
            f"reserved of {state['limit_usd']}; honest request: {r.status_code} {r.text[:160]}"
        )
        assert r.status_code == 200
    finally:
        gw.stop()
