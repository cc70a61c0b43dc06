"""The gateway's OpenAI API, as the channels call it: over HTTP, with the channel's API key.

A turn is ``POST {gateway}/v1/chat/completions`` with ``model: agent:<name>``, the new user
message only (the gateway keeps the conversation's memory under ``metadata.conversation_id``)
and the customer's details as the agent's runtime variables (``variables``, read by the agent
stage). When a human holds the conversation the gateway answers 200 with the hold's
acknowledgement (perhaps empty) and an ``x-gateway-escalation`` header.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import aiohttp
import orjson
from prometheus_client import Counter

from channels.http import LeanPost, header_lines
from core.queued_proof import HEADER as QUEUED_HEADER

log = logging.getLogger("channels")

MAX_RESPONSE_BYTES = 4 * 1024 * 1024
UNPROVEN = Counter(
    "gateway_channel_unproven_turns_total",
    "Channel turns sent again without their signed queue time, the gateway having refused it (this worker's "
    "erasure key is not the gateway's): a turn queued before its conversation's erasure is then not refused",
)


class GatewayUnavailable(Exception):
    """The gateway could not answer now (connection, 429, 5xx): try again later."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class GatewayRejected(Exception):
    """The gateway refused the turn (4xx other than 429): retrying will not help."""


class ConversationErased(Exception):
    """The gateway refused the turn as its conversation's, erased since the message was queued
    (409 ``conversation_erased``): the turn is dropped, neither retried nor dead-lettered."""


@dataclass(frozen=True, slots=True)
class Reply:
    text: str
    escalation: str | None = None  # the id of the escalation holding the conversation
    request_id: str | None = None


class GatewayClient(LeanPost):
    def __init__(self, base_url: str, *, timeout: float = 120.0) -> None:
        super().__init__(timeout=timeout)
        self.base_url = base_url.rstrip("/")
        self._url = f"{self.base_url}/v1/chat/completions"
        self._auth: dict[str, bytes] = {}  # api key -> its header lines, encoded once

    async def turn(
        self,
        *,
        api_key: str,
        agent: str,
        conversation_id: str,
        content: str | list,
        variables: dict,
        idempotency_key: str | None = None,
        customer: str | None = None,
        queued_at: str | None = None,
    ) -> Reply:
        """``idempotency_key``: the same turn sent again (a worker died before its acknowledgement)
        gets the gateway's first answer back, and the conversation's memory holds it once.
        ``customer``: who is asking (a WhatsApp id), as the turn's end user and customer — the
        gateway's per-user rate limits then hold one customer back instead of letting them take
        the channel key's whole capacity, and the ledger says whose turn it was. ``queued_at``:
        the message's queue time, signed (``core.queued_proof``): a turn of a conversation erased
        since then is refused (``ConversationErased``) and stores nothing. A gateway that finds
        the proof wrong (this process's erasure key is not the gateway's: a worker run apart
        without ``GATEWAY_ERASURE_KEY`` or ``GATEWAY_MASTER_KEY``) gets the turn again without
        it, as before the header existed, and the mismatch is logged."""
        body = {
            "model": f"agent:{agent}",
            "messages": [{"role": "user", "content": content}],
            "metadata": {"conversation_id": conversation_id},
            "variables": variables,
        }
        headers = self._auth.get(api_key)
        if headers is None:
            if len(self._auth) > 1024:
                self._auth.clear()
            headers = self._auth[api_key] = header_lines(
                {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
            )
        if idempotency_key is not None:
            headers += header_lines({"Idempotency-Key": idempotency_key})
        if customer is not None:
            headers += header_lines({"x-gateway-user": customer, "x-gateway-customer": customer})
        if queued_at is not None:
            headers += header_lines({QUEUED_HEADER: queued_at})
        try:
            status, head, raw = await self.post(self._url, orjson.dumps(body), headers, MAX_RESPONSE_BYTES + 1)
            escalation = head.get("x-gateway-escalation")
            request_id = head.get("x-request-id")
            retry_after = head.get("retry-after")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise GatewayUnavailable(f"gateway unreachable: {type(exc).__name__}") from None
        if status == 409 and _error_code(raw) == "idempotency_key_in_use":  # the same turn, still running
            raise GatewayUnavailable("gateway answered 409: the turn is in progress", _after(retry_after) or 1.0)
        if status == 400 and queued_at is not None and _error_field(raw, "param") == QUEUED_HEADER:
            log.warning(
                "the gateway refused this worker's signed queue time (%s): its erasure key is not the "
                "gateway's; set GATEWAY_ERASURE_KEY (or GATEWAY_MASTER_KEY) as the gateway has it",
                QUEUED_HEADER,
            )
            UNPROVEN.inc()
            return await self.turn(
                api_key=api_key,
                agent=agent,
                conversation_id=conversation_id,
                content=content,
                variables=variables,
                idempotency_key=idempotency_key,
                customer=customer,
            )
        if status == 409 and _error_code(raw) == "conversation_erased":
            raise ConversationErased("gateway answered 409: the conversation was erased since")
        if status == 429 or status >= 500:
            raise GatewayUnavailable(f"gateway answered {status}", _after(retry_after))
        if status >= 400:
            raise GatewayRejected(f"gateway answered {status}: {_error_code(raw)}")
        if len(raw) > MAX_RESPONSE_BYTES:
            raise GatewayRejected("gateway answer too large")
        try:
            message = orjson.loads(raw)["choices"][0]["message"]
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
            raise GatewayUnavailable("gateway answer is not a chat completion") from None
        text = message.get("content") if isinstance(message, dict) else None
        return Reply(text if isinstance(text, str) else "", escalation or None, request_id)


def _after(retry_after: str | None) -> float | None:
    try:
        after = float(retry_after) if retry_after else None
    except ValueError:
        return None
    return after if after is not None and 0 < after < 86_400 else None  # nan, inf, negative: no hint


def _error_code(raw: bytes) -> str:
    """The error's code only (its message may quote the customer's content)."""
    try:
        err = orjson.loads(raw)["error"]
        return str(err.get("code") or err.get("type"))[:64]
    except Exception:
        return "unknown"


def _error_field(raw: bytes, field: str) -> str | None:
    try:
        value = orjson.loads(raw)["error"].get(field)
    except Exception:
        return None
    return value if isinstance(value, str) else None
