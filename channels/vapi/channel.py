"""The VAPI channel as one ASGI endpoint under ``/channels/vapi/``:

    POST /channels/vapi/{account}/chat/completions   VAPI's custom LLM (llm.py)
    POST /channels/vapi/{account}/events             VAPI's server URL (events.py)

Both check the account's credential (``wire.authentic``) before reading a byte of the body;
an unknown account and a wrong credential get the same 401 after the same work, so account
names cannot be probed. Failed attempts count against the client's address (``guard``, the
gateway's failed-authentication limiter, passed in by the composition): past its burst an
address gets 429 with ``retry-after`` before any comparison is made — unless it presented a
right credential lately (VAPI's shared egress addresses; see gateway/vapi_channel.py).
Outbound calls (``place_call``) serve the admin API and the deliverer's callbacks.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import aiohttp

from channels.vapi import llm, metrics, wire
from channels.vapi.calls import CallStore, VapiApi
from channels.vapi.config import E164, VapiAccount
from channels.vapi.events import Events, assistant_config
from channels.vapi.spool import Writer
from core import http
from core.erasure_key import ErasureInProgress
from core.errors import InvalidRequest, MethodNotAllowed, NotFound, PermissionDenied, RateLimited, Unauthenticated
from core.upstream import Upstream

log = logging.getLogger("gateway.channels.vapi")

PREFIX = "/channels/vapi/"
_UNAUTHENTICATED = "The request does not carry this VAPI account's credential."


class Guard(Protocol):
    """Failed authentications per client address (the composition's limiter)."""

    def retry_after(self, scope: dict) -> float: ...  # seconds until this address may fail again

    def failed(self, scope: dict) -> None: ...

    def succeeded(self, scope: dict) -> None: ...  # this address presented a right credential


class VapiChannel:
    def __init__(
        self,
        accounts: dict[str, VapiAccount],
        store: CallStore,
        events: Events,
        upstream: Upstream,
        gateway_url: str = "",
        *,
        guard: Guard | None = None,
        active: Callable[[VapiAccount], Awaitable[bool]] | None = None,
        admit_call: Callable[[VapiAccount, str, str], Awaitable[None]] | None = None,
        writer: Writer | None = None,
    ) -> None:
        self.accounts = accounts
        self.store = store
        self.events = events
        self.upstream = upstream
        self.gateway_url = gateway_url.rstrip("/")
        self.guard = guard
        # whether the account's gateway key is still an active key of its tenant (revocations
        # are noticed through the gateway's key cache, not at the next restart)
        self.active = active
        # (account, agent, to): raises when the call's budgets are used up (QuotaExceeded)
        self.admit_call = admit_call
        self.writer = writer  # the spooled records' writer (channels.vapi.spool)
        self._outbound: dict[str, float] = {}  # account -> GCRA theoretical arrival time
        self._session: aiohttp.ClientSession | None = None
        self.api: VapiApi | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(), trust_env=False, skip_auto_headers=("User-Agent",)
        )
        self.api = VapiApi(self._session)
        if self.writer is not None:
            self.writer.start()

    async def stop(self) -> None:
        if self.writer is not None:
            await self.writer.stop()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- HTTP ----------------------------------------------------------------------------------
    async def __call__(self, scope, receive, send, rid: str) -> None:
        name, _, rest = scope["path"][len(PREFIX) :].partition("/")
        account = self.accounts.get(name)
        if rest not in ("chat/completions", "events"):
            raise NotFound("Invalid URL: VAPI accounts serve /chat/completions and /events.")
        if scope["method"] != "POST":
            raise MethodNotAllowed(f"Use POST on /channels/vapi/{{account}}/{rest}.")
        endpoint = "llm" if rest == "chat/completions" else "events"
        if self.guard is not None:
            wait = self.guard.retry_after(scope)
            if wait > 0:  # refused before comparing: guessing on is no use
                metrics.REFUSED.labels(endpoint).inc()
                retry = str(max(1, math.ceil(wait)))
                raise RateLimited(
                    f"Too many failed authentication attempts from your address. Retry after {retry} s.",
                    code="too_many_failed_authentications",
                    headers={"retry-after": retry},
                )
        if not wire.authentic(account, scope):  # an unknown account (None) does the same work
            metrics.REFUSED.labels(endpoint).inc()
            if self.guard is not None:
                self.guard.failed(scope)
            raise Unauthenticated(_UNAUTHENTICATED, code="invalid_vapi_credential")
        if self.guard is not None:
            self.guard.succeeded(scope)
        if rest == "chat/completions":
            body = await llm.read(scope, receive, account)
            await llm.relay(self.upstream, self._gateway_url(scope), account, body, send, rid)
            return
        raw = await http.read_body(scope, receive, account.max_body_bytes)
        body = wire.parse_object(raw, "a VAPI server message")
        answer = await self.events.handle(name, account, body, rid)
        await http.send_json(send, 200, answer, rid)

    def _gateway_url(self, scope: dict) -> str:
        """``channels.gateway_url``, else this very process (the address it was reached on)."""
        if self.gateway_url:
            return self.gateway_url
        host, port = scope.get("server") or ("127.0.0.1", 8000)
        if host in ("0.0.0.0", "", None):
            host = "127.0.0.1"
        elif host == "::" or ":" in host:
            host = "[::1]" if host == "::" else f"[{host}]"
        return f"http://{host}:{port}"

    # ---- outbound calls ------------------------------------------------------------------------
    async def place_call(
        self,
        name: str,
        to: str,
        agent: str | None = None,
        variables: dict | None = None,
        first_message: str | None = None,
        extra_metadata: dict | None = None,
    ) -> dict:
        """An outbound call to ``to`` through VAPI's ``POST /call``, recorded as a call of the
        account. Raises InvalidRequest naming the field, UpstreamError when VAPI refuses."""
        account = self.accounts.get(name)
        if account is None:
            raise NotFound(f"No VAPI account {name[:64]!r}.", param="account")
        if not account.vapi_api_key or not account.outbound_phone_number_id:
            raise InvalidRequest(
                "This account has no vapi_api_key and outbound_phone_number_id configured.",
                param="account",
                code="outbound_not_configured",
            )
        if not isinstance(to, str) or not E164.match(to):
            raise InvalidRequest("'to' must be an E.164 number (+ and 7 to 15 digits).", param="to")
        if account.outbound_prefixes and not to.startswith(account.outbound_prefixes):
            raise InvalidRequest(
                "'to' is not a number this account may call (see its outbound_prefixes).",
                param="to",
                code="destination_not_allowed",
            )
        agent = agent or account.phone_numbers.get(account.outbound_phone_number_id) or account.default_agent
        if agent is None or agent not in account.agents():
            raise InvalidRequest("'agent' is not an agent this account reaches.", param="agent")
        if self.active is not None and not await self.active(account):
            raise PermissionDenied(
                "This VAPI account's gateway key is no longer active; no call is placed.",
                param="account",
                code="vapi_account_key_inactive",
            )
        if self.admit_call is not None:
            await self.admit_call(account, agent, to)
        self._pace(name, account)
        # signed: these values (a tenant admin's) come back as the call's metadata and become its
        # prompt variables, which call metadata nobody signed cannot (wire._metadata)
        metadata = wire.sign_metadata(account, {**(variables or {}), **(extra_metadata or {})}, to)
        assistant = assistant_config(name, account, agent)
        if first_message:
            assistant["firstMessage"] = first_message
        payload = {
            "phoneNumberId": account.outbound_phone_number_id,
            "customer": {"number": to},
            "assistant": assistant,
            "metadata": metadata,
        }
        data = await self.api.create_call(account.vapi_api_url, account.vapi_api_key, payload)
        info = wire.CallInfo(
            call_id=data["id"],
            call_type="outboundPhoneCall",
            phone_number_id=account.outbound_phone_number_id,
            customer_number=to,
        )
        status = data.get("status") if isinstance(data.get("status"), str) else "queued"
        kept = {k: v for k, v in metadata.items() if k != wire.SIGNATURE}
        try:
            record = await self.store.upsert(
                account.tenant, name, info, agent, status, begins=True, direction="outbound", metadata=kept
            )
        except ErasureInProgress as exc:
            # the call is placed: its record is spooled (a 503 would have the caller place it again)
            await self.events.keep(exc, "placed", account, name, info, agent, status=status, metadata=kept)
            record = None
        placed = {"object": "vapi.call", "call_id": data["id"], "account": name, "agent": agent}
        return record or {**placed, "direction": "outbound", "status": status}

    def _pace(self, name: str, account: VapiAccount) -> None:
        """At most ``outbound_per_minute`` calls a minute (that many at once, then evenly)."""
        per_minute = account.outbound_per_minute
        if not per_minute:
            return
        interval = 60.0 / per_minute
        now = time.monotonic()
        tat = max(self._outbound.get(name, now), now)
        wait = tat - interval * (per_minute - 1) - now
        if wait > 0:
            retry = str(max(1, math.ceil(wait)))
            raise RateLimited(
                f"This account placed {per_minute} calls in the last minute; retry after {retry} s.",
                code="vapi_outbound_rate_limited",
                headers={"retry-after": retry},
            )
        self._outbound[name] = tat + interval

    async def call_back(
        self, call: dict, account: VapiAccount, text: str, ref: str | None, digest: str | None = None
    ) -> str:
        """The deliverer's callback: a call to the customer of ``call`` that speaks ``text``
        (``digest`` names the words: one callback per reference and text)."""
        extra = {"reply_to": call["call_id"]}
        if ref is not None:
            extra["reply_ref"] = ref[:200]
        if digest is not None:
            extra["reply_digest"] = digest
        record = await self.place_call(
            call["account"], call["customer_number"], call["agent"], first_message=text[:2000], extra_metadata=extra
        )
        return record["call_id"]
