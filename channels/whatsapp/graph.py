"""The Graph API calls the channel makes: send a message, mark one read, look up and download
media. Errors come back as ``GraphError`` with the meaning the channel acts on."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import aiohttp
import orjson

from channels.config import WhatsAppAccount
from channels.http import LeanPost, PooledSession, header_lines, read_capped
from core.h1 import H1Error

WINDOW_CLOSED = 131047  # re-engagement: free-form message outside the 24-hour window
THROUGHPUT = 130429  # the number's messages-per-second limit
PAIR_RATE = 131056  # too many messages to the same recipient in a short time
THROTTLE_CODES = {THROUGHPUT: 2.0, PAIR_RATE: 10.0, 4: 30.0, 80007: 30.0}
MAX_ANSWER = 64 * 1024
_WA_ID = re.compile(r"^[1-9][0-9]{6,31}\Z")


class GraphError(Exception):
    """A Graph API error answer; ``kind``: window | throttle | server | client."""

    def __init__(self, status: int, code: int | None, message: str = "") -> None:
        super().__init__(f"graph error {status} code {code}")
        self.status = status
        self.code = code
        self.detail = message[:200]

    @property
    def kind(self) -> str:
        if self.code == WINDOW_CLOSED:
            return "window"
        if self.code in THROTTLE_CODES or self.status == 429:
            return "throttle"
        if self.status >= 500 or self.code in (1, 2, 131000, 131016):
            return "server"
        return "client"

    @property
    def retry_after(self) -> float:
        return THROTTLE_CODES.get(self.code or 0, 5.0)


class GraphUnreachable(Exception):
    """No answer. ``sent_maybe``: the request may have reached Meta (a timeout after sending)."""

    def __init__(self, why: str, sent_maybe: bool) -> None:
        super().__init__(why)
        self.sent_maybe = sent_maybe


class MediaRefused(Exception):
    """A media file this channel will not fetch or keep (size, type, address)."""


class Graph(PooledSession):
    """Sends and mark-as-read (one of each per message) over core/h1.py (channels/http.py's
    ``LeanPost``); the media look-ups and downloads over aiohttp (GETs, rare)."""

    def __init__(self, *, timeout: float = 20.0, connections: int = 256) -> None:
        super().__init__(timeout=timeout, connections=connections)
        self._lean = LeanPost(timeout=timeout)
        self.timeout = timeout  # the longest a send's POST lasts (sender.py: a piece's lease covers it)
        self._headers_of: dict[str, bytes] = {}  # access token -> its header lines, encoded once

    def _headers(self, acct: WhatsAppAccount) -> bytes:
        lines = self._headers_of.get(acct.access_token)
        if lines is None:
            if len(self._headers_of) > 1024:
                self._headers_of.clear()
            lines = self._headers_of[acct.access_token] = header_lines(
                {"Authorization": f"Bearer {acct.access_token}", "Content-Type": "application/json"}
            )
        return lines

    async def close(self) -> None:
        await self._lean.close()
        await super().close()

    async def _post(self, acct: WhatsAppAccount, pnid: str, body: dict, resend: bool = False) -> dict:
        """``resend``: the request may be sent again when its kept-alive connection breaks before
        any answer (mark-as-read); a send never is — it may have reached the customer."""
        url = f"{acct.graph_base_url}/{acct.graph_version}/{pnid}/messages"
        try:
            status, _, raw = await self._lean.post(url, orjson.dumps(body), self._headers(acct), MAX_ANSWER, resend)
        except H1Error as exc:  # ``connect``: the request never left
            why = f"cannot connect: {exc.strerror or 'refused'}" if exc.connect else "no answer: connection broke"
            raise GraphUnreachable(why, sent_maybe=not exc.connect) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise GraphUnreachable(f"no answer: {type(exc).__name__}", sent_maybe=True) from None
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            doc = {}
        if status >= 400 or not isinstance(doc, dict) or "error" in doc:
            err = doc.get("error") if isinstance(doc, dict) and isinstance(doc.get("error"), dict) else {}
            code = err.get("code") if isinstance(err.get("code"), int) else None
            raise GraphError(status if status >= 400 else 500, code, str(err.get("message") or ""))
        return doc

    async def send(self, acct: WhatsAppAccount, pnid: str, to: str, message: dict) -> str:
        """Sends ``message`` (``{"type": "text", "text": {...}}`` or a template); the new wamid."""
        return (await self.send_for(acct, pnid, to, message))[0]

    async def send_for(self, acct: WhatsAppAccount, pnid: str, to: str, message: dict) -> tuple[str, str]:
        """``send``, with the WhatsApp id Meta answers for ``to`` (``contacts[0].wa_id``): not always
        the number sent to (Brazil's ninth digit, Mexico's 1), and the one the customer's own
        messages will come from. ``to`` itself when the answer names none (or an odd one)."""
        body = {"messaging_product": "whatsapp", "recipient_type": "individual", "to": to, **message}
        doc = await self._post(acct, pnid, body)
        try:
            wamid = doc["messages"][0]["id"]
        except (KeyError, IndexError, TypeError):
            raise GraphError(502, None, "no message id in the answer") from None
        if not isinstance(wamid, str) or len(wamid) > 256:
            raise GraphError(502, None, "bad message id in the answer")
        contacts = doc.get("contacts")
        found = (
            contacts[0].get("wa_id")
            if isinstance(contacts, list) and contacts and isinstance(contacts[0], dict)
            else None
        )
        return wamid, found if isinstance(found, str) and _WA_ID.match(found) else to

    async def mark_read(self, acct: WhatsAppAccount, pnid: str, wamid: str) -> None:
        await self._post(
            acct, pnid, {"messaging_product": "whatsapp", "status": "read", "message_id": wamid}, resend=True
        )

    async def media(self, acct: WhatsAppAccount, media_id: str, allowed_types) -> tuple[bytes, str]:
        """Media id → URL → bytes (both with the token). The URL must be on graph_base_url's host
        or a configured media host (https unless graph_base_url itself is http); the size is
        capped while reading, and the content type must be one the channel passes on."""
        url = f"{acct.graph_base_url}/{acct.graph_version}/{media_id}"
        headers = {"Authorization": f"Bearer {acct.access_token}"}
        try:
            async with self._client().get(url, headers=headers, allow_redirects=False) as resp:
                raw = await read_capped(resp, MAX_ANSWER)
                if resp.status >= 400:
                    raise GraphError(resp.status, None, "media lookup failed")
            info = orjson.loads(raw)
            link, mime = info.get("url"), str(info.get("mime_type") or "").split(";")[0].strip().lower()
            size = info.get("file_size")
            if not isinstance(link, str) or not _allowed_url(acct, link):
                raise MediaRefused("media URL is not on an allowed host")
            if mime not in allowed_types:
                raise MediaRefused("media type not accepted")
            if isinstance(size, int) and size > acct.media_max_bytes:
                raise MediaRefused("media too large")
            async with self._client().get(link, headers=headers, allow_redirects=False) as resp:
                if resp.status >= 400:
                    raise GraphError(resp.status, None, "media download failed")
                if resp.status != 200:
                    raise MediaRefused("media download redirected")
                declared = resp.content_length
                if declared is not None and declared > acct.media_max_bytes:
                    raise MediaRefused("media too large")
                data = await read_capped(resp, acct.media_max_bytes + 1)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise GraphUnreachable(f"media: {type(exc).__name__}", sent_maybe=False) from None
        except (orjson.JSONDecodeError, AttributeError):
            raise MediaRefused("media lookup answer is not JSON") from None
        if len(data) > acct.media_max_bytes:
            raise MediaRefused("media too large")
        return data, mime


def _allowed_url(acct: WhatsAppAccount, link: str) -> bool:
    try:
        parts = urlsplit(link)
        base = urlsplit(acct.graph_base_url)
        host = (parts.hostname or "").lower()
        netloc = f"{host}:{parts.port}" if parts.port else host
    except ValueError:
        return False
    if parts.username or parts.password or not host:
        return False
    if netloc == base.netloc.lower() and parts.scheme == base.scheme:
        return True
    return parts.scheme == "https" and (host in acct.media_hosts or netloc in acct.media_hosts)
