"""Call records (table ``vapi_calls``, migration 0010) and outbound calls through VAPI's API.

A call is (tenant, account, VAPI call id): the id is VAPI's, so never a key alone. Every query
names its tenant and runs in the composition's tenant transaction (row-level security as a
second wall). Status updates only move a call forward (queued → ringing → in-progress →
forwarding → ended) and stop once its end-of-call report is in; the first report sets
``reported_at`` and writes the call's ledger record in the same transaction, so a repeated
report finds ``reported_at`` set and changes nothing. The conversation of a call is its own
(``vapi:`` and VAPI's call id, new per call): an erasure of it recorded after the call began is of
that call. When the gateway records the call's start (the assistant-request, or the outbound call
placed) it keeps the latest erasure time of the conversation then (``erased_before``); an erasure
after it counts, compared with erasure times only (one clock: the erasures'; never the record's
``created_at``, PostgreSQL's). A call whose first record is not its start (a status update VAPI
sent late, whatever its status, or the report) tells nothing of when it began: every erasure of
its conversation counts. A call erased so keeps no words (transcript, summary, recording link), as
the erasure, and a record written after the erasure holds the erasure's tag as its caller's number;
the report (and a status update) and an erasure of the tenant's conversations never run at once
(its erasure lock, taken shared by the writer: ``core.erasure_key.LOCK_WRITE``).

The ledger record is VAPI's charge for the call (telephony, speech, VAPI's fee): endpoint
``vapi.call``, provider ``vapi``, attributed to the tenant, the agent and (when configured) the
caller's number as customer, with the call's conversation id. The model turns of the call have
their own records already (the gateway wrote them), linked by the same conversation id.
"""

from __future__ import annotations

import contextlib
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp
import orjson

from channels.vapi import wire
from channels.vapi.config import VAPI_ID
from core.erasure_key import (
    DEFAULT_LOCK_WAIT_S,
    LOCK_WRITE,
    TAG_PREFIX,
    ErasureInProgress,
    conversation_hash,
    lock_write,
)
from core.errors import UpstreamError

STATUSES = ("scheduled", "queued", "ringing", "in-progress", "forwarding", "ended")
MAX_TRANSCRIPT = 200_000  # characters kept of a call's transcript
MAX_SUMMARY = 10_000
MAX_URL = 2048
MAX_COST_USD = 100_000.0
MAX_DURATION_S = 7 * 86400.0

_COLUMNS = (
    "id, tenant, account, call_id, conversation_id, agent, direction, status, customer_number, phone_number, "
    "assistant_id, phone_number_id, ended_reason, duration_s, cost_usd, transcript, recording_url, summary, "
    "metadata, created_at, updated_at, ended_at, reported_at"
)


def _erased(tenant: str, hashed: str, before: str) -> str:
    """Whether the call's conversation was erased since ``before`` (``erased_before``: NULL, any
    erasure). Times are compared only with times of the same clock (the erasures')."""
    return (
        f"EXISTS (SELECT 1 FROM erased_conversations e WHERE e.tenant = {tenant} AND e.external_hash = {hashed}"
        f" AND ({before} IS NULL OR e.erased_at > {before}))"
    )


def _first(begins: str, hashed: str) -> str:
    """``erased_before`` of a record written first now: the latest erasure of the conversation when
    the record is the call's start (``begins``), else NULL. ($2: the tenant)"""
    latest = f"(SELECT max(e.erased_at) FROM erased_conversations e WHERE e.tenant = $2 AND e.external_hash = {hashed})"
    return f"CASE WHEN {begins} THEN coalesce({latest}, '-infinity'::timestamptz) END"


def _caller(number: str, erased: str, tag: str) -> str:
    """The caller's number a record holds: the erasure's tag when ``erased``."""
    return f"CASE WHEN {number}::text IS NOT NULL AND {erased} THEN {tag}::text ELSE {number}::text END"


# (a record written first by the call's start: the erasures until now are not of the call)
_ERASED_UNSTARTED = f"(NOT $17 AND {_erased('$2', '$15', 'NULL::timestamptz')})"

# Insert the call if new; otherwise fill what was unknown and move its status forward only.
# ($15 the conversation's keyed hash, $16 its tag, $17 whether this is the call's start: the
# assistant-request, or the outbound call placed; a status update is not, sent late or not)
_UPSERT = f"""
INSERT INTO vapi_calls (id, tenant, account, call_id, conversation_id, agent, direction, status, customer_number,
                        phone_number, assistant_id, phone_number_id, metadata, erased_before)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, {_caller("$9", _ERASED_UNSTARTED, "$16")},
        $10, $11, $12, $13::jsonb, {_first("$17", "$15")})
ON CONFLICT (tenant, account, call_id) DO UPDATE SET
    agent = COALESCE(vapi_calls.agent, EXCLUDED.agent),
    customer_number = COALESCE(
        vapi_calls.customer_number, {_caller("$9", _erased("$2", "$15", "vapi_calls.erased_before"), "$16")}),
    phone_number = COALESCE(vapi_calls.phone_number, EXCLUDED.phone_number),
    assistant_id = COALESCE(vapi_calls.assistant_id, EXCLUDED.assistant_id),
    phone_number_id = COALESCE(vapi_calls.phone_number_id, EXCLUDED.phone_number_id),
    status = CASE WHEN array_position($14::text[], EXCLUDED.status) > array_position($14::text[], vapi_calls.status)
                  THEN EXCLUDED.status ELSE vapi_calls.status END,
    updated_at = now()
WHERE vapi_calls.reported_at IS NULL
RETURNING {_COLUMNS}
"""

# The report takes its tenant's erasure lock shared first (``LOCK_WRITE``): an erasure of the
# call's conversation commits before it (the report reads it) or waits for its commit (the erasure
# then tags the record the report wrote, and its ledger record). Run at once, neither saw the other.
# A call whose conversation was erased since the call began keeps its report's duration and cost,
# not its words: the transcript holds what was said before the erasure too ($11: the conversation's
# keyed hash, as ``erased_conversations`` keeps it). A record whose first write was not the call's
# start (a status update or the report, maybe sent late: ``erased_before`` NULL) tells nothing of
# when the call began: any erasure of its conversation counts (a call's id is VAPI's, new per call).
_ERASED = _erased("$1", "$11", "vapi_calls.erased_before")
# ... and a record the report creates holds the erasure's tag as its caller's number ($13), as the
# erasure leaves a record it finds ($12: the conversation's keyed hash).
_INSERT_REPORTED = f"""
INSERT INTO vapi_calls (id, tenant, account, call_id, conversation_id, agent, direction, status, customer_number,
                        phone_number, assistant_id, phone_number_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, 'ended', {_caller("$8", _erased("$2", "$12", "NULL::timestamptz"), "$13")},
        $9, $10, $11)
ON CONFLICT (tenant, account, call_id) DO NOTHING
"""
_REPORT = f"""
UPDATE vapi_calls SET status = 'ended', ended_reason = $4, duration_s = $5, cost_usd = $6,
       transcript = CASE WHEN {_ERASED} THEN NULL ELSE $7 END,
       recording_url = CASE WHEN {_ERASED} THEN NULL ELSE $8 END,
       summary = CASE WHEN {_ERASED} THEN NULL ELSE $9 END,
       ended_at = COALESCE($10, now()), reported_at = now(), updated_at = now()
WHERE tenant = $1 AND account = $2 AND call_id = $3 AND reported_at IS NULL
RETURNING {_COLUMNS}
"""

# A spooled record's check, under the lock, before it is written: the call's conversation erased
# since the call began (its record's ``erased_before``; no record yet, or NULL: any erasure).
# ($1 tenant, $2 account, $3 call id, $4 the conversation's keyed hash)
_ERASED_MEANWHILE = "SELECT " + _erased(
    "$1", "$4", "(SELECT c.erased_before FROM vapi_calls c WHERE c.tenant = $1 AND c.account = $2 AND c.call_id = $3)"
)

# The report's call erased since it began ($3: its record's id): its ledger record holds the
# conversation's tag, as the erasure leaves the rows it finds (``runtime.erased_records``).
_ERASED_CALL = "SELECT " + _erased("$1", "$2", "(SELECT c.erased_before FROM vapi_calls c WHERE c.id = $3)")

_LEDGER = """
INSERT INTO ledger (request_id, step, ts, tenant, agent, customer, tags, endpoint, model, provider, status,
                    cost_usd, conversation_id)
VALUES ($1, 1, now(), $2, $3, $4, ARRAY['vapi'], 'vapi.call', 'vapi', 'vapi', 200, $5, $6)
ON CONFLICT DO NOTHING
"""


def new_id() -> str:
    return "vcall_" + secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class Report:
    """The parts of an end-of-call report kept, each checked and bounded."""

    ended_reason: str | None
    duration_s: float | None
    cost_usd: float | None
    transcript: str | None
    recording_url: str | None
    summary: str | None
    ended_at: datetime | None


def _finite(value: object, high: float) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) and 0 <= value <= high else None


def _time(value: object) -> datetime | None:
    if not isinstance(value, str) or len(value) > 40:
        return None
    try:
        out = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return out if out.tzinfo is not None else out.replace(tzinfo=UTC)


def _url(value: object) -> str | None:
    """A recording link is kept as text for people to open; the gateway never fetches it."""
    if isinstance(value, str) and value.startswith("https://") and len(value) <= MAX_URL and value.isprintable():
        return value
    return None


def _clean(value: object, limit: int) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    return value.replace("\x00", "\ufffd")[:limit]


def read_report(message: dict) -> Report:
    artifact = message.get("artifact") if isinstance(message.get("artifact"), dict) else {}
    analysis = message.get("analysis") if isinstance(message.get("analysis"), dict) else {}
    started, ended = _time(message.get("startedAt")), _time(message.get("endedAt"))
    duration = _finite(message.get("durationSeconds"), MAX_DURATION_S)
    if duration is None and started and ended and ended >= started:
        duration = _finite((ended - started).total_seconds(), MAX_DURATION_S)
    recording = artifact.get("recording") if isinstance(artifact.get("recording"), dict) else {}
    mono = recording.get("mono") if isinstance(recording.get("mono"), dict) else {}
    url = (
        _url(artifact.get("recordingUrl"))
        or _url(message.get("recordingUrl"))
        or _url(mono.get("combinedUrl"))
        or _url(recording.get("stereoUrl"))
    )
    return Report(
        ended_reason=_clean(message.get("endedReason"), 200),
        duration_s=duration,
        cost_usd=_finite(message.get("cost"), MAX_COST_USD),
        transcript=_clean(artifact.get("transcript") or message.get("transcript"), MAX_TRANSCRIPT),
        recording_url=url,
        summary=_clean(analysis.get("summary") or message.get("summary"), MAX_SUMMARY),
        ended_at=ended,
    )


def describe(row, transcript: bool = True) -> dict:
    out = {k: row[k] for k in row.keys() if k not in ("metadata",)}
    out["object"] = "vapi.call"
    if not transcript:  # listings stay small; the record itself has it
        text = out.pop("transcript", None)
        out["transcript_chars"] = len(text) if text else 0
    meta = row["metadata"]
    out["metadata"] = orjson.loads(meta) if isinstance(meta, str) else meta
    for k in ("created_at", "updated_at", "ended_at", "reported_at"):
        if out.get(k) is not None:
            out[k] = out[k].isoformat()
    return out


class Dropped(Exception):
    """A spooled record of a conversation erased meanwhile: not written (``CallStore``'s
    ``spooled=True``)."""


class CallStore:
    """``transaction(tenant)`` is the composition's tenant transaction (an async context manager
    giving a connection that sees only that tenant's rows; None: every tenant)."""

    def __init__(self, transaction: Callable, lock_wait_s: float = DEFAULT_LOCK_WAIT_S) -> None:
        self._tx = transaction
        # (a webhook waits this long at most for the tenant's erasure lock, then is answered 503:
        # VAPI sends it again; ``core.erasure_key.lock_write``)
        self._lock_wait_s = lock_wait_s

    async def upsert(
        self,
        tenant: str,
        account: str,
        info: wire.CallInfo,
        agent: str | None,
        status: str | None = None,
        *,
        begins: bool = False,
        spooled: bool = False,
        **extra,
    ) -> dict | None:
        """Records the call (new) or what is new about it; None when it has no valid call id or
        its report is in already, or when it is the call's start (an inbound call's
        assistant-request) during an erasure of its tenant (``ErasureInProgress``: VAPI is answered its assistant all
        the same, and the call's next status update records it, as a record that is not the call's
        start). ``begins``: this is the call's start (VAPI's assistant-request, or the outbound call
        just placed), so an erasure of its conversation recorded before it is not of this call; a
        status update is never one (VAPI may send it late)."""
        if info.call_id is None:
            return None
        status = status if status in STATUSES else "queued"
        metadata = extra.get("metadata") or {}
        hashed = conversation_hash(tenant, info.conversation_id or "")
        try:
            async with self._tx(tenant) as conn:
                # (the erasure's lock, as the report: a record created while the call's conversation is
                # erased is committed before the erasure tags it, or created after it). A webhook, and
                # the record of a call just placed, wait for it a bounded time, then are spooled
                # (``channels.vapi.spool``); the spool's writer waits on.
                await self._lock(conn, tenant, info, hashed, account, spooled)
                row = await conn.fetchrow(
                    _UPSERT,
                    new_id(),
                    tenant,
                    account,
                    info.call_id,
                    info.conversation_id,
                    agent,
                    extra.get("direction") or info.direction,
                    status,
                    info.customer_number,
                    info.called_number,
                    info.assistant_id,
                    info.phone_number_id,
                    orjson.dumps(metadata).decode(),
                    list(STATUSES),
                    hashed,
                    TAG_PREFIX + hashed,
                    begins,
                )
        except ErasureInProgress:
            if not begins or extra.get("direction") == "outbound":  # (a status update, even one saying
                raise  # ringing; the record of a call placed: spooled by the caller)
            return None
        return describe(row) if row is not None else None

    async def _lock(
        self, conn, tenant: str, info: wire.CallInfo, hashed: str, account: str, spooled: bool, drop: bool = True
    ) -> None:
        """The tenant's erasure lock, shared: a bounded wait (``ErasureInProgress``), or, for the
        spool's writer, an unbounded one followed by the erasures' check (``Dropped``; not when
        ``drop`` is false: the report, which keeps its cost of an erased call without its words)."""
        if not spooled:
            await lock_write(conn, tenant, self._lock_wait_s)
            return
        await conn.execute(LOCK_WRITE, tenant)
        if drop and await conn.fetchval(_ERASED_MEANWHILE, tenant, account, info.call_id, hashed):
            raise Dropped

    async def report(
        self,
        tenant: str,
        account: str,
        info: wire.CallInfo,
        agent: str | None,
        report: Report,
        customer: bool,
        *,
        spooled: bool = False,
    ) -> dict | None:
        """Stores the end-of-call report and its ledger record: the call record, or None when
        the call's report was in already (nothing changes). ``ErasureInProgress`` when the
        tenant's erasure lock was not granted in time (the caller spools it); ``spooled``: as
        ``upsert``."""
        if info.call_id is None:
            return None
        hashed = conversation_hash(tenant, info.conversation_id or "")
        async with self._tx(tenant) as conn:
            # (a spooled report of a call erased meanwhile is written all the same, as one sent after
            # the erasure: its duration and cost kept, in its record and the ledger, never its words
            # nor its caller's number; dropped, the ledger lost the call's cost and no budget counted it)
            await self._lock(conn, tenant, info, hashed, account, spooled, drop=False)
            await conn.execute(
                _INSERT_REPORTED,
                new_id(),
                tenant,
                account,
                info.call_id,
                info.conversation_id,
                agent,
                info.direction,
                info.customer_number,
                info.called_number,
                info.assistant_id,
                info.phone_number_id,
                hashed,
                TAG_PREFIX + hashed,
            )
            row = await conn.fetchrow(
                _REPORT,
                tenant,
                account,
                info.call_id,
                report.ended_reason,
                report.duration_s,
                report.cost_usd,
                report.transcript,
                report.recording_url,
                report.summary,
                report.ended_at,
                hashed,
            )
            if row is None:
                return None
            erased = await conn.fetchval(_ERASED_CALL, tenant, hashed, row["id"])
            await conn.execute(
                _LEDGER,
                row["id"],
                tenant,
                row["agent"],
                row["customer_number"] if customer else None,
                report.cost_usd or 0.0,
                TAG_PREFIX + hashed if erased else row["conversation_id"],
            )
        return describe(row, transcript=False)

    async def list(self, wall: str | None, view: str | None, limit: int = 100, account: str | None = None) -> list:
        async with self._tx(wall) as conn:
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM vapi_calls WHERE ($1::text IS NULL OR tenant = $1) "
                "AND ($2::text IS NULL OR account = $2) ORDER BY created_at DESC, id LIMIT $3",
                view,
                account,
                limit,
            )
        return [describe(r, transcript=False) for r in rows]

    async def get(self, wall: str | None, view: str | None, record_id: str) -> dict | None:
        """One call record by the gateway's own id (``vcall_...``), transcript included."""
        async with self._tx(wall) as conn:
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM vapi_calls WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)",
                record_id,
                view,
            )
        return describe(row) if row is not None else None

    async def callback_for(self, tenant: str, ref: str, digest: str = "") -> str | None:
        """The call id of the callback already placed for a delivery ``ref`` with these words
        (``digest``), if any."""
        async with self._tx(tenant) as conn:
            return await conn.fetchval(
                "SELECT call_id FROM vapi_calls WHERE tenant = $1 AND direction = 'outbound' "
                "AND metadata->>'reply_ref' = $2 AND coalesce(metadata->>'reply_digest', '') = $3 LIMIT 1",
                tenant,
                ref[:200],
                digest,
            )

    @contextlib.asynccontextmanager
    async def callback_lock(self, tenant: str, account: str, call_id: str):
        """Held while a callback for the customer of one ended call is checked and placed: a
        PostgreSQL advisory lock, so two replicas delivering at once place one callback between
        them (and never more than the per-call bound)."""
        async with self._tx(tenant) as conn:
            key = orjson.dumps(["vapi-callback", tenant, account, call_id]).decode()
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", key)
            yield

    async def callbacks_of(self, tenant: str, account: str, call_id: str) -> int:
        """How many callbacks were placed for the customer of one call."""
        async with self._tx(tenant) as conn:
            return await conn.fetchval(
                "SELECT count(*) FROM vapi_calls WHERE tenant = $1 AND account = $2 AND direction = 'outbound' "
                "AND metadata->>'reply_to' = $3",
                tenant,
                account,
                call_id,
            )

    async def by_conversation(self, tenant: str, conversation_id: str) -> dict | None:
        async with self._tx(tenant) as conn:
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM vapi_calls WHERE tenant = $1 AND conversation_id = $2 "
                "ORDER BY created_at DESC LIMIT 1",
                tenant,
                conversation_id,
            )
        return describe(row) if row is not None else None


class VapiApi:
    """VAPI's REST API, for outbound calls: ``POST {vapi_api_url}/call`` with the account's key.
    The URL is the operator's configuration only; nothing a caller sends picks where it goes."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def create_call(self, base_url: str, api_key: str, payload: dict, timeout_s: float = 15.0) -> dict:
        try:
            async with self._session.post(
                f"{base_url}/call",
                data=orjson.dumps(payload),
                headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=5),
                allow_redirects=False,
            ) as resp:
                raw = await resp.content.read(256 * 1024)
                status = resp.status
        except TimeoutError:
            raise UpstreamError("VAPI did not answer in time.", status=504, code="vapi_timeout") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"VAPI could not be reached: {type(exc).__name__}.", code="vapi_unreachable") from None
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        if status not in (200, 201) or not isinstance(data, dict):
            message = data.get("message") if isinstance(data, dict) else None
            detail = f": {str(message)[:200]}" if message else ""
            raise UpstreamError(
                f"VAPI refused the call (HTTP {status}){detail}.", upstream_status=status, code="vapi_error"
            )
        if not isinstance(data.get("id"), str) or not VAPI_ID.match(data["id"]):
            raise UpstreamError("VAPI answered without a valid call id.", code="vapi_error")
        return data
