"""The durable side of conversation memory: conversations and their messages in PostgreSQL.

Nothing here runs on the request path of an agent turn, with one exception: ``recent`` reloads
the window of a conversation Redis no longer holds (expired after its TTL, or evicted), which
also covers the first turn of a new conversation (one indexed lookup that finds nothing).
"""

from __future__ import annotations

import math

import asyncpg
import orjson

from core.erasure_key import ERASURE_LOCK_BUCKETS as ERASURE_LOCK_BUCKETS
from core.erasure_key import EVERY_AGENT, LOCK_ERASURE, conversation_hash, erasure_key, lock_batch_tenants
from runtime import erased_records
from runtime.runs import JSONB_OF, temp_table, tenant_transaction

# One stream entry per stored turn: ``r`` the turn as JSON (tenant, agent_id, external_id,
# request_id, prompt_version, variant, ts, messages), ``s`` the seq of its first message.
_UPSERT_CONVERSATIONS = """
INSERT INTO conversations (id, tenant, agent_id, external_id, created_at, last_at)
SELECT 'conv_' || replace(gen_random_uuid()::text, '-', ''), tenant, agent_id, external_id, min(ts), min(ts)
FROM (SELECT r->>'tenant' AS tenant, r->>'agent_id' AS agent_id, r->>'external_id' AS external_id,
             to_timestamp((r->>'ts')::float8) AS ts
      FROM memory_raw) x
GROUP BY tenant, agent_id, external_id
ORDER BY tenant, agent_id, external_id
ON CONFLICT (tenant, agent_id, external_id) DO UPDATE SET created_at = excluded.created_at
WHERE excluded.created_at < conversations.created_at  -- (turns spilled to disk arrive after newer ones)
"""

# Messages already present (a replayed batch) are skipped, and only what was inserted counts
# toward the conversation's turns and last activity: replaying a batch changes nothing.
_INSERT_MESSAGES = """
WITH inserted AS (
    INSERT INTO messages (tenant, conversation_id, seq, role, content, request_id, prompt_version, variant,
                          created_at)
    SELECT c.tenant, c.id, raw.s + m.i - 1, COALESCE(m.msg->>'role', 'user'), m.msg, raw.r->>'request_id',
           (raw.r->>'prompt_version')::int, raw.r->>'variant', to_timestamp((raw.r->>'ts')::float8)
    FROM memory_raw raw
    JOIN conversations c ON c.tenant = raw.r->>'tenant' AND c.agent_id = raw.r->>'agent_id'
                        AND c.external_id = raw.r->>'external_id'
    CROSS JOIN LATERAL jsonb_array_elements(raw.r->'messages') WITH ORDINALITY AS m(msg, i)
    ORDER BY c.id, raw.s + m.i - 1
    ON CONFLICT (conversation_id, seq) DO NOTHING
    RETURNING conversation_id, role, created_at
), touched AS (
    SELECT conversation_id, count(*) FILTER (WHERE role = 'user') AS turns, max(created_at) AS last_at
    FROM inserted GROUP BY conversation_id
)
UPDATE conversations c
SET turns = c.turns + touched.turns, last_at = greatest(c.last_at, touched.last_at)
FROM touched WHERE c.id = touched.conversation_id
"""


# Turns of an erased conversation recorded up to its erasure are not written (they were still in
# the stream, or spilled to disk, when it was erased); turns after it start the conversation anew.
# One index lookup per turn of the batch (a scalar subquery, never flattened into a join): as a
# join, the planner hashed the whole table of erasures for every batch once it had grown.
# A turn's time is Redis's when its stream entry has one (``t``, stamped by the append script,
# the clock the erasure is stamped with too), else the gateway's (``ts``: an older release's entry).
# An erasure is kept under the id's keyed hash (``h``, computed by the writer: the key is not in
# the database); one recorded before the hash was keyed, under its plain SHA-256 (``keyed`` false,
# read until ``LEGACY_KEEP_DAYS`` have passed, then deleted: ``drop_unkeyed``).
# An erasure of every agent's conversation under the id (``EVERY_AGENT``: a channel's customer)
# covers the turns of any agent: one whose turn was still on its way is not known to the erasure.
_SKIP_ERASED = f"""
DELETE FROM memory_raw raw
WHERE to_timestamp(coalesce(raw.t, (raw.r->>'ts')::float8)) <= (
    SELECT max(e.erased_at) FROM erased_conversations e
    WHERE e.tenant = raw.r->>'tenant' AND e.agent_id IN (raw.r->>'agent_id', '{EVERY_AGENT}')
      AND e.external_hash IN (raw.h, encode(sha256(convert_to(raw.r->>'external_id', 'UTF8')), 'hex')))
"""
LEGACY_KEEP_DAYS = 7
_DROP_UNKEYED = f"""DELETE FROM erased_conversations
WHERE NOT keyed AND erased_at < now() - make_interval(days => {LEGACY_KEEP_DAYS})"""

_LOCK_BATCH_TENANTS = lock_batch_tenants("memory_raw")


MEMORY_RAW_DDL = (
    "CREATE TEMP TABLE IF NOT EXISTS memory_raw (r jsonb, s integer, t float8, h text) ON COMMIT DELETE ROWS"
)


def _stamp(value: bytes | None) -> float | None:
    """The entry's Redis time (``t``: "seconds.micros"), None when it has none or it is unreadable."""
    try:
        stamp = float(value) if value else None
    except ValueError:
        return None
    return stamp if stamp is not None and math.isfinite(stamp) else None


# (the turns into the temporary table in one INSERT from arrays; then every statement over it in
# one simple query, each with a snapshot of its own as when sent one by one: the erasures are read
# after the tenants' locks are granted)
_FILL = (
    f"INSERT INTO memory_raw (r, s, t, h) SELECT {JSONB_OF.format('r')}, s, t, h "
    "FROM unnest($1::bytea[], $2::int[], $3::float8[], $4::text[]) AS u(r, s, t, h)"
)
_AFTER_FILL = ";\n".join((_LOCK_BATCH_TENANTS, _SKIP_ERASED, _UPSERT_CONVERSATIONS, _INSERT_MESSAGES))


async def write_turns(conn: asyncpg.Connection, entries: list[dict], key: bytes | None = None) -> None:
    """Writes stream entries (fields ``r``, ``s`` and ``t``) inside the caller's transaction, in
    two round trips; ``key``: the erasures' (``core.erasure_key``, this process's by default)."""
    key = erasure_key() if key is None else key
    raw, seqs, stamps, hashes = [], [], [], []
    for e in entries:
        r, s = e.get(b"r"), e.get(b"s", b"")
        if r is None or not s.isdigit():
            continue
        raw.append(r)
        seqs.append(int(s))
        stamps.append(_stamp(e.get(b"t")))
        hashes.append(_turn_hash(r, key))
    if not raw:
        return
    async with temp_table(conn, MEMORY_RAW_DDL):
        await conn.execute(_FILL, raw, seqs, stamps, hashes)
        await conn.execute(_AFTER_FILL)


def _turn_hash(raw: bytes, key: bytes) -> str | None:
    try:
        turn = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    tenant, external_id = (turn.get("tenant"), turn.get("external_id")) if isinstance(turn, dict) else (None, None)
    if not isinstance(tenant, str) or not isinstance(external_id, str):
        return None
    return conversation_hash(tenant, external_id, key)


def external_hash(tenant: str, external_id: str, key: bytes | None = None) -> str:
    """How an erased conversation's id is kept: it may itself be personal data (a keyed hash,
    ``core.erasure_key``)."""
    return conversation_hash(tenant, external_id, key)


async def drop_unkeyed(conn: asyncpg.Connection) -> int:
    """Deletes the erasures recorded under a plain SHA-256 (before the hash was keyed) once
    ``LEGACY_KEEP_DAYS`` old: a turn still on its way to PostgreSQL that long after is none."""
    status = await conn.execute(_DROP_UNKEYED)
    return int(status.split()[-1])


# The copies of a conversation's words kept beside its messages, cleared by an erasure and by a
# retention (``forget_copies``): the feedback given on it (by its id, or on one of its turns:
# found through its runs, by index) is deleted; its escalations keep their lifecycle, SLAs and
# outcome without the words (the customer's question, the AI's draft, the person's answer, the
# context shown); the learned examples drawn from them that nobody approved (pending, rejected:
# the customer's words, redacted only when a PII policy found something) are deleted; a channel's
# records keep their statuses, durations and costs without the words (a WhatsApp message's body,
# the customer's profile name). The feedback goes whole; the rest, given a time (a retention's
# cutoff), only what is older: a turn of the same id in flight while a retention runs keeps what it
# brought. A VAPI call's words (transcript, summary, recording link) go with its number
# (``erased_records.retag``), not here: its report holds the erasure's lock shared and then writes
# the call's record, and a record locked here when an erasure cleared the copies before its lock
# deadlocked the two (``lock_erasures``); one place clears them.
# $1 tenant, $2 the agents' ids, $3 the conversations' ids (the caller's). The turns' request ids
# are read first, as an array (an index on the runs, then both feedback indexes): ``IN (SELECT …)``
# beside the ``OR`` was a hashed subplan that read every feedback row of the tenant.
DELETE_FEEDBACK = """
WITH gone AS (
    DELETE FROM feedback f
    WHERE f.tenant = $1 AND (f.agent_id = ANY($2::text[]) OR f.agent_id IS NULL)
      AND (f.conversation_id = ANY($3::text[])
           OR f.request_id = ANY(ARRAY(SELECT r.request_id FROM runs r
                                       WHERE r.tenant = $1 AND r.agent_id = ANY($2::text[])
                                         AND r.conversation_id = ANY($3::text[]))))
    RETURNING 1)
SELECT count(*) FROM gone
"""
# ($1 tenant, $2 the agents' ids, $3 the conversations' ids, $4 a time or NULL)
_CLEAR_AGENTS_COPIES = (
    """DELETE FROM learned_examples l USING escalations e
       WHERE l.tenant = $1 AND l.status <> 'approved' AND e.id = l.escalation_id AND e.tenant = $1
         AND e.agent_id = ANY($2::text[]) AND e.conversation_id = ANY($3::text[])
         AND ($4::timestamptz IS NULL OR e.created_at < $4)""",
    """UPDATE escalations SET question = NULL, draft = NULL, corrected_answer = NULL, context = '{}'::jsonb,
              updated_at = now()
       WHERE tenant = $1 AND agent_id = ANY($2::text[]) AND conversation_id = ANY($3::text[])
         AND ($4::timestamptz IS NULL OR created_at < $4)
         AND (question IS NOT NULL OR draft IS NOT NULL OR corrected_answer IS NOT NULL OR context <> '{}'::jsonb)""",
)
# (a channel's records are the tenant's conversation's, whichever agent answered it: $1 tenant,
# $2 the conversations' ids, $3 a time or NULL)
_CLEAR_CHANNEL_COPIES = (
    """UPDATE whatsapp_messages SET body = NULL, updated_at = now()
       WHERE tenant = $1 AND conversation_id = ANY($2::text[]) AND body IS NOT NULL
         AND ($3::timestamptz IS NULL OR created_at < $3)""",
    """UPDATE whatsapp_conversations SET profile_name = NULL, updated_at = now()
       WHERE tenant = $1 AND conversation_id = ANY($2::text[]) AND profile_name IS NOT NULL
         AND ($3::timestamptz IS NULL OR coalesce(last_inbound_at, created_at) < $3)""",
)


async def forget_copies(
    conn: asyncpg.Connection, tenant: str, agent_ids: list[str], external_ids: list[str], before=None
) -> int:
    """Clears the copies of the conversations' words (``DELETE_FEEDBACK``, above) inside the
    caller's transaction; ``before`` (a datetime): the records beside the feedback only when
    older. The number of feedback
    deleted. One implementation for the erasure and the retention."""
    feedback = await conn.fetchval(DELETE_FEEDBACK, tenant, agent_ids, external_ids)
    for statement in _CLEAR_AGENTS_COPIES:
        await conn.execute(statement, tenant, agent_ids, external_ids, before)
    for statement in _CLEAR_CHANNEL_COPIES:
        await conn.execute(statement, tenant, external_ids, before)
    return int(feedback)


async def lock_erasures(conn: asyncpg.Connection, tenant: str) -> None:
    """The tenant's erasure lock (``core.erasure_key``), exclusive, to the caller's commit: the
    first thing an erasure's transaction does. The writers that take it shared (the memory, runs
    and ledger writers, a WhatsApp send's record, a VAPI call's report, a retention sweep) take it
    before any row they write, so an erasure that locked a row before it (a copy of the words:
    ``forget_copies``) waited for a writer waiting for that row: a deadlock. The copies are
    cleared under it, so those writers (of the tenant's lock bucket) wait for them too. Taken
    again (``erase``), it is the same lock."""
    await conn.execute(LOCK_ERASURE, tenant)


async def erase(
    conn: asyncpg.Connection,
    tenant: str,
    agent_id: str,
    external_id: str,
    erased_at: float,
    *,
    copies: bool = True,
    key: bytes | None = None,
) -> dict:
    """Deletes the conversation and every message of it, and clears the copies of its words
    (``forget_copies``: feedback, escalations, learned examples, channel records), inside the
    caller's transaction; and records the erasure, so turns recorded up to ``erased_at`` (unix
    seconds, Redis's clock, as turns are stamped) that are still on their way to PostgreSQL are
    skipped when they arrive. What was deleted: ``{"conversation": bool, "messages": n, "feedback": n,
    "resolved": [(agent id, id, escalation id), ...]}`` (its escalations still open, resolved now:
    ``erased_records.retag``; their holds in Redis are the caller's to release).
    ``copies=False``: the caller cleared the copies already (``forget_copies``, for all the
    agents it erases the conversation of, after ``lock_erasures``). ``key``: the
    erasures' (``core.erasure_key``, this process's by default). The conversation's runs and ledger
    rows keep its tag instead of its id (``runtime.erased_records``)."""
    await lock_erasures(conn, tenant)
    feedback = await forget_copies(conn, tenant, [agent_id], [external_id]) if copies else 0
    await _record_erasure(conn, tenant, agent_id, external_hash(tenant, external_id, key), erased_at)
    # (the runs and ledger rows already written; those on their way are tagged by their writers)
    resolved = await erased_records.retag(conn, tenant, [agent_id], [external_id], key=key)
    row = await conn.fetchrow(
        "SELECT id FROM conversations WHERE tenant = $1 AND agent_id = $2 AND external_id = $3",
        tenant,
        agent_id,
        external_id,
    )
    messages = 0
    if row is not None:
        messages = await conn.fetchval(
            "SELECT count(*) FROM messages WHERE conversation_id = $1 AND tenant = $2", row["id"], tenant
        )
        await conn.execute("DELETE FROM conversations WHERE id = $1 AND tenant = $2", row["id"], tenant)  # (cascade)
    return {"conversation": row is not None, "messages": int(messages), "feedback": feedback, "resolved": resolved}


async def erase_for_every_agent(
    conn: asyncpg.Connection, tenant: str, external_id: str, erased_at: float, key: bytes | None = None
) -> None:
    """Records, inside the caller's transaction, that the conversation was erased with every agent
    of the tenant (a channel's customer's: ``gateway.admin_conversations``), so turns recorded up
    to ``erased_at`` (Redis's clock) still on their way to PostgreSQL are skipped whichever agent
    stored them (``_SKIP_ERASED``), and their runs keep the tag (``runtime.runs``). The erasure
    finds the agents to erase by what PostgreSQL and Redis hold of the conversation; an agent's
    turn of the moment before, whose row the memory writer had not written and whose window Redis
    lost (a spill written after a restart, a replica's writer behind), is known to neither."""
    await conn.execute(LOCK_ERASURE, tenant)
    await _record_erasure(conn, tenant, EVERY_AGENT, external_hash(tenant, external_id, key), erased_at)


async def _record_erasure(conn: asyncpg.Connection, tenant: str, agent_id: str, hashed: str, erased_at: float) -> None:
    """The erasure's row (an agent's, or ``EVERY_AGENT``'s): the latest of its times is kept."""
    await conn.execute(
        """INSERT INTO erased_conversations (tenant, agent_id, external_hash, erased_at)
           VALUES ($1, $2, $3, to_timestamp($4))
           ON CONFLICT (tenant, agent_id, external_hash)
           DO UPDATE SET erased_at = greatest(erased_conversations.erased_at, excluded.erased_at)""",
        tenant,
        agent_id,
        hashed,
        erased_at,
    )


_ERASED_SINCE = f"""SELECT EXISTS (SELECT 1 FROM erased_conversations
    WHERE tenant = $1 AND agent_id IN ($2, '{EVERY_AGENT}') AND external_hash = $3
      AND ($4::float8 IS NULL OR erased_at >= to_timestamp($4)))"""


async def erased_since(
    conn: asyncpg.Connection, tenant: str, agent_id: str, external_id: str, since: float | None
) -> bool:
    """Whether the conversation (of this agent, or of every agent) was erased at or after
    ``since`` (unix seconds, Redis's clock; None: ever), read inside the caller's transaction.
    The caller holds the erasure's lock shared (``LOCK_WRITE``) first: an erasure committed
    before is read here, one after waits for the caller's commit (and clears what it wrote)."""
    hashed = external_hash(tenant, external_id)
    return bool(await conn.fetchval(_ERASED_SINCE, tenant, agent_id, hashed, since))


async def recent(
    pool: asyncpg.Pool, tenant: str, agent_id: str, external_id: str, limit: int
) -> list[tuple[int, dict]]:
    """The conversation's last ``limit`` messages as (seq, message), oldest first."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            """SELECT m.seq, m.content FROM conversations c
               JOIN messages m ON m.conversation_id = c.id AND m.tenant = c.tenant
               WHERE c.tenant = $1 AND c.agent_id = $2 AND c.external_id = $3
               ORDER BY m.seq DESC LIMIT $4""",
            tenant,
            agent_id,
            external_id,
            limit,
        )
    return [(r["seq"], _json(r["content"])) for r in reversed(rows)]


async def last_seq(pool: asyncpg.Pool, tenant: str, agent_id: str, external_id: str) -> int:
    """The seq of the conversation's last stored message (0: none). Read only when Redis has
    lost both the conversation's counter and its list, on the path of a store."""
    async with pool.acquire() as conn:
        value = await conn.fetchval(
            """SELECT max(m.seq) FROM conversations c
               JOIN messages m ON m.conversation_id = c.id AND m.tenant = c.tenant
               WHERE c.tenant = $1 AND c.agent_id = $2 AND c.external_id = $3""",
            tenant,
            agent_id,
            external_id,
        )
    return int(value or 0)


async def history(
    pool: asyncpg.Pool, tenant: str | None, agent_id: str, external_id: str, limit: int = 100
) -> list[dict]:
    """The conversation's last ``limit`` messages, oldest first, each with what produced it."""
    sql = """SELECT m.seq, m.content, m.request_id, m.prompt_version, m.variant, m.created_at
             FROM conversations c JOIN messages m ON m.conversation_id = c.id AND m.tenant = c.tenant
             WHERE c.agent_id = $1 AND c.external_id = $2 {tenant}
             ORDER BY m.seq DESC LIMIT $3"""
    args: tuple = (agent_id, external_id, limit)
    if tenant is not None:
        args += (tenant,)
    async with tenant_transaction(pool, tenant) as conn:
        rows = await conn.fetch(sql.format(tenant="AND c.tenant = $4" if tenant is not None else ""), *args)
    return [
        {
            "seq": r["seq"],
            "message": _json(r["content"]),
            "request_id": r["request_id"],
            "prompt_version": r["prompt_version"],
            "variant": r["variant"],
            "created_at": r["created_at"].timestamp(),
        }
        for r in reversed(rows)
    ]


async def conversation(pool: asyncpg.Pool, tenant: str | None, agent_id: str, external_id: str) -> dict | None:
    """The conversation's row (our id, turns, status, held_by_human, ...), or None."""
    sql = "SELECT * FROM conversations WHERE agent_id = $1 AND external_id = $2"
    args: tuple = (agent_id, external_id)
    if tenant is not None:
        sql += " AND tenant = $3"
        args += (tenant,)
    async with tenant_transaction(pool, tenant) as conn:
        row = await conn.fetchrow(sql, *args)
    if row is None:
        return None
    out = dict(row)
    out["metadata"] = _json(out["metadata"]) if out["metadata"] is not None else None
    out["created_at"] = out["created_at"].timestamp()
    out["last_at"] = out["last_at"].timestamp()
    return out


def _json(value):
    return orjson.loads(value) if isinstance(value, str | bytes) else value
