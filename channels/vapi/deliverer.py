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
  (``sent``, the new call's id). A message with a ``ref`` calls at most once per ref.

``outcome`` answers ``(status, detail)`` or None for a conversation that is not a VAPI call;
the composition turns it into runtime.delivery's ``Delivered``.
"""

from __future__ import annotations

LIVE = frozenset({"scheduled", "queued", "ringing", "in-progress", "forwarding"})


class VapiDeliverer:
    def __init__(self, channel) -> None:
        self.channel = channel  # VapiChannel

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
        if ref is not None and await store.callback_for(tenant, ref) is not None:
            return "sent", "already called back"
        new_call = await self.channel.call_back(call, account, text, ref)
        return "sent", new_call
