"""The rows kept after a conversation's erasure or retention lose its id: its run records and
audit ledger rows (sizes, durations, tokens and cost: what was spent stays) hold
``erased:<keyed hash>`` (``core.erasure_key.conversation_tag``) in place of the id, so the rows of
one erased conversation still belong together and the id (a WhatsApp customer's number) cannot be
read back. A ledger row's end user and customer go the same way when they are the id or its last part (a
WhatsApp turn's are the customer's number) or, in a VAPI call's conversation, its caller
(``core.erasure_key.names_party``: the number, the channel's pseudonym of it, a web call), and the
call's record (``vapi_calls``, kept for its duration and cost) holds the tag as its caller's number.
A WhatsApp conversation's message records hold the tag as their conversation and customer, its
channel state is deleted, and its escalations hold the tag (those open resolved): below, by
``_WA_MESSAGES``, ``_WA_CONVERSATIONS`` and ``_ESCALATIONS``, which say why.

Rows already written are rewritten here (``retag``, inside the erasure's transaction, after its
lock); rows on their way (the runs and ledger streams, a spool on disk, a dead letter retried)
are written with the tag by their writers when the erasure is older than the turn
(``runtime.runs``, ``policies.ledger``); the ledger's dead letters are rewritten in Redis
(``retag_dead_letters``) and in this replica's ``ledger-dead.jsonl`` (``retag_dead_file``). The
ledger does not say which agent answered: an erasure retags the tenant's rows of the id,
whichever agent's.
"""

from __future__ import annotations

from pathlib import Path

import asyncpg
import orjson

from core import locked_lines
from core.erasure_key import PARTY_FIELDS, conversation_record, conversation_tag, names_party_sql, tag_parties

# $1 tenant, $2 the agents' ids, $3 the conversations' ids, $4 their tags, $5 a time or NULL
_RUNS = """
UPDATE runs SET conversation_id = t.tag
FROM unnest($3::text[], $4::text[]) AS t(id, tag)
WHERE runs.tenant = $1 AND runs.agent_id = ANY($2::text[]) AND runs.conversation_id = t.id
  AND ($5::timestamptz IS NULL OR runs.created_at < $5)
"""
# $1 tenant, $2 the conversations' ids, $3 their tags, $4 a time or NULL
_LEDGER = f"""
UPDATE ledger SET conversation_id = t.tag,
    end_user = CASE WHEN {names_party_sql("t.id", "ledger.end_user")} THEN t.tag ELSE ledger.end_user END,
    customer = CASE WHEN {names_party_sql("t.id", "ledger.customer")} THEN t.tag ELSE ledger.customer END
FROM unnest($2::text[], $3::text[]) AS t(id, tag)
WHERE ledger.tenant = $1 AND ledger.conversation_id = t.id AND ($4::timestamptz IS NULL OR ledger.ts < $4)
"""
# A VAPI call's record keeps the tag as its caller's number: a status update VAPI sends later
# (``COALESCE``: it fills only what is unknown) does not bring the number back, the ledger record
# of its end-of-call report (written from this row) names the tag, and no callback is placed to it.
# Only this call's record: the same caller's other calls are other conversations. ($1 tenant, $2
# the conversations' ids, $3 their tags, $4 a time or NULL)
# Its words (transcript, summary, recording link) go here, under the erasure's lock, and only here
# (not in ``forget_copies``, before the lock): the call's end-of-call report holds the lock shared
# while it reads the erasures and writes the record (``channels.vapi.calls``), so the two exclude
# each other, and a report waiting for a record the erasure had locked before its lock deadlocked.
_CALLS = """
UPDATE vapi_calls SET customer_number = CASE WHEN vapi_calls.customer_number IS NULL THEN NULL ELSE t.tag END,
       transcript = NULL, summary = NULL, recording_url = NULL, updated_at = now()
FROM unnest($2::text[], $3::text[]) AS t(id, tag)
WHERE vapi_calls.tenant = $1 AND vapi_calls.conversation_id = t.id
  AND (vapi_calls.customer_number <> t.tag OR vapi_calls.transcript IS NOT NULL OR vapi_calls.summary IS NOT NULL
       OR vapi_calls.recording_url IS NOT NULL)
  AND ($4::timestamptz IS NULL OR vapi_calls.created_at < $4)
"""

# A WhatsApp conversation's id is ``wa:<phone_number_id>:<wa_id>`` and its ``wa_id`` is the
# customer's number. Its message records stay (delivery statuses, counts) with the tag as both
# their conversation and their customer, so they still belong together; a status Meta sends later
# for one of them finds it by its wamid and updates its status only (``channels.whatsapp.store.
# record_status``), so it cannot bring the number back. By index (``whatsapp_messages_conv``).
# Their words go here too: ``forget_copies`` cleared them a few statements before, and a record
# committed in between by a writer that takes no erasure lock (a customer's message; before the
# erasure took its lock first, a reply whose deliverer died before its post-send check) was tagged
# with its words, where no later erasure of the id finds them.
# ($1 tenant, $2 the conversations' ids, $3 their tags, $4 a time or NULL)
_WA_MESSAGES = """
UPDATE whatsapp_messages SET conversation_id = t.tag, wa_id = t.tag, body = NULL, updated_at = now()
FROM unnest($2::text[], $3::text[]) AS t(id, tag)
WHERE whatsapp_messages.tenant = $1 AND whatsapp_messages.conversation_id = t.id
  AND ($4::timestamptz IS NULL OR whatsapp_messages.created_at < $4)
"""
# The channel's state of the conversation (the agent answering it, the customer's last message,
# which opens the 24-hour window for free-form sends; the number, as the key) is deleted, not
# tagged: a customer who writes again starts a new conversation, as after any erasure, with a
# window of its own; nothing is sent from the old state (a human's reply to the erased
# conversation's escalation finds no conversation, the escalation is resolved anyway: below). By
# index (``whatsapp_conversations_cid``). A retention deletes only a state silent since its cutoff.
_WA_CONVERSATIONS = """
DELETE FROM whatsapp_conversations
WHERE tenant = $1 AND conversation_id = ANY($2::text[])
  AND ($3::timestamptz IS NULL OR coalesce(last_inbound_at, created_at) < $3)
"""
# The conversation's escalations stay for the human team's statistics (lifecycle, SLAs, outcome:
# their words are gone already, ``runtime.conversations.forget_copies``) with the tag as their
# conversation. One still open is resolved (outcome ``erased``): there is no conversation left to
# answer, its hold would keep a customer who writes again from being answered, and a second open
# one of the same tag (the customer came back, escalated and was erased again) would break the
# one-open-escalation-per-conversation index. By index (``escalations_tenant_agent_conversation``).
# The open ones resolved are returned (their holds in Redis are the caller's to release). Their
# words go here too (as the WhatsApp records' above): one opened by a turn in flight between
# ``forget_copies`` and here was tagged with the customer's words.
# ($1 tenant, $2 the agents' ids, $3 the conversations' ids, $4 their tags, $5 a time or NULL)
_ESCALATIONS = """
WITH old AS (
    SELECT e.id, e.agent_id, e.conversation_id, e.status, t.tag FROM escalations e
    JOIN unnest($3::text[], $4::text[]) AS t(id, tag) ON e.conversation_id = t.id
    WHERE e.tenant = $1 AND e.agent_id = ANY($2::text[]) AND ($5::timestamptz IS NULL OR e.created_at < $5)
    FOR UPDATE OF e
)
UPDATE escalations e SET conversation_id = old.tag, updated_at = now(),
    question = NULL, draft = NULL, corrected_answer = NULL, context = '{}'::jsonb,
    status = 'resolved', resolved_at = coalesce(e.resolved_at, now()), lease_until = NULL,
    resolved_by = CASE WHEN old.status <> 'resolved' THEN 'erasure' ELSE e.resolved_by END,
    outcome = CASE WHEN old.status <> 'resolved' THEN 'erased' ELSE e.outcome END
FROM old WHERE e.id = old.id AND e.tenant = $1
RETURNING old.agent_id, old.conversation_id, e.id, old.status <> 'resolved' AS was_open
"""


async def retag(
    conn: asyncpg.Connection,
    tenant: str,
    agent_ids: list[str],
    external_ids: list[str],
    before=None,
    key: bytes | None = None,
) -> list[tuple[str, str, str]]:
    """The conversations' runs (of these agents) and ledger rows (of the tenant) hold their tags
    instead of their ids, their VAPI calls' records instead of their callers' numbers, and their
    WhatsApp message records instead of their ids and customers' numbers; their WhatsApp
    conversation states are deleted; their escalations (of these agents) hold the tags, those open
    resolved; the calls' words cleared, the messages' and escalations' cleared again
    (``forget_copies`` ran a few statements before: what was stored in between is seen here);
    inside the caller's transaction; ``before`` (a datetime): only rows older (a retention's
    cutoff). Repeating it changes nothing. The escalations it resolved, as
    (agent id, conversation id, escalation id): their holds (``runtime.hitl.held``) to release."""
    tags = [conversation_tag(tenant, c, key) for c in external_ids]
    await conn.execute(_RUNS, tenant, agent_ids, external_ids, tags, before)
    await conn.execute(_LEDGER, tenant, external_ids, tags, before)
    await conn.execute(_CALLS, tenant, external_ids, tags, before)
    await conn.execute(_WA_MESSAGES, tenant, external_ids, tags, before)
    await conn.execute(_WA_CONVERSATIONS, tenant, external_ids, before)
    rows = await conn.fetch(_ESCALATIONS, tenant, agent_ids, external_ids, tags, before)
    return [(r["agent_id"], r["conversation_id"], r["id"]) for r in rows if r["was_open"]]


DEAD_PAGE = 200  # dead letters read per call


async def retag_dead_letters(
    redis, dead_streams: tuple[str, ...], tenant: str, external_ids: list[str], key: bytes | None = None
) -> int:
    """The dead letters of the runs and ledger writers (records PostgreSQL refused, kept in
    ``<stream>:dead``, whole but for a prompt) that name the conversations hold their tags instead,
    as the rows written do: each such letter is added again rewritten (a new id, the same fields)
    and the old one deleted. Read ``DEAD_PAGE`` at a time (a stream keeps at most 10,000). The
    number rewritten. A crash between the two leaves the old letter too: the next erasure or
    retention of the id rewrites it (the rewritten one no longer names it)."""
    ids = set(external_ids)
    rewritten = 0
    for dead in dead_streams:
        start = "-"
        while page := await redis.xrange(dead, min=start, max="+", count=DEAD_PAGE):
            start = "(" + _text(page[-1][0])
            for entry_id, fields in page:
                raw = fields.get(b"r")
                rec = _retagged(raw, tenant, ids, key) if raw else None
                if rec is None:
                    continue
                async with redis.pipeline(transaction=True) as pipe:
                    pipe.xadd(dead, {**fields, b"r": orjson.dumps(rec)})
                    pipe.xdel(dead, entry_id)
                    await pipe.execute()
                rewritten += 1
    return rewritten


def retag_dead_file(path: Path, tenant: str, external_ids: list[str], key: bytes | None = None) -> int:
    """The ledger's spooled records PostgreSQL refused (``path``: ``ledger-dead.jsonl`` in this
    replica's data directory, one record a line) that name the conversations hold their tags
    instead, as ``retag_dead_letters`` does in Redis: the file is rewritten (a new file renamed
    over it) under the lock its appends take (``core.locked_lines``), so none is lost. Blocking
    file work: run it in a thread. The number rewritten."""
    ids = set(external_ids)

    def change(line: bytes) -> bytes | None:
        rec = _retagged(line, tenant, ids, key) or _cut_retagged(line, tenant, ids, key)
        return orjson.dumps(rec) if rec is not None else None

    return locked_lines.rewrite(path, change)


def _retagged(raw: bytes, tenant: str, ids: set[str], key: bytes | None) -> dict | None:
    """A record (a run, a ledger row) of one of the tenant's conversations ``ids`` with its tag in
    place of the id, and of its end user and customer when they are its party
    (``names_party``); None when it names none of them."""
    rec = conversation_record(raw)
    conv = rec.get("conversation_id") if rec is not None else None
    if rec is None or rec.get("tenant") != tenant or not isinstance(conv, str) or conv not in ids:
        return None
    tag = conversation_tag(tenant, conv, key)
    tag_parties(rec, conv, tag)
    rec["conversation_id"] = tag
    return rec


def _cut_retagged(raw: bytes, tenant: str, ids: set[str], key: bytes | None) -> dict | None:
    """The dead letter of a record a crash cut short (``policies.ledger._dead``: its text kept as
    ``unparsable``) with the conversation's tag in place of that text when the text names the
    tenant and one of its conversations ``ids``: the whole id, or, as its end user or customer, the
    last part a WhatsApp id ends with (the customer's number; a cut before the id leaves it).
    None otherwise."""
    if b'"unparsable"' not in raw:
        return None
    try:
        rec = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    text = rec.get("unparsable") if isinstance(rec, dict) else None
    if not isinstance(text, str) or f'"tenant":{orjson.dumps(tenant).decode()}' not in text:
        return None
    for conv in ids:
        last = orjson.dumps(conv.rsplit(":", 1)[-1]).decode()
        party = conv.count(":") and any(f'"{field}":{last}' in text for field in PARTY_FIELDS)
        if orjson.dumps(conv).decode()[:-1] in text or party:
            rec["unparsable"] = conversation_tag(tenant, conv, key)
            return rec
    return None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
