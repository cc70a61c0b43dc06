"""A channel turn's queue time, as the gateway may trust it.

The WhatsApp worker calls the gateway as an ordinary client of its tenant (the channel account's
API key). A turn queued before its conversation's erasure must not be answered and stored after
it (``gateway.agent_stage``, ``runtime.memory``): the gateway needs the time the customer's message
was queued (``core.queue.Job.queued_us``, Redis's clock) and must not take a client's word for it
— a forged later time would store a message from before an erasure again. So the worker sends
``x-gateway-queued-at: <queued µs>.<proof>``, the proof being HMAC-SHA256 over (tenant,
conversation id, queued µs) under a key derived from the deployment's erasure key
(``core.erasure_key``), which the worker and every replica share and no client holds.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from core.erasure_key import erasure_key

HEADER = "x-gateway-queued-at"
_LABEL = b"gateway-queued-at:v1"
_VALUE = re.compile(r"^([0-9]{1,19})\.([0-9a-f]{64})$")
_keys: dict[bytes, bytes] = {}


def _key(base: bytes | None = None) -> bytes:
    """This purpose's key, derived from (never equal to) the erasure key (``base``; None: this
    process's)."""
    base = base if base is not None else erasure_key()
    key = _keys.get(base)
    if key is None:
        key = _keys[base] = hmac.new(base, _LABEL, hashlib.sha256).digest()
    return key


def _proof(tenant: str, conversation: str, queued_us: int, base: bytes | None = None) -> str:
    msg = f"{tenant}\x00{conversation}\x00{queued_us}".encode("utf-8", "surrogatepass")
    return hmac.new(_key(base), msg, hashlib.sha256).hexdigest()


def sign(tenant: str, conversation: str, queued_us: int, key: bytes | None = None) -> str:
    """The header's value for a turn of ``conversation`` queued at ``queued_us`` (``key``: the
    erasure key to derive from; None: this process's)."""
    return f"{queued_us}.{_proof(tenant, conversation, queued_us, key)}"


def verify(value: str, tenant: str, conversation: str) -> int | None:
    """The queue time (µs) the header proves for this tenant's conversation; None when it proves
    nothing (malformed, or signed for another time, conversation, tenant or deployment)."""
    m = _VALUE.match(value)
    if m is None:
        return None
    queued_us = int(m.group(1))
    return queued_us if hmac.compare_digest(m.group(2), _proof(tenant, conversation, queued_us)) else None
