"""PII scrubbing end to end: what reaches the provider, what the client sees, what is recorded."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


def test_stream_restores_placeholders_split_across_chunks(pii_client, mock):
    mock.clear()
    text = f'Reach me at {EMAIL} or {PHONE}, order {ORDER}. [[mock:{{"chunks": 400}}]]'
    stream = pii_client.chat.completions.create(
        model="gpt-mock",
        messages=[{"role": "user", "content": text}],
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(pieces) > 40  # character by character: placeholders were cut into pieces upstream
    reply = "".join(pieces)
    assert EMAIL in reply and PHONE in reply and ORDER in reply
    assert "<EMAIL_1>" not in reply and "<" not in reply.replace("[[", "")
    sent = _sent(mock)
    assert EMAIL not in sent and PHONE not in sent and ORDER not in sent


def _tools():
    return [
        {
            "type": "function",
            "function": {
                "name": "send_mail",
                "parameters": {"type": "object", "properties": {"to": {"type": "string"}}, "required": ["to"]},
            },
        }
    ]


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_arguments_restored(pii_client, mock, stream):
    mock.clear()
    text = f"Write to {EMAIL}"
    kwargs = {"model": "gpt-mock", "messages": [{"role": "user", "content": text}], "tools": _tools()}
    if stream:
        args = ""
        for c in pii_client.chat.completions.create(**kwargs, stream=True):
            for call in (c.choices[0].delta.tool_calls or []) if c.choices else []:
                args += call.function.arguments or ""
    else:
        out = pii_client.chat.completions.create(**kwargs)
        args = out.choices[0].message.tool_calls[0].function.arguments
    assert json.loads(args)["to"] == f"Write to {EMAIL}"
    assert EMAIL not in _sent(mock)


def test_tool_arguments_and_results_in_history_are_scrubbed(pii_client, mock):
    mock.clear()
    messages = [
        {"role": "user", "content": [{"type": "text", "text": f"Send the invoice to {EMAIL}"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": json.dumps({"email": EMAIL, "ip": IP})},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": f"Customer phone {PHONE}, order {ORDER}"},
    ]
    out = pii_client.chat.completions.create(model="gpt-mock", messages=messages)
    sent = _sent(mock)
    for value in (EMAIL, IP, PHONE, ORDER):
        assert value not in sent
    body = mock.last()["body"]
    assert json.loads(body["messages"][1]["tool_calls"][0]["function"]["arguments"]) == {
        "email": "<EMAIL_1>",
        "ip": "<IP_ADDRESS_1>",
    }
    # The mock answers a tool result with it: the client sees the originals.
    assert PHONE in out.choices[0].message.content and ORDER in out.choices[0].message.content


def test_embeddings_input_is_scrubbed(pii_client, mock):
    mock.clear()
    pii_client.embeddings.create(model="embed-mock", input=[f"contact {EMAIL}", "nothing here", f"call {PHONE}"])
    body = mock.last()["body"]
    assert body["input"] == ["contact <EMAIL_1>", "nothing here", "call <PHONE_1>"]


def test_block_names_entity_types_never_values(pii_gateway, api_key, mock, services, tmp_root):
    from tests.conftest import run_cli

    out = run_cli("keys", "create", "--name", "strict", "--pii-policy", "strict", urls=services, tmp=tmp_root)
    strict_key = out.stdout.splitlines()[0].strip()
    mock.clear()
    with openai.OpenAI(base_url=f"{pii_gateway.url}/v1", api_key=strict_key, max_retries=0) as c:
        with pytest.raises(openai.BadRequestError) as err:
            c.chat.completions.create(
                model="gpt-mock",
                messages=[
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": f"my card is {CARD} and mail {EMAIL}"},
                ],
            )
        body = err.value.body
        assert body["code"] == "pii_blocked" and body["param"] == "messages[1].content"
        assert "CREDIT_CARD" in body["message"] and "EMAIL" in body["message"]
        assert CARD not in json.dumps(body) and EMAIL not in json.dumps(body)
        # The same key's phone numbers are pseudonymized: its policy replaces the default one.
        c.chat.completions.create(model="gpt-mock", messages=[{"role": "user", "content": f"{PHONE} {IP}"}])
    assert mock.requests() and PHONE not in _sent(mock) and IP in _sent(mock)
    assert CARD.replace(" ", "") not in pii_gateway.log().replace(" ", "")
    assert EMAIL not in pii_gateway.log()


def test_model_policy_lets_pii_through_to_a_trusted_model(pii_client, mock):
    mock.clear()
    pii_client.chat.completions.create(model="gpt-local", messages=[{"role": "user", "content": EMAIL}])
    assert EMAIL in _sent(mock)


def _metric(gw: Gateway, name: str, **labels) -> float:
    text = httpx.get(f"{gw.url}/metrics").text
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_earlier_turns_are_not_analysed_again(pii_client, pii_gateway, mock):
    history = [{"role": "system", "content": "You are a support agent."}]
    for turn in range(20):
        history.append({"role": "user", "content": f"Turn {turn}: my number is +1 202 555 01{turn:02d}, mail {EMAIL}"})
        history.append({"role": "assistant", "content": f"Noted, turn {turn}."})
    pii_client.chat.completions.create(model="gpt-mock", messages=history)
    analysed = _metric(pii_gateway, "gateway_pii_texts_total", outcome="analysed")
    cached = _metric(pii_gateway, "gateway_pii_texts_total", outcome="cached")
    history.append({"role": "user", "content": f"And my other mail is x.{EMAIL}"})
    mock.clear()
    pii_client.chat.completions.create(model="gpt-mock", messages=history)
    assert _metric(pii_gateway, "gateway_pii_texts_total", outcome="analysed") == analysed + 1
    assert _metric(pii_gateway, "gateway_pii_texts_total", outcome="cached") >= cached + 41
    sent = mock.last()["body"]["messages"]
    assert sent[1]["content"] == "Turn 0: my number is <PHONE_1>, mail <EMAIL_1>"  # stable numbering
    assert sent[-1]["content"] == "And my other mail is <EMAIL_2>"


def test_counts_in_metrics_and_audit_record(pii_gateway, api_key, mock):
    before = _metric(pii_gateway, "gateway_pii_entities_total", entity="EMAIL", action="pseudonymize")
    r = httpx.post(
        f"{pii_gateway.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {api_key}"},
        json={"model": "gpt-mock", "messages": [{"role": "user", "content": f"{EMAIL} and b.{EMAIL} and {PHONE}"}]},
        timeout=30,
    )
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    from tests.conftest import wait_until

    # counted once the request is accounted for, after its answer went out (app.py, finally)
    wait_until(
        lambda: _metric(pii_gateway, "gateway_pii_entities_total", entity="EMAIL", action="pseudonymize") >= before + 2,
        timeout=10,
        what="the request's entities counted",
    )
    assert _metric(pii_gateway, "gateway_pii_entities_total", entity="EMAIL", action="pseudonymize") == before + 2

    def record():
        got = httpx.get(f"{pii_gateway.url}/admin/requests/{rid}", headers={"Authorization": f"Bearer {MASTER_KEY}"})
        return got.json() if got.status_code == 200 else None

    wait_until(record, timeout=20, what="audit record")
    assert record()["pii_entities"] == {"EMAIL": 2, "PHONE": 1}
    assert EMAIL not in pii_gateway.log()
    line = next(json.loads(x) for x in pii_gateway.log().splitlines() if rid in x and '"msg":"request"' in x)
    assert line["pii_entities"] == {"EMAIL": 2, "PHONE": 1} and line["pii_ms"] > 0


def test_analysis_worker_killed_fails_closed_then_recovers(pii_client, pii_gateway, mock):
    import os
    import signal
    import subprocess

    from tests.conftest import wait_until

    def worker_pids() -> list[int]:
        out = subprocess.run(["pgrep", "-f", "policies.pii.workers"], capture_output=True, text=True).stdout
        mine = []
        for pid in map(int, out.split()):
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pii_gateway.proc.pid:
                    mine.append(pid)
        return mine

    (pid,) = worker_pids()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: pid not in worker_pids(), what="the worker gone")
    mock.clear()
    statuses = []
    for i in range(3):
        try:
            pii_client.chat.completions.create(
                model="gpt-mock", messages=[{"role": "user", "content": f"mail {i}.{EMAIL}"}]
            )
            statuses.append(200)
        except openai.APIStatusError as err:
            assert err.status_code == 503 and err.body["code"] == "pii_unavailable"
            statuses.append(503)
    assert statuses[-1] == 200  # a new worker took over
    assert all(EMAIL not in json.dumps(r["body"]) for r in mock.requests())  # nothing left unscrubbed
    wait_until(lambda: len(worker_pids()) == 1 and worker_pids()[0] != pid, what="new worker")


def test_every_pair_of_personal_values_is_scrubbed(pii_gateway, api_key, mock):
    """Every value beside every other (and itself), in both orders: the adjacency the fuzz test
    below samples at random, swept whole. It found "4111 1111 1111 1111 219-09-9999" (a card read
    as 19 digits that hid the SSN)."""
    values = [EMAIL, PHONE, CARD, IBAN, SSN, IP, ORDER]
    texts = [f"{a}{sep}{b}" for a in values for b in values for sep in (" ", ", ", "\n")]
    mock.clear()
    r = httpx.post(
        f"{pii_gateway.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {api_key}"},
        json={"model": "gpt-mock", "messages": [{"role": "user", "content": t} for t in texts]},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    sent = [m["content"] for m in mock.last()["body"]["messages"]]
    leaks = [
        (t, v) for t, out in zip(texts, sent, strict=True) for v in (EMAIL, PHONE, IBAN, SSN, IP, ORDER) if v in out
    ]
    assert not leaks, leaks[:5]


# derandomized: the same examples on every run, so CI is stable (the pair sweep above covers the
# neighbours exhaustively); drop derandomize locally to explore new examples
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=True)
@given(
    parts=st.lists(
        st.one_of(
            st.text(max_size=30),
            st.sampled_from([EMAIL, PHONE, CARD, IBAN, SSN, IP, ORDER, "<EMAIL_1>", "<", "@", "::", "4111"]),
        ),
        max_size=12,
    ),
    stream=st.booleans(),
)
def test_fuzz_content_never_errors_and_never_leaks(pii_gateway, api_key, mock, parts, stream):
    text = " ".join(parts)
    mock.clear()
    r = httpx.post(
        f"{pii_gateway.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {api_key}"},
        json={"model": "gpt-mock", "stream": stream, "messages": [{"role": "user", "content": text}]},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    sent = json.dumps(mock.last()["body"], ensure_ascii=False) if mock.requests() else ""
    for value in (EMAIL, PHONE, IBAN, SSN, IP, ORDER):
        assert value not in sent
