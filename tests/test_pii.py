"""PII scrubbing end to end: what reaches the provider, what the client sees, what is recorded."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import MASTER_KEY, Gateway, gateway_config

EMAIL = "jane.roe@example.org"
PHONE = "+44 20 7946 0958"
CARD = "4111 1111 1111 1111"
IBAN = "DE89 3704 0044 0532 0130 00"
SSN = "219-09-9999"
IP = "203.0.113.42"
ORDER = "ORD-48213"

PII_CONFIG = {
    "recognizers": [{"name": "order_id", "pattern": r"\bORD-\d{5}\b", "score": 0.9}],
    "hash_secret": "test-pii-secret",
    "policies": {
        "default": {
            "entities": {
                "email": "pseudonymize",
                "phone": "pseudonymize",
                "credit_card": "mask",
                "iban": "redact",
                "us_ssn": "hash",
                "ip_address": "pseudonymize",
                "order_id": "pseudonymize",
            }
        },
        "strict": {"entities": {"email": "block", "credit_card": "block", "phone": "pseudonymize"}},
        "open": {"entities": {}},
    },
    "models": {"gpt-local": "open"},
}


@pytest.fixture(scope="module")
def pii_gateway(tmp_root, services, mock):
    cfg = gateway_config(mock, pii=PII_CONFIG)
    cfg["models"].append({"name": "gpt-local", "deployments": [{"provider": "mock-openai", "model": "mock-local"}]})
    gw = Gateway(tmp_root, cfg, services)
    yield gw
    gw.stop()


@pytest.fixture
def pii_client(pii_gateway, api_key):
    with openai.OpenAI(base_url=f"{pii_gateway.url}/v1", api_key=api_key, max_retries=0, timeout=30) as c:
        yield c


def _sent(mock) -> str:
    return json.dumps(mock.last()["body"])


def test_nonstream_pseudonyms_restored_and_nothing_original_reaches_provider(pii_client, mock):
    mock.clear()
    text = f"Mail {EMAIL} or call {PHONE} about {ORDER}; card {CARD}, IBAN {IBAN}, SSN {SSN}, from {IP}."
    out = pii_client.chat.completions.create(model="gpt-mock", messages=[{"role": "user", "content": text}])
    sent = _sent(mock)
    for value in (EMAIL, PHONE, CARD, IBAN, SSN, IP, ORDER):
        assert value not in sent
    assert "<EMAIL_1>" in sent and "<PHONE_1>" in sent and "<ORDER_ID_1>" in sent and "<IP_ADDRESS_1>" in sent
    assert "**** **** **** 1111" in sent and "<IBAN>" in sent and "<US_SSN:" in sent
    reply = out.choices[0].message.content
    assert EMAIL in reply and PHONE in reply and ORDER in reply and IP in reply
    assert CARD not in reply  # masked values are not restorable, by design
