"""The channel's PostgreSQL records: conversations (the 24-hour window), messages with their
delivery statuses, templates. The worker writes with the gateway's own connection and names
the tenant in every statement; admin reads go through the tenant's row-level-security wall."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson

WINDOW_S = 24 * 3600
RANK = {"received": 0, "held": 0, "unknown": 0, "sent": 1, "delivered": 2, "read": 3, "failed": 4}


@dataclass(frozen=True, slots=True)
class Conversation:
    tenant: str
    account: str
    pnid: str
    wa_id: str
    conversation_id: str
    agent: str
    name: str | None
    last_inbound_at: float | None  # unix seconds

    def window_open(self, now: float | None = None) -> bool:
        return self.last_inbound_at is not None and (now or time.time()) - self.last_inbound_at < WINDOW_S


async def _no_reset(conn) -> None:
    """The channel's statements leave no session state (no SET, LISTEN, advisory locks or
    cursors), so a connection goes back to the pool as it is: asyncpg's default reset is one more
    round trip on every release."""


async def create_pool(database_url: str, max_size: int = 10):
    """The channel worker's own small pool (its writes do not queue behind the gateway's)."""
    import asyncpg

    return await asyncpg.create_pool(database_url, min_size=1, max_size=max_size, command_timeout=30, reset=_no_reset)


def conversation_id(pnid: str, wa_id: str) -> str:
    return f"wa:{pnid}:{wa_id}"


def _dt(ts: float | None) -> datetime | None:
    return datetime.fromtimestamp(ts, UTC) if ts is not None else None


def _conv(row) -> Conversation:
    last = row["last_inbound_at"]
    return Conversation(
        row["tenant"],
        row["account"],
        row["phone_number_id"],
        row["wa_id"],
        row["conversation_id"],
        row["agent"],
        row["profile_name"],
        last.timestamp() if last is not None else None,
    )


_INBOUND = """
WITH conv AS (
    INSERT INTO whatsapp_conversations
        (tenant, account, phone_number_id, wa_id, conversation_id, agent, profile_name, last_inbound_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
    ON CONFLICT (tenant, account, phone_number_id, wa_id) DO UPDATE SET
        profile_name = COALESCE(EXCLUDED.profile_name, whatsapp_conversations.profile_name),
        agent = EXCLUDED.agent,
        last_inbound_at = GREATEST(whatsapp_conversations.last_inbound_at, EXCLUDED.last_inbound_at),
        updated_at = now()
    RETURNING *
), ins AS (
    INSERT INTO whatsapp_messages (tenant, account, wamid, direction, conversation_id, wa_id, kind, body)
    SELECT $1, $2, w, 'in', $5, $4, k, b FROM unnest($9::text[], $10::text[], $11::text[]) AS t(w, k, b)
    ON CONFLICT (tenant, account, wamid) WHERE wamid IS NOT NULL DO NOTHING
    RETURNING 1
)
SELECT conv.*, (SELECT count(*) FROM ins) AS fresh FROM conv
"""


async def record_inbound(pool, tenant: str, agent: str, messages: list[dict]) -> tuple[Conversation, int]:
    """Upserts the conversation (profile name, the window's start) and records the messages;
    returns it and how many of the messages were new."""
    first = messages[0]
    last_ts = max(m["ts"] for m in messages)
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            _INBOUND,
            tenant,
            first["account"],
            first["pnid"],
            first["wa_id"],
            conversation_id(first["pnid"], first["wa_id"]),
            agent,
            next((m["name"] for m in reversed(messages) if m.get("name")), None),
            _dt(last_ts),
            [m["wamid"] for m in messages],
            [m["type"] for m in messages],
            [m.get("text") or "" for m in messages],
        )
    return _conv(row), int(row["fresh"])


async def ensure_conversation(pool, tenant: str, account: str, pnid: str, wa_id: str, agent: str) -> Conversation:
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            """INSERT INTO whatsapp_conversations (tenant, account, phone_number_id, wa_id, conversation_id, agent)
               VALUES ($1, $2, $3, $4, $5, $6)
               ON CONFLICT (tenant, account, phone_number_id, wa_id) DO UPDATE SET updated_at = now()
               RETURNING *""",
            tenant,
            account,
            pnid,
            wa_id,
            conversation_id(pnid, wa_id),
            agent,
        )
    return _conv(row)


async def find_conversation(pool, tenant: str, conv_id: str) -> Conversation | None:
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT * FROM whatsapp_conversations WHERE tenant = $1 AND conversation_id = $2 LIMIT 1", tenant, conv_id
        )
    return _conv(row) if row is not None else None


async def get_conversation(pool, tenant: str, account: str, pnid: str, wa_id: str) -> Conversation | None:
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            """SELECT * FROM whatsapp_conversations
               WHERE tenant = $1 AND account = $2 AND phone_number_id = $3 AND wa_id = $4""",
            tenant,
            account,
            pnid,
            wa_id,
        )
    return _conv(row) if row is not None else None


_OUTBOUND_BATCH = """
INSERT INTO whatsapp_messages (tenant, account, wamid, direction, conversation_id, wa_id, kind, body,
                               reply_to, status, status_rank, error, sent_at)
SELECT t, a, w, 'out', c, wa, k, b, r, s, sr, e, CASE WHEN sr > 0 THEN now() END
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
            $9::text[], $10::smallint[], $11::text[]) WITH ORDINALITY AS x(t, a, w, c, wa, k, b, r, s, sr, e, n)
ORDER BY n
ON CONFLICT (tenant, account, wamid) WHERE wamid IS NOT NULL DO UPDATE SET
    conversation_id = EXCLUDED.conversation_id, wa_id = EXCLUDED.wa_id, kind = EXCLUDED.kind,
    body = EXCLUDED.body, reply_to = EXCLUDED.reply_to, updated_at = now()
WHERE whatsapp_messages.direction = 'out'
"""
MAX_OUTBOUND_BATCH = 500


class OutboundRecords:
    """Outbound messages (a status webhook may have created a row already: kept), with group
    commit: each caller still waits until its row is written
    (nothing is acknowledged before its record, as before), but the rows of the turns finishing
    at the same time go in one statement — one round trip and one statement's CPU for many sends
    instead of one each."""

    def __init__(self, pool) -> None:
        self.pool = pool
        self._waiting: list[tuple[tuple, asyncio.Future]] = []
        self._writer: asyncio.Task | None = None

    async def record(
        self, conv: Conversation, wamid: str | None, kind: str, body: str, reply_to: str | None, status: str, error=None
    ) -> None:
        row = (conv.tenant, conv.account, wamid, conv.conversation_id, conv.wa_id, kind, body, reply_to, status)
        fut = asyncio.get_running_loop().create_future()
        self._waiting.append(((*row, RANK[status], error), fut))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())
        await fut

    async def _write(self) -> None:
        await asyncio.sleep(0)  # the turns finishing in this loop iteration join the first batch
        while self._waiting:
            batch, rest = [], []
            seen: set[tuple] = set()
            for item in self._waiting:  # a wamid twice in one statement cannot be upserted twice
                wkey = (item[0][0], item[0][1], item[0][2])
                if len(batch) < MAX_OUTBOUND_BATCH and (item[0][2] is None or wkey not in seen):
                    batch.append(item)
                    seen.add(wkey)
                else:
                    rest.append(item)
            self._waiting = rest
            try:
                columns = [list(col) for col in zip(*(row for row, _ in batch), strict=True)]
                async with self.pool.acquire() as conn:
                    await conn.execute(_OUTBOUND_BATCH, *columns)
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)


async def answered(pool, tenant: str, head: dict) -> bool:
    """Whether something went out (or was held) in answer to this inbound message: naming it, or
    sent in its conversation after it was recorded (a message answered inside a burst is named by
    nothing: the burst's answer names its first message). A fallback message answers only the
    message it names: the others of a burst that died are still answered on their own."""
    async with pool.acquire() as conn:
        found = await conn.fetchval(
            """SELECT 1 FROM whatsapp_messages o
               WHERE o.tenant = $1 AND o.conversation_id = $2 AND o.direction = 'out'
                 AND (o.reply_to = $3 OR o.kind <> 'fallback' AND o.created_at >= (
                      SELECT i.created_at FROM whatsapp_messages i
                      WHERE i.tenant = $1 AND i.account = $4 AND i.wamid = $3 AND i.direction = 'in'))
               LIMIT 1""",
            tenant,
            conversation_id(head["pnid"], head["wa_id"]),
            head["wamid"],
            head["account"],
        )
    return found is not None


async def outbound(pool, tenant: str, account: str, wamid: str) -> dict | None:
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            """SELECT conversation_id, kind, body, reply_to FROM whatsapp_messages
               WHERE tenant = $1 AND account = $2 AND wamid = $3 AND direction = 'out'""",
            tenant,
            account,
            wamid,
        )
    return dict(row) if row is not None else None


async def record_status(pool, tenant: str, account: str, status: dict) -> None:
    """A delivery status: the message's status only moves forward (sent < delivered < read;
    failed last), whatever order they arrive in; each one's time is kept. Statuses are about
    messages sent: one naming an inbound message's wamid changes nothing."""
    column = {"sent": "sent_at", "delivered": "delivered_at", "read": "read_at", "failed": "failed_at"}[
        status["status"]
    ]
    async with pool.acquire() as conn:
        await conn.execute(
            f"""INSERT INTO whatsapp_messages (tenant, account, wamid, direction, wa_id, status, status_rank, error,
                                               {column})
                VALUES ($1, $2, $3, 'out', $4, $5, $6, $7, $8)
                ON CONFLICT (tenant, account, wamid) WHERE wamid IS NOT NULL DO UPDATE SET
                    status = CASE WHEN EXCLUDED.status_rank > whatsapp_messages.status_rank
                                  THEN EXCLUDED.status ELSE whatsapp_messages.status END,
                    status_rank = GREATEST(whatsapp_messages.status_rank, EXCLUDED.status_rank),
                    error = COALESCE(EXCLUDED.error, whatsapp_messages.error),
                    {column} = COALESCE(whatsapp_messages.{column}, EXCLUDED.{column}),
                    updated_at = now()
                WHERE whatsapp_messages.direction = 'out'""",
            tenant,
            account,
            status["wamid"],
            status.get("wa_id"),
            status["status"],
            RANK[status["status"]],
            status.get("error"),
            _dt(status["ts"]),
        )


async def template(pool, tenant: str, account: str, name: str, language: str | None) -> dict | None:
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            """SELECT name, language, variables FROM whatsapp_templates
               WHERE tenant = $1 AND account = $2 AND name = $3 AND ($4::text IS NULL OR language = $4)
               ORDER BY language LIMIT 1""",
            tenant,
            account,
            name,
            language,
        )
    if row is None:
        return None
    variables = row["variables"]
    return {
        "name": row["name"],
        "language": row["language"],
        "variables": orjson.loads(variables) if isinstance(variables, str) else list(variables),
    }


async def turn_texts(pool, tenant: str, account: str, conv_id: str, reply_to: str) -> list[str]:
    """The free-form pieces sent in answer to one inbound message, in order."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            """SELECT body FROM whatsapp_messages
               WHERE tenant = $1 AND account = $2 AND conversation_id = $3 AND reply_to = $4
                 AND direction = 'out' AND kind <> 'template' AND body IS NOT NULL
               ORDER BY id LIMIT 50""",
            tenant,
            account,
            conv_id,
            reply_to,
        )
    return [r["body"] for r in rows]
