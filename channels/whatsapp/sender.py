"""Sending to a customer, at most once per piece, within the rules of the 24-hour window.

Every send belongs to a *key* (the inbound turn it answers, a proactive job, a human reply) whose
state is a Redis hash: before a piece goes to the Graph API its field is set to ``pending``,
after it the field holds the new wamid. A job delivered again (its worker died, a retry) skips
every piece with a field: sent pieces are not sent twice, and a piece whose send may have
reached Meta without an answer (a timeout; ``pending`` left by a try that stopped) is recorded as
``unknown`` rather than risked twice. Throttling answers (130429, 131056) become a ``Retry`` of
the whole job, whose sent pieces stay sent: a retry resumes after the last piece with a field,
in order.

Two tries of one key can run at once (an admin reply POSTed twice; a queue takeover of a job
whose first worker is slow but alive). The try that claims a piece owns its send for a lease
(``lease_s``: longer than a Graph POST can last): another try that finds the piece ``pending``
waits (a ``Retry``) while the lease runs, and only after it ran out concludes, once, in one
script (state.py ``takeover``), that the owner stopped: never a live try's piece recorded
``unknown``, nor a later piece sent while an earlier one is still on its way.

Outside the window no free-form text is attempted: the account's window template is sent
instead (once per key) when it has one, else the reply is recorded as ``held`` (and reported).
A retry that finds the window closed after some free-form pieces went sends only the rest as
templates. The templates' cut is pinned per key (``template_text``, ``template_room``,
``template_from``) and cut again, after the pieces that went, when it no longer fits the
template's room (``_template_cut``).
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field

from channels.config import WhatsAppAccount
from channels.whatsapp import metrics, store
from channels.whatsapp.content import split_reply
from channels.whatsapp.graph import Graph, GraphError, GraphUnreachable
from channels.whatsapp.state import SendState
from core.erasure_key import name_hash
from core.queue import Fatal, Retry

log = logging.getLogger("channels.whatsapp")

STATE_TTL = 8 * 86_400  # longer than Meta's retries of a webhook
MAX_TEMPLATE_VALUE = 1024
# Meta refuses a template whose body with its parameters filled in runs past this (132005). The
# gateway knows a template's own text when it was registered with its ``body``; else it keeps
# TEMPLATE_TEXT_RESERVE characters of room for it.
MAX_TEMPLATE_BODY = 1024
TEMPLATE_TEXT_RESERVE = 200
MIN_REPLY_ROOM = 100
LEASE_MARGIN_S = 10.0  # a piece's lease: the Graph POST's timeout and this
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_]+)\s*\}\}")
PIECE_FIELD = re.compile(r"^(p[0-9]+|template[0-9]*)\Z")  # a piece's field of a key's state
NOT_SENT = ("pending", "unknown")  # a piece's value before (or instead of) its wamid
TEMPLATE_FIELD = re.compile(r"^template[0-9]*\Z")  # a window template piece's field


def sent_wamids(state: dict[str, str]) -> list[str]:
    """The wamids of the pieces a key's state records as sent."""
    return [v for f, v in state.items() if PIECE_FIELD.match(f) and v not in NOT_SENT]


@dataclass
class Outcome:
    sent: list[str] = field(default_factory=list)  # wamids
    template: bool = False
    held: bool = False
    unknown: int = 0  # pieces whose fate is not known (never re-sent)

    @property
    def status(self) -> str:
        if self.held:
            return "held"
        return "sent" if self.sent or self.template else ("unknown" if self.unknown else "sent")


def state_key(account: str, key: str) -> str:
    return f"gw:{{gw}}:wa:out:{hashlib.sha256(f'{account}|{key}'.encode()).hexdigest()[:32]}"


def index_key(tenant: str, conversation: str) -> str:
    """The keys of one conversation's send states (a turn's holds the answer, a template's the text
    it carries), for an erasure or a retention of the conversation to delete (``forget_states``)."""
    return index_key_of(store.conversation_digest(tenant, conversation))


def index_key_of(digest: str) -> str:
    """``index_key`` of the conversation ``store.conversation_digest`` names ``digest``."""
    return f"gw:{{gw}}:wa:outs:{digest}"


FORGET_PAGE = 500  # state keys deleted per round trip


def alias_index_key(tenant: str, conversation: str) -> str:
    """The aliases (``alias_key``) that name one conversation's customer: the number sent to, or
    the id Meta answered for it; for an erasure of either conversation to delete."""
    return alias_index_key_of(store.conversation_digest(tenant, conversation))


def alias_index_key_of(digest: str) -> str:
    return f"{_ALIAS_INDEX}{digest}"


_ALIAS_INDEX = "gw:{gw}:wa:aliases:"


async def forget_states(redis, tenant: str, conversations: list[str]) -> int:
    """Deletes the send states of the tenant's conversations and the aliases of their customers'
    numbers (their indexes read a page at a time, whatever their sizes; under the names an older
    release gave them too, ``store.digests``); the number of keys deleted.
    An alias index names the other number's alias index (``Sender._alias``): that index loses what
    this one deleted and this one's name, and goes with its last member, but keeps the aliases of
    the other number's other numbers, for that conversation's erasure to find."""
    digests = [d for c in dict.fromkeys(conversations) for d in store.digests(tenant, c)]
    return await forget_states_of(redis, digests)


async def forget_states_of(redis, digests: list[str]) -> int:
    """``forget_states`` of the conversations ``store.conversation_digest`` names ``digests``."""
    deleted = 0
    indexes = [f(d) for d in digests for f in (index_key_of, alias_index_key_of)]
    for index in indexes:
        others = await _members(redis, index, _ALIAS_INDEX + "*") if index.startswith(_ALIAS_INDEX) else []
        skip = set(others)
        cursor = 0
        while True:
            cursor, keys = await redis.sscan(index, cursor, count=FORGET_PAGE)
            keys = [k for k in keys if k not in skip]
            if keys:
                deleted += int(await redis.delete(*keys))
                for other in others:
                    await redis.srem(other, *keys)
            if not int(cursor):
                break
        for other in others:
            await redis.srem(other, index)  # (a set's last member gone, the set is too)
        await redis.delete(index)
    return deleted


async def _members(redis, index: str, match: str) -> list:
    """The members of the set ``index`` matching ``match``, a page at a time."""
    found: list = []
    cursor = 0
    while True:
        cursor, keys = await redis.sscan(index, cursor, match=match, count=FORGET_PAGE)
        found += keys
        if not int(cursor):
            return list(dict.fromkeys(found))


ALIAS_TTL = 90 * 86_400


ALIAS_PREFIX = "gw:{gw}:wa:alias:"


def alias_key(account: str, pnid: str, number: str) -> str:
    """Where the id Meta answered a send to ``number`` with is kept: named by a keyed hash (the
    number's plain hash gives it back: ``store.conversation_digest``)."""
    return ALIAS_PREFIX + alias_name(_legacy_alias(account, pnid, number))


def legacy_alias_key(account: str, pnid: str, number: str) -> str:
    """``alias_key`` as an older release named it (read until ``names.upgrade`` renamed it)."""
    return ALIAS_PREFIX + _legacy_alias(account, pnid, number)


def _legacy_alias(account: str, pnid: str, number: str) -> str:
    return hashlib.sha256(f"{account}|{pnid}|{number}".encode()).hexdigest()[:32]


def alias_name(legacy: str) -> str:
    """The name ``alias_key`` gives the alias an older release named ``legacy``."""
    return name_hash("gw-wa-alias", legacy)


class Sender:
    def __init__(self, redis, pool, graph: Graph, fast=None, lease_s: float | None = None) -> None:
        self.pool = pool
        self.graph = graph
        self.kv = SendState(redis, fast)
        self.outbound = store.OutboundRecords(pool)
        self.lease_ms = int(1000 * (lease_s if lease_s is not None else graph.timeout + LEASE_MARGIN_S))

    async def known_as(self, account: str, pnid: str, number: str) -> str:
        """The WhatsApp id Meta answered a send to ``number`` with (``number`` when it never
        named another): an admin's sends to the number reach the conversation the customer's
        own messages (and 24-hour window) are in, not a second one."""
        return (
            await self.kv.read(alias_key(account, pnid, number))
            or await self.kv.read(legacy_alias_key(account, pnid, number))  # (not renamed yet)
            or number
        )

    async def _alias(self, conv: store.Conversation, wa_id: str) -> None:
        """Sends to the conversation's number go to ``wa_id`` from now on; the alias is indexed
        under both numbers' conversations (an erasure of either deletes it: it holds the number,
        and the other conversation's index with it)."""
        key = alias_key(conv.account, conv.pnid, conv.wa_id)
        await self.kv.put(key, wa_id, ALIAS_TTL)
        indexes = [alias_index_key(conv.tenant, store.conversation_id(conv.pnid, n)) for n in (conv.wa_id, wa_id)]
        for index, other in zip(indexes, reversed(indexes), strict=True):
            # Each index names the other too: an erasure of either conversation takes the alias and
            # its own index out of the other's, whose name hashes a number with no key, so that set
            # goes with its last member (``forget_states``).
            await self.kv.index(index, key, ALIAS_TTL)
            await self.kv.index(index, other, ALIAS_TTL)

    async def state(self, account: str, key: str) -> dict[str, str]:
        return await self.kv.get(state_key(account, key))

    async def begin(self, account: str, key: str, index: str | None = None, **fields: str) -> dict[str, str]:
        """The key's state as it was; ``started`` and ``fields`` noted if no try began before.
        ``index``: its conversation's (``index_key``), where an erasure finds it."""
        return await self.kv.begin(state_key(account, key), STATE_TTL, {"started": "1", **fields}, index)

    async def note(self, account: str, key: str, index: str | None = None, **fields: str) -> None:
        await self.kv.note(state_key(account, key), STATE_TTL, fields, index)

    async def _claim(
        self,
        skey: str,
        field_: str,
        value: str,
        acct=None,
        pnid: str | None = None,
        index: str | None = None,
        lease: str | None = None,
    ) -> int:
        """Sets the field unless it is set already: 1 if this call set it, else 0 (2: it reads
        ``pending``, another try's send, with ``lease``). With a number: at most
        ``pacing_per_second`` claims a second on it across workers (a ``Retry`` past that).
        ``index``: the conversation's the key joins (``index_key``). ``lease``: this try's token,
        the field is its own for ``lease_ms``."""
        now = time.time()
        second = int(now)
        limit = int(acct.pacing_per_second) if acct is not None else 0
        pace_key = f"gw:{{gw}}:wa:pace:{pnid}:{second}"
        got = await self.kv.claim(
            skey,
            STATE_TTL,
            field_,
            value,
            pace_key,
            max(limit, 1) if acct else 0,
            index,
            (lease, self.lease_ms) if lease else None,
        )
        if got < 0:
            raise Retry(second + 1 - now + 0.01)
        return got

    async def _pending(self, conv: store.Conversation, key: str, field_: str, record: tuple) -> bool:
        """A piece another try left ``pending``: a ``Retry`` while that try's lease runs (it may be
        inside its POST); once it ran out, the piece is recorded ``unknown`` (by one try only).
        True when the piece no longer reads ``pending`` (sent meanwhile, or released to be sent)."""
        got = await self.kv.takeover(state_key(conv.account, key), field_, self.lease_ms)
        if got > 0:
            raise Retry(got / 1000 + 0.05)
        if got < 0:  # a worker stopped mid-send: it may have gone out; reported, never re-sent
            kind, body, reply_to = record
            why = "the worker stopped during the send"
            await self.outbound.record(conv, None, kind, body, reply_to, "unknown", why)
            metrics.sends.get(conv.account, "unknown").inc()
        return got == 0

    async def _send_piece(
        self, acct: WhatsAppAccount, conv: store.Conversation, key: str, field_: str, message: dict, record: tuple
    ) -> str | None:
        """One message through the Graph API under ``field_`` of the key's state: its wamid, or
        None when it was sent (or attempted) before."""
        skey = state_key(conv.account, key)
        index = index_key(conv.tenant, conv.conversation_id)
        token = secrets.token_hex(8)
        for _ in range(3):
            got = await self._claim(skey, field_, "pending", acct, conv.pnid, index, lease=token)
            if got == 1:
                break
            if got == 0 or not await self._pending(conv, key, field_, record):
                return None
        else:
            raise Retry(1.0)  # other tries of the key claimed and released it meanwhile
        try:
            wamid, wa_id = await self.graph.send_for(acct, conv.pnid, conv.wa_id, message)
        except GraphUnreachable as exc:
            if exc.sent_maybe:  # it may have reached the customer: never risk a second copy
                await self.kv.settle(skey, field_, "unknown", STATE_TTL, index)
                kind, body, reply_to = record
                await self.outbound.record(conv, None, kind, body, reply_to, "unknown", "no answer")
                metrics.sends.get(conv.account, "unknown").inc()
                log.warning("whatsapp send without an answer; not retried", extra={"fields": {"account": conv.account}})
                return None
            await self.kv.release(skey, field_, token)
            raise
        except GraphError as exc:
            await self.kv.release(skey, field_, token)
            metrics.sends.get(conv.account, "throttled" if exc.kind == "throttle" else "failed").inc()
            raise
        await self.kv.settle(skey, field_, wamid, STATE_TTL, index)
        if wa_id != conv.wa_id:  # Meta knows this customer by another id: later sends to the number use it
            await self._alias(conv, wa_id)
        metrics.sends.get(conv.account, "template" if field_.startswith("template") else "sent").inc()
        kind, body, reply_to = record
        await self.outbound.record(conv, wamid, kind, body, reply_to, "sent")
        return wamid

    async def send_text(
        self,
        acct: WhatsAppAccount,
        conv: store.Conversation,
        key: str,
        text: str,
        *,
        kind: str = "text",
        reply_to: str | None = None,
        variables: dict | None = None,
        template_fallback: bool = True,
        state: dict[str, str] | None = None,
        window_closed: bool = False,
    ) -> Outcome:
        """``template_fallback`` False: outside the window the text is held even when the account
        has a window template (a proactive text is not the template's to stand in for).
        ``window_closed``: Meta failed the text for the closed window: no free-form is tried."""
        out = Outcome()
        if state is None:  # (a caller that has just read the key's state passes it)
            state = await self.state(conv.account, key)
        # (the pieces' fields only: the key's state also holds a turn's answer, which may read "pending")
        pieces = {f: v for f, v in state.items() if PIECE_FIELD.match(f)}
        changed = False
        for field_, value in pieces.items():
            if value == "pending":  # another try's send: alive (a Retry), or it stopped (``unknown`` now)
                parts = split_reply(text, max_parts=acct.max_reply_parts)
                i = int(field_[1:]) if field_.startswith("p") else -1
                body = parts[i] if 0 <= i < len(parts) else text if i >= 0 else "template"
                changed = await self._pending(conv, key, field_, (kind, body, reply_to)) or changed
        if changed:  # (a state read before another try's send ended: read again)
            state = await self.state(conv.account, key)
            pieces = {f: v for f, v in state.items() if PIECE_FIELD.match(f)}
        out.unknown = sum(1 for v in pieces.values() if v in NOT_SENT)
        if "held" in state:
            out.held = True
            return out
        # Gone as the window template (its remaining pieces too, never free-form), or the window is
        # closed now: the templates carry what no free-form piece of this key carried before.
        if "template" in state or window_closed or not conv.window_open():
            rest = unsent_rest(text, pieces, acct.max_reply_parts)
            if not rest:
                return out
            return await self._outside_window(acct, conv, key, rest, kind, reply_to, variables, out, template_fallback)
        for i, piece in enumerate(split_reply(text, max_parts=acct.max_reply_parts)):
            message = {"type": "text", "text": {"body": piece, "preview_url": False}}
            try:
                wamid = await self._send_piece(acct, conv, key, f"p{i}", message, (kind, piece, reply_to))
            except GraphError as exc:
                if exc.kind == "window":  # Meta knows better: the window is closed
                    rest = " ".join(split_reply(text, max_parts=acct.max_reply_parts)[i:])
                    return await self._outside_window(
                        acct, conv, key, rest, kind, reply_to, variables, out, template_fallback
                    )
                raise _job_error(exc) from None
            if wamid:
                out.sent.append(wamid)
        return out

    async def send_template(
        self,
        acct: WhatsAppAccount,
        conv: store.Conversation,
        key: str,
        tpl: dict,
        values: dict,
        *,
        reply_to=None,
        field_: str = "template",
    ) -> Outcome:
        out = Outcome()
        params = [{"type": "text", "text": template_value(values.get(name, ""))} for name in tpl.get("variables") or ()]
        message = {
            "type": "template",
            "template": {
                "name": tpl["name"],
                "language": {"code": tpl.get("language") or acct.template_language},
                "components": [{"type": "body", "parameters": params}] if params else [],
            },
        }
        try:
            wamid = await self._send_piece(
                acct, conv, key, field_, message, ("template", f"template:{tpl['name']}", reply_to)
            )
        except GraphError as exc:
            raise _job_error(exc) from None
        out.template = True
        if wamid:
            out.sent.append(wamid)
        return out

    async def _template_cut(self, acct, skey: str, text: str, room: int, index: str) -> tuple[int, list[str]]:
        """The pieces of an answer's window templates under this key, and the field index of the
        first of them (``template`` is 0, ``template1`` 1...).

        Every try of the key cuts the same text (the first try's), however short, at the same
        room: a retry, or a second job on the key, given another text (a turn's retry has the
        whole answer where its first try sent only the pieces Meta refused) would send pieces of
        two different cuts. When the pinned cut no longer fits the room the template leaves now
        (registered again with a longer body, a longer customer name, between tries), the pieces
        after the last one that went (or whose fate is unknown) are cut again for that room and
        that cut is pinned in turn, its fields after theirs (``template_from``): what Meta
        accepted stays sent, nothing goes twice, and no piece runs past Meta's 1,024 (132005)."""
        flat = " ".join(text.split())
        first_text = await self._claim(skey, "template_text", flat, index=index)
        if await self._claim(skey, "template_room", str(room), index=index) and first_text:
            return 0, template_cut(flat, room, acct.max_reply_parts)
        for _ in range(3):
            pinned = await self.kv.get(skey)
            flat = pinned.get("template_text") or flat
            was = int(pinned["template_room"]) if pinned.get("template_room", "").isdigit() else room
            start = int(pinned["template_from"]) if pinned.get("template_from", "").isdigit() else 0
            pieces = template_cut(flat, was, acct.max_reply_parts if start == 0 else None)
            went = [int(f[len("template") :] or 0) for f in pinned if TEMPLATE_FIELD.match(f)]
            done = max(max(went, default=-1) + 1 - start, 0)
            if all(len(p) <= room for p in pieces[done:]):
                return start, pieces
            rest = " ".join(pieces[done:])
            old = (pinned.get("template_from", ""), pinned.get("template_room", ""))
            if await self.kv.repin(skey, STATE_TTL, old, rest, str(room), str(start + done)):
                log.info("whatsapp window template cut again for its room", extra={"fields": {"room": room}})
                return start + done, template_cut(rest, room, None)
        raise Retry(1.0)  # other tries of the key cut it again meanwhile: this one starts over

    async def _outside_window(
        self, acct, conv, key, text, kind, reply_to, variables, out: Outcome, template_fallback: bool = True
    ) -> Outcome:
        tpl = None
        if acct.window_template and template_fallback:
            tpl = await store.template(self.pool, conv.tenant, conv.account, acct.window_template, None)
        if tpl is not None:
            values = {**(variables or {}), "reply": text, "customer_name": conv.name or ""}
            # A template carries what its body has room for (Meta: 1,024 characters filled in): a
            # longer reply goes as as many templates as it takes (cut at sentence ends), never cut
            # off and reported sent.
            pieces, start = [text], 0
            if "reply" in (tpl.get("variables") or ()):
                values = fit_others(tpl, values)  # a long customer name must not leave the reply no room
                skey = state_key(conv.account, key)
                index = index_key(conv.tenant, conv.conversation_id)
                start, pieces = await self._template_cut(acct, skey, text, reply_room(tpl, values), index)
                pieces = pieces or [text]
            for i, piece in enumerate(pieces, start):
                field_ = "template" if i == 0 else f"template{i}"
                done = await self.send_template(
                    acct, conv, key, tpl, {**values, "reply": piece}, reply_to=reply_to, field_=field_
                )
                out.sent += done.sent
            out.template = True
            return out
        skey = state_key(conv.account, key)
        if await self._claim(skey, "held", "1", index=index_key(conv.tenant, conv.conversation_id)):
            await self.outbound.record(
                conv,
                None,
                kind,
                text,
                reply_to,
                "held",
                "outside the 24-hour window" + ("; no window template" if template_fallback else ""),
            )
            metrics.sends.get(conv.account, "held").inc()
            log.warning(
                "whatsapp reply held: outside the 24-hour window and no window template",
                extra={"fields": {"account": conv.account}},
            )
        out.held = True
        return out


def unsent_rest(text: str, fields: dict[str, str], max_parts: int) -> str:
    """What of ``text`` comes after its last free-form piece that has a field (sent, or of unknown
    fate): a retry that finds the window closed sends only that as templates. Piece 1 accepted,
    piece 2 refused at once, the window closed before the retry: the templates once carried the
    whole answer, and the customer read piece 1 twice."""
    done = [int(f[1:]) for f in fields if f.startswith("p")]
    if not done:
        return text
    return " ".join(split_reply(text, max_parts=max_parts)[max(done) + 1 :])


def window_rest(text: str, state: dict[str, str], statuses: dict[str, str], max_parts: int) -> str | None:
    """What of a turn's answer its window templates carry when Meta failed a free-form piece of it
    later for the closed window (a 131047 status): the pieces after the last one the customer has
    or may have, up to those the turn itself sent as templates (``state``: the turn's). A piece
    Meta accepted counts as received (its record reads ``sent`` from the accepted POST on) unless
    it failed; after the first failed piece only ``delivered`` or ``read`` counts, for Meta fails
    the later pieces for the closed window too and their failures may not be in yet (one job per
    answer). A piece of unknown fate counts as received: never sent again. None when no piece of
    the turn's state failed (the failed send was not one of these). The templates once carried the
    whole answer: the customer read the pieces Meta had delivered a second time."""
    sent = {int(f[1:]): v for f, v in state.items() if PIECE_FIELD.match(f) and f.startswith("p")}
    failed = [i for i, v in sent.items() if statuses.get(v) == "failed"]
    if not failed:
        return None
    went = [i for i, v in sent.items() if i < min(failed) or v in NOT_SENT or statuses.get(v) in ("delivered", "read")]
    pieces = split_reply(text, max_parts=max_parts)
    end = max(sent) + 1 if "template" in state else len(pieces)  # the turn's own templates carry the rest
    return " ".join(pieces[max(went, default=-1) + 1 : end])


def window_unsettled(state: dict[str, str], statuses: dict[str, str]) -> bool:
    """Whether a free-form piece of a turn before its first failed one has no final status yet
    (accepted, neither delivered, read nor failed): statuses come on an unordered queue, and its
    own failure may come after a later piece's (``window_rest`` would count it received)."""
    sent = {int(f[1:]): v for f, v in state.items() if PIECE_FIELD.match(f) and f.startswith("p")}
    failed = [i for i, v in sent.items() if statuses.get(v) == "failed"]
    return bool(failed) and any(
        i < min(failed) and v not in NOT_SENT and statuses.get(v) not in ("delivered", "read") for i, v in sent.items()
    )


def template_cut(flat: str, room: int, max_parts: int | None) -> list[str]:
    """``flat`` in pieces of at most ``room`` characters, cut at sentence ends. With
    ``max_parts``: what that many free-form pieces would carry, in as many templates as it takes
    (a piece is cut at no less than half its limit): never less. None: all of it (a cut's rest,
    already within that bound)."""
    kept = " ".join(split_reply(flat, max_parts=max_parts)) if max_parts is not None else flat
    return split_reply(kept, limit=room, max_parts=len(kept) // (room // 2) + 1)


def placeholders(body: str) -> set[str]:
    """The distinct placeholders of an approved body ({{1}}, {{2}}...)."""
    return set(uses(body))


def uses(body: str) -> Counter:
    """How many times the body uses each placeholder: Meta fills in every use ("Hi {{1}}! ...
    Talk soon, {{1}}."), so a value counts as often as its placeholder appears."""
    return Counter(_PLACEHOLDER.findall(body))


def filled_length(body: str, values: list) -> int:
    """The length of ``body`` with its placeholders filled in by ``values`` ({{1}} is the first),
    each as ``template_value`` sends it, as often as the body uses it."""
    used = uses(body)
    return len(_PLACEHOLDER.sub("", body)) + sum(used[str(i)] * len(template_value(v)) for i, v in enumerate(values, 1))


def reply_room(tpl: dict, values: dict) -> int:
    """How many characters of an answer one window template carries (at least MIN_REPLY_ROOM,
    else an answer would take dozens of templates; ``room_left`` is the unbounded figure)."""
    return max(MIN_REPLY_ROOM, min(MAX_TEMPLATE_VALUE, room_left(tpl, values)))


def fit_others(tpl: dict, values: dict) -> dict:
    """``values`` with the other values cut (the longest first) so that the reply keeps
    MIN_REPLY_ROOM characters: its room is never raised past what the body really leaves (Meta
    would refuse every piece, 132005), and a name cut short beats an answer never sent."""
    names = list(tpl.get("variables") or ())
    _, used = _shape(tpl)
    replies = max(1, sum(used[str(i)] for i, n in enumerate(names, 1) if n == "reply"))
    out = dict(values)
    for _ in names:
        short = MIN_REPLY_ROOM - room_left(tpl, out)
        others = [(len(template_value(out.get(n, ""))), i, n) for i, n in enumerate(names, 1) if n != "reply"]
        longest, i, name = max((o for o in others if used[str(o[1])]), default=(0, 0, ""))
        if short <= 0 or longest <= 1:
            break
        cut = -(-short * replies // used[str(i)])  # each use of it gives its length back
        out[name] = template_value(out.get(name, ""))[: max(1, longest - cut)]
    return out


def room_left(tpl: dict, values: dict) -> int:
    """Meta's 1,024 for the body filled in, less the template's own text and its other parameters
    (each as often as the body uses it), shared among the body's uses of the reply."""
    names = list(tpl.get("variables") or ())
    own, used = _shape(tpl)
    others = sum(used[str(i)] * len(template_value(values.get(n, ""))) for i, n in enumerate(names, 1) if n != "reply")
    replies = max(1, sum(used[str(i)] for i, n in enumerate(names, 1) if n == "reply"))
    return (MAX_TEMPLATE_BODY - own - others) // replies


def _shape(tpl: dict) -> tuple[int, Counter]:
    """A template's own text's length and how often its body uses each placeholder; a template
    registered without its body: TEMPLATE_TEXT_RESERVE, and each variable once."""
    body = tpl.get("body")
    if isinstance(body, str):
        return len(_PLACEHOLDER.sub("", body)), uses(body)
    return TEMPLATE_TEXT_RESERVE, Counter({str(i): 1 for i in range(1, len(tpl.get("variables") or ()) + 1)})


def template_value(value) -> str:
    """A template body parameter as Meta takes it: one line, no tabs, no run of more than four
    spaces (else the whole send is refused, 132018), at most ``MAX_TEMPLATE_VALUE`` characters,
    never empty. A reply or a profile name with several lines becomes one."""
    return " ".join(str(value).split())[:MAX_TEMPLATE_VALUE].strip() or "-"


def _job_error(exc: GraphError) -> Exception:
    """What the queue should do with the job after this Graph error."""
    if exc.kind == "throttle":
        return Retry(exc.retry_after)
    if exc.kind == "server":
        return exc  # a failure: retried with backoff, dead (and the fallback) after the last
    return Fatal(f"graph refused the message: code {exc.code}")
