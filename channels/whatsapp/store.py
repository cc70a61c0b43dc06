"""The channel's PostgreSQL records: conversations (the 24-hour window), messages with their
delivery statuses, templates. The worker writes with the gateway's own connection and names
the tenant in every statement; admin reads go through the tenant's row-level-security wall."""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson

from core.erasure_key import (
    ERASURE_LOCK_BUCKETS,
    ERASURE_LOCK_CLASS,
    TAG_PREFIX,
    conversation_hash,
    conversation_tag,
    name_hash,
)

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
    # A send asked for at this time (µs, Redis's clock: a person's reply) records its messages as
    # the erased conversation's if the conversation was erased since (``OutboundRecords``).
    asked_us: int | None = None

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


def conversation_digest(tenant: str, conversation: str) -> str:
    """One conversation of a tenant, hashed with the deployment's erasure key (its id holds the
    customer's number, and numbers are few enough to hash them all: a plain hash names it): what
    names its erasure mark (``erasure.erased_key``), its send states' and aliases' indexes
    (``sender.index_key``), its media folder (``content.conversation_folder``) and its in-flight
    notes (``inflight``). Made from the name an older release used (``legacy_digest``), so that
    ``names.upgrade`` renames what that release wrote without knowing the conversation."""
    return digest_of(legacy_digest(tenant, conversation))


def legacy_digest(tenant: str, conversation: str) -> str:
    """The name an older release gave the conversation (a plain hash): read only to move or erase
    what it wrote (``names``)."""
    return hashlib.sha256(f"{tenant}\x00{conversation}".encode()).hexdigest()[:32]


def digest_of(legacy: str) -> str:
    """``conversation_digest`` of the conversation an older release named ``legacy``."""
    return name_hash("gw-wa-conv", legacy)


def digests(tenant: str, conversation: str) -> tuple[str, str]:
    """The conversation's name and the one an older release gave it: what an erasure looks under
    (what that release wrote and ``names.upgrade`` has not renamed yet is the customer's too)."""
    legacy = legacy_digest(tenant, conversation)
    return digest_of(legacy), legacy


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
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                         $8::timestamptz[])
    ON CONFLICT (tenant, account, phone_number_id, wa_id) DO UPDATE SET
        profile_name = COALESCE(EXCLUDED.profile_name, whatsapp_conversations.profile_name),
        agent = EXCLUDED.agent,
        last_inbound_at = GREATEST(whatsapp_conversations.last_inbound_at, EXCLUDED.last_inbound_at),
        updated_at = now()
    RETURNING *
), ins AS (
    INSERT INTO whatsapp_messages (tenant, account, wamid, direction, conversation_id, wa_id, kind, body)
    SELECT t, a, w, 'in', c, wa, k, b
    FROM unnest($9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[], $15::text[])
        AS m(t, a, w, c, wa, k, b)
    ON CONFLICT (tenant, account, wamid) WHERE wamid IS NOT NULL DO NOTHING
    RETURNING tenant, account, conversation_id
)
SELECT conv.*, (SELECT count(*) FROM ins WHERE ins.tenant = conv.tenant AND ins.account = conv.account
                AND ins.conversation_id = conv.conversation_id) AS fresh
FROM conv
"""


class GroupCommit:
    """Group commit for the worker's per-message writes: each caller still waits until its row is
    written (nothing is acknowledged before its record), but the rows of the turns arriving at
    the same time go in one statement — one round trip and one statement's CPU, on both sides,
    for many turns instead of one each. A batch that fails is written again row by row, so a
    row that cannot be written fails its own caller only."""

    max_batch = 200

    def __init__(self, pool) -> None:
        self.pool = pool
        self._waiting: list[tuple[tuple, asyncio.Future]] = []
        self._writer: asyncio.Task | None = None

    def _key(self, row: tuple):
        """What may appear once per statement (None: no limit)."""
        return None

    async def _write_rows(self, conn, rows: list[tuple]) -> list:
        raise NotImplementedError

    async def submit(self, row: tuple):
        fut = asyncio.get_running_loop().create_future()
        self._waiting.append((row, fut))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())
        return await fut

    async def _write(self) -> None:
        await asyncio.sleep(0)  # the turns of this loop iteration join the first batch
        while self._waiting:
            batch, rest, seen = [], [], set()
            for item in self._waiting:
                key = self._key(item[0])
                if len(batch) < self.max_batch and (key is None or key not in seen):
                    batch.append(item)
                    seen.add(key)
                else:
                    rest.append(item)
            self._waiting = rest
            try:
                await self._commit(batch)
            except BaseException:  # cancelled (shutdown): no caller is left waiting forever
                for _, fut in [*batch, *self._waiting]:
                    if not fut.done():
                        fut.set_exception(ConnectionError("the record writer stopped"))
                self._waiting = []
                raise

    async def _commit(self, batch: list[tuple[tuple, asyncio.Future]]) -> None:
        try:
            async with self.pool.acquire() as conn:
                results = await self._write_rows(conn, [row for row, _ in batch])
        except Exception as exc:
            if len(batch) > 1:
                for item in batch:
                    await self._commit([item])
                return
            results = None
            error = exc
        for i, (_, fut) in enumerate(batch):
            if fut.done():
                continue
            if results is None:
                fut.set_exception(error)
            else:
                fut.set_result(results[i])


class InboundRecords(GroupCommit):
    """Upserts each turn's conversation (profile name, the window's start) and records its
    messages; answers the conversation and how many of the messages were new."""

    def _key(self, row: tuple):
        return row[:4]  # one upsert of a conversation per statement

    async def record(self, tenant: str, agent: str, messages: list[dict]) -> tuple[Conversation, int]:
        first = messages[0]
        row = (
            tenant,
            first["account"],
            first["pnid"],
            first["wa_id"],
            conversation_id(first["pnid"], first["wa_id"]),
            agent,
            next((m["name"] for m in reversed(messages) if m.get("name")), None),
            _dt(max(m["ts"] for m in messages)),
            messages,
        )
        return await self.submit(row)

    async def _write_rows(self, conn, rows: list[tuple]) -> list:
        order = sorted(range(len(rows)), key=lambda i: rows[i][:4])  # one lock order across writers
        convs = [list(col) for col in zip(*(rows[i][:8] for i in order), strict=True)]
        msgs: list[tuple] = []
        for i in order:
            tenant, account, _, wa_id, conv_id = rows[i][:5]
            msgs += [(tenant, account, m["wamid"], conv_id, wa_id, m["type"], m.get("text") or "") for m in rows[i][8]]
        found = await conn.fetch(_INBOUND, *convs, *(list(col) for col in zip(*msgs, strict=True)))
        by_key = {(r["tenant"], r["account"], r["phone_number_id"], r["wa_id"]): r for r in found}
        out = []
        for row in rows:
            r = by_key[row[:4]]
            out.append((_conv(r), int(r["fresh"])))
        return out


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


async def find_conversation(pool, tenant: str, conv_id: str, accounts=()) -> Conversation | None:
    """The conversation with this id; of several (an account renamed leaves the old name's
    records behind, same id), one of ``accounts`` (those configured) first, the most recently
    active first."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            """SELECT * FROM whatsapp_conversations WHERE tenant = $1 AND conversation_id = $2
               ORDER BY (account = ANY($3::text[])) DESC, last_inbound_at DESC NULLS LAST, updated_at DESC
               LIMIT 1""",
            tenant,
            conv_id,
            list(accounts),
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


# A message of a send asked for at ``asked`` (µs, Redis's clock) whose conversation was erased
# since (``erased_conversations``, by the id's keyed hash ``h``, as the ledger's writer reads it)
# is recorded as the erasure's own rows were left: the tag for its conversation and customer, no
# words. The send's own check once it is over (``erasure.after_send``) does the same, but a
# process killed between the send and that check left the number and the words, and nothing
# retries a person's reply. A batch with such a message takes the erasure's shared lock of its
# tenants first (``core.erasure_key``): an erasure committing meanwhile is waited for, then seen.
_OUTBOUND_BATCH = f"""
INSERT INTO whatsapp_messages (tenant, account, wamid, direction, conversation_id, wa_id, kind, body,
                               reply_to, status, status_rank, error, sent_at)
SELECT t, a, w, 'out', CASE WHEN gone THEN tag ELSE c END, CASE WHEN gone THEN tag ELSE wa END, k,
       CASE WHEN gone THEN NULL ELSE b END, r, s, sr, e, CASE WHEN sr > 0 THEN now() END
FROM (SELECT x.*, '{TAG_PREFIX}' || h AS tag,
             h IS NOT NULL AND EXISTS (SELECT 1 FROM erased_conversations er
                                       WHERE er.tenant = x.t AND er.external_hash = x.h
                                         AND er.erased_at >= to_timestamp(x.asked / 1000000.0)) AS gone
      FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
                  $9::text[], $10::smallint[], $11::text[], $12::text[], $13::bigint[])
           WITH ORDINALITY AS x(t, a, w, c, wa, k, b, r, s, sr, e, h, asked, n)) y
ORDER BY n
ON CONFLICT (tenant, account, wamid) WHERE wamid IS NOT NULL DO UPDATE SET
    conversation_id = EXCLUDED.conversation_id, wa_id = EXCLUDED.wa_id, kind = EXCLUDED.kind,
    body = EXCLUDED.body, reply_to = EXCLUDED.reply_to, updated_at = now()
WHERE whatsapp_messages.direction = 'out'
"""


class OutboundRecords(GroupCommit):
    """Outbound messages (a status webhook may have created a row already: kept)."""

    def _key(self, row: tuple):
        return row[:3] if row[2] is not None else None  # a wamid cannot be upserted twice in one statement

    async def record(
        self, conv: Conversation, wamid: str | None, kind: str, body: str, reply_to: str | None, status: str, error=None
    ) -> None:
        row = (conv.tenant, conv.account, wamid, conv.conversation_id, conv.wa_id, kind, body, reply_to, status)
        asked = conv.asked_us
        h = conversation_hash(conv.tenant, conv.conversation_id) if asked is not None else None
        await self.submit((*row, RANK[status], error, h, asked))

    async def _write_rows(self, conn, rows: list[tuple]) -> list:
        columns = [list(col) for col in zip(*rows, strict=True)]
        checked = sorted({row[0] for row in rows if row[11] is not None})
        if not checked:  # (a turn's sends: one statement, no transaction round trips)
            await conn.execute(_OUTBOUND_BATCH, *columns)
            return [None] * len(rows)
        async with conn.transaction():
            await conn.execute(_LOCK_TENANTS, checked)
            await conn.execute(_OUTBOUND_BATCH, *columns)
        return [None] * len(rows)


_LOCK_TENANTS = f"""SELECT pg_advisory_xact_lock_shared({ERASURE_LOCK_CLASS}, b)
FROM (SELECT DISTINCT hashtext(t) & {ERASURE_LOCK_BUCKETS - 1} AS b FROM unnest($1::text[]) AS t ORDER BY 1) x"""


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


async def statuses(pool, tenant: str, account: str, wamids: list[str]) -> dict[str, str]:
    """The recorded status of each of these sends (``sent`` from Meta's accepted POST on, then as
    its status webhooks move it forward)."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            """SELECT wamid, status FROM whatsapp_messages
               WHERE tenant = $1 AND account = $2 AND wamid = ANY($3::text[]) AND direction = 'out'""",
            tenant,
            account,
            wamids,
        )
    return {r["wamid"]: r["status"] for r in rows}


async def record_status(pool, tenant: str, account: str, status: dict) -> None:
    """A delivery status: the message's status only moves forward (sent < delivered < read;
    failed last), whatever order they arrive in; each one's time is kept. Statuses are about
    messages sent: one naming an inbound message's wamid changes nothing. A status of a wamid not
    recorded (yet: the send's record follows, and names the conversation and customer; or ever: a
    send whose POST got no answer is recorded without its wamid) is kept without its recipient's
    number: it names no conversation an erasure could find it by, and may come after the erasure."""
    column = {"sent": "sent_at", "delivered": "delivered_at", "read": "read_at", "failed": "failed_at"}[
        status["status"]
    ]
    async with pool.acquire() as conn:
        await conn.execute(
            f"""INSERT INTO whatsapp_messages (tenant, account, wamid, direction, status, status_rank, error, {column})
                VALUES ($1, $2, $3, 'out', $4, $5, $6, $7)
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
            status["status"],
            RANK[status["status"]],
            status.get("error"),
            _dt(status["ts"]),
        )


async def template(pool, tenant: str, account: str, name: str, language: str | None) -> dict | None:
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            """SELECT name, language, variables, body FROM whatsapp_templates
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
        "body": row["body"],
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


async def forget_sent_words(pool, tenant: str, account: str, wamids: list[str], tag: str) -> int:
    """The records of these sends (by wamid, of ``account``) of a conversation erased while they
    were under way, as the erasure's own rows were left: the erasure's ``tag`` as their
    conversation and customer, no words (``forget_turn_words``, for a check that knows the
    conversation by its tag only: ``erasure.after_noted_send``). How many were changed."""
    if not wamids:
        return 0
    async with pool.acquire() as conn:
        done = await conn.execute(
            """UPDATE whatsapp_messages SET body = NULL, conversation_id = $4, wa_id = $4, updated_at = now()
               WHERE tenant = $1 AND account = $2 AND wamid = ANY($3::text[]) AND direction = 'out'
                 AND (conversation_id <> $4 OR wa_id <> $4 OR body IS NOT NULL)""",
            tenant,
            account,
            wamids,
            tag,
        )
    return int(done.split()[-1])


async def forget_turn_words(
    pool, tenant: str, conversation: str, wamids: list[str], *, unnumbered: bool = False
) -> None:
    """A turn whose conversation was erased while it was under way: what it recorded after the
    erasure goes as the erasure's own rows went (``runtime.erased_records``): its messages keep
    neither words nor the customer's number (the erasure's tag as their conversation and
    customer), the conversation's state it stored again is deleted (the customer's next message
    starts a new one). ``unnumbered``: the conversation's sends recorded without a wamid too (a
    send Graph refused or never answered: ``erasure.after_send``)."""
    tag = conversation_tag(tenant, conversation)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            """UPDATE whatsapp_messages SET body = NULL, conversation_id = $4, wa_id = $4, updated_at = now()
               WHERE tenant = $1 AND conversation_id = $2
                 AND (wamid = ANY($3::text[]) OR ($5 AND wamid IS NULL AND direction = 'out'))""",
            tenant,
            conversation,
            wamids,
            tag,
            unnumbered,
        )
        await conn.execute(
            "DELETE FROM whatsapp_conversations WHERE tenant = $1 AND conversation_id = $2", tenant, conversation
        )
