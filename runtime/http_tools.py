"""One call of an ``http`` tool: fill the URL template, send, retry what is worth retrying, read
a bounded answer. What comes back to the model names no secret and no internal address."""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Callable
from urllib.parse import quote, unquote_plus

import aiohttp
import orjson
from yarl import URL

from core import netguard
from runtime.redaction import MARK
from runtime.types import ToolSpec

log = logging.getLogger("gateway.tools")

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# A POST or PATCH is sent again only when the server cannot have acted on it: it said so (429,
# 503) or no connection was made. After a 500, 502, 504 or a connection lost mid-request the
# order may have been placed: a second one would place it twice.
IDEMPOTENT = frozenset({"GET", "PUT", "DELETE"})
NOT_ACTED_STATUSES = frozenset({429, 503})
MAX_ERROR_BODY = 500
BACKOFF_BASE_S = 0.1
BACKOFF_MAX_S = 2.0
PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")


class ToolCallFailed(Exception):
    """A tool call did not give an answer. ``status``: "error" | "timeout"; the message is
    what the model is told."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def fill_url(template: str, arguments: dict) -> str:
    """The URL template with each ``{arg}`` replaced by the argument, URL-encoded. Raises
    ValueError naming the argument when its value is a dot segment ("." or ".."), or when it
    is missing or empty in the path (``/orders/{id}`` would become ``/orders/``: another
    resource, perhaps the whole collection)."""

    def one(match: re.Match) -> str:
        value = arguments.get(match.group(1))
        in_path = query_at < 0 or match.start() < query_at
        if value is None:
            value = ""
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif not isinstance(value, str | int | float):
            value = orjson.dumps(value).decode()
        text = quote(str(value), safe="")
        if text in (".", ".."):  # a dot segment would climb the path
            raise ValueError(f"argument {match.group(1)!r} may not be {text!r}")
        if not text and in_path:
            raise ValueError(f"argument {match.group(1)!r} may not be empty (it names a resource in the path)")
        return text

    origin, _, tail = template.partition("://")
    cut = min((i for i in (tail.find("/"), tail.find("?")) if i >= 0), default=len(tail))
    rest = tail[cut:]
    query_at = rest.find("?")
    return f"{origin}://{tail[:cut]}{PLACEHOLDER_RE.sub(one, rest)}"


def build_request(spec: ToolSpec, arguments: dict) -> tuple[str, URL, bytes | None]:
    """(method, URL, JSON body or None): placeholders filled from ``arguments``; the other
    arguments go in the query (GET, DELETE) or the JSON body (POST, PUT, PATCH)."""
    config = spec.config
    template: str = config["url"]
    used = set(PLACEHOLDER_RE.findall(template))
    rest = {k: v for k, v in arguments.items() if k not in used}
    url = fill_url(template, arguments)
    method = config["method"]
    if method in ("GET", "DELETE"):
        fixed = _fixed_query_keys(template)
        for name in rest:
            if name in fixed:  # ?scope=read&scope=admin: most servers read the last one
                raise ValueError(f"argument {name[:64]!r} may not replace the tool's own query parameter")
        if rest:
            query = {k: _query_value(v) for k, v in rest.items() if v is not None}
            return method, URL(url, encoded=True).extend_query(query), None
        return method, URL(url, encoded=True), None
    return method, URL(url, encoded=True), orjson.dumps(rest)


def _fixed_query_keys(template: str) -> set[str]:
    """The names of the query parameters the URL template itself sets."""
    query = template.partition("?")[2]
    return {unquote_plus(part.partition("=")[0]) for part in query.split("&") if part}


def _query_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return orjson.dumps(value).decode()


async def call_http(
    http: aiohttp.ClientSession,
    spec: ToolSpec,
    arguments: dict,
    headers: dict[str, str],
    *,
    policy: netguard.NetworkPolicy,
    deadline: float,
    redact: Callable[[str], str] | None = None,
) -> str:
    """The tool's answer as text (truncated to ``max_response_bytes`` with a marker), passed
    through ``redact`` (an error's quoted body too). Raises ToolCallFailed."""
    config = spec.config
    method, url, body = build_request(spec, arguments)
    problem = netguard.url_problem(str(url), policy)
    if problem is not None:
        raise ToolCallFailed("error", "the tool's address is not reachable from the gateway (network policy)")
    send_headers = dict(headers)
    if body is not None:
        send_headers.setdefault("content-type", "application/json")
    send_headers.setdefault("accept", "application/json, text/plain;q=0.9, */*;q=0.5")
    attempts = 1 + int(config.get("retries", 0))
    retry_statuses = RETRY_STATUSES if method in IDEMPOTENT else NOT_ACTED_STATUSES
    timeout_s = float(config["timeout_s"])
    cap = int(config["max_response_bytes"])
    last = "no attempt"
    for attempt in range(attempts):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ToolCallFailed("timeout", "the tool did not answer in time")
        retry_after: float | None = None
        try:
            async with asyncio.timeout(min(timeout_s, remaining)):
                async with http.request(method, url, data=body, headers=send_headers, allow_redirects=False) as resp:
                    if 200 <= resp.status < 300:
                        return await read_capped(resp, cap, redact)
                    snippet = await read_capped(resp, MAX_ERROR_BODY, redact)
                    last = f"HTTP {resp.status}"
                    if resp.status not in retry_statuses or attempt + 1 == attempts:
                        raise ToolCallFailed("error", _http_error(resp.status, snippet))
                    retry_after = _retry_after(resp.headers.get("retry-after"))
        except ToolCallFailed:
            raise
        except TimeoutError:
            raise ToolCallFailed("timeout", "the tool did not answer in time") from None
        except aiohttp.ClientConnectorError as exc:
            if netguard.refused_cause(exc) is not None:
                raise ToolCallFailed(
                    "error", "the tool's address is not reachable from the gateway (network policy)"
                ) from None
            last = "cannot connect"
        except (aiohttp.ClientError, OSError) as exc:
            if netguard.refused_cause(exc) is not None:
                raise ToolCallFailed(
                    "error", "the tool's address is not reachable from the gateway (network policy)"
                ) from None
            last = f"connection failed ({type(exc).__name__})"
            if method not in IDEMPOTENT:  # the request may have arrived
                break
        if attempt + 1 < attempts:
            delay = retry_after if retry_after is not None else _backoff(attempt)
            if time.monotonic() + delay >= deadline:
                break
            await asyncio.sleep(delay)
    raise ToolCallFailed("error", f"the tool failed: {last}")


def _backoff(attempt: int) -> float:
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempt) * (0.5 + random.random() / 2)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, min(BACKOFF_MAX_S, float(value)))
    except ValueError:
        return None


def _http_error(status: int, snippet: str) -> str:
    text = " ".join(snippet.split())
    return f"the tool answered HTTP {status}" + (f": {text}" if text else "")


async def read_capped(resp: aiohttp.ClientResponse, cap: int, redact: Callable[[str], str] | None = None) -> str:
    """At most ``cap`` bytes of the (decompressed) body as text, with a marker when cut. With
    ``redact``, the body is read a little past the cap (the redactor's ``reach``: the longest
    text one secret may span), redacted, then cut, so a secret across the cut is found whole
    instead of leaking its first characters."""
    limit = cap + int(getattr(redact, "reach", 0))
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        if size + len(chunk) > limit:
            chunks.append(chunk[: limit - size])
            size = limit + 1
            break
        chunks.append(chunk)
        size += len(chunk)
    body = b"".join(chunks)
    try:
        text = body.decode(resp.charset or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        text = body.decode("utf-8", errors="replace")
    if redact is not None:
        text = redact(text)
    if size <= cap:
        return text
    encoded = text.encode("utf-8", "surrogatepass")
    if len(encoded) > cap:
        cut = len(encoded[:cap].decode("utf-8", errors="ignore"))
        mark = text.rfind(MARK, max(0, cut - len(MARK)), cut + len(MARK))
        if 0 <= mark < cut < mark + len(MARK):  # a redaction is not cut in half
            cut = mark + len(MARK)
        text = text[:cut]
    return text + f"\n[truncated: the answer exceeded {cap} bytes]"
