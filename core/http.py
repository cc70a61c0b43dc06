"""Plain-ASGI request and response helpers for the hot path (no per-request objects)."""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import orjson

from core.errors import GatewayError, InvalidRequest, PayloadTooLarge

JSON = b"application/json"
# A caller's own request id: visible ASCII (spaces inside allowed), at most 512 characters,
# as OpenAI accepts for x-client-request-id. Anything else is ignored, never trimmed: an
# altered id would no longer match what the caller logged, which is all it is for.
_CLIENT_ID = re.compile(rb"^[\x21-\x7e](?:[\x20-\x7e]{0,510}[\x21-\x7e])?$")

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network


class ClientGone(Exception):
    """The client hung up before its request was read."""


def header(scope: dict, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def header_text(value: bytes) -> str:
    """A header's value as text. Clients write non-ASCII text in one of two ways: UTF-8 (curl,
    Go; read as latin-1, "José" became "JosÃ©" and matched no budget or allow-list set for
    José) or latin-1 (a JavaScript fetch, the OpenAI Node SDK's transport, and Python's
    http.client: a character below U+0100 one byte). UTF-8 when the bytes are, else latin-1
    (which reads any bytes)."""
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value.decode("latin-1")


# ---- request ids -------------------------------------------------------------------------------
# The gateway's own id for every request: ``req_`` + 64 random bits drawn once per process (again
# in a forked child) + a 48-bit counter. Unique across processes and replicas (a collision needs
# two processes drawing the same 64 bits), no system call per id. Ids are not secrets: knowing one
# gives nothing, since every read of audit records is authenticated and tenant-scoped.
_id_prefix = ""
_id_counter = itertools.count(1)


def _reseed_ids() -> None:
    global _id_prefix, _id_counter
    _id_prefix = "req_" + os.urandom(8).hex()
    _id_counter = itertools.count(1)


_reseed_ids()
os.register_at_fork(after_in_child=_reseed_ids)


def new_request_id() -> str:
    return f"{_id_prefix}{next(_id_counter) & 0xFFFFFFFFFFFF:012x}"


def client_request_id(scope: dict) -> str | None:
    """The caller's own id: ``x-client-request-id`` (what OpenAI accepts and echoes), else
    ``x-request-id``; ``None`` when absent or not a sane id (then it is ignored, not echoed)."""
    fallback = None
    for key, value in scope["headers"]:
        if key == b"x-client-request-id":
            return value.decode("ascii") if _CLIENT_ID.match(value) else None
        if key == b"x-request-id":
            fallback = value
    if fallback is not None and _CLIENT_ID.match(fallback):
        return fallback.decode("ascii")
    return None


# ---- client addresses ----------------------------------------------------------------------------
def parse_networks(values) -> tuple[Network, ...]:
    """CIDRs (or bare addresses) as networks; raises ValueError naming the first bad one."""
    out = []
    for value in values or ():
        try:
            out.append(ipaddress.ip_network(str(value).strip(), strict=False))
        except ValueError:
            raise ValueError(f"{str(value)[:64]!r} is not an IP address or CIDR network") from None
    return tuple(out)


def parse_address(text: str) -> Address | None:
    """An address as peers and proxies write it (``1.2.3.4``, ``1.2.3.4:5678``, ``[::1]:80``,
    ``::ffff:1.2.3.4``); ``None`` when it is none of these."""
    text = text.strip()
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        if text.startswith("["):
            text = text[1 : text.find("]")]
        elif text.count(":") == 1:
            text = text.partition(":")[0]
        else:
            return None
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            return None
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def address_in(addr: Address, networks: tuple[Network, ...]) -> bool:
    for net in networks:
        if addr.version == net.version and addr in net:
            return True
    return False


def client_address(scope: dict, trusted: tuple[Network, ...]) -> Address | None:
    """The caller's address. ``X-Forwarded-For`` is believed only when the direct peer is a
    trusted proxy, and then only as far as trusted hops go: walking it right to left, the first
    address that is not a trusted proxy is the client. ``None`` when unknown (a unix socket, or
    a trusted hop wrote something that is no address): allow-lists then refuse."""
    client = scope.get("client")
    if not client or not client[0]:
        return None
    addr = parse_address(client[0])
    if addr is None or not trusted or not address_in(addr, trusted):
        return addr
    hops: list[str] = []
    for key, value in scope["headers"]:
        if key == b"x-forwarded-for":
            hops.extend(value.decode("latin-1").split(","))
    for hop in reversed(hops):
        addr = parse_address(hop)
        if addr is None:
            return None
        if not address_in(addr, trusted):
            return addr
    return addr  # every hop was a trusted proxy: the leftmost one is the client


async def read_body(scope: dict, receive, limit: int) -> bytes:
    length = header(scope, b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"Request body of {int(length)} bytes exceeds the limit of {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def query_limit(query, default: int, maximum: int) -> int:
    """A list call's ``?limit=``: an integer from 1 to ``maximum`` (``default`` when absent), else
    a 400 naming it. ASCII digits only: ``str.isdigit`` accepts "²", which ``int`` refuses."""
    raw = query.get("limit")
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= maximum:
        raise InvalidRequest(f"'limit' must be an integer from 1 to {maximum}.", param="limit", code="invalid_value")
    return int(raw)


def parse_json(raw: bytes) -> object:
    if not raw:
        raise InvalidRequest("The request body is empty; a JSON object was expected.", code="invalid_json")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
            "your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was "
            "not valid JSON.)",
            code="invalid_json",
        ) from None
    check_depth(raw, data)
    return data


MAX_JSON_DEPTH = 128  # orjson reads 1024 levels but writes only 255: what is read must be writable
# orjson writes at most 254 nested containers: wrapped in this many lists, a body writes iff it
# nests at most MAX_JSON_DEPTH levels — one pass in C instead of a walk in Python (5-12x faster)
_DEPTH_WRAP = 254 - MAX_JSON_DEPTH


def check_depth(raw: bytes, data: object) -> None:
    """A 400 naming the top-level field of a body nested deeper than ``MAX_JSON_DEPTH`` levels
    (the gateway could not serialize it again: upstream, to the ledger, to memory). Free for a
    body with fewer brackets than that, the usual case; else one encoding pass (and a walk of its
    containers for a body that fails it)."""
    if not isinstance(data, dict | list) or raw.count(b"{") + raw.count(b"[") <= MAX_JSON_DEPTH:
        return
    wrapped = data
    for _ in range(_DEPTH_WRAP):
        wrapped = [wrapped]
    try:
        orjson.dumps(wrapped)
        return
    except orjson.JSONEncodeError:
        pass  # too deep (or not writable for another reason): the walk decides, and names the field
    stack: list[tuple[object, int, str | None]] = [(data, 1, None)]
    while stack:
        value, depth, field = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequest(
                f"The JSON body nests deeper than {MAX_JSON_DEPTH} levels"
                + (f" in '{field[:64]}'." if field is not None else "."),
                param=field[:64] if field is not None else None,
                code="invalid_value" if field is not None else "invalid_json",
            )
        items = value.items() if isinstance(value, dict) else enumerate(value)  # type: ignore[union-attr]
        for key, child in items:
            if isinstance(child, dict | list):
                top = field if field is not None else (str(key) if isinstance(value, dict) else None)
                stack.append((child, depth + 1, top))


async def send_bytes(
    send,
    status: int,
    body: bytes,
    rid: str,
    content_type: bytes = JSON,
    extra: list | None = None,
    crid: str | None = None,
) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", rid.encode()),
    ]
    if crid is not None:
        headers.append((b"x-client-request-id", crid.encode()))
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_json(
    send, status: int, obj: object, rid: str, extra: list | None = None, crid: str | None = None
) -> None:
    await send_bytes(send, status, orjson.dumps(obj), rid, extra=extra, crid=crid)


async def send_error(send, err: GatewayError, rid: str, crid: str | None = None) -> None:
    extra = [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send_bytes(send, err.status, err.body(), rid, extra=extra, crid=crid)
