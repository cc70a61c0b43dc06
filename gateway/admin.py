"""The admin API (``/admin/...``): keys, budgets, spend and audit records.

Authenticated with the master key or a virtual key with the ``admin`` scope. Invalid input
gets a 400 naming the field, and nothing is half-written: every change is one statement or
one transaction.
"""

from __future__ import annotations

import csv
import io
import math
from datetime import UTC, datetime

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import http
from gateway.errors import GatewayError, InvalidRequest, MethodNotAllowed, NotFound, PermissionDenied
from policies import budgets as budget_store
from policies import keys as key_store
from policies.budgets import NANO, PERIODS, SCOPES

GROUP_FIELDS = {
    "tenant": "tenant",
    "key": "key_id",
    "user": "end_user",
    "agent": "agent",
    "workflow": "workflow",
    "customer": "customer",
    "model": "model",
    "provider": "provider",
    "deployment": "deployment",
    "day": "date_trunc('day', ts)",
    "tag": "unnest(CASE WHEN tags = '{}' THEN ARRAY[NULL]::text[] ELSE tags END)",
}


def _json(obj, status: int = 200) -> Response:
    return Response(orjson.dumps(obj, default=str), status_code=status, media_type="application/json")


async def _body(request: Request) -> dict:
    raw = await request.body()
    data = http.parse_json(raw)
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return data


def _str(data: dict, name: str, required: bool = False, choices=None) -> str | None:
    value = data.get(name)
    if value is None:
        if required:
            raise InvalidRequest(
                f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter"
            )
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"'{name}' must be a non-empty string.", param=name, code="invalid_type")
    if choices and value not in choices:
        raise InvalidRequest(f"'{name}' must be one of {', '.join(choices)}.", param=name, code="invalid_value")
    return value


def _num(data: dict, name: str, *, integer: bool = False, positive: bool = True) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (integer and value != int(value)) or (positive and value <= 0) or value < 0:
        kind = "a positive integer" if integer else "a positive number"
        raise InvalidRequest(f"'{name}' must be {kind}.", param=name, code="invalid_value")
    return int(value) if integer else float(value)


def _str_list(data: dict, name: str) -> list[str]:
    value = data.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise InvalidRequest(f"'{name}' must be an array of strings.", param=name, code="invalid_type")
    return value


def _thresholds(data: dict) -> list[float]:
    value = data.get("thresholds", [0.5, 0.8, 1.0])
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(t, int | float) and not isinstance(t, bool) and 0 < t <= 10 for t in value)
    ):
        raise InvalidRequest(
            "'thresholds' must be a non-empty array of fractions (0 < t ≤ 10).",
            param="thresholds",
            code="invalid_value",
        )
    return [float(t) for t in value]


def _url(data: dict, name: str) -> str | None:
    value = _str(data, name)
    if value is not None and not value.startswith(("http://", "https://")):
        raise InvalidRequest(f"'{name}' must be an http(s) URL.", param=name, code="invalid_value")
    return value


def _time(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"'{name}' must be an ISO 8601 date or time.", param=name, code="invalid_value") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


async def _error(request: Request, exc: GatewayError) -> Response:
    return Response(exc.body(), status_code=exc.status, media_type="application/json", headers=exc.headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    cls = {404: NotFound, 405: MethodNotAllowed}.get(exc.status_code, InvalidRequest)
    err = cls(f"{exc.detail} ({request.method} {request.url.path})")
    err.status = exc.status_code
    return await _error(request, err)


class Admin:
    def __init__(self, app) -> None:
        self.gateway = app  # GatewayApp: .svc is set at start-up
        self.app = Starlette(
            routes=[
                Route("/admin/keys", self.create_key, methods=["POST"]),
                Route("/admin/keys", self.list_keys, methods=["GET"]),
                Route("/admin/keys/{key_id}", self.revoke_key, methods=["DELETE"]),
                Route("/admin/budgets", self.create_budget, methods=["POST"]),
                Route("/admin/budgets", self.list_budgets, methods=["GET"]),
                Route("/admin/budgets/{budget_id}", self.get_budget, methods=["GET"]),
                Route("/admin/budgets/{budget_id}", self.update_budget, methods=["PATCH"]),
                Route("/admin/budgets/{budget_id}", self.delete_budget, methods=["DELETE"]),
                Route("/admin/spend", self.spend, methods=["GET"]),
                Route("/admin/requests/{request_id}", self.request_record, methods=["GET"]),
                Route("/admin/openapi.json", self.openapi, methods=["GET"]),
            ],
            exception_handlers={GatewayError: _error, HTTPException: _http_error},
        )

    async def __call__(self, scope, receive, send) -> None:
        svc = self.gateway.svc
        ident = await svc.auth.authenticate(http.header(scope, b"authorization"))
        if not ident.is_master and "admin" not in ident.scopes:
            raise PermissionDenied("This key has no admin scope.", code="admin_scope_required")
        await self.app(scope, receive, send)

    @property
    def svc(self):
        return self.gateway.svc

    # ---- keys ----------------------------------------------------------------------------------
    async def create_key(self, request: Request) -> Response:
        data = await _body(request)
        name = _str(data, "name", required=True)
        tenant = _str(data, "tenant") or "default"
        scopes = _str_list(data, "scopes")
        bad = [s for s in scopes if s not in ("admin",)]
        if bad:
            raise InvalidRequest(f"Unknown scope {bad[0]!r}; known: admin.", param="scopes", code="invalid_value")
        models = _str_list(data, "models")
        require_tags = _str_list(data, "require_tags")
        rpm = _num(data, "rpm", integer=True)
        tpm = _num(data, "tpm", integer=True)
        budget_usd = _num(data, "budget_usd")
        period = _str(data, "budget_period", choices=PERIODS) or "monthly"
        pii_policy = _str(data, "pii_policy", choices=tuple(self.svc.config.pii.policies) or ("(none configured)",))
        expires = _time(_str(data, "expires_at"), "expires_at")
        if expires is not None and expires <= datetime.now(UTC):
            raise InvalidRequest("'expires_at' must be in the future.", param="expires_at", code="invalid_value")
        meta: dict = {}
        if scopes:
            meta["scopes"] = scopes
        if models:
            meta["models"] = models
        if rpm or tpm:
            meta["limits"] = {"rpm": rpm or 0, "tpm": tpm or 0}
        if expires:
            meta["expires_at"] = expires.timestamp()
        if pii_policy:
            meta["pii_policy"] = pii_policy
        async with self.svc.pool.acquire() as conn, conn.transaction():
            key, rec = await key_store.create_key(conn, name, tenant, require_tags, extra=meta)
            budget = None
            if budget_usd:
                budget = await budget_store.create_budget(
                    conn, "key", rec.id, budget_usd, period, self.svc.config.alerts.thresholds, None
                )
        if budget is not None:
            await budget_store.announce_change(self.svc.redis)
        return _json(
            {"id": rec.id, "key": key, "name": name, "tenant": tenant, "budget_id": budget and budget.id, **meta}, 201
        )

    async def list_keys(self, request: Request) -> Response:
        async with self.svc.pool.acquire() as conn:
            rows = await key_store.list_keys(conn, include_revoked=request.query_params.get("all") == "true")
        return _json(
            {
                "data": [
                    {
                        "id": r.id,
                        "name": r.name,
                        "tenant": r.tenant,
                        "key_prefix": r.key_prefix,
                        "created_at": r.created_at,
                        "revoked_at": r.revoked_at,
                    }
                    for r in rows
                ]
            }
        )

    async def revoke_key(self, request: Request) -> Response:
        async with self.svc.pool.acquire() as conn:
            key_hash = await key_store.revoke_key(conn, request.path_params["key_id"])
        if key_hash is None:
            raise NotFound(f"No key with id {request.path_params['key_id']!r}.", param="key_id")
        await key_store.announce_revocation(self.svc.redis, key_hash)
        return _json({"id": request.path_params["key_id"], "revoked": True})

    # ---- budgets -------------------------------------------------------------------------------
    async def _state(self, b) -> dict:
        spent_key, reserved_key, alert_prefix, _ = b.keys()
        thresholds = [f"{t:g}" for t in b.thresholds]
        values = await self.svc.redis.mget([spent_key, reserved_key, *(alert_prefix + t for t in thresholds)])
        spent = int(values[0] or 0) / NANO
        return {
            "id": b.id,
            "scope": b.scope,
            "scope_value": b.scope_value,
            "limit_usd": b.limit_usd,
            "period": b.period,
            "period_id": b.window()[0],
            "thresholds": list(b.thresholds),
            "webhook_url": b.webhook_url,
            "spent_usd": spent,
            "reserved_usd": int(values[1] or 0) / NANO,
            "remaining_usd": max(0.0, b.limit_usd - spent),
            "alerts_fired": [float(t) for t, v in zip(thresholds, values[2:], strict=True) if v is not None],
        }

    async def create_budget(self, request: Request) -> Response:
        data = await _body(request)
        scope = _str(data, "scope", required=True, choices=SCOPES)
        value = _str(data, "scope_value", required=True)
        limit = _num(data, "limit_usd")
        if limit is None:
            raise InvalidRequest(
                "Missing required parameter: 'limit_usd'.", param="limit_usd", code="missing_required_parameter"
            )
        period = _str(data, "period", choices=PERIODS) or "monthly"
        thresholds, url = _thresholds(data), _url(data, "webhook_url")
        try:
            async with self.svc.pool.acquire() as conn:
                b = await budget_store.create_budget(conn, scope, value, limit, period, thresholds, url)
        except Exception as exc:
            if "unique" in str(exc).lower():
                raise InvalidRequest(
                    f"A {period} budget for {scope} {value!r} exists already.", param="scope_value", code="duplicate"
                ) from None
            raise
        await budget_store.announce_change(self.svc.redis)
        await self.svc.budgets.load()
        return _json(await self._state(b), 201)

    async def list_budgets(self, request: Request) -> Response:
        async with self.svc.pool.acquire() as conn:
            rows = await budget_store.list_budgets(conn)
        return _json({"data": [await self._state(b) for b in rows]})

    async def _get(self, budget_id: str):
        async with self.svc.pool.acquire() as conn:
            b = await budget_store.get_budget(conn, budget_id)
        if b is None:
            raise NotFound(f"No budget with id {budget_id!r}.", param="budget_id")
        return b

    async def get_budget(self, request: Request) -> Response:
        return _json(await self._state(await self._get(request.path_params["budget_id"])))

    async def update_budget(self, request: Request) -> Response:
        data = await _body(request)
        unknown = set(data) - {"limit_usd", "thresholds", "webhook_url"}
        if unknown:
            name = sorted(unknown)[0]
            raise InvalidRequest(f"'{name}' cannot be changed; create a new budget instead.", param=name)
        changes: dict = {}
        if "limit_usd" in data:
            changes["limit_usd"] = _num(data, "limit_usd")
        if "thresholds" in data:
            changes["thresholds"] = _thresholds(data)
        if "webhook_url" in data:
            changes["webhook_url"] = _url(data, "webhook_url")
        async with self.svc.pool.acquire() as conn:
            b = await budget_store.update_budget(conn, request.path_params["budget_id"], changes)
        if b is None:
            raise NotFound(f"No budget with id {request.path_params['budget_id']!r}.", param="budget_id")
        await budget_store.announce_change(self.svc.redis)
        await self.svc.budgets.load()
        return _json(await self._state(b))

    async def delete_budget(self, request: Request) -> Response:
        async with self.svc.pool.acquire() as conn:
            deleted = await budget_store.delete_budget(conn, request.path_params["budget_id"])
        if not deleted:
            raise NotFound(f"No budget with id {request.path_params['budget_id']!r}.", param="budget_id")
        await budget_store.announce_change(self.svc.redis)
        await self.svc.budgets.load()
        return _json({"id": request.path_params["budget_id"], "deleted": True})

    # ---- spend and audit -------------------------------------------------------------------------
    async def spend(self, request: Request) -> Response:
        q = request.query_params
        group_by = q.get("group_by", "key")
        if group_by not in GROUP_FIELDS:
            raise InvalidRequest(
                f"'group_by' must be one of {', '.join(GROUP_FIELDS)}.", param="group_by", code="invalid_value"
            )
        start, end = _time(q.get("from"), "from"), _time(q.get("to"), "to")
        fmt = q.get("format", "json")
        if fmt not in ("json", "csv"):
            raise InvalidRequest("'format' must be json or csv.", param="format", code="invalid_value")
        expr = GROUP_FIELDS[group_by]
        rows = await self.svc.pool.fetch(
            f"""SELECT {expr} AS grp, count(*) AS requests, sum(prompt_tokens) AS prompt_tokens,
                       sum(completion_tokens) AS completion_tokens, sum(cost_usd) AS cost_usd,
                       count(*) FILTER (WHERE status >= 400) AS errors
                FROM ledger WHERE ($1::timestamptz IS NULL OR ts >= $1) AND ($2::timestamptz IS NULL OR ts < $2)
                GROUP BY 1 ORDER BY cost_usd DESC NULLS LAST, 1""",
            start,
            end,
        )
        data = [
            {
                group_by: r["grp"],
                "requests": r["requests"],
                "prompt_tokens": int(r["prompt_tokens"] or 0),
                "completion_tokens": int(r["completion_tokens"] or 0),
                "cost_usd": float(r["cost_usd"] or 0),
                "errors": r["errors"],
            }
            for r in rows
        ]
        if fmt == "csv":
            out = io.StringIO()
            writer = csv.DictWriter(
                out, fieldnames=[group_by, "requests", "prompt_tokens", "completion_tokens", "cost_usd", "errors"]
            )
            writer.writeheader()
            writer.writerows(data)
            return Response(
                out.getvalue(),
                media_type="text/csv",
                headers={"content-disposition": f'attachment; filename="spend-by-{group_by}.csv"'},
            )
        return _json({"group_by": group_by, "from": start, "to": end, "data": data})

    async def request_record(self, request: Request) -> Response:
        row = await self.svc.pool.fetchrow(
            "SELECT * FROM ledger WHERE request_id = $1", request.path_params["request_id"]
        )
        if row is None:
            raise NotFound(
                f"No audit record for request {request.path_params['request_id']!r} (yet).", param="request_id"
            )
        record = dict(row)
        if isinstance(record.get("pii_entities"), str):
            record["pii_entities"] = orjson.loads(record["pii_entities"])
        return _json(record)

    async def openapi(self, request: Request) -> Response:
        from gateway.openapi import admin_document

        return _json(admin_document())
