"""The heavy admin reports' and the erasures' caps hold across replicas (two gateway processes
over one PostgreSQL and one Redis), not per process: N replicas let a tenant run N times its
``server.admin_reports_per_tenant`` reports at once against the one database, and every tenant
N times ``server.admin_reports_total``.

Reports are held running by a table lock a test connection holds (as a long scan would); no
test waits on the clock (bounds in seconds are hang guards only).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
import uuid

import asyncpg
import pytest
import redis

from gateway.admin_reports import Running
from tests.conftest import LOCAL_HTTP, MASTER_KEY, Gateway

RUN = uuid.uuid4().hex[:6]
TENANT = f"cap-{RUN}"
OTHER = f"cap-other-{RUN}"
AGENT = f"bot-{RUN}"
BOUND = 60.0  # seconds: a hang guard only, never a timing assertion


def admin(gw: Gateway, method: str, path: str, key: str = MASTER_KEY, **kw):
    return LOCAL_HTTP.request(
        method, f"{gw.url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=BOUND, **kw
    )


def until_no_live_report_slots(redis_url: str) -> None:
    """Until every tenant's report slots in Redis are free: a slot an earlier module's gateway held
    when it was stopped stays until its lease ends (``admin_reports.LEASE_S``) and would count
    here (one Redis serves the modules of a test process). A leak (a lease renewed on, never
    freed) fails the hang guard."""
    client = redis.Redis.from_url(redis_url)
    try:
        for _ in range(int(BOUND / 0.1)):
            seconds, micros = client.time()
            now_ms = seconds * 1000 + micros // 1000
            if not client.zcount(Running().keys(None)[1], now_ms, "+inf"):
                return
            time.sleep(0.1)
    finally:
        client.close()
    raise AssertionError("report slots in Redis are never freed")


@pytest.fixture(scope="module")
def env(tmp_root, services, module_mock):
    until_no_live_report_slots(services[1])
    cfg = {
        "router": {"max_attempts": 1},
        # a long statement timeout: reports held by the test's lock stay running while it looks
        "server": {"admin_report_timeout_s": 30, "admin_reports_per_tenant": 2, "admin_reports_total": 3},
        "providers": [{"name": "pp", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k"]}],
        "models": [{"name": "cap-model", "deployments": [{"provider": "pp", "model": "m"}]}],
    }
    replicas = [Gateway(tmp_root, cfg, services), Gateway(tmp_root, cfg, services)]
    keys = {}
    for tenant in (TENANT, OTHER):
        body = {"name": f"adm-{tenant}", "tenant": tenant, "scopes": ["admin"]}
        r = admin(replicas[0], "POST", "/admin/keys", json=body)
        assert r.status_code == 201, r.text
        keys[tenant] = r.json()["key"]
        agent = {"name": AGENT, "model": "cap-model", "tenant": tenant, "template": "You answer."}
        assert admin(replicas[0], "POST", "/admin/agents", json=agent).status_code == 201
    for gw in replicas:  # (each replica's first report, before any lock: its pool and caches warm)
        for tenant in (TENANT, OTHER):
            assert admin(gw, "GET", f"/admin/agents/{AGENT}/experiments", keys[tenant]).status_code == 200
    yield {"gws": replicas, "db": services[0], "redis": services[1], "admin": keys}
    for gw in replicas:
        gw.stop()


class Held:
    def __init__(self, database_url: str, sql: str) -> None:
        self.url, self.sql = database_url, sql

    async def __aenter__(self) -> Held:
        self.conn = await asyncpg.connect(self.url)
        self.tx = self.conn.transaction()
        await self.tx.start()
        await self.conn.execute(self.sql)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.tx.rollback()
        await self.conn.close()

    async def until_admitted(self, n: int, running: list, redis_url: str) -> None:
        """Until ``n`` reports hold their slots in Redis (admitted, running: they keep them until
        the lock is gone), or one of ``running`` is answered; a hang guard (the code before the
        fix held no slot in Redis: it fails here)."""
        client = redis.Redis.from_url(redis_url)
        try:
            for _ in range(int(BOUND / 0.05)):
                if any(r.done() for r in running) or client.zcard(Running().keys(None)[1]) >= n:
                    return
                await asyncio.sleep(0.05)
        finally:
            client.close()
        raise AssertionError(f"{n} reports never held their slots")


def _held_while(env, sends: list[tuple[int, str]], then: tuple[int, str]):
    """``sends`` ((replica, tenant) each: its experiments report) held running by a lock on the
    experiments table; ``then`` sent meanwhile: its answer, whether it came while the others
    still waited, and theirs once the lock is gone."""
    path = f"/admin/agents/{AGENT}/experiments"
    gws, keys = env["gws"], env["admin"]

    async def scenario():
        pool = concurrent.futures.ThreadPoolExecutor(len(sends) + 1)
        loop = asyncio.get_running_loop()
        async with Held(env["db"], "LOCK TABLE experiments IN ACCESS EXCLUSIVE MODE") as held:
            running = []
            for i, t in sends:  # (one after the other: each admitted and waiting before the next)
                running.append(loop.run_in_executor(pool, admin, gws[i], "GET", path, keys[t]))
                await held.until_admitted(len(running), running, env["redis"])
            replica, tenant = then
            extra = loop.run_in_executor(pool, admin, gws[replica], "GET", path, keys[tenant])
            # (answered at once when refused; admitted, it waits on the lock with the others)
            await held.until_admitted(len(sends) + 1, [extra], env["redis"])
            answered_while_held = extra.done()
        done = await asyncio.gather(*running)
        last = await extra
        pool.shutdown()
        return answered_while_held, last, done

    return asyncio.run(scenario())


def test_a_tenants_report_cap_holds_across_replicas(env):
    """One report of the tenant on each replica, held running: its third, on either replica, is
    answered 429 ``too_many_reports`` at once (each replica alone ran only one); after, it runs."""
    answered, third, done = _held_while(env, [(0, TENANT), (1, TENANT)], (0, TENANT))
    assert answered and third.status_code == 429, third.text
    assert third.json()["error"]["code"] == "too_many_reports" and third.headers["retry-after"] == "1"
    assert [r.status_code for r in done] == [200, 200]
    assert admin(env["gws"][0], "GET", "/admin/spend", env["admin"][TENANT]).status_code == 200


def test_every_tenants_report_cap_holds_across_replicas(env):
    """Two of a tenant's reports and one of another's across the two replicas fill
    ``server.admin_reports_total`` (3): the other tenant's second, within its own cap, is 429."""
    answered, fourth, done = _held_while(env, [(0, TENANT), (1, TENANT), (1, OTHER)], (0, OTHER))
    assert answered and fourth.status_code == 429, fourth.text
    assert fourth.json()["error"]["code"] == "too_many_reports"
    assert [r.status_code for r in done] == [200, 200, 200]


def test_a_dead_replicas_slots_free_themselves_when_their_leases_end(env):
    """Slots a replica held when it died (their leases ended: here written so) count for nothing;
    a live holder's (a lease not ended) counts."""
    keys = Running().keys(TENANT)
    client = redis.Redis.from_url(env["redis"])
    try:
        for key in keys:
            client.zadd(key, {"dead-1": 1, "dead-2": 2})  # (leases that ended in 1970)
        ok = admin(env["gws"][0], "GET", f"/admin/agents/{AGENT}/experiments", env["admin"][TENANT])
        assert ok.status_code == 200, ok.text
        for key in keys:
            client.zadd(key, {"alive-1": 4e12, "alive-2": 4e12})  # (leases ending long after this test)
        refused = admin(env["gws"][1], "GET", f"/admin/agents/{AGENT}/experiments", env["admin"][TENANT])
        assert refused.status_code == 429, refused.text
    finally:
        for key in keys:
            client.zrem(key, "dead-1", "dead-2", "alive-1", "alive-2")
        client.close()
