"""The one error hierarchy: every error a client sees is rendered from a GatewayError.

Each subclass fixes the HTTP status and OpenAI error ``type`` that OpenAI itself would use, so
the official SDKs raise the matching exception class (BadRequestError, AuthenticationError,
NotFoundError, RateLimitError, InternalServerError, ...).
"""

from __future__ import annotations

import orjson

_DEFAULT: str = "__default__"


class GatewayError(Exception):
    status: int = 500
    type: str = "server_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = _DEFAULT,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = self.default_code if code is _DEFAULT else code
        self.headers = headers or {}

    def body(self) -> bytes:
        return orjson.dumps(self.payload())

    def payload(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class Unauthenticated(GatewayError):
    status = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"


class ModelNotFound(NotFound):
    default_code = "model_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "invalid_request_error"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class QuotaExceeded(GatewayError):
    """A hard budget limit: 429 like OpenAI's ``insufficient_quota``; not worth retrying."""

    status = 429
    type = "insufficient_quota"
    default_code = "insufficient_quota"

    def __init__(self, message: str, **kw) -> None:
        super().__init__(message, **kw)
        self.headers.setdefault("x-should-retry", "false")


class UpstreamError(GatewayError):
    """The provider failed in a way that is not the client's fault.

    ``retryable`` says whether another attempt (same deployment later, another key, another
    deployment) may succeed; ``upstream_status`` is what the provider answered, if anything.
    """

    status = 502
    type = "upstream_error"
    default_code = "bad_gateway"

    def __init__(
        self,
        message: str,
        *,
        status: int = 502,
        retryable: bool = True,
        upstream_status: int | None = None,
        retry_after: float | None = None,
        error_type: str | None = None,
        **kw,
    ) -> None:
        super().__init__(message, **kw)
        self.status = status
        self.retryable = retryable
        self.upstream_status = upstream_status
        self.retry_after = retry_after
        if error_type:
            self.type = error_type
        if retry_after is not None and status == 429:
            self.headers.setdefault("retry-after", str(max(1, round(retry_after))))


class UpstreamTimeout(UpstreamError):
    default_code = "upstream_timeout"

    def __init__(self, message: str, **kw) -> None:
        super().__init__(message, status=504, **kw)


def upstream_rate_limited(message: str, retry_after: float | None) -> UpstreamError:
    return UpstreamError(
        message,
        status=429,
        upstream_status=429,
        retry_after=retry_after,
        error_type="rate_limit_error",
        code="rate_limit_exceeded",
    )


class ServiceUnavailable(GatewayError):
    status = 503
    type = "server_error"
    default_code = "service_unavailable"


def upstream_client_error(status: int, message: str, param: str | None, code: str | None):
    """An upstream 4xx caused by the request itself: relayed with the upstream's status."""
    cls = {400: InvalidRequest, 404: NotFound, 413: PayloadTooLarge, 422: InvalidRequest}.get(status, InvalidRequest)
    err = cls(message, param=param, code=code)
    err.status = status if status in (400, 404, 409, 413, 422) else 400
    return err
