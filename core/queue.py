"""A durable job queue on Redis streams: at-least-once, retries with backoff, dead letters, and
optional per-key ordering (one message of a key at a time, in arrival order).

Keys (one hash tag, so every script's keys share a cluster slot), for a queue ``P = gw:{gw}:q:<name>``:

- ``P``          the stream a consumer group reads. Unordered: an entry carries the message
                 (field ``m``). Ordered: an entry is a *token* for a key (field ``k``).
- ``P:k:<hash>`` ordered only: the key's messages in arrival order (a list). A key has exactly one
                 token (in the stream, pending on a consumer, or delayed) while its list is not
                 empty, and none while it is: the scripts below keep that invariant atomically.
                 Whoever holds the token processes the list's head, and only the head; it is
                 popped after the handler succeeds, and a fresh token is appended to the stream's
                 tail for the next message (so a busy key does not starve the others).
- ``P:delayed``  a sorted set of what waits for a retry, scored by its due time: messages
                 (unordered) or ``k:<hash>`` tokens (ordered: the head waits, and with it its key).
                 Due members are moved back to the stream by one script. A sorted set rather than
                 re-enqueuing with a not-before time: a not-yet-due entry would be read, found
                 early, and put back over and over; here nothing is read before it is due.
- ``P:dead``     the dead-letter stream (the message, its last error, the time).
- ``P:dead:tags`` a queue given ``dead_tag``: each dead letter's tag alone, under its id (and
                 ``P:dead:tags0``, those of the dead letters there before), by which
                 ``drop_dead_tagged`` drops a conversation's letters (``core.dead_tags``).
- ``P:live``     every accepted, unfinished message id scored by its enqueue time: depth and the
                 age of the oldest message without scanning anything.
- ``P:d:<hash>`` a dedupe key (SET NX with a TTL) holding the id of the message it let in.
- ``P:n``        counters (retries, dead letters).
- ``P:consumers`` the running consumers, each scored by the Redis time (ms) its liveness ends.

Delivery: a message is acknowledged (and deleted) only after its handler returns. While a
handler runs, its worker renews its claim on the entry (XCLAIM … JUSTID, so the entry stays
idle-young); a worker that dies stops renewing, and after ``visibility_timeout`` a live worker
claims the entry (XAUTOCLAIM) and counts it as a failed attempt (retried after backoff, or dead
when out of retries, so a message that kills its worker ends dead instead of looping). A worker
that dies is noticed sooner: every running consumer renews its liveness (``P:consumers``, on
Redis's clock) every ``liveness_ttl / 4`` seconds, and a live worker claims at once every entry of
a consumer whose liveness has run out (a killed process's work waits ``liveness_ttl``, not the
visibility timeout). A consumer that never announced itself (an older release) is only claimed
after the visibility timeout. A live consumer whose liveness ran out anyway (its event loop or
its Redis stalled past ``liveness_ttl``) finds out at its next renewal and cancels the handlers
of the entries it lost. Every
finishing step checks, inside its script, that this worker still owns the entry: a worker that
lost it (it stalled past the timeout) changes nothing. With ``ordered=True`` that makes a key's
order hold across worker deaths: the head is only popped by the token's owner, and a claimed
token retries the same head before anything behind it.

Bursts (ordered): a handler may read the messages waiting behind its head (``following``) and
answer them together; it returns how many it took, and they are finished with the head.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import re
import secrets
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from prometheus_client import Counter, Gauge
from redis.exceptions import NoScriptError, ResponseError

from core import queue_scripts as scripts
from core.background import pause, stop_tasks
from core.dead_tags import drop_tagged, forget, tag_older, tag_streams
from core.errors import ServiceUnavailable
from core.metrics import _Children
from core.stream_writer import entry_id as is_entry_id

log = logging.getLogger("gateway.queue")

MAX_PAYLOAD_BYTES = 256 * 1024
MAX_KEY_CHARS = 256
MAX_ERROR_CHARS = 2000
MAX_RETRY_AFTER_S = 86_400.0
MAX_DEFERRALS = 1000  # Retry(...) answers for one message before it counts as failing
MOVE_BATCH = 500
CLAIM_BATCH = 100
_NAME = re.compile(r"^[a-z0-9_.\-]{1,64}$")

JOBS = Counter(
    "gateway_queue_jobs_total",
    "Queue messages by outcome: done, retried, deferred, claimed (from a dead worker), dead",
    ["queue", "outcome"],
)
MESSAGES = Gauge(
    "gateway_queue_messages",
    "Queue messages by state: depth (waiting), pending (in flight), delayed, dead_letters",
    ["queue", "state"],
    multiprocess_mode="max",
)
OLDEST = Gauge(
    "gateway_queue_oldest_age_seconds", "Age of the oldest unfinished message", ["queue"], multiprocess_mode="max"
)
_jobs, _messages, _oldest = _Children(JOBS), _Children(MESSAGES), _Children(OLDEST)


class Retry(Exception):
    """Raised by a handler to be called again after ``after_s`` seconds; not a failure."""

    def __init__(self, after_s: float = 0.0) -> None:
        super().__init__(f"retry after {after_s} s")
        self.after_s = after_s


class Fatal(Exception):
    """Raised by a handler for a message no retry can help: it goes to the dead letters at once."""


class QueueFull(ServiceUnavailable):
    """The queue holds ``max_depth`` unfinished messages already. To a client (an upload whose
    job could not be queued) it is a 503 ``queue_full`` to retry, never a 500; ``str()`` keeps
    the detail (queue and depth) for the log."""

    def __init__(self, detail: str) -> None:
        super().__init__(
            "The gateway's work queue is full; try again shortly.", code="queue_full", headers={"retry-after": "5"}
        )
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


class KeyBacklogFull(QueueFull):
    """An ordered queue's key holds ``max_per_key`` unfinished messages already."""


class PayloadTooLarge(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    payload: dict
    key: str | None
    attempt: int  # 1 on the first delivery; failures (not Retry) add one
    enqueued_at: float  # unix seconds, the enqueuing process's clock
    redis_us: int | None = None  # Redis's clock at the first enqueue (µs); None: an older release's job

    @property
    def queued_us(self) -> int:
        """When the job was first queued, in µs on Redis's clock (one clock for every process;
        kept across retries and dead-letter retries); an older release's job: ``enqueued_at``."""
        return self.redis_us if self.redis_us is not None else round(self.enqueued_at * 1_000_000)


def _job(msg: dict) -> Job:
    rus = msg.get("redis_us")
    return Job(
        msg["id"],
        msg["payload"],
        msg.get("key"),
        int(msg["attempt"]),
        float(msg["enqueued_at"]),
        int(rus) if isinstance(rus, int) else None,
    )


# -- scripts ---------------------------------------------------------------------------------


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _pack(payload: dict, key: str | None, dedupe: str | None) -> tuple[str, float, bytes]:
    """A new message's id, enqueue time and stored form, after checking what the caller gave."""
    if not isinstance(payload, dict):
        raise TypeError("payload must be a dict")
    for label, value in (("key", key), ("dedupe", dedupe)):
        if value is not None and not (isinstance(value, str) and 0 < len(value) <= MAX_KEY_CHARS):
            raise ValueError(f"{label} must be a string of 1-{MAX_KEY_CHARS} characters")
    job_id = uuid.uuid4().hex
    now = time.time()
    packed = orjson.dumps({"id": job_id, "payload": payload, "key": key, "attempt": 1, "enqueued_at": now})
    if len(packed) > MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(f"payload is over {MAX_PAYLOAD_BYTES} bytes")
    return job_id, now, packed


def _fields(raw) -> dict:
    """A stream entry's fields as a script returns them (a flat list) or redis-py does (a dict)."""
    if isinstance(raw, dict):
        return raw
    return {raw[i]: raw[i + 1] for i in range(0, len(raw) - 1, 2)}


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


class Queue:
    def __init__(
        self,
        redis,
        name: str,
        *,
        group: str = "workers",
        consumer: str | None = None,
        max_retries: int = 5,
        backoff_base: float = 1.0,
        backoff_max: float = 300.0,
        visibility_timeout: float = 60.0,
        liveness_ttl: float = 10.0,
        ordered: bool = False,
        dedupe_ttl: float = 86_400.0,
        max_depth: int = 1_000_000,
        max_dead: int = 100_000,
        poll: float = 0.5,
        stop_timeout: float = 30.0,
        on_dead: Callable[[Job, str], Awaitable[None]] | None = None,
        fast=None,
        dead_tag: Callable[[dict], str | None] | None = None,
    ) -> None:
        """``fast``: a core/fastredis.py client for the per-message steps (enqueue, the head's
        read, the finishing script): redis-py spends ~150 µs of Python per command, and a
        busy queue makes three per message. Everything else goes through ``redis``.
        ``liveness_ttl``: seconds after its last sign of life a consumer's entries are claimed
        (capped by ``visibility_timeout``, which still applies to consumers that never announce
        themselves). ``dead_tag(message)``: the tag a message's dead letter is found by
        (``drop_dead_tagged``; None: untagged), for a queue whose messages hold what must stay
        erasable (a customer's words)."""
        if not _NAME.match(name) or not _NAME.match(group):
            raise ValueError("queue and group names are 1-64 of [a-z0-9_.-]")
        if visibility_timeout <= 0 or max_retries < 0 or backoff_base < 0 or backoff_max < 0:
            raise ValueError("visibility_timeout > 0, max_retries >= 0, backoffs >= 0")
        self._redis = redis
        self._fast = fast
        self.name = name
        self.group = group
        self.consumer = (consumer or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}")[:200]
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.visibility_timeout = visibility_timeout
        self.liveness_ttl = min(max(0.2, float(liveness_ttl)), visibility_timeout)
        self.ordered = ordered
        self.dedupe_ttl = max(1, int(dedupe_ttl))
        self.max_depth = max_depth
        self.max_dead = max_dead
        self.poll = min(poll, visibility_timeout / 3)
        self.stop_timeout = stop_timeout
        self.on_dead = on_dead  # called after a message went to the dead letters (not on drop)
        self.dead_tag = dead_tag
        p = f"gw:{{gw}}:q:{name}"
        self.stream, self.dead, self.delayed, self.live, self.counters = (
            p,
            f"{p}:dead",
            f"{p}:delayed",
            f"{p}:live",
            f"{p}:n",
        )
        self._prefix = p
        self.dead_tags = tag_streams(self.dead)[0]
        self._enqueue = redis.register_script(scripts.ENQUEUE)
        self._finish = redis.register_script(scripts.FINISH)
        self._move_due = redis.register_script(scripts.MOVE_DUE)
        self._renew = redis.register_script(scripts.RENEW)
        self._revive = redis.register_script(scripts.REVIVE)
        self._beat_script = redis.register_script(scripts.BEAT)
        self._reap = redis.register_script(scripts.REAP)
        self._group_ready = False
        self._inflight: dict[str, asyncio.Task] = {}
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._stopped.set()
        self._next: dict[str, float] = {}

    # -- producing --------------------------------------------------------------------------

    def _list_key(self, keyhash: str) -> str:
        return f"{self._prefix}:k:{keyhash}"

    async def enqueue(
        self, payload: dict, *, key: str | None = None, dedupe: str | None = None, max_per_key: int = 0
    ) -> str:
        """Appends a message; returns its id. With ``dedupe``, a second enqueue with the same value
        within ``dedupe_ttl`` adds nothing and returns the first message's id. ``max_per_key``
        (ordered queues): ``KeyBacklogFull`` when ``key`` holds that many unfinished messages."""
        job_id, now, packed = _pack(payload, key, dedupe)
        keyhash = _digest(key if key is not None else job_id)
        status, found = await self._enqueue_entry(job_id, packed, now, dedupe, keyhash, max_per_key, payload)
        if int(status) == -2:
            raise KeyBacklogFull(f"a key of queue {self.name} holds {max_per_key} messages")
        if int(status) < 0:
            raise QueueFull(f"queue {self.name} holds {self.max_depth} messages")
        return _s(found)

    async def _enqueue_entry(
        self,
        job_id: str,
        packed: bytes,
        now: float,
        dedupe: str | None,
        keyhash: str,
        max_per_key: int,
        payload: dict | None = None,
    ):
        """The enqueue script's call: (status, the id it holds) (a subclass queues its own way)."""
        return await self._script(
            self._enqueue,
            [
                self.stream,
                self.live,
                f"{self._prefix}:d:{_digest(dedupe or '')}",
                self._list_key(keyhash),
            ],
            [
                job_id,
                packed,
                int(now * 1000),
                self.dedupe_ttl if dedupe is not None else 0,
                "1" if self.ordered else "0",
                keyhash,
                self.max_depth,
                max(0, int(max_per_key)),
            ],
        )

    async def _script(self, script, keys: list, args: list):
        """A registered script, over the fast client when there is one."""
        if self._fast is None:
            return await script(keys=keys, args=args)
        try:
            return await self._fast.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self._fast.execute("EVAL", script.script, len(keys), *keys, *args)

    async def following(self, job: Job, limit: int = 20) -> list[Job]:
        """Ordered queues: up to ``limit`` messages of ``job``'s key waiting behind it, in order.
        A handler holding the head may take them into its own work (a burst answered at once) and
        return how many it took: they are then finished with the head."""
        if not self.ordered or job.key is None:
            return []
        limit = max(0, min(int(limit), 1000))
        if limit == 0:
            return []
        raw = await self._redis.lrange(self._list_key(_digest(job.key)), 0, limit)
        out = []
        for i, item in enumerate(raw):
            msg = orjson.loads(item)
            if i == 0:
                if msg["id"] != job.id:
                    return []  # this worker no longer holds the head
                continue
            out.append(_job(msg))
        return out

    # -- consuming --------------------------------------------------------------------------

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self._redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def run(self, handler: Callable[[Job], Awaitable[int | None]], *, concurrency: int = 8) -> None:
        """Consumes until ``stop()``: at most ``concurrency`` handlers at once."""
        if not self._stopped.is_set():
            raise RuntimeError("this Queue is running already")
        concurrency = max(1, min(int(concurrency), 1024))
        self._stopped.clear()
        self._stopping.clear()
        self._group_ready = False
        recover = True  # this consumer's own unheld entries: at start, and after every failed step
        loop = asyncio.get_running_loop()
        beat = asyncio.create_task(self._beat(), name=f"queue-{self.name}-beat")
        tasks = [beat]
        if self.dead_tag is not None:  # the dead letters of a release before the tags: once per queue
            tasks.append(asyncio.create_task(self._tag_older_dead(), name=f"queue-{self.name}-dead-tags"))
        try:
            while not self._stopping.is_set():
                try:
                    await self._ensure_group()
                    if recover:
                        await self._recover_own(handler, concurrency)
                        recover = False
                    await self._maintain(handler)
                    free = concurrency - len(self._inflight)
                    if free <= 0:
                        await asyncio.wait(
                            set(self._inflight.values()), timeout=self.poll, return_when=asyncio.FIRST_COMPLETED
                        )
                        continue
                    reply = await self._redis.xreadgroup(
                        self.group, self.consumer, {self.stream: ">"}, count=free, block=int(self.poll * 1000)
                    )
                    for _, entries in reply or ():
                        for entry_id, fields in entries:
                            if fields:
                                self._spawn(handler, _s(entry_id), fields)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._group_ready = False
                    recover = True
                    log.warning("queue %s: %s; retrying", self.name, exc)
                    await pause(self._stopping, 1.0)
            # Graceful stop: in-flight handlers get up to stop_timeout, their claims kept fresh.
            deadline = loop.time() + self.stop_timeout
            while self._inflight and (left := deadline - loop.time()) > 0:
                await asyncio.wait(set(self._inflight.values()), timeout=min(left, self.visibility_timeout / 3))
                with contextlib.suppress(Exception):
                    await self._renew_claims()
            await stop_tasks(list(self._inflight.values()), grace=3.0)
        finally:
            await stop_tasks(tasks, grace=2.0)
            with contextlib.suppress(Exception):  # departed: what is still pending is claimed at once
                await asyncio.wait_for(self._redis.zadd(self.consumers, {self.consumer: 0}), 2.0)
            self._stopped.set()

    @property
    def consumers(self) -> str:
        """The running consumers of this queue's stream, scored by the end of their liveness."""
        return f"{self.stream}:consumers"

    async def _beat(self) -> None:
        """Renews this consumer's liveness every ``liveness_ttl / 4`` seconds, on its own task so
        a busy loop of reads and handlers does not delay it. When the liveness had run out (the
        process stalled), entries may have been claimed by others: renewing the claims at once
        cancels the handlers of any that were."""
        while True:
            try:
                alive = await self._beat_script(
                    keys=[self.consumers], args=[self.consumer, int(self.liveness_ttl * 1000)]
                )
                if not int(alive) and self._inflight:
                    await self._renew_claims()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("queue %s: liveness not renewed: %s", self.name, exc)
            await asyncio.sleep(self.liveness_ttl / 4)

    async def _recover_own(self, handler, concurrency: int) -> None:
        """Entries delivered to this consumer that no handler of it holds: a read whose answer was
        lost (the connection timed out or broke after the server had sent it — a process paused
        past the socket timeout) leaves its entries pending on this consumer with no handler.
        They are handled now rather than claimed as failures after the visibility timeout."""
        start = "0"
        for _ in range(100):  # bounded sweep of this consumer's own pending entries
            if len(self._inflight) >= concurrency:
                return  # the rest waits for the stale-entry claim, as before
            reply = await self._redis.xreadgroup(self.group, self.consumer, {self.stream: start}, count=CLAIM_BATCH)
            entries = [e for _, batch in reply or () for e in batch]
            if not entries:
                return
            for entry_id, fields in entries:
                entry_id = _s(entry_id)
                if fields and entry_id not in self._inflight and len(self._inflight) < concurrency:
                    log.warning("queue %s: entry %s was delivered but not handled; handling it", self.name, entry_id)
                    self._spawn(handler, entry_id, fields)
            start = _s(entries[-1][0])

    async def stop(self, grace: float | None = None) -> None:
        """Stops reading, lets in-flight handlers finish within ``grace`` seconds (``stop_timeout``
        by default), then cancels the rest: their messages go back to the queue unchanged."""
        if grace is not None:
            self.stop_timeout = grace
        self._stopping.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), self.stop_timeout + self.poll + 10)

    def _spawn(self, handler, entry_id: str, fields: dict) -> None:
        task = asyncio.create_task(self._handle(handler, entry_id, fields), name=f"queue-{self.name}-{entry_id}")
        self._inflight[entry_id] = task
        task.add_done_callback(lambda _t: self._inflight.pop(entry_id, None))

    async def _message(self, fields: dict, entry_id: str) -> tuple[dict | None, str]:
        """The message an entry stands for, and its key's hash."""
        if self.ordered:
            keyhash = _s(fields.get(b"k") or fields.get("k") or "")
            key = self._list_key(keyhash)
            head = await (self._fast.execute("LINDEX", key, 0) if self._fast else self._redis.lindex(key, 0))
            return (orjson.loads(head) if head else None), keyhash
        raw = fields.get(b"m") or fields.get("m")
        msg = orjson.loads(raw) if raw else None
        return msg, _digest(msg["key"] if msg and msg.get("key") is not None else (msg or {}).get("id", ""))

    async def _handle(self, handler, entry_id: str, fields: dict) -> None:
        try:
            msg, keyhash = await self._message(fields, entry_id)
        except Exception as exc:
            log.warning("queue %s: cannot read entry %s: %s", self.name, entry_id, exc)
            return  # stays pending; claimed and retried later
        if msg is None:  # nothing behind the entry (cannot happen while the invariants hold)
            await self._redis.xack(self.stream, self.group, entry_id)
            await self._redis.xdel(self.stream, entry_id)
            return
        job = _job(msg)
        try:
            absorbed = await handler(job)
        except asyncio.CancelledError:
            if self._stopping.is_set():  # stopping: hand the message back as it was
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._settle(entry_id, msg, keyhash, "retry", due=time.time()), 2.0)
            raise
        except Retry as r:
            deferred = int(msg.get("deferred", 0)) + 1
            if deferred > MAX_DEFERRALS:
                await self._fail(entry_id, msg, keyhash, f"deferred more than {MAX_DEFERRALS} times")
                return
            after = min(max(float(r.after_s), 0.0), MAX_RETRY_AFTER_S)
            await self._settle(entry_id, {**msg, "deferred": deferred}, keyhash, "retry", due=time.time() + after)
            _jobs.get(self.name, "deferred").inc()
        except Fatal as exc:
            if await self._settle(entry_id, {**msg, "error": _error_text(exc)}, keyhash, "dead"):
                await self._dead(msg, _error_text(exc))
            _jobs.get(self.name, "dead").inc()
        except Exception as exc:
            await self._fail(entry_id, msg, keyhash, _error_text(exc))
        else:
            n = absorbed if self.ordered and isinstance(absorbed, int) and absorbed > 0 else 0
            if await self._settle(entry_id, msg, keyhash, "done", absorbed=n):
                _jobs.get(self.name, "done").inc(1 + n)

    def backoff(self, attempt: int) -> float:
        """Seconds before retrying after failed attempt ``attempt``: exponential, capped, with
        jitter (half fixed, half random) so a burst of failures does not come back at once."""
        delay = min(self.backoff_max, self.backoff_base * 2 ** min(attempt - 1, 60))
        return delay / 2 + random.random() * delay / 2

    async def _fail(self, entry_id: str, msg: dict, keyhash: str, error: str) -> None:
        attempt = int(msg["attempt"])
        if attempt > self.max_retries:
            if await self._settle(entry_id, {**msg, "error": error}, keyhash, "dead"):
                await self._dead(msg, error)
            _jobs.get(self.name, "dead").inc()
            log.warning("queue %s: message %s dead after %d attempts: %s", self.name, msg["id"], attempt, error)
            return
        nxt = {**msg, "attempt": attempt + 1, "error": error}
        await self._settle(entry_id, nxt, keyhash, "retry", due=time.time() + self.backoff(attempt), count=True)
        _jobs.get(self.name, "retried").inc()

    async def _dead(self, msg: dict, error: str) -> None:
        """Tells ``on_dead`` (best effort) that a message has just gone to the dead letters."""
        if self.on_dead is None:
            return
        job = _job(msg)
        try:
            await self.on_dead(job, error)
        except Exception as exc:
            log.warning("queue %s: on_dead for %s failed: %s", self.name, msg["id"], type(exc).__name__)

    async def _settle(
        self,
        entry_id: str,
        msg: dict,
        keyhash: str,
        mode: str,
        *,
        due: float = 0.0,
        count: bool = False,
        absorbed: int = 0,
    ) -> bool:
        """Acknowledges the entry and files the message (done, delayed, dead), if this worker still
        owns the entry; False when it does not (it was claimed by another worker meanwhile)."""
        try:
            done = await self._finish_entry(entry_id, msg, keyhash, mode, due, count, absorbed)
        except Exception as exc:  # left pending: claimed and retried after the visibility timeout
            log.warning("queue %s: could not settle %s (%s): %s", self.name, msg["id"], mode, exc)
            return False
        if not done:
            log.warning("queue %s: message %s was claimed by another worker; result dropped", self.name, msg["id"])
        return bool(done)

    async def _finish_entry(
        self, entry_id: str, msg: dict, keyhash: str, mode: str, due: float, count: bool, absorbed: int
    ):
        """The finishing script's call (``_settle``'s; a subclass files messages its own way)."""
        return await self._script(
            self._finish,
            [self.stream, self.live, self.delayed, self.dead, self.counters, self._list_key(keyhash), self.dead_tags],
            [
                self.group,
                self.consumer,
                entry_id,
                mode,
                msg["id"],
                orjson.dumps(msg),
                int(due * 1000),
                "1" if self.ordered else "0",
                keyhash,
                f"{time.time():.3f}",
                self.max_dead,
                "1" if count else "0",
                absorbed,
                "1" if self.dead_tag is not None else "0",
                self._tag(msg) if mode == "dead" else "",
            ],
        )

    def _tag(self, msg: dict) -> str:
        """A message's dead-letter tag ('' none; a tag that fails is none, never a lost letter)."""
        if self.dead_tag is None:
            return ""
        try:
            return self.dead_tag(msg) or ""
        except Exception as exc:
            log.warning("queue %s: dead letter of %s not tagged: %s", self.name, msg.get("id"), type(exc).__name__)
            return ""

    # -- upkeep -----------------------------------------------------------------------------

    def _due(self, what: str, every: float) -> bool:
        now = time.monotonic()
        if now < self._next.get(what, 0.0):
            return False
        self._next[what] = now + every
        return True

    async def _maintain(self, handler) -> None:
        if self._due("move", self.poll):
            await self.move_due()
        if self._inflight and self._due("renew", self.visibility_timeout / 3):
            await self._renew_claims()
        if self._due("reap", self.liveness_ttl / 2):
            await self._reap_departed()
        if self._due("claim", self.visibility_timeout / 2):
            await self._claim_stale()
        if self._due("stats", 15.0):
            await self.stats()
        if self._due("consumers", 300.0):
            await self._forget_departed()

    async def move_due(self) -> int:
        """Moves messages whose retry time has come back to the stream."""
        moved = 0
        while True:
            n = int(await self._move_due(keys=[self.delayed, self.stream], args=[int(time.time() * 1000), MOVE_BATCH]))
            moved += n
            if n < MOVE_BATCH:
                return moved

    async def _renew_claims(self) -> None:
        ids = list(self._inflight)
        if not ids:
            return
        lost = await self._renew(keys=[self.stream], args=[self.group, self.consumer, *ids])
        for entry_id in map(_s, lost or ()):
            task = self._inflight.get(entry_id)
            if task is not None:
                log.warning(
                    "queue %s: entry %s was claimed by another worker; its handler is cancelled", self.name, entry_id
                )
                task.cancel()

    async def _claim_stale(self) -> None:
        """Entries a worker read and stopped renewing (it died) count as a failed attempt."""
        start = "0-0"
        for _ in range(100):  # bounded sweep
            result = await self._redis.xautoclaim(
                self.stream,
                self.group,
                self.consumer,
                int(self.visibility_timeout * 1000),
                start_id=start,
                count=CLAIM_BATCH,
            )
            start, claimed = _s(result[0]), result[1]
            for entry_id, fields in claimed:
                await self._claimed(_s(entry_id), fields, "worker stopped responding (visibility timeout)")
            if start == "0-0":
                return

    async def _reap_departed(self) -> None:
        """Entries of consumers whose liveness ran out (killed, or stopped) are claimed at once."""
        for _ in range(100):  # bounded sweep
            claimed = await self._reap(
                keys=[self.stream, self.consumers], args=[self.group, self.consumer, CLAIM_BATCH]
            )
            for entry_id, fields in claimed or ():
                await self._claimed(_s(entry_id), _fields(fields), "worker stopped (its liveness ran out)")
            if len(claimed or ()) < CLAIM_BATCH:
                return

    async def _claimed(self, entry_id: str, fields: dict, why: str) -> None:
        """An entry claimed from a worker that stopped: its message counts as a failed attempt."""
        if not fields or entry_id in self._inflight:
            return
        msg, keyhash = await self._message(fields, entry_id)
        if msg is None:
            await self._redis.xack(self.stream, self.group, entry_id)
            await self._redis.xdel(self.stream, entry_id)
            return
        _jobs.get(self.name, "claimed").inc()
        log.warning("queue %s: message %s claimed from a worker that stopped", self.name, msg["id"])
        await self._fail(entry_id, msg, keyhash, why)

    async def _forget_departed(self) -> None:
        """Every worker start adds a consumer name to the group; names with nothing pending and
        idle for long are removed, so the group's list does not grow forever."""
        idle_ms = int(max(3600.0, 10 * self.visibility_timeout) * 1000)
        for c in (await self._redis.xinfo_consumers(self.stream, self.group))[:1000]:
            name = _s(c.get("name") or c.get(b"name"))
            if name != self.consumer and int(c.get("pending", 1)) == 0 and int(c.get("idle", 0)) > idle_ms:
                await self._redis.xgroup_delconsumer(self.stream, self.group, name)

    # -- administration ---------------------------------------------------------------------

    async def dead_letters(self, limit: int = 100) -> list[dict]:
        """The oldest dead letters first: id (of the dead letter), job_id, payload, key, attempt,
        error, enqueued_at, failed_at."""
        limit = max(1, min(int(limit), 1000))
        return [_dead_letter(entry_id, fields) for entry_id, fields in await self._redis.xrange(self.dead, count=limit)]

    async def dead_letter(self, id: str) -> dict | None:
        """One dead letter (as ``dead_letters`` gives them), or None."""
        found = await self._dead_entry(id)
        return _dead_letter(*found) if found else None

    async def _dead_entry(self, id: str) -> tuple | None:
        """(entry id, fields) of a dead letter; None for no such letter, or no entry id."""
        if not isinstance(id, str) or not is_entry_id(id):
            return None
        found = await self._redis.xrange(self.dead, min=id, max=id, count=1)
        return found[0] if found else None

    async def _revivable(self, id: str) -> dict | None:
        """A dead letter's message made ready to run again (its error gone, a fresh attempt
        count); None for no such letter."""
        found = await self._dead_entry(id)
        if found is None:
            return None
        msg = orjson.loads(found[1].get(b"m") or found[1].get("m"))
        msg.pop("error", None)
        msg.pop("deferred", None)
        msg["attempt"] = 1
        return msg

    async def retry_dead(self, id: str) -> bool:
        """Puts a dead letter back on the queue (at the end of its key's order) with a fresh
        attempt count; False if there is no such dead letter."""
        msg = await self._revivable(id)
        if msg is None:
            return False
        keyhash = _digest(msg["key"] if msg.get("key") is not None else msg["id"])
        done = await self._revive(
            keys=[self.dead, self.stream, self.live, self._list_key(keyhash)],
            args=[id, "1" if self.ordered else "0", keyhash, orjson.dumps(msg), msg["id"], int(time.time() * 1000)],
        )
        await forget(self._redis, self.dead, id)  # (back on the queue)
        return bool(done)

    async def drop_dead(self, id: str) -> bool:
        if not isinstance(id, str) or not is_entry_id(id):
            return False
        dropped = bool(await self._redis.xdel(self.dead, id))
        await forget(self._redis, self.dead, id)  # after: a tag without its letter is harmless, a letter
        return dropped  # without its tag (a crash between the two) would escape every erasure

    async def drop_dead_tagged(self, tags: set[str]) -> int:
        """Drops the dead letters tagged with one of ``tags`` (``dead_tag``); the number dropped.
        Reads the tags alone, a page a call (``core.dead_tags.drop_tagged``): never one script over
        every dead letter, whatever their number and sizes."""
        return await drop_tagged(self._redis, self.dead, tags)

    async def _tag_older_dead(self) -> None:
        """The dead letters written before this queue tagged them (an older release's) get their
        tags, read from their messages (``core.dead_tags.tag_older``): once per queue."""
        if self.dead_tag is not None:
            await tag_older(
                self._redis, self.dead, self.consumer, self._older_tag, self._stopping, MAX_PAYLOAD_BYTES * 2
            )

    def _older_tag(self, fields: dict) -> str:
        raw = fields.get(b"m") or fields.get("m")
        return self._tag(orjson.loads(raw)) if raw else ""

    async def stats(self) -> dict:
        await self._ensure_group()
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self.live)
            pipe.xpending(self.stream, self.group)
            pipe.zcard(self.delayed)
            pipe.xlen(self.dead)
            pipe.hget(self.counters, "retries")
            pipe.zrange(self.live, 0, 0, withscores=True)
            live, pending, delayed, dead, retries, oldest = await pipe.execute()
        pending = int(pending["pending"] if isinstance(pending, dict) else pending[0])
        age = max(0.0, time.time() - oldest[0][1] / 1000) if oldest else 0.0
        out = {
            "depth": max(0, int(live) - pending - int(delayed)),
            "pending": pending,
            "oldest_age_s": round(age, 3),
            "retries": int(retries or 0),
            "dead_letters": int(dead),
            "delayed": int(delayed),
        }
        for state in ("depth", "pending", "delayed", "dead_letters"):
            _messages.get(self.name, state).set(out[state])
        _oldest.get(self.name).set(out["oldest_age_s"])
        return out


def _dead_letter(entry_id, fields: dict) -> dict:
    msg = orjson.loads(fields.get(b"m") or fields.get("m"))
    return {
        "id": _s(entry_id),
        "job_id": msg["id"],
        "payload": msg["payload"],
        "key": msg.get("key"),
        "attempt": msg["attempt"],
        "error": msg.get("error"),
        "enqueued_at": msg["enqueued_at"],
        "failed_at": float(_s(fields.get(b"failed_at") or fields.get("failed_at") or 0)),
    }
