"""The OpenAPI document of the public endpoints (served at /openapi.json, used by the fuzzer)."""

from __future__ import annotations

from gateway.openapi_channels import admin_channel_paths, with_idempotency

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}, {"type": "null"}]},
        "name": {"type": "string"},
        "tool_call_id": {"type": "string"},
        "tool_calls": {"type": "array", "items": {"type": "object"}},
    },
}

_CHAT_REQUEST = {
    "type": "object",
    "required": ["model", "messages"],
    "additionalProperties": True,
    "properties": {
        "model": {"type": "string"},
        "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "n": {"type": "integer", "minimum": 1, "maximum": 128},
        "max_tokens": {"type": "integer", "minimum": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]},
        "seed": {"type": "integer"},
        "logprobs": {"type": "boolean"},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        "user": {"type": "string"},
        "tools": {"type": "array", "items": {"type": "object"}},
        "tool_choice": {"anyOf": [{"type": "string", "enum": ["none", "auto", "required"]}, {"type": "object"}]},
        "response_format": {"type": "object"},
        "metadata": {"type": "object"},
    },
}

_EMBEDDINGS_REQUEST = {
    "type": "object",
    "required": ["model", "input"],
    "additionalProperties": True,
    "properties": {
        "model": {"type": "string"},
        "input": {"anyOf": [{"type": "string"}, {"type": "array"}]},
        "encoding_format": {"type": "string", "enum": ["float", "base64"]},
        "dimensions": {"type": "integer", "minimum": 1},
        "user": {"type": "string"},
    },
}


def _errors(*statuses: int) -> dict:
    return {
        str(s): {"description": "OpenAI-shaped error", "content": {"application/json": {"schema": _ERROR}}}
        for s in statuses
    }


def _post(summary: str, schema: dict) -> dict:
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "responses": {
                "200": {
                    "description": "OK",
                    "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {}},
                },
                **_errors(400, 401, 404, 413, 429, 502, 503, 504),
            },
        }
    }


def openapi_document() -> dict:
    models = {"type": "object", "required": ["object", "data"]}
    return {
        "openapi": "3.1.0",
        "info": {"title": "AI gateway (OpenAI-compatible)", "version": "0.1.0"},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": {
            "/v1/chat/completions": with_idempotency(_post("Create a chat completion", _CHAT_REQUEST), _errors),
            "/v1/embeddings": _post("Create embeddings", _EMBEDDINGS_REQUEST),
            "/v1/models": {
                "get": {
                    "summary": "List models",
                    "responses": {
                        "200": {"description": "OK", "content": {"application/json": {"schema": models}}},
                        **_errors(401),
                    },
                }
            },
            "/v1/models/{model}": {
                "get": {
                    "summary": "Retrieve a model",
                    "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {"200": {"description": "OK"}, **_errors(401, 404)},
                }
            },
            "/healthz": {
                "get": {"summary": "Process is up", "security": [], "responses": {"200": {"description": "OK"}}}
            },
            "/readyz": {
                "get": {
                    "summary": "Database and Redis reachable",
                    "security": [],
                    "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}},
                }
            },
        },
    }


def admin_document() -> dict:
    obj = {"type": "object"}
    ok = {"description": "OK", "content": {"application/json": {"schema": obj}}}

    def op(summary: str, body: dict | None = None, statuses=(400, 401, 403, 404)) -> dict:
        entry: dict = {"summary": summary, "responses": {"200": ok, **_errors(*statuses)}}
        if body is not None:
            entry["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
        return entry

    key_body = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string"},
            "tenant": {"type": "string"},
            "scopes": {"type": "array", "items": {"type": "string", "enum": ["admin"]}},
            "models": {"type": "array", "items": {"type": "string"}},
            "require_tags": {"type": "array", "items": {"type": "string"}},
            "rpm": {"type": "integer", "minimum": 1},
            "tpm": {"type": "integer", "minimum": 1},
            "budget_usd": {"type": "number", "exclusiveMinimum": 0},
            "budget_period": {"type": "string", "enum": ["daily", "weekly", "monthly", "none"]},
            "expires_at": {"type": "string", "format": "date-time"},
            "pii_policy": {"type": "string", "description": "a policy name from the config's pii.policies"},
            "allowed_ips": {"type": "array", "items": {"type": "string"}, "description": "client networks (CIDR)"},
            "attribution": {
                "type": "object",
                "description": "values the key may assert per field (user, agent, workflow, customer, tags); "
                "a trailing * is a prefix",
                "additionalProperties": {"type": "array", "items": {"type": "string"}},
            },
        },
    }
    budget_body = {
        "type": "object",
        "required": ["scope", "scope_value", "limit_usd"],
        "properties": {
            "scope": {"type": "string", "enum": ["tenant", "key", "user", "agent", "workflow", "customer", "tag"]},
            "scope_value": {"type": "string"},
            "limit_usd": {"type": "number", "exclusiveMinimum": 0},
            "period": {"type": "string", "enum": ["daily", "weekly", "monthly", "none"]},
            "thresholds": {"type": "array", "items": {"type": "number"}},
            "webhook_url": {"type": "string", "format": "uri"},
            "enforcement": {"type": "string", "enum": ["hard", "soft"]},
            "tenant": {"type": "string", "description": "super-admin only; a tenant admin's budgets are its own"},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "AI gateway admin API", "version": "0.1.0"},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": {
            "/admin/keys": {"post": op("Create a key (shown once)", key_body), "get": op("List keys")},
            "/admin/keys/{key_id}": {"delete": op("Revoke a key")},
            "/admin/budgets": {"post": op("Create a budget", budget_body), "get": op("List budgets with spend")},
            "/admin/budgets/{budget_id}": {
                "get": op("A budget, its spend and alert state"),
                "patch": op("Change limit, thresholds or webhook", obj),
                "delete": op("Delete a budget"),
            },
            "/admin/spend": {
                "get": {
                    **op("Spend grouped by an attribution field, model, provider or day"),
                    "parameters": [
                        {
                            "name": "group_by",
                            "in": "query",
                            "schema": {
                                "type": "string",
                                "enum": [
                                    "tenant",
                                    "key",
                                    "user",
                                    "agent",
                                    "workflow",
                                    "customer",
                                    "tag",
                                    "model",
                                    "provider",
                                    "deployment",
                                    "day",
                                ],
                            },
                        },
                        {"name": "from", "in": "query", "schema": {"type": "string"}},
                        {"name": "to", "in": "query", "schema": {"type": "string"}},
                        {"name": "format", "in": "query", "schema": {"type": "string", "enum": ["json", "csv"]}},
                    ],
                }
            },
            "/admin/requests/{request_id}": {"get": op("One request's audit record")},
            "/admin/requests": {
                "get": {
                    **op("Audit records by the caller's own x-client-request-id"),
                    "parameters": [{"name": "client_request_id", "in": "query", "schema": {"type": "string"}}],
                }
            },
            "/admin/access-log": {
                "get": {
                    **op("Who did what through the admin API (super-admin only)"),
                    "parameters": [
                        {"name": n, "in": "query", "schema": {"type": "string"}}
                        for n in ("actor", "tenant", "action", "from", "to", "limit")
                    ],
                }
            },
            "/admin/streams": {
                "get": op("Ledger, runs and memory streams: depth, pending, dead letters (super-admin)")
            },
            "/admin/streams/{stream}/dead-letters": {
                "get": {
                    **op("Records PostgreSQL refused, oldest first, with its SQLSTATE (super-admin)"),
                    "parameters": [
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                        {"name": "after", "in": "query", "schema": {"type": "string"}},
                    ],
                }
            },
            "/admin/streams/{stream}/dead-letters/{dead_id}/retry": {"post": op("Back into the stream (super-admin)")},
            "/admin/streams/{stream}/dead-letters/{dead_id}": {"delete": op("Drop a dead letter (super-admin)")},
            **admin_channel_paths(op),  # gateway/openapi_channels.py
        },
    }
