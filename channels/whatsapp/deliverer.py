"""Delivering a message to a conversation this channel owns, outside a turn: a human's reply to
an escalation, a held reply released. The composition wraps this as runtime/delivery.py's
``Deliverer`` (channels do not import the runtime): ``deliver`` answers None for a conversation
that is not in this channel's own table (never judged by the id's prefix), else (status,
detail): ``sent`` (a wamid), ``held`` (outside the window, no template), ``queued`` (throttled
or Graph unavailable: it goes on the conversation's queue), ``failed``, ``erased``.

A message that carries when it was asked for (``queued_us``: µs on Redis's clock, a human's
reply) reads its conversation's erasure mark before it is sent and once the send is over
(``erasure.after_send``): erased since, it is not sent (``erased``: never reported as stored or
sent), and a send that was under way when the erasure came keeps nothing of what it wrote. Its
records are written as the erased conversation's in the first place (``Conversation.asked_us``,
``store.OutboundRecords``): a process killed between the send and that check left them naming
the customer, and nothing retries a person's reply. Nor did anything run its check: such a send
is noted before it goes (``inflight``) and its note deleted once the check has run; the channel's
workers run the check of a note whose lease (``lease_s``) ran out."""

from __future__ import annotations

import dataclasses
import hashlib
import logging

from channels.config import WhatsAppAccount
from channels.whatsapp import erasure, inflight, store
from channels.whatsapp.graph import GraphError, GraphUnreachable
from channels.whatsapp.sender import Sender
from channels.whatsapp.worker import conversation_key
from core.queue import Fatal, Queue, Retry

log = logging.getLogger("channels.whatsapp")
MAX_TEXT = 16 * 1024
DELIVERY_LEASE_S = 120.0  # a reply's send and its check: past this its process is taken for stopped
ERASED = ("erased", "the conversation was erased after the message was asked for; it was not sent")


class WhatsAppDeliverer:
    def __init__(
        self,
        accounts: dict[str, WhatsAppAccount],
        pool,
        sender: Sender,
        inbound: Queue,
        redis=None,
        lease_s: float = DELIVERY_LEASE_S,
    ) -> None:
        self.accounts = accounts
        self.lease_ms = int(lease_s * 1000)  # a send's note (``inflight``): how long it may take
        self.redis = redis  # the erasures' marks; None: none read
        self.pool = pool
        self.sender = sender
        self.inbound = inbound

    async def deliver(self, message) -> tuple[str, str | None] | None:
        queued = getattr(message, "queued_us", None)
        conv = await store.find_conversation(self.pool, message.tenant, message.conversation_id, self.accounts)
        # (read after the conversation's row: a row the erasure deleted meanwhile is no API
        # conversation to "store" the message in, and one it is about to delete is not sent to)
        if queued is not None and self.redis is not None:
            if await erasure.erased_since(self.redis, message.tenant, message.conversation_id, queued):
                return ERASED
        if conv is None:
            return None
        acct = self.accounts.get(conv.account)
        if acct is None or acct.tenant != message.tenant:
            return ("failed", "the WhatsApp account is not configured")
        if queued is not None:  # (its records are the erased conversation's if erased since: store)
            conv = dataclasses.replace(conv, asked_us=queued)
        text = str(message.text)[:MAX_TEXT]
        # Idempotent per (conversation, what it answers, the words): the same reply delivered
        # again is not sent twice, but a person's second reply in one escalation (same ref) and
        # the same words to another customer are messages of their own.
        digest = hashlib.sha256(f"{conv.conversation_id}|{message.ref or ''}|{text}".encode()).hexdigest()[:32]
        key = f"deliver:{message.kind}:{digest}"
        noted = None  # (killed between the send and its check: a channel worker runs the check)
        if queued is not None and self.redis is not None:
            noted = await inflight.note(
                self.redis, acct.tenant, conv.conversation_id, conv.account, key, queued, self.lease_ms
            )
        try:
            out = await self.sender.send_text(acct, conv, key, text, kind=message.kind)
        except (Retry, GraphError, GraphUnreachable, Fatal) as exc:
            erased = await self._after_send(conv, queued, [])
            await self._done(noted)
            if erased:  # (nor queued again: the customer is erased)
                return ERASED
            if isinstance(exc, Fatal):
                return ("failed", str(exc)[:200])
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
        # (it went out: what it wrote goes if the erasure came meanwhile; the admin is told it was sent)
        erased = await self._after_send(conv, queued, out.sent)
        await self._done(noted)
        if erased:
            log.info("whatsapp delivery to a conversation erased meanwhile: its records forgotten")
        if out.held:
            return ("held", "outside the 24-hour window and no window template")
        return ("sent", out.sent[0] if out.sent else None)

    async def _after_send(self, conv: store.Conversation, queued: int | None, wamids: list[str]) -> bool:
        return await erasure.after_send(self.redis, self.pool, conv.tenant, conv.conversation_id, queued, wamids)

    async def _done(self, noted: bytes | None) -> None:
        """The send's check has run: its note goes (best effort: a note left is checked again)."""
        if noted is not None:
            try:
                await inflight.done(self.redis, noted)
            except Exception as exc:
                log.warning("whatsapp delivery note not deleted: %s", type(exc).__name__)
