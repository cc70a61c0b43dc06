"""Outbound connections that whoever chose the URL cannot turn against the gateway's own network.

A URL set by an admin or a tenant (a webhook receiver, an agent's HTTP or MCP tool) is treated
as hostile: an aim at the gateway's host, its private network or a cloud metadata service
(server-side request forgery) is refused

- from the URL alone (``url_problem``): scheme, host, literal addresses, non-canonical IPv4
  forms such as ``2130706433`` or ``0x7f.1``, the name ``localhost``;
- from what its host resolves to now (``resolve_problem``), so an admin hears about it at once;
- when connecting (``guarded_connector``): the resolver drops every refused address a name
  resolves to, and the socket factory checks the very address each socket is about to connect
  to. The connection therefore goes to an address that was checked: a name that resolves to a
  public address when stored and to ``127.0.0.1`` later (DNS rebinding) reaches nothing.

Only public unicast addresses are allowed by default. Refused: loopback, private (RFC 1918),
shared (CGNAT, 100.64.0.0/10), link-local (169.254.0.0/16, fe80::/10 — the metadata services),
unique local (fc00::/7), unspecified (0.0.0.0, ::), multicast, reserved, documentation and
benchmark ranges, and IPv6 forms that carry one of those IPv4 addresses (IPv4-mapped
``::ffff:127.0.0.1``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``). A ``NetworkPolicy`` widens
this: ``allowed_networks`` (CIDRs) allows whatever it lists; ``allow_private_networks`` allows
loopback, private, shared and unique-local addresses, but never link-local, metadata,
unspecified, multicast or reserved ones (list those in ``allowed_networks`` to allow them).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

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
DEFAULT_HINT = "only public addresses may be reached unless the network policy allows more"


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
    """Which addresses outbound connections may reach (see the module docstring)."""

    allow_private: bool = False
    allowed: tuple[IPNetwork, ...] = ()

    @classmethod
    def of(cls, cfg) -> NetworkPolicy:
        """From any settings object with ``allow_private_networks`` and ``allowed_networks``
        (``core.config.Alerts``, say), or None for the default (public addresses only)."""
        if isinstance(cfg, NetworkPolicy):
            return cfg
        if cfg is None:
            return cls()
        nets = tuple(ipaddress.ip_network(n) for n in getattr(cfg, "allowed_networks", None) or ())
        return cls(bool(getattr(cfg, "allow_private_networks", False)), nets)

    def problem(self, address: str | IPAddress) -> str | None:
        """Why a connection to ``address`` (an IP address) is refused, or None."""
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
    """A connection would have gone to an address its NetworkPolicy refuses."""


def legacy_ipv4_form(host: str) -> bool:
    """True for host names the C resolver reads as an IPv4 address in a legacy form
    (``2130706433``, ``127.1``, ``0x7f.0.0.1``, ``017700000001``)."""
    if not host or not all(c in "0123456789abcdefxABCDEFX." for c in host):
        return False
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


def url_problem(url: str, policy: NetworkPolicy, *, hint: str = DEFAULT_HINT) -> str | None:
    """What is wrong with ``url`` as an outbound target, from the URL alone (no DNS), or None."""
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
    return host_problem(host, policy, hint=hint)


def host_problem(host: str, policy: NetworkPolicy, *, hint: str = DEFAULT_HINT) -> str | None:
    """What is wrong with a URL's host (a name or a literal address) without DNS, or None."""
    name = host.rstrip(".").lower()  # "127.0.0.1." resolves like "127.0.0.1"
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        ip = None
    if ip is not None:
        problem = policy.problem(ip)
        return f"points at {problem}: {hint}" if problem else None
    if legacy_ipv4_form(name):
        return f"host {host!r} is an IPv4 address in a non-canonical form; write the address as a.b.c.d"
    if name == "localhost" or name.endswith(".localhost"):
        problem = policy.problem("127.0.0.1")
        return f"points at localhost (loopback name): {hint}" if problem else None
    return None


async def resolve_problem(
    url: str, policy: NetworkPolicy, *, resolve_timeout: float = 2.0, hint: str = DEFAULT_HINT
) -> str | None:
    """What is wrong with the addresses ``url``'s host resolves to now, or None (also when it
    does not resolve, or not within ``resolve_timeout``: connections are checked anyway).
    Call ``url_problem`` first: this assumes a URL that passed it."""
    parsed = URL(url)
    host = parsed.host
    try:
        ipaddress.ip_address(host.rstrip("."))
        return None  # a literal address: url_problem checked it
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
            return f"host {host!r} resolves to {problem}: {hint}"
    return None


class GuardedResolver(AbstractResolver):
    """Resolves with ``base`` and keeps only the addresses the policy allows; what it returns
    is what the connector connects to (no second lookup), so the check pins the connection."""

    def __init__(self, policy: NetworkPolicy, base: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._base = base or ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        results: list[ResolveResult] = await self._base.resolve(host, port, family)
        allowed = [r for r in results if self._policy.problem(r["host"]) is None]
        if not allowed:
            first = self._policy.problem(results[0]["host"]) if results else "no address"
            raise AddressRefused(f"host {host!r} resolves to {first}")
        return allowed

    async def close(self) -> None:
        await self._base.close()


def guarded_socket(policy: NetworkPolicy, addr_info) -> socket.socket:
    """The last wall (an aiohttp ``socket_factory``): the address this socket is about to
    connect to, whichever way it was found (literal in the URL, resolved, happy-eyeballs fallback)."""
    family, type_, proto, _, sockaddr = addr_info
    problem = policy.problem(sockaddr[0])
    if problem is not None:
        raise AddressRefused(problem)
    return socket.socket(family=family, type=type_, proto=proto)


def guarded_connector(
    policy: NetworkPolicy, *, resolver: AbstractResolver | None = None, **kwargs
) -> aiohttp.TCPConnector:
    """An aiohttp connector that reaches only addresses ``policy`` allows. ``kwargs`` go to
    TCPConnector (``limit``, ``force_close``, ...); DNS caching is off so every connection
    checks what it resolves to."""
    kwargs.setdefault("use_dns_cache", False)
    return aiohttp.TCPConnector(
        resolver=GuardedResolver(policy, resolver),
        socket_factory=lambda addr_info: guarded_socket(policy, addr_info),
        **kwargs,
    )


def refused_cause(exc: BaseException) -> AddressRefused | None:
    """The AddressRefused behind an aiohttp connection error, if that is what it was."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, AddressRefused):
            return exc
        exc = getattr(exc, "os_error", None) or exc.__cause__ or exc.__context__
        seen += 1
    return None
