"""``gateway queue ...``: operations on the durable queues in Redis (``$REDIS_URL``, else the
embedded Valkey under the data directory).

``gateway queue downgrade kb-ingest`` is the way back to a release before the fair (per-tenant)
ingestion queue: that release reads only the plain stream, so the documents this release queued
per tenant would never be processed. Stop every replica of this release, run it, then start the
previous release.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import redis.asyncio as aioredis

from core.fair_queue import FairQueue
from core.queue import _NAME
from gateway.embedded import EmbeddedServices, default_data_dir


def add_parser(sub) -> None:
    queue = sub.add_parser("queue", help="durable queues in Redis")
    cmds = queue.add_subparsers(dest="queue_cmd", required=True)
    down = cmds.add_parser(
        "downgrade",
        help="move a fair queue's jobs back to the plain stream a previous release reads (before a rollback)",
    )
    down.add_argument("name", help="the queue (kb-ingest)")
    down.add_argument(
        "--force", action="store_true", help="even while consumers of this release run (their jobs may run twice)"
    )


async def _downgrade(redis_url: str, name: str, force: bool) -> int:
    client = aioredis.from_url(redis_url)
    try:
        queue = FairQueue(client, name)
        try:
            moved = await queue.downgrade(force=force)
        except RuntimeError as exc:
            print(f"{exc}: stop every replica of this release first (or pass --force)", file=sys.stderr)
            return 1
        print(
            f"queue {name}: moved {moved['queued']} queued, {moved['delayed']} waiting for a retry and "
            f"{moved['in_flight']} taken by stopped workers to the stream a previous release reads"
        )
        return 0
    finally:
        await client.aclose()


def run(args: argparse.Namespace) -> int:
    if not _NAME.match(args.name):
        print("a queue name is 1-64 of [a-z0-9_.-]", file=sys.stderr)
        return 2
    redis_url = os.environ.get("REDIS_URL", "")
    services = None
    if not redis_url:
        services = EmbeddedServices(default_data_dir()).start(postgres=False, valkey=True)
        redis_url = services.redis_url
    try:
        return asyncio.run(_downgrade(redis_url, args.name, args.force))
    finally:
        if services:
            services.stop()
