"""The channel's queue consumers.

``wa-inbound`` is ordered by conversation (key ``<account>:<phone_number_id>:<wa_id>``): one turn
of a conversation at a time, in arrival order, conversations in parallel. Its jobs are inbound
messages (``kind: in``) and outbound sends queued by the admin API or a deliverer (``kind:
send``). With a debounce, the head of a conversation waits until its burst has been quiet for
``debounce`` seconds (or ``debounce_max_wait`` passed), then the burst is one agent turn and is
finished with the head (``Queue.following``).

A turn: record the messages (a wamid already recorded, with no state of ours, is a duplicate),
mark the last one read, fetch media, call the agent through the gateway, keep its answer in
the turn's state (a retry does not call the agent again), send it (sender.py: at most once per
piece). After the last retry the job is dead-lettered and the customer gets the account's
fallback message (``on_dead``).

``wa-status`` (unordered) records delivery statuses.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

import orjson

from channels.config import WhatsAppAccount
from channels.gateway_client import ConversationErased, GatewayClient, GatewayRejected, GatewayUnavailable
from channels.whatsapp import erasure, metrics, store
from channels.whatsapp.content import MediaStore, build_content
from channels.whatsapp.graph import WINDOW_CLOSED, Graph, GraphError, GraphUnreachable
from channels.whatsapp.sender import (
    Sender,
    index_key,
    sent_wamids,
    window_rest,
    window_unsettled,
)
from core import queued_proof
from core.queue import Fatal, Job, Queue, Retry

log = logging.getLogger("channels.whatsapp")

INBOUND = "wa-inbound"
STATUS = "wa-status"
MAX_BURST = 20
# How long a window failure's templates wait for the final statuses of the answer's earlier pieces
# (``_window_rest``): past it, a piece Meta accepted counts as received.
WINDOW_SETTLE_S = 60.0


def conversation_key(account: str, pnid: str, wa_id: str) -> str:
    return f"{account}:{pnid}:{wa_id}"


class Worker:
    def __init__(
        self,
        accounts: dict[str, WhatsAppAccount],
        *,
        pool,
        inbound: Queue,
        sender: Sender,
        graph: Graph,
        media: MediaStore,
        gateway: GatewayClient,
        redis=None,
    ) -> None:
        self.accounts = accounts
        self.redis = redis  # the erasures' marks (``erasure.erased_since``); None: none read
        self.pool = pool
        self.inbound = inbound
        self.sender = sender
        self.graph = graph
        self.media = media
        self.gateway = gateway
        self.inbound_records = store.InboundRecords(pool)
        # Set when the channel drains (``WhatsApp.drain``): a turn whose gateway call fails then
        # (this gateway, or the one it calls, stopping) goes back to the queue with its retries
        # untouched, not counted as a failed attempt (one shutdown would use up one retry).
        self.stopping = False

    def _account(self, name: str) -> WhatsAppAccount:
        acct = self.accounts.get(name)
        if acct is None:
            raise Fatal("the account is no longer configured")
        return acct

    # -- inbound --------------------------------------------------------------------------
    async def handle(self, job: Job) -> int:
        try:
            return await self._handle(job)
        except (Retry, Fatal):
            raise
        except Exception as exc:  # retried by the queue; the type only (a message may quote content)
            log.warning(
                "whatsapp turn failed (attempt %d): %s",
                job.attempt,
                type(exc).__name__,
                extra={"fields": {"job": job.id}},
            )
            raise

    async def _handle(self, job: Job) -> int:
        payload = job.payload
        burst = [job]
        acct = self.accounts.get(payload.get("account", ""))
        if payload.get("kind") != "send" and acct is not None and acct.debounce > 0:
            for nxt in await self.inbound.following(job, MAX_BURST - 1):
                if nxt.payload.get("kind") != "in" or nxt.payload.get("account") != payload["account"]:
                    break
                burst.append(nxt)
        # (after the burst is read: a message behind the head was queued before this look, so before
        # any erasure it misses; looked at first, an erasure and a new message between the look and
        # the read would put the new conversation's first message in the erased head's burst)
        if await self._erased_since(job.payload, job.queued_us):
            # queued before its conversation's erasure: the erased conversation's, not stored again
            log.info("whatsapp job of a conversation erased since dropped", extra={"fields": {"job": job.id}})
            metrics.turns.get(payload.get("account", ""), "erased").inc()
            if job.attempt > 1:  # a try of it failed or stopped, maybe after its send and before its check
                await self._forget_tried(job, [j.payload for j in burst])
            return 0
        if payload.get("kind") == "send":
            await self._send(job)
            return 0
        acct = self._account(payload["account"])
        if acct.debounce > 0:
            now = time.time()
            wait = max(j.enqueued_at for j in burst) + acct.debounce - now
            if wait > 0 and now - job.enqueued_at < acct.debounce_max_wait:
                raise Retry(wait)
        return await self._turn(acct, [j.payload for j in burst], job.queued_us) - 1

    async def _erased_since(self, p: dict, queued_us: int) -> bool:
        """Whether the job's conversation was erased after it was queued (``erasure.mark_erased``;
        ``queued_us``: ``Job.queued_us``, on Redis's clock as the mark)."""
        acct = self.accounts.get(p.get("account", ""))
        if acct is None or self.redis is None:
            return False
        conv = p.get("conversation_id")
        if not isinstance(conv, str):
            if not isinstance(p.get("pnid"), str) or not isinstance(p.get("wa_id"), str):
                return False
            conv = store.conversation_id(p["pnid"], p["wa_id"])
        return await erasure.erased_since(self.redis, acct.tenant, conv, queued_us)

    async def _forget_tried(self, job: Job, burst: list[dict]) -> None:
        """A job dropped for an erasure that an earlier try ran: what that try wrote after the
        erasure (its send's records, the conversation's row and send states) goes, as its own
        post-send check (``erasure.after_send``) would have done had it not failed or stopped.
        Its send's pieces are read from the job's own send state (a piece claimed before the
        erasure is no longer in the conversation's index)."""
        p = job.payload
        acct = self.accounts.get(p.get("account", ""))
        conv = p.get("conversation_id")
        if not isinstance(conv, str):
            conv = store.conversation_id(p["pnid"], p["wa_id"])
        key = (p.get("idempotency") or f"send:{job.id}") if p.get("kind") == "send" else f"turn:{p.get('wamid')}"
        state = await self.sender.state(p["account"], key)
        sent = sent_wamids(state)
        inbound = [m["wamid"] for m in burst if m.get("kind") == "in" and isinstance(m.get("wamid"), str)]
        await erasure.after_send(self.redis, self.pool, acct.tenant, conv, job.queued_us, [*inbound, *sent])

    async def _erased_under_way(
        self, acct: WhatsAppAccount, conv: store.Conversation, messages: list[dict], queued_us: int | None
    ) -> bool:
        """Whether the turn's conversation was erased since its job was queued, while the turn was
        under way: then it is neither answered nor sent, and what it stored goes (its messages'
        words, the profile name, the files it fetched)."""
        if queued_us is None or not await self._erased_since(messages[0], queued_us):
            return False
        await self._drop_erased(acct, conv, messages)
        return True

    async def _drop_erased(self, acct: WhatsAppAccount, conv: store.Conversation, messages: list[dict]) -> None:
        """A turn of a conversation erased while it was under way: what it stored goes."""
        log.info(
            "whatsapp turn of a conversation erased meanwhile dropped", extra={"fields": {"account": conv.account}}
        )
        await store.forget_turn_words(self.pool, acct.tenant, conv.conversation_id, [m["wamid"] for m in messages])
        await self.media.forget(acct.tenant, conv.conversation_id)
        metrics.turns.get(messages[0]["account"], "erased").inc()

    async def _turn(self, acct: WhatsAppAccount, messages: list[dict], queued_us: int | None = None) -> int:
        """Answers the burst; returns how many of its messages the answer covers (a turn taken over
        from a stopped worker covers what its answer was made of, not what arrived since)."""
        head = messages[0]
        agent = acct.agent_for(head["pnid"])
        if agent is None:
            raise Fatal("the business number is no longer configured for this account")
        key = f"turn:{head['wamid']}"
        # the state as it was, and (in the same round trip) started + the burst noted by a first try
        index = index_key(acct.tenant, store.conversation_id(head["pnid"], head["wa_id"]))
        state = await self.sender.begin(head["account"], key, index, n=str(len(messages)))
        if state.get("n", "").isdigit():  # a try of ours began (perhaps answered) this burst: the same one
            messages = messages[: max(1, int(state["n"]))]
        if "reply" not in state:
            conv, fresh = await self.inbound_records.record(acct.tenant, agent, messages)
            # Recorded before, and not by a try of ours that is still in Redis: a redelivery
            # (Meta retries for days) — unless nothing ever answered it (a dead letter replayed
            # after its send state expired), which the outbound records tell.
            if fresh == 0 and "started" not in state and await store.answered(self.pool, acct.tenant, head):
                log.info("whatsapp duplicate messages skipped", extra={"fields": {"account": head["account"]}})
                metrics.turns.get(head["account"], "duplicate").inc()
                return len(messages)
            read = asyncio.ensure_future(self._mark_read(acct, head["pnid"], messages[-1]["wamid"]))
            # (signed: the gateway refuses the turn, and stores nothing, if the erasure comes now)
            queued_at = None if queued_us is None else queued_proof.sign(acct.tenant, conv.conversation_id, queued_us)
            try:
                content = await build_content(self.media, acct, messages, conv.conversation_id)
                if await self._erased_under_way(acct, conv, messages, queued_us):  # (while its media came)
                    return len(messages)
                reply = await self.gateway.turn(
                    api_key=acct.api_key,
                    agent=agent,
                    conversation_id=conv.conversation_id,
                    content=content,
                    variables=_variables(conv, head),
                    idempotency_key=turn_idempotency_key(
                        head, len(messages), agent, content, _variables(conv, head), customer=head["wa_id"]
                    ),
                    customer=head["wa_id"],
                    queued_at=queued_at,
                )
            except ConversationErased:  # (erased after the check above, before the gateway read it)
                reply = None
            except GatewayRejected as exc:
                raise Fatal(str(exc)) from None
            except GatewayUnavailable as exc:
                if self.stopping:
                    raise Retry(0.0) from None
                if exc.retry_after:
                    raise Retry(min(exc.retry_after, 60.0)) from None
                raise
            finally:
                await read
            if reply is None:
                await self._drop_erased(acct, conv, messages)
                return len(messages)
            if await self._erased_under_way(acct, conv, messages, queued_us):  # (while it was answered)
                return len(messages)
            await self.sender.note(
                head["account"], key, index, reply=reply.text, escalation=reply.escalation or "", n=str(len(messages))
            )
            metrics.turns.get(head["account"], "escalated" if reply.escalation else "answered").inc()
            text = reply.text
            state = {**state, "started": "1", "reply": text}
        else:
            text = state["reply"]
            conv = await store.get_conversation(self.pool, acct.tenant, head["account"], head["pnid"], head["wa_id"])
            if conv is None:
                raise Fatal("the conversation record is gone")
        if text.strip():  # a conversation held by a human may be acknowledged with nothing
            # (erased while the answer went out — its POSTs take seconds — its records and send
            # state, written after the erasure, hold the number and the answer: they go as the
            # erasure's own did, and a failed send is neither retried nor dead-lettered)
            inbound = [m["wamid"] for m in messages]
            try:
                out = await self.sender.send_text(
                    acct, conv, key, text, reply_to=head["wamid"], variables=_variables(conv, head), state=state
                )
            except Exception:
                if await self._after_send(head["account"], acct, conv.conversation_id, queued_us, inbound):
                    return len(messages)
                raise
            await self._after_send(head["account"], acct, conv.conversation_id, queued_us, [*inbound, *out.sent])
        return len(messages)

    async def _after_send(
        self, account: str, acct: WhatsAppAccount, conv: str, queued_us: int | None, wamids: list[str]
    ) -> bool:
        """``erasure.after_send`` for this account's tenant (the one check every send path makes)."""
        if await erasure.after_send(self.redis, self.pool, acct.tenant, conv, queued_us, wamids):
            log.info("whatsapp send erased meanwhile: forgotten", extra={"fields": {"account": account}})
            metrics.turns.get(account, "erased").inc()
            return True
        return False

    async def _mark_read(self, acct: WhatsAppAccount, pnid: str, wamid: str) -> None:
        """Best effort, alongside the turn: the blue ticks are not worth failing a turn for."""
        if not acct.mark_read:
            return
        try:
            await self.graph.mark_read(acct, pnid, wamid)
        except (GraphError, GraphUnreachable) as exc:
            log.info("whatsapp mark-as-read failed: %s", type(exc).__name__)

    # -- outbound (admin API, deliverers) --------------------------------------------------
    async def _send(self, job: Job) -> None:
        """A send job (an admin's, a deliverer's queued one, a window template): once it is over,
        sent or not, the erasure's mark is read again (``_after_send``)."""
        p = job.payload
        acct = self._account(p["account"])
        sent: list[str] = []
        conv_id = p.get("conversation_id")
        if not isinstance(conv_id, str):
            conv_id = store.conversation_id(p["pnid"], p["wa_id"])
        try:
            sent = await self._send_now(job, acct)
        except Exception:
            if await self._after_send(p["account"], acct, conv_id, job.queued_us, sent):
                return
            raise
        await self._after_send(p["account"], acct, conv_id, job.queued_us, sent)

    async def _send_now(self, job: Job, acct: WhatsAppAccount) -> list[str]:
        p = job.payload
        if p.get("window_closed"):  # a failed free-form answer's window templates (_window_failure)
            conv = await store.find_conversation(self.pool, acct.tenant, p["conversation_id"], self.accounts)
            if conv is None or conv.account != p["account"]:
                return []
            text = await self._window_rest(acct, conv, p, job.enqueued_at) if p.get("turn") else p["text"]
            if text:
                out = await self.sender.send_text(
                    acct, conv, p["idempotency"], text, reply_to=p["reply_to"], window_closed=True
                )
                return out.sent
            return []
        agent = acct.agent_for(p["pnid"])
        if agent is None:
            raise Fatal("the business number is not configured for this account")
        wa_id = await self.sender.known_as(p["account"], p["pnid"], p["wa_id"])
        conv = await store.get_conversation(self.pool, acct.tenant, p["account"], p["pnid"], wa_id)
        if conv is None:
            conv = await store.ensure_conversation(self.pool, acct.tenant, p["account"], p["pnid"], wa_id, agent)
        key = p.get("idempotency") or f"send:{job.id}"
        if p.get("template"):
            tpl = p["template"]
            out = await self.sender.send_template(acct, conv, key, tpl, tpl.get("values") or {})
        else:
            purpose = p.get("purpose")  # a deliverer's (a human's reply) may use the window template
            out = await self.sender.send_text(
                acct, conv, key, p["text"], kind=purpose or "proactive", template_fallback=purpose is not None
            )
        return out.sent

    async def _window_rest(self, acct: WhatsAppAccount, conv: store.Conversation, p: dict, since: float) -> str:
        """Of a turn's answer whose free-form pieces Meta failed for the closed window, what did not
        reach the customer (sender.window_rest): the pieces Meta delivered are not sent again as
        templates. Computed by the job's first try only (a retry's templates are the pinned cut of
        its key's state), after the turn's own job (this queue is ordered by conversation). While
        an earlier piece has no final status (its own failure may be on its way: the status queue
        is unordered) the job waits, up to WINDOW_SETTLE_S after ``since`` (it was queued)."""
        if await self.sender.state(conv.account, p["idempotency"]):
            return p["text"]
        turn = await self.sender.state(conv.account, f"turn:{p['reply_to']}")
        wamids = sent_wamids(turn)
        statuses = await store.statuses(self.pool, acct.tenant, conv.account, wamids)
        if window_unsettled(turn, statuses) and time.time() - since < WINDOW_SETTLE_S:
            raise Retry(1.0)
        rest = window_rest(p["text"], turn, statuses, acct.max_reply_parts)
        if rest == "":  # a failed piece is followed by one the customer has: reported (its record), not re-sent
            log.warning(
                "whatsapp window failure: nothing of the answer left to send",
                extra={"fields": {"account": conv.account}},
            )
        return p["text"] if rest is None else rest

    # -- dead letters ---------------------------------------------------------------------
    async def on_dead(self, job: Job, error: str) -> None:
        """The job is dead: the customer is told (the account's fallback message), once."""
        p = job.payload
        acct = self.accounts.get(p.get("account", ""))
        if acct is None or p.get("kind") != "in" or not acct.fallback_message:
            return
        conv = await store.get_conversation(self.pool, acct.tenant, p["account"], p["pnid"], p["wa_id"])
        if conv is None:
            return
        metrics.turns.get(p["account"], "fallback").inc()
        sent: list[str] = []
        try:
            out = await self.sender.send_text(
                acct, conv, f"fallback:{p['wamid']}", acct.fallback_message, kind="fallback", reply_to=p["wamid"]
            )
            sent = out.sent
        except (Retry, Fatal, GraphError, GraphUnreachable) as exc:
            log.warning("whatsapp fallback message not sent: %s", type(exc).__name__)
        # (a send as any other: erased while it was out, what it wrote goes)
        await self._after_send(p["account"], acct, conv.conversation_id, job.queued_us, [p["wamid"], *sent])

    # -- statuses ---------------------------------------------------------------------------
    async def handle_status(self, job: Job) -> None:
        p = job.payload
        acct = self.accounts.get(p.get("account", ""))
        if acct is None:
            raise Fatal("the account is no longer configured")
        await store.record_status(self.pool, acct.tenant, p["account"], p)
        if p["status"] == "failed" and p.get("error") == str(WINDOW_CLOSED):
            await self._window_failure(acct, p)

    async def _window_failure(self, acct: WhatsAppAccount, status: dict) -> None:
        """Meta accepted a free-form message, then failed it for the closed 24-hour window (131047
        in a status): the window template goes instead (once), or the text is held. For a turn's
        answer the job sends only what did not reach the customer (``_window_rest``)."""
        sent = await store.outbound(self.pool, acct.tenant, status["account"], status["wamid"])
        if sent is None:  # an inbound message's wamid: not a send of ours
            return
        if not sent["conversation_id"]:
            # The status came before the send's own record (Meta can answer the webhook before the
            # sender has written it): retried with backoff until it is there, dead-lettered (and
            # so reported) if it never is: a send of ours is never failed silently.
            raise LookupError("the failed send is not recorded yet")
        if sent["kind"] == "template" or not sent["body"]:
            return
        conv = await store.find_conversation(self.pool, acct.tenant, sent["conversation_id"], self.accounts)
        if conv is None or conv.account != status["account"]:
            return
        body, key, whole = sent["body"], f"windowfail:{status['wamid']}", False
        if sent["reply_to"]:  # one template for the whole answer, however many of its pieces fail
            key = f"windowfail:{sent['reply_to']}"
            # The whole answer as the turn noted it before its first piece went: a piece's failure
            # can come before the later pieces are sent (and recorded), and its template would then
            # carry only the first ones.
            turn = await self.sender.state(conv.account, f"turn:{sent['reply_to']}") if sent["kind"] == "text" else {}
            if turn.get("reply", "").strip():
                body, whole = turn["reply"], True
            else:
                texts = await store.turn_texts(
                    self.pool, acct.tenant, conv.account, conv.conversation_id, sent["reply_to"]
                )
                body = " ".join(texts) or body
        # Sent from the conversation's ordered queue, not from here: this queue is unordered, and
        # two pieces' failures (two jobs, on two workers or replicas) each sending the templates of
        # one key raced: one throttled on the first template, the other went on with the later
        # ones, and the customer read the answer's end before its beginning. There, one job at a
        # time sends them in order (the other finds them sent), behind the conversation's turns.
        payload = {
            "kind": "send",
            "account": conv.account,
            "tenant": acct.tenant,
            "pnid": conv.pnid,
            "wa_id": conv.wa_id,
            "conversation_id": conv.conversation_id,
            "text": body,
            "window_closed": True,
            "reply_to": sent["reply_to"],
            "idempotency": key,
            "turn": whole,  # the turn's whole answer: the job sends only what did not reach the customer
        }
        dedupe = hashlib.sha256(f"windowfail|{conv.account}|{key}".encode()).hexdigest()
        await self.inbound.enqueue(payload, key=conversation_key(conv.account, conv.pnid, conv.wa_id), dedupe=dedupe)


def turn_idempotency_key(head: dict, n: int, agent: str, content, variables: dict, customer: str | None = None) -> str:
    """The gateway's Idempotency-Key of a turn: its first message, how many it answers, and what
    is asked (the agent, the content, the variables). A try that died after the gateway answered
    (before its acknowledgement) is sent again with the same key and gets the same answer,
    stored once in the conversation's memory. A retry whose content came out otherwise (media
    that could be downloaded then and not now) is another request: answered anew, where the same
    key would get 422 and the turn would die with the fallback message. ``customer``: the turn's
    attribution headers (x-gateway-user/-customer) are part of what is asked too — a turn first
    tried by a worker that sent none (before an upgrade) is answered anew, not refused with 422."""
    asked = orjson.dumps(
        [agent, content, variables, *([{"customer": customer}] if customer is not None else [])],
        option=orjson.OPT_SORT_KEYS,
    )
    turn = f"{head['account']}|{head['wamid']}|{n}|".encode() + asked
    return "wa-" + hashlib.sha256(turn).hexdigest()[:48]


def _variables(conv: store.Conversation, head: dict) -> dict:
    return {
        "customer_name": conv.name or "",
        "customer_number": conv.wa_id,
        "business_number": head.get("display") or "",
        "channel": "whatsapp",
    }
