"""The agent admin API (``/admin/agents...``, ``/admin/prompt-templates``): agents, their prompt
versions and labels, A/B experiments and their reports.

Mounted into gateway/admin.py's Starlette app (``routes(admin)``), so every call is
authenticated, tenant-scoped and written to the access log like the other admin routes. A tenant
admin sees and changes only its own tenant's agents (filtered in SQL, walled by row-level
security); the super-admin sees every tenant and names one with ``?tenant=`` (reads) or
``"tenant"`` (create). Every change is one transaction, then announced so every replica reloads
the agent (runtime/agents.py). A change whose announcement fails (Redis unreachable) is
committed all the same: it answers as such, with ``x-gateway-warning`` (gateway/agent_announce.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.errors import InvalidRequest, NotFound, PermissionDenied, RateLimited
from gateway import admin as base  # a module, not names: admin.py imports this module in turn
from gateway import admin_input as inp
from gateway.agent_announce import announced
from gateway.db import tenant_transaction
from runtime import agents as store
from runtime import experiments, prompts, templates
from runtime.prompt_versions import Quota
from runtime.tools import ENV_RE
from runtime.types import Agent

CREATE_FIELDS = frozenset(
    {"name", "model", "description", "template", "template_id", "variables", "note", "tenant", *store.SETTINGS}
)
PATCH_FIELDS = frozenset({"model", "description", *store.SETTINGS})
VERSION_FIELDS = frozenset({"template", "variables", "note", "labels"})
LABEL_FIELDS = frozenset({"version", "variants", "primary_metric"})
# Saves whose tool schemas are checked against the metaschema at once, in a worker thread (up to
# ~1.1 s of CPU within the caps): the rest wait their turn, not the event loop, and leave the
# default executor's other threads to the rest of the gateway. One: the check is pure Python, so
# a second thread finishes no sooner (the GIL) and the event loop waits for the GIL between them
# several times longer (a 90-240 ms wake-up at the 99th percentile, against ~15 ms with one). One
# tenant's saves (its admin keys') take their turn one at a time: a tenant that sends many at
# once queues behind itself, not every other tenant behind it. Saves come faster than they are
# checked (600 admin calls a minute a key, about one check a second at the caps), and each one
# waiting holds its parsed body: a tenant has at most TENANT_SAVES_WAITING checked or waiting,
# the next is a 429 (the super-admin is not bound).
SCHEMA_CHECKS = 1
TENANT_SAVES_WAITING = 4


def _operator_networks_only(ident, data: dict) -> None:
    """A tool's ``allow_private_networks`` / ``allowed_networks`` reach the gateway's own
    network: the operator's (the master key's) to set, never a tenant admin's."""
    if ident.is_master:
        return
    tools = data.get("tools")
    for i, tool in enumerate(tools if isinstance(tools, list) else ()):
        cfg = tool.get("config") if isinstance(tool, dict) else None
        if isinstance(cfg, dict) and (cfg.get("allow_private_networks") or cfg.get("allowed_networks")):
            raise PermissionDenied(
                "Only the master key may let a tool reach private networks.",
                param=f"tools[{i}].config",
                code="super_admin_required",
            )


def _operator_secrets_only(ident, data: dict) -> None:
    """A ``${TOOL_*}`` header reads the gateway's environment, which holds the operator's
    secrets for every tenant's tools: the master key's to name, never a tenant admin's (its tool
    would carry them to any host it lists). A tenant admin types its own secret in."""
    if ident.is_master:
        return
    tools = data.get("tools")
    for i, tool in enumerate(tools if isinstance(tools, list) else ()):
        cfg = tool.get("config") if isinstance(tool, dict) else None
        headers = cfg.get("headers") if isinstance(cfg, dict) else None
        if isinstance(headers, dict) and any(isinstance(v, str) and ENV_RE.search(v) for v in headers.values()):
            raise PermissionDenied(
                "Only the master key may give a tool secrets from the gateway's environment (${...}).",
                param=f"tools[{i}].config.headers",
                code="super_admin_required",
            )


def _only(data: dict, allowed: frozenset) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        name = str(unknown[0])[:64]
        raise InvalidRequest(
            f"Unknown parameter '{name}'; known: {', '.join(sorted(allowed))}.", param=name, code="unknown_parameter"
        )


def _int(value, param: str) -> int:
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 10:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 10**9:
        return value
    raise InvalidRequest(f"'{param}' must be a version number.", param=param, code="invalid_value")


class AgentAdmin:
    def __init__(self, admin) -> None:
        self.admin = admin
        self._schema_checks = asyncio.Semaphore(SCHEMA_CHECKS)
        self._tenant_turns: dict[str | None, list] = {}  # caller's tenant -> [its lock, saves waiting on it]

    @property
    def svc(self):
        return self.admin.svc

    def routes(self) -> list[Route]:
        return [
            Route("/admin/agents", self.create_agent, methods=["POST"]),
            Route("/admin/agents", self.list_agents, methods=["GET"]),
            Route("/admin/agents/{name}", self.get_agent, methods=["GET"]),
            Route("/admin/agents/{name}", self.update_agent, methods=["PATCH"]),
            Route("/admin/agents/{name}", self.archive_agent, methods=["DELETE"]),
            Route("/admin/agents/{name}/versions", self.save_version, methods=["POST"]),
            Route("/admin/agents/{name}/versions", self.list_versions, methods=["GET"]),
            Route("/admin/agents/{name}/versions/{version}", self.get_version, methods=["GET"]),
            Route("/admin/agents/{name}/diff", self.diff, methods=["GET"]),
            Route("/admin/agents/{name}/labels/{label}", self.set_label, methods=["PUT"]),
            Route("/admin/agents/{name}/experiments", self.experiments, methods=["GET"]),
            Route("/admin/agents/{name}/experiments/{label}/stop", self.stop_experiment, methods=["POST"]),
            Route("/admin/prompt-templates", self.prompt_templates, methods=["GET"]),
        ]

    # ---- helpers -------------------------------------------------------------------------------
    async def _agent(self, request: Request, conn) -> Agent:
        name = request.path_params["name"]
        found = await store.find_agents(conn, name[:64], base._view(request)) if store.NAME_RE.match(name) else []
        if not found:
            raise NotFound(f"No agent named {name[:64]!r}.", param="name")
        if len(found) > 1:
            raise InvalidRequest(
                f"Several tenants have an agent named {name!r}; name one with ?tenant=.",
                param="tenant",
                code="ambiguous_agent",
            )
        return found[0]

    async def checked_settings(self, data: dict, caller: str | None = None) -> dict:
        """``store.check_settings`` of the fields given (a 400 naming the first bad one): in a
        worker thread when they include tools, whose schemas' metaschema check would otherwise
        hold the event loop (every tenant's requests on this replica) for up to a second.
        ``caller``: the calling key's tenant (None: the super-admin), whose saves check one at a
        time (``_tenant_turn``) before they wait for a ``SCHEMA_CHECKS`` thread."""
        if "tools" not in data:
            return store.check_settings(data)
        async with self._tenant_turn(caller), self._schema_checks:
            return await asyncio.to_thread(store.check_settings, data)

    @contextlib.asynccontextmanager
    async def _tenant_turn(self, caller: str | None) -> AsyncIterator[None]:
        """The caller's tenant's turn: held by one of its saves at a time (kept while any waits);
        a 429 naming ``tools`` past ``TENANT_SAVES_WAITING`` of them."""
        turn = self._tenant_turns.setdefault(caller, [asyncio.Lock(), 0])
        if caller is not None and turn[1] >= TENANT_SAVES_WAITING:
            raise RateLimited(
                f"This tenant has {turn[1]} agent saves with tools being checked or waiting, the most it may; "
                "retry when one has finished.",
                param="tools",
                code="too_many_saves",
                headers={"retry-after": "2"},
            )
        turn[1] += 1
        try:
            async with turn[0]:
                yield
        finally:
            turn[1] -= 1
            if turn[1] == 0:
                del self._tenant_turns[caller]

    def _judge_model(self, request: Request, data: dict) -> None:
        """``escalation.judge.model`` (human in the loop) is a model the agent calls: held to what
        ``model`` is — a configured chat group the admin's key may use."""
        escalation = data.get("escalation")
        judge = escalation.get("judge") if isinstance(escalation, dict) else None
        model = judge.get("model") if isinstance(judge, dict) else None
        if model is None:
            return
        group = self.svc.router.groups.get(model) if isinstance(model, str) else None
        if group is None or group.model.mode != "chat":
            raise InvalidRequest(
                f"'escalation.judge.model' must be a configured chat model group, not {str(model)[:64]!r}.",
                param="escalation.judge.model",
                code="model_not_found",
            )
        ident = base._ident(request)
        if ident.models and model not in ident.models:
            raise PermissionDenied(
                f"This key may not use the model {model!r}.", param="escalation.judge.model", code="model_not_allowed"
            )

    def _model(self, request: Request, data: dict) -> str | None:
        model = inp.text(data, "model")
        if model is None:
            return None
        group = self.svc.router.groups.get(model)
        if group is None or group.model.mode != "chat":
            raise InvalidRequest(
                f"'model' must be a configured chat model group, not {model[:64]!r}.",
                param="model",
                code="model_not_found",
            )
        ident = base._ident(request)
        if ident.models and model not in ident.models:
            raise PermissionDenied(
                f"This key may not use the model {model!r}.", param="model", code="model_not_allowed"
            )
        return model

    def _quota(self) -> Quota:
        policies = self.svc.config.policies
        return Quota(
            policies.max_prompt_versions_per_tenant,
            policies.max_prompt_bytes_per_tenant,
            policies.max_agents_per_tenant,
            policies.max_agent_settings_bytes_per_tenant,
        )

    # ---- agents --------------------------------------------------------------------------------
    async def create_agent(self, request: Request) -> Response:
        data = await inp.body(request)
        _only(data, CREATE_FIELDS)
        ident = base._ident(request)
        _operator_networks_only(ident, data)
        _operator_secrets_only(ident, data)
        name = store.check_name(inp.text(data, "name", required=True, max_len=64))
        if data.get("model") is None:
            raise InvalidRequest(
                "Missing required parameter: 'model'.", param="model", code="missing_required_parameter"
            )
        model = self._model(request, data)
        self._judge_model(request, data)
        description = inp.text(data, "description", max_len=store.MAX_DESCRIPTION) or ""
        tenant = inp.text(data, "tenant", max_len=128)
        if not ident.is_master:
            if tenant is not None and tenant != ident.tenant:
                raise PermissionDenied(
                    f"This admin key belongs to tenant {ident.tenant!r}.", param="tenant", code="tenant_mismatch"
                )
            tenant = ident.tenant
        tenant = tenant or "default"
        template_id = inp.text(data, "template_id", max_len=64)
        if (template_id is None) == (data.get("template") is None):
            raise InvalidRequest(
                "Give either 'template' (a prompt) or 'template_id' (one of the library's: "
                f"{', '.join(templates.ids())}).",
                param="template",
                code="missing_required_parameter",
            )
        variables = data.get("variables")
        if template_id is not None:
            entry = templates.get(template_id)
            if entry is None:
                raise InvalidRequest(
                    f"Unknown 'template_id'; known: {', '.join(templates.ids())}.",
                    param="template_id",
                    code="invalid_value",
                )
            template = entry["template"]
            variables = entry["variables"] if variables is None else variables
        else:
            template = data["template"]
        used = prompts.check_template(template)
        variables = prompts.check_variables(variables, used)
        settings = await self.checked_settings(data, base._wall(request))
        prompts.check_defaults(settings.get("defaults") or {}, variables)
        note = store.check_note(data.get("note")) or (f"from the {template_id} template" if template_id else None)
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            agent_id = await store.create_agent(
                conn,
                tenant=tenant,
                name=name,
                model=model,
                description=description,
                settings=settings,
                template=template,
                variables=variables,
                note=note,
                created_by=ident.key_id,
                quota=self._quota(),
            )
            agent = await store.load_agent(conn, agent_id)
        return base._json(store.describe(agent), 201, await announced(self.svc, agent_id))

    async def list_agents(self, request: Request) -> Response:
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            rows = await store.list_agents(conn, base._view(request))
        return base._json({"object": "list", "data": rows})

    async def get_agent(self, request: Request) -> Response:
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            agent = await self._agent(request, conn)
        return base._json(store.describe(agent))

    async def update_agent(self, request: Request) -> Response:
        data = await inp.body(request)
        if "name" in data:
            raise InvalidRequest("An agent's name cannot be changed.", param="name", code="immutable_field")
        _only(data, PATCH_FIELDS)
        _operator_networks_only(base._ident(request), data)
        _operator_secrets_only(base._ident(request), data)
        model = self._model(request, data)
        self._judge_model(request, data)
        description = inp.text(data, "description", max_len=store.MAX_DESCRIPTION)
        # (before the transaction: no connection held meanwhile)
        given = await self.checked_settings(data, base._wall(request))
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            agent = await store.lock_agent(conn, await self._agent(request, conn))  # a racing PATCH's kept
            settings = {**agent.settings, **given}  # what store.check_settings(data, base=...) makes
            latest = agent.versions.get(max(agent.versions)) if agent.versions else None
            if latest is not None:
                prompts.check_defaults(settings.get("defaults") or {}, latest.variables)
            await store.update_agent(conn, agent, model, description, settings, quota=self._quota())
            agent = await store.load_agent(conn, agent.id)
        return base._json(store.describe(agent), headers=await announced(self.svc, agent.id))

    async def archive_agent(self, request: Request) -> Response:
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            agent = await self._agent(request, conn)
            await store.archive_agent(conn, agent)
        headers = await announced(self.svc, agent.id)
        return base._json({"id": agent.id, "object": "agent", "name": agent.name, "deleted": True}, headers=headers)

    # ---- versions ------------------------------------------------------------------------------
    async def save_version(self, request: Request) -> Response:
        data = await inp.body(request)
        _only(data, VERSION_FIELDS)
        template = data.get("template")
        if template is None:
            raise InvalidRequest(
                "Missing required parameter: 'template'.", param="template", code="missing_required_parameter"
            )
        used = prompts.check_template(template)
        variables = prompts.check_variables(data.get("variables"), used)
        note = store.check_note(data.get("note"))
        labels = inp.str_list(data, "labels")
        if len(labels) > 10:
            raise InvalidRequest("'labels' may name at most 10 labels.", param="labels", code="invalid_value")
        for i, label in enumerate(labels):
            prompts.check_label(label, param=f"labels[{i}]")
            if label == "latest":
                raise InvalidRequest("'latest' moves by itself.", param=f"labels[{i}]", code="invalid_value")
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            agent = await self._agent(request, conn)
            prompts.check_defaults(agent.defaults, variables, param="variables")
            version = await store.save_version(
                conn,
                agent,
                template,
                variables,
                note,
                created_by=base._ident(request).key_id,
                labels=labels,
                quota=self._quota(),
            )
        headers = await announced(self.svc, agent.id)
        return base._json(
            {
                "object": "prompt_version",
                "agent": agent.name,
                "version": version.version,
                "template": version.template,
                "variables": version.variables,
                "note": version.note,
                "labels": ["latest", *labels],
            },
            201,
            headers,
        )

    async def list_versions(self, request: Request) -> Response:
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            agent = await self._agent(request, conn)
            rows = await store.list_versions(conn, agent)
        return base._json({"object": "list", "agent": agent.name, "data": rows})

    async def _version(self, conn, agent: Agent, value, param: str):
        number = _int(value, param)
        version = await store.load_version(conn, agent, number)
        if version is None:
            raise NotFound(f"Agent {agent.name!r} has no prompt version {number}.", param=param)
        return version

    async def get_version(self, request: Request) -> Response:
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            agent = await self._agent(request, conn)
            v = await self._version(conn, agent, request.path_params["version"], "version")
        labels = sorted(label for label, target in agent.labels.items() if v.version in target)
        return base._json(
            {
                "object": "prompt_version",
                "agent": agent.name,
                "version": v.version,
                "template": v.template,
                "variables": v.variables,
                "note": v.note,
                "created_at": v.created_at,
                "labels": labels,
            }
        )

    async def diff(self, request: Request) -> Response:
        q = request.query_params
        for param in ("from", "to"):
            if q.get(param) is None:
                raise InvalidRequest(
                    f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
                )
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            agent = await self._agent(request, conn)
            a = await self._version(conn, agent, q["from"], "from")
            b = await self._version(conn, agent, q["to"], "to")
        return base._json({"object": "prompt_diff", "agent": agent.name, **prompts.diff(a, b)})

    # ---- labels and experiments ----------------------------------------------------------------
    async def set_label(self, request: Request) -> Response:
        label = prompts.check_label(request.path_params["label"])
        if label == "latest":
            raise InvalidRequest(
                "'latest' always points at the newest version; use another label.", param="label", code="invalid_value"
            )
        data = await inp.body(request)
        _only(data, LABEL_FIELDS)
        if ("version" in data) == ("variants" in data):
            raise InvalidRequest(
                "Give either 'version' (one version) or 'variants' ({\"7\": 50, \"8\": 50}).",
                param="version",
                code="missing_required_parameter",
            )
        target = {_int(data["version"], "version"): 1} if "version" in data else store.check_target(data["variants"])
        metric = inp.text(data, "primary_metric", choices=tuple(experiments.METRICS))
        async with tenant_transaction(self.svc.pool, base._wall(request)) as conn:
            agent = await self._agent(request, conn)
            experiment_id = await store.set_label(conn, agent, label, target, primary_metric=metric)
        headers = await announced(self.svc, agent.id)
        return base._json(
            {
                "object": "prompt_label",
                "agent": agent.name,
                "label": label,
                "target": {str(k): v for k, v in sorted(target.items())},
                "experiment_id": experiment_id,
            },
            headers=headers,
        )

    async def experiments(self, request: Request) -> Response:
        label = request.query_params.get("label")
        async with self.admin.report_transaction(request) as conn:  # (reads the agent's ledger rows)
            agent = await self._agent(request, conn)
            rows = await experiments.list_for_agent(conn, agent.id, limit=10)
            reports = [
                await experiments.gather(conn, agent.name, r) for r in rows if label is None or r["label"] == label
            ]
        return base._json({"object": "list", "agent": agent.name, "data": reports})

    async def stop_experiment(self, request: Request) -> Response:
        label = prompts.check_label(request.path_params["label"])
        data = await inp.body(request)
        _only(data, frozenset({"promote"}))
        if data.get("promote") is None:
            raise InvalidRequest(
                "Missing required parameter: 'promote' (the variant the label moves to).",
                param="promote",
                code="missing_required_parameter",
            )
        promote = str(_int(data["promote"], "promote"))
        # (one transaction under the reports' bound and caps: a stop whose report is not built in
        # time is answered 503 report_timeout and rolled back, the experiment still running)
        async with self.admin.report_transaction(request) as conn:
            agent = await self._agent(request, conn)
            running = await experiments.running(conn, agent.id, label)
            if running is None:
                raise NotFound(f"No experiment is running on label {label!r}.", param="label")
            variants = store._json(running["variants"])
            if promote not in variants:
                raise InvalidRequest(
                    f"'promote' must be one of the experiment's variants: {', '.join(variants)}.",
                    param="promote",
                    code="invalid_value",
                )
            stopped = await experiments.end_running(conn, agent.id, label, promote)
            await store.set_label(conn, agent, label, {int(promote): 1})
            result = await experiments.gather(conn, agent.name, stopped)
        return base._json(result, headers=await announced(self.svc, agent.id))

    async def prompt_templates(self, request: Request) -> Response:
        return base._json({"object": "list", "data": templates.library()})


def routes(admin) -> list[Route]:
    """The agent admin routes, for gateway/admin.py's route list."""
    return AgentAdmin(admin).routes()
