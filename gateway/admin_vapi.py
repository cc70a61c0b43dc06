"""The VAPI admin API: outbound calls and call records.

    POST /admin/channels/vapi/calls   {"account", "to", "agent"?, "variables"?}  → 201 the call record
    GET  /admin/channels/vapi/calls   ?account= &limit=  → the tenant's call records, newest first
                                      (without transcripts: ``transcript_chars``)
    GET  /admin/channels/vapi/calls/{id}                  → one record (the gateway's ``vcall_`` id)

Mounted into gateway/admin.py (authenticated, access-logged). A tenant admin places calls only
from its own tenant's accounts and sees only its tenant's calls (filtered in SQL, walled by
row-level security); the super-admin may use any account and narrows listings with ``?tenant=``.
"""

from __future__ import annotations

import math

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from channels.vapi.config import VARIABLE_NAME
from core import http
from core.errors import InvalidRequest, NotFound
from gateway import admin as base  # a module, not names: admin.py imports this module in turn
from gateway import admin_input as inp

CALL_FIELDS = frozenset({"account", "to", "agent", "variables"})
MAX_VARIABLES = 20


def _variables(data: dict) -> dict:
    raw = data.get("variables")
    if raw is None:
        return {}
    if not isinstance(raw, dict) or len(raw) > MAX_VARIABLES:
        raise InvalidRequest(
            f"'variables' must be an object of at most {MAX_VARIABLES} values.", param="variables", code="invalid_type"
        )
    out = {}
    for name, value in raw.items():
        ok_value = (
            isinstance(value, bool)
            or (isinstance(value, str) and len(value) <= 1000)
            # a number JSON carries exactly (VAPI echoes it through JavaScript): no 10**30, no NaN
            or (isinstance(value, int) and abs(value) < 2**53)
            or (isinstance(value, float) and math.isfinite(value) and abs(value) < 1e15)
        )
        if not isinstance(name, str) or not VARIABLE_NAME.match(name) or not ok_value:
            raise InvalidRequest(
                "'variables' values must be strings (at most 1,000 characters), numbers (below 2**53) or booleans "
                "under plain names.",
                param=f"variables.{str(name)[:64]}",
                code="invalid_value",
            )
        out[name] = value
    return out


class VapiAdmin:
    def __init__(self, admin) -> None:
        self.admin = admin

    def routes(self) -> list[Route]:
        return [
            Route("/admin/channels/vapi/calls", self.create_call, methods=["POST"]),
            Route("/admin/channels/vapi/calls", self.list_calls, methods=["GET"]),
            Route("/admin/channels/vapi/calls/{record_id}", self.get_call, methods=["GET"]),
        ]

    def _channel(self):
        channel = self.admin.gateway.vapi
        if channel is None:
            raise NotFound("No VAPI account is configured.", code="vapi_not_configured")
        return channel

    def _account(self, request: Request, channel, name: str):
        account = channel.accounts.get(name)
        ident = base._ident(request)
        if account is None or (not ident.is_master and account.tenant != ident.tenant):
            raise NotFound(f"No VAPI account {name[:64]!r}.", param="account")
        return account

    async def create_call(self, request: Request) -> Response:
        data = await inp.body(request)
        unknown = sorted(set(data) - CALL_FIELDS)
        if unknown:
            raise InvalidRequest(
                f"Unknown parameter '{str(unknown[0])[:64]}'; known: {', '.join(sorted(CALL_FIELDS))}.",
                param=str(unknown[0])[:64],
                code="unknown_parameter",
            )
        name = inp.text(data, "account", required=True, max_len=64)
        to = inp.text(data, "to", required=True, max_len=32)
        agent = inp.text(data, "agent", max_len=64)
        variables = _variables(data)
        channel = self._channel()
        self._account(request, channel, name)
        record = await channel.place_call(name, to, agent, variables)
        return base._json(record, status=201)

    async def list_calls(self, request: Request) -> Response:
        channel = self._channel()
        limit = http.query_limit(request.query_params, 100, 1000)
        account = request.query_params.get("account") or None
        if account is not None:
            self._account(request, channel, account)
        calls = await channel.store.list(base._wall(request), base._view(request), limit, account)
        return base._json({"object": "list", "data": calls})

    async def get_call(self, request: Request) -> Response:
        channel = self._channel()
        record_id = request.path_params["record_id"][:64]
        call = await channel.store.get(base._wall(request), base._view(request), record_id)
        if call is None:
            raise NotFound(f"No call record {record_id!r}.", param="record_id")
        return base._json(call)


def routes(admin) -> list[Route]:
    """The VAPI admin routes, for gateway/admin.py's route list."""
    return VapiAdmin(admin).routes()
