"""``/channels/whatsapp/{account}``: the verification handshake (GET) and notifications (POST).

A POST is read up to ``MAX_BODY`` bytes, its signature checked over the raw bytes with the
account's app secret (401 and nothing stored otherwise), parsed and bounded (normalize.py), and
each message or status queued, deduplicated on its wamid for the account. Nothing else happens
before the 200: no database, one Redis round trip per item.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from urllib.parse import parse_qs

import orjson

from channels.config import ACCOUNT_NAME, WhatsAppAccount
from channels.whatsapp import metrics, normalize, signature
from channels.whatsapp.worker import conversation_key
from core import http
from core.errors import (
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    ServiceUnavailable,
    Unauthenticated,
)
from core.queue import KeyBacklogFull, Queue, QueueFull
from core.queue import PayloadTooLarge as QueuePayloadTooLarge

log = logging.getLogger("channels.whatsapp")

PREFIX = "/channels/whatsapp/"
MAX_BODY = 1024 * 1024
DEDUPE_TTL = 8 * 86_400
MAX_BACKLOG = 100  # unanswered messages one conversation may have queued


class Webhook:
    def __init__(
        self, accounts: dict[str, WhatsAppAccount], inbound: Queue, statuses: Queue, max_backlog: int = MAX_BACKLOG
    ) -> None:
        self.accounts = accounts
        self.inbound = inbound
        self.statuses = statuses
        # One customer sending without pause while their turns wait must not grow the queue (and
        # Redis) message by message until every customer's notifications are refused: past this
        # many unanswered messages of a conversation, more are dropped (and counted), not queued.
        self.max_backlog = max_backlog

    def _account(self, path: str) -> tuple[str, WhatsAppAccount]:
        name = path[len(PREFIX) :].rstrip("/")
        acct = self.accounts.get(name) if ACCOUNT_NAME.match(name) else None
        if acct is None:
            raise NotFound("No such WhatsApp account.")
        return name, acct

    async def __call__(self, scope, receive, send, rid: str, crid: str | None) -> None:
        name, acct = self._account(scope["path"])
        if scope["method"] == "GET":
            await self._handshake(scope, send, acct, rid, crid)
        elif scope["method"] == "POST":
            await self._notification(scope, receive, send, name, acct, rid, crid)
        else:
            raise MethodNotAllowed("Use GET (verification) or POST (notifications).")

    async def _handshake(self, scope, send, acct: WhatsAppAccount, rid: str, crid: str | None) -> None:
        # bounded by its length (4 KB), not by a field count: parse_qs raises past max_num_fields
        query = parse_qs(scope.get("query_string", b"").decode("latin-1")[:4096])
        mode = (query.get("hub.mode") or [""])[0]
        token = (query.get("hub.verify_token") or [""])[0]
        challenge = (query.get("hub.challenge") or [""])[0]
        if mode != "subscribe" or not hmac.compare_digest(token.encode(), acct.verify_token.encode()):
            raise PermissionDenied("The verify token does not match.", code="verify_token_mismatch")
        if not challenge or len(challenge) > 256 or not challenge.isprintable():
            raise InvalidRequest("'hub.challenge' is missing or invalid.", param="hub.challenge")
        await http.send_bytes(send, 200, challenge.encode(), rid, content_type=b"text/plain", crid=crid)

    async def _notification(self, scope, receive, send, name: str, acct: WhatsAppAccount, rid, crid) -> None:
        raw = await http.read_body(scope, receive, MAX_BODY)
        if not signature.verify(acct.app_secret, raw, http.header(scope, b"x-hub-signature-256")):
            metrics.webhook.get(name, "bad_signature").inc()
            raise Unauthenticated("The X-Hub-Signature-256 signature does not match.", code="invalid_signature")
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            metrics.webhook.get(name, "invalid").inc()
            raise InvalidRequest("The body is not JSON.", code="invalid_json") from None
        try:
            parsed = normalize.parse(doc, name, acct.agent_for)
        except normalize.InvalidNotification as exc:
            metrics.webhook.get(name, "invalid").inc()
            raise InvalidRequest(
                f"Not a WhatsApp notification: {exc}.", param=exc.param, code="invalid_notification"
            ) from None
        # one conversation's messages in order; conversations (and statuses) side by side
        by_key: dict[str, list[dict]] = {}
        for msg in parsed.messages:
            msg["tenant"] = acct.tenant  # (its dead letter is the tenant's to erase: dead_letters.dead_tag)
            by_key.setdefault(conversation_key(name, msg["pnid"], msg["wa_id"]), []).append(msg)

        dropped = 0

        async def conversation(key: str, msgs: list[dict]) -> None:
            nonlocal dropped
            for msg in msgs:
                try:
                    await self.inbound.enqueue(
                        msg, key=key, dedupe=f"{name}:{msg['wamid']}", max_per_key=self.max_backlog
                    )
                except KeyBacklogFull:
                    dropped += 1

        async def status(st: dict) -> None:
            st["tenant"] = acct.tenant  # (its dead letter too)
            await self.statuses.enqueue(st, dedupe=f"{name}:{st['wamid']}:{st['status']}")

        work = [*(conversation(k, m) for k, m in by_key.items()), *(status(st) for st in parsed.statuses)]
        try:
            if len(work) == 1:  # the usual notification: one message (no task for it)
                await work[0]
            else:
                await asyncio.gather(*work)
        except QueueFull:
            metrics.webhook.get(name, "queue_full").inc()
            raise ServiceUnavailable("The message queue is full; retry later.") from None
        except QueuePayloadTooLarge:
            raise PayloadTooLarge("A message is too large.") from None
        metrics.webhook.get(name, "accepted").inc()
        if len(parsed.messages) > dropped:
            metrics.items.get(name, "message").inc(len(parsed.messages) - dropped)
        if dropped:
            metrics.items.get(name, "dropped").inc(dropped)
            log.warning(
                "whatsapp messages dropped: a conversation's backlog is full",
                extra={"fields": {"account": name, "n": dropped}},
            )
        if parsed.statuses:
            metrics.items.get(name, "status").inc(len(parsed.statuses))
        if parsed.skipped:
            metrics.items.get(name, "skipped").inc(parsed.skipped)
            log.info("whatsapp notification items skipped", extra={"fields": {"account": name, "n": parsed.skipped}})
        await http.send_bytes(send, 200, b'{"ok":true}', rid, crid=crid)
