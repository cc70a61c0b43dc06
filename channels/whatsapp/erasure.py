"""What an erasure or a retention of WhatsApp conversations deletes in the channel's own stores
(its PostgreSQL records lose their words through ``runtime.conversations.forget_copies``): the
inbound queue's dead letters of the conversations (``dead_letters``), the send states of their
turns and sends in Redis (``sender.forget_states``: a turn's holds the agent's answer, kept 8 days
so that a retry sends it again rather than asking anew), and the customer's documents, audio and
images kept under the data directory (``content.forget_media``). For the tenant named only; ids
of other channels are passed over. Needs no account configured in this process: Redis
and the data directory the channel's worker shares."""

from __future__ import annotations

from pathlib import Path

from channels.whatsapp import dead_letters
from channels.whatsapp.content import forget_media
from channels.whatsapp.sender import forget_states


async def forget(redis, data_dir: Path, tenant: str, conversations: list[str]) -> None:
    """Redis first (its failure is the caller's: the erasure is repeated), then the files."""
    await dead_letters.drop(redis, tenant, conversations)
    await forget_states(redis, tenant, [c for c in conversations if c.startswith(dead_letters.PREFIX)])
    await forget_media(data_dir, tenant, conversations)
