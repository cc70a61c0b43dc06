"""``gateway agents ...``: create agents, list them, their versions, and move labels — straight
in PostgreSQL (like ``gateway keys``), then announced through Redis so running gateways reload."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from pathlib import Path

import orjson
from redis.exceptions import RedisError

from core.config import ConfigError, load_config
from core.errors import GatewayError


def add_parser(sub) -> None:
    agents = sub.add_parser("agents", help="manage agents and their prompt versions")
    cmds = agents.add_subparsers(dest="agents_cmd", required=True)
    create = cmds.add_parser("create", help="create an agent (version 1, labels latest and production)")
    create.add_argument("--name", required=True)
    create.add_argument("--model", required=True, help="the chat model group its turns are served from")
    source = create.add_mutually_exclusive_group(required=True)
    source.add_argument("--template", help="a library template: sales, support, receptionist, faq")
    source.add_argument("--template-file", help="a file holding the prompt template (Jinja2)")
    create.add_argument("--tenant", default="default")
    create.add_argument("--description", default="")
    create.add_argument(
        "--var", action="append", default=[], metavar="K=V", help="a default variable value (JSON or text); repeatable"
    )
    create.add_argument("--max-steps", type=int)
    create.add_argument("--fallback-message")
    create.add_argument(
        "--config",
        help="check --model against this config (default: $GATEWAY_CONFIG, on the embedded database the "
        "config its `gateway serve` runs, ./gateway.yaml, else the demo when the database is the embedded one)",
    )
    lst = cmds.add_parser("list", help="active agents")
    lst.add_argument("--tenant", help="only this tenant's")
    versions = cmds.add_parser("versions", help="an agent's prompt versions and labels")
    versions.add_argument("name")
    versions.add_argument("--tenant", default="default")
    label = cmds.add_parser("label", help="point a label at a version (deploy or roll back)")
    label.add_argument("name")
    label.add_argument("label")
    label.add_argument("version", type=int)
    label.add_argument("--tenant", default="default")


def _vars(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--var {pair!r}: expected K=V")
        try:  # JSON when it parses (80, true, ["a"], "quoted text"), else the text as given
            parsed = orjson.loads(value)
        except orjson.JSONDecodeError:
            parsed = None
        out[key] = value if parsed is None else parsed
    return out


def _config_path(args: argparse.Namespace) -> str | None:
    """The config the gateways serving this database run, found as ``gateway serve`` finds it:
    --config, $GATEWAY_CONFIG, ./gateway.yaml, else the demo — the demo only when the database is
    the embedded one (no DATABASE_URL), which is what ``make run`` serves it from. None: unknown."""
    path = args.config or os.environ.get("GATEWAY_CONFIG")
    if not path and not os.environ.get("DATABASE_URL"):
        path = _served()  # the embedded database's own gateway said which config it runs
    if not path and Path("gateway.yaml").exists():
        path = "gateway.yaml"
    if not path and not os.environ.get("DATABASE_URL"):
        path = str(Path(__file__).with_name("demo.yaml"))
    return path


SERVING_CONFIG = "serving-config"  # in the data directory: the config `gateway serve` runs there


def note_serving_config(data_dir: Path, config_path: str) -> None:
    """Written by ``gateway serve`` on the embedded database: the config it runs (``--config``
    included, which a later ``agents create`` in another shell cannot see)."""
    with contextlib.suppress(OSError):
        (data_dir / SERVING_CONFIG).write_text(str(Path(config_path).resolve()))


def _served() -> str | None:
    from gateway.embedded import default_data_dir

    try:
        path = (default_data_dir() / SERVING_CONFIG).read_text().strip()
    except OSError:
        return None
    return path if path and Path(path).is_file() else None


def _check_model(args: argparse.Namespace) -> None:
    """--model must be a chat group of the config the gateways run: an agent on any other model
    would be created and then answer every call with 404."""
    path = _config_path(args)
    if not path:
        unknown = "no --config, $GATEWAY_CONFIG or ./gateway.yaml"
        print(f"note: --model {args.model!r} not checked ({unknown})", file=sys.stderr)
        return
    models = {m.name: m for m in _models_of(path)}
    if args.model not in models or models[args.model].mode != "chat":
        chat = sorted(name for name, m in models.items() if m.mode == "chat")
        raise GatewayError(f"{args.model!r} is not a chat model group of {path}; its chat groups: {', '.join(chat)}")


_STAND_IN = "http://127.0.0.1:0"  # a value for a variable unset here: a URL, a key, a name...


def _models_of(path: str) -> list:
    """The config's model groups. Only the groups are wanted, and the variables a config reads
    (its provider keys, the demo's mock address) are set where the gateway runs, often not in the
    admin's shell: those unset here load as a stand-in."""
    return load_config(path, unset=_STAND_IN).models


async def _one(conn, name: str, tenant: str):
    from runtime import agents as store

    found = await store.find_agents(conn, name, tenant)
    if not found:
        raise GatewayError(f"no agent named {name!r} in tenant {tenant!r}")
    return found[0]


async def _run(args: argparse.Namespace, database_url: str, redis_url: str) -> int:
    import asyncpg
    import redis.asyncio as aioredis

    from gateway.db import migrate
    from runtime import agents as store
    from runtime import prompts, templates

    conn = await asyncpg.connect(database_url)
    changed: str | None = None
    try:
        await migrate(conn)
        if args.agents_cmd == "create":
            store.check_name(args.name)
            if args.template:
                entry = templates.get(args.template)
                if entry is None:
                    raise GatewayError(f"unknown template {args.template!r}; known: {', '.join(templates.ids())}")
                template, variables = entry["template"], entry["variables"]
            else:
                template, variables = args.template_text, {}
            variables = prompts.check_variables(variables, prompts.check_template(template))
            data: dict = {"defaults": _vars(args.var)}
            if args.max_steps is not None:
                data["max_steps"] = args.max_steps
            if args.fallback_message:
                data["fallback_message"] = args.fallback_message
            settings = store.check_settings(data)
            prompts.check_defaults(settings["defaults"], variables)
            async with conn.transaction():
                changed = await store.create_agent(
                    conn,
                    tenant=args.tenant,
                    name=args.name,
                    model=args.model,
                    description=args.description,
                    settings=settings,
                    template=template,
                    variables=variables,
                    note=f"from the {args.template} template" if args.template else "created with the CLI",
                    created_by="cli",
                )
            print(f"created agent {args.name} ({changed}) in tenant {args.tenant}: call it as model agent:{args.name}")
        elif args.agents_cmd == "list":
            rows = await store.list_agents(conn, args.tenant)
            print(f"{'TENANT':14} {'NAME':24} {'MODEL':20} {'LATEST':>6} LABELS")
            for r in rows:
                labels = " ".join(f"{k}={'/'.join(f'{v}:{w}' for v, w in t.items())}" for k, t in r["labels"].items())
                latest = str(r["latest_version"])
                print(f"{r['tenant'][:14]:14} {r['name'][:24]:24} {r['model'][:20]:20} {latest:>6} {labels}")
        elif args.agents_cmd == "versions":
            agent = await _one(conn, args.name, args.tenant)
            print(f"{'VERSION':>7} {'CREATED':20} {'NOTE':40} LABELS")
            for v in await store.list_versions(conn, agent):  # labels last and whole (they were cut at 24)
                created = f"{v['created_at']:%Y-%m-%d %H:%M:%S}"
                print(f"{v['version']:>7} {created:20} {(v['note'] or '')[:40]:40} {','.join(v['labels'])}")
        else:
            if args.label == "latest":
                raise GatewayError("'latest' always points at the newest version")
            agent = await _one(conn, args.name, args.tenant)
            async with conn.transaction():
                await store.set_label(conn, agent, args.label, {args.version: 1})
            changed = agent.id
            print(f"{args.name}@{args.label} -> version {args.version}")
    except GatewayError as exc:
        print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 1
    finally:
        await conn.close()
    if changed is not None:
        client = aioredis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=5)
        try:
            reached = await store.announce(client, changed)
        except (RedisError, OSError) as exc:  # committed all the same: not an error to retry
            print(
                f"warning: saved, but the gateway processes were not told (Redis unreachable: {type(exc).__name__});"
                " each loads the change at its next full reload, within a minute",
                file=sys.stderr,
            )
            return 0
        finally:
            await client.aclose()
        print(f"({reached} gateway process(es) notified)")
    return 0


def run(args: argparse.Namespace) -> int:
    from gateway.embedded import resolve_urls

    if getattr(args, "template_file", None):
        try:
            args.template_text = Path(args.template_file).read_text()
        except OSError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    if args.agents_cmd == "create":
        try:
            _check_model(args)  # before the database: nothing is started for a command refused
        except GatewayError as exc:
            print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
            return 1
        except (ConfigError, OSError) as exc:
            print(f"error: the config to check --model against did not load: {exc}", file=sys.stderr)
            return 1
    database_url, redis_url, services = resolve_urls()
    try:
        return asyncio.run(_run(args, database_url, redis_url))
    finally:
        if services:
            services.stop()
