"""Test fixtures: real embedded PostgreSQL + Valkey, real mock-provider and gateway processes."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.embedded import EmbeddedServices

MASTER_KEY = "sk-master-test-0123456789"
ROOT = Path(__file__).resolve().parent.parent


# The fixtures' own calls to the local servers they start share one client: a new httpx client
# per call (httpx.get) costs ~25 ms of CPU for its TLS context, which a readiness poll every
# 50 ms would spend beside the process it waits for.
LOCAL_HTTP = httpx.Client(timeout=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """``values`` set in this process's environment (what a gateway started inside inherits),
    and the environment as it was afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def wait_until(check, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Proc:
    def __init__(self, args: list[str], env: dict, log: Path) -> None:
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        self._terminated = False

    def terminate(self) -> None:
        """SIGTERM, once, without waiting (``stop`` waits): several processes shut down at once."""
        if self.proc.poll() is None and not self._terminated:
            self._terminated = True
            self.proc.terminate()

    def stop(self, sig: int | None = None) -> int:
        if self.proc.poll() is None:
            if sig is None:
                self.terminate()
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")


class MockProvider(Proc):
    def __init__(self, tmp: Path, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "loadtest.mock_provider", "--port", str(self.port), *flags]
        super().__init__(args, dict(os.environ), tmp / f"mock-{self.port}.log")
        wait_until(lambda: LOCAL_HTTP.get(f"{self.url}/health").status_code == 200, what="mock provider")

    def requests(self) -> list[dict]:
        return LOCAL_HTTP.get(f"{self.url}/_mock/requests").json()["requests"]

    def last(self) -> dict:
        return self.requests()[-1]

    def clear(self) -> None:
        LOCAL_HTTP.delete(f"{self.url}/_mock/requests")

    def configure(self, **cfg) -> None:
        LOCAL_HTTP.post(f"{self.url}/_mock/config", json=cfg).raise_for_status()


def gateway_env(tmp: Path, urls: tuple[str, str]) -> dict[str, str]:
    """The environment of a gateway process of the tests."""
    return {
        **os.environ,
        "DATABASE_URL": urls[0],
        "REDIS_URL": urls[1],
        "GATEWAY_MASTER_KEY": MASTER_KEY,
        "GATEWAY_DATA_DIR": str(tmp / "data"),
        # One shared Redis serves the whole suite: only the knowledge-base tests' gateways
        # consume the ingestion queue (they set it to 1), so no other module's gateway takes
        # a job and is stopped holding it.
        "GATEWAY_KB_WORKER": os.environ.get("GATEWAY_KB_WORKER", "0"),
    }


class Gateway(Proc):
    """``gateway serve`` on a free port, ready when this returns. ``launcher``: the source of a
    script run instead of ``python -m gateway`` (it patches the gateway, then calls its CLI), as
    ``<launcher_name>.py`` in ``tmp``; ``env``: added to the gateway's environment."""

    def __init__(
        self,
        tmp: Path,
        config: dict,
        urls: tuple[str, str],
        *,
        workers: int = 1,
        launcher: str | None = None,
        launcher_name: str = "gateway_launcher",
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg_path = tmp / f"gateway-{self.port}.yaml"
        cfg_path.write_text(yaml.safe_dump(config))
        run = ["-m", "gateway"]
        if launcher is not None:
            script = tmp / f"{launcher_name}.py"
            script.write_text(launcher)
            run = [str(script)]
            env = {"PYTHONPATH": str(ROOT), **(env or {})}
        env = {**gateway_env(tmp, urls), **(env or {})}
        args = [
            sys.executable,
            *run,
            "serve",
            "--config",
            str(cfg_path),
            "--port",
            str(self.port),
            "--workers",
            str(workers),
        ]
        super().__init__(args, env, tmp / f"gateway-{self.port}.log")
        try:
            wait_until(
                lambda: LOCAL_HTTP.get(f"{self.url}/readyz").status_code == 200, timeout=60, what="gateway ready"
            )
        except TimeoutError:
            self.stop()
            raise RuntimeError("gateway did not start:\n" + self.log()) from None


def refused_start(tmp: Path, config: dict, urls: tuple[str, str], *, timeout: float = 180) -> str:
    """What a gateway that must not start with ``config`` printed (it exited non-zero)."""
    path = tmp / f"refused-{free_port()}.yaml"
    path.write_text(yaml.safe_dump(config))
    args = [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", str(free_port())]
    out = subprocess.run(args, env=gateway_env(tmp, urls), capture_output=True, text=True, timeout=timeout)
    assert out.returncode != 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def gateway_config(mock: MockProvider, **extra) -> dict:
    cfg = {
        # The shared gateway tests error mapping: no retries, no circuit trips between tests.
        # Routing tests start gateways of their own with the defaults.
        "router": {"max_attempts": 1, "circuit": {"failures": 1000}},
        "providers": [
            {
                "name": "mock-openai",
                "kind": "openai",
                "base_url": f"{mock.url}/v1",
                "api_keys": ["key-a", "key-b"],
                "timeouts": {"first_byte": 3, "idle": 3, "total": 20},
            },
            {
                "name": "mock-anthropic",
                "kind": "anthropic",
                "base_url": mock.url,
                "api_keys": ["ant-key"],
                "timeouts": {"first_byte": 3, "idle": 3, "total": 20},
            },
        ],
        "models": [
            {"name": "gpt-mock", "deployments": [{"provider": "mock-openai", "model": "mock-gpt"}]},
            {"name": "claude-mock", "deployments": [{"provider": "mock-anthropic", "model": "mock-claude"}]},
            {
                "name": "embed-mock",
                "mode": "embedding",
                "deployments": [{"provider": "mock-openai", "model": "mock-embedding"}],
            },
        ],
    }
    cfg.update(extra)
    return cfg


# The longest modules (a minute or more of one worker each at the last measurement), handed
# out first: `--dist loadfile` gives the workers modules in collection order, and one of these
# last (the alphabet put test_wa_dead_letters_erasure there) kept one worker busy alone at the end.
LONG_MODULES = (
    "test_deploy.py",
    "test_wa_dead_letters_erasure.py",
    "test_routing.py",
    "test_policies.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    first = {name: rank for rank, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def tmp_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gw")


@pytest.fixture(scope="module")
def graph(tmp_root):
    """The mock Graph API (loadtest/mock_graph.py) of a WhatsApp test module, one per module."""
    from tests.test_channels_whatsapp import GraphMock

    g = GraphMock(tmp_root)
    yield g
    g.stop()


@pytest.fixture(scope="session", autouse=True)
def bytecode_cache(tmp_path_factory) -> None:
    """With PYTHONDONTWRITEBYTECODE set (as in this machine's environment), every gateway, CLI and mock
    server the suite starts would compile our sources again: they share a cache of the session's
    own instead (nothing is written next to the sources)."""
    if os.environ.pop("PYTHONDONTWRITEBYTECODE", None):
        os.environ.setdefault("PYTHONPYCACHEPREFIX", str(tmp_path_factory.mktemp("pycache")))


@pytest.fixture(scope="session", autouse=True)
def shared_default_ssl_context() -> Iterator[None]:
    """Every httpx client the tests make (``httpx.get``/``post`` each make one, and so does each
    OpenAI SDK client) built its own default SSL context: 50-100 ms of CPU to load the CA bundle,
    for plain-HTTP calls to local servers. They share one per setting instead (the same context,
    built once; a client given its own ``verify`` or ``cert`` still builds its own)."""
    import httpx._transports.default as transports

    build = transports.create_ssl_context
    built: dict[tuple, object] = {}

    def create_ssl_context(verify=True, cert=None, trust_env=True):
        if verify is not True or cert is not None:
            return build(verify=verify, cert=cert, trust_env=trust_env)
        key = (trust_env, os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
        if key not in built:
            built[key] = build(verify=verify, cert=cert, trust_env=trust_env)
        return built[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transports, "create_ssl_context", create_ssl_context)
        yield


@pytest.fixture(scope="session")
def services(tmp_root: Path) -> Iterator[tuple[str, str]]:
    """The embedded PostgreSQL + Valkey, through the same code the gateway uses."""
    svc = EmbeddedServices(tmp_root / "embedded").start()
    try:
        yield svc.database_url, svc.redis_url
    finally:
        svc.stop()


@pytest.fixture(scope="session")
def mock(tmp_root: Path) -> Iterator[MockProvider]:
    m = MockProvider(tmp_root)
    yield m
    m.stop()


@pytest.fixture(scope="module")
def module_mock(tmp_root: Path) -> Iterator[MockProvider]:
    """A mock provider of the test module's own (for tests that count its requests or set faults)."""
    m = MockProvider(tmp_root)
    yield m
    m.stop()


@pytest.fixture(scope="session")
def gateway(tmp_root: Path, services, mock) -> Iterator[Gateway]:
    gw = Gateway(tmp_root, gateway_config(mock), services)
    yield gw
    gw.stop()


def run_cli(*args: str, urls: tuple[str, str], tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DATABASE_URL": urls[0], "REDIS_URL": urls[1], "GATEWAY_DATA_DIR": str(tmp / "data")}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT
    )


@pytest.fixture(scope="session")
def api_key(services, tmp_root: Path) -> str:
    out = run_cli("keys", "create", "--name", "test-suite", urls=services, tmp=tmp_root)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()[0].strip()


@pytest.fixture
def client(gateway, api_key):
    from openai import OpenAI

    with OpenAI(base_url=f"{gateway.url}/v1", api_key=api_key, max_retries=0, timeout=30) as c:
        yield c


@pytest.fixture
def http(gateway, api_key) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as c:
        yield c


@contextlib.contextmanager
def started(*procs: Proc):
    try:
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.stop()
