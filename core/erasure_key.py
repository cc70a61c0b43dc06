"""The key of what an erasure leaves behind: a conversation's id kept only as a keyed hash.

An erased conversation is recorded (``erased_conversations``), and the run records and audit
ledger rows that named it keep a tag in its place, so that rows of one erased conversation still
belong together. Both are ``HMAC-SHA256(key, tenant NUL id)``: a phone number's plain hash is
undone by hashing every number, a keyed one is not without the key, and the tenant in it keeps
one tenant's tags from matching another's.

The key is the deployment's, never in the database: ``GATEWAY_ERASURE_KEY`` when set; else
derived from ``GATEWAY_MASTER_KEY``, which every replica of a deployment shares (``gateway
serve`` writes one to the data directory on a fresh machine); else a key kept in the data
directory (``erasure.key``, made once). Rotating the master key without setting
``GATEWAY_ERASURE_KEY`` changes the tags from then on: set it to keep them.

The same key names what stands for a customer's number in Redis and on disk (``name_hash``: a
WhatsApp conversation's erasure mark, send-state and alias indexes, media folder, in-flight
notes, a hold, a dead letter's tag): a key that changes orphans those names (an erasure no longer
finds what was written under the old ones), so every process of a deployment must share it, and
one that does not says so in its log (``same_key_as_deployment``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import logging
import os
import re
import secrets
from pathlib import Path

import asyncpg
import orjson

from core.errors import ServiceUnavailable

ENV = "GATEWAY_ERASURE_KEY"
TAG_PREFIX = "erased:"
_FILE = "erasure.key"

_cache: dict[tuple[str, str, str], bytes] = {}
log = logging.getLogger("gateway.erasure")


def erasure_key() -> bytes:
    """This process's key (read once for the environment it has)."""
    env = os.environ
    source = (env.get(ENV, ""), env.get("GATEWAY_MASTER_KEY", ""), env.get("GATEWAY_DATA_DIR", "./.data"))
    key = _cache.get(source)
    if key is None:
        key = _cache[source] = _key(*source)
    return key


def _key(own: str, master: str, data_dir: str) -> bytes:
    if own:
        return own.encode()
    if master:
        return hmac.new(master.encode(), b"gateway-erasure-key:v1", hashlib.sha256).digest()
    return _file_key(Path(data_dir).resolve() / _FILE)


def _file_key(path: Path) -> bytes:
    """The data directory's key, made by the first process that needs it (the others read it)."""
    with contextlib.suppress(FileNotFoundError):
        if value := path.read_text().strip():
            return value.encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    try:
        os.link(tmp, path)  # (whole or not at all: another process may be making it too)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_text().strip().encode()


def conversation_hash(tenant: str, external_id: str, key: bytes | None = None) -> str:
    """How an erased conversation's id is kept (64 hex characters)."""
    return _keyed_hash(tenant, external_id, key if key is not None else erasure_key())


# Each agent turn of a conversation is hashed three times, by the writers that look its records up
# among the erasures (its run, its ledger row, its memory turn), and an HMAC through Python's
# ``hmac`` module costs ~25k instructions: the most recent hashes are kept. The key is part of the
# cache's key (a rotated key never gets a hash made with the old one), and ``typed`` keeps values
# that compare equal but format differently (1 and True) apart.
@functools.lru_cache(maxsize=1024, typed=True)
def _keyed_hash(tenant: str, external_id: str, key: bytes) -> str:
    msg = f"{tenant}\x00{external_id}".encode("utf-8", "surrogatepass")
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


# Names of Redis keys and folders that stand for something holding a customer's number (a
# WhatsApp conversation id ``wa:<pnid>:<number>``): a plain hash of it is undone by hashing every
# number (a phone number is one of few enough values to try them all in seconds), a keyed one is
# not without the key. ``name_hash`` is BLAKE2b keyed with a key of its own, derived from the
# erasure key (one C call, not an HMAC through Python's ``hmac``), and ``label`` keeps the names of
# different things apart. The names change with the erasure key, as the tags do.
NAME_PREFIX = "k"  # every such name starts with it: a name an older release made (plain hex) never does


def is_legacy_name(name: str) -> bool:
    """Whether a name is one an older release made (32 plain hex digits; ours start with
    ``NAME_PREFIX``)."""
    return len(name) == 32 and all(c in "0123456789abcdef" for c in name)


# Renaming a Redis key an older release named. KEYS: its key, ours. The old one's value goes
# under our name unless ours is set (then ours is the newer: written by this release); the old
# one goes either way (its time to live goes with a RENAME).
RENAME_UNLESS_SET = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('DEL', KEYS[1]) else redis.call('RENAME', KEYS[1], KEYS[2]) end
return 1
"""


@functools.lru_cache(maxsize=8)
def _name_key(key: bytes) -> bytes:
    return hmac.new(key, b"gateway-names:v1", hashlib.sha256).digest()


def name_hash(label: str, value: str, key: bytes | None = None) -> str:
    """A name (``NAME_PREFIX`` and 32 hex characters) for ``value`` that does not give it back
    without the deployment's erasure key; the same value with another ``label``, another name."""
    digest = hashlib.blake2b(
        value.encode("utf-8", "surrogatepass"),
        digest_size=16,
        key=_name_key(key if key is not None else erasure_key()),
        person=label.encode()[:16],
    )
    return NAME_PREFIX + digest.hexdigest()


KEY_CHECK = "gw:{gw}:erasure-key-check"  # the name_hash of nothing, by the first process's key


async def same_key_as_deployment(redis) -> bool:
    """Whether this process names things with the key the deployment's other processes use: the
    first to ask leaves its ``name_hash`` of nothing in Redis (it gives no key back), every later
    one compares. A process with another key (run apart without ``GATEWAY_ERASURE_KEY`` nor
    ``GATEWAY_MASTER_KEY``, or after a rotation of the master key) names a conversation's keys
    and folders differently: an erasure by the others does not find what it writes, and it does not
    find the others' erasure marks. Said in the log, loudly (the key is then to be shared, or, after
    a deliberate rotation, ``KEY_CHECK`` deleted)."""
    mine = name_hash("gw-key-check", "")
    await redis.set(KEY_CHECK, mine, nx=True)
    found = await redis.get(KEY_CHECK)
    found = found.decode() if isinstance(found, bytes) else found
    if found is None or found == mine:
        return True
    log.error(
        "this process's erasure key is not the one the deployment's names were made with: what it "
        "writes escapes the others' erasures (set GATEWAY_ERASURE_KEY or GATEWAY_MASTER_KEY as on the "
        "other replicas; after a deliberate rotation delete %s)",
        KEY_CHECK,
    )
    return False


def mark_micros(mark: bytes | str) -> int:
    """An erasure's time as Redis keeps it ("seconds.fraction": Redis's ``TIME``; an older
    release's ``repr(time.time())``) in µs, exactly (no float in between): the channel's mark and
    the memory's ``:erased:at`` alike."""
    whole, _, frac = (mark.decode() if isinstance(mark, bytes) else mark).partition(".")
    return int(whole) * 1_000_000 + int((frac + "000000")[:6])


def conversation_tag(tenant: str, external_id: str, key: bytes | None = None) -> str:
    """What replaces the id in the rows kept after its erasure (runs, ledger)."""
    return TAG_PREFIX + conversation_hash(tenant, external_id, key)


# A VAPI call's conversation (``vapi:<call id>``) does not hold its caller's number, but its turns
# and its call's record name them: as the number (E.164, as ``channels.vapi`` accepts it), as
# the keyed pseudonym of an account that does not attribute its callers
# (``channels.vapi.llm.end_user``: ``vapi-caller:<24 hex>``), or, on a web call, as the call.
# In that conversation's rows those are its caller. (Kept here, beside the rest of the rule: the
# kernel imports no channel; a test pins them to the channel's.)
CALL_PREFIX = "vapi:"
_CALLER = re.compile(r"\+[1-9][0-9]{6,14}|vapi-caller:[0-9a-f]{24}")
_CALLER_SQL = "^([+][1-9][0-9]{6,14}|vapi-caller:[0-9a-f]{24})$"


def names_party(conversation: str, value: object) -> bool:
    """Whether a ledger row's end user or customer is the conversation's party: its own id or its
    last part (a WhatsApp id ``wa:<pnid>:<wa_id>``'s customer), or, in a VAPI call's conversation,
    its caller (a number, the channel's pseudonym of one, the web call itself): an erasure tags it
    then. Never a value the id merely contains (an end user "1"), nor an empty one.
    ``names_party_sql`` says the same."""
    if not isinstance(value, str) or value == "":
        return False
    if value == conversation or conversation.endswith(":" + value):
        return True
    if not conversation.startswith(CALL_PREFIX):
        return False
    return _CALLER.fullmatch(value) is not None or value == "vapi-call:" + conversation[len(CALL_PREFIX) :]


PARTY_FIELDS = ("user", "customer")  # a record's (ledger row's) end user and customer


def tag_parties(record: dict, conversation: str, tag: str) -> None:
    """The record's end user and customer become ``tag`` where they are the conversation's party
    (``names_party``)."""
    for field in PARTY_FIELDS:
        if names_party(conversation, record.get(field)):
            record[field] = tag


def names_party_sql(conversation: str, value: str) -> str:
    """``names_party`` as a SQL condition on two text expressions."""
    suffix = f"right({conversation}, length({value}) + 1) = ':' || {value}"
    caller = (
        f"(left({conversation}, {len(CALL_PREFIX)}) = '{CALL_PREFIX}' AND ({value} ~ '{_CALLER_SQL}'"
        f" OR {value} = 'vapi-call:' || substr({conversation}, {len(CALL_PREFIX) + 1})))"
    )
    return f"({value} <> '' AND ({value} = {conversation} OR {suffix} OR {caller}))"


def conversation_record(raw: bytes) -> dict | None:
    """A stream record (JSON: a run, a ledger row) decoded, when it may name a conversation; None
    otherwise (most records: only an agent's turns hold a conversation id, so the rest are not
    decoded)."""
    if b'"conversation_id"' not in raw:
        return None
    try:
        rec = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) else None


def record_hash(record: bytes, key: bytes) -> str | None:
    """The keyed hash of the conversation a stream record names, None when it names none: what its
    writer looks the record up by among the erasures."""
    rec = conversation_record(record)
    if rec is None:
        return None
    conv, tenant = rec.get("conversation_id"), rec.get("tenant")
    if not isinstance(conv, str) or not isinstance(tenant, str):
        return None
    return conversation_hash(tenant, conv, key)


# The agent id under which an erasure of a conversation with every agent of its tenant is recorded
# (``erased_conversations``: a channel's customer's, ``runtime.conversations.erase_for_every_agent``);
# never an agent's own (``agt_…``). The memory and runs writers read it beside the agent's own.
EVERY_AGENT = "*"


# A batch of records naming conversations and an erasure of the same tenant exclude each other:
# each batch takes a shared lock for each tenant in it before it reads the erasures, the erasure
# its own, exclusive, before it records itself and rewrites the rows already written. Without it a
# batch that read the erasures before one committed wrote what it erased back after it. Tenants
# share ERASURE_LOCK_BUCKETS locks, so a batch of many tenants holds a bounded number of them.
ERASURE_LOCK_CLASS = 0x45524153  # (the two-key advisory locks of this class: "ERAS")
ERASURE_LOCK_BUCKETS = 64
LOCK_ERASURE = f"SELECT pg_advisory_xact_lock({ERASURE_LOCK_CLASS}, hashtext($1) & {ERASURE_LOCK_BUCKETS - 1})"
# One writer's shared lock of its tenant ($1), first thing in its transaction: a writer of a record
# an erasure rewrites, which the erasure must find committed or the writer must find erased (a VAPI
# call's record: its status updates, its end-of-call report). Such a writer must take no row an
# erasure locks before its own lock, and do nothing slow while it holds it.
LOCK_WRITE = f"SELECT pg_advisory_xact_lock_shared({ERASURE_LOCK_CLASS}, hashtext($1) & {ERASURE_LOCK_BUCKETS - 1})"

# A request or a webhook waits this long at most for it (``server.erasure_lock_wait_s``).
DEFAULT_LOCK_WAIT_S = 2.0
_WAIT_AT_MOST = "SELECT set_config('lock_timeout', $1, true)"
_WAIT_AS_BEFORE = "SET LOCAL lock_timeout TO DEFAULT"


class ErasureInProgress(ServiceUnavailable):
    """The tenant's erasure lock was not granted in time: nothing was written, try again."""

    default_code = "erasure_in_progress"


async def lock_write(conn: asyncpg.Connection, tenant: str, wait_s: float = DEFAULT_LOCK_WAIT_S) -> None:
    """``LOCK_WRITE`` for a request or a webhook: waited for at most ``wait_s`` (PostgreSQL's
    ``lock_timeout``, for this statement alone), else ``ErasureInProgress`` (503 with
    ``retry-after``; the transaction is aborted, nothing of it is kept). An erasure holds the
    lock for as long as it takes, and tenants share its buckets: a caller waiting on holds a
    pooled connection meanwhile, and enough of them would hold every tenant's."""
    await conn.execute(_WAIT_AT_MOST, f"{max(1, round(wait_s * 1000))}ms")
    try:
        await conn.execute(LOCK_WRITE, tenant)
    except asyncpg.exceptions.LockNotAvailableError:
        raise ErasureInProgress(
            "An erasure of conversations is in progress; nothing was stored, try again shortly.",
            headers={"retry-after": str(max(1, round(wait_s)))},
        ) from None
    await conn.execute(_WAIT_AS_BEFORE)


def lock_batch_tenants(table: str, where: str = "true") -> str:
    """The shared locks of the tenants of a batch's temporary table (its records in ``r``)."""
    return f"""
SELECT pg_advisory_xact_lock_shared({ERASURE_LOCK_CLASS}, b)
FROM (SELECT DISTINCT hashtext(r->>'tenant') & {ERASURE_LOCK_BUCKETS - 1} AS b FROM {table} WHERE {where}
      ORDER BY 1) buckets
"""
