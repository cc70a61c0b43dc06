"""Composition of the WhatsApp channel into a gateway process: built from the config at start-up
(invalid accounts stop the start with every problem listed), its deliverer registered for the
runtime's deliveries (human replies), its worker started unless ``GATEWAY_CHANNEL_WORKER=0``.

The channel calls the gateway over HTTP: ``channels.gateway_url``, else the address ``gateway
serve`` listens on (``GATEWAY_SELF_URL``, set by the CLI), else http://127.0.0.1:8000.
"""

from __future__ import annotations

import logging
import os

from channels.whatsapp import WhatsApp
from channels.whatsapp.channel import worker_enabled
from core.errors import GatewayError
from runtime.delivery import Delivered, Outbound

log = logging.getLogger("gateway")


def gateway_url(config) -> str:
    return config.channels.gateway_url or os.environ.get("GATEWAY_SELF_URL") or "http://127.0.0.1:8000"


class DeliveryAdapter:
    """runtime/delivery.py's Deliverer over the channel's own deliverer."""

    def __init__(self, channel: WhatsApp) -> None:
        self.channel = channel

    async def deliver(self, message: Outbound) -> Delivered | None:
        out = await self.channel.deliverer.deliver(message)
        if out is None:
            return None
        status, detail = out
        if status == "held":  # outside the window with no template: it did not reach the customer
            return Delivered("whatsapp", "failed", f"held: {detail}", {"whatsapp_status": status})
        return Delivered("whatsapp", status, detail, {"whatsapp_status": status})


async def start(svc, settings, *, worker: bool | None = None) -> WhatsApp | None:
    channel = await WhatsApp.from_config(
        settings.config.channels,
        redis=svc.redis,
        database_url=settings.database_url,
        data_dir=settings.data_dir.resolve(),
        gateway_url=gateway_url(settings.config),
        redis_url=settings.redis_url,
    )
    if channel is None:
        return None
    try:
        for name, account in settings.config.channels.whatsapp.items():  # their keys hold wa: conversations
            key = account.get("api_key") if isinstance(account, dict) else None
            try:
                ident = await svc.auth.authenticate(f"Bearer {key}".encode()) if isinstance(key, str) else None
            except GatewayError:
                ident = None
            if ident is None:
                log.warning("whatsapp account %s: its api_key is not an active key of the gateway", name)
            else:
                svc.channel_keys.add(ident.key_id)
        svc.delivery.register("whatsapp", DeliveryAdapter(channel))
        if worker_enabled() if worker is None else worker:
            await channel.start_worker()
    except BaseException:  # the channel's pool, clients and workers: stopped, not left open
        await channel.stop()
        raise
    return channel
