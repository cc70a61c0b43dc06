"""Self-review s24 (an attacker's review of the WhatsApp template path, the channel ids, the VAPI
end user and the fuzzers' no-write digest): each test is a finding that failed before its fix.
The WhatsApp end-to-end findings sit beside their kin in test_channels_whatsapp.py."""

from __future__ import annotations

import uuid

from channels.config import PHONE_NUMBER_ID
from channels.vapi import llm, parse_accounts, wire
from channels.whatsapp import normalize
from tests.test_channels_units import _doc


def _m(sender: str) -> dict:
    return {"from": sender, "id": f"wamid.{uuid.uuid4().hex}", "timestamp": "1", "type": "text", "text": {"body": "hi"}}


def test_ids_with_a_trailing_new_line_are_refused():
    """``$`` in a Python regex also matches before a string's final new line: "4412\\n" passed as
    a WhatsApp id (a conversation keyed by a number no send reaches), "1234\\n" as a phone
    number id, and a VAPI call id "call-1\\n" became the turn's ``x-gateway-user`` header, a
    header with a line break the gateway request refused (the caller's turn failed)."""
    agent_for = {"111": "bot", "111\n": "bot"}.get
    parsed = normalize.parse(_doc([_m("4412\n"), _m("4412")]), "acct", agent_for)
    assert [m["wa_id"] for m in parsed.messages] == ["4412"]
    assert normalize.parse(_doc([_m("4412")], pnid="111\n"), "acct", agent_for).messages == []
    statuses = [{"id": "wamid.a", "status": "read", "timestamp": "1", "recipient_id": "4412\n"}]
    assert normalize.parse(_doc(statuses=statuses), "acct", agent_for).statuses[0]["wa_id"] is None
    assert normalize.parse(_doc(statuses=[{**statuses[0], "id": "wamid.a\n"}]), "acct", agent_for).statuses == []
    assert not PHONE_NUMBER_ID.match("1234\n")

    auth = {"bearer_token": "x" * 32}
    accounts = {
        "a": {
            "tenant": "t",
            "api_key": "sk-gw-aaaaaaaaaaaa",
            "public_url": "https://gw.example",
            "auth": auth,
            "default_agent": "bot",
        }
    }
    account = parse_accounts(accounts)["a"]
    info = wire.call_info({"id": "call-1\n", "type": "webCall"})
    assert info.call_id is None and llm.end_user(account, info) is None
    phone = wire.call_info({"id": "call-2", "type": "inboundPhoneCall"}, None, {"number": "+14155550100\n"})
    assert phone.customer_number is None and llm.end_user(account, phone) == "vapi-call:call-2"
    body = {"messages": [{"role": "user", "content": "hi"}], "call": {"id": "call-1\n", "type": "webCall"}}
    _, headers = llm.gateway_request(account, body)
    assert all("\n" not in v for v in headers.values()), headers
