"""Attacks a client can make with nothing but HTTP (issue #11, items 3, 4, 5, 6, 13, 20).

Each test is one attack (or one failure a client could exploit), against real gateway
processes over the embedded PostgreSQL and Valkey. Where the database's side matters, the
gateway reaches PostgreSQL through ``PgProxy``, a unix-socket relay that records the statements
it carries and can cut the database off. Clients at other addresses are real connections from
other loopback addresses (127.0.0.2, ...).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
import threading
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import asyncpg
import httpx
import pytest

from tests.conftest import MASTER_KEY, Gateway, MockProvider, wait_until

HELLO = [{"role": "user", "content": "hello"}]
GATEWAY_ID = re.compile(r"req_[0-9a-f]{28}")


def is_key_lookup(query: str) -> bool:
    return "api_keys" in query and "key_hash" in query


def is_readiness(query: str) -> bool:
    return query.strip() == "SELECT 1"


# ---- helpers ------------------------------------------------------------------------------------
def sql(database_url: str, query: str, *args) -> list:
    async def go():
        conn = await asyncpg.connect(database_url)
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()

    return asyncio.run(go())


def make_key(database_url: str, *, tenant: str = "default", **settings) -> dict:
    """A virtual key as the admin API stores it (hashed), with ``settings`` as its metadata."""
    key = "sk-gw-" + secrets.token_urlsafe(32)
    key_id = "key_" + secrets.token_hex(8)
    sql(
        database_url,
        "INSERT INTO api_keys (id, name, tenant, key_hash, key_prefix, metadata) VALUES ($1, $2, $3, $4, $5, $6)",
        key_id,
        f"attack-{key_id}",
        tenant,
        hashlib.sha256(key.encode()).hexdigest(),
        key[:10],
        json.dumps(settings),
    )
    return {"key": key, "id": key_id}


def call(
    gw: Gateway,
    key: str | None,
    path: str = "/v1/chat/completions",
    *,
    body: dict | None = None,
    headers: dict | None = None,
    source: str | None = None,
    method: str | None = None,
) -> httpx.Response:
    """One request, from ``source`` (a local address) when given."""
    h = {"Authorization": f"Bearer {key}"} if key else {}
    h.update(headers or {})
    if body is None and path == "/v1/chat/completions":
        body = {"model": "gpt-mock", "messages": HELLO}
    transport = httpx.HTTPTransport(local_address=source) if source else None
    with httpx.Client(transport=transport, timeout=30) as c:
        return c.request(method or ("POST" if body is not None else "GET"), f"{gw.url}{path}", json=body, headers=h)


def openai_error(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def mock_models(mock: MockProvider) -> Counter:
    return Counter(r["body"].get("model") for r in mock.requests())


class PgProxy:
    """A relay between a gateway and the embedded PostgreSQL (a unix socket of its own).

    It reads the frontend protocol the gateway sends, so it can count how often a statement was
    executed (``executed``), and ``cut`` makes the database unreachable (open connections are
    dropped, new ones closed at once) until ``restore``."""

    def __init__(self, database_url: str, where: Path) -> None:
        url = urlparse(database_url)
        real_dir = parse_qs(url.query)["host"][0]
        self._real = next(str(p) for p in Path(real_dir).glob(".s.PGSQL.*") if not p.name.endswith(".lock"))
        where.mkdir(parents=True, exist_ok=True)
        self._path = str(where / Path(self._real).name)
        self.url = database_url.replace(f"host={real_dir}", f"host={where}")
        self.down = False
        self._queries: Counter = Counter()
        self._writers: set = set()
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        threading.Thread(target=self._run, args=(started,), daemon=True).start()
        started.wait(10)

    def executed(self, statement) -> int:
        """How often statements for which ``statement(query)`` holds were executed."""
        return sum(n for q, n in list(self._queries.items()) if statement(q))

    def cut(self) -> None:
        self.down = True
        self._loop.call_soon_threadsafe(self._drop_all)

    def restore(self) -> None:
        self.down = False

    def close(self) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)

    def _drop_all(self) -> None:
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(asyncio.start_unix_server(self._serve, path=self._path))
        started.set()
        self._loop.run_forever()

    async def _serve(self, reader, writer) -> None:
        if self.down:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(self._real)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def downstream() -> None:
            try:
                while data := await up_reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (OSError, ConnectionError):
                pass
            finally:
                writer.transport.abort()

        task = asyncio.ensure_future(downstream())
        buf = b""
        started = False
        statements: dict[bytes, str] = {}
        try:
            while data := await reader.read(65536):
                up_writer.write(data)
                await up_writer.drain()
                buf += data
                while True:  # frontend messages: untyped until the startup packet, then typed
                    if not started:
                        if len(buf) < 8:
                            break
                        n = int.from_bytes(buf[:4], "big")
                        if len(buf) < n:
                            break
                        code = int.from_bytes(buf[4:8], "big")
                        buf = buf[n:]
                        started = code not in (80877103, 80877104)  # SSL / GSS requests come first
                        continue
                    if len(buf) < 5:
                        break
                    kind, n = buf[:1], int.from_bytes(buf[1:5], "big")
                    if len(buf) < 1 + n:
                        break
                    payload, buf = buf[5 : 1 + n], buf[1 + n :]
                    if kind == b"P":  # Parse: statement name, query
                        name, _, rest = payload.partition(b"\0")
                        statements[name] = rest.partition(b"\0")[0].decode(errors="replace")
                    elif kind == b"B":  # Bind: portal, statement — one execution
                        stmt = payload.partition(b"\0")[2].partition(b"\0")[0]
                        self._queries[statements.get(stmt, "?")] += 1
                    elif kind == b"Q":
                        self._queries[payload.rstrip(b"\0").decode(errors="replace")] += 1
        except (OSError, ConnectionError):
            pass
        finally:
            up_writer.transport.abort()
            writer.transport.abort()
            task.cancel()


def provider(name: str, mock: MockProvider) -> dict:
    return {
        "name": name,
        "kind": "openai",
        "base_url": f"{mock.url}/v1",
        "api_keys": [f"{name}-{uuid.uuid4().hex[:8]}"],
        "timeouts": {"first_byte": 3, "idle": 3, "total": 10},
    }


def basic_config(mock: MockProvider, **extra) -> dict:
    return {
        "router": {"max_attempts": 1},
        "providers": [provider("p", mock)],
        "models": [{"name": "gpt-mock", "deployments": [{"provider": "p", "model": "mock-gpt"}]}],
        **extra,
    }


@pytest.fixture(scope="module")
def amock(tmp_root):
    m = MockProvider(tmp_root)
    yield m
    m.stop()


# ---- item 3: the ledger's key is the gateway's own request id -----------------------------------
def test_item3_client_request_id_cannot_overwrite_audit_record(gateway, services):
    """Reusing one x-request-id used to keep one ledger row (ON CONFLICT DO NOTHING on the
    client's id): the client erased its own audit records, and could collide with another
    tenant's. Every request now has the gateway's id; the client's is stored beside it."""
    a = make_key(services[0], tenant=f"t3a-{uuid.uuid4().hex[:6]}")
    b = make_key(services[0], tenant=f"t3b-{uuid.uuid4().hex[:6]}")
    mine = f"dup-{uuid.uuid4().hex[:8]}"
    ids = []
    for key in (a, a, b):
        resp = call(gateway, key["key"], headers={"x-request-id": mine})
        assert resp.status_code == 200, resp.text
        assert GATEWAY_ID.fullmatch(resp.headers["x-request-id"]), resp.headers
        assert resp.headers["x-client-request-id"] == mine
        ids.append(resp.headers["x-request-id"])
    assert len(set(ids)) == 3

    def rows() -> list:
        return sql(services[0], "SELECT * FROM ledger WHERE client_request_id = $1", mine)

    wait_until(lambda: len(rows()) == 3, timeout=15, what="three ledger rows for one client request id")
    found = rows()
    assert {r["request_id"] for r in found} == set(ids)
    assert sorted(r["key_id"] for r in found) == sorted([a["id"], a["id"], b["id"]])


def test_item3_client_request_id_is_echoed_and_audited_on_refusals_too(gateway, services):
    mine = f"refused-{uuid.uuid4().hex[:8]}"
    key = make_key(services[0], models=["embed-mock"])
    resp = call(gateway, key["key"], headers={"x-client-request-id": mine})  # gpt-mock: not allowed
    assert resp.status_code == 403 and resp.headers["x-client-request-id"] == mine
    assert GATEWAY_ID.fullmatch(resp.headers["x-request-id"])
    wait_until(
        lambda: sql(services[0], "SELECT 1 FROM ledger WHERE client_request_id = $1", mine),
        timeout=15,
        what="ledger row of the refused request",
    )
    row = sql(services[0], "SELECT * FROM ledger WHERE client_request_id = $1", mine)[0]
    assert row["request_id"] == resp.headers["x-request-id"] and row["status"] == 403
    # Unauthenticated requests and the other endpoints echo it as well.
    for path in ("/v1/chat/completions", "/v1/models", "/healthz", "/nowhere"):
        r = call(gateway, "sk-wrong", path, headers={"x-client-request-id": mine})
        assert r.headers["x-client-request-id"] == mine and GATEWAY_ID.fullmatch(r.headers["x-request-id"])


# ---- item 4: metric labels and log lines ---------------------------------------------------------
def _series(text: str, metric: str) -> set[str]:
    return {line.split(" ")[0] for line in text.splitlines() if line.startswith(metric + "{")}


def test_item4_unique_model_names_do_not_grow_metrics_or_logs(gateway, api_key):
    """A unique (and huge) model name per request used to become a metric label and a whole log
    field before it was validated: /metrics grew without bound."""
    call(gateway, api_key, body={"model": "warm-up-unknown", "messages": HELLO})
    before = httpx.get(f"{gateway.url}/metrics").text
    tag = uuid.uuid4().hex[:8]
    names = [f"flood-{tag}-{i}" for i in range(30)] + [f"flood-{tag}-big-{i}-" + "x" * 1_000_000 for i in range(3)]
    for i, name in enumerate(names):
        resp = call(
            gateway,
            api_key,
            body={"model": name, "messages": HELLO},
            headers={"x-client-request-id": f"flood-{tag}-{i}"},
        )
        assert resp.status_code == 404
        err = openai_error(resp)
        assert err["code"] == "model_not_found" and len(err["message"]) < 300
    after = httpx.get(f"{gateway.url}/metrics").text
    assert f"flood-{tag}" not in after
    for metric in ("gateway_requests_total", "gateway_request_duration_seconds_count"):
        assert _series(after, metric) == _series(before, metric), metric
    assert 'model="unknown"' in after

    def lines() -> list[str]:
        return [line for line in gateway.log().splitlines() if f'"client_request_id":"flood-{tag}-' in line]

    wait_until(lambda: len(lines()) == len(names), timeout=10, what="access-log lines")
    for line in lines():
        assert len(line) < 2000, line[:200]
        assert len(json.loads(line)["model"]) < 300


# ---- item 5: a key's model allow-list holds for every group that serves it ----------------------
@pytest.fixture(scope="module")
def allow(tmp_root, services):
    """``premium`` runs on a mock of its own, so whether it was reached is plain to see."""
    ok, slow, broken, premium = (
        MockProvider(tmp_root),
        MockProvider(tmp_root, "--ttft-ms", "300"),
        MockProvider(tmp_root, "--fail-rate", "1", "--fail-status", "503"),
        MockProvider(tmp_root),
    )
    cfg = {
        "router": {"max_attempts": 4, "backoff": {"base": 0.01, "max": 0.02}, "circuit": {"failures": 1000}},
        "providers": [
            provider("ok", ok),
            provider("slow", slow),
            provider("broken", broken),
            provider("gold", premium),
        ],
        "models": [
            {
                "name": "cheap",
                "deployments": [{"provider": "slow", "model": "cheap-up", "context_window": 200}],
                "fallbacks": ["premium"],
                "context_window_fallbacks": ["premium"],
            },
            {"name": "flaky", "deployments": [{"provider": "broken", "model": "flaky-up"}], "fallbacks": ["premium"]},
            {"name": "premium", "deployments": [{"provider": "gold", "model": "premium-up"}]},
            {"name": "basic", "deployments": [{"provider": "ok", "model": "basic-up"}]},
            {
                "name": "router",
                "rules": [{"when": {"metadata": {"tier": "gold"}}, "use": "premium"}, {"use": "basic"}],
            },
            {"name": "gold-only", "rules": [{"when": {"metadata": {"tier": "gold"}}, "use": "premium"}]},
        ],
    }
    gw = Gateway(tmp_root, cfg, services)
    key = make_key(services[0], models=["cheap", "flaky", "basic", "router", "gold-only"])["key"]
    yield gw, key, premium
    gw.stop()
    for m in (ok, slow, broken, premium):
        m.stop()


def _chat(gw: Gateway, key: str, model: str, messages=HELLO, headers=None, **body) -> httpx.Response:
    return call(gw, key, body={"model": model, "messages": messages, **body}, headers=headers)


def test_item5_disallowed_fallback_is_never_served_when_the_provider_fails(allow):
    gw, key, premium = allow
    premium.clear()
    resp = _chat(gw, key, "flaky")
    assert resp.status_code in (502, 503), resp.text
    assert mock_models(premium) == {}
    # The same request with an unrestricted key does fall back (the trigger works).
    resp = _chat(gw, MASTER_KEY, "flaky")
    assert resp.status_code == 200 and resp.headers["x-gateway-deployment"] == "gold/premium-up"


def test_item5_disallowed_fallback_is_not_reached_through_a_latency_header(allow):
    """``x-gateway-max-latency-ms`` below the group's recent latency makes it unfit, so the
    request falls back. (The bound sits between cheap's 300 ms+ and premium's few ms, so premium
    would fit: with ``1`` it would depend on whether premium has a latency recorded yet.)"""
    gw, key, premium = allow
    assert _chat(gw, key, "cheap").status_code == 200  # the deployment now has a latency (300 ms+)
    premium.clear()
    resp = _chat(gw, key, "cheap", headers={"x-gateway-max-latency-ms": "150"})
    assert resp.status_code == 400 and openai_error(resp)["code"] == "no_deployment_meets_constraints"
    assert mock_models(premium) == {}
    resp = _chat(gw, MASTER_KEY, "cheap", headers={"x-gateway-max-latency-ms": "150"})
    assert resp.status_code == 200 and resp.headers["x-gateway-deployment"] == "gold/premium-up"


def test_item5_disallowed_fallback_is_not_reached_through_an_oversized_prompt(allow):
    gw, key, premium = allow
    long = [{"role": "user", "content": "many words here " * 200}]  # beyond cheap's 200-token window
    premium.clear()
    resp = _chat(gw, key, "cheap", messages=long)
    assert resp.status_code == 400 and openai_error(resp)["code"] == "context_length_exceeded"
    assert mock_models(premium) == {}
    resp = _chat(gw, MASTER_KEY, "cheap", messages=long)
    assert resp.status_code == 200 and resp.headers["x-gateway-deployment"] == "gold/premium-up"


def test_item5_disallowed_rule_target_is_passed_over_for_rule_metadata(allow):
    """A rule whose target the key may not use is passed over (the next rule that matches
    serves); when none is left, 403 model_not_allowed."""
    gw, key, premium = allow
    premium.clear()
    resp = _chat(gw, key, "router", metadata={"tier": "gold"})
    assert resp.status_code == 200 and resp.headers["x-gateway-deployment"] == "ok/basic-up"
    resp = _chat(gw, key, "gold-only", metadata={"tier": "gold"})
    assert resp.status_code == 403 and openai_error(resp)["code"] == "model_not_allowed"
    assert mock_models(premium) == {}
    resp = _chat(gw, MASTER_KEY, "router", metadata={"tier": "gold"})
    assert resp.status_code == 200 and resp.headers["x-gateway-deployment"] == "gold/premium-up"
    resp = _chat(gw, key, "premium")
    assert resp.status_code == 403 and openai_error(resp)["code"] == "model_not_allowed"


# ---- item 6: unauthenticated load ----------------------------------------------------------------
@pytest.fixture(scope="module")
def pg_gateway(tmp_root, services, amock):
    proxy = PgProxy(services[0], tmp_root / f"pgp-{uuid.uuid4().hex[:6]}")
    cfg = basic_config(
        amock,
        server={"failed_auth_per_minute": 1, "failed_auth_burst": 5, "readiness_interval": 30},
    )
    gw = Gateway(tmp_root, cfg, (proxy.url, services[1]))
    yield gw, proxy
    gw.stop()
    proxy.close()


def test_item6_unknown_bearer_tokens_are_limited_per_address_without_database_queries(pg_gateway, services):
    gw, proxy = pg_gateway
    bystander = make_key(services[0])  # used from the attacker's address before the attack
    assert call(gw, bystander["key"], source="127.0.0.2").status_code == 200
    before = proxy.executed(is_key_lookup)
    statuses = [call(gw, f"sk-gw-bogus-{i}-{uuid.uuid4().hex}", source="127.0.0.2").status_code for i in range(40)]
    assert statuses[:5] == [401] * 5 and set(statuses[5:]) == {429}, statuses
    assert proxy.executed(is_key_lookup) - before == 5  # the burst, then no query at all
    limited = call(gw, "sk-gw-bogus-once-more", source="127.0.0.2")
    err = openai_error(limited)
    assert limited.status_code == 429 and err["type"] == "rate_limit_error" and int(limited.headers["retry-after"]) >= 1
    # No lock-out: a key never seen before works from another address, and a known key keeps
    # working even from the attacker's.
    fresh = make_key(services[0])
    assert call(gw, fresh["key"], source="127.0.0.3").status_code == 200
    assert call(gw, bystander["key"], source="127.0.0.2").status_code == 200
    # A repeated unknown token is answered from the negative cache: one query, not one each.
    before = proxy.executed(is_key_lookup)
    for _ in range(10):
        assert call(gw, "sk-gw-same-wrong-key", source="127.0.0.4").status_code == 401
    assert proxy.executed(is_key_lookup) - before == 1


def test_item6_readyz_costs_one_database_round_trip_per_interval(pg_gateway):
    gw, proxy = pg_gateway
    before = proxy.executed(is_readiness)

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as c:
            return [r.status_code for r in await asyncio.gather(*(c.get(f"{gw.url}/readyz") for _ in range(200)))]

    assert set(asyncio.run(burst())) == {200}
    assert proxy.executed(is_readiness) - before <= 1


def test_item6_negative_cache_evicts_least_recently_used_not_everything(services, monkeypatch):
    """In process, over the real database: at its bound the negative cache drops the oldest
    entry, not all of them (which let a flood of unique tokens undo it)."""
    import policies.auth as auth
    from core.config import Config

    monkeypatch.setattr(auth, "_NEGATIVE_MAX", 10)
    lookups = Counter()
    real = auth.find_active

    async def counted(pool, key_hash):
        lookups[key_hash] += 1
        return await real(pool, key_hash)

    monkeypatch.setattr(auth, "find_active", counted)

    async def main() -> None:
        pool = await asyncpg.create_pool(services[0], min_size=1, max_size=2)
        try:
            a = auth.Authenticator(pool, None, None, Config())
            tokens = [f"sk-gw-unknown-{i}-{uuid.uuid4().hex}" for i in range(11)]
            for t in tokens:
                with pytest.raises(auth.Unauthenticated):
                    await a.authenticate(f"Bearer {t}".encode())
            for t in tokens[1:]:  # the ten most recent are still known to be unknown
                with pytest.raises(auth.Unauthenticated):
                    await a.authenticate(f"Bearer {t}".encode())
            assert sum(lookups.values()) == 11
            with pytest.raises(auth.Unauthenticated):
                await a.authenticate(f"Bearer {tokens[0]}".encode())  # the oldest was evicted
            assert sum(lookups.values()) == 12
        finally:
            await pool.close()

    asyncio.run(main())


# ---- item 13: cached keys have a bounded lifetime ------------------------------------------------
@pytest.fixture(scope="module")
def short_lived(tmp_root, services, amock):
    proxy = PgProxy(services[0], tmp_root / f"pgq-{uuid.uuid4().hex[:6]}")
    cfg = basic_config(amock, server={"key_cache_ttl": 1, "key_cache_grace": 5})
    gw = Gateway(tmp_root, cfg, (proxy.url, services[1]))
    yield gw, proxy
    gw.stop()
    proxy.close()


def test_item13_revocation_missed_by_a_process_takes_effect_within_the_key_lifetime(short_lived, services):
    gw, _ = short_lived
    key = make_key(services[0])
    assert call(gw, key["key"]).status_code == 200  # cached
    # Revoked in the database only: no pub/sub message, no version bump — a missed revocation.
    sql(services[0], "UPDATE api_keys SET revoked_at = now() WHERE id = $1", key["id"])
    wait_until(lambda: call(gw, key["key"]).status_code == 401, timeout=20, what="the revoked key refused")
    assert openai_error(call(gw, key["key"]))["code"] == "invalid_api_key"


def test_item13_database_down_serves_cached_keys_for_the_grace_then_fails_closed(short_lived, services):
    gw, proxy = short_lived
    key = make_key(services[0])
    other = make_key(services[0])
    assert call(gw, key["key"]).status_code == 200
    warning = "key store unreachable; serving a cached key"
    seen: list[int] = []
    proxy.cut()
    try:
        # A key never seen cannot be checked: refused with 503, not served, not a 500.
        unknown = call(gw, other["key"])
        assert unknown.status_code == 503 and openai_error(unknown)["code"] == "key_store_unavailable"

        def refused() -> bool:
            seen.append(call(gw, key["key"]).status_code)
            return seen[-1] == 503

        wait_until(refused, timeout=30, what="the cached key refused once its grace ran out")
        assert warning in gw.log()  # its lifetime ran out with the database down: grace, logged
        assert set(seen[:-1]) == {200}, seen  # served until then, never a 401 or a 500
        assert openai_error(call(gw, key["key"]))["code"] == "key_store_unavailable"
    finally:
        proxy.restore()
    wait_until(lambda: call(gw, key["key"]).status_code == 200, timeout=20, what="the key served again")


# ---- item 20: IP allow-lists, X-Forwarded-For only from trusted proxies --------------------------
@pytest.fixture(scope="module")
def ipgw(tmp_root, services, amock):
    tenant = f"ipt-{uuid.uuid4().hex[:6]}"
    cfg = basic_config(
        amock,
        server={"trusted_proxies": ["127.0.0.1/32"]},
        tenants={tenant: {"allowed_ips": ["127.0.0.2/32", "10.20.0.0/16"]}},
    )
    gw = Gateway(tmp_root, cfg, services)
    yield gw, tenant
    gw.stop()


def test_item20_key_allow_list_refuses_other_addresses(ipgw, services):
    gw, _ = ipgw
    key = make_key(services[0], allowed_ips=["127.0.0.5/32", "2001:db8::/32"])["key"]
    assert call(gw, key, source="127.0.0.5").status_code == 200
    for path in ("/v1/chat/completions", "/v1/models", "/v1/models/gpt-mock"):
        resp = call(gw, key, path, source="127.0.0.6")
        assert resp.status_code == 403, (path, resp.text)
        err = openai_error(resp)
        assert err["code"] == "ip_not_allowed" and err["type"] == "permission_error"
    emb = call(gw, key, "/v1/embeddings", body={"model": "gpt-mock", "input": "x"}, source="127.0.0.6")
    assert emb.status_code == 403 and openai_error(emb)["code"] == "ip_not_allowed"


def test_item20_tenant_allow_list_applies_to_every_key_of_the_tenant(ipgw, services):
    gw, tenant = ipgw
    key = make_key(services[0], tenant=tenant)["key"]
    assert call(gw, key, source="127.0.0.2").status_code == 200
    resp = call(gw, key, source="127.0.0.7")
    assert resp.status_code == 403 and openai_error(resp)["code"] == "ip_not_allowed"
    # Both lists must admit the address: the key's own cannot widen its tenant's.
    wide = make_key(services[0], tenant=tenant, allowed_ips=["127.0.0.0/8"])["key"]
    assert call(gw, wide, source="127.0.0.7").status_code == 403
    assert call(gw, MASTER_KEY, source="127.0.0.7").status_code == 200  # the super-admin has no tenant


def test_item20_forwarded_for_is_believed_only_from_trusted_proxies(ipgw, services):
    gw, tenant = ipgw
    key = make_key(services[0], allowed_ips=["10.20.30.0/24"])["key"]
    # Through the trusted proxy (127.0.0.1), the client is the first untrusted hop from the right.
    assert call(gw, key, headers={"x-forwarded-for": "10.20.30.40"}).status_code == 200
    spoofed = call(gw, key, headers={"x-forwarded-for": "10.20.30.40, 198.51.100.9"})  # client wrote the first
    assert spoofed.status_code == 403 and openai_error(spoofed)["code"] == "ip_not_allowed"
    assert "198.51.100.9" in openai_error(spoofed)["message"]
    # From a peer that is no trusted proxy the header is ignored.
    direct = call(gw, key, headers={"x-forwarded-for": "10.20.30.40"}, source="127.0.0.8")
    assert direct.status_code == 403
    # The tenant list is checked against the same address.
    tkey = make_key(services[0], tenant=tenant)["key"]
    assert call(gw, tkey, headers={"x-forwarded-for": "10.20.1.1"}).status_code == 200
    assert call(gw, tkey, headers={"x-forwarded-for": "10.21.1.1"}).status_code == 403


def test_item20_forwarded_for_is_ignored_without_trusted_proxies(gateway, services):
    """No ``server.trusted_proxies``: nobody's X-Forwarded-For is believed, not even from
    127.0.0.1 (uvicorn's own proxy-headers handling, which trusts 127.0.0.1, must be off)."""
    key = make_key(services[0], allowed_ips=["10.20.30.0/24"])["key"]
    resp = call(gateway, key, headers={"x-forwarded-for": "10.20.30.40"})
    assert resp.status_code == 403 and openai_error(resp)["code"] == "ip_not_allowed"


def test_item20_allow_list_applies_to_the_admin_api(ipgw, services):
    gw, _ = ipgw
    key = make_key(services[0], scopes=["admin"], allowed_ips=["10.20.30.0/24"])["key"]
    resp = call(gw, key, "/admin/keys", source="127.0.0.9")
    assert resp.status_code == 403 and openai_error(resp)["code"] == "ip_not_allowed"
    assert call(gw, key, "/admin/keys", headers={"x-forwarded-for": "10.20.30.1"}).status_code == 200
