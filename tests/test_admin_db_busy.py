"""An admin change that waits on another transaction's lock past the database driver's
statement timeout (``gateway.db.COMMAND_TIMEOUT_S``, 30 s) is a 503 to try again, not a 500.

It was a 500 with a stack trace in the log: the driver's ``TimeoutError`` reached the admin
app's catch-all. Seen as the s32 review test's flake (a PATCH of an agent waiting on the
tenant's agents lock, held by the test for longer than the timeout, answered 500). The gateway
here is launched with the driver's timeout at a few seconds (``LAUNCHER``), so a lock a test
connection holds outlasts it; the real stack otherwise (embedded PostgreSQL and Valkey)."""

from __future__ import annotations

import asyncio
import textwrap
import uuid

import asyncpg
import httpx
import pytest

from tests.conftest import MASTER_KEY, Gateway

TENANT = f"busy-{uuid.uuid4().hex[:6]}"
TIMEOUT_S = 3  # the launched gateway's statement timeout (a lock held longer outlasts it)

LAUNCHER = textwrap.dedent(
    f"""
    import sys

    from gateway import db

    db.COMMAND_TIMEOUT_S = {TIMEOUT_S}

    from gateway.cli import main

    sys.exit(main())
    """
)


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    config = {
        "router": {"max_attempts": 1},
        "providers": [{"name": "llm", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k"]}],
        "models": [{"name": "agent-model", "deployments": [{"provider": "llm", "model": "m"}]}],
    }
    g = Gateway(tmp_root, config, services, launcher=LAUNCHER, launcher_name="busy_gateway")
    try:
        yield g
    finally:
        g.stop()


def _admin(gw, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, f"{gw.url}{path}", headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=60, **kw)


def _while_locked(gw, dsn: str, key: str, lock: str, args: tuple, call) -> httpx.Response:
    """``call(client)``'s answer while a test connection holds ``lock`` (run with ``args`` in an
    open transaction) until it has answered: only the gateway's timeout ends its wait; bounded."""

    async def go() -> httpx.Response:
        holder = await asyncpg.connect(dsn)
        try:
            async with (
                holder.transaction(),
                httpx.AsyncClient(base_url=gw.url, headers={"Authorization": f"Bearer {key}"}) as client,
            ):
                await holder.execute(lock, *args)
                return await asyncio.wait_for(call(client), 120)
        finally:
            await holder.close()

    return asyncio.run(go())


def _busy(r: httpx.Response) -> None:
    """A 503 ``database_busy`` to try again, no stack trace."""
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "database_busy"), error
    assert int(r.headers["retry-after"]) >= 1
    assert "Traceback" not in r.text


def _tenant_key(gw, prefix: str) -> tuple[str, str]:
    """A client key of a new tenant."""
    tenant = f"{prefix}-{uuid.uuid4().hex[:6]}"
    r = _admin(gw, "POST", "/admin/keys", json={"name": f"k-{uuid.uuid4().hex[:6]}", "tenant": tenant})
    assert r.status_code == 201, r.text
    return tenant, r.json()["key"]


def test_a_change_that_waits_on_a_lock_past_the_statement_timeout_is_a_503_to_try_again(gw, services):
    """Another session holds the tenant's agents lock (``check_agent_room``'s, taken by every
    agent change) until the PATCH has answered: a 503 ``database_busy`` with ``retry-after``, the
    agent as it was; once the lock is free the same PATCH is a 200."""
    name = f"busy-{uuid.uuid4().hex[:6]}"
    body = {"name": name, "tenant": TENANT, "model": "agent-model", "template": "You help.", "description": "before"}
    assert _admin(gw, "POST", "/admin/agents", json=body).status_code == 201
    path = f"/admin/agents/{name}?tenant={TENANT}"

    lock = "SELECT pg_advisory_xact_lock(hashtext('gateway-agents:' || $1))"
    patch = {"description": "after"}
    _busy(_while_locked(gw, services[0], MASTER_KEY, lock, (TENANT,), lambda c: c.patch(path, json=patch, timeout=120)))
    agent = _admin(gw, "GET", f"/admin/agents/{name}", params={"tenant": TENANT}).json()
    assert agent["description"] == "before", agent

    r = _admin(gw, "PATCH", path, json={"description": "after"})
    assert r.status_code == 200, r.text
    assert r.json()["description"] == "after"
    assert "admin API error" not in gw.log()  # (the 500's stack trace)


def test_a_files_upload_that_waits_on_the_storage_lock_past_the_statement_timeout_is_a_503(gw, services):
    """The Files API (its own app) and the main API's catch-all answer the same: another session
    holds the tenant's storage lock (``storage_quota``'s, taken by every upload) until the upload
    has answered: 503 ``database_busy`` with ``retry-after``, no file; once free, a 200."""
    tenant, key = _tenant_key(gw, "busy-files")

    def upload(client):
        return client.post(
            "/v1/files", files={"file": ("notes.txt", b"hello there")}, data={"purpose": "assistants"}, timeout=120
        )

    lock = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))"
    _busy(_while_locked(gw, services[0], key, lock, (f"openai_files:{tenant}",), upload))
    with httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {key}"}) as client:
        assert client.get("/v1/files").json()["data"] == []
        r = upload(client)
        assert r.status_code == 200, r.text
    assert "files / vector stores API error" not in gw.log()  # (the 500's stack trace)


def test_a_feedback_insert_that_waits_past_the_statement_timeout_is_a_503(gw, services):
    """The main API's catch-all (``POST /v1/feedback``, plain ASGI): its insert waits on a table a
    test connection holds locked until the call has answered — 503 ``database_busy``, not a 500."""
    _, key = _tenant_key(gw, "busy-fb")
    vote = {"conversation_id": f"c-{uuid.uuid4().hex[:8]}", "score": 1.0}

    lock = "LOCK TABLE feedback IN ACCESS EXCLUSIVE MODE"
    _busy(_while_locked(gw, services[0], key, lock, (), lambda c: c.post("/v1/feedback", json=vote, timeout=120)))
    r = httpx.post(f"{gw.url}/v1/feedback", json=vote, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert r.status_code == 201, r.text
    assert "unhandled error" not in gw.log()  # (the 500's stack trace)
