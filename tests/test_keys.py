"""Virtual keys: created once and shown once, stored hashed, revoked everywhere at once."""

from __future__ import annotations

import asyncio
import hashlib

import asyncpg
import httpx

from tests.conftest import Gateway, gateway_config, run_cli, started


def _chat(url: str, key: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "gpt-mock", "messages": [{"role": "user", "content": "hi"}]},
        timeout=10,
    )


def _rows(database_url: str, query: str, *args):
    async def go():
        conn = await asyncpg.connect(database_url)
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()

    return asyncio.run(go())


def test_only_a_hash_of_the_key_is_stored(services, tmp_root):
    out = run_cli("keys", "create", "--name", "hash-check", urls=services, tmp=tmp_root)
    assert out.returncode == 0, out.stderr
    key = out.stdout.splitlines()[0]
    assert key.startswith("sk-gw-") and len(key) > 40
    rows = _rows(services[0], "SELECT * FROM api_keys WHERE name = 'hash-check'")
    assert len(rows) == 1
    stored = " ".join(str(v) for v in rows[0].values())
    assert key not in stored
    assert rows[0]["key_hash"] == hashlib.sha256(key.encode()).hexdigest()


def test_list_shows_keys_without_revealing_them(services, tmp_root):
    key = run_cli("keys", "create", "--name", "listed", urls=services, tmp=tmp_root).stdout.splitlines()[0]
    out = run_cli("keys", "list", urls=services, tmp=tmp_root)
    assert out.returncode == 0
    assert "listed" in out.stdout and key not in out.stdout


def test_revoked_key_fails_on_the_next_request_in_every_replica(services, tmp_root, mock):
    created = run_cli("keys", "create", "--name", "to-revoke", urls=services, tmp=tmp_root)
    key = created.stdout.splitlines()[0]
    key_id = created.stdout.split("(id ")[1].split(";")[0]
    cfg = gateway_config(mock)
    with started(Gateway(tmp_root, cfg, services), Gateway(tmp_root, cfg, services)) as (a, b):
        assert _chat(a.url, key).status_code == 200  # now cached in both
        assert _chat(b.url, key).status_code == 200
        out = run_cli("keys", "revoke", key_id, urls=services, tmp=tmp_root)
        assert out.returncode == 0, out.stderr
        notified = int(out.stdout.split("(")[1].split()[0])
        assert notified >= 2, out.stdout  # both replicas (plus any other gateway of the suite)
        for gw in (a, b):
            resp = _chat(gw.url, key)
            assert resp.status_code == 401, resp.text
            assert resp.json()["error"]["code"] == "invalid_api_key"
        listed = run_cli("keys", "list", "--all", urls=services, tmp=tmp_root).stdout
        assert "revoked" in listed


def test_revoking_an_unknown_key_fails(services, tmp_root):
    out = run_cli("keys", "revoke", "key_does_not_exist", urls=services, tmp=tmp_root)
    assert out.returncode == 1 and "no key" in out.stderr
