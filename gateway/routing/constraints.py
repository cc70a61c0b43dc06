"""What a request demands of its deployment: from its key, its tenant and its headers.

Per-request headers: ``x-gateway-strategy`` (weighted, least-busy, latency, cost, usage),
``x-gateway-tags`` (comma-separated, all required), ``x-gateway-max-price`` (USD, estimated for
this request) and ``x-gateway-max-latency-ms``. Tags a key or tenant requires (``zdr`` for zero
data retention) are always added: a request cannot opt out of them.

A request that requires ``zdr`` cannot ask its provider to keep what it sends either
(``check_retention``, fields in core/retention.py): it is refused with a 400 naming the field,
before anything is admitted, charged or sent. Refused rather than dropped: a client asking for
stored completions would otherwise believe it has them.
"""

from __future__ import annotations

from core.config import STRATEGIES, Config
from core.errors import InvalidRequest
from core.http import header_text
from core.retention import ZDR, retaining_field
from core.types import NO_CONSTRAINTS, Constraints, Identity


def _number(raw: bytes, name: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequest(f"Header {name} must be a number.", param=name, code="invalid_value") from None
    if value < 0 or value != value:
        raise InvalidRequest(f"Header {name} must be a non-negative number.", param=name, code="invalid_value")
    return value


def _required(config: Config, identity: Identity | None) -> set[str]:
    """The tags the key and its tenant require."""
    tags: set[str] = set()
    if identity is not None:
        tags.update(identity.require_tags)
        tenant = config.tenants.get(identity.tenant)
        if tenant is not None:
            tags.update(tenant.require_tags)
    return tags


def _header_tags(scope: dict) -> set[str]:
    tags: set[str] = set()
    for name, value in scope["headers"]:
        if name == b"x-gateway-tags":
            tags.update(t.strip() for t in header_text(value).split(",") if t.strip())
    return tags


def check_retention(config: Config, identity: Identity | None, scope: dict, body: object) -> None:
    """Refuses a request that requires zero data retention and asks its provider to retain it."""
    field = retaining_field(body) if isinstance(body, dict) else None
    if field is None:
        return
    if ZDR in _required(config, identity) or ZDR in _header_tags(scope):
        raise InvalidRequest(
            f"This request requires zero data retention (tag `{ZDR}`): `{field}` would have the provider "
            f"keep it. Send the request without `{field}`"
            + (" (or with `store: false`)." if field == "store" else " (or with `in_memory`)."),
            param=field,
            code="retention_not_allowed",
        )


def constraints_for(config: Config, identity: Identity | None, scope: dict) -> Constraints:
    tags = _required(config, identity)
    strategy = max_price = max_latency = None
    for name, value in scope["headers"]:
        if not name.startswith(b"x-gateway-"):
            continue
        if name == b"x-gateway-strategy":
            strategy = value.decode("latin-1").strip()
            if strategy not in STRATEGIES:
                raise InvalidRequest(
                    f"Header x-gateway-strategy must be one of {', '.join(STRATEGIES)}.",
                    param="x-gateway-strategy",
                    code="invalid_value",
                )
        elif name == b"x-gateway-tags":
            tags.update(t.strip() for t in header_text(value).split(",") if t.strip())
        elif name == b"x-gateway-max-price":
            max_price = _number(value, "x-gateway-max-price")
        elif name == b"x-gateway-max-latency-ms":
            max_latency = _number(value, "x-gateway-max-latency-ms") / 1000
    if not tags and strategy is None and max_price is None and max_latency is None:
        return NO_CONSTRAINTS
    return Constraints(tags=frozenset(tags), max_price=max_price, max_latency=max_latency, strategy=strategy)
