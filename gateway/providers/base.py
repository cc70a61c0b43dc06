"""What every provider adapter offers, and the mapping of upstream failures to our errors."""

from __future__ import annotations

import email.utils
import time
from collections.abc import AsyncIterator, Mapping
from typing import Protocol

import orjson

from core.errors import (
    GatewayError,
    InvalidRequest,
    UpstreamError,
    UpstreamTimeout,
    upstream_client_error,
    upstream_rate_limited,
)
from core.types import RequestContext, Route


class ProviderAdapter(Protocol):
    name: str

    async def chat(self, ctx: RequestContext, route: Route, body: dict) -> bytes:
        """A complete ``chat.completion`` as JSON bytes; sets ``ctx.usage``."""

    async def open_chat_stream(self, ctx: RequestContext, route: Route, body: dict) -> AsyncIterator[bytes]:
        """Returns once the upstream accepted the request (failures before that raise, so a
        router can still fall back); the iterator yields client-ready SSE bytes, ends with
        ``[DONE]`` or an error event, and sets ``ctx.usage`` / ``ctx.ttft`` as it goes."""

    async def embeddings(self, ctx: RequestContext, route: Route, body: dict) -> bytes:
        """A ``list`` of embeddings as JSON bytes; sets ``ctx.usage``."""

    async def close(self) -> None: ...


# The longest a provider's ``retry-after`` is believed: a value beyond (centuries, infinity) would
# take the key out of rotation for good, in every replica and across restarts (shared health).
MAX_RETRY_AFTER = 3600.0


def _seconds(value: float) -> float | None:
    """A wait in seconds, bounded to ``[0, MAX_RETRY_AFTER]``; None when it is no number (NaN)."""
    if value != value:
        return None
    return min(max(0.0, value), MAX_RETRY_AFTER)


def retry_after(headers: Mapping[str, str]) -> float | None:
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return _seconds(float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return _seconds(float(value))
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return _seconds(parsed.timestamp() - time.time()) if parsed else None


def _parse_error_body(raw: bytes) -> tuple[str, str | None, str | None]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        text = raw[:200].decode("utf-8", "replace").strip()
        return (text or "no error message"), None, None
    return _error_fields(data)


def _error_fields(data: object) -> tuple[str, str | None, str | None]:
    """(message, param, code) of an OpenAI-shaped error body."""
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        msg = err.get("message")
        code = err.get("code")
        return (
            str(msg) if msg else str(err.get("type") or "no error message"),
            err.get("param") if isinstance(err.get("param"), str) else None,
            str(code) if code is not None else None,
        )
    if isinstance(err, str):
        return err, None, None
    return "no error message", None, None


def map_upstream_status(
    provider: str,
    status: int,
    message: str,
    headers: Mapping[str, str],
    *,
    param: str | None = None,
    code: str | None = None,
) -> GatewayError:
    """Turns a provider's non-2xx answer into the error the client (or the router) sees."""
    if status == 429:
        return upstream_rate_limited(f"Provider {provider} is rate limiting requests: {message}", retry_after(headers))
    if status in (401, 403):
        return UpstreamError(
            f"Provider {provider} rejected the gateway's credentials ({status}): {message}",
            code="upstream_auth_error",
            upstream_status=status,
        )
    if status == 402:  # the provider account is out of credit (OpenRouter, DeepSeek, ...)
        return UpstreamError(
            f"Provider {provider} refused the gateway's account (402): {message}",
            code="upstream_payment_required",
            upstream_status=status,
        )
    if status == 404:
        return UpstreamError(
            f"Provider {provider} does not know the deployed model: {message}",
            code="upstream_model_not_found",
            upstream_status=status,
        )
    if status == 408:
        return UpstreamTimeout(f"Provider {provider} timed out: {message}", upstream_status=status)
    if status >= 500 or status < 400:
        return UpstreamError(
            f"Provider {provider} failed with status {status}: {message}",
            status=503 if status in (503, 529) else 502,
            upstream_status=status,
            retry_after=retry_after(headers),
        )
    return upstream_client_error(status, message, param, code)


def error_from_response(provider: str, status: int, raw: bytes, headers: Mapping[str, str]) -> GatewayError:
    message, param, code = _parse_error_body(raw)
    return map_upstream_status(provider, status, message, headers, param=param, code=code)


def stream_error(provider: str, event: bytes) -> GatewayError | None:
    """The error an OpenAI-style ``data: {"error": ...}`` stream event stands for, if it is one."""
    try:
        data = orjson.loads(event[event.index(b"{") :])
    except (ValueError, orjson.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("error") is None:
        return None
    message, param, code = _error_fields(data)
    err = data["error"]
    kind = err.get("type") if isinstance(err, dict) else None
    status = 429 if "rate_limit" in f"{kind} {code}" else 500
    return map_upstream_status(provider, status, message, {}, param=param, code=code)


def encode_request(payload: dict) -> bytes:
    """The request body for the provider. JSON nested deeper than the encoder goes (255 levels;
    the parser reads 1024) is the client's request at fault: a 400, never a provider failure
    (which the router would retry on every deployment, counting towards their circuits)."""
    try:
        return orjson.dumps(payload)
    except orjson.JSONEncodeError:
        raise InvalidRequest(
            "The request is nested too deeply to be sent on (at most 250 levels).", code="invalid_value"
        ) from None


def bad_response(provider: str, what: str) -> UpstreamError:
    return UpstreamError(f"Provider {provider} returned an invalid response: {what}.", code="upstream_bad_response")


def stream_error_event(err: GatewayError) -> bytes:
    """The event that ends a stream which failed after its first byte was sent."""
    return b"data: " + err.body() + b"\n\n"


def incomplete_stream(provider: str) -> UpstreamError:
    return UpstreamError(f"Provider {provider} ended the stream before it was complete.", code="upstream_disconnected")
