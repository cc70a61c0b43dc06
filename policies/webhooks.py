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
import ipaddress
import logging
import socket
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

log = logging.getLogger("gateway.webhooks")

MAX_URL_LENGTH = 2048
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_ULA = ipaddress.ip_network("fc00::/7")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Cloud metadata endpoints outside link-local ranges (AWS IPv6, Alibaba); link-local ones
# (169.254.169.254, fe80::a9fe:a9fe, ...) are refused as link-local.
_METADATA = (ipaddress.ip_network("fd00:ec2::254/128"), ipaddress.ip_network("100.100.100.200/32"))
# Kinds that allow_private_networks does not allow: only allowed_networks can.
_NEVER_BY_DEFAULT = frozenset({"cloud metadata", "link-local", "unspecified", "multicast", "reserved"})
_HINT = (
    "webhooks may reach only public addresses unless alerts.allowed_networks "
    "(or alerts.allow_private_networks) allows it"
)


def address_kind(ip: IPAddress) -> str | None:
    """What makes ``ip`` non-public ("loopback", "private", ...), or None for a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            ip = ipaddress.IPv6Address(str(ip).split("%", 1)[0])
        if ip.ipv4_mapped is not None:
            return address_kind(ip.ipv4_mapped)
        if ip in _NAT64:  # well-known NAT64 prefix: the IPv4 address in its last 32 bits is reached
            return address_kind(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.sixtofour is not None and (inner := address_kind(ip.sixtofour)) is not None:
            return inner
    if any(ip in net for net in _METADATA):
        return "cloud metadata"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_reserved:
        return "reserved"
    if ip in _CGNAT:
        return "shared (CGNAT)"
    if ip in _ULA:
        return "unique local"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "non-public"
    return None


@dataclass(frozen=True, slots=True)
class NetworkPolicy:
    """Which addresses webhooks may connect to (see the module docstring)."""

    allow_private: bool = False
    allowed: tuple[IPNetwork, ...] = ()

    @classmethod
    def of(cls, cfg) -> NetworkPolicy:
        """From any settings object with ``allow_private_networks`` and ``allowed_networks``
        (``core.config.Alerts``)."""
        if isinstance(cfg, NetworkPolicy):
            return cfg
        nets = tuple(ipaddress.ip_network(n) for n in getattr(cfg, "allowed_networks", None) or ())
        return cls(bool(getattr(cfg, "allow_private_networks", False)), nets)

    def problem(self, address: str | IPAddress) -> str | None:
        """Why a webhook may not connect to ``address`` (an IP address), or None."""
        try:
            ip = address if not isinstance(address, str) else ipaddress.ip_address(address)
        except ValueError:
            return f"{address!r} is not an IP address"
        kind = address_kind(ip)
        if kind is None:
            return None
        shown = str(ip)
        candidates: list[IPAddress] = [ip]
        if isinstance(ip, ipaddress.IPv6Address):
            plain = ipaddress.IPv6Address(str(ip).split("%", 1)[0])
            candidates.append(plain)
            if plain.ipv4_mapped is not None:
                candidates.append(plain.ipv4_mapped)
                shown = f"::ffff:{plain.ipv4_mapped}"
            elif plain in _NAT64:
                candidates.append(ipaddress.IPv4Address(int(plain) & 0xFFFFFFFF))
            elif plain.sixtofour is not None:
                candidates.append(plain.sixtofour)
        if any(c in net for c in candidates for net in self.allowed):
            return None
        if self.allow_private and kind not in _NEVER_BY_DEFAULT:
            return None
        return f"{shown} ({kind} address)"


class AddressRefused(OSError):
    """A webhook would have connected to an address its NetworkPolicy refuses."""


def _legacy_ipv4_form(host: str) -> bool:
    """True for host names the C resolver reads as an IPv4 address in a legacy form
    (``2130706433``, ``127.1``, ``0x7f.0.0.1``, ``017700000001``)."""
    if not host or not all(c in "0123456789abcdefxABCDEFX." for c in host):
        return False
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


def url_problem(url: str, policy: NetworkPolicy) -> str | None:
    """What is wrong with ``url`` as a webhook, from the URL alone (no DNS), or None."""
    if not isinstance(url, str) or not url:
        return "must be a non-empty string"
    if len(url) > MAX_URL_LENGTH:
        return f"must be at most {MAX_URL_LENGTH} characters"
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return "must not contain whitespace or control characters"
    try:
        parsed = URL(url)
        host = parsed.host
        parsed.port  # noqa: B018 - raises on an out-of-range port
    except (ValueError, TypeError):
        return "is not a valid URL"
    if parsed.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if not host:
        return "has no host"
    name = host.rstrip(".").lower()  # "127.0.0.1." resolves like "127.0.0.1"
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        ip = None
    if ip is not None:
        problem = policy.problem(ip)
        return f"points at {problem}: {_HINT}" if problem else None
    if _legacy_ipv4_form(name):
        return f"host {host!r} is an IPv4 address in a non-canonical form; write the address as a.b.c.d"
    if name == "localhost" or name.endswith(".localhost"):
        problem = policy.problem("127.0.0.1")
        return f"points at localhost (loopback name): {_HINT}" if problem else None
    return None


async def check_webhook_url(url: str, cfg, *, resolve_timeout: float = 2.0) -> str | None:
    """For the admin API, when a webhook URL is stored: what is wrong with it, as a sentence
    naming ``webhook_url``, or None. ``cfg`` is ``core.config.Alerts`` (or a NetworkPolicy).

    Checks the URL (``url_problem``) and every address its host resolves to now. A host that
    does not resolve (yet), or not within ``resolve_timeout``, is accepted: each delivery
    checks the addresses it connects to anyway."""
    policy = NetworkPolicy.of(cfg)
    problem = url_problem(url, policy)
    if problem is not None:
        return f"'webhook_url' {problem}."
    parsed = URL(url)
    host = parsed.host
    try:
        ipaddress.ip_address(host.rstrip("."))
        return None  # a literal address: checked above
    except ValueError:
        pass
    try:
        async with asyncio.timeout(resolve_timeout):
            infos = await asyncio.get_running_loop().getaddrinfo(host, parsed.port or 0, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError, UnicodeError):
        return None
    for info in infos:
        problem = policy.problem(info[4][0])
        if problem is not None:
            return f"'webhook_url' host {host!r} resolves to {problem}: {_HINT}."
    return None


class _GuardedResolver(AbstractResolver):
    """Resolves with ``base`` and keeps only the addresses the policy allows; what it returns
    is what the connector connects to (no second lookup), so the check pins the connection."""

    def __init__(self, policy: NetworkPolicy, base: AbstractResolver) -> None:
        self._policy = policy
        self._base = base

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        results: list[ResolveResult] = await self._base.resolve(host, port, family)
        allowed = [r for r in results if self._policy.problem(r["host"]) is None]
        if not allowed:
            first = self._policy.problem(results[0]["host"]) if results else "no address"
            raise AddressRefused(f"host {host!r} resolves to {first}")
        return allowed

    async def close(self) -> None:
        await self._base.close()


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
        resolver = _GuardedResolver(self.policy, self._resolver or ThreadedResolver())
        connector = aiohttp.TCPConnector(
            resolver=resolver,
            socket_factory=self._socket,
            use_dns_cache=False,
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
        """The last wall: the address this socket is about to connect to, whichever way it
        was found (literal in the URL, resolved, happy-eyeballs fallback)."""
        family, type_, proto, _, sockaddr = addr_info
        problem = self.policy.problem(sockaddr[0])
        if problem is not None:
            raise AddressRefused(problem)
        return socket.socket(family=family, type=type_, proto=proto)

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
