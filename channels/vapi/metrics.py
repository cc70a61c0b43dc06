"""The VAPI channel's Prometheus counters. Labels are fixed vocabularies: a message type VAPI
(or anyone) sends is counted under its name only when it is a known type, else ``other``."""

from __future__ import annotations

from prometheus_client import Counter

KNOWN_TYPES = frozenset(
    {
        "assistant-request",
        "tool-calls",
        "transfer-destination-request",
        "status-update",
        "end-of-call-report",
        "transcript",
        "conversation-update",
        "speech-update",
        "hang",
        "model-output",
        "user-interrupted",
        "voice-input",
    }
)

EVENTS = Counter("gateway_vapi_events_total", "VAPI server messages handled, by type", ["type"])
REFUSED = Counter(
    "gateway_vapi_refused_total",
    "VAPI requests refused before parsing (bad credential or unknown account)",
    ["endpoint"],
)
TURNS = Counter(
    "gateway_vapi_turns_total", "Custom-LLM turns relayed to the gateway, by the gateway's status class", ["status"]
)


def event(kind: str) -> None:
    EVENTS.labels(kind if kind in KNOWN_TYPES else "other").inc()
