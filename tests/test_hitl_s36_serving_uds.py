"""``gateway serve`` on a Unix socket removes the socket's file when it stops.

``gateway.serving.serve`` replaced ``uvicorn.run`` (to drain the application before the server
stops listening) and lost the step ``uvicorn.run`` ends with: the socket's file removed. A gateway
stopped by SIGTERM left its socket behind (nobody listening on it), and a supervisor of several
workers restarted on that path could not bind it (address in use: exit 3). Now the file goes when
the server stops, and a stale one is replaced at the start.

The real process: ``gateway serve`` launched with the socket's path set on its uvicorn config
(the CLI has no option for it), over the embedded PostgreSQL and Valkey, asked over the socket."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import ROOT, Proc, free_port, gateway_env, wait_until

LAUNCHER = textwrap.dedent(
    """
    import os
    import sys

    from gateway import serving

    _serve = serving.serve


    def serve(config):
        config.uds = os.environ["S36_UDS"]  # (served on the test's Unix socket)
        return _serve(config)


    serving.serve = serve

    if __name__ == "__main__":  # (several workers are spawned: each imports this file again)
        from gateway.cli import main

        sys.exit(main())
    """
)


@pytest.fixture()
def uds():
    folder = tempfile.mkdtemp(prefix="s36uds-", dir="/tmp")  # (a socket's path is short: 108 bytes)
    yield os.path.join(folder, "gw.sock")
    shutil.rmtree(folder, ignore_errors=True)


def _start(tmp: Path, services, mock, path: str, workers: int) -> Proc:
    name = f"s36-uds-{uuid.uuid4().hex[:6]}"
    config = {
        "providers": [{"name": "pp", "kind": "openai", "base_url": f"{mock.url}/v1", "api_keys": ["k"]}],
        "models": [{"name": "m", "deployments": [{"provider": "pp", "model": "m"}]}],
    }
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump(config))
    (tmp / f"{name}.py").write_text(LAUNCHER)
    args = [sys.executable, str(tmp / f"{name}.py"), "serve", "--config", str(tmp / f"{name}.yaml")]
    args += ["--port", str(free_port()), "--workers", str(workers)]
    env = {**gateway_env(tmp, services), "PYTHONPATH": str(ROOT), "S36_UDS": path}
    proc = Proc(args, env, tmp / f"{name}.log")
    client = httpx.Client(transport=httpx.HTTPTransport(uds=path), timeout=5)

    def ready() -> bool:
        if proc.proc.poll() is not None:
            raise AssertionError(f"the gateway exited ({proc.proc.returncode}):\n{proc.log()[-3000:]}")
        return client.get("http://gateway/readyz").status_code == 200

    try:
        wait_until(ready, timeout=120, what="the gateway on its Unix socket")
    except BaseException:
        proc.stop()
        raise
    finally:
        client.close()
    return proc


def _stopped(proc: Proc) -> None:
    proc.proc.send_signal(signal.SIGTERM)
    proc.proc.wait(90)
    proc.stop()


def test_a_gateway_on_a_unix_socket_removes_its_socket_when_it_stops(tmp_root, services, module_mock, uds):
    proc = _start(tmp_root, services, module_mock, uds, workers=1)
    assert Path(uds).is_socket()
    _stopped(proc)
    assert not os.path.exists(uds), proc.log_path.read_text(errors="replace")[-2000:]


def test_several_workers_start_over_a_stale_socket_and_remove_it_when_they_stop(tmp_root, services, module_mock, uds):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(uds)  # (a socket's file nobody listens on: a server that stopped without removing it)
    stale.close()
    proc = _start(tmp_root, services, module_mock, uds, workers=2)
    _stopped(proc)
    assert not os.path.exists(uds), proc.log_path.read_text(errors="replace")[-2000:]
