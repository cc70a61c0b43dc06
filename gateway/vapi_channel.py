"""Composes the VAPI channel (channels/vapi) into a gateway process: validates the accounts of
``channels.vapi`` at start-up, checks each account's gateway key belongs to its tenant, and
gives the channel what it cannot import itself — the tenant transaction for its call records,
the agent tool runner for ``tool-calls`` messages, and the delivery registry."""

from __future__ import annotations

import time
from types import SimpleNamespace

from channels.vapi import VapiChannel, VapiDeliverer, parse_accounts
from channels.vapi.calls import CallStore
from channels.vapi.events import Events
from core.config import ConfigError
from core.errors import GatewayError
from gateway import agent_stage
from gateway.db import tenant_transaction
from runtime.delivery import Delivered, Outbound


class _Deliverer:
    def __init__(self, inner: VapiDeliverer) -> None:
        self.inner = inner

    async def deliver(self, message: Outbound) -> Delivered | None:
        found = await self.inner.outcome(message.tenant, message.conversation_id, message.text, message.ref)
        if found is None:
            return None
        status, detail = found
        return Delivered("vapi", status, detail)


async def start(svc) -> VapiChannel | None:
    """The channel, or None when no VAPI account is configured. Raises ConfigError naming the
    account when its settings or its key are wrong."""
    accounts = parse_accounts(svc.config.channels.vapi)
    if not accounts:
        return None
    identities = {}
    problems = []
    for name, account in accounts.items():
        try:
            ident = await svc.auth.authenticate(f"Bearer {account.api_key}".encode())
        except GatewayError:
            problems.append(f"channels.vapi.{name}.api_key: not an active key of the gateway")
            continue
        if ident.is_master or ident.tenant != account.tenant:
            problems.append(f"channels.vapi.{name}.api_key: must be a key of tenant {account.tenant!r}")
        identities[name] = ident
    if problems:
        raise ConfigError(problems)

    async def run_tools(tenant: str, agent_name: str, calls: list[dict], context: dict, timeout_s: float):
        agent = svc.agents.get(tenant, agent_name)
        keys = [i for n, i in identities.items() if accounts[n].tenant == tenant]
        if agent is None or not any(agent_stage.allowed_identity(i, agent.name, agent.model) for i in keys):
            return [(False, "the agent is not available")] * len(calls)
        turn = SimpleNamespace(agent=agent, citations=[])  # what builtin handlers read of a turn
        results = await svc.tools.run(
            agent, calls, deadline=time.monotonic() + timeout_s, context={**context, "turn": turn}
        )
        return [(r.status == "ok", r.content) for r in results]

    store = CallStore(lambda tenant: tenant_transaction(svc.pool, tenant))
    channel = VapiChannel(accounts, store, Events(store, run_tools), svc.upstream, svc.config.channels.gateway_url)
    await channel.start()
    svc.delivery.register("vapi", _Deliverer(VapiDeliverer(channel)))
    return channel
