"""The channel's Prometheus counters. Labels are the configured account names (validated at
start-up) and the channel's own outcome words, never anything the webhook sender chose."""

from __future__ import annotations

from prometheus_client import Counter

from core.metrics import _Children

WEBHOOK = Counter(
    "gateway_whatsapp_webhook_total",
    "WhatsApp notifications by account and outcome: accepted, bad_signature, invalid, queue_full",
    ["account", "outcome"],
)
ITEMS = Counter(
    "gateway_whatsapp_items_total",
    "Items of accepted notifications by account and kind: message, status, skipped (malformed or not the account's), "
    "dropped (the conversation's backlog was full)",
    ["account", "kind"],
)
SENDS = Counter(
    "gateway_whatsapp_sends_total",
    "Outbound messages by account and outcome: sent, template, held, unknown, throttled, failed",
    ["account", "outcome"],
)
TURNS = Counter(
    "gateway_whatsapp_turns_total",
    "Agent turns by account and outcome: answered, duplicate, escalated (a human holds it), fallback",
    ["account", "outcome"],
)
webhook, items, sends, turns = _Children(WEBHOOK), _Children(ITEMS), _Children(SENDS), _Children(TURNS)
