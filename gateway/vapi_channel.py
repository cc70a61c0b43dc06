"""Composes the VAPI channel (channels/vapi) into a gateway process: validates the accounts of
``channels.vapi`` at start-up, checks each account's gateway key belongs to its tenant, and
gives the channel what it cannot import itself — the tenant transaction for its call records, Redis
for the records an erasure's lock kept out (``channels.vapi.spool``, written by its writer),
the agent tool runner for ``tool-calls`` messages, the delivery registry, the gateway's
failed-authentication limiter (per client address, shared with the API's keys) and the
account key's identity through the key cache (so a key revoked or moved after start-up stops
the account's tools and outbound calls, as the gateway refuses its model turns)."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from types import SimpleNamespace

from channels.vapi import VapiChannel, VapiDeliverer, parse_accounts
from channels.vapi.calls import CallStore
from channels.vapi.events import Events
from channels.vapi.spool import Spool, Writer
from core.config import ConfigError
from core.errors import GatewayError, QuotaExceeded
from core.http import client_address, parse_networks
from gateway import agent_stage
from gateway.db import tenant_transaction
from policies import alerts
from runtime.delivery import Delivered, Outbound

log = logging.getLogger("gateway.channels.vapi")


class _Guard:
    """The Authenticator's failed-authentication limiter, keyed by the client address as the
    gateway reads it (X-Forwarded-For from trusted proxies only).

    VAPI sends from egress addresses every VAPI customer shares, so anyone can make failed
    attempts come from VAPI's own addresses (an assistant of theirs pointed at this URL). An
    address that presented a right credential within ``GOOD_FOR_S`` is therefore never refused
    before comparing (its wrong guesses still fail, and still count): throttling it would let
    that anyone cut every tenant's calls off. Addresses that never succeeded are refused once
    over the limit, before any comparison."""

    GOOD_FOR_S = 3600.0
    MAX_GOOD = 4096

    def __init__(self, limiter, trusted_proxies) -> None:
        self.limiter = limiter
        self.trusted = parse_networks(trusted_proxies)
        self.good: OrderedDict[object, float] = OrderedDict()

    def _bucket(self, scope: dict):
        return self.limiter.bucket(client_address(scope, self.trusted))

    def retry_after(self, scope: dict) -> float:
        if not self.limiter.enabled:
            return 0.0
        bucket = self._bucket(scope)
        until = self.good.get(bucket)
        if until is not None and until > time.monotonic():
            return 0.0
        return self.limiter.retry_after(bucket)

    def failed(self, scope: dict) -> None:
        if self.limiter.enabled:
            self.limiter.failed(self._bucket(scope))

    def succeeded(self, scope: dict) -> None:
        if self.limiter.enabled:
            bucket = self._bucket(scope)
            self.good[bucket] = time.monotonic() + self.GOOD_FOR_S
            self.good.move_to_end(bucket)
            if len(self.good) > self.MAX_GOOD:
                self.good.popitem(last=False)


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
    problems = []
    for name, account in accounts.items():
        try:
            ident = await svc.auth.authenticate(f"Bearer {account.api_key}".encode())
        except GatewayError:
            problems.append(f"channels.vapi.{name}.api_key: not an active key of the gateway")
            continue
        if ident.is_master or ident.tenant != account.tenant:
            problems.append(f"channels.vapi.{name}.api_key: must be a key of tenant {account.tenant!r}")
        else:
            svc.channel_keys.add(ident.key_id)
    if problems:
        raise ConfigError(problems)

    async def identity(account):
        """The account key's identity now (the key cache: no database round trip while it is
        fresh; revocations arrive by pub/sub), or None when it is no longer its tenant's."""
        try:
            ident = await svc.auth.authenticate(f"Bearer {account.api_key}".encode())
        except GatewayError:
            return None
        return None if ident.is_master or ident.tenant != account.tenant else ident

    async def active(account) -> bool:
        return await identity(account) is not None

    async def run_tools(account, agent_name: str, calls: list[dict], context: dict, timeout_s: float):
        agent = svc.agents.get(account.tenant, agent_name)
        ident = await identity(account)  # this account's own key, as it is now
        if agent is None or ident is None or not agent_stage.allowed_identity(ident, agent.name, agent.model):
            return [(False, "the agent is not available")] * len(calls)
        turn = SimpleNamespace(agent=agent, citations=[])  # what builtin handlers read of a turn
        results = await svc.tools.run(
            agent, calls, deadline=time.monotonic() + timeout_s, context={**context, "turn": turn}
        )
        return [(r.status == "ok", r.content) for r in results]

    async def charge(account, agent: str | None, customer: str | None, cost: float) -> None:
        """A call's telephony in the budgets its ledger record falls under (tenant, agent,
        customer, tag ``vapi``; not key budgets: the record names no key). After the report
        is stored: should Redis fail now, the ledger has the cost and the budgets miss it."""
        if not svc.config.policies.enabled:
            return
        attr = {"tenant": account.tenant, "agent": agent, "customer": customer, "tags": ["vapi"]}
        try:
            fired = await svc.policies.charge(attr, cost)
        except Exception as exc:
            log.error("VAPI call cost not counted in budgets: %s", type(exc).__name__)
            return
        if fired:
            alerts.fired(fired)

    async def admit_call(account, agent: str, to: str) -> None:
        """An outbound call is telephony its budgets will be charged: none is placed while a hard
        budget it falls under (as its report will: tenant, agent, customer, tag) is used up."""
        if not svc.config.policies.enabled:
            return
        customer = to if account.attribute_customer else None
        attr = {"tenant": account.tenant, "agent": agent, "customer": customer, "tags": ["vapi"]}
        hard = [b for b in svc.budgets.applicable(attr) if b.enforcement == "hard"]
        if not hard:
            return
        values = await svc.redis.mget([b.keys()[0] for b in hard])
        for b, value in zip(hard, values, strict=True):
            if int(value or 0) >= b.limit_nano:
                raise QuotaExceeded(
                    f"Budget exceeded: the {b.period} budget of {b.limit_usd:g} USD for {b.scope} "
                    f"'{b.scope_value[:64]}' is used up; no call is placed."
                )

    store = CallStore(lambda tenant: tenant_transaction(svc.pool, tenant), svc.config.server.erasure_lock_wait_s)
    guard = _Guard(svc.auth.limiter, svc.config.server.trusted_proxies)
    spool = Spool(svc.redis)
    events = Events(store, run_tools, active, charge, spool=spool, accounts=accounts)
    channel = VapiChannel(
        accounts,
        store,
        events,
        svc.upstream,
        svc.config.channels.gateway_url,
        guard=guard,
        active=active,
        admit_call=admit_call,
        writer=Writer(spool, events.apply, [(a.tenant, name) for name, a in accounts.items()]),
    )
    await channel.start()
    svc.delivery.register("vapi", _Deliverer(VapiDeliverer(channel)))
    return channel
