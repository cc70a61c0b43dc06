"""``gateway channels worker``: the channel queues' consumer as a process of its own, for
scaling out (``gateway serve`` runs one inside by default; ``GATEWAY_CHANNEL_WORKER=0`` turns
that off). It reads the same config, database and Redis as the gateway (``--config`` or
``$GATEWAY_CONFIG``; ``DATABASE_URL``/``REDIS_URL``, else the embedded servers of the data
directory) and calls the gateway at ``channels.gateway_url`` (else ``--gateway-url`` or
``$GATEWAY_URL``). SIGTERM stops it gracefully: in-flight turns finish or go back to the queue.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys


def add_parser(sub) -> None:
    ch = sub.add_parser("channels", help="channel adapters (WhatsApp)")
    cmds = ch.add_subparsers(dest="channels_cmd", required=True)
    worker = cmds.add_parser("worker", help="consume the channel queues (WhatsApp turns, statuses)")
    worker.add_argument("--config", help="config YAML (default: $GATEWAY_CONFIG, else ./gateway.yaml)")
    worker.add_argument("--gateway-url", help="the gateway the channels call (default: channels.gateway_url)")


async def _work(config, database_url: str, redis_url: str, gateway_url: str) -> int:
    import redis.asyncio as aioredis

    from channels.config import ChannelConfigError
    from channels.whatsapp import WhatsApp
    from gateway.embedded import default_data_dir

    redis = aioredis.from_url(redis_url, max_connections=1024, health_check_interval=30)
    try:
        try:
            channel = await WhatsApp.from_config(
                config.channels,
                redis=redis,
                database_url=database_url,
                data_dir=default_data_dir(),
                gateway_url=gateway_url,
                redis_url=redis_url,
            )
        except ChannelConfigError as exc:
            for p in exc.problems:
                print(f"  {p}", file=sys.stderr)
            return 1
        if channel is None:
            print("no channel account is configured (channels.whatsapp)", file=sys.stderr)
            return 1
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await channel.start_worker()
        print(f"channel worker running (gateway {gateway_url})", flush=True)
        await stop.wait()
        await channel.stop()
        return 0
    finally:
        await redis.aclose()


def run(args: argparse.Namespace) -> int:
    from core import logs
    from gateway.cli import _load_or_exit, _migrate
    from gateway.embedded import default_data_dir, resolve_urls

    logs.configure(os.environ.get("GATEWAY_LOG_LEVEL", "INFO"))
    path = args.config or os.environ.get("GATEWAY_CONFIG") or "gateway.yaml"
    config = _load_or_exit(path)
    gateway_url = (
        config.channels.gateway_url or args.gateway_url or os.environ.get("GATEWAY_URL") or "http://127.0.0.1:8000"
    )
    database_url, redis_url, services = resolve_urls(default_data_dir())
    try:
        asyncio.run(_migrate(database_url))
        import uvloop

        return uvloop.run(_work(config, database_url, redis_url, gateway_url))
    finally:
        if services is not None:
            services.stop()
