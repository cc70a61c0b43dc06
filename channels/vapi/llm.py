"""VAPI's custom-LLM endpoint, ``POST /channels/vapi/{account}/chat/completions``.

VAPI is an OpenAI client: each turn of the call it posts the whole transcript as ``messages``
(normally ``stream: true``) with the ``call``, ``phoneNumber`` and ``customer`` objects beside
it. The adapter is an OpenAI client of the gateway in turn: it calls the gateway's
``/v1/chat/completions`` over HTTP with the account's key and ``model: agent:<name>``, and
relays the answer chunk by chunk as it arrives (the bytes unchanged: they already are OpenAI
SSE chunks), so the caller hears the first words as soon as the model has them.

Memory. With a call id the conversation is ``vapi:<call id>`` and only the turn's new messages
are sent (those after VAPI's last assistant message): the agent's memory holds the call's
history. Sending VAPI's whole transcript as well would put every earlier turn in the prompt
twice (memory's copy and VAPI's), and memory would store them again each turn. Memory is the
better copy: it has the agent's tool steps (VAPI's transcript does not), it is what the run
records and a human taking over see, and the prompt stays within the agent's memory window
however long the call runs. What it lacks: VAPI's ``firstMessage`` greeting (spoken by VAPI,
never generated here) and the truncation of an answer the caller interrupted (memory keeps the
whole answer). Without a call id (``metadataSendMode: off``) the turn runs stateless on VAPI's
transcript. System messages VAPI sends are dropped either way: the agent's versioned prompt is
the system message.

No PostgreSQL on this path: the account is in memory, the rest is the gateway's turn.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

import orjson

from channels.vapi import metrics, wire
from channels.vapi.config import VapiAccount
from core import http
from core.config import Timeouts
from core.errors import InvalidRequest, NotFound, Unauthenticated
from core.upstream import Upstream

log = logging.getLogger("gateway.channels.vapi")

GREETING = "The call has just connected. Greet the caller."
_PASSED = ("temperature", "max_tokens", "max_completion_tokens", "tools", "tool_choice", "stream_options")
_RELAYED_HEADERS = (
    "content-type",
    "x-request-id",
    "x-gateway-agent",
    "x-gateway-prompt-version",
    "x-gateway-degraded",
    "retry-after",
)


def gateway_request(account: VapiAccount, body: dict) -> tuple[dict, dict[str, str]]:
    """The gateway request (body, headers) for one custom-LLM request of VAPI's. Raises
    InvalidRequest / NotFound naming the field."""
    messages = body.get("messages")
    if not isinstance(messages, list) or len(messages) > wire.MAX_MESSAGES:
        raise InvalidRequest(f"'messages' must be an array of at most {wire.MAX_MESSAGES} messages.", param="messages")
    info = wire.call_info(
        body.get("call"), body.get("phoneNumber"), body.get("customer"), body.get("metadata"), account=account
    )
    agent = info_agent(account, info, body.get("model"))
    if agent is None:
        raise NotFound("No agent is mapped to this call's assistant or number.", param="model", code="model_not_found")
    conv = info.conversation_id
    turn = wire.new_turn(messages) if conv else wire.without_system(messages)
    if not turn:
        turn = [{"role": "system", "content": GREETING}]
    stream = body.get("stream", True)
    out: dict = {"model": f"agent:{agent}", "messages": turn, "stream": stream is True}
    for name in _PASSED:
        if name in body:
            out[name] = body[name]
    tools = out.get("tools")
    if tools is not None and (not isinstance(tools, list) or len(tools) > wire.MAX_TOOLS):
        raise InvalidRequest(f"'tools' must be an array of at most {wire.MAX_TOOLS} tools.", param="tools")
    if conv:
        out["metadata"] = {"conversation_id": conv}
    out["variables"] = info.variables()
    headers = {
        "Authorization": f"Bearer {account.api_key}",
        "Content-Type": "application/json",
        "x-gateway-labels": "vapi",
    }
    if account.attribute_customer and info.customer_number:
        headers["x-gateway-customer"] = info.customer_number
    user = end_user(account, info)
    if user is not None:
        headers["x-gateway-user"] = user
    return out, headers


def end_user(account: VapiAccount, info: wire.CallInfo) -> str | None:
    """Who a turn is for, as the gateway's per-user limits (``limits.user``, ``limits.agent_user``)
    and the ledger's ``end_user`` see it: a phone call's caller number (a keyed pseudonym of it
    when the account does not attribute its callers), else the call itself (a web call's visitor
    has no number; what it writes about itself is not an identity). Without it every caller
    shared the account key's limits, and one caller could take the account's whole capacity."""
    if info.customer_number:
        if account.attribute_customer:
            return info.customer_number
        digest = hmac.new(account.api_key.encode(), info.customer_number.encode(), hashlib.sha256).hexdigest()
        return f"vapi-caller:{digest[:24]}"
    if info.call_id:
        return f"vapi-call:{info.call_id}"
    return None


def info_agent(account: VapiAccount, info: wire.CallInfo, model: object) -> str | None:
    """The call's agent: mapped from its assistant or phone number, else the ``model`` VAPI sends
    (``agent:<name>``, as our assistant configs set it) when the account may reach that agent,
    else the account's default."""
    if info.assistant_id in account.assistants:
        return account.assistants[info.assistant_id]
    if info.phone_number_id in account.phone_numbers:
        return account.phone_numbers[info.phone_number_id]
    if isinstance(model, str) and model.startswith("agent:") and model[6:] in account.agents():
        return model[6:]
    return account.default_agent


async def relay(
    upstream: Upstream,
    gateway_url: str,
    account: VapiAccount,
    body: dict,
    send,
    rid: str,
) -> None:
    """Calls the gateway and streams its answer back as it comes (status, body and the
    OpenAI-relevant headers as the gateway sent them: its errors are already OpenAI-shaped)."""
    payload, headers = gateway_request(account, body)
    timeouts = Timeouts(
        connect=5.0, first_byte=account.llm_timeout_s, idle=account.llm_timeout_s, total=account.llm_timeout_s * 2
    )
    resp = await upstream.post(
        f"{gateway_url}/v1/chat/completions", orjson.dumps(payload), headers, timeouts, "gateway"
    )
    metrics.TURNS.labels(f"{resp.status // 100}xx").inc()
    if resp.status == 401:  # the account's own key: its message shows a piece of the key, not VAPI's
        resp.release()
        err = Unauthenticated(
            "The gateway refused this VAPI account's key (revoked or expired).", code="vapi_account_key_refused"
        )
        await http.send_error(send, err, rid, None)
        return
    try:
        out_headers = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
        for name in _RELAYED_HEADERS:
            value = resp.headers.get(name)
            if value is not None:
                out_headers.append((name.encode(), value.encode("latin-1")))
        if resp.headers.get("x-request-id") is None:
            out_headers.append((b"x-request-id", rid.encode()))
        await send({"type": "http.response.start", "status": resp.status, "headers": out_headers})
        try:
            async for chunk in resp.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except Exception as exc:  # the gateway broke off: end the stream; VAPI sees it end
            log.warning("gateway stream broke off", extra={"fields": {"request_id": rid, "error": type(exc).__name__}})
        await send({"type": "http.response.body", "body": b""})
    finally:
        resp.release()


async def read(scope: dict, receive, account: VapiAccount) -> dict:
    raw = await http.read_body(scope, receive, account.max_body_bytes)
    return wire.parse_object(raw, "an OpenAI chat completion request")
