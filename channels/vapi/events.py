"""VAPI's server URL, ``POST /channels/vapi/{account}/events``: ``{"message": {"type", ...}}``.

The credential is checked before the body is read (the caller does it: ``VapiChannel``); the
body is bounded, then each message type reads only the fields it needs, each checked:

- ``assistant-request``: the agent's assistant for the inbound call — VAPI's custom-LLM model
  pointing back at ``/channels/vapi/{account}`` with ``model: agent:<name>``, merged over the
  account's ``assistant`` settings (voice, transcriber, first message...).
- ``tool-calls``: the agent's server-side tools run by the gateway's tool runner (the
  composition passes it in); ``{"results": [{"toolCallId", "result" | "error"}]}`` in the
  order asked, each id exactly as VAPI sent it. At most ``MAX_TOOL_CALLS`` per message.
- ``transfer-destination-request``: the account's human line.
- ``status-update``: the call record's status (forward only).
- ``end-of-call-report``: the call record and its ledger record, once per call; its cost is
  counted in the tenant's budgets (tenant, agent, customer and the ``vapi`` tag) once too.

A status update or a report that finds an erasure of its tenant holding the erasure lock past
``server.erasure_lock_wait_s`` is answered 200 all the same and spooled (``channels.vapi.spool``):
the spool's writer writes it (``apply``) once the lock is free; a status update of a conversation
erased meanwhile is dropped, a report kept without its words (its cost counted).

Other types (``transcript``, ``speech-update``, ``conversation-update``, ``hang``...) are
acknowledged and ignored. Only the first three answer with a body.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime

from channels.vapi import metrics, wire
from channels.vapi.calls import CallStore, Dropped, Report, read_report
from channels.vapi.config import VapiAccount
from channels.vapi.spool import Spool
from core.erasure_key import TAG_PREFIX, ErasureInProgress
from core.errors import InvalidRequest

log = logging.getLogger("gateway.channels.vapi")

MAX_TOOL_CALLS = 16
MAX_TOOL_CALL_ID = 128
MAX_TOOL_NAME = 64

# (account, agent, calls as OpenAI tool_calls[], context, timeout) -> [(ok, text)] in order; the
# runner checks the account's own gateway key (as it is now) may use the agent
ToolRunner = Callable[[VapiAccount, str, list[dict], dict, float], Awaitable[list[tuple[bool, str]]]]


def assistant_config(name: str, account: VapiAccount, agent: str) -> dict:
    """The transient assistant VAPI runs for a call of ``agent``."""
    out = copy.deepcopy(account.assistant)
    model: dict = {
        "provider": "custom-llm",
        "url": f"{account.public_url}/channels/vapi/{name}",
        "model": f"agent:{agent}",
        "metadataSendMode": "variable",
    }
    if account.auth.secret:  # a bearer token is VAPI's custom-llm credential, set on VAPI's side
        model["headers"] = {"X-Vapi-Secret": account.auth.secret}
    if account.transfer_number:
        # a transfer tool without destinations: VAPI asks transfer-destination-request
        model["tools"] = [{"type": "transferCall"}]
    out["model"] = model
    out.setdefault("name", agent[:40])
    server = out.get("server") if isinstance(out.get("server"), dict) else {}
    out["server"] = {"url": f"{account.public_url}/channels/vapi/{name}/events", **server}
    if account.auth.secret:
        out["server"].setdefault("secret", account.auth.secret)
    return out


def _message(body: dict) -> tuple[dict, str]:
    message = body.get("message")
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise InvalidRequest("'message' must be an object with a 'type'.", param="message")
    return message, message["type"]


def _info(message: dict, account: VapiAccount) -> wire.CallInfo:
    return wire.call_info(message.get("call"), message.get("phoneNumber"), message.get("customer"), account=account)


def read_tool_calls(message: dict) -> list[dict]:
    """The calls of a ``tool-calls`` message as OpenAI ``tool_calls[]`` entries (arguments kept
    as the object VAPI sends; the tool runner validates them against the tool's schema)."""
    calls = message.get("toolCallList")
    if calls is None and isinstance(message.get("toolWithToolCallList"), list):
        calls = [t.get("toolCall") for t in message["toolWithToolCallList"] if isinstance(t, dict)]
    if not isinstance(calls, list) or not calls:
        raise InvalidRequest("'message.toolCallList' must be a non-empty array.", param="message.toolCallList")
    if len(calls) > MAX_TOOL_CALLS:
        raise InvalidRequest(
            f"'message.toolCallList' has more than {MAX_TOOL_CALLS} calls.", param="message.toolCallList"
        )
    out = []
    for i, call in enumerate(calls):
        where = f"message.toolCallList[{i}]"
        if not isinstance(call, dict):
            raise InvalidRequest(f"'{where}' must be an object.", param=where)
        ident = call.get("id")
        if not isinstance(ident, str) or not ident or len(ident) > MAX_TOOL_CALL_ID or not ident.isprintable():
            raise InvalidRequest(
                f"'{where}.id' must be a string of 1 to {MAX_TOOL_CALL_ID} printable characters.", param=f"{where}.id"
            )
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        name = function.get("name")
        if not isinstance(name, str) or not name or len(name) > MAX_TOOL_NAME:
            raise InvalidRequest(f"'{where}.function.name' must be a tool name.", param=f"{where}.function.name")
        arguments = function.get("arguments", {})
        out.append({"id": ident, "type": "function", "function": {"name": name, "arguments": arguments}})
    return out


# (account, agent, customer, cost in USD): a call's telephony counted in the tenant's budgets
Charger = Callable[[VapiAccount, str | None, str | None, float], Awaitable[None]]


class Events:
    def __init__(
        self,
        store: CallStore,
        run_tools: ToolRunner,
        active: Callable[[VapiAccount], Awaitable[bool]] | None = None,
        charge: Charger | None = None,
        spool: Spool | None = None,
        accounts: dict[str, VapiAccount] | None = None,
    ) -> None:
        self.store = store
        self.run_tools = run_tools
        self.active = active  # whether the account's gateway key is still active (the key cache)
        self.charge = charge
        self.spool = spool  # records kept while an erasure holds the lock (None: answered 503)
        self.accounts = accounts or {}  # (the spooled records' accounts, by name)

    async def handle(self, name: str, account: VapiAccount, body: dict, request_id: str) -> dict:
        message, kind = _message(body)
        metrics.event(kind)
        info = _info(message, account)
        agent = account.agent_for(info.assistant_id, info.phone_number_id)
        if kind == "assistant-request":
            if agent is None:
                return {"error": "No agent is configured for this number."}
            if self.active is not None and not await self.active(account):  # its turns would be refused
                return {"error": "This line is not available."}
            await self.store.upsert(account.tenant, name, info, agent, "ringing", begins=True)
            return {"assistant": assistant_config(name, account, agent)}
        if kind == "tool-calls":
            return await self._tool_calls(account, message, info, agent, request_id)
        if kind == "transfer-destination-request":
            if not account.transfer_number:
                return {"error": "No human line is configured."}
            destination = {"type": "number", "number": account.transfer_number, "message": account.transfer_message}
            return {"destination": destination}
        if kind == "status-update":
            status = message.get("status") if isinstance(message.get("status"), str) else None
            try:
                await self.store.upsert(account.tenant, name, info, agent, status)
            except ErasureInProgress as exc:
                await self.keep(exc, "status", account, name, info, agent, status=status)
                return {"spooled": True}
            return {}
        if kind == "end-of-call-report":
            report = read_report(message)
            try:
                stored = await self._report(account, name, info, agent, report)
            except ErasureInProgress as exc:
                await self.keep(exc, "report", account, name, info, agent, report=_dump_report(report))
                return {"stored": False, "spooled": True}
            return {"stored": stored is not None}
        return {}

    async def _report(
        self, account: VapiAccount, name: str, info: wire.CallInfo, agent: str | None, report: Report, **kw
    ) -> dict | None:
        stored = await self.store.report(account.tenant, name, info, agent, report, account.attribute_customer, **kw)
        if stored is not None and report.cost_usd and self.charge is not None:
            # once per call, like the ledger record: a repeated report stores nothing
            customer = stored["customer_number"] if account.attribute_customer else None
            if customer is not None and customer.startswith(TAG_PREFIX):
                # erased while it went on: its record keeps the tag, its budget still counts the
                # call under the number this report names (counted only, never stored)
                customer = info.customer_number
            await self.charge(account, stored["agent"], customer, report.cost_usd)
        return stored

    async def keep(
        self,
        refused: ErasureInProgress,
        kind: str,
        account: VapiAccount,
        name: str,
        info: wire.CallInfo,
        agent: str | None,
        **fields,
    ) -> None:
        """A record the erasure lock kept out, spooled (raises ``refused``, 503, when it cannot be)."""
        if self.spool is None:
            raise refused
        record = {
            "kind": kind,
            "tenant": account.tenant,
            "account": name,
            "conversation_id": info.conversation_id,
            "agent": agent,
            "info": dataclasses.asdict(info),
            **fields,
        }
        await self.spool.put(record, refused)

    async def apply(self, record: dict) -> None:
        """A spooled record written (the spool's writer): waits for its tenant's erasure lock, and is
        dropped when its conversation was erased meanwhile or its account is gone."""
        name = record["account"]
        account = self.accounts.get(name)
        if account is None or account.tenant != record["tenant"]:
            log.warning("VAPI spooled %s record dropped: its account is no longer configured", record["kind"])
            return
        info = wire.CallInfo(**record["info"])
        try:
            if record["kind"] == "report":
                await self._report(account, name, info, record["agent"], _load_report(record["report"]), spooled=True)
            elif record["kind"] == "status":
                await self.store.upsert(account.tenant, name, info, record["agent"], record["status"], spooled=True)
            elif record["kind"] == "placed":  # (not the call's start now: any erasure of it counts)
                await self.store.upsert(
                    account.tenant,
                    name,
                    info,
                    record["agent"],
                    record["status"],
                    spooled=True,
                    direction="outbound",
                    metadata=record["metadata"],
                )
            else:
                raise ValueError(record["kind"])
        except Dropped:
            log.info("VAPI spooled %s record dropped: its conversation was erased", record["kind"])

    async def _tool_calls(
        self, account: VapiAccount, message: dict, info: wire.CallInfo, agent: str | None, request_id: str
    ) -> dict:
        calls = read_tool_calls(message)
        if agent is None:
            return {
                "results": [{"toolCallId": c["id"], "error": "no agent is configured for this call"} for c in calls]
            }
        context = {
            "tenant": account.tenant,
            "agent": agent,
            "conversation_id": info.conversation_id,
            "request_id": request_id,
            "channel": "vapi",
        }
        outcomes = await self.run_tools(account, agent, calls, context, account.tool_timeout_s)
        results = []
        for call, (ok, text) in zip(calls, outcomes, strict=True):
            results.append(
                {"toolCallId": call["id"], "result": text} if ok else {"toolCallId": call["id"], "error": text}
            )
        return {"results": results}


def _dump_report(report: Report) -> dict:
    out = dataclasses.asdict(report)
    out["ended_at"] = report.ended_at.isoformat() if report.ended_at is not None else None
    return out


def _load_report(raw: dict) -> Report:
    ended = raw.get("ended_at")
    return Report(**{**raw, "ended_at": datetime.fromisoformat(ended) if ended else None})
