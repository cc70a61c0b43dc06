"""What one gateway process holds while it runs: config, pools, adapters, router, caches."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

from channels.vapi import spool as vapi_spool
from channels.whatsapp import WhatsApp
from channels.whatsapp import erasure as wa_erasure
from core import tokens
from core.config import Config
from core.erasure_key import erasure_key
from core.fastredis import PipelinedRedis
from core.upstream import Upstream
from gateway import hitl_service, kb_worker, storage_quota
from gateway.conversation_retention import ChannelCopies, RetentionSweeper
from gateway.db import connect_pool, migrate
from gateway.providers import build_adapter
from gateway.providers.base import ProviderAdapter
from gateway.routing import Router
from gateway.routing.shared import SharedHealth
from gateway.started import Started
from gateway.vector_store_expiry import ExpirySweeper
from policies.alerts import AlertSender
from policies.auth import Authenticator
from policies.budgets import BudgetCache
from policies.engine import LEDGER_STREAM, PolicyEngine
from policies.ledger import LedgerWriter, Spool
from policies.pii.scrub import Scrubber
from rag.embedding import LocalEmbedder
from rag.rerank_local import LocalReranker
from rag.rerank_local import from_settings as local_reranker_from
from runtime import erased_records
from runtime.agent_registry import AgentRegistry
from runtime.delivery import Delivery
from runtime.hitl import held
from runtime.memory import Memory
from runtime.runs import RUNS_STREAM, RunRecorder
from runtime.tools import ToolRunner

log = logging.getLogger("gateway")


@dataclass(frozen=True)
class Settings:
    config: Config
    database_url: str
    redis_url: str
    master_key: str | None = None
    data_dir: Path = Path(".data")


@dataclass
class Services:
    config: Config
    pool: asyncpg.Pool
    redis: aioredis.Redis
    upstream: Upstream
    adapters: dict[str, ProviderAdapter]
    router: Router
    auth: Authenticator
    health: SharedHealth
    budgets: BudgetCache
    policies: PolicyEngine
    ledger: LedgerWriter
    alerts: AlertSender
    pii: Scrubber | None = None
    agents: AgentRegistry | None = None
    memory: Memory | None = None
    tools: ToolRunner | None = None
    runs: RunRecorder | None = None
    embedder: LocalEmbedder | None = None  # the local embedding model, for queries
    kb: kb_worker.KbWorker | None = None  # the kb-ingest queue, its worker, where uploads are kept
    delivery: Delivery = field(default_factory=Delivery)  # channel deliverers (human replies etc.)
    # ids of the keys the channel accounts use: only they may hold channel conversations
    # (``wa:…``, ``vapi:…``, whose ids are guessable from a phone number)
    channel_keys: set[str] = field(default_factory=set)
    hitl: hitl_service.HitlService | None = None  # human in the loop: holds, queue feed, SLA sweeper
    whatsapp: WhatsApp | None = None  # the WhatsApp channel (gateway/channels_whatsapp.py; the app stops it)
    local_reranker: LocalReranker | None = None  # the local cross-encoder (rag.rerank.local_model_dir)
    expiry: ExpirySweeper | None = None  # empties expired vector stores (every replica; idempotent)
    retention: RetentionSweeper | None = None  # deletes conversations past their agent's retention
    forget_channel: ChannelCopies | None = None  # a channel's copies of conversations deleted (dead letters, files)
    _ready: tuple[float, dict[str, str]] | None = None  # (valid until, result) of the last check
    _ready_check: asyncio.Future | None = None  # the check under way, shared by its callers
    _parts: Started = field(default_factory=Started, repr=False)  # what ``start`` started, in order

    @classmethod
    async def start(cls, settings: Settings) -> Services:
        """Everything started, in order; a start that fails part-way stops what it had started
        (in reverse) before it raises: left running, their tasks and worker processes outlive the
        failed start, and the process may never exit (``GatewayApp._lifespan``)."""
        started = Started()
        try:
            svc = await cls._start(settings, started)
        except BaseException:
            await started.stop()
            raise
        svc._parts = started
        return svc

    @classmethod
    async def _start(cls, settings: Settings, started: Started) -> Services:
        """Each part's stop is added to ``started`` as soon as the part has started: ``stop`` and a
        failed start both run that list, in reverse. (The ledger starts after the stream writers,
        so that it is flushed before them, first of the parts requests write to.)"""
        # the local cross-encoder re-ranker, when configured: an unusable folder fails start-up here
        taken = frozenset(m.name for m in settings.config.models)
        local_reranker = local_reranker_from(settings.config.rag.rerank, taken=taken)
        if local_reranker is not None:
            started.add(local_reranker.close)
        pool = await connect_pool(settings.database_url)

        async def close_pool() -> None:
            await asyncio.wait_for(pool.close(), 5)

        started.add(close_pool)
        async with pool.acquire() as conn:
            await migrate(conn)
        # Generous: a burst of concurrent requests each holds a connection for one round trip.
        redis = aioredis.from_url(settings.redis_url, max_connections=4096, health_check_interval=30)
        started.add(redis.aclose)
        await redis.ping()
        upstream = Upstream()
        await upstream.start()
        started.add(upstream.close)
        adapters = {}
        for provider in settings.config.providers:
            adapters[provider.name] = adapter = build_adapter(provider, upstream)
            started.add(adapter.close)
        auth = Authenticator(pool, redis, settings.master_key, settings.config)
        await auth.start()
        started.add(auth.stop)
        router = Router(settings.config)
        health = SharedHealth(redis, router)
        router.set_publisher(health.publish)
        await health.start()
        started.add(health.stop)
        budgets = BudgetCache(pool, redis)
        await budgets.start()
        started.add(budgets.stop)
        fast = PipelinedRedis(settings.redis_url)
        policies = PolicyEngine(settings.config, fast, budgets, router)
        await policies.start()
        started.add(policies.close)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        pii = None
        if settings.config.pii.enabled:
            # a group's deployments name the tokenizer of token-array embeddings input
            models = {m.name: tuple(d.model for d in m.deployments) for m in settings.config.models}
            pii = Scrubber(settings.config.pii, settings.data_dir.resolve(), models=models)
            await pii.start()
            started.add(pii.close)
        # the readers: independent of each other, each waiting out its own blocking read on its
        # stop, so they are stopped together
        alerts = AlertSender(redis, budgets, settings.config.alerts)
        await alerts.start()
        started.add(alerts.stop, together="readers")
        # the agent runtime: registry (cached, pub/sub), memory, tools, run records
        agents = AgentRegistry(pool, redis, cache_bytes=settings.config.policies.prompt_cache_bytes)
        await agents.start()
        started.add(agents.stop, together="readers")
        # an agent's replica loads the tokenizer in a thread from the registry's start: no traffic
        # and no background consumer (memory, runs, ingestion) before it is loaded, so nothing
        # loads it on the event loop, and no consumer's first messages wait on the load
        await asyncio.to_thread(tokens.wait_warm)
        # the stream writers (memory, runs) read and ack over connections of their own (blocking reads)
        memory = Memory(
            pool,
            redis,
            fast=PipelinedRedis(settings.redis_url, timeout=2),
            reader=PipelinedRedis(settings.redis_url, timeout=10),
            spill_dir=settings.data_dir,
        )
        await memory.start()
        started.add(memory.stop, together="readers")
        tools = ToolRunner()
        await tools.start()
        started.add(tools.stop, together="readers")
        runs = RunRecorder(
            pool, redis, fast=fast, reader=PipelinedRedis(settings.redis_url, timeout=10), spill_dir=settings.data_dir
        )
        await runs.start()
        started.add(runs.stop, together="readers")
        spool = Spool(settings.data_dir / f"ledger-spool-{os.getpid()}.jsonl")
        ledger = LedgerWriter(redis, PipelinedRedis(settings.redis_url, timeout=10), pool, spool)
        await ledger.start()
        started.add(ledger.stop)
        # knowledge bases: the local embedding model and the ingestion worker on the kb-ingest queue
        embedder = kb_worker.make_embedder()
        kb = kb_worker.KbWorker(pool, redis, embedder, settings.data_dir.resolve())
        started.add(kb.close)  # its embedding thread, whether or not the worker runs here
        if kb_worker.enabled():
            await kb.start()
            started.add(kb.stop)
        expiry = ExpirySweeper(pool, settings.data_dir.resolve())
        expiry.start()
        started.add(expiry.stop)
        # (a channel's copies are dropped through Redis and the data directory alone: with or without
        # its accounts here)
        forget_channel = _forget_in_redis(redis, settings.data_dir.resolve(), pool, spool.dead_path, erasure=True)
        channel_copies = _forget_in_redis(redis, settings.data_dir.resolve(), pool, spool.dead_path, erasure=False)
        retention = RetentionSweeper(pool, memory=memory, channel_copies=channel_copies, holds=held.Holds(redis))
        retention.start()
        started.add(retention.stop)
        limits = settings.config.policies  # (learned answers count in the tenant's storage)
        quota = storage_quota.StorageQuota(limits.max_files_per_tenant, limits.max_file_bytes_per_tenant)
        hitl = await hitl_service.start(
            settings.config.hitl, pool, redis, PipelinedRedis(settings.redis_url, timeout=2), embedder, quota
        )
        started.add(hitl.stop)
        return cls(
            settings.config,
            pool,
            redis,
            upstream,
            adapters,
            router,
            auth,
            health,
            budgets,
            policies,
            ledger,
            alerts,
            pii,
            agents,
            memory,
            tools,
            runs,
            embedder=embedder,
            kb=kb,
            hitl=hitl,
            local_reranker=local_reranker,
            expiry=expiry,
            retention=retention,
            forget_channel=forget_channel,
        )

    async def stop(self) -> None:
        """After the server drained its requests: every part stopped, last started first (the
        list ``start`` made), each whatever the others' stops raised."""
        await self._parts.stop()

    async def readiness(self) -> dict[str, str]:
        """The database and Redis checks of /readyz, which anyone may call: run at most once per
        ``server.readiness_interval`` however many callers ask (they share one check in flight),
        so it costs at most one round trip to each per interval."""
        now = time.monotonic()
        cached = self._ready
        if cached is not None and now < cached[0]:
            return cached[1]
        check = self._ready_check
        if check is None or check.done():  # (done: its callers all left before it finished)
            check = self._ready_check = asyncio.ensure_future(self._check_readiness())
        return await asyncio.shield(check)

    async def _check_readiness(self) -> dict[str, str]:
        async def database() -> str:
            async with self.pool.acquire(timeout=2) as conn:
                await conn.fetchval("SELECT 1", timeout=2)
            return "ok"

        async def redis() -> str:
            await asyncio.wait_for(self.redis.ping(), 2)
            return "ok"

        out = {}
        for name, check in (("database", database), ("redis", redis)):
            try:
                out[name] = await check()
            except Exception as exc:
                out[name] = f"error: {type(exc).__name__}"
        self._ready = (time.monotonic() + self.config.server.readiness_interval, out)
        return out


DEAD_RECORD_STREAMS = (f"{LEDGER_STREAM}:dead", f"{RUNS_STREAM}:dead")


def _forget_in_redis(redis, data_dir: Path, pool, ledger_dead: Path, *, erasure: bool) -> ChannelCopies:
    """What an erasure or a retention does outside PostgreSQL: the runs' and ledger's dead
    letters of the conversations get their tags (``runtime.erased_records``: in Redis, and in
    this replica's ``ledger_dead`` file; another replica's file, in its own data directory, is
    rewritten only by an erasure or retention it serves), and a channel's copies go
    (``channels.whatsapp.erasure.forget``); an erasure's, not a retention's, also drops
    the channel's jobs queued before it (a customer writing again just as the retention deletes
    their silent conversation starts a new one), and the VAPI records spooled while an erasure held
    the lock (``channels.vapi.spool.drop``)."""

    async def forget(tenant: str, conversations: list[str]) -> None:
        await erased_records.retag_dead_letters(redis, DEAD_RECORD_STREAMS, tenant, conversations)
        key = erasure_key()  # (read here: the thread then does file work only)
        await asyncio.to_thread(erased_records.retag_dead_file, ledger_dead, tenant, conversations, key)
        await wa_erasure.forget(redis, data_dir, pool, tenant, conversations, mark=erasure)
        if erasure:  # (VAPI records an erasure's lock kept out: the caller's number and words)
            await vapi_spool.drop(redis, tenant, conversations)

    return forget
