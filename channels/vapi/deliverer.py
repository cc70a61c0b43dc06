"""Messages for a call's customer outside a model turn (a human's reply to an escalation).

A phone call has no way in from outside: nothing can be spoken into a live VAPI call through
its API, and once it ended there is no thread to post to. So for a conversation that is one of
this channel's calls (found in ``vapi_calls`` by tenant and conversation id, never by the id's
``vapi:`` prefix):

- the call is live: ``failed`` — "call in progress; no way to speak into it" (the agent is on
  the line; the human's answer is in memory for the agent's next turn);
- it ended, with the account's ``delivery: report`` (the default): ``failed`` — "call ended;
  no outbound path", so whoever sent it knows the customer did not hear it;
- it ended, with ``delivery: callback`` and the caller's number known: an outbound call to the
  customer whose assistant speaks the message first, then carries on as the agent
  (``sent``, the new call's id);
- its conversation was erased (the record holds the erasure's tag in place of the number):
  ``failed`` — "call ended; its caller's number was erased".

Each callback is a phone call the tenant pays for, placed to a number the inbound call named,
so they are bounded: a message without a ``ref`` (what makes a retry recognizable) is not
called back; a ``ref`` calls at most once per distinct text (checked and placed under a lock
of this process and a PostgreSQL advisory lock of the call, across replicas: the same reply
delivered again is not called twice, but a person's second reply in one escalation is a
message of its own, never reported sent while nobody heard it);
one call's customer is called back at most ``MAX_CALLBACKS_PER_CALL`` times whatever the refs;
a web call is never called back (its "number" is whatever the visitor wrote).

``outcome`` answers ``(status, detail)`` or None for a conversation that is not a VAPI call;
the composition turns it into runtime.delivery's ``Delivered``.
"""

from __future__ import annotations

import asyncio
import hashlib
import weakref

from core.erasure_key import TAG_PREFIX

MAX_CALLBACKS_PER_CALL = 3
LIVE = frozenset({"scheduled", "queued", "ringing", "in-progress", "forwarding"})


class VapiDeliverer:
    def __init__(self, channel) -> None:
        self.channel = channel  # VapiChannel
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        # A callback holds one pooled connection (its advisory lock) and takes another for each
        # query: few at a time, so callbacks of many tenants never take a pool's last connection.
        self._slots = asyncio.Semaphore(2)

    async def outcome(
        self, tenant: str, conversation_id: str, text: str, ref: str | None = None
    ) -> tuple[str, str] | None:
        store = self.channel.store
        call = await store.by_conversation(tenant, conversation_id)
        if call is None:
            return None
        account = self.channel.accounts.get(call["account"])
        if call["status"] in LIVE and call["reported_at"] is None:
            return "failed", "call in progress; no way to speak into it"
        if account is None or account.delivery != "callback" or not call["customer_number"]:
            return "failed", "call ended; no outbound path"
        if call["customer_number"].startswith(TAG_PREFIX):
            return "failed", "call ended; its caller's number was erased"
        if call["direction"] == "web":
            return "failed", "call ended; a web call has no number to call back"
        if ref is None:
            return "failed", "call ended; a callback needs the message's reference"
        digest = hashlib.sha256(f"{conversation_id}|{text}".encode()).hexdigest()[:32]
        lock = self._locks.get(tenant)
        if lock is None:
            lock = self._locks[tenant] = asyncio.Lock()
        async with lock, self._slots, store.callback_lock(tenant, call["account"], call["call_id"]):  # across replicas
            if await store.callback_for(tenant, ref, digest) is not None:
                return "sent", "already called back"
            if await store.callbacks_of(tenant, call["account"], call["call_id"]) >= MAX_CALLBACKS_PER_CALL:
                return "failed", f"call ended; its customer was called back {MAX_CALLBACKS_PER_CALL} times already"
            new_call = await self.channel.call_back(call, account, text, ref, digest)
        return "sent", new_call
