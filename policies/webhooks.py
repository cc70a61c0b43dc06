"""Outbound webhooks that whoever sets the URL cannot turn against the gateway's own network.

A webhook URL can come from an admin (for example a budget's ``webhook_url``), so it is
treated as hostile. An aim at the gateway's host, its private network or a cloud metadata
service (server-side request forgery) is refused at three points:

- ``check_webhook_url`` when the URL is stored: the URL itself (scheme, host, literal
  addresses, non-canonical IPv4 forms such as ``2130706433`` or ``0x7f.1``) and what its host
  resolves to now, so an admin hears about a bad URL at once;
- ``url_problem`` before every delivery (the same checks without DNS);
- when connecting: the connector's resolver drops every refused address a name resolves to,
  and the socket factory checks the very address each socket is about to connect to. The
  connection therefore goes to an address that was checked: a name that resolves to a public
  address when stored and to ``127.0.0.1`` at delivery (DNS rebinding) reaches nothing.

Only public unicast addresses are allowed by default. Refused: loopback, private (RFC 1918),
shared (CGNAT, 100.64.0.0/10), link-local (169.254.0.0/16, fe80::/10 — the metadata services),
unique local (fc00::/7), unspecified (0.0.0.0, ::), multicast, reserved, documentation and
benchmark ranges, and IPv6 forms that carry one of those IPv4 addresses (IPv4-mapped
``::ffff:127.0.0.1``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``). A ``NetworkPolicy`` widens
this: ``allowed_networks`` (CIDRs) allows whatever it lists; ``allow_private_networks`` allows
loopback, private, shared and unique-local addresses, but never link-local, metadata,
unspecified, multicast or reserved ones (list those in ``allowed_networks`` to allow them).
The address policy and the guarded connector live in ``core.netguard`` (HTTP tools use them
too); their names are re-exported here.

Deliveries never follow redirects (a redirect is a failed delivery: following it would leave
the checked address), send no cookies back, ignore proxy environment variables, and have
explicit connect and total timeouts. Errors name the receiver's host, never the whole URL (a
URL's path or query often carries a token).

Signing: ``sign(key, body)`` gives ``sha256=<hex>``, HMAC-SHA256 of the raw body.
``derive_key(secret, purpose, ident)`` gives each signed thing its own key (HMAC-SHA256 of
``gateway-webhook-key:v1:<purpose>:<ident>`` keyed by the configured secret, as 64 hex
characters; the key is those characters' ASCII bytes), so a receiver holding one key can
neither verify nor forge another's signatures.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import socket
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver
from yarl import URL

from core import netguard
from core.netguard import (  # noqa: F401 - re-exported: the address policy lives in the kernel now
    MAX_URL_LENGTH,
    AddressRefused,
    GuardedResolver,
    IPAddress,
    IPNetwork,
    NetworkPolicy,
    address_kind,
    guarded_connector,
    guarded_socket,
)

log = logging.getLogger("gateway.webhooks")

_HINT = (
    "webhooks may reach only public addresses unless alerts.allowed_networks "
    "(or alerts.allow_private_networks) allows it"
)
_legacy_ipv4_form = netguard.legacy_ipv4_form
_GuardedResolver = GuardedResolver


def url_problem(url: str, policy: NetworkPolicy) -> str | None:
    """What is wrong with ``url`` as a webhook, from the URL alone (no DNS), or None."""
    return netguard.url_problem(url, policy, hint=_HINT)


async def check_webhook_url(url: str, cfg, *, resolve_timeout: float = 2.0) -> str | None:
    """For the admin API, when a webhook URL is stored: what is wrong with it, as a sentence
    naming ``webhook_url``, or None. ``cfg`` is ``core.config.Alerts`` (or a NetworkPolicy).

    Checks the URL (``url_problem``) and every address its host resolves to now. A host that
    does not resolve (yet), or not within ``resolve_timeout``, is accepted: each delivery
    checks the addresses it connects to anyway."""
    policy = NetworkPolicy.of(cfg)
    problem = url_problem(url, policy)
    if problem is None:
        problem = await netguard.resolve_problem(url, policy, resolve_timeout=resolve_timeout, hint=_HINT)
    return None if problem is None else f"'webhook_url' {problem}."


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one delivery attempt came to. ``reason`` is from a fixed vocabulary (usable as a
    metric label): delivered, refused, redirect, status, timeout, connection, invalid_url.
    ``permanent`` failures are not worth retrying. ``detail`` names no URL and no secret."""

    ok: bool
    reason: str
    detail: str = ""
    permanent: bool = False
    status: int | None = None


def classify_status(status: int) -> Outcome:
    if 200 <= status < 300:
        return Outcome(True, "delivered", status=status)
    if 300 <= status < 400:
        return Outcome(False, "redirect", f"answered {status} (redirects are not followed)", True, status)
    transient = status >= 500 or status in (408, 425, 429)
    return Outcome(False, "status", f"answered {status}", not transient, status)


class WebhookSender:
    """POSTs to webhook URLs under a NetworkPolicy, with explicit timeouts and no redirects.

    One instance serves every receiver; ``max_concurrency`` bounds the attempts in flight
    together (callers that must keep receivers independent give each its own queue — see
    ``policies.alerts``). ``resolver`` replaces the system resolver (tests: DNS rebinding)."""

    def __init__(
        self,
        policy: NetworkPolicy,
        *,
        connect_timeout: float = 3.0,
        timeout: float = 10.0,
        max_concurrency: int = 256,
        resolver: AbstractResolver | None = None,
        user_agent: str = "ai-gateway-webhooks/1",
    ) -> None:
        self.policy = policy
        self._timeout = aiohttp.ClientTimeout(
            total=timeout, connect=connect_timeout, sock_connect=connect_timeout, sock_read=timeout
        )
        self._slots = asyncio.Semaphore(max_concurrency)
        self._resolver = resolver
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = guarded_connector(
            self.policy,
            resolver=self._resolver,
            force_close=True,  # each delivery resolves, checks and connects afresh
            limit=0,  # bounded by self._slots instead, outside the timeout
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            trust_env=False,
            headers={"user-agent": self._user_agent},
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _socket(self, addr_info) -> socket.socket:
        """The last wall: the address this socket is about to connect to (``core.netguard``)."""
        return guarded_socket(self.policy, addr_info)

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Outcome:
        problem = url_problem(url, self.policy)
        if problem is not None:
            return Outcome(False, "refused", f"the URL {problem}", True)
        if self._session is None:
            raise RuntimeError("WebhookSender.start() was not awaited")
        async with self._slots:
            try:
                async with self._session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
                    return classify_status(resp.status)
            except aiohttp.ClientConnectorError as exc:
                os_error = getattr(exc, "os_error", None)  # absent on certificate errors
                if isinstance(os_error, AddressRefused):
                    return Outcome(False, "refused", f"refused: {os_error}", True)
                why = getattr(os_error, "strerror", None) or type(exc).__name__
                return Outcome(False, "connection", f"cannot connect: {why}")
            except TimeoutError:
                return Outcome(False, "timeout", "timed out")
            except aiohttp.InvalidURL:
                return Outcome(False, "invalid_url", "the URL is not valid", True)
            except (aiohttp.ClientError, OSError) as exc:
                return Outcome(False, "connection", f"failed: {type(exc).__name__}")


def sign(key: str | bytes, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 of the raw body."""
    key = key.encode() if isinstance(key, str) else key
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def derive_key(secret: str, purpose: str, ident: str) -> str:
    """The signing key of one thing (``purpose`` "budget", ``ident`` its id), from the
    configured secret: 64 hex characters, themselves used as the HMAC key."""
    msg = f"gateway-webhook-key:v1:{purpose}:{ident}".encode()
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


def receiver_host(url: str | None) -> str:
    """The host of a webhook URL, for logs (the path or query may carry a token)."""
    try:
        return URL(url).host or "?"
    except (ValueError, TypeError):
        return "?"
