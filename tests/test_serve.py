"""`gateway serve` as a user runs it: the demo default, workers, graceful drain, litellm."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import threading

import httpx
import openai
import pytest

from tests.conftest import MASTER_KEY, ROOT, Gateway, free_port, gateway_config, started, wait_until


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_demo_default_runs_offline_on_embedded_servers_and_cleans_up(tmp_path):
    """What `make run` does on a fresh clone: no config, no DATABASE_URL / REDIS_URL."""
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "REDIS_URL", "GATEWAY_MASTER_KEY", "GATEWAY_CONFIG")
    }
    env["GATEWAY_DATA_DIR"] = str(tmp_path / "data")
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(
            lambda: httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200, timeout=90, what="demo gateway"
        )
        out = (tmp_path / "serve.log").read_text()
        key = re.search(r"dev key:\s+(sk-gw-\S+)", out).group(1)
        curl = re.search(r"try: (curl .*)", out).group(1)
        # The printed curl line works as printed.
        result = subprocess.run(shlex.split(curl), capture_output=True, text=True, timeout=30)
        assert '"echo: Hello"' in result.stdout, result.stdout + result.stderr
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        assert {m.id for m in client.models.list()} == {"demo-gpt", "demo-claude", "demo-embedding"}
        stream = client.chat.completions.create(
            model="demo-claude", messages=[{"role": "user", "content": "hey"}], stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "echo: hey"
        assert client.embeddings.create(model="demo-embedding", input="x").data
        valkey_pid = int((tmp_path / "data" / "valkey" / "valkey.pid").read_text())
        pg_pid = int((tmp_path / "data" / "pg" / "postmaster.pid").read_text().split()[0])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()
    # SIGTERM stops what the demo started: the mock provider and both embedded servers.
    wait_until(lambda: not _alive(valkey_pid) and not _alive(pg_pid), timeout=30, what="embedded servers to stop")
    # A second start reuses the data directory and the same dev key.
    assert key in (tmp_path / "data" / "dev.key").read_text()


def test_two_workers_share_the_port_and_metrics(tmp_root, services, mock, api_key):
    with started(Gateway(tmp_root, gateway_config(mock), services, workers=2)) as (gw,):
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=api_key, max_retries=0)
        for _ in range(20):
            client.chat.completions.create(model="gpt-mock", messages=[{"role": "user", "content": "w"}])

        def counted() -> float:
            text = httpx.get(f"{gw.url}/metrics", timeout=30).text
            m = re.search(
                r'gateway_requests_total\{endpoint="chat",model="gpt-mock",provider="mock-openai",'
                r'status="200"\} ([0-9.]+)',
                text,
            )
            return float(m.group(1)) if m else 0.0

        # a request is counted as its handling ends, which may come just after its answer
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: counted() >= 20, timeout=15, what="every request counted")
        assert counted() == 20, "metrics from every worker are summed"


def test_sigterm_drains_an_in_flight_stream(tmp_root, services, mock, api_key):
    gw = Gateway(tmp_root, gateway_config(mock), services)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=api_key, max_retries=0)
    text: list[str] = []
    errors: list[Exception] = []

    def consume():
        try:
            stream = client.chat.completions.create(
                model="gpt-mock",
                stream=True,
                messages=[{"role": "user", "content": 'a b c d e [[mock:{"chunk_ms": 150, "chunks": 6}]]'}],
            )
            for c in stream:
                text.append(c.choices[0].delta.content or "")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=consume)
    t.start()
    wait_until(lambda: len(text) >= 2, timeout=10, what="stream to start")
    gw.proc.send_signal(signal.SIGTERM)
    t.join(30)
    code = gw.stop()
    assert not errors, errors
    assert "".join(text) == "echo: a b c d e"
    assert code in (0, 143)


def test_litellm_kind_reaches_the_long_tail(tmp_root, services, mock, api_key):
    cfg = gateway_config(mock)
    cfg["providers"].append(
        {
            "name": "tail",
            "kind": "litellm",
            "litellm_provider": "openai",
            "base_url": f"{mock.url}/v1",
            "api_keys": ["tail-key"],
        }
    )
    cfg["models"].append({"name": "tail-model", "deployments": [{"provider": "tail", "model": "mock-gpt"}]})
    cfg["models"].append(
        {"name": "tail-embed", "mode": "embedding", "deployments": [{"provider": "tail", "model": "mock-embedding"}]}
    )
    with started(Gateway(tmp_root, cfg, services)) as (gw,):
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=api_key, max_retries=0)
        mock.clear()
        resp = client.chat.completions.create(model="tail-model", messages=[{"role": "user", "content": "long tail"}])
        assert resp.choices[0].message.content == "echo: long tail"
        assert resp.usage.completion_tokens == 3
        assert mock.last()["headers"]["authorization"] == "Bearer tail-key"
        chunks = list(
            client.chat.completions.create(
                model="tail-model",
                messages=[{"role": "user", "content": "streamed tail"}],
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: streamed tail"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
        emb = client.embeddings.create(model="tail-embed", input="vector me", encoding_format="float")
        assert len(emb.data[0].embedding) == 8
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(
                model="tail-model", messages=[{"role": "user", "content": 'x [[mock:{"status": 429}]]'}]
            )


def test_litellm_is_not_imported_unless_configured():
    code = (
        "import sys; import gateway.cli, gateway.app, gateway.services, gateway.providers; "
        "print('litellm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr


def test_bad_config_stops_serve_with_every_problem(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("providers:\n  - {name: a, kind: nope}\nmodels:\n  - {name: m, deployments: []}\n")
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={**os.environ, "GATEWAY_MASTER_KEY": MASTER_KEY},
    )
    assert out.returncode == 1
    assert "providers[0].kind" in out.stderr and "models[0]: give either deployments" in out.stderr


def test_migrate_is_idempotent(services, tmp_root):
    from tests.conftest import run_cli

    out = run_cli("migrate", urls=services, tmp=tmp_root)
    assert out.returncode == 0 and "up to date" in out.stdout
