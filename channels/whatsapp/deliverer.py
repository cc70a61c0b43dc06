"""Delivering a message to a conversation this channel owns, outside a turn: a human's reply to
an escalation, a held reply released. The composition wraps this as runtime/delivery.py's
``Deliverer`` (channels do not import the runtime): ``deliver`` answers None for a conversation
that is not in this channel's own table (never judged by the id's prefix), else (status,
detail): ``sent`` (a wamid), ``held`` (outside the window, no template), ``queued`` (throttled
or Graph unavailable: it goes on the conversation's queue), ``failed``."""

from __future__ import annotations

import hashlib
import logging

from channels.config import WhatsAppAccount
from channels.whatsapp import store
from channels.whatsapp.graph import GraphError, GraphUnreachable
from channels.whatsapp.sender import Sender
from channels.whatsapp.worker import conversation_key
from core.queue import Fatal, Queue, Retry

log = logging.getLogger("channels.whatsapp")
MAX_TEXT = 16 * 1024


class WhatsAppDeliverer:
    def __init__(self, accounts: dict[str, WhatsAppAccount], pool, sender: Sender, inbound: Queue) -> None:
        self.accounts = accounts
        self.pool = pool
        self.sender = sender
        self.inbound = inbound

    async def deliver(self, message) -> tuple[str, str | None] | None:
        conv = await store.find_conversation(self.pool, message.tenant, message.conversation_id, self.accounts)
        if conv is None:
            return None
        acct = self.accounts.get(conv.account)
        if acct is None or acct.tenant != message.tenant:
            return ("failed", "the WhatsApp account is not configured")
        text = str(message.text)[:MAX_TEXT]
        # Idempotent per (conversation, what it answers, the words): the same reply delivered
        # again is not sent twice, but a person's second reply in one escalation (same ref) and
        # the same words to another customer are messages of their own.
        digest = hashlib.sha256(f"{conv.conversation_id}|{message.ref or ''}|{text}".encode()).hexdigest()[:32]
        key = f"deliver:{message.kind}:{digest}"
        try:
            out = await self.sender.send_text(acct, conv, key, text, kind=message.kind)
        except (Retry, GraphError, GraphUnreachable) as exc:
            if isinstance(exc, GraphError) and exc.kind == "client":
                return ("failed", f"graph refused the message: code {exc.code}")
            payload = {
                "kind": "send",
                "account": conv.account,
                "tenant": acct.tenant,
                "pnid": conv.pnid,
                "wa_id": conv.wa_id,
                "text": text,
                "purpose": message.kind,
                "idempotency": key,
            }
            await self.inbound.enqueue(payload, key=conversation_key(conv.account, conv.pnid, conv.wa_id))
            return ("queued", None)
        except Fatal as exc:
            return ("failed", str(exc)[:200])
        if out.held:
            return ("held", "outside the 24-hour window and no window template")
        if out.template:
            return ("sent", out.sent[0] if out.sent else None)
        return ("sent", out.sent[0] if out.sent else None)
