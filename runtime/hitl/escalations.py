"""The escalation queue in PostgreSQL: open, join, list by priority, claim with a lease, reply,
resolve, reassign, release.

Every function takes a connection inside the caller's transaction (tenant-walled for tenant
admins) and a ``tenant`` that also filters in SQL (None: the super-admin, any tenant).

Priority is ``base_priority`` (urgency + customer tier, fixed when the escalation opens) plus
``aging`` points per minute of waiting, computed when read, so an old low-priority item rises
past newer ones instead of starving.

A claim is one conditional UPDATE: the row is claimable when queued, or claimed with an expired
lease (or already held by the same key: a renewal). Two people claiming at once both reach the
row; PostgreSQL's row lock makes the second re-check the condition after the first commits,
and it no longer holds: exactly one wins. ``claim_next`` takes the highest-priority claimable
item with ``FOR UPDATE SKIP LOCKED``, so concurrent claimers get different items. The holder is
the authenticated key's id, never a field of the request.
"""

from __future__ import annotations

import secrets
from typing import Any

import orjson

from core.erasure_key import LOCK_WRITE, lock_write
from core.errors import InvalidRequest, NotFound
from runtime.conversations import erased_since

URGENCY_POINTS = {"low": 0, "normal": 100, "high": 200, "urgent": 300}
OUTCOMES = ("resolved", "answered", "no_action", "duplicate", "spam", "transferred")
STATUSES = ("queued", "claimed", "resolved")
MAX_TEXT = 16_000


class Conflict(InvalidRequest):
    status = 409


def new_id() -> str:
    return "esc_" + secrets.token_hex(8)


def base_priority(urgency: str, tier: str | None, tiers: dict[str, int]) -> int:
    return URGENCY_POINTS.get(urgency, 100) + int(tiers.get(tier or "", 0))


def _priority(aging: float) -> str:
    # aging is a float the gateway configures, never client input
    return f"(base_priority + floor(extract(epoch FROM (now() - created_at)) / 60 * {float(aging)!r})::int)"


_CLAIMABLE = "(status = 'queued' OR (status = 'claimed' AND (lease_until < now() OR claimed_by = $3)))"


def out(row, aging: float | None = None) -> dict:
    """A row as the API shows it."""
    if row is None:
        return None
    d = dict(row)
    for k in ("reasons", "context", "delivery"):
        if isinstance(d.get(k), str):
            d[k] = orjson.loads(d[k])
    d["object"] = "escalation"
    return d


def _text(value) -> str | None:
    # PostgreSQL text cannot hold U+0000, which a customer (or a model) can put in any message
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else value


def _json(value) -> str:
    return orjson.dumps(value, default=str).replace(b"\\u0000", b"\\ufffd").decode()


async def open_escalation(conn, esc: dict) -> tuple[dict, bool]:
    """(escalation, created): a conversation has at most one open escalation; a second opening
    (another replica, the same moment) joins the first."""
    row = await conn.fetchrow(
        """INSERT INTO escalations (id, tenant, agent_id, agent, conversation_id, request_id, prompt_version,
                                    variant, urgency, tier, base_priority, team, skills, confidence, reasons,
                                    question, draft, context, sla_first_s, sla_resolve_s)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15::jsonb, $16, $17, $18::jsonb,
                   $19, $20)
           ON CONFLICT (tenant, agent_id, conversation_id) WHERE status <> 'resolved' DO NOTHING
           RETURNING *""",
        esc["id"],
        esc["tenant"],
        esc["agent_id"],
        esc["agent"],
        esc["conversation_id"],
        esc.get("request_id"),
        esc.get("prompt_version"),
        esc.get("variant"),
        esc["urgency"],
        _text(esc.get("tier")),
        esc["base_priority"],
        esc["team"],
        list(esc.get("skills") or ()),
        esc.get("confidence"),
        _json(esc.get("reasons") or []),
        _text((esc.get("question") or "")[:MAX_TEXT]),
        _text((esc.get("draft") or "")[:MAX_TEXT]) or None,
        _json(esc.get("context") or {}),
        esc["sla_first_s"],
        esc["sla_resolve_s"],
    )
    if row is not None:
        await _mark_conversation(conn, esc["tenant"], esc["agent_id"], esc["conversation_id"], True)
        return out(row), True
    row = await conn.fetchrow(
        """SELECT * FROM escalations WHERE tenant = $1 AND agent_id = $2 AND conversation_id = $3
           AND status <> 'resolved'""",
        esc["tenant"],
        esc["agent_id"],
        esc["conversation_id"],
    )
    if row is None:  # resolved in between: try once more
        return await open_escalation(conn, esc)
    return out(row), False


def erased_since_time(esc: dict) -> float | None:
    """The time (unix seconds, Redis's clock, as an erasure's ``erased_at``) an escalation's
    words are known to predate no erasure from: the earliest of its turn's load of the conversation
    (``since``: the window found empty, or the channel's signed queue time) and its spooling
    (``spooled_at``); None when it has neither (any erasure of the conversation counts)."""
    times = [
        float(t)
        for t in (esc.get("since"), esc.get("spooled_at"))
        if isinstance(t, int | float) and not isinstance(t, bool)
    ]
    return min(times) if times else None


async def _lock(conn, tenant: str, wait_s: float | None) -> None:
    """The tenant's erasure lock, shared: waited for at most ``wait_s`` (a turn's: its pooled
    connection waits meanwhile, ``ErasureInProgress`` past it), None without bound (the sweeper)."""
    if wait_s is None:
        await conn.execute(LOCK_WRITE, tenant)
    else:
        await lock_write(conn, tenant, wait_s)


async def open_unless_erased(
    conn, esc: dict, since: float | None, wait_s: float | None = None
) -> tuple[dict, bool] | None:
    """``open_escalation`` inside the caller's transaction, unless the conversation was erased at
    or after ``since`` (None: ever), then None. Read under the tenant's erasure lock, shared
    (``wait_s``: as ``_lock``): an erasure that committed before is read here; one that has not
    waits for this commit, then resolves and clears the escalation as any other of the
    conversation (and releases its hold, when the caller holds the conversation before its
    commit)."""
    await _lock(conn, esc["tenant"], wait_s)
    if await erased_since(conn, esc["tenant"], esc["agent_id"], esc["conversation_id"], since):
        return None
    return await open_escalation(conn, esc)


async def open_locked(conn, esc: dict, wait_s: float | None = None) -> tuple[dict, bool]:
    """``open_escalation`` under the tenant's erasure lock, shared (``wait_s``: as ``_lock``),
    with no erasure to compare with: what the caller does before its commit (the conversation's
    hold) an erasure waiting for the lock comes after, and undoes."""
    await _lock(conn, esc["tenant"], wait_s)
    return await open_escalation(conn, esc)


async def _mark_conversation(conn, tenant: str, agent_id: str, external_id: str, held: bool) -> None:
    await conn.execute(
        """UPDATE conversations SET held_by_human = $4
           WHERE tenant = $1 AND agent_id = $2 AND external_id = $3 AND held_by_human <> $4""",
        tenant,
        agent_id,
        external_id,
        held,
    )


async def join(conn, tenant: str, escalation_id: str) -> dict | None:
    """A customer message arrived while the conversation is held."""
    row = await conn.fetchrow(
        """UPDATE escalations SET customer_messages = customer_messages + 1, last_customer_at = now(),
                  updated_at = now()
           WHERE id = $1 AND tenant = $2 AND status <> 'resolved'
           RETURNING id, tenant, agent, status, team, urgency, base_priority, claimed_by, customer_messages""",
        escalation_id,
        tenant,
    )
    return dict(row) if row else None


async def get(conn, tenant: str | None, escalation_id: str) -> dict | None:
    row = await conn.fetchrow(
        "SELECT * FROM escalations WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)", escalation_id, tenant
    )
    return out(row)


async def must_get(conn, tenant: str | None, escalation_id: str) -> dict:
    found = await get(conn, tenant, escalation_id)
    if found is None:
        raise NotFound(f"No escalation {escalation_id[:64]!r}.", param="id")
    return found


async def list_queue(
    conn,
    tenant: str | None,
    *,
    team: str | None = None,
    status: str | None = None,
    urgency: str | None = None,
    skill: str | None = None,
    aging: float = 1.0,
    limit: int = 100,
) -> list[dict]:
    """Open escalations (or those of ``status``), highest effective priority first."""
    prio = _priority(aging)
    rows = await conn.fetch(
        f"""SELECT *, {prio} AS priority FROM escalations
            WHERE ($1::text IS NULL OR tenant = $1) AND ($2::text IS NULL OR team = $2)
              AND (CASE WHEN $3::text IS NULL THEN status <> 'resolved' ELSE status = $3 END)
              AND ($4::text IS NULL OR urgency = $4) AND ($6::text IS NULL OR $6 = ANY(skills))
            ORDER BY (status = 'resolved'), {prio} DESC, created_at
            LIMIT $5""",
        tenant,
        team,
        status,
        urgency,
        max(1, min(limit, 500)),
        skill,
    )
    return [out(r) for r in rows]


async def claim(conn, tenant: str | None, escalation_id: str, holder: str, lease_s: float) -> dict:
    row = await conn.fetchrow(
        f"""UPDATE escalations SET status = 'claimed', claimed_by = $3,
                  claims = claims + CASE WHEN claimed_by IS DISTINCT FROM $3 OR status = 'queued' THEN 1 ELSE 0 END,
                  lease_until = now() + make_interval(secs => $4), first_claimed_at = coalesce(first_claimed_at, now()),
                  updated_at = now()
            WHERE id = $1 AND ($2::text IS NULL OR tenant = $2) AND {_CLAIMABLE}
            RETURNING *""",
        escalation_id,
        tenant,
        holder,
        float(lease_s),
    )
    if row is None:
        current = await must_get(conn, tenant, escalation_id)
        if current["status"] == "resolved":
            raise Conflict("This escalation is resolved.", param="id", code="escalation_resolved")
        raise Conflict("Someone else holds this escalation.", param="id", code="escalation_claimed")
    return out(row)


async def claim_next(
    conn,
    tenant: str | None,
    holder: str,
    lease_s: float,
    *,
    team: str | None = None,
    skill: str | None = None,
    aging: float = 1.0,
) -> dict | None:
    """The highest-priority claimable item of ``team`` (needing ``skill``), claimed; None when
    the queue is empty."""
    prio = _priority(aging)
    row = await conn.fetchrow(
        f"""WITH next AS (
                SELECT id FROM escalations
                WHERE ($1::text IS NULL OR tenant = $1) AND ($2::text IS NULL OR team = $2)
                  AND (status = 'queued' OR (status = 'claimed' AND lease_until < now()))
                  AND ($5::text IS NULL OR $5 = ANY(skills))
                ORDER BY {prio} DESC, created_at
                FOR UPDATE SKIP LOCKED LIMIT 1)
            UPDATE escalations e SET status = 'claimed', claimed_by = $3, claims = claims + 1,
                   lease_until = now() + make_interval(secs => $4),
                   first_claimed_at = coalesce(first_claimed_at, now()), updated_at = now()
            FROM next WHERE e.id = next.id
            RETURNING e.*""",
        tenant,
        team,
        holder,
        float(lease_s),
        skill,
    )
    return out(row)


async def _held_by(conn, tenant: str | None, escalation_id: str, holder: str | None) -> dict:
    """The escalation, checked to be claimed by ``holder`` with a live lease (None: anyone). The
    row stays locked until the caller's transaction ends: no claim slips in between."""
    current = await must_get(conn, tenant, escalation_id)
    if current["status"] == "resolved":
        raise Conflict("This escalation is resolved.", param="id", code="escalation_resolved")
    if holder is not None:
        live = await conn.fetchval(
            """SELECT status = 'claimed' AND claimed_by = $2 AND lease_until >= now() FROM escalations
               WHERE id = $1 FOR UPDATE""",
            escalation_id,
            holder,
        )
        if not live:
            raise Conflict(
                "Claim this escalation first (or your lease expired).", param="id", code="escalation_not_claimed"
            )
    return current


async def record_reply(
    conn, tenant: str | None, escalation_id: str, holder: str | None, delivery: dict, lease_s: float
) -> dict:
    """A reply that was sent (``check_can_reply`` allowed it before the send): recorded whatever
    happened to the lease during the send — the customer has the message, so a 409 now would only
    invite a second copy. The lease is renewed only if ``holder`` still holds it: a lease that ran
    out meanwhile (and perhaps went to someone else) is not taken back or extended."""
    row = await conn.fetchrow(
        """UPDATE escalations SET first_response_at = coalesce(first_response_at, now()), delivery = $3::jsonb,
                  lease_until = CASE WHEN status = 'claimed' AND claimed_by = $4 AND lease_until >= now()
                                     THEN now() + make_interval(secs => $5) ELSE lease_until END,
                  updated_at = now()
           WHERE id = $1 AND ($2::text IS NULL OR tenant = $2) RETURNING *""",
        escalation_id,
        tenant,
        orjson.dumps(delivery).decode(),
        holder,
        float(lease_s),
    )
    if row is None:
        raise NotFound(f"No escalation {escalation_id[:64]!r}.", param="id")
    return out(row)


async def check_can_reply(conn, tenant: str | None, escalation_id: str, holder: str | None) -> dict:
    return await _held_by(conn, tenant, escalation_id, holder)


async def resolve(
    conn,
    tenant: str | None,
    escalation_id: str,
    holder: str | None,
    *,
    by: str,
    outcome: str,
    corrected_answer: str | None,
) -> dict:
    current = await _held_by(conn, tenant, escalation_id, holder)
    row = await conn.fetchrow(
        """UPDATE escalations SET status = 'resolved', resolved_at = now(), resolved_by = $2, outcome = $3,
                  corrected_answer = $4, lease_until = NULL, updated_at = now()
           WHERE id = $1 AND status <> 'resolved' RETURNING *""",
        escalation_id,
        by,
        outcome,
        corrected_answer,
    )
    if row is None:
        raise Conflict("This escalation is resolved.", param="id", code="escalation_resolved")
    await _mark_conversation(conn, current["tenant"], current["agent_id"], current["conversation_id"], False)
    return out(row)


async def release(conn, tenant: str | None, escalation_id: str, holder: str | None) -> dict:
    await _held_by(conn, tenant, escalation_id, holder)
    row = await conn.fetchrow(
        """UPDATE escalations SET status = 'queued', claimed_by = NULL, lease_until = NULL, updated_at = now()
           WHERE id = $1 AND status = 'claimed' RETURNING *""",
        escalation_id,
    )
    if row is None:
        raise Conflict("This escalation is not claimed.", param="id", code="escalation_not_claimed")
    return out(row)


async def reassign(
    conn, tenant: str | None, escalation_id: str, *, team: str, skills: list[str] | None, urgency: str | None
) -> dict:
    """To another team (back in the queue, unclaimed); any admin of the tenant may (a supervisor)."""
    row = await conn.fetchrow(
        """UPDATE escalations SET team = $3, skills = coalesce($4, skills), status = 'queued', claimed_by = NULL,
                  lease_until = NULL, urgency = coalesce($5, urgency),
                  base_priority = base_priority - (CASE urgency WHEN 'low' THEN 0 WHEN 'normal' THEN 100
                      WHEN 'high' THEN 200 ELSE 300 END)
                      + (CASE coalesce($5, urgency) WHEN 'low' THEN 0 WHEN 'normal' THEN 100
                      WHEN 'high' THEN 200 ELSE 300 END),
                  updated_at = now()
           WHERE id = $1 AND ($2::text IS NULL OR tenant = $2) AND status <> 'resolved' RETURNING *""",
        escalation_id,
        tenant,
        team,
        skills,
        urgency,
    )
    if row is None:
        await must_get(conn, tenant, escalation_id)
        raise Conflict("This escalation is resolved.", param="id", code="escalation_resolved")
    return out(row)


async def expire_leases(conn) -> list[dict]:
    """Claims whose lease ran out go back to the queue (the sweeper, every replica: each row is
    returned by one of them)."""
    rows = await conn.fetch(
        """UPDATE escalations SET status = 'queued', claimed_by = NULL, lease_until = NULL, updated_at = now()
           WHERE status = 'claimed' AND lease_until < now()
           RETURNING id, tenant, agent, status, team, urgency, base_priority, claimed_by, customer_messages"""
    )
    return [dict(r) for r in rows]


async def open_holds(conn, limit: int = 10_000) -> list[tuple[str, str, str, str]]:
    rows = await conn.fetch(
        """SELECT tenant, agent_id, conversation_id, id FROM escalations WHERE status <> 'resolved'
           ORDER BY created_at DESC LIMIT $1""",
        limit,
    )
    return [tuple(r) for r in rows]


async def stats(conn, tenant: str | None, since) -> list[dict]:
    """Per team and urgency: waiting, in progress, breached, and p50/p90 of the time to the
    first claim (waiting) and from it to resolution (handling), in seconds."""
    rows = await conn.fetch(
        """SELECT team, urgency,
                  count(*) FILTER (WHERE status = 'queued') AS waiting,
                  count(*) FILTER (WHERE status = 'claimed') AS in_progress,
                  count(*) FILTER (WHERE status = 'resolved') AS resolved,
                  count(*) FILTER (WHERE first_breached_at IS NOT NULL OR resolve_breached_at IS NOT NULL) AS breached,
                  percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM
                      coalesce(first_claimed_at, CASE WHEN status = 'queued' THEN now() END) - created_at)) AS wait_p50,
                  percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM
                      coalesce(first_claimed_at, CASE WHEN status = 'queued' THEN now() END) - created_at)) AS wait_p90,
                  percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM resolved_at - first_claimed_at))
                      AS handle_p50,
                  percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM resolved_at - first_claimed_at))
                      AS handle_p90
           FROM escalations
           WHERE ($1::text IS NULL OR tenant = $1) AND (created_at >= $2 OR status <> 'resolved')
           GROUP BY team, urgency ORDER BY team, urgency""",
        tenant,
        since,
    )
    result: list[dict[str, Any]] = []
    for r in rows:
        d = dict(r)
        for k in ("wait_p50", "wait_p90", "handle_p50", "handle_p90"):
            d[k] = round(float(d[k]), 3) if d[k] is not None else None
        result.append(d)
    return result
