"""The ASGI application: endpoint dispatch, error rendering, lifespan.

Written as a plain ASGI callable rather than on a framework router: the proxied endpoints
are the hot path, and a dict lookup plus hand-built headers is all they need.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from core import heap, http, metrics
from core.config import load_config
from core.errors import GatewayError, MethodNotAllowed, ModelNotFound, NotFound
from core.logs import access_log
from core.types import RequestContext, excerpt
from gateway import (
    agent_stage,
    channels_whatsapp,
    conversations_api,
    grounding,
    kb_embedding,
    pipeline,
    rerank,
    vapi_channel,
)
from gateway.admin import Admin
from gateway.db import BUSY, busy_error
from gateway.feedback import feedback as post_feedback
from gateway.idempotency import Idempotency
from gateway.idempotency import requested as idempotency_requested
from gateway.openai_store import OpenAIStore
from gateway.openai_store import handles as openai_store_handles
from gateway.openapi import openapi_document
from gateway.services import Services, Settings
from gateway.started import Started
from runtime.types import AGENT_PREFIX

log = logging.getLogger("gateway")

_CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")
_EMBEDDINGS_PATHS = ("/v1/embeddings", "/embeddings")


class GatewayApp:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.svc: Services | None = None
        self._created = int(time.time())
        self._openapi = None
        self.admin = Admin(self)
        self.vapi = None  # the VAPI channel (gateway/vapi_channel.py), when accounts are configured
        self._started = Started()  # what start-up started, in order (gateway/started.py)
        self._draining = False  # shutting down (``drain``): /readyz says so
        self.openai_store = OpenAIStore(self)  # /v1/files, /v1/vector_stores (knowledge bases)
        self.idempotency = Idempotency(settings.redis_url, settings.config.server)  # Idempotency-Key
        routes = {
            "/healthz": ("GET", self._healthz),
            "/readyz": ("GET", self._readyz),
            "/metrics": ("GET", self._metrics),
            "/openapi.json": ("GET", self._openapi_json),
            "/v1/models": ("GET", self._models),
            "/models": ("GET", self._models),
        }
        routes["/v1/feedback"] = ("POST", self._feedback)
        for p in ("/v1/rerank", "/rerank"):  # Cohere-compatible (gateway/rerank.py)
            routes[p] = ("POST", self._rerank)
        for p in _CHAT_PATHS:
            routes[p] = ("POST", self._chat)
        for p in _EMBEDDINGS_PATHS:
            routes[p] = ("POST", self._embeddings)
        self._routes = routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self._start()
                except Exception as exc:
                    log.exception("start-up failed")
                    # What it had started, stopped before the failure is reported: left running,
                    # their tasks outlive it, and the process ends only once ``asyncio.run`` has
                    # cancelled each of them, which one that loses that single cancellation
                    # (``core.background``: Python 3.11's ``wait_for``) never lets happen.
                    await self._started.stop()
                    self.vapi = self.svc = None
                    await send({"type": "lifespan.startup.failed", "message": f"{type(exc).__name__}: {exc}"})
                    return
                heap.settle()  # what start-up built is never scanned by the collector again
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._started.stop(bounded=False)  # (each of the services' parts is bounded)
                await self.idempotency.close()
                access_log.flush()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _start(self) -> None:
        """The services, then the channels; each one's stop added to ``_started`` once it has
        started (the list both the shutdown and a failed start-up run, in reverse)."""
        self.svc = svc = await Services.start(self.settings)
        self._started.add(svc.stop, bounded=False)  # (each of its parts is bounded)
        # the knowledge_search built-in searches the agent's knowledge bases
        svc.tools.handlers["knowledge_search"] = grounding.knowledge_search_handler(svc)
        self.vapi = await vapi_channel.start(svc)
        if self.vapi is not None:
            self._started.add(self.vapi.stop)
        kb_embedding.install(svc)  # knowledge bases embed through the gateway
        svc.whatsapp = await channels_whatsapp.start(svc, self.settings)
        if svc.whatsapp is not None:
            self._started.add(svc.whatsapp.stop)

    async def drain(self, grace: float | None = None) -> None:
        """What must finish while the gateway still serves, before the server stops listening
        (``gateway.serving``; the lifespan's shutdown comes after it): the WhatsApp channel's
        turns in flight call this gateway over HTTP. ``grace``: the most they get (the channel's
        ``stop_grace`` when None, and never more than this); what cannot finish goes back to its
        queue. ``/readyz`` answers 503 from now on (a load balancer sends new work elsewhere)."""
        self._draining = True
        channel = self.svc.whatsapp if self.svc is not None else None
        if channel is not None:
            limit = channel.stop_grace if grace is None else min(channel.stop_grace, grace)
            await channel.drain(limit)

    async def _http(self, scope, receive, send) -> None:
        # The gateway's own id for every request; the caller's (x-client-request-id, else
        # x-request-id) is kept beside it and echoed, never used as a key.
        rid = http.new_request_id()
        crid = http.client_request_id(scope)
        path = scope["path"]
        entry = self._routes.get(path)
        try:
            if entry is None:
                if path.startswith("/admin/"):
                    await self._admin_call(scope, receive, send, rid, crid)
                    return
                if path.startswith("/channels/vapi/") and self.vapi is not None:
                    await self.vapi(scope, receive, send, rid)
                    return
                if conversations_api.matches(path) and scope["method"] == "GET":  # a conversation read back
                    await conversations_api.messages(self.svc, scope, send, rid, crid)
                    return
                if openai_store_handles(path):
                    await self._with_request_id(self.openai_store, scope, receive, send, rid, crid)
                    return
                if path.startswith("/channels/whatsapp/") and self.svc.whatsapp is not None:
                    await self.svc.whatsapp.webhook(scope, receive, send, rid, crid)
                    return
                if path.startswith(("/v1/models/", "/models/")) and scope["method"] == "GET":
                    await self._model(scope, rid, crid, send, path.split("/models/", 1)[1])
                    return
                raise NotFound(f"Invalid URL ({excerpt(scope['method'], 16)} {excerpt(path, 128)})")
            method, handler = entry
            if scope["method"] != method:
                raise MethodNotAllowed(f"Method {excerpt(scope['method'], 16)} is not allowed on {path}; use {method}.")
            await handler(scope, receive, send, rid, crid)
        except GatewayError as err:
            await http.send_error(send, err, rid, crid)
        except http.ClientGone:
            return
        except BUSY as exc:  # a database call past the driver's timeout (a lock held elsewhere): try again
            log.warning("gave up on a busy database: %s", type(exc).__name__, extra={"fields": {"request_id": rid}})
            await http.send_error(send, busy_error(), rid, crid)
        except Exception:
            log.exception("unhandled error", extra={"fields": {"request_id": rid}})
            await http.send_error(
                send, GatewayError("The server had an error while processing your request."), rid, crid
            )

    async def _proxied(self, endpoint: str, stage, scope, receive, send, rid: str, crid: str | None) -> None:
        svc = self.svc
        ctx = RequestContext(
            request_id=rid, endpoint=endpoint, body={}, started=time.perf_counter(), client_request_id=crid
        )
        metrics.IN_FLIGHT.inc()
        error: GatewayError | None = None
        try:
            await stage(svc, ctx, scope, receive, send)
        except GatewayError as err:
            error = err
            ctx.status = err.status
            ctx.error_code = err.code
            if ctx.route is not None:
                err.headers.setdefault("x-gateway-provider", ctx.route.provider)
                err.headers.setdefault("x-gateway-attempts", str(ctx.attempts))
            await pipeline.settle(svc, ctx, scope)  # refused and failed requests are audited too
            raise
        except http.ClientGone:
            ctx.status = 499
            ctx.error_code = "client_closed_request"
            raise
        except BaseException:
            ctx.status = 500
            ctx.error_code = "internal_error"
            raise
        finally:
            metrics.IN_FLIGHT.dec()
            if not ctx.extra.get("settled"):
                await pipeline.settle(svc, ctx, scope)
            pipeline.account(svc, ctx, time.perf_counter(), error)

    async def _admin_call(self, scope, receive, send, rid: str, crid: str | None) -> None:
        ids = [(b"x-request-id", rid.encode())]
        if crid is not None:
            ids.append((b"x-client-request-id", crid.encode()))

        async def with_request_id(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *ids]}
            await send(message)

        await self.admin(scope, receive, with_request_id)

    async def _with_request_id(self, asgi, scope, receive, send, rid: str, crid: str | None) -> None:
        ids = [(b"x-request-id", rid.encode())]
        if crid is not None:
            ids.append((b"x-client-request-id", crid.encode()))

        async def sender(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *ids]}
            await send(message)

        await asgi(scope, receive, sender)

    async def _chat(self, scope, receive, send, rid: str, crid: str | None) -> None:
        if (idem := idempotency_requested(scope)) is not None:  # Idempotency-Key: gateway/idempotency.py
            run = lambda r, s: self._proxied("chat", pipeline.chat, scope, r, s, rid, crid)  # noqa: E731
            await self.idempotency.run(self.svc, idem, scope, receive, send, rid, crid, run)
            return
        await self._proxied("chat", pipeline.chat, scope, receive, send, rid, crid)

    async def _rerank(self, scope, receive, send, rid: str, crid: str | None) -> None:
        await self._proxied("rerank", rerank.rerank, scope, receive, send, rid, crid)

    async def _embeddings(self, scope, receive, send, rid: str, crid: str | None) -> None:
        await self._proxied("embeddings", pipeline.embeddings, scope, receive, send, rid, crid)

    def _model_object(self, model) -> dict:
        return {"id": model.name, "object": "model", "created": self._created, "owned_by": model.owned_by}

    async def _feedback(self, scope, receive, send, rid: str, crid: str | None) -> None:
        await post_feedback(self.svc, scope, receive, send, rid, crid)

    def _agent_objects(self, ident) -> list[dict]:
        """The agents of the caller's tenant that its key may use, as ``agent:<name>``."""
        registry = self.svc.agents
        agents = registry.for_tenant(ident.tenant) if registry is not None and not ident.is_master else []
        return [
            {"id": f"{AGENT_PREFIX}{a.name}", "object": "model", "created": self._created, "owned_by": ident.tenant}
            for a in agents
            if agent_stage.allowed_identity(ident, a.name, a.model)
        ]

    async def _models(self, scope, receive, send, rid: str, crid: str | None) -> None:
        ident = await self.svc.auth.authenticate_scope(scope)
        data = [self._model_object(m) for m in self.svc.router.models]
        data += rerank.local_model_objects(self.svc, self._created)  # the local re-ranker, when loaded
        if ident.models:  # a key restricted to models lists only those it may use (else a 403 on call)
            data = [m for m in data if m["id"] in ident.models]
        data += self._agent_objects(ident)
        await http.send_json(send, 200, {"object": "list", "data": data}, rid, crid=crid)

    async def _model(self, scope, rid: str, crid: str | None, send, model_id: str) -> None:
        ident = await self.svc.auth.authenticate_scope(scope)
        model = self.svc.router.model(model_id)
        if ident.models and not model_id.startswith(AGENT_PREFIX) and model_id not in ident.models:
            raise ModelNotFound(f"The model '{excerpt(model_id)}' does not exist", param="model")  # as /v1/models
        if model is None:
            found = [a for a in self._agent_objects(ident) if a["id"] == model_id]
            found += [m for m in rerank.local_model_objects(self.svc, self._created) if m["id"] == model_id]
            if not found:
                raise ModelNotFound(f"The model '{excerpt(model_id)}' does not exist", param="model")
            await http.send_json(send, 200, found[0], rid, crid=crid)
            return
        await http.send_json(send, 200, self._model_object(model), rid, crid=crid)

    async def _healthz(self, scope, receive, send, rid: str, crid: str | None) -> None:
        await http.send_json(send, 200, {"status": "ok"}, rid, crid=crid)

    async def _readyz(self, scope, receive, send, rid: str, crid: str | None) -> None:
        checks = await self.svc.readiness()  # cached: at most one check per interval, however many ask
        if self._draining:
            checks = {**checks, "server": "draining"}
        ready = all(v == "ok" for v in checks.values())
        body = {"status": "ready" if ready else "not ready", **checks}
        await http.send_json(send, 200 if ready else 503, body, rid, crid=crid)

    async def _metrics(self, scope, receive, send, rid: str, crid: str | None) -> None:
        for deployment, state in self.svc.router.circuit_states().items():
            metrics.CIRCUIT_STATE.labels(deployment).set(state)
        body, ctype = metrics.render()
        await http.send_bytes(send, 200, body, rid, content_type=ctype.encode(), crid=crid)

    async def _openapi_json(self, scope, receive, send, rid: str, crid: str | None) -> None:
        if self._openapi is None:
            self._openapi = openapi_document()
        await http.send_json(send, 200, self._openapi, rid, crid=crid)


def create_app() -> GatewayApp:
    """Factory for uvicorn workers: everything comes from the environment set by ``serve``."""
    from core import logs

    logs.configure(os.environ.get("GATEWAY_LOG_LEVEL", "INFO"))
    config = load_config(os.environ["GATEWAY_CONFIG"])
    settings = Settings(
        config=config,
        database_url=os.environ["DATABASE_URL"],
        redis_url=os.environ["REDIS_URL"],
        master_key=os.environ.get("GATEWAY_MASTER_KEY") or None,
        data_dir=Path(os.environ.get("GATEWAY_DATA_DIR", "./.data")).resolve(),
    )
    return GatewayApp(settings)
