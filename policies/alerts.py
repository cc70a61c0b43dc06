"""Budget alerts: fired at most once per budget, threshold and period (the settle script's
SET NX decides, across every replica), then POSTed as a signed webhook by whichever replica
reads them first.

Where an alert goes: the budget's own ``webhook_url``, else ``alerts.webhook_url``. Both are
delivered through ``policies.webhooks``: public addresses only unless ``alerts.allowed_networks``
/ ``alerts.allow_private_networks`` allow more, checked on the address actually connected to;
redirects are never followed; explicit connect and total timeouts.

Delivery. Each receiver (one webhook URL) has its own queue and worker task: its alerts are
tried one at a time in the order they fired, and after a failure that receiver — only that
one — waits (``alerts.backoff``, doubling up to its max) before its next attempt. A dead or
slow receiver therefore holds back nothing but its own alerts; ``alerts.max_concurrency``
bounds the attempts in flight over all receivers, ``alerts.max_backlog`` the alerts waiting
for one receiver. An alert is tried at most ``alerts.max_attempts`` times and no longer than
``alerts.max_age`` seconds after it fired; a redirect, a refused address or a 4xx answer (but
408/425/429) ends it at once. An alert that is not delivered is recorded as failed — an error
log line naming the budget, threshold, receiver host and reason, and
``gateway_alert_deliveries_total{outcome="failed",reason=...}`` — and acknowledged: it is not
tried again. Delivery is at least once (a replica that dies mid-delivery has its alerts
claimed by another after 30 s); ``id`` / ``x-gateway-alert-id`` is the same on every attempt,
for receivers to drop duplicates.

Signing (``x-gateway-signature: sha256=<hex>``, HMAC-SHA256 of the raw body, as before):

- an alert sent to a budget's own ``webhook_url`` is signed with that budget's key,
  ``budget_signing_key(alerts.secret, budget_id)`` = HMAC-SHA256(alerts.secret,
  ``"gateway-webhook-key:v1:budget:" + budget_id``) as 64 hex characters (the admin API hands
  it to whoever sets the budget's URL). Each receiver holds only its own budget's key: it
  cannot forge alerts for another budget, and a signature captured from one budget's alerts
  does not verify for another's;
- an alert sent to ``alerts.webhook_url`` (the operator's receiver) is signed with
  ``alerts.secret`` itself.

The signed body always carries ``budget_id``, ``id`` (the alert), ``fired_at`` and
``timestamp`` (this attempt, also sent as ``x-gateway-timestamp``): receivers should check the
budget is theirs and reject stale timestamps (replays). No ``alerts.secret``: unsigned.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass, field

import orjson
from prometheus_client import Counter
from redis.exceptions import ResponseError

from core import metrics
from core.background import pause, stop_task, stop_tasks
from core.config import Alerts
from policies.budgets import NANO, BudgetCache
from policies.engine import ALERT_STREAM
from policies.webhooks import NetworkPolicy, Outcome, WebhookSender, derive_key, receiver_host, sign, url_problem

log = logging.getLogger("gateway.alerts")
GROUP = "alert-senders"
CLAIM_IDLE_MS = 30_000  # an alert un-acknowledged this long by a live replica is taken over
HEARTBEAT_S = 5.0  # how often a sender marks the alerts it holds as still in hand
BLOCK_MS = 250  # a blocking read of new alerts (what stop() waits out at most)

ALERT_DELIVERIES = Counter(
    "gateway_alert_deliveries_total",
    "Budget alert webhooks by outcome (delivered, failed) and reason "
    "(delivered, refused, redirect, status, timeout, connection, invalid_url, expired, backlog)",
    ["outcome", "reason"],
)

__all__ = ["AlertSender", "budget_signing_key", "emit_event", "fired", "sign"]


def budget_signing_key(secret: str, budget_id: str) -> str:
    """The key that signs alerts sent to this budget's own webhook_url."""
    return derive_key(secret, "budget", budget_id)


async def emit_event(redis, event: dict) -> None:
    """An alert of another kind than a budget's (an escalation's SLA warning or breach): queued on
    the alert stream and POSTed to ``alerts.webhook_url``, signed with ``alerts.secret``, by
    whichever replica reads it first (the same delivery, retries and backoff as budget alerts).
    The caller decides that it fires exactly once; ``event`` is its JSON body (``type`` first)."""
    await redis.xadd(ALERT_STREAM, {"event": orjson.dumps(event)})


def fired(alerts: list) -> None:
    """Log line and metric for alerts a settle just fired (exactly once across replicas)."""
    for i in range(0, len(alerts), 3):
        budget_id, threshold, spent = (v.decode() if isinstance(v, bytes) else str(v) for v in alerts[i : i + 3])
        metrics.budget_alerts.get(threshold).inc()
        log.warning(
            "budget alert",
            extra={"fields": {"budget_id": budget_id, "threshold": float(threshold), "spent_usd": int(spent) / NANO}},
        )


@dataclass(slots=True)
class _Job:
    entry_id: str
    budget_id: str
    threshold: float
    spent_nano: int
    key: str | None  # signing key
    attempts: int = 0
    event: dict | None = None  # an alert of another kind (emit_event): its body

    @property
    def fired_ms(self) -> int:
        return int(self.entry_id.split("-", 1)[0])


@dataclass(slots=True)
class _Receiver:
    url: str
    public_only: bool = False  # a tenant admin's URL: public addresses, whatever alerts.* allows
    queue: collections.deque = field(default_factory=collections.deque)
    task: asyncio.Task | None = None
    failures: int = 0  # in a row
    retry_at: float = 0.0  # monotonic


class AlertSender:
    def __init__(self, redis, budgets: BudgetCache, cfg: Alerts, *, resolver=None) -> None:
        self._redis = redis
        self._budgets = budgets
        self._cfg = cfg
        self._name = f"{socket.gethostname()}-{os.getpid()}"
        self._task: asyncio.Task | None = None
        self._stopping = asyncio.Event()
        self._webhooks = WebhookSender(
            NetworkPolicy.of(cfg),
            connect_timeout=cfg.connect_timeout,
            timeout=cfg.timeout,
            max_concurrency=cfg.max_concurrency,
            resolver=resolver,
            user_agent="ai-gateway-alerts/1",
        )
        # A URL a tenant admin set (a budget not locked) reaches public addresses only: what
        # alerts.allow_private_networks / allowed_networks open is the operator's alone.
        self._public = WebhookSender(
            NetworkPolicy(),
            connect_timeout=cfg.connect_timeout,
            timeout=cfg.timeout,
            max_concurrency=cfg.max_concurrency,
            resolver=resolver,
            user_agent="ai-gateway-alerts/1",
        )
        self._receivers: dict[tuple[str, bool], _Receiver] = {}
        self._held: set[str] = set()  # stream entries this sender holds (queued or being sent)

    async def start(self) -> None:
        with contextlib.suppress(ResponseError):
            await self._redis.xgroup_create(ALERT_STREAM, GROUP, id="0", mkstream=True)
        if self._cfg.webhook_url and (problem := url_problem(self._cfg.webhook_url, self._webhooks.policy)):
            log.error("alerts.webhook_url %s: alerts sent there will fail", problem)
        try:
            await self._webhooks.start()
            await self._public.start()
        except BaseException:  # the session one of them opened: closed, not left open
            await self.stop()
            raise
        self._task = asyncio.create_task(self._run(), name="alert-sender")

    async def stop(self) -> None:
        # Let the loop see the flag (its blocking read lasts at most BLOCK_MS) rather than
        # cancel it inside redis-py, whose clean-up after a cancelled blocking read can hang.
        # Alerts still queued stay un-acknowledged: another replica takes them over.
        self._stopping.set()
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=3)
        await stop_task(self._task)
        await stop_tasks([r.task for r in self._receivers.values() if r.task is not None])
        await self._webhooks.close()
        await self._public.close()

    # -- reading the stream ---------------------------------------------------------------

    async def _run(self) -> None:
        last_claim = 0.0
        first = True
        while not self._stopping.is_set():
            try:
                if first:  # ours from before (same consumer name): take them back first
                    mine = await self._redis.xreadgroup(GROUP, self._name, {ALERT_STREAM: "0"}, count=1000)
                    await self._take(mine[0][1] if mine else [])
                    first = False
                if time.monotonic() - last_claim >= HEARTBEAT_S:
                    await self._heartbeat()
                    await self._claim()
                    last_claim = time.monotonic()
                fresh = await self._redis.xreadgroup(GROUP, self._name, {ALERT_STREAM: ">"}, count=100, block=BLOCK_MS)
                await self._take(fresh[0][1] if fresh else [])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("alert sender: %s", exc)
                await pause(self._stopping, 1)

    async def _heartbeat(self) -> None:
        """Resets the idle time of the alerts this sender holds, so no replica takes over an
        alert that is only waiting for its receiver's backoff (JUSTID: no delivery count)."""
        held = sorted(self._held)
        for i in range(0, len(held), 500):
            await self._redis.xclaim(ALERT_STREAM, GROUP, self._name, 0, held[i : i + 500], justid=True)

    async def _claim(self) -> None:
        """Takes over alerts a dead replica left un-acknowledged."""
        start = "0-0"
        for _ in range(10):
            reply = await self._redis.xautoclaim(
                ALERT_STREAM, GROUP, self._name, CLAIM_IDLE_MS, start_id=start, count=100
            )
            await self._take(reply[1])
            start = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
            if start == "0-0":
                break

    async def _take(self, entries) -> None:
        for entry_id, fields in entries:
            entry_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            if not fields:  # deleted meanwhile
                await self._finish(entry_id)
                continue
            if entry_id not in self._held:
                await self._schedule(entry_id, fields)

    async def _schedule(self, entry_id: str, fields: dict) -> None:
        if b"event" in fields:  # not a budget's: to the operator's receiver, signed with its secret
            event = orjson.loads(fields[b"event"])
            await self._queue(_Job(entry_id, "", 0.0, 0, self._cfg.secret, event=event), self._cfg.webhook_url)
            return
        budget_id = fields[b"budget"].decode()
        job = _Job(entry_id, budget_id, float(fields[b"threshold"]), int(fields[b"spent"]), None)
        budget = self._budgets.by_id.get(budget_id)
        if budget is None:  # created a moment ago on another replica: this one may not know it yet
            with contextlib.suppress(Exception):
                await self._budgets.refresh(budget_id)
            budget = self._budgets.by_id.get(budget_id)
        url, public_only = self._cfg.webhook_url, False
        if budget is not None and budget.webhook_url:
            url, public_only = budget.webhook_url, not budget.locked
            job.key = budget_signing_key(self._cfg.secret, budget_id) if self._cfg.secret else None
        else:
            job.key = self._cfg.secret
        await self._queue(job, url, public_only)

    async def _queue(self, job: _Job, url: str | None, public_only: bool = False) -> None:
        entry_id = job.entry_id
        if not url:  # nowhere to send: the log line and metric of fired() are the alert
            await self._finish(entry_id)
            return
        receiver = self._receivers.get((url, public_only))
        if receiver is None:
            receiver = self._receivers[url, public_only] = _Receiver(url, public_only)
        if len(receiver.queue) >= self._cfg.max_backlog:
            self._failed(job, url, "backlog", f"{len(receiver.queue)} alerts already wait for this receiver")
            await self._finish(entry_id)
            return
        receiver.queue.append(job)
        self._held.add(entry_id)
        if receiver.task is None or receiver.task.done():
            receiver.task = asyncio.create_task(self._serve(receiver), name="alert-receiver")

    # -- one receiver ---------------------------------------------------------------------

    async def _serve(self, receiver: _Receiver) -> None:
        cfg = self._cfg
        try:
            while receiver.queue and not self._stopping.is_set():
                job = receiver.queue[0]
                expires_in = cfg.max_age - (time.time() * 1000 - job.fired_ms) / 1000
                if expires_in <= 0:
                    receiver.queue.popleft()
                    self._failed(job, receiver.url, "expired", f"not delivered within {cfg.max_age:g} s")
                    await self._finish(job.entry_id)
                    continue
                wait = receiver.retry_at - time.monotonic()
                if wait > 0:
                    await pause(self._stopping, min(wait, expires_in))
                    continue
                now = int(time.time())
                body = self._body(job, now)
                headers = {
                    "content-type": "application/json",
                    "x-gateway-alert-id": job.entry_id,
                    "x-gateway-timestamp": str(now),
                }
                if job.key:
                    headers["x-gateway-signature"] = sign(job.key, body)
                try:
                    sender = self._public if receiver.public_only else self._webhooks
                    outcome = await sender.post(receiver.url, body, headers)
                except Exception as exc:  # a bug here must not stall this receiver for good
                    outcome = Outcome(False, "connection", f"failed: {type(exc).__name__}")
                job.attempts += 1
                if outcome.ok:
                    receiver.queue.popleft()
                    receiver.failures = 0
                    ALERT_DELIVERIES.labels("delivered", "delivered").inc()
                    await self._finish(job.entry_id)
                    continue
                if not outcome.permanent:  # this receiver is in trouble: it waits, no one else
                    receiver.failures += 1
                    base = max(cfg.backoff.base, 0.01)
                    delay = min(base * 2 ** min(receiver.failures - 1, 30), max(cfg.backoff.max, base))
                    receiver.retry_at = time.monotonic() + delay
                if outcome.permanent or job.attempts >= cfg.max_attempts:
                    receiver.queue.popleft()
                    self._failed(job, receiver.url, outcome.reason, outcome.detail)
                    await self._finish(job.entry_id)
                else:
                    log.warning(
                        "alert webhook attempt failed; will retry",
                        extra={"fields": self._fields(job, receiver.url, outcome.reason, outcome.detail)},
                    )
        finally:
            if not receiver.queue and self._receivers.get((receiver.url, receiver.public_only)) is receiver:
                del self._receivers[receiver.url, receiver.public_only]

    def _body(self, job: _Job, now: int) -> bytes:
        if job.event is not None:
            return orjson.dumps({**job.event, "id": job.entry_id, "fired_at": job.fired_ms // 1000, "timestamp": now})
        body = {
            "type": "budget.threshold_reached",
            "id": job.entry_id,
            "budget_id": job.budget_id,
            "threshold": job.threshold,
            "spent_usd": round(job.spent_nano / NANO, 9),
            "fired_at": job.fired_ms // 1000,
            "timestamp": now,
        }
        budget = self._budgets.by_id.get(job.budget_id)
        if budget is not None:
            body.update(
                scope=budget.scope,
                scope_value=budget.scope_value,
                period=budget.period,
                limit_usd=budget.limit_usd,
                period_id=budget.window()[0],
            )
            tenant = getattr(budget, "tenant", None)
            if tenant is not None:
                body["tenant"] = tenant
        return orjson.dumps(body)

    @staticmethod
    def _fields(job: _Job, url: str, reason: str, detail: str) -> dict:
        return {
            "alert_id": job.entry_id,
            "budget_id": job.budget_id,
            "threshold": job.threshold,
            "receiver_host": receiver_host(url),
            "attempts": job.attempts,
            "reason": reason,
            "detail": detail,
        }

    def _failed(self, job: _Job, url: str, reason: str, detail: str) -> None:
        ALERT_DELIVERIES.labels("failed", reason).inc()
        log.error("alert webhook failed; alert dropped", extra={"fields": self._fields(job, url, reason, detail)})

    async def _finish(self, entry_id: str) -> None:
        """Acknowledges an alert that needs no more attempts (delivered or failed)."""
        self._held.discard(entry_id)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xack(ALERT_STREAM, GROUP, entry_id)
                pipe.xdel(ALERT_STREAM, entry_id)
                await pipe.execute()
        except Exception as exc:  # stays pending: claimed and sent again later (at least once)
            log.warning("alert sender: cannot acknowledge %s: %s", entry_id, exc)
