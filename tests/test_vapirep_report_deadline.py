"""An experiments report is answered within ``server.admin_report_timeout_s`` as a whole, and an
experiment's stop builds its report under the same bound.

The bound was per statement: a report of ten experiments runs four statements each, so it held a
pooled connection up to forty times the bound; and the stop of an experiment built its report in
its own transaction with no bound at all (a tenant admin's stops held the pool as long as a scan
took). Now the whole answer has one deadline; a stop past it is answered 503 and changes nothing.

Statements are held by table locks a test connection holds (as a long scan would). The
scenarios read how long a statement has waited on PostgreSQL's clock, with margins of 2 s for the
cut to be seen (the bound here: 4 s); bounds in seconds elsewhere are hang guards only.
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from tests.conftest import LOCAL_HTTP, MASTER_KEY, Gateway

RUN = uuid.uuid4().hex[:6]
TENANT = f"dl-{RUN}"
AGENT = f"bot-{RUN}"
BOUND = 60.0  # seconds: a hang guard only
TIMEOUT_S = 4  # server.admin_report_timeout_s (a cut is seen 2 s late at most: a loaded host)


def admin(gw: Gateway, method: str, path: str, key: str = MASTER_KEY, **kw):
    return LOCAL_HTTP.request(
        method, f"{gw.url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=BOUND, **kw
    )


@pytest.fixture(scope="module")
def env(tmp_root, services, module_mock):
    cfg = {
        "router": {"max_attempts": 1},
        "server": {"admin_report_timeout_s": TIMEOUT_S},
        "providers": [{"name": "pp", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k"]}],
        "models": [{"name": "dl-model", "deployments": [{"provider": "pp", "model": "m"}]}],
    }
    gw = Gateway(tmp_root, cfg, services)
    r = admin(gw, "POST", "/admin/keys", json={"name": f"adm-{RUN}", "tenant": TENANT, "scopes": ["admin"]})
    assert r.status_code == 201, r.text
    key = r.json()["key"]
    base = f"/admin/agents/{AGENT}"
    body = {"name": AGENT, "model": "dl-model", "tenant": TENANT, "template": "You answer."}
    assert admin(gw, "POST", "/admin/agents", json=body).status_code == 201
    assert admin(gw, "POST", f"{base}/versions", key, json={"template": "You answer briefly."}).status_code == 201
    r = admin(gw, "PUT", f"{base}/labels/ab", key, json={"variants": {"1": 50, "2": 50}})
    assert r.status_code == 200, r.text
    yield {"gw": gw, "db": services[0], "key": key}
    gw.stop()


class Locked:
    """A test connection holding ``LOCK TABLE <table>`` in an open transaction."""

    def __init__(self, db: str, table: str) -> None:
        self.db, self.table = db, table

    async def start(self) -> Locked:
        self.conn = await asyncpg.connect(self.db)
        self.tx = self.conn.transaction()
        await self.tx.start()
        await self.conn.execute(f"LOCK TABLE {self.table} IN ACCESS EXCLUSIVE MODE")
        return self

    async def release(self) -> None:
        if not self.conn.is_closed():
            await self.tx.rollback()
            await self.conn.close()

    async def until_waited(self, seconds: float, request: asyncio.Future) -> None:
        """Until a session has waited on this lock ``seconds`` (PostgreSQL's clock), or ``request``
        is answered; a hang guard."""
        sql = """SELECT count(*) FROM pg_stat_activity a WHERE $1 = ANY (pg_blocking_pids(a.pid))
                   AND clock_timestamp() - a.query_start > make_interval(secs => $2)"""
        for _ in range(int(BOUND / 0.05)):
            if request.done() or await self.conn.fetchval(sql, self.conn.get_server_pid(), seconds):
                return
            await asyncio.sleep(0.05)
        raise AssertionError("nothing waited on the lock")


def test_an_experiments_report_is_answered_within_the_timeout_as_a_whole(env):
    """Its ledger statement waits 2.4 s (of the 4 s), then its feedback statement waits on: cut
    within the 4 s of the whole (503 ``report_timeout``, ≤ 1.6 s into that wait; looked at after
    3.6 s), not after 4 s more of its own."""
    gw, key = env["gw"], env["key"]

    async def scenario():
        ledger = await Locked(env["db"], "ledger").start()
        report = asyncio.ensure_future(
            asyncio.to_thread(admin, gw, "GET", f"/admin/agents/{AGENT}/experiments?label=ab", key)
        )
        await ledger.until_waited(TIMEOUT_S * 0.6, report)
        feedback = await Locked(env["db"], "feedback").start()
        await ledger.release()
        # (its feedback statement alone: past the whole's end by 2 s, within its own 4 s)
        await feedback.until_waited(TIMEOUT_S * 0.9, report)
        answered_meanwhile = report.done()
        await feedback.release()
        return answered_meanwhile, await report

    answered, r = asyncio.run(scenario())
    assert answered and r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "report_timeout"
    assert admin(gw, "GET", f"/admin/agents/{AGENT}/experiments?label=ab", key).status_code == 200


def test_an_experiments_stop_that_cannot_build_its_report_in_time_is_503_and_changes_nothing(env):
    """The stop's report reads the ledger, held locked: answered 503 ``report_timeout`` within the
    bound (before: it waited as long as the lock was held), the experiment still running and its
    label unchanged; once the lock is gone the stop succeeds."""
    gw, key = env["gw"], env["key"]
    stop = f"/admin/agents/{AGENT}/experiments/ab/stop"

    async def scenario():
        ledger = await Locked(env["db"], "ledger").start()
        stopping = asyncio.ensure_future(asyncio.to_thread(admin, gw, "POST", stop, key, json={"promote": 2}))
        await ledger.until_waited(TIMEOUT_S + 1, stopping)
        answered_meanwhile = stopping.done()
        await ledger.release()
        return answered_meanwhile, await stopping

    answered, r = asyncio.run(scenario())
    assert answered and r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "report_timeout"
    reports = admin(gw, "GET", f"/admin/agents/{AGENT}/experiments?label=ab", key).json()["data"]
    assert [x["stopped_at"] for x in reports] == [None]  # (still running)
    done = admin(gw, "POST", stop, key, json={"promote": 2})
    assert done.status_code == 200 and done.json()["promoted"] == "2", done.text
