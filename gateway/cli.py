"""The ``gateway`` command: serve, migrate, check-config, mock-provider, keys."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import gateway.cli_queue as cli_queue
from core.config import ConfigError, load_config
from gateway import cli_agents, cli_channels, cli_kb
from gateway.embedded import EmbeddedServices, default_data_dir, resolve_urls

warnings.filterwarnings("ignore", module="platformdirs")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer within {timeout:g} s") from None
            time.sleep(0.05)


def _print_problems(path: str, problems: list[str]) -> None:
    print(f"{path}: {len(problems)} problem(s)", file=sys.stderr)
    for p in problems:
        print(f"  {p}", file=sys.stderr)


def _load_or_exit(path: str):
    try:
        return load_config(path)
    except ConfigError as exc:
        _print_problems(path, exc.problems)
        raise SystemExit(1) from None


def _read_secret(path: Path) -> str | None:
    with contextlib.suppress(OSError):
        return path.read_text().strip() or None
    return None


def _write_secret(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")


async def _migrate(database_url: str) -> list[str]:
    import asyncpg

    from gateway.db import migrate

    conn = await asyncpg.connect(database_url)
    try:
        return await migrate(conn)
    finally:
        await conn.close()


async def _dev_key(database_url: str, path: Path) -> str:
    """The demo's virtual key: reused while it is still active, else created anew."""
    import asyncpg

    from policies.keys import create_key, find_active, hash_key

    conn = await asyncpg.connect(database_url)
    try:
        key = _read_secret(path)
        if key and await find_active(conn, hash_key(key)):
            return key
        key, _ = await create_key(conn, "dev")
        _write_secret(path, key)
        return key
    finally:
        await conn.close()


def _start_mock(data_dir: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    log = open(data_dir / "mock-provider.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtest.mock_provider", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    _wait_http(f"{url}/health")
    return proc, url


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from core import logs
    from gateway import serving

    logs.configure(os.environ.get("GATEWAY_LOG_LEVEL", "INFO"))
    data_dir = default_data_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    config_path = args.config or os.environ.get("GATEWAY_CONFIG")
    if not config_path and Path("gateway.yaml").exists():
        config_path = "gateway.yaml"
    mock = None
    if not config_path:
        mock, mock_url = _start_mock(data_dir)
        os.environ["MOCK_URL"] = mock_url
        config_path = str(Path(__file__).with_name("demo.yaml"))
    _load_or_exit(config_path)
    services: EmbeddedServices | None = None
    try:
        database_url, redis_url, services = resolve_urls(data_dir)
        if services is not None and services.database_url:  # `agents create` checks --model against it
            cli_agents.note_serving_config(data_dir, config_path)
        asyncio.run(_migrate(database_url))
        master = os.environ.get("GATEWAY_MASTER_KEY")
        master_note = "from $GATEWAY_MASTER_KEY"
        if not master:
            master = _read_secret(data_dir / "master.key") or "sk-master-" + secrets.token_urlsafe(24)
            _write_secret(data_dir / "master.key", master)
            master_note = f"in {data_dir / 'master.key'} (set GATEWAY_MASTER_KEY to choose one)"
        os.environ.update(
            GATEWAY_CONFIG=str(Path(config_path).resolve()),
            DATABASE_URL=database_url,
            REDIS_URL=redis_url,
            GATEWAY_MASTER_KEY=master,
        )
        if args.workers > 1:
            prom = data_dir / f"prometheus-{os.getpid()}"
            shutil.rmtree(prom, ignore_errors=True)
            prom.mkdir()
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(prom)
        base = f"http://{args.host}:{args.port}"
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
        os.environ.setdefault("GATEWAY_SELF_URL", f"http://{host}:{args.port}")  # the channels' gateway
        print(f"\n  AI gateway on {base}/v1   (config: {config_path}{', demo mock provider' if mock else ''})")
        if services is not None and services.database_url:
            key = asyncio.run(_dev_key(database_url, data_dir / "dev.key"))
            print(f"  dev key:    {key}")
        else:
            key = "$GATEWAY_MASTER_KEY"
        print(f"  master key: {master_note}")
        model = "demo-gpt" if mock else "<model from your config>"
        print(
            f"  try: curl {base}/v1/chat/completions -H 'Authorization: Bearer {key}' "
            f"-H 'Content-Type: application/json' "
            f"""-d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}]}}'\n""",
            flush=True,
        )
        # uvicorn re-raises SIGTERM after its graceful shutdown; make that an exit that still
        # runs the clean-up below (stopping the mock and the embedded servers).
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        config = uvicorn.Config(
            "gateway.app:create_app",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            loop="uvloop",
            http="httptools",
            lifespan="on",
            access_log=False,
            log_config=None,
            backlog=4096,
            timeout_graceful_shutdown=30,
            timeout_keep_alive=30,
            # The gateway reads X-Forwarded-For itself, from server.trusted_proxies only
            # (gateway/http.py client_address); uvicorn's middleware would trust any local peer.
            proxy_headers=False,
        )
        # (uvicorn's server, draining the application before it stops listening: gateway/serving.py)
        if serving.serve(config):
            sys.exit(3)  # (as uvicorn.run: the server did not start)
        return 0
    finally:
        if mock is not None:
            mock.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                mock.wait(5)
        if services is not None:
            services.stop()
        prom_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if prom_dir and args.workers > 1:
            shutil.rmtree(prom_dir, ignore_errors=True)


def cmd_migrate(args: argparse.Namespace) -> int:
    database_url, _, services = resolve_urls()
    try:
        applied = asyncio.run(_migrate(database_url))
        print("applied: " + ", ".join(applied) if applied else "database is up to date")
        return 0
    finally:
        if services:
            services.stop()


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.file)
        from channels.vapi import parse_accounts

        parse_accounts(cfg.channels.vapi)  # the VAPI accounts' own fields (channels/vapi/config.py)
    except ConfigError as exc:
        _print_problems(args.file, exc.problems)
        return 1
    from channels.config import ChannelConfigError, whatsapp_accounts  # each channel checks its accounts

    try:
        whatsapp_accounts(cfg.channels.whatsapp)
    except ChannelConfigError as exc:
        _print_problems(args.file, exc.problems)
        return 1
    print(f"{args.file}: ok ({len(cfg.providers)} providers, {len(cfg.models)} models)")
    return 0


def cmd_mock_provider(args: argparse.Namespace, rest: list[str]) -> int:
    argv = [sys.executable, "-m", "loadtest.mock_provider", *rest]
    os.execv(sys.executable, argv)
    return 0  # not reached


async def _keys(args: argparse.Namespace, database_url: str, redis_url: str) -> int:
    import asyncpg
    import redis.asyncio as aioredis

    from gateway.db import migrate
    from policies import keys

    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn)
        if args.keys_cmd == "create":
            extra: dict = {}
            if args.pii_policy:
                extra["pii_policy"] = args.pii_policy
            if args.scope:
                extra["scopes"] = sorted(set(args.scope))
            if args.model:
                extra["models"] = sorted(set(args.model))
            if args.allowed_ip:
                import ipaddress

                extra["allowed_ips"] = [str(ipaddress.ip_network(n, strict=False)) for n in args.allowed_ip]
            key, rec = await keys.create_key(conn, args.name, args.tenant, args.require_tag, extra=extra)
            print(f"{key}\n(id {rec.id}; shown once, only its hash is stored)")
        elif args.keys_cmd == "list":
            rows = await keys.list_keys(conn, include_revoked=args.all)
            print(f"{'ID':22} {'NAME':20} {'TENANT':12} {'KEY':18} {'CREATED':20} STATUS")
            for r in rows:
                status = f"revoked {r.revoked_at:%Y-%m-%d %H:%M}" if r.revoked_at else "active"
                created = f"{r.created_at:%Y-%m-%d %H:%M:%S}"
                print(f"{r.id:22} {r.name[:20]:20} {r.tenant[:12]:12} {r.key_prefix:18} {created:20} {status}")
        else:
            revoked = await keys.revoke_tree(conn, args.id)  # and every key minted from it
            if not revoked:
                print(f"no key with id {args.id}", file=sys.stderr)
                return 1
            client = aioredis.from_url(redis_url)
            try:
                reached = await keys.announce_revocation(client, *(h for _, h in revoked))
            finally:
                await client.aclose()
            print(f"revoked {args.id} ({reached} gateway process(es) notified)")
        return 0
    finally:
        await conn.close()


def cmd_keys(args: argparse.Namespace) -> int:
    database_url, redis_url, services = resolve_urls()
    try:
        return asyncio.run(_keys(args, database_url, redis_url))
    finally:
        if services:
            services.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="OpenAI-compatible AI gateway")
    sub = parser.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="config YAML (default: $GATEWAY_CONFIG, ./gateway.yaml, else the demo)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1)
    sub.add_parser("migrate", help="apply database migrations")
    check = sub.add_parser("check-config", help="validate a config file; prints every problem")
    check.add_argument("file")
    sub.add_parser("mock-provider", help="run the mock LLM provider (see --help)", add_help=False)
    keys = sub.add_parser("keys", help="manage virtual API keys")
    ks = keys.add_subparsers(dest="keys_cmd", required=True)
    create = ks.add_parser("create")
    create.add_argument("--name", required=True)
    create.add_argument("--tenant", default="default")
    create.add_argument(
        "--require-tag",
        action="append",
        default=[],
        help="deployments serving this key must carry the tag (e.g. zdr); repeatable",
    )
    create.add_argument("--pii-policy", help="the PII policy (config pii.policies) of this key's requests")
    create.add_argument(
        "--scope", action="append", default=[], choices=["admin"], help="admin: the tenant's admin API; repeatable"
    )
    create.add_argument("--model", action="append", default=[], help="a model group the key may use; repeatable")
    create.add_argument(
        "--allowed-ip", action="append", default=[], help="a client network (CIDR) the key may be used from"
    )
    lst = ks.add_parser("list")
    lst.add_argument("--all", action="store_true", help="include revoked keys")
    revoke = ks.add_parser("revoke")
    revoke.add_argument("id")
    cli_agents.add_parser(sub)
    cli_kb.add_parser(sub)
    cli_channels.add_parser(sub)
    cli_queue.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["mock-provider"]:
        return cmd_mock_provider(argparse.Namespace(), argv[1:])
    args = build_parser().parse_args(argv)
    handler = {
        "serve": cmd_serve,
        "migrate": cmd_migrate,
        "check-config": cmd_check_config,
        "keys": cmd_keys,
        "agents": cli_agents.run,
        "kb": cli_kb.run,
        "channels": cli_channels.run,
        "queue": cli_queue.run,
    }[args.cmd]
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
