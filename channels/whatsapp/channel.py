"""One process's WhatsApp channel: accounts, queues, webhook, worker, sender, deliverer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from channels.config import WhatsAppAccount, whatsapp_accounts
from channels.gateway_client import GatewayClient
from channels.whatsapp import dead_letters, inflight, names, store
from channels.whatsapp.content import MediaStore
from channels.whatsapp.deliverer import DELIVERY_LEASE_S, WhatsAppDeliverer
from channels.whatsapp.graph import Graph
from channels.whatsapp.sender import Sender
from channels.whatsapp.webhook import DEDUPE_TTL, Webhook
from channels.whatsapp.worker import INBOUND, STATUS, Worker
from core.background import Periodic, stop_task
from core.env import env_float, env_on
from core.fastredis import PipelinedRedis
from core.queue import Queue

log = logging.getLogger("channels.whatsapp")


def worker_enabled() -> bool:
    """``GATEWAY_CHANNEL_WORKER=0`` keeps a serving process from consuming the channel queues."""
    return env_on("GATEWAY_CHANNEL_WORKER")


class WhatsApp:
    """Tuning by environment (tests shorten them): ``GATEWAY_WA_CONCURRENCY`` (turns in flight per
    process, default 32), ``GATEWAY_WA_VISIBILITY_TIMEOUT`` (s, default 60),
    ``GATEWAY_WA_MAX_RETRIES`` (default 5), ``GATEWAY_WA_BACKOFF`` (s, default 2),
    ``GATEWAY_WA_MAX_BACKLOG`` (unanswered messages one conversation may have queued, default 100),
    ``GATEWAY_WA_STOP_GRACE`` (s, default 10: how long in-flight turns may finish at shutdown),
    ``GATEWAY_WA_DELIVERY_LEASE`` (s, default 120: a person's reply's send and check; past it a
    worker runs the check its stopped process did not, ``inflight``)."""

    def __init__(
        self,
        accounts: dict[str, WhatsAppAccount],
        *,
        redis,
        pool,
        data_dir: Path,
        gateway_url: str,
        redis_url: str | None = None,
        owns_pool: bool = False,
    ) -> None:
        self.accounts = accounts
        self.pool = pool
        self._owns_pool = owns_pool  # created for the channel (store.create_pool): closed by stop()
        self.redis = redis
        self.data_dir = Path(data_dir)
        visibility = max(0.5, env_float("GATEWAY_WA_VISIBILITY_TIMEOUT", 60.0))
        # the queues' per-message steps and the send state's many small ones go through the
        # pipelined client when there is a URL
        self.fast = PipelinedRedis(redis_url, timeout=5) if redis_url else None
        self.inbound = Queue(
            redis,
            INBOUND,
            ordered=True,
            max_retries=int(env_float("GATEWAY_WA_MAX_RETRIES", 5)),
            backoff_base=env_float("GATEWAY_WA_BACKOFF", 2.0),
            backoff_max=600.0,
            visibility_timeout=visibility,
            dedupe_ttl=DEDUPE_TTL,
            poll=0.05,
            fast=self.fast,
            dead_tag=dead_letters.dead_tag(accounts),  # (an erasure drops a conversation's)
        )
        self.statuses = Queue(
            redis,
            STATUS,
            visibility_timeout=visibility,
            dedupe_ttl=DEDUPE_TTL,
            poll=0.2,
            fast=self.fast,
            dead_tag=dead_letters.dead_tag(accounts),  # (a status names its recipient's number)
        )
        self.queues = {INBOUND: self.inbound, STATUS: self.statuses}
        self.graph = Graph()
        self.gateway = GatewayClient(gateway_url)
        self.sender = Sender(redis, pool, self.graph, self.fast)
        self.webhook = Webhook(
            accounts, self.inbound, self.statuses, int(env_float("GATEWAY_WA_MAX_BACKLOG", 100)) or 100
        )
        self.worker = Worker(
            accounts,
            pool=pool,
            inbound=self.inbound,
            sender=self.sender,
            graph=self.graph,
            media=MediaStore(self.graph, data_dir, redis),
            gateway=self.gateway,
            redis=redis,
        )
        self.inbound.on_dead = self.worker.on_dead
        lease = env_float("GATEWAY_WA_DELIVERY_LEASE", DELIVERY_LEASE_S)
        self.deliverer = WhatsAppDeliverer(
            accounts, pool, self.sender, self.inbound, redis=redis, lease_s=max(0.5, lease)
        )
        self.inflight_sweep = Periodic(
            "wa-inflight", min(5.0, max(0.25, lease / 2)), self._sweep_inflight, log
        )  # (the checks of replies whose process stopped, in every worker)
        self.concurrency = int(env_float("GATEWAY_WA_CONCURRENCY", 32)) or 32
        self.stop_grace = max(0.0, env_float("GATEWAY_WA_STOP_GRACE", 10.0))
        self._tasks: list[asyncio.Task] = []

    @classmethod
    async def from_config(
        cls, channels, *, redis, database_url: str, data_dir: Path, gateway_url: str, redis_url: str | None = None
    ) -> WhatsApp | None:
        """None when no account is configured; raises ChannelConfigError on invalid accounts."""
        accounts = whatsapp_accounts(channels.whatsapp)
        if not accounts:
            return None
        pool = await store.create_pool(database_url)
        return cls(
            accounts,
            redis=redis,
            pool=pool,
            data_dir=data_dir,
            gateway_url=gateway_url,
            redis_url=redis_url,
            owns_pool=True,
        )

    async def start_worker(self) -> None:
        if self._tasks:
            return
        try:  # (before the first job: what an older release named by a plain hash, renamed)
            await names.upgrade(self.redis, self.data_dir)
        except Exception as exc:  # (the marks are read, and erasures delete, under both names meanwhile)
            log.warning("whatsapp names of an older release not renamed yet: %s", type(exc).__name__)
        self._tasks = [
            asyncio.create_task(self._run(self.inbound, self.worker.handle, self.concurrency), name="wa-inbound"),
            asyncio.create_task(self._run(self.statuses, self.worker.handle_status, 16), name="wa-status"),
        ]
        self.inflight_sweep.start()

    async def _sweep_inflight(self) -> None:
        await inflight.sweep(self.redis, self.pool, self.sender, self.deliverer.lease_ms)

    async def _run(self, queue: Queue, handler, concurrency: int) -> None:
        while True:
            try:
                await queue.run(handler, concurrency=concurrency)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Queue.run handles Redis errors itself; a last guard
                log.warning("whatsapp worker stopped (%s); restarting in 5 s", type(exc).__name__)
                await asyncio.sleep(5)

    async def drain(self, grace: float | None = None) -> None:
        """No job is taken any more; the turns in flight get ``grace`` seconds (``stop_grace`` by
        default) to finish, the rest go back to the queue unchanged (no retry of theirs used up:
        another replica, or the next start, takes them). The clients stay open (a human's reply
        may still be delivered): ``gateway serve`` drains the channel while the gateway still
        serves (``gateway.serving``), so the turns' calls to it are answered; ``stop`` closes them."""
        grace = self.stop_grace if grace is None else max(0.0, grace)
        self.worker.stopping = True  # (a turn whose gateway call fails from now on is put back)
        await self.inflight_sweep.stop()
        if self._tasks:
            await asyncio.gather(*(self._stop_queue(q, grace) for q in (self.inbound, self.statuses)))
            for t in self._tasks:
                await stop_task(t)
            self._tasks = []

    @staticmethod
    async def _stop_queue(queue: Queue, grace: float) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(queue.stop(grace), grace + 15)

    async def stop(self, grace: float | None = None) -> None:
        """``drain`` (if it has not run), then the clients closed."""
        await self.drain(grace)
        await self.graph.close()
        await self.gateway.close()
        if self.fast is not None:
            await self.fast.close()
        if self._owns_pool:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pool.close(), 5)
