"""Attacks on and through budget alert webhooks (issue #11, item 14).

Whoever may set a budget's ``webhook_url`` may try to aim the gateway at its own network (the
loopback interface, private ranges, the cloud metadata service), to bounce it there with a
redirect, to replay one budget's signed alert as another's, or to stall every other budget's
alerts with a receiver that never answers. Each test is one such attempt, through real gateway
processes where a client could make it (each on a Redis database of its own: any gateway on a
Redis delivers the alerts found there), in-process where it needs a resolver under our control.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import http.server
import json
import re
import socket
import threading
import uuid
from collections.abc import Callable

import httpx
import pytest
import redis

from core.config import Alerts, ConfigError, load_config
from policies.alerts import GROUP, budget_signing_key
from policies.engine import ALERT_STREAM
from policies.webhooks import AddressRefused, NetworkPolicy, WebhookSender, check_webhook_url
from tests.conftest import Gateway, MockProvider, free_port, started, wait_until
from tests.test_policies import HELLO, admin, new_key

SECRET = "alert-secret-for-item14"
LOOPBACK_ALLOWED = {"allowed_networks": ["127.0.0.0/8"]}


# ---- helpers -------------------------------------------------------------------------------------
class Receiver:
    """A webhook receiver on loopback: records every request; ``answer`` gives (status, headers)."""

    def __init__(self, answer: Callable[[], tuple[int, dict]] = lambda: (204, {})) -> None:
        self.received: list[tuple[str, dict, bytes]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self):
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                outer.received.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                status, headers = answer()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", "0")
                self.end_headers()

            do_POST = do_GET = _any

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class DeadReceiver:
    """Accepts connections, reads the request and never answers; holds every connection."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.conns: list[socket.socket] = []
        self.requests: list[bytes] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.conns.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        data = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
        with self._lock:
            self.requests.append(data)

    def open_connections(self) -> int:
        """Connections the gateway has not closed (a peek that does not consume)."""
        alive = 0
        with self._lock:
            conns = list(self.conns)
        for c in conns:
            try:
                c.setblocking(False)
                alive += c.recv(1, socket.MSG_PEEK) != b""
            except BlockingIOError:
                alive += 1
            except OSError:
                pass
        return alive

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def gw_config(mock: MockProvider, **alerts) -> dict:
    return {
        "router": {"max_attempts": 1},
        "alerts": {"secret": SECRET, **alerts},
        "providers": [
            {"name": "pp", "kind": "openai", "base_url": f"{mock.url}/v1", "api_keys": [f"k-{uuid.uuid4().hex[:6]}"]}
        ],
        "models": [
            {
                "name": "priced",
                "deployments": [
                    {"provider": "pp", "model": "m", "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}
                ],
            }
        ],
    }


def own_db(services, db: int) -> tuple[str, str]:
    return services[0], f"{services[1]}?db={db}"


def budget_for_new_key(gw: Gateway, webhook_url: str | None) -> tuple[dict, dict]:
    """A key and a budget on it that its first request takes past the 1 % threshold (one request
    costs ~1e-5 USD of the 1e-4 limit, and its reservation fits the limit)."""
    key = new_key(gw)
    body = {"scope": "key", "scope_value": key["id"], "limit_usd": 0.0001, "period": "monthly", "thresholds": [0.01]}
    if webhook_url is not None:
        body["webhook_url"] = webhook_url
    r = admin(gw, "POST", "/admin/budgets", json=body)
    assert r.status_code == 201, r.text
    return key, r.json()


def fire(gw: Gateway, key: dict) -> None:
    r = httpx.post(
        f"{gw.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key['key']}"},
        json={"model": "priced", "messages": HELLO, "max_tokens": 5},
        timeout=30,
    )
    assert r.status_code == 200, r.text


def deliveries(gw: Gateway, outcome: str, reason: str) -> float:
    text = httpx.get(f"{gw.url}/metrics", timeout=10).text
    m = re.search(rf'^gateway_alert_deliveries_total\{{outcome="{outcome}",reason="{reason}"\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def sig(key: str, body: bytes) -> str:
    return "sha256=" + hmac.new(key.encode(), body, hashlib.sha256).hexdigest()


@pytest.fixture(scope="module")
def agw(tmp_root, services, module_mock):
    """Loopback receivers allowed (they are the tests' receivers); a long attempt timeout, so a
    receiver that never answers holds its attempt open for the whole test; quick retries."""
    config = gw_config(module_mock, **LOOPBACK_ALLOWED, timeout=300, max_attempts=3, backoff={"base": 0.05, "max": 0.2})
    g = Gateway(tmp_root, config, own_db(services, 9))
    yield g
    g.stop()


# ---- where a webhook may go -----------------------------------------------------------------------
REFUSED_URLS = [
    "http://127.0.0.1:8080/hook",
    "http://127.0.0.1./hook",  # trailing dot
    "http://[::1]/hook",
    "http://localhost:8080/hook",
    "http://LOCALHOST./hook",
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",  # cloud metadata
    "http://[fd00:ec2::254]/latest/meta-data/",  # AWS metadata over IPv6
    "http://100.100.100.200/latest/meta-data/",  # Alibaba metadata
    "http://[fe80::1]/hook",
    "http://10.0.0.1/hook",
    "http://172.16.0.1/hook",
    "http://192.168.1.1/hook",
    "http://100.64.0.1/hook",  # CGNAT
    "http://[fc00::1]/hook",
    "http://[fd12:3456::1]/hook",  # ULA
    "http://[::ffff:127.0.0.1]/hook",  # IPv4-mapped IPv6
    "http://[::ffff:169.254.169.254]/hook",
    "http://[64:ff9b::a9fe:a9fe]/hook",  # NAT64 of the metadata address
    "http://[2002:7f00:1::1]/hook",  # 6to4 of loopback
    "http://0.0.0.0:8080/hook",
    "http://[::]/hook",
    "http://224.0.0.1/hook",  # multicast
    "http://[ff02::1]/hook",
    "http://240.0.0.1/hook",  # reserved
    "http://255.255.255.255/hook",
    "http://2130706433/hook",  # 127.0.0.1 as one decimal number
    "http://0x7f.1/hook",
    "http://127.1/hook",
    "http://017700000001/hook",  # octal
    "ftp://example.com/hook",
    "file:///etc/passwd",
    "gopher://127.0.0.1:6379/_FLUSHALL",
    "http:///hook",
    "http://exa mple.com/hook",
    "http://example.com/hook\r\nx-injected: 1",
    "http://example.com/" + "a" * 3000,
]


@pytest.mark.parametrize("url", REFUSED_URLS)
def test_item14_check_webhook_url_refuses_internal_and_malformed_targets(url):
    problem = asyncio.run(check_webhook_url(url, Alerts()))
    assert problem is not None and problem.startswith("'webhook_url'")
    assert "a" * 100 not in problem  # the message does not echo a huge URL


@pytest.mark.parametrize(
    "url", ["https://8.8.8.8/hook", "http://[2606:4700::1111]/hook", "http://[64:ff9b::808:808]/h"]
)
def test_item14_check_webhook_url_accepts_public_addresses(url):
    assert asyncio.run(check_webhook_url(url, Alerts())) is None


def test_item14_check_webhook_url_refuses_a_name_resolving_to_loopback():
    # Which names this machine resolves to loopback besides "localhost" (its own host name, often).
    name = socket.gethostname()
    try:
        addrs = {i[4][0] for i in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)}
    except OSError:
        addrs = set()
    if not addrs or any(NetworkPolicy().problem(a) is None for a in addrs):
        pytest.skip(f"{name} does not resolve to internal addresses only here")
    problem = asyncio.run(check_webhook_url(f"http://{name}:9/hook", Alerts()))
    assert problem is not None and "resolves to" in problem


def test_item14_private_networks_are_allowed_only_through_config():
    private = Alerts(allow_private_networks=True)
    for url in ("http://10.0.0.1/h", "http://127.0.0.1:9/h", "http://[fd12::1]/h", "http://100.64.0.1/h"):
        assert asyncio.run(check_webhook_url(url, private)) is None, url
    # allow_private_networks never opens the metadata service, link-local, 0.0.0.0 or multicast ...
    for url in (
        "http://169.254.169.254/",
        "http://[fd00:ec2::254]/",
        "http://100.100.100.200/",
        "http://[fe80::1]/",
        "http://0.0.0.0/",
        "http://224.0.0.1/",
    ):
        assert asyncio.run(check_webhook_url(url, private)) is not None, url
    # ... only an explicit allow-list does, and only what it lists
    listed = Alerts(allowed_networks=["169.254.169.254/32", "10.1.0.0/16"])
    assert asyncio.run(check_webhook_url("http://169.254.169.254/", listed)) is None
    assert asyncio.run(check_webhook_url("http://10.1.2.3/h", listed)) is None
    assert asyncio.run(check_webhook_url("http://10.2.0.1/h", listed)) is not None
    assert asyncio.run(check_webhook_url("http://[::ffff:10.1.2.3]/h", listed)) is None


def test_item14_allowed_networks_must_be_networks(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text("alerts:\n  allowed_networks: ['10.0.0.1/8', 'not-a-network']\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert any("allowed_networks[0]" in p for p in err.value.problems)


class _Rebinding:
    """A resolver under the attacker's control: the name resolves to whatever it says now."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.asked = 0

    async def resolve(self, host, port=0, family=socket.AF_INET):
        self.asked += 1
        return [
            {"hostname": host, "host": self.address, "port": port, "family": socket.AF_INET, "proto": 0, "flags": 0}
        ]

    async def close(self):
        pass


def test_item14_dns_rebinding_to_loopback_is_refused_at_connection():
    """The name did not resolve to anything internal when the URL was stored; at delivery it
    resolves to loopback, where a listening server must never be contacted."""
    receiver = Receiver()
    url = f"http://hooks.rebind.invalid:{receiver.port}/hook"

    async def go():
        assert await check_webhook_url(url, Alerts()) is None  # does not resolve now: accepted
        dns = _Rebinding("127.0.0.1")
        sender = WebhookSender(NetworkPolicy.of(Alerts()), resolver=dns, timeout=5)
        await sender.start()
        try:
            outcome = await sender.post(url, b"{}", {})
        finally:
            await sender.close()
        return dns, outcome

    dns, outcome = asyncio.run(go())
    receiver.close()
    assert dns.asked >= 1
    assert not outcome.ok and outcome.reason == "refused" and outcome.permanent
    assert receiver.received == []


def test_item14_socket_wall_refuses_internal_addresses_however_reached():
    """The last check sits where the socket is made: the address it is about to connect to."""
    sender = WebhookSender(NetworkPolicy())
    for addr in (("127.0.0.1", 80), ("169.254.169.254", 80), ("::ffff:127.0.0.1", 80, 0, 0), ("::1", 80, 0, 0)):
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        with pytest.raises(AddressRefused):
            sender._socket((family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", addr))


def test_item14_webhook_to_loopback_refused(tmp_root, services, module_mock):
    """No allowance in the config: an alert for a loopback receiver is refused (never contacted),
    recorded as failed, and the log names the host, never the URL's secret path."""
    receiver = Receiver()
    token = f"tok-{uuid.uuid4().hex}"
    config = gw_config(module_mock, webhook_url=f"http://127.0.0.1:{receiver.port}/{token}")
    with started(Gateway(tmp_root, config, own_db(services, 10))) as (gw,):
        key, _ = budget_for_new_key(gw, None)  # alerts go to alerts.webhook_url
        fire(gw, key)
        wait_until(lambda: deliveries(gw, "failed", "refused") >= 1, timeout=30, what="refused alert")
        # A budget of its own on localhost: refused when stored (admin API), or at delivery.
        key2 = new_key(gw)
        r = admin(
            gw,
            "POST",
            "/admin/budgets",
            json={
                "scope": "key",
                "scope_value": key2["id"],
                "limit_usd": 0.0001,
                "thresholds": [0.01],
                "webhook_url": f"http://localhost:{receiver.port}/{token}",
            },
        )
        if r.status_code == 201:
            fire(gw, key2)
            wait_until(lambda: deliveries(gw, "failed", "refused") >= 2, timeout=30, what="second refused alert")
        else:
            assert r.status_code == 400 and r.json()["error"]["param"] == "webhook_url", r.text
        log = gw.log()
    receiver.close()
    assert receiver.received == []
    assert "alert webhook failed" in log and token not in log


def test_item14_admin_api_refuses_metadata_webhook_url_early(agw):
    key = new_key(agw)
    body = {"scope": "key", "scope_value": key["id"], "limit_usd": 1}
    r = admin(agw, "POST", "/admin/budgets", json={**body, "webhook_url": "http://169.254.169.254/latest/meta-data/"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "webhook_url", r.text
    created = admin(agw, "POST", "/admin/budgets", json={**body, "webhook_url": "https://8.8.8.8/hook"})
    assert created.status_code == 201, created.text
    r = admin(
        agw, "PATCH", f"/admin/budgets/{created.json()['id']}", json={"webhook_url": "http://[::ffff:10.0.0.1]/h"}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "webhook_url", r.text


# ---- redirects, signatures, retries, isolation -------------------------------------------------------
def test_item14_redirect_not_followed(agw):
    sink = Receiver()  # allowed (loopback is allowed here), yet a redirect must not lead there
    bouncer = Receiver(lambda: (307, {"location": sink.url + "?stolen=1"}))
    before = deliveries(agw, "failed", "redirect")
    key, _ = budget_for_new_key(agw, bouncer.url)
    fire(agw, key)
    wait_until(lambda: deliveries(agw, "failed", "redirect") > before, timeout=30, what="redirect recorded")
    bouncer.close()
    sink.close()
    assert len(bouncer.received) == 1  # a redirect is final: not retried either
    assert sink.received == []


def test_item14_signature_bound_to_budget(agw):
    """Each budget's receiver gets alerts signed with that budget's own key: a receiver can
    neither verify nor forge another budget's alerts, and a captured alert does not verify as
    another budget's. The operator's alerts.webhook_url keeps alerts.secret."""
    ra, rb = Receiver(), Receiver()
    key_a, budget_a = budget_for_new_key(agw, ra.url)
    key_b, budget_b = budget_for_new_key(agw, rb.url)
    fire(agw, key_a)
    fire(agw, key_b)
    wait_until(lambda: ra.received and rb.received, timeout=30, what="both alerts")
    ra.close()
    rb.close()
    (_, headers_a, body_a), (_, headers_b, body_b) = ra.received[0], rb.received[0]
    signing_a = budget_signing_key(SECRET, budget_a["id"])
    signing_b = budget_signing_key(SECRET, budget_b["id"])
    assert signing_a != signing_b
    assert headers_a["x-gateway-signature"] == sig(signing_a, body_a)
    assert headers_b["x-gateway-signature"] == sig(signing_b, body_b)
    # B's receiver, handed A's alert as it was sent (replay), rejects it; so would anyone holding
    # only the configured secret's old scheme.
    assert headers_a["x-gateway-signature"] != sig(signing_b, body_a)
    assert headers_a["x-gateway-signature"] != sig(SECRET, body_a)
    payload_a = json.loads(body_a)
    assert payload_a["budget_id"] == budget_a["id"] and payload_a["scope_value"] == key_a["id"]
    assert str(payload_a["timestamp"]) == headers_a["x-gateway-timestamp"]
    assert payload_a["id"] == headers_a["x-gateway-alert-id"]


def test_item14_operator_webhook_signed_with_configured_secret(tmp_root, services, module_mock):
    receiver = Receiver()
    config = gw_config(module_mock, **LOOPBACK_ALLOWED, webhook_url=receiver.url)
    with started(Gateway(tmp_root, config, own_db(services, 12))) as (gw,):
        key, budget = budget_for_new_key(gw, None)
        fire(gw, key)
        wait_until(lambda: receiver.received, timeout=30, what="alert")
    receiver.close()
    _, headers, body = receiver.received[0]
    assert headers["x-gateway-signature"] == sig(SECRET, body)
    assert json.loads(body)["budget_id"] == budget["id"]


def test_item14_retries_bounded_then_recorded_failed_and_acked(agw, services):
    broken = Receiver(lambda: (503, {}))
    before = deliveries(agw, "failed", "status")
    key, _ = budget_for_new_key(agw, broken.url)
    fire(agw, key)
    wait_until(lambda: deliveries(agw, "failed", "status") > before, timeout=30, what="failure recorded")
    attempts = list(broken.received)
    broken.close()
    assert len(attempts) == 3  # alerts.max_attempts
    assert len({h["x-gateway-alert-id"] for _, h, _ in attempts}) == 1  # one alert, three tries
    r = redis.Redis.from_url(own_db(services, 9)[1])
    try:
        alert_id = attempts[0][1]["x-gateway-alert-id"]
        assert r.xrange(ALERT_STREAM, alert_id, alert_id) == []  # acknowledged and removed
        assert all(p["message_id"].decode() != alert_id for p in r.xpending_range(ALERT_STREAM, GROUP, "-", "+", 100))
    finally:
        r.close()
    assert "alert webhook failed; alert dropped" in agw.log()


def test_item14_retries_stop_at_max_age(tmp_root, services, module_mock):
    broken = Receiver(lambda: (500, {}))
    config = gw_config(
        module_mock, **LOOPBACK_ALLOWED, max_attempts=100000, max_age=1, backoff={"base": 0.1, "max": 0.2}
    )
    with started(Gateway(tmp_root, config, own_db(services, 11))) as (gw,):
        key, _ = budget_for_new_key(gw, broken.url)
        fire(gw, key)
        wait_until(lambda: deliveries(gw, "failed", "expired") >= 1, timeout=30, what="expired alert")
        tried = len(broken.received)
    broken.close()
    assert 1 <= tried < 100000


def test_item14_dead_receiver_does_not_delay_others(agw):
    """A receiver that accepts the connection and never answers holds the gateway's attempt
    open (timeout 300 s here); another budget's alert, fired after it, is delivered while that
    attempt is still hanging."""
    dead, healthy = DeadReceiver(), Receiver()
    key_dead, _ = budget_for_new_key(agw, dead.url)
    key_ok, _ = budget_for_new_key(agw, healthy.url)
    fire(agw, key_dead)
    wait_until(lambda: dead.requests, timeout=30, what="the dead receiver holding an attempt")
    fire(agw, key_ok)
    wait_until(lambda: healthy.received, timeout=60, what="the healthy receiver's alert")
    still_hanging = dead.open_connections()
    healthy.close()
    dead.close()
    assert still_hanging >= 1, "the dead receiver's attempt ended before the other alert went out"
