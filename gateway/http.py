"""Plain-ASGI request and response helpers for the hot path (no per-request objects)."""

from __future__ import annotations

import os
import re

import orjson

from gateway.errors import GatewayError, InvalidRequest, PayloadTooLarge

JSON = b"application/json"
_SAFE_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")


class ClientGone(Exception):
    """The client hung up before its request was read."""


def header(scope: dict, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def request_id(scope: dict) -> str:
    """The caller's ``x-request-id`` when it is sane, else a new one."""
    given = header(scope, b"x-request-id")
    if given and _SAFE_ID.match(given):
        return given.decode()
    return "req_" + os.urandom(12).hex()


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


def parse_json(raw: bytes) -> object:
    if not raw:
        raise InvalidRequest("The request body is empty; a JSON object was expected.", code="invalid_json")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
            "your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was "
            "not valid JSON.)",
            code="invalid_json",
        ) from None


async def send_bytes(
    send, status: int, body: bytes, rid: str, content_type: bytes = JSON, extra: list | None = None
) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", rid.encode()),
    ]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_json(send, status: int, obj: object, rid: str, extra: list | None = None) -> None:
    await send_bytes(send, status, orjson.dumps(obj), rid, extra=extra)


async def send_error(send, err: GatewayError, rid: str) -> None:
    extra = [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send_bytes(send, err.status, err.body(), rid, extra=extra)
