"""Reading and checking admin API input: every problem is a 400 naming the field, and bodies are
bounded before they are parsed."""

from __future__ import annotations

import ipaddress
import math
from datetime import UTC, datetime
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.routing import Match

from core import http
from core.errors import InvalidRequest, NotFound, PayloadTooLarge

MAX_BODY = 256 * 1024  # admin bodies are small settings; nothing legitimate comes near this
MAX_LIST = 1000
ATTRIBUTION_FIELDS = ("user", "agent", "workflow", "customer", "tags")


async def body(request: Request) -> dict:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY:
        raise PayloadTooLarge(f"Admin request body of {int(length)} bytes exceeds the limit of {MAX_BODY} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise PayloadTooLarge(f"Admin request body exceeds the limit of {MAX_BODY} bytes.")
        chunks.append(chunk)
    data = http.parse_json(b"".join(chunks))
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return data


MAX_PAGE = 1000


def page(request: Request) -> tuple[int, str | None]:
    """(limit, after) of a list call: ``limit`` 1–1000 (default 1000), ``after`` the last id of
    the page before."""
    q = request.query_params
    limit = http.query_limit(q, MAX_PAGE, MAX_PAGE)
    after = q.get("after") or None
    if after is not None and len(after) > 128:
        raise InvalidRequest("'after' must be an id from a list's last_id.", param="after", code="invalid_value")
    return limit, after


def listing(data: list[dict], more: bool) -> dict:
    """An OpenAI-shaped list page (``more``: there are pages after it)."""
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return {"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": more}


def nul_error(routes, scope: dict) -> InvalidRequest | NotFound | None:
    """The error of a path id or query parameter holding a NUL (``%00``), which PostgreSQL text
    cannot hold: a 404 naming the id (it names nothing), a 400 naming the parameter."""
    if "\x00" in scope["path"]:
        for route in routes:
            match, child = route.matches(scope)
            if match != Match.NONE:
                for name, value in (child.get("path_params") or {}).items():
                    if "\x00" in str(value):
                        return NotFound(f"No object has a '{name}' with a NUL character.", param=name)
        return NotFound("No object has an id with a NUL character.")
    query = scope.get("query_string", b"").decode("latin-1")
    if "%00" in query:
        for name, value in parse_qsl(query, keep_blank_values=True):
            if "\x00" in name or "\x00" in value:
                return InvalidRequest(
                    f"'{name[:64]}' must not contain NUL characters.", param=name[:64], code="invalid_value"
                )
    return None


def text(data: dict, name: str, required: bool = False, choices=None, max_len: int = 256) -> str | None:
    value = data.get(name)
    if value is None:
        if required:
            raise InvalidRequest(
                f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter"
            )
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"'{name}' must be a non-empty string.", param=name, code="invalid_type")
    if "\x00" in value:
        raise InvalidRequest(f"'{name}' must not contain NUL characters.", param=name, code="invalid_value")
    if len(value) > max_len:
        raise InvalidRequest(f"'{name}' must be at most {max_len} characters.", param=name, code="invalid_value")
    if choices and value not in choices:
        raise InvalidRequest(f"'{name}' must be one of {', '.join(choices)}.", param=name, code="invalid_value")
    return value


def number(data: dict, name: str, *, integer: bool = False, positive: bool = True) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (integer and value != int(value)) or (positive and value <= 0) or value < 0 or value > 1e15:
        kind = "a positive integer" if integer else "a positive number"
        raise InvalidRequest(f"'{name}' must be {kind}.", param=name, code="invalid_value")
    return int(value) if integer else float(value)


def str_list(data: dict, name: str) -> list[str]:
    value = data.get(name)
    if value is None:
        return []
    if (
        not isinstance(value, list)
        or len(value) > MAX_LIST
        or not all(isinstance(v, str) and v and len(v) <= 256 and "\x00" not in v for v in value)
    ):
        raise InvalidRequest(
            f"'{name}' must be an array of at most {MAX_LIST} non-empty strings.", param=name, code="invalid_type"
        )
    return value


def thresholds(data: dict) -> list[float]:
    value = data.get("thresholds", [0.5, 0.8, 1.0])
    if (
        not isinstance(value, list)
        or not value
        or len(value) > 20
        or not all(isinstance(t, int | float) and not isinstance(t, bool) and 0 < t <= 10 for t in value)
    ):
        raise InvalidRequest(
            "'thresholds' must be a non-empty array of at most 20 fractions (0 < t ≤ 10).",
            param="thresholds",
            code="invalid_value",
        )
    return [float(t) for t in value]


def url(data: dict, name: str) -> str | None:
    value = text(data, name, max_len=2048)
    if value is not None and not value.startswith(("http://", "https://")):
        raise InvalidRequest(f"'{name}' must be an http(s) URL.", param=name, code="invalid_value")
    return value


def when(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        parsed.astimezone(UTC)  # in range once its offset is applied (9999-12-31T23:59-23:59 is not)
    except (ValueError, OverflowError):
        raise InvalidRequest(f"'{name}' must be an ISO 8601 date or time.", param=name, code="invalid_value") from None
    return parsed


def cidrs(data: dict, name: str) -> list[str]:
    out = []
    for value in str_list(data, name):
        try:
            out.append(str(ipaddress.ip_network(value, strict=False)))
        except ValueError:
            raise InvalidRequest(
                f"'{name}' must be an array of IP networks (CIDR), not {value[:64]!r}.",
                param=name,
                code="invalid_value",
            ) from None
    return out


def attribution(data: dict, name: str = "attribution") -> dict[str, list[str]]:
    """{"customer": ["acme", "acme-*"], ...}: values (or prefixes ending in ``*``) a key may assert."""
    value = data.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"'{name}' must be an object of value lists.", param=name, code="invalid_type")
    out: dict[str, list[str]] = {}
    for field, patterns in value.items():
        if field not in ATTRIBUTION_FIELDS:
            raise InvalidRequest(
                f"'{name}' names unknown field {str(field)[:64]!r}; known: {', '.join(ATTRIBUTION_FIELDS)}.",
                param=f"{name}.{str(field)[:64]}",
                code="invalid_value",
            )
        out[field] = str_list({field: patterns}, field)
    return out


_FORMULA = ("=", "+", "-", "@", "\t", "\r", "|")


def csv_cell(value):
    """A CSV cell that a spreadsheet shows as text, never runs as a formula (OWASP's advice:
    prefix a quote to anything starting with a formula character)."""
    if isinstance(value, str) and value.startswith(_FORMULA):
        return "'" + value
    return value
