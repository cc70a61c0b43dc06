"""Budget alerts: fired at most once per budget, threshold and period (the settle script's
SET NX decides, across every replica), then delivered as a signed webhook by whichever replica
reads them first, retried with backoff until the receiver answers 2xx.

The signature is ``x-gateway-signature: sha256=<hex>``, HMAC-SHA256 of the raw body keyed by
``alerts.secret``; ``x-gateway-timestamp`` is inside the signed body too, so receivers can
reject replays.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import socket
import time

import aiohttp
import orjson
from redis.exceptions import ResponseError

from gateway import metrics
from gateway.background import pause, stop_task
from gateway.config import Alerts
from policies.budgets import NANO, BudgetCache
from policies.engine import ALERT_STREAM

log = logging.getLogger("gateway.alerts")
GROUP = "alert-senders"


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def fired(alerts: list) -> None:
    """Log line and metric for alerts a settle just fired (exactly once across replicas)."""
    for i in range(0, len(alerts), 3):
        budget_id, threshold, spent = (v.decode() if isinstance(v, bytes) else str(v) for v in alerts[i : i + 3])
        metrics.budget_alerts.get(threshold).inc()
        log.warning(
            "budget alert",
            extra={"fields": {"budget_id": budget_id, "threshold": float(threshold), "spent_usd": int(spent) / NANO}},
        )


class AlertSender:
    def __init__(self, redis, budgets: BudgetCache, cfg: Alerts) -> None:
        self._redis = redis
        self._budgets = budgets
        self._cfg = cfg
        self._name = f"{socket.gethostname()}-{os.getpid()}"
        self._task: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        with contextlib.suppress(ResponseError):
            await self._redis.xgroup_create(ALERT_STREAM, GROUP, id="0", mkstream=True)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        self._task = asyncio.create_task(self._run(), name="alert-sender")

    async def stop(self) -> None:
        # Let the loop see the flag (its blocking read lasts at most a second) rather than
        # cancel it inside redis-py, whose clean-up after a cancelled blocking read can hang.
        self._stopping.set()
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=3)
        await stop_task(self._task)
        if self._session is not None:
            await self._session.close()

    def payload(self, fields: dict) -> tuple[str | None, bytes]:
        budget_id = fields[b"budget"].decode()
        budget = self._budgets.by_id.get(budget_id)
        spent = int(fields[b"spent"]) / NANO
        body = {
            "type": "budget.threshold_reached",
            "budget_id": budget_id,
            "threshold": float(fields[b"threshold"]),
            "spent_usd": round(spent, 9),
            "timestamp": int(time.time()),
        }
        url = self._cfg.webhook_url
        if budget is not None:
            body.update(
                scope=budget.scope,
                scope_value=budget.scope_value,
                period=budget.period,
                limit_usd=budget.limit_usd,
                period_id=budget.window()[0],
            )
            url = budget.webhook_url or url
        return url, orjson.dumps(body)

    async def deliver(self, fields: dict) -> bool:
        url, body = self.payload(fields)
        if not url:
            return True  # nowhere to send: the log line and metric are the alert
        headers = {"content-type": "application/json"}
        if self._cfg.secret:
            headers["x-gateway-signature"] = sign(self._cfg.secret, body)
        try:
            async with self._session.post(url, data=body, headers=headers) as resp:
                if 200 <= resp.status < 300:
                    return True
                log.warning("alert webhook answered %s", resp.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("alert webhook failed: %s", exc)
        return False

    async def _run(self) -> None:
        backoff = 0.5
        while not self._stopping.is_set():
            try:
                delivered_all = await self._round()
                backoff = 0.5 if delivered_all else min(backoff * 2, 60)
                if not delivered_all:
                    await pause(self._stopping, backoff)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("alert sender: %s", exc)
                await pause(self._stopping, 1)

    async def _round(self) -> bool:
        # Pending (failed before, or claimed from a dead replica) first, then new ones.
        claimed = await self._redis.xautoclaim(ALERT_STREAM, GROUP, self._name, 30_000, start_id="0-0", count=100)
        pending = await self._redis.xreadgroup(GROUP, self._name, {ALERT_STREAM: "0"}, count=100)
        entries = [(i, f) for i, f in (pending[0][1] if pending else []) if f]
        entries += [(i, f) for i, f in claimed[1] if f and all(i != e[0] for e in entries)]
        if not entries:
            fresh = await self._redis.xreadgroup(GROUP, self._name, {ALERT_STREAM: ">"}, count=100, block=1000)
            entries = [(i, f) for i, f in (fresh[0][1] if fresh else []) if f]
        ok = True
        for entry_id, fields in entries:
            if await self.deliver(fields):
                await self._redis.xack(ALERT_STREAM, GROUP, entry_id)
                await self._redis.xdel(ALERT_STREAM, entry_id)
            else:
                ok = False
        return ok
