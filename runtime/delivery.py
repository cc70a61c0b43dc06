"""Delivering a message to a conversation's customer outside a model turn (a human's reply to an
escalation, a held reply released later) through whichever channel owns the conversation.

The runtime does not know the channels (they sit above it): the composition registers one
``Deliverer`` per channel at start-up, and ``Delivery.deliver`` asks each in turn. A deliverer
answers ``None`` for a conversation it does not own (it checks its own records, never a prefix
of the client-chosen conversation id), else the outcome of its send. A conversation no channel
owns is a plain API conversation: the message is only stored in memory, where the client reads
it (nothing is pushed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger("gateway.delivery")


@dataclass(frozen=True)
class Outbound:
    """One message for a conversation's customer."""

    tenant: str
    agent: str  # the agent's name
    conversation_id: str  # the external id the conversation was created with
    text: str
    kind: str = "human_reply"  # human_reply | held_reply | notice
    ref: str | None = None  # what it answers (an escalation id), for idempotency on the channel side
    # When it was asked for (µs, Redis's clock): a channel whose conversations an erasure marks
    # sends nothing once the conversation was erased since (``erased``), and keeps nothing of a
    # send the erasure overtook. None: not checked.
    queued_us: int | None = None


@dataclass(frozen=True)
class Delivered:
    channel: str  # whatsapp, vapi, api
    status: str  # sent | queued | stored | failed | erased (the conversation was erased meanwhile: not sent)
    detail: str | None = None  # a channel message id, or why it failed
    extra: dict = field(default_factory=dict)


class Deliverer(Protocol):
    async def deliver(self, message: Outbound) -> Delivered | None: ...


class Delivery:
    """The registry of channel deliverers (one per channel, registered by the composition)."""

    def __init__(self) -> None:
        self._deliverers: dict[str, Deliverer] = {}

    def register(self, channel: str, deliverer: Deliverer) -> None:
        self._deliverers[channel] = deliverer

    @property
    def channels(self) -> tuple[str, ...]:
        return tuple(self._deliverers)

    async def deliver(self, message: Outbound) -> Delivered:
        for channel, deliverer in self._deliverers.items():
            try:
                out = await deliverer.deliver(message)
            except Exception as exc:  # a broken channel must not hide the message: report it
                log.warning("delivery failed", extra={"fields": {"channel": channel, "error": type(exc).__name__}})
                return Delivered(channel, "failed", type(exc).__name__)
            if out is not None:
                return out
        return Delivered("api", "stored")
