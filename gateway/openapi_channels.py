"""OpenAPI entries of the channels' admin routes (gateway/admin_channels.py, gateway/admin_vapi.py)
and of the chat endpoint's ``Idempotency-Key`` (gateway/idempotency.py), for gateway/openapi.py."""

from __future__ import annotations

from collections.abc import Callable

_STR = {"type": "string"}

_TEMPLATE_BODY = {
    "type": "object",
    "required": ["account", "name"],
    "additionalProperties": False,
    "properties": {
        "account": {**_STR, "description": "a WhatsApp account of the caller's tenant (channels.whatsapp.<name>)"},
        "name": {"type": "string", "pattern": "^[a-z0-9_]{1,512}$", "description": "as registered with Meta"},
        "language": {"type": "string", "pattern": "^[a-z]{2,3}(_[A-Z]{2})?$", "description": "default: the account's"},
        "category": {"type": "string", "enum": ["utility", "marketing", "authentication"]},
        "variables": {
            "type": "array",
            "maxItems": 20,
            "items": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]{0,63}$"},
            "description": "the names filling the body's parameters, in order",
        },
        "description": {"type": "string", "maxLength": 1000},
    },
}

_SEND_BODY = {
    "type": "object",
    "required": ["account", "to"],
    "additionalProperties": False,
    "description": "exactly one of text (inside the customer's 24-hour window, else held) and template",
    "properties": {
        "account": _STR,
        "phone_number_id": {**_STR, "description": "required when the account has several numbers"},
        "to": {
            "anyOf": [
                {"type": "string", "pattern": "^[0-9]{1,32}$"},
                {"type": "array", "minItems": 1, "maxItems": 1000, "items": {"type": "string"}},
            ],
            "description": "a WhatsApp id or a list of them; each is queued on its conversation, paced",
        },
        "text": {"type": "string", "maxLength": 16384},
        "template": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {
                "name": _STR,
                "language": _STR,
                "variables": {
                    "type": "object",
                    "maxProperties": 20,
                    "additionalProperties": {"type": ["string", "number"]},
                },
            },
        },
    },
}

_CALL_BODY = {
    "type": "object",
    "required": ["account", "to"],
    "additionalProperties": False,
    "properties": {
        "account": {**_STR, "description": "a VAPI account of the caller's tenant (channels.vapi.<name>)"},
        "to": {**_STR, "description": "the number to call (E.164)"},
        "agent": {**_STR, "description": "default: the account's agent"},
        "variables": {"type": "object", "maxProperties": 20, "description": "the agent's runtime variables"},
    },
}


def _query(*names: str) -> list[dict]:
    return [{"name": n, "in": "query", "schema": _STR} for n in names]


IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
    "description": "Runs the request at most once per API key: a repeat with the same key and body gets the "
    "stored answer (header x-gateway-idempotent-replay: true) without a model call; 409 while the first is "
    "in progress; 422 with another body or other x-gateway-* headers. x-gateway-idempotency-key is the same "
    "header.",
}


def with_idempotency(entry: dict, errors: Callable[..., dict]) -> dict:
    """The chat endpoint's entry with the Idempotency-Key header and its 409 and 422."""
    post = entry["post"]
    post["parameters"] = [*post.get("parameters", ()), IDEMPOTENCY_KEY]
    post["responses"] = {**post["responses"], **errors(409, 422)}
    return entry


def admin_channel_paths(op: Callable[..., dict]) -> dict:
    """``op(summary, body=None, statuses=...)`` is gateway/openapi.py's admin operation builder."""
    send = op("Queue a template or text to one recipient or a list (202: the queued jobs)", _SEND_BODY)
    send["parameters"] = [
        {
            "name": "Idempotency-Key",
            "in": "header",
            "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:\\-]{1,128}$"},
            "description": "the same request again queues nothing twice (deduplicated per recipient)",
        }
    ]
    return {
        "/admin/channels/whatsapp/templates": {
            "get": {**op("The account's approved templates and their variables"), "parameters": _query("account")},
            "post": op("Register (or update) a template: 201", _TEMPLATE_BODY),
        },
        "/admin/channels/whatsapp/send": {"post": send},
        "/admin/channels/whatsapp/messages": {
            "get": {
                **op("Inbound and outbound messages with their delivery status, newest first"),
                "parameters": [
                    *_query("account", "conversation_id"),
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {
                            "type": "string",
                            "enum": ["received", "sent", "delivered", "read", "failed", "held", "unknown"],
                        },
                    },
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                ],
            }
        },
        "/admin/channels/vapi/calls": {
            "post": op("Place an outbound call through VAPI: 201 the call record", _CALL_BODY),
            "get": {
                **op("The tenant's call records, newest first (without transcripts)"),
                "parameters": [
                    *_query("account", "tenant"),
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}},
                ],
            },
        },
        "/admin/channels/vapi/calls/{record_id}": {"get": op("One call record (the gateway's vcall_ id)")},
    }
