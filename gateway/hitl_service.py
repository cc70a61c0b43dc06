"""Human in the loop, composed: the runtime's parts (runtime/hitl) given what they may not import
themselves — the budget alerts' delivery for SLA alerts, and the knowledge-base pipeline for
learned answers."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
import threading
from dataclasses import dataclass

from prometheus_client import Counter, Histogram

from core.config import Hitl
from core.errors import InvalidRequest
from core.tokens import count_text
from gateway import kb_limits, storage_quota
from policies.alerts import emit_event
from policies.pii.analysis import TooMuchToCheck
from rag import store as kb_store
from rag.chunking import Chunk
from rag.embedding import DIMS as LOCAL_DIMS
from rag.embedding import MODEL as LOCAL_MODEL
from runtime import agents as agent_store
from runtime.hitl import held, sla

log = logging.getLogger("gateway.hitl")

CONFIDENCE = Histogram(
    "gateway_agent_confidence",
    "Confidence of agent turns (0-1), by whether the turn escalated",
    ["escalated"],
    buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0),
)
ESCALATIONS = Counter(
    "gateway_escalations_total",
    "Escalations opened, by trigger (escalate_tool, asked_for_human, low_confidence)",
    ["trigger"],
)
SLA_ALERTS = Counter(
    "gateway_escalation_sla_alerts_total", "Escalation SLA alerts fired, by type and SLA", ["type", "sla"]
)
LEARNED_KB_PREFIX = "learned-answers-"


@dataclass
class HitlService:
    config: Hitl
    holds: held.Holds
    feed: held.Feed
    sweeper: sla.Sweeper
    indexer: LearnedIndexer
    fast: object = None  # the pipelined client of the held checks

    def sla_for(self, urgency: str) -> sla.Sla:
        configured = self.config.sla.get(urgency)
        if configured is not None:
            return sla.Sla(configured.first_response_s, configured.resolution_s)
        return sla.DEFAULT_SLAS.get(urgency, sla.DEFAULT_SLAS["normal"])

    async def stop(self) -> None:
        await self.sweeper.stop()
        await self.feed.stop()
        if self.fast is not None:
            await self.fast.close()


async def start(
    config: Hitl, pool, redis, fast, embedder, quota: storage_quota.StorageQuota | None = None
) -> HitlService:
    holds = held.Holds(redis, fast)
    await held.upgrade(redis)  # (before a turn reads a hold: those an older release named, renamed)

    async def emit(alert: dict) -> None:
        """An SLA alert (claimed exactly once by the sweeper): log line, metric, signed webhook."""
        SLA_ALERTS.labels(alert["type"].rsplit(".", 1)[-1], alert["sla"]).inc()
        log.warning("escalation SLA alert", extra={"fields": alert})
        await emit_event(redis, alert)

    sweeper = sla.Sweeper(pool, redis, holds, emit, interval=config.sweep_interval_s)
    feed = held.Feed(redis)
    service = HitlService(config, holds, feed, sweeper, LearnedIndexer(embedder, quota), fast)
    try:
        await feed.start()
        await sweeper.start()
    except BaseException:  # what did start is stopped (the feed's task, the connection): not left running
        await service.stop()
        raise
    _end_streams_on_exit(feed)
    return service


def _end_streams_on_exit(feed: held.Feed) -> None:
    """The server waits for open responses before it stops, and a console's event stream never
    ends by itself: on SIGTERM/SIGINT the streams end first, then the server's own handler runs."""
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(signum, frame, previous=previous) -> None:
            loop.call_soon_threadsafe(feed.close_streams)
            previous(signum, frame)

        signal.signal(sig, handler)


def _too_much_to_learn(exc: TooMuchToCheck, field: str) -> InvalidRequest:
    """The 400 of an example past a PII bound, naming what was refused: the corrected answer, the
    AI's draft (``approve_draft``), or the escalation's question (which neither can shorten)."""
    if field == "approve_draft":
        answer, fix = "The AI's draft", "send a shorter corrected_answer instead, or resolve without approve_draft"
    else:
        answer, fix = "The corrected answer", "shorten the corrected answer, or resolve without one"
    if exc.text == 0:
        what = "The escalation's question"
        fix = "resolve without approve_draft" if field == "approve_draft" else "resolve without a corrected answer"
    elif exc.text == 1:
        what = answer
    else:
        what = f"The escalation's question with {answer[0].lower()}{answer[1:]}"
    return InvalidRequest(
        f"{what} holds more text or numbers than the gateway may check for personal data at once, so it "
        f"cannot be learned as it is: {fix}.",
        param=field,
        code="pii_too_much_to_check",
    )


async def redact_for_learning(
    pii, tenant: str, model: str, texts: list[str], field: str = "corrected_answer"
) -> list[str]:
    """A learned example is grounding for every later customer of the agent and a line of its
    training data: personal data the PII policy of the agent's turns finds in it (any action:
    pseudonyms would be restored into another customer's answer) is replaced by its type, e.g.
    ``[EMAIL]``, before the example is stored — what a reviewer approves is what is reused.
    Without a policy nothing is detected (the reviewer is the only gate). ``texts``: the question
    and the answer; ``field``: the resolve's field the answer came from (``corrected_answer``, or
    ``approve_draft`` for the AI's draft), which a refusal names."""
    if pii is None:
        return texts
    name = pii.config.models.get(model) or pii.config.tenants.get(tenant) or "default"
    policy = pii.policies.get(name)
    if policy is None or not policy.actions:
        return texts
    try:
        findings = await pii.analyzer.find(policy.spec, texts)
    except TooMuchToCheck as exc:  # past a per-request PII bound: a 400 naming what to shorten, not a 500
        raise _too_much_to_learn(exc, field) from None
    out = []
    for text, found in zip(texts, findings, strict=True):
        spans = sorted(((s, e, policy.labels[t]) for s, e, t, _ in found if t in policy.labels), reverse=True)
        end = len(text) + 1
        for start, stop, label in spans:  # from the end: earlier offsets stay valid; overlaps skipped
            if stop > end:
                continue
            text = f"{text[:start]}[{label.upper()}]{text[stop:]}"
            end = start
        out.append(text)
    return out


class LearnedIndexer:
    """Approved examples into the agent's "learned answers" knowledge base (created on demand and
    attached to the agent, so grounding searches it): one document and one chunk per example."""

    def __init__(self, embedder, quota: storage_quota.StorageQuota | None = None) -> None:
        self._embedder = embedder
        self._quota = quota or storage_quota.StorageQuota()
        self.changed_agents: set[str] = set()  # agents whose knowledge bases changed (to announce)

    async def index(self, conn, agent, example: dict) -> tuple[str, str]:
        from core.errors import ServiceUnavailable

        if self._embedder is None:
            raise ServiceUnavailable("The local embedding model is not installed; learned answers cannot be indexed.")
        kb = await self._kb(conn, agent)
        text = f"Question: {example['question']}\nAnswer: {example['answer']}"
        digest = hashlib.sha256(text.encode()).hexdigest()
        size = len(text.encode())
        # A learned answer is a document as an admin's upload is (kept once, in one knowledge base,
        # never attached to a vector store): it counts where those do, under the tenant's storage
        # lock to the commit — its files and bytes (policies.max_files_per_tenant,
        # max_file_bytes_per_tenant) and its knowledge base's documents (kb_limits).
        room = await kb_limits.Room.take(conn, agent.tenant, kb.id, kb_limits.Limits(), attaching=False)
        await storage_quota.check(conn, agent.tenant, self._quota, size, param="id")
        doc, _ = await kb_store.add_document(
            conn,
            agent.tenant,
            kb.id,
            filename=f"{example['id']}.txt",
            content_type="text/plain",
            size=size,
            sha256=digest,
        )
        room.add(size, "id", attached=False)
        vector = (await self._embedder.embed([text]))[0]
        chunk = Chunk(0, text, "", count_text(text))
        await kb_store.replace_chunks(conn, agent.tenant, kb.id, doc.id, [chunk], [vector], LOCAL_MODEL)
        return kb.id, doc.id

    async def unindex(self, conn, tenant: str, kb_id: str, document_id: str) -> None:
        await kb_store.delete_document(conn, tenant, document_id)

    async def _kb(self, conn, agent) -> kb_store.KnowledgeBase:
        name = f"{LEARNED_KB_PREFIX}{agent.name}"
        find = "SELECT id FROM knowledge_bases WHERE tenant = $1 AND name = $2"
        row = await conn.fetchrow(find, agent.tenant, name)
        if row is None:  # (under the tenant's knowledge-base lock: a racing approval's is found)
            await kb_limits.lock_kbs(conn, agent.tenant)
            row = await conn.fetchrow(find, agent.tenant, name)
        if row is not None:
            kb = await kb_store.get_kb(conn, agent.tenant, row["id"])
        else:
            await kb_limits.check_room_for_kb(conn, agent.tenant)  # (one per agent, among the tenant's)
            kb = await kb_store.create_kb(
                conn,
                agent.tenant,
                name,
                embedding_model=LOCAL_MODEL,
                dims=LOCAL_DIMS,
                description=f"Answers people gave for agent {agent.name}, approved for reuse.",
            )
        agent = await agent_store.lock_agent(conn, agent)  # settings a racing change committed are kept
        if kb.id not in agent.knowledge_bases:
            settings = {**agent.settings, "knowledge_bases": [*agent.knowledge_bases, kb.id]}
            await agent_store.update_agent(conn, agent, None, None, settings)
            self.changed_agents.add(agent.id)
        return kb
