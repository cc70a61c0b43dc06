"""The WhatsApp channel's admin API: templates, proactive sends, message records.

- ``GET/POST /admin/channels/whatsapp/templates``: the approved templates of an account (as
  registered with Meta) with the variables that fill their body parameters, in order.
- ``POST /admin/channels/whatsapp/send``: a template (any time) or text (inside the customer's
  24-hour window; else held and reported) to one recipient or a list; each recipient is queued on
  its conversation's order and sent paced under the number's throughput (``pacing_per_second``).
- ``GET /admin/channels/whatsapp/messages``: inbound and outbound records with their delivery
  status (``?status=held`` lists the replies held outside the window).

An account belongs to the tenant its config names: a tenant admin sees only its own accounts
(another tenant's is "not found"), and SQL runs in the tenant's row-level-security transaction
and filters by tenant too. The queue's dead letters are under ``/admin/queues/wa-inbound``.
"""

from __future__ import annotations

import re

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from channels.config import PHONE_NUMBER_ID
from channels.whatsapp import sender
from channels.whatsapp.worker import conversation_key
from core import http
from core.errors import GatewayError, InvalidRequest, NotFound
from gateway import admin as base  # a module, not names: admin.py imports this module in turn
from gateway import admin_input as inp
from gateway.db import tenant_transaction

MAX_RECIPIENTS = 1000
MAX_TEXT = 4096 * 4
_TEMPLATE_NAME = re.compile(r"^[a-z0-9_]{1,512}\Z")
_LANGUAGE = re.compile(r"^[a-z]{2,3}(_[A-Z]{2})?\Z")
_VARIABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
_IDEMPOTENCY = re.compile(r"^[A-Za-z0-9._:\-]{1,128}\Z")
# A WhatsApp id as Meta writes it: the E.164 number without '+' (no leading zero, 7-15 digits).
# "0044…" for the customer "44…" would be a second conversation for one person.
_RECIPIENT = re.compile(r"^[1-9][0-9]{6,14}\Z")
TEMPLATE_FIELDS = frozenset({"account", "name", "language", "category", "variables", "description", "body"})
SEND_FIELDS = frozenset({"account", "phone_number_id", "to", "text", "template"})
STATUSES = ("received", "sent", "delivered", "read", "failed", "held", "unknown")


def _only(data: dict, allowed: frozenset) -> None:
    for name in data:
        if name not in allowed:
            raise InvalidRequest(
                f"Unknown parameter: '{str(name)[:64]}'.", param=str(name)[:64], code="unknown_parameter"
            )


class ChannelsAdmin:
    def __init__(self, admin) -> None:
        self.admin = admin

    @property
    def channel(self):
        wa = self.admin.gateway.svc.whatsapp
        if wa is None:
            raise NotFound("No WhatsApp account is configured on this gateway.")
        return wa

    def routes(self) -> list[Route]:
        return [
            Route("/admin/channels/whatsapp/templates", self.list_templates, methods=["GET"]),
            Route("/admin/channels/whatsapp/templates", self.put_template, methods=["POST"]),
            Route("/admin/channels/whatsapp/send", self.send, methods=["POST"]),
            Route("/admin/channels/whatsapp/messages", self.messages, methods=["GET"]),
        ]

    def _account(self, request: Request, name: str | None, param: str = "account"):
        """(name, account) the caller may use; another tenant's account is not found."""
        if name is None:
            raise InvalidRequest(
                f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
            )
        acct = self.channel.accounts.get(name)
        view = base._ident(request)
        if acct is None or (not view.is_master and acct.tenant != view.tenant):
            raise NotFound(f"No WhatsApp account {name[:64]!r}.", param=param)
        return name, acct

    async def list_templates(self, request: Request) -> Response:
        name, acct = self._account(request, request.query_params.get("account"))
        async with tenant_transaction(self.channel.pool, base._wall(request)) as conn:
            rows = await conn.fetch(
                """SELECT name, language, category, variables, description, body, created_at, updated_at
                   FROM whatsapp_templates WHERE tenant = $1 AND account = $2 ORDER BY name, language""",
                acct.tenant,
                name,
            )
        return base._json({"object": "list", "data": [_template(r, name) for r in rows]})

    async def put_template(self, request: Request) -> Response:
        data = await inp.body(request)
        _only(data, TEMPLATE_FIELDS)
        name, acct = self._account(request, inp.text(data, "account", required=True, max_len=64))
        tpl = inp.text(data, "name", required=True, max_len=512)
        if not _TEMPLATE_NAME.match(tpl):
            raise InvalidRequest("'name' is a template name: lowercase letters, digits, '_'.", param="name")
        language = inp.text(data, "language", max_len=8) or acct.template_language
        if not _LANGUAGE.match(language):
            raise InvalidRequest("'language' is a language code such as en_US.", param="language")
        category = inp.text(data, "category", choices=("utility", "marketing", "authentication")) or "utility"
        variables = inp.str_list(data, "variables")
        if len(variables) > 20 or not all(_VARIABLE.match(v) for v in variables):
            raise InvalidRequest("'variables' is at most 20 variable names.", param="variables")
        description = inp.text(data, "description", max_len=1000) or ""
        body = inp.text(data, "body", max_len=sender.MAX_TEMPLATE_BODY)
        if body is not None and sender.placeholders(body) != {str(i) for i in range(1, len(variables) + 1)}:
            raise InvalidRequest(
                f"'body' must number its placeholders {{{{1}}}} to {{{{{len(variables)}}}}}: one for each variable, "
                "in the order of 'variables'.",
                param="body",
            )
        room = sender.room_left({"body": body, "variables": variables}, {}) if body and "reply" in variables else None
        if room is not None and room < sender.MIN_REPLY_ROOM:  # every long answer would be refused (132005)
            raise InvalidRequest(
                f"'body' leaves {max(room, 0)} characters of Meta's {sender.MAX_TEMPLATE_BODY} for the reply; "
                f"a window template needs at least {sender.MIN_REPLY_ROOM}.",
                param="body",
            )
        async with tenant_transaction(self.channel.pool, base._wall(request)) as conn:
            row = await conn.fetchrow(
                """INSERT INTO whatsapp_templates (tenant, account, name, language, category, variables, description,
                       body)
                   VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8)
                   ON CONFLICT (tenant, account, name, language) DO UPDATE SET category = EXCLUDED.category,
                       variables = EXCLUDED.variables, description = EXCLUDED.description, body = EXCLUDED.body,
                       updated_at = now()
                   RETURNING name, language, category, variables, description, body, created_at, updated_at""",
                acct.tenant,
                name,
                tpl,
                language,
                category,
                orjson.dumps(variables).decode(),
                description,
                body,
            )
        return base._json(_template(row, name), status=201)

    async def send(self, request: Request) -> Response:
        data = await inp.body(request)
        _only(data, SEND_FIELDS)
        name, acct = self._account(request, inp.text(data, "account", required=True, max_len=64))
        pnid = inp.text(data, "phone_number_id", max_len=32)
        if pnid is None:
            if len(acct.phone_numbers) != 1:
                raise InvalidRequest(
                    "'phone_number_id' is required: the account has several numbers (or none configured).",
                    param="phone_number_id",
                )
            pnid = next(iter(acct.phone_numbers))
        if not PHONE_NUMBER_ID.match(pnid) or acct.agent_for(pnid) is None:
            raise InvalidRequest("'phone_number_id' is not a number of this account.", param="phone_number_id")
        to = data.get("to")
        recipients = [to] if isinstance(to, str) else to
        if (
            not isinstance(recipients, list)
            or not 1 <= len(recipients) <= MAX_RECIPIENTS
            or not all(isinstance(r, str) and _RECIPIENT.match(r) for r in recipients)
        ):
            raise InvalidRequest(
                f"'to' is a WhatsApp id (the number with its country code, digits only, no leading zero) "
                f"or a list of 1 to {MAX_RECIPIENTS} of them.",
                param="to",
            )
        text, template = data.get("text"), data.get("template")
        if (text is None) == (template is None):
            raise InvalidRequest("Give exactly one of 'text' and 'template'.", param="text")
        payload: dict = {"kind": "send", "account": name, "tenant": acct.tenant, "pnid": pnid}
        if text is not None:
            payload["text"] = inp.text(data, "text", max_len=MAX_TEXT)
        else:
            payload["template"] = await self._template(request, acct, name, template)
        # With an Idempotency-Key, the same request again (a retry after a timeout or a partial
        # failure) queues nothing twice: each recipient's send is deduplicated on (key, recipient).
        idem = request.headers.get("idempotency-key")
        if idem is not None and not _IDEMPOTENCY.match(idem):
            raise InvalidRequest("'Idempotency-Key' is 1-128 of [A-Za-z0-9._:-].", param="Idempotency-Key")
        queued = []
        try:
            for wa_id in dict.fromkeys(recipients):
                job_payload = {**payload, "wa_id": wa_id}
                if idem is not None:
                    job_payload["idempotency"] = f"admin-send:{idem}:{wa_id}"
                job = await self.channel.inbound.enqueue(
                    job_payload,
                    key=conversation_key(name, pnid, wa_id),
                    dedupe=f"{name}:admin-send:{idem}:{wa_id}" if idem is not None else None,
                )
                queued.append({"to": wa_id, "job_id": job})
        except Exception as exc:
            raise GatewayError(
                f"Queued {len(queued)} of {len(recipients)} sends; the rest failed. "
                "Send the same request again with the same Idempotency-Key to queue only the rest."
            ) from exc
        return base._json({"object": "list", "data": queued}, status=202)

    async def _template(self, request: Request, acct, name: str, template) -> dict:
        if not isinstance(template, dict) or not set(template) <= {"name", "language", "variables"}:
            raise InvalidRequest("'template' is an object: name, language, variables.", param="template")
        tpl_name = template.get("name")
        if not isinstance(tpl_name, str) or not _TEMPLATE_NAME.match(tpl_name):
            raise InvalidRequest("'template.name' must be a template name.", param="template.name")
        language = template.get("language")
        if language is not None and (not isinstance(language, str) or not _LANGUAGE.match(language)):
            raise InvalidRequest("'template.language' must be a language code.", param="template.language")
        values = template.get("variables") or {}
        if (
            not isinstance(values, dict)
            or len(values) > 20
            or not all(
                isinstance(k, str) and isinstance(v, str | int | float) and len(str(v)) <= 1024
                for k, v in values.items()
            )
        ):
            raise InvalidRequest("'template.variables' is an object of at most 20 short values.", param="template")
        async with tenant_transaction(self.channel.pool, base._wall(request)) as conn:
            row = await conn.fetchrow(
                """SELECT name, language, variables, body FROM whatsapp_templates
                   WHERE tenant = $1 AND account = $2 AND name = $3 AND ($4::text IS NULL OR language = $4)
                   ORDER BY language LIMIT 1""",
                acct.tenant,
                name,
                tpl_name,
                language,
            )
        if row is None:
            raise NotFound(f"No template {tpl_name!r} for this account; register it first.", param="template.name")
        variables = orjson.loads(row["variables"]) if isinstance(row["variables"], str) else list(row["variables"])
        missing = [v for v in variables if v not in values]
        if missing:
            raise InvalidRequest(f"Missing template variable {missing[0]!r}.", param=f"template.variables.{missing[0]}")
        if row["body"] is not None:  # Meta refuses a body past 1,024 characters filled in (132005): say so now
            filled = sender.filled_length(row["body"], [values[v] for v in variables])
            if filled > sender.MAX_TEMPLATE_BODY:
                raise InvalidRequest(
                    f"The template's body with these values is {filled} characters; WhatsApp takes at most "
                    f"{sender.MAX_TEMPLATE_BODY}.",
                    param="template.variables",
                )
        return {
            "name": row["name"],
            "language": row["language"],
            "variables": variables,
            "values": {k: str(v) for k, v in values.items()},
        }

    async def messages(self, request: Request) -> Response:
        q = request.query_params
        name, acct = self._account(request, q.get("account"))
        status = q.get("status")
        if status is not None and status not in STATUSES:
            raise InvalidRequest(f"'status' must be one of {', '.join(STATUSES)}.", param="status")
        conv = q.get("conversation_id")
        if conv is not None and len(conv) > 256:
            raise InvalidRequest("'conversation_id' is too long.", param="conversation_id")
        limit = http.query_limit(q, 100, 1000)
        async with tenant_transaction(self.channel.pool, base._wall(request)) as conn:
            rows = await conn.fetch(
                """SELECT wamid, direction, conversation_id, wa_id, kind, body, reply_to, status, error,
                          sent_at, delivered_at, read_at, failed_at, created_at
                   FROM whatsapp_messages
                   WHERE tenant = $1 AND account = $2 AND ($3::text IS NULL OR status = $3)
                     AND ($4::text IS NULL OR conversation_id = $4)
                   ORDER BY id DESC LIMIT $5""",
                acct.tenant,
                name,
                status,
                conv,
                limit,
            )
        return base._json({"object": "list", "data": [dict(r) for r in rows]})


def _template(row, account: str) -> dict:
    variables = row["variables"]
    return {
        "object": "whatsapp.template",
        "account": account,
        "name": row["name"],
        "language": row["language"],
        "category": row["category"],
        "variables": orjson.loads(variables) if isinstance(variables, str) else variables,
        "description": row["description"],
        "body": row["body"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


def routes(admin) -> list[Route]:
    """The WhatsApp channel's admin routes, for gateway/admin.py's route list."""
    return ChannelsAdmin(admin).routes()
