"""``X-Hub-Signature-256``: HMAC-SHA256 of the raw request bytes with the app secret, checked
before anything is parsed, in constant time."""

from __future__ import annotations

import hashlib
import hmac

PREFIX = b"sha256="


def sign(app_secret: str, raw: bytes) -> str:
    return "sha256=" + hmac.new(app_secret.encode(), raw, hashlib.sha256).hexdigest()


def verify(app_secret: str, raw: bytes, header: bytes | None) -> bool:
    if not header or len(header) != len(PREFIX) + 64 or not header.startswith(PREFIX):
        return False
    expected = hmac.new(app_secret.encode(), raw, hashlib.sha256).hexdigest().encode()
    return hmac.compare_digest(expected, header[len(PREFIX) :].lower())
