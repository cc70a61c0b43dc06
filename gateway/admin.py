"""The admin API (``/admin/...``): keys, budgets, spend, audit records and the access log.

Two kinds of admin:

- the **super-admin** is the master key alone: it sees and manages every tenant (``?tenant=``
  narrows a listing to one) and reads the access log;
- a **tenant admin** is a virtual key with the ``admin`` scope: everything it reads or changes is
  its own tenant's, filtered in SQL and walled by row-level security (``tenant_transaction``);
  the keys it mints are never wider than itself (policies/minting.py), and budgets the
  super-admin set on its tenant are read-only to it.

Every call by an authenticated key is written to the access log (who, what, when, from where)
before its response starts; if that write fails, the call fails. Invalid input gets a 400
naming the field, and nothing is half-written: every change is one statement or one transaction.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
from datetime import UTC, datetime, timedelta

import orjson
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core import http
from core.errors import GatewayError, InvalidRequest, MethodNotAllowed, NotFound, PermissionDenied, ServiceUnavailable
from core.types import Identity
from gateway import (
    admin_agents,
    admin_channels,
    admin_conversations,
    admin_escalations,
    admin_kb,
    admin_reports,
    admin_streams,
    admin_vapi,
    key_window,
)
from gateway import admin_input as inp
from gateway.agent_announce import WARNING
from gateway.db import BUSY, busy_error, tenant_transaction
from policies import budget_counts
from policies import budgets as budget_store
from policies import keys as key_store
from policies.alerts import budget_signing_key
from policies.budgets import ENFORCEMENTS, PERIODS, SCOPES
from policies.engine import MAX_ATTRIBUTION, MAX_TAG
from policies.minting import narrow
from policies.webhooks import NetworkPolicy, check_webhook_url

log = logging.getLogger("gateway.admin")

# A change committed whose announcement to the other replicas failed (Redis unreachable) is kept
# and answered as such, with ``x-gateway-warning`` (gateway/agent_announce.py for agents): how
# long the other replicas may act on what they held.
BUDGET_NOT_ANNOUNCED = "saved; the other replicas were not told (Redis unreachable) and read it when Redis is back"
MAX_RECORD_STEPS = 256  # audit records of one request shown (an agent turn: one per model call)
KEY_NOT_ANNOUNCED = (
    "revoked; the other replicas were not told (Redis unreachable): a key one of them had cached stays usable "
    "there for up to server.key_cache_ttl, "
)
ADMIN_CALLS_PER_MINUTE = 600  # per key (a tenant admin's, or any key refused the admin API)

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


def _json(obj, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(obj, default=str), status_code=status, media_type="application/json", headers=headers)


async def _error(request: Request, exc: GatewayError) -> Response:
    return Response(exc.body(), status_code=exc.status, media_type="application/json", headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, BUSY):  # e.g. a change that waited past the driver's timeout on another's lock
        log.warning("admin API call gave up on a busy database: %s", type(exc).__name__)
        return await _error(request, busy_error())
    log.exception("admin API error")
    return await _error(request, GatewayError("The server had an error while processing your request."))


async def _http_error(request: Request, exc: HTTPException) -> Response:
    cls = {404: NotFound, 405: MethodNotAllowed}.get(exc.status_code, InvalidRequest)
    err = cls(f"{exc.detail} ({request.method} {request.url.path})")
    err.status = exc.status_code
    return await _error(request, err)


def _ident(request: Request) -> Identity:
    return request.scope["state"]["identity"]


AUDIT_PATH = "gateway.audit_path"  # (scope key) the path the access audit records, when not the request's


def _view(request: Request) -> str | None:
    """The tenant whose rows a call sees: the caller's own, or for the super-admin every tenant
    (None) unless ``?tenant=`` names one."""
    ident = _ident(request)
    if ident.is_master:
        return request.query_params.get("tenant") or None
    return ident.tenant


def _wall(request: Request) -> str | None:
    """The row-level-security tenant of a call's transactions (None: the super-admin)."""
    ident = _ident(request)
    return None if ident.is_master else ident.tenant


def _action(scope: dict) -> str:
    endpoint = scope.get("endpoint")
    return getattr(endpoint, "__name__", None) or "unknown"


class Admin:
    def __init__(self, app) -> None:
        self.gateway = app  # GatewayApp: .svc is set at start-up
        self.reports = admin_reports.Running()  # the heavy reports running, per tenant
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
                Route("/admin/requests", self.find_requests, methods=["GET"]),
                Route("/admin/requests/{request_id}", self.request_record, methods=["GET"]),
                Route("/admin/access-log", self.access_log, methods=["GET"]),
                Route("/admin/runs/{request_id}", self.run_record, methods=["GET"]),
                Route("/admin/openapi.json", self.openapi, methods=["GET"]),
                *admin_agents.routes(self),
                *admin_kb.routes(self),
                *admin_vapi.routes(self),
                *admin_escalations.routes(self),
                *admin_conversations.routes(self),
                *admin_channels.routes(self),
                *admin_streams.routes(self),
            ],
            exception_handlers={GatewayError: _error, HTTPException: _http_error, Exception: _internal_error},
        )

    async def __call__(self, scope, receive, send) -> None:
        svc = self.gateway.svc
        ident = await svc.auth.authenticate_scope(scope)  # the key, then its allowed networks
        scope.setdefault("state", {})["identity"] = ident
        if not ident.is_master:
            # Every call, refused ones included, is a row in the append-only access log: a key's
            # calls (its minted keys' with them) are bounded per minute before any is written.
            with contextlib.suppress(ServiceUnavailable):  # Redis away: the access log still holds
                await key_window.admit(svc, ident, "admin", "Admin API calls", ADMIN_CALLS_PER_MINUTE)
        if not ident.is_master and "admin" not in ident.scopes:
            await self._audit(scope, ident, 403)
            raise PermissionDenied("This key has no admin scope.", code="admin_scope_required")
        if (nul := inp.nul_error(self.app.routes, scope)) is not None:  # PostgreSQL text holds no NUL
            await self._audit(scope, ident, nul.status)
            raise nul

        started = False

        async def audited_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                # Recorded before the first byte goes: a read that cannot be logged is not served.
                await self._audit(scope, ident, message["status"])
                started = True
            await send(message)

        try:
            await self.app(scope, receive, audited_send)
        except GatewayError:
            raise
        except Exception:
            if not started:
                raise
            # Starlette re-raises after its 500 handler (_internal_error) answered and logged it.

    async def _audit(self, scope: dict, ident: Identity, status: int) -> None:
        params = scope.get("path_params") or {}
        query = scope.get("query_string", b"").decode("latin-1")[:1000]
        target = next(iter(params.values()), None) if params else None
        addr = self.svc.auth.client_address(scope)
        tenant = None if ident.is_master else ident.tenant
        try:
            await self.svc.pool.execute(
                """INSERT INTO access_audit (actor_key_id, actor_tenant, tenant, action, method, path, target,
                                             status, client_addr, detail)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb)""",
                ident.key_id,
                tenant,
                tenant if tenant is not None else _query_tenant(query),
                _action(scope),
                scope["method"],
                # (a route may name what its path holds otherwise: an erased conversation's id, its tag)
                scope.get(AUDIT_PATH, scope["path"])[:1000].replace("\x00", "\ufffd"),  # (%00: not PostgreSQL text)
                str(target)[:256].replace("\x00", "\ufffd") if target is not None else None,
                status,
                addr,
                orjson.dumps({"query": query} if query else {}).decode(),
            )
        except Exception as exc:
            log.error("access log write failed; refusing the admin call: %s", exc)
            raise GatewayError("The access log cannot be written; the admin API is unavailable.") from None

    @property
    def svc(self):
        return self.gateway.svc

    def report_transaction(self, request: Request):
        """The transaction of a report that reads many rows (gateway/admin_reports.py): its
        statements cut at ``server.admin_report_timeout_s``, the caller's tenant's running ones
        capped at ``server.admin_reports_per_tenant``, every tenant's at
        ``server.admin_reports_total``."""
        server = self.svc.config.server
        return admin_reports.transaction(
            self.reports,
            self.svc.pool,
            _wall(request),
            timeout_s=server.admin_report_timeout_s,
            cap=server.admin_reports_per_tenant,
            total=server.admin_reports_total,
            redis=self.svc.redis,
        )

    # ---- keys ----------------------------------------------------------------------------------
    async def create_key(self, request: Request) -> Response:
        data = await inp.body(request)
        minter = _ident(request)
        name = inp.text(data, "name", required=True)
        tenant = inp.text(data, "tenant", max_len=128)
        scopes = inp.str_list(data, "scopes")
        bad = [s for s in scopes if s not in ("admin",)]
        if bad:
            raise InvalidRequest(f"Unknown scope {bad[0][:64]!r}; known: admin.", param="scopes", code="invalid_value")
        models = inp.str_list(data, "models")
        require_tags = inp.str_list(data, "require_tags")
        rpm = inp.number(data, "rpm", integer=True)
        tpm = inp.number(data, "tpm", integer=True)
        budget_usd = inp.number(data, "budget_usd")
        period = inp.text(data, "budget_period", choices=PERIODS) or "monthly"
        pii_policy = inp.text(data, "pii_policy", choices=tuple(self.svc.config.pii.policies) or ("(none configured)",))
        expires = inp.when(inp.text(data, "expires_at"), "expires_at")
        if expires is not None and expires <= datetime.now(UTC):
            raise InvalidRequest("'expires_at' must be in the future.", param="expires_at", code="invalid_value")
        allowed_ips = inp.cidrs(data, "allowed_ips")
        attribution = inp.attribution(data)
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
        if allowed_ips:
            meta["allowed_ips"] = allowed_ips
        if attribution:
            meta["attribution"] = attribution
        if require_tags:
            meta["require_tags"] = require_tags
        if not minter.is_master and self.svc.budgets.by_scope.get((minter.tenant, "key", minter.key_id)):
            # A child key would spend outside the minter's own key budget; until budgets follow
            # a key's lineage, a key held to a budget does not mint keys.
            raise PermissionDenied(
                "A key held to a budget of its own cannot mint keys (they would spend outside it); "
                "ask the super-admin.",
                param="budget_usd",
                code="key_wider_than_minter",
            )
        tenant, meta = narrow(minter, tenant, meta)
        require_tags = meta.pop("require_tags", [])
        async with tenant_transaction(self.svc.pool, _wall(request)) as conn:
            if not minter.is_master:
                await self._key_room(conn, tenant)
            key, rec = await key_store.create_key(conn, name, tenant, require_tags, extra=meta)
            budget = None
            if budget_usd and not minter.is_master:
                await self._budget_room(conn, tenant)
            if budget_usd:
                budget = await budget_store.create_budget(
                    conn,
                    tenant,
                    "key",
                    rec.id,
                    budget_usd,
                    period,
                    self.svc.config.alerts.thresholds,
                    None,
                    locked=minter.is_master,
                )
        headers = await self._announce(budget.id) if budget is not None else None
        if require_tags:
            meta["require_tags"] = require_tags
        return _json(
            {"id": rec.id, "key": key, "name": name, "tenant": tenant, "budget_id": budget and budget.id, **meta},
            201,
            headers,
        )

    async def list_keys(self, request: Request) -> Response:
        limit, after = inp.page(request)  # newest first, a page at a time: never every key at once
        async with tenant_transaction(self.svc.pool, _wall(request)) as conn:
            rows = await key_store.list_keys(
                conn,
                include_revoked=request.query_params.get("all") == "true",
                tenant=_view(request),
                limit=limit + 1,
                after=after,
            )
        return _json(
            inp.listing(
                [
                    {
                        "id": r.id,
                        "name": r.name,
                        "tenant": r.tenant,
                        "key_prefix": r.key_prefix,
                        "created_at": r.created_at,
                        "revoked_at": r.revoked_at,
                        **{k: v for k, v in r.settings.items() if k != "limits"},
                        **(r.settings.get("limits") or {}),
                    }
                    for r in rows[:limit]
                ],
                len(rows) > limit,
            )
        )

    async def revoke_key(self, request: Request) -> Response:
        key_id = request.path_params["key_id"]
        async with tenant_transaction(self.svc.pool, _wall(request)) as conn:
            revoked = await key_store.revoke_tree(conn, key_id, tenant=_view(request))  # minted keys too
        if not revoked:
            raise NotFound(f"No key with id {key_id[:64]!r}.", param="key_id")
        for _, key_hash in revoked:  # this replica at once, whatever Redis says
            self.svc.auth.invalidate(key_hash)
        headers: dict[str, str] = {}
        try:
            await key_store.announce_revocation(self.svc.redis, *(h for _, h in revoked))
        except RedisError as exc:  # revoked all the same: every replica flushes its key cache when its
            # subscription comes back, and a cached key lives server.key_cache_ttl at most meanwhile
            log.warning("key revocation not announced (Redis unreachable): %s", type(exc).__name__)
            ttl = self.svc.config.server.key_cache_ttl
            headers[WARNING] = f"{KEY_NOT_ANNOUNCED}{ttl:g} s"
        body = {"id": key_id, "revoked": True, "minted_keys_revoked": [i for i, _ in revoked[1:]]}
        return _json(body, headers=headers)

    # ---- budgets -------------------------------------------------------------------------------
    async def _state(self, b, ident: Identity | None = None) -> dict:
        return (await self._states([b], ident))[0]

    async def _states(self, budgets: list, ident: Identity | None = None) -> list[dict]:
        """The budgets as stored, with what Redis counts in their current periods: the whole page
        in one round trip (``policies.budget_counts``)."""
        try:
            counts = await budget_counts.read(self.svc.redis, budgets)
        except RedisError:  # the budgets as stored; what is spent cannot be read now (null)
            return [{**self._state_stored(b, ident), **dict.fromkeys(_COUNTED)} for b in budgets]
        return [
            {
                **self._state_stored(b, ident),
                "spent_usd": budget_counts.usd(c.spent),
                "reserved_usd": budget_counts.usd(c.reserved),
                "leased_usd": budget_counts.usd(c.leased),  # held by replicas as admission credit (in flight included)
                "remaining_usd": max(0.0, b.limit_usd - budget_counts.usd(c.spent)),
                "alerts_fired": list(c.alerts_fired),
            }
            for b, c in zip(budgets, counts, strict=True)
        ]

    def _state_stored(self, b, ident: Identity | None) -> dict:
        secret = self.svc.config.alerts.secret
        # The budget's own receiver verifies its alerts with a key of its own (policies/alerts.py).
        signing = {"webhook_signing_key": budget_signing_key(secret, b.id)} if secret and b.webhook_url else {}
        # A budget the super-admin set (locked) alerts the super-admin's receiver: its URL (often
        # carrying a token) and signing key are not the tenant admin's to read.
        hidden = b.locked and ident is not None and not ident.is_master
        if hidden:
            signing = {}
        return {
            "id": b.id,
            "tenant": b.tenant,
            "scope": b.scope,
            "scope_value": b.scope_value,
            "limit_usd": b.limit_usd,
            "period": b.period,
            "period_id": b.window()[0],
            "enforcement": b.enforcement,
            "locked": b.locked,
            "thresholds": list(b.thresholds),
            "webhook_url": None if hidden else b.webhook_url,
            **signing,
        }

    async def _announce(self, budget_id: str) -> dict[str, str]:
        """Every replica reads the budget again; with Redis away, each reloads every budget when
        its subscription comes back, so the change stands (and is answered) all the same, with
        ``x-gateway-warning`` saying so (the answer's headers)."""
        headers: dict[str, str] = {}
        try:
            await budget_store.announce_change(self.svc.redis, budget_id)
        except RedisError as exc:
            log.warning("budget change not announced (Redis unreachable): %s", type(exc).__name__)
            headers[WARNING] = BUDGET_NOT_ANNOUNCED
        await self.svc.budgets.refresh(budget_id)
        return headers

    async def _check_webhook(self, url: str | None, ident: Identity) -> None:
        """Refuse a receiver the alert sender would refuse (private, loopback, metadata
        addresses...), now rather than when the first alert fires. A tenant admin's receivers
        are held to public addresses whatever ``alerts.*`` opens for the operator's."""
        if url is None:
            return
        problem = await check_webhook_url(url, self.svc.config.alerts if ident.is_master else NetworkPolicy())
        if problem:
            raise InvalidRequest(problem, param="webhook_url", code="invalid_value")

    async def create_budget(self, request: Request) -> Response:
        data = await inp.body(request)
        ident = _ident(request)
        scope = inp.text(data, "scope", required=True, choices=SCOPES)
        # no longer than a request's attribution keeps: a budget on a longer value never applies
        longest = {"tag": MAX_TAG, "tenant": 128, "key": 128}.get(scope or "", MAX_ATTRIBUTION)
        value = inp.text(data, "scope_value", required=True, max_len=longest)
        limit = inp.number(data, "limit_usd")
        if limit is None:
            raise InvalidRequest(
                "Missing required parameter: 'limit_usd'.", param="limit_usd", code="missing_required_parameter"
            )
        period = inp.text(data, "period", choices=PERIODS) or "monthly"
        enforcement = inp.text(data, "enforcement", choices=ENFORCEMENTS) or "hard"
        thresholds, url = inp.thresholds(data), inp.url(data, "webhook_url")
        await self._check_webhook(url, ident)
        tenant = inp.text(data, "tenant", max_len=128)
        if not ident.is_master:
            if tenant is not None and tenant != ident.tenant:
                raise PermissionDenied(
                    f"This admin key belongs to tenant {ident.tenant!r}.", param="tenant", code="tenant_mismatch"
                )
            tenant = ident.tenant
            if scope == "tenant" and value != tenant:
                raise PermissionDenied("A tenant budget can only be set on your own tenant.", param="scope_value")
        async with tenant_transaction(self.svc.pool, _wall(request)) as conn:
            if scope == "key":
                owner = await key_store.key_tenant(conn, value)
                if owner is None or (tenant is not None and owner != tenant):
                    raise NotFound(f"No key with id {value[:64]!r}.", param="scope_value")
                tenant = owner
            elif scope == "tenant":
                tenant = value
            tenant = tenant or "default"
            if not ident.is_master:
                await self._budget_room(conn, tenant)
            try:
                async with conn.transaction():
                    b = await budget_store.create_budget(
                        conn,
                        tenant,
                        scope,
                        value,
                        limit,
                        period,
                        thresholds,
                        url,
                        enforcement=enforcement,
                        locked=ident.is_master,
                    )
            except Exception as exc:
                if "unique" in str(exc).lower() or "duplicate" in str(exc).lower():
                    raise InvalidRequest(
                        f"A {period} budget for {scope} {value[:64]!r} exists already.",
                        param="scope_value",
                        code="duplicate",
                    ) from None
                raise
        headers = await self._announce(b.id)
        return _json(await self._state(b), 201, headers)

    async def _key_room(self, conn, tenant: str) -> None:
        """A tenant admin's live keys are bounded (``policies.max_keys_per_tenant``); a revoked key
        frees its place."""
        cap = self.svc.config.policies.max_keys_per_tenant
        if await _held(
            conn, "gateway-keys:", "SELECT 1 FROM api_keys WHERE tenant = $1 AND revoked_at IS NULL", tenant, cap
        ):
            raise InvalidRequest(
                f"This tenant has {cap} live API keys, the most it may have; revoke one first.",
                param="name",
                code="too_many_keys",
            )

    async def _budget_room(self, conn, tenant: str) -> None:
        """A tenant admin's budgets are bounded (``policies.max_budgets_per_tenant``): each is held
        in every replica's memory."""
        cap = self.svc.config.policies.max_budgets_per_tenant
        if await _held(conn, "gateway-budgets:", "SELECT 1 FROM budgets WHERE tenant = $1", tenant, cap):
            raise InvalidRequest(
                f"This tenant has {cap} budgets, the most it may have; delete one first.",
                param="scope_value",
                code="too_many_budgets",
            )

    async def list_budgets(self, request: Request) -> Response:
        limit, after = inp.page(request)  # newest first, a page at a time
        async with tenant_transaction(self.svc.pool, _wall(request)) as conn:
            rows = await budget_store.list_budgets(conn, _view(request), limit + 1, after)
        states = await self._states(rows[:limit], _ident(request))
        return _json(inp.listing(states, len(rows) > limit))

    async def _get(self, request: Request, conn):
        budget_id = request.path_params["budget_id"]
        b = await budget_store.get_budget(conn, budget_id, _view(request))
        if b is None:
            raise NotFound(f"No budget with id {budget_id[:64]!r}.", param="budget_id")
        return b

    def _writable(self, request: Request, b) -> None:
        if b.locked and not _ident(request).is_master:
            raise PermissionDenied(
                "This budget was set by the super-admin; only the master key can change it.",
                param="budget_id",
                code="budget_locked",
            )

    async def get_budget(self, request: Request) -> Response:
        async with tenant_transaction(self.svc.pool, _wall(request)) as conn:
            b = await self._get(request, conn)
        return _json(await self._state(b, _ident(request)))

    async def update_budget(self, request: Request) -> Response:
        data = await inp.body(request)
        unknown = set(data) - set(budget_store.MUTABLE)
        if unknown:
            name = sorted(unknown)[0]
            raise InvalidRequest(f"'{name[:64]}' cannot be changed; create a new budget instead.", param=name[:64])
        changes: dict = {}
        if "limit_usd" in data:
            changes["limit_usd"] = inp.number(data, "limit_usd")
            if changes["limit_usd"] is None:  # a budget has a limit; delete it to have none
                raise InvalidRequest("'limit_usd' must be a positive number.", param="limit_usd", code="invalid_value")
        if "thresholds" in data:
            changes["thresholds"] = inp.thresholds(data)
        if "webhook_url" in data:
            changes["webhook_url"] = inp.url(data, "webhook_url")
            await self._check_webhook(changes["webhook_url"], _ident(request))
        if "enforcement" in data:
            changes["enforcement"] = inp.text(data, "enforcement", required=True, choices=ENFORCEMENTS)
        async with tenant_transaction(self.svc.pool, _wall(request)) as conn:
            self._writable(request, await self._get(request, conn))
            b = await budget_store.update_budget(conn, request.path_params["budget_id"], changes, _view(request))
        headers = await self._announce(b.id)
        return _json(await self._state(b), headers=headers)

    async def delete_budget(self, request: Request) -> Response:
        async with tenant_transaction(self.svc.pool, _wall(request)) as conn:
            self._writable(request, await self._get(request, conn))
            await budget_store.delete_budget(conn, request.path_params["budget_id"], _view(request))
        headers = await self._announce(request.path_params["budget_id"])
        return _json({"id": request.path_params["budget_id"], "deleted": True}, headers=headers)

    # ---- spend and audit -------------------------------------------------------------------------
    async def spend(self, request: Request) -> Response:
        q = request.query_params
        group_by = q.get("group_by", "key")
        if group_by not in GROUP_FIELDS:
            raise InvalidRequest(
                f"'group_by' must be one of {', '.join(GROUP_FIELDS)}.", param="group_by", code="invalid_value"
            )
        start, end = inp.when(q.get("from"), "from"), inp.when(q.get("to"), "to")
        if start is None:  # (a bounded scan: the last ``server.spend_default_days`` up to 'to' or now)
            until, days = end or datetime.now(UTC), self.svc.config.server.spend_default_days
            earliest = datetime.min.replace(tzinfo=UTC)  # ('to' in year 1: no date before it)
            start = until - timedelta(days=days) if until - earliest > timedelta(days=days) else earliest
        fmt = q.get("format", "json")
        if fmt not in ("json", "csv"):
            raise InvalidRequest("'format' must be json or csv.", param="format", code="invalid_value")
        # groups of client-chosen values (users, customers, tags) are as many as clients make:
        # the most costly ``limit`` of them (1-10000, default 1000), ``has_more`` when cut
        limit = http.query_limit(q, 1000, 10_000)
        expr = GROUP_FIELDS[group_by]
        async with self.report_transaction(request) as conn:
            rows = await conn.fetch(
                f"""SELECT {expr} AS grp, count(*) AS requests, sum(prompt_tokens) AS prompt_tokens,
                           sum(completion_tokens) AS completion_tokens, sum(cost_usd) AS cost_usd,
                           count(*) FILTER (WHERE status >= 400) AS errors
                    FROM ledger
                    WHERE ($1::timestamptz IS NULL OR ts >= $1) AND ($2::timestamptz IS NULL OR ts < $2)
                      AND ($3::text IS NULL OR tenant = $3)
                    GROUP BY 1 ORDER BY cost_usd DESC NULLS LAST, 1 LIMIT $4""",
                start,
                end,
                _view(request),
                limit + 1,
            )
        more = len(rows) > limit
        rows = rows[:limit]
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
            writer.writerows({k: inp.csv_cell(v) for k, v in row.items()} for row in data)
            return Response(
                out.getvalue(),
                media_type="text/csv",
                headers={
                    "content-disposition": f'attachment; filename="spend-by-{group_by}.csv"',
                    "x-gateway-spend-from": start.isoformat(),  # (the range read, as the JSON's 'from')
                },
            )
        return _json({"group_by": group_by, "from": start, "to": end, "data": data, "has_more": more})

    async def request_record(self, request: Request) -> Response:
        request_id = request.path_params["request_id"]
        async with tenant_transaction(self.svc.pool, _wall(request)) as conn:
            rows = await conn.fetch(
                """SELECT * FROM ledger WHERE request_id = $1 AND ($2::text IS NULL OR tenant = $2)
                   ORDER BY step, ts LIMIT $3""",
                request_id,
                _view(request),
                MAX_RECORD_STEPS,
            )
        if not rows:
            raise NotFound(f"No audit record for request {request_id[:128]!r} (yet).", param="request_id")
        # an agent turn's model calls are one record each (its steps): the first at the top, as a
        # plain request's one record is, and every one of them under ``steps``
        steps = [_record(r) for r in rows]
        return _json({**steps[0], "steps": steps})

    async def find_requests(self, request: Request) -> Response:
        """Audit records by the caller's own request id (``x-client-request-id``), newest first."""
        q = request.query_params
        client_rid = q.get("client_request_id")
        if not client_rid or "\x00" in client_rid:
            raise InvalidRequest(
                "Missing required parameter: 'client_request_id'.",
                param="client_request_id",
                code="missing_required_parameter",
            )
        async with tenant_transaction(self.svc.pool, _wall(request)) as conn:
            rows = await conn.fetch(
                """SELECT * FROM ledger WHERE client_request_id = $1 AND ($2::text IS NULL OR tenant = $2)
                   ORDER BY ts DESC LIMIT 100""",
                client_rid[:256],
                _view(request),
            )
        return _json({"data": [_record(r) for r in rows]})

    async def run_record(self, request: Request) -> Response:
        """An agent turn, step by step: every model call and tool call, with status and timing."""
        request_id = request.path_params["request_id"]
        run = await self.svc.runs.get(_view(request), request_id[:128])
        if run is None:
            raise NotFound(f"No agent run for request {request_id[:128]!r} (yet).", param="request_id")
        return _json(run)

    async def access_log(self, request: Request) -> Response:
        """Who did what through the admin API: the super-admin's alone to read."""
        if not _ident(request).is_master:
            raise PermissionDenied("Only the master key can read the access log.", code="super_admin_required")
        q = request.query_params
        start, end = inp.when(q.get("from"), "from"), inp.when(q.get("to"), "to")
        limit = http.query_limit(q, 100, 1000)
        rows = await self.svc.pool.fetch(
            """SELECT * FROM access_audit
               WHERE ($1::timestamptz IS NULL OR ts >= $1) AND ($2::timestamptz IS NULL OR ts < $2)
                 AND ($3::text IS NULL OR actor_key_id = $3) AND ($4::text IS NULL OR tenant = $4)
                 AND ($5::text IS NULL OR action = $5)
               ORDER BY id DESC LIMIT $6""",
            start,
            end,
            q.get("actor"),
            q.get("tenant"),
            q.get("action"),
            limit,
        )
        return _json({"data": [_record(r) for r in rows]})

    async def openapi(self, request: Request) -> Response:
        from gateway.openapi import admin_document

        return _json(admin_document())


_COUNTED = ("spent_usd", "reserved_usd", "leased_usd", "remaining_usd", "alerts_fired")  # read from Redis


def _query_tenant(query: str) -> str | None:
    from urllib.parse import parse_qs

    values = parse_qs(query).get("tenant")
    return values[0][:128].replace("\x00", "\ufffd") if values else None


async def _held(conn, lock: str, rows: str, tenant: str, cap: int) -> bool:
    """Whether the tenant holds ``cap`` of ``rows`` (a fixed query of its rows, ``$1`` its tenant)
    already: counted (no further than ``cap``) under the tenant's transaction lock ``lock``, so
    creates racing each other cannot all pass."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1::text || $2::text))", lock, tenant)
    return await conn.fetchval(f"SELECT count(*) FROM ({rows} LIMIT $2) r", tenant, cap) >= cap


def _record(row) -> dict:
    record = dict(row)
    for name in ("pii_entities", "detail"):
        if isinstance(record.get(name), str):
            record[name] = orjson.loads(record[name])
    return record
