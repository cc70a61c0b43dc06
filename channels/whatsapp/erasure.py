"""What an erasure or a retention of WhatsApp conversations deletes in the channel's own stores
(its PostgreSQL records lose their words through ``runtime.conversations.forget_copies`` and the
customer's number through ``runtime.erased_records.retag``): the inbound and status queues' dead
letters of the conversations (``dead_letters``), the send states of their turns and sends in
Redis and the aliases of their customers' numbers (``sender.forget_states``: a turn's holds the
agent's answer, kept 8 days so that a retry sends it again rather than asking anew; those an older
release kept unindexed are found by the conversation's inbound messages, ``forget_older_states``,
which the erasure and the retention call before their transaction takes the id off those
records), and the customer's documents, audio and images kept under the data directory
(``content.forget_media``). For the tenant named only; ids
of other channels are passed over. Needs no account configured in this process: Redis
and the data directory the channel's worker shares, and the channel's records in PostgreSQL.

An erasure (not a retention) also marks each conversation erased (``mark_erased``, first, and
before the erasure's transaction too): the worker drops the jobs queued up to the mark (a customer's message, a send
to them) instead of storing the conversation again after its erasure, and a turn that was under
way when the mark came neither sends nor keeps what it stored (``erased_since``). Every send to
a customer (a turn's answer, an admin's send, a human's reply, a window template; sent, failed or
of unknown outcome) reads the mark again once it is over (``after_send``): one that was under way
when the erasure came keeps nothing of what it wrote.
"""

from __future__ import annotations

from pathlib import Path

from channels.whatsapp import dead_letters, store
from channels.whatsapp.content import forget_media
from channels.whatsapp.sender import (
    FORGET_PAGE,
    STATE_TTL,
    forget_states,
    forget_states_of,
    index_key_of,
    sent_wamids,
    state_key,
)
from channels.whatsapp.store import conversation_digest, digest_of, digests
from core.erasure_key import TAG_PREFIX, is_legacy_name, mark_micros

ERASED_TTL = STATE_TTL  # a job queued before an erasure is dropped for this long after it

MAX_OLDER_TURNS = 10_000  # inbound messages of the last 8 days read per erasure (their turns' states)

# The turns of the conversations' inbound messages recent enough for a send state to be left
# (``whatsapp_messages_conv``: tenant, conversation, time).
_RECENT_INBOUND = """
SELECT account, wamid FROM whatsapp_messages
WHERE tenant = $1 AND conversation_id = ANY($2::text[]) AND direction = 'in' AND wamid IS NOT NULL
  AND created_at > now() - make_interval(secs => $3)
LIMIT $4
"""


def erased_key(tenant: str, conversation: str) -> str:
    """The conversation's erasure mark: named by its keyed digest (``store.conversation_digest``),
    never a plain hash of its id (which gives the customer's number back)."""
    return erased_key_of(conversation_digest(tenant, conversation))


def erased_key_of(digest: str) -> str:
    """``erased_key`` of the conversation ``store.conversation_digest`` names ``digest``."""
    return f"gw:{{gw}}:wa:erased:{digest}"


# KEYS: the conversations' marks. ARGV: ttl. Each mark holds Redis's time ("seconds.µs").
_MARK = """
local t = redis.call('TIME')
local now = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
for _, k in ipairs(KEYS) do redis.call('SET', k, now, 'EX', ARGV[1]) end
return now
"""


async def mark_erased(redis, tenant: str, conversations: list[str]) -> None:
    """The conversations' jobs queued up to now are the erased conversation's (``ERASED_TTL``).
    The mark is Redis's time, the clock a job's ``queued_us`` is on (``core.queue``): a process
    whose clock is off neither drops a message queued after the erasure nor keeps one before."""
    ours = [c for c in dict.fromkeys(conversations) if c.startswith(dead_letters.PREFIX)]
    for i in range(0, len(ours), FORGET_PAGE):
        keys = [erased_key(tenant, c) for c in ours[i : i + FORGET_PAGE]]
        await redis.eval(_MARK, len(keys), *keys, ERASED_TTL)


async def mark_us(redis, tenant: str, conversation: str) -> int | None:
    """The conversation's erasure mark (µs, Redis's clock: when its last erasure began); None:
    not erased in the last ``ERASED_TTL``. Read under the name an older release gave it as well
    (one round trip): a mark it wrote that ``names.upgrade`` has not renamed yet (a replica of it
    still running during an upgrade) refuses what was queued before it all the same."""
    return _latest(await redis.mget([erased_key_of(d) for d in digests(tenant, conversation)]))


def _latest(marks: list) -> int | None:
    found = [mark_micros(m) for m in marks if m is not None]
    return max(found) if found else None


async def erased_since(redis, tenant: str, conversation: str, queued_us: int) -> bool:
    """Whether the conversation was erased after a job of it was queued (``Job.queued_us``: µs on
    Redis's clock). A job queued in the mark's very microsecond counts as queued before (erased):
    the two happened together, and a turn under way when an erasure ran is the erased one's."""
    mark = await mark_us(redis, tenant, conversation)
    return mark is not None and queued_us <= mark


async def redis_now_us(redis) -> int:
    """Redis's time in µs: the clock an erasure's mark is on. A send outside the queue (a human's
    reply) takes it before it checks what it answers, as a job's ``queued_us`` is taken."""
    seconds, micros = await redis.time()
    return int(seconds) * 1_000_000 + int(micros)


async def after_send(redis, pool, tenant: str, conversation: str, queued_us: int | None, wamids: list[str]) -> bool:
    """The check every send path makes once its send is over (sent, failed or unknown): whether
    the conversation was erased since the send was asked for (``queued_us``, Redis's clock; None:
    nothing to check). If so, what the send wrote after the erasure goes as the erasure's own
    did: its records (``wamids``, and the conversation's sends recorded without one) keep neither
    words nor the number (the tag), the channel state it wrote is deleted (the conversation's row,
    the send states and aliases in Redis). The caller then keeps nothing of it either (no retry,
    no dead letter naming the number). True: erased."""
    if redis is None or queued_us is None or not await erased_since(redis, tenant, conversation, queued_us):
        return False
    # (with the pieces the conversation's send states hold: a send that failed after its first
    # pieces went out passes none of their wamids, and their records hold the words and the number)
    sent = list(wamids)
    for digest in digests(tenant, conversation):
        sent += await _state_wamids(redis, index_key_of(digest))
    await store.forget_turn_words(pool, tenant, conversation, list(dict.fromkeys(sent)), unnumbered=True)
    await forget_states(redis, tenant, [conversation])
    return True


async def after_noted_send(
    redis, pool, tenant: str, account: str, digest: str, hashed: str, queued_us: int, wamids: list[str]
) -> bool:
    """``after_send`` of a send known by its in-flight note (``inflight``), which names its
    conversation by ``store.conversation_digest`` (``digest``: what its Redis keys are named by)
    and ``core.erasure_key.conversation_hash`` (``hashed``: its erasure's tag), never by its id
    (the customer's number). Its records (``wamids`` of ``account``, and those of the
    conversation's send states) hold the tag, without words; its send states and aliases go.
    (A record of it without a wamid, and one written after the erasure, were written as the
    erasure's in the first place: ``store.OutboundRecords``, the send's ``asked_us``; a person's
    reply writes no channel state of the conversation.) True: erased."""
    names = [digest_of(digest), digest] if is_legacy_name(digest) else [digest]  # (an older release's note)
    mark = _latest(await redis.mget([erased_key_of(d) for d in names]))
    if mark is None or queued_us > mark:
        return False
    sent = list(wamids)
    for name in names:
        sent += await _state_wamids(redis, index_key_of(name))
    await store.forget_sent_words(pool, tenant, account, list(dict.fromkeys(sent)), TAG_PREFIX + hashed)
    await forget_states_of(redis, names)
    return True


async def _state_wamids(redis, index: str) -> list[str]:
    """The wamids of the pieces a conversation's send states hold (``index``: its
    ``sender.index_key``; the erasure deleted those before it, so these are the sends that raced
    it), a page at a time."""
    found: list[str] = []
    cursor = 0
    while True:
        cursor, keys = await redis.sscan(index, cursor, count=FORGET_PAGE)
        if keys:
            pipe = redis.pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(key)
            for state in await pipe.execute():
                found += sent_wamids({_text(f): _text(v) for f, v in (state or {}).items()})
        if not int(cursor):
            return found


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


async def forget(redis, data_dir: Path, pool, tenant: str, conversations: list[str], *, mark: bool = False) -> None:
    """Redis first (its failure is the caller's: the erasure is repeated), then the files.
    ``mark``: an erasure's (``mark_erased``), not a retention's."""
    if mark:
        await mark_erased(redis, tenant, conversations)
        # (a note an older release wrote names the conversation: it names its hashes from now on)
        from channels.whatsapp import inflight  # (inflight runs this module's checks: imported here)

        await inflight.neutralise(redis, tenant, conversations)
    await dead_letters.drop(redis, tenant, conversations)
    ours = [c for c in conversations if c.startswith(dead_letters.PREFIX)]
    await forget_states(redis, tenant, ours)
    if pool is not None and ours:
        await forget_older_states(redis, pool, tenant, ours)
    await forget_media(data_dir, tenant, conversations)


async def forget_older_states(redis, pool, tenant: str, conversations: list[str]) -> int:
    """The send states an older release kept without the conversation's index (``forget_states``
    finds those kept since): a turn's key is its first message's wamid, so the states of the
    conversations' inbound messages of the last ``STATE_TTL`` (a turn's answer, and the window
    templates that carried it) are deleted; the number of keys deleted."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(_RECENT_INBOUND, tenant, conversations, float(STATE_TTL), MAX_OLDER_TURNS)
    keys = [state_key(r["account"], f"{kind}:{r['wamid']}") for r in rows for kind in ("turn", "windowfail")]
    deleted = 0
    for i in range(0, len(keys), FORGET_PAGE):
        deleted += int(await redis.delete(*keys[i : i + FORGET_PAGE]))
    return deleted
