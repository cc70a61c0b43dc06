"""The inbound queue's dead letters of a conversation, found by a tag, for an erasure or a retention.

A ``wa-inbound`` job that died after its last retry stays in the queue's dead letters
(``core.queue``) for an admin to replay: an inbound job holds the customer's message and number,
a send job the words sent to them. Each dead letter is tagged with its conversation (``tag``:
the tenant and the conversation id, hashed with the deployment's key) when it dies, and those an
older release left untagged get their tags from their jobs once (``core.dead_tags.tag_older``);
the gateway's erasure and retention drop a conversation's letters by that tag (``drop``), for its
tenant only (and by the plain hash an older release tagged them with: ``legacy_tag``).

``wa-status`` dead letters (a message's delivery status: its wamid and its recipient's number,
never words) are tagged and dropped the same way: the channel's records of an erased conversation
no longer keep the number either (``runtime.erased_records``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from channels.config import WhatsAppAccount
from channels.whatsapp.store import conversation_id
from channels.whatsapp.worker import INBOUND, STATUS
from core.erasure_key import name_hash
from core.queue import Queue

PREFIX = "wa:"


def tag(tenant: str, conversation: str) -> str:
    """One conversation of a tenant, hashed with the deployment's key (its id holds the customer's
    number, which a plain hash gives back: ``core.erasure_key.name_hash``)."""
    return name_hash("gw-wa-dead", f"{tenant}\x00{conversation}")


def legacy_tag(tenant: str, conversation: str) -> str:
    """``tag`` as an older release made it (a plain hash): the letters it tagged are dropped by it.
    (Such a tag is kept only beside its letter, which holds the number itself, and goes with it.)"""
    return hashlib.blake2b(f"{tenant}\x00{conversation}".encode(), digest_size=16).hexdigest()


def dead_tag(accounts: dict[str, WhatsAppAccount]) -> Callable[[dict], str | None]:
    """The tag of a dead ``wa-inbound`` or ``wa-status`` job (``Queue(dead_tag=...)``): its tenant and its
    conversation (a send naming one, else its number's). The tenant is the one the job was queued
    for (``tenant`` in its payload, written by whoever queued it: an account removed from the
    config, or moved to another tenant, dies with every job it had queued, and those letters are
    still its tenant's to erase), else, for a job an older release queued, its account's as
    configured now. None for such an older job of an account no longer configured, or a job that
    names no customer."""

    def of(message: dict) -> str | None:
        payload = message.get("payload")
        if not isinstance(payload, dict):
            return None
        tenant = payload.get("tenant")
        if not (isinstance(tenant, str) and tenant):
            account = payload.get("account")
            acct = accounts.get(account) if isinstance(account, str) else None
            if acct is None:
                return None
            tenant = acct.tenant
        named = payload.get("conversation_id")
        if isinstance(named, str) and named.startswith(PREFIX):
            return tag(tenant, named)
        pnid, wa_id = payload.get("pnid"), payload.get("wa_id")
        if not (isinstance(pnid, str) and isinstance(wa_id, str)):
            return None
        return tag(tenant, conversation_id(pnid, wa_id))

    return of


async def drop(redis, tenant: str, conversations: list[str]) -> int:
    """Drops the ``wa-inbound`` and ``wa-status`` dead letters of the tenant's conversations (ids of
    other channels are passed over); the number dropped. Needs no account configured in this
    process: only the queues' keys in Redis."""
    ours = [c for c in conversations if c.startswith(PREFIX)]
    tags = {f(tenant, c) for c in ours for f in (tag, legacy_tag)}
    if not tags:
        return 0
    return sum([await Queue(redis, name).drop_dead_tagged(tags) for name in (INBOUND, STATUS)])
