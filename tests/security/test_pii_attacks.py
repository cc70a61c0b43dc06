"""Attacks on PII scrubbing and the detection gaps a client could slip data through (issue #11,
items 2, 16, 17, 18).

Each test is one attack or one gap, named for its item. Through real HTTP where a client could
do it (gateway processes over the embedded PostgreSQL and Valkey, the mock provider recording
what left); in process where the property is of the detector itself. No test asserts a time:
"does not stall" is asserted as an order of events (the ordinary request completes while the
hostile one is still in flight), and linear work as bounded chunk sizes.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import threading

import httpx
import pytest

from loadtest import pii_corpus
from policies.pii import analysis, cards, patterns
from policies.pii.analysis import CHUNK, OVERLAP, Analyzer, Prefilter
from policies.pii.fields import encoding_for
from tests.conftest import MASTER_KEY, Gateway, gateway_config, run_cli, wait_until

EMAIL = "jane.roe@example.org"
PHONE = "+44 20 7946 0958"
EMBED = "text-embedding-3-small"  # a group named after the OpenAI model: its tokenizer is known

PII = {
    "hash_secret": "attack-secret",
    "recognizers": [{"name": "order_id", "pattern": r"\bORD-\d{5}\b", "score": 0.9}],
    "policies": {
        "default": {
            "entities": {
                "email": "pseudonymize",
                "phone": "pseudonymize",
                "credit_card": "mask",
                "order_id": "pseudonymize",
            }
        },
        "strict": {"entities": {"email": "pseudonymize", "credit_card": "block"}},
    },
}


def _config(mock, pii: dict) -> dict:
    cfg = gateway_config(mock, pii=pii)
    cfg["models"].append(
        {"name": EMBED, "mode": "embedding", "deployments": [{"provider": "mock-openai", "model": EMBED}]}
    )
    return cfg


@pytest.fixture(scope="module")
def gw(tmp_root, services, mock):
    g = Gateway(tmp_root, _config(mock, PII), services)
    yield g
    g.stop()


@pytest.fixture(scope="module")
def strict_key(services, tmp_root) -> str:
    out = run_cli("keys", "create", "--name", "pii-strict", "--pii-policy", "strict", urls=services, tmp=tmp_root)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()[0].strip()


def _post(gw: Gateway, key: str, path: str, body: dict, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{gw.url}{path}", headers={"Authorization": f"Bearer {key}"}, json=body, timeout=timeout)


def _chat(gw: Gateway, key: str, content: str, **extra) -> httpx.Response:
    body = {"model": "gpt-mock", "messages": [{"role": "user", "content": content}], **extra}
    return _post(gw, key, "/v1/chat/completions", body)


def _worker_pids(gw: Gateway) -> list[int]:
    out = subprocess.run(["pgrep", "-f", "policies.pii.workers"], capture_output=True, text=True).stdout
    mine = []
    for pid in map(int, out.split()):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == gw.proc.pid:
                    mine.append(pid)
        except FileNotFoundError:
            continue
    return mine


# --- item 2: hostile texts cost linear, bounded work, off the event loop, under a timeout ----

ADVERSARIAL = {
    "all @": "@" * 65536,
    "all digits": "7" * 65536,
    "no whitespace": ("abc.def@ghi-" * 5462)[:65536],
    "digit groups": ("4111 " * 13108)[:65536],
    "a@ glued": ("a" * 1000 + "@") * 65,
}


def test_item2_all_at_64kb_does_not_stall_other_requests(gw, api_key, mock):
    """16 KB of ``@`` stalled every request of a gateway for 14 s (the pre-filter widened each
    spot to whole words by walking the text, on the event loop). A 64 KB one is in flight —
    held at the provider for a while after scrubbing — and ordinary requests, with and without
    personal data, sent after it complete before it does."""
    hostile_done = threading.Event()
    hostile: dict = {}

    def send_hostile() -> None:
        body = {
            "model": "gpt-mock",
            "messages": [
                {"role": "user", "content": "@" * 65536},
                {"role": "user", "content": '[[mock:{"delay_ms": 2000}]] and that was it'},
            ],
        }
        try:
            hostile["response"] = _post(gw, api_key, "/v1/chat/completions", body, timeout=300)
        finally:
            hostile_done.set()

    thread = threading.Thread(target=send_hostile)
    thread.start()
    completed_during = []
    try:
        for i in range(3):
            clean = _chat(gw, api_key, f"What are your opening hours? ({i})")
            personal = _chat(gw, api_key, f"Please mail me at {i}.{EMAIL} or call {PHONE}")
            assert clean.status_code == 200 and personal.status_code == 200, (clean.text, personal.text)
            completed_during.append(not hostile_done.is_set())
    finally:
        thread.join(300)
    assert completed_during[0], "an ordinary request waited for the hostile one"
    assert hostile["response"].status_code == 200, hostile["response"].text  # served, not refused


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_item2_adversarial_64kb_texts_are_analysed_in_bounded_linear_chunks(name, tmp_path):
    """Work per text is linear: every Presidio call sees at most CHUNK characters, and all of
    them together at most the text plus the overlaps."""
    text = ADVERSARIAL[name]
    spec = pii_corpus.spec(str(tmp_path))
    chunks = Prefilter(spec).chunks(text)
    assert all(b - a <= CHUNK for a, b, *_ in chunks)
    assert sum(b - a for a, b, *_ in chunks) <= len(text) * CHUNK / (CHUNK - 2 * OVERLAP) + CHUNK
    assert [a for a, *_ in chunks] == sorted(a for a, *_ in chunks)


def test_item2_entity_across_a_chunk_cut_is_found_whole(tmp_path):
    """A window longer than a chunk is cut with overlap: an entity straddling a cut is found
    once, whole, wherever it falls."""
    spec = pii_corpus.spec(str(tmp_path))
    for shift in range(0, 40, 3):
        text = "@" * (CHUNK - 20 + shift) + " mail jane.roe@example.org now " + "@" * 9000
        (found,) = asyncio.run(Analyzer(0, 0).find(spec, [text]))
        emails = [text[a:b] for a, b, e, _ in found if e == "EMAIL_ADDRESS"]
        assert emails == ["jane.roe@example.org"], (shift, emails)


def test_item2_custom_patterns_run_on_a_linear_engine_or_under_a_timeout(monkeypatch):
    """A config pattern that backtracks catastrophically on a Python engine runs on RE2; one RE2
    cannot run (a look-ahead) is stopped by a timeout that fails the analysis — never skipped
    silently, as Presidio's own PatternRecognizer does."""
    linear = patterns.CustomPattern(r"(\w+)+@", ignore_case=False)
    assert linear.linear
    assert list(linear.spans("a" * 100_000 + "!")) == []  # exponential on a backtracking engine
    monkeypatch.setattr(patterns, "TIMEOUT_S", 0.2)
    timed = patterns.CustomPattern(r"(a|aa)+(?=b)", ignore_case=False)
    assert not timed.linear
    with pytest.raises(patterns.PatternTimeout):
        list(timed.spans("a" * 80))


def test_item2_custom_pattern_without_linear_engine_never_runs_on_the_event_loop(tmp_path):
    """Texts of a policy whose custom pattern has no linear engine are pre-filtered in the
    worker (under the call's timeout), never in the serving process."""
    runaway = analysis.CustomRecognizer("ORDER_ID", r"(a|aa)+(?=b)", 0.9, (), False)
    spec = analysis.Spec(("ORDER_ID",), ("US",), 0.4, (runaway,), None, str(tmp_path))
    assert not Prefilter(spec).linear
    assert Prefilter(pii_corpus.spec(str(tmp_path))).linear


@pytest.fixture(scope="module")
def slow_gw(tmp_root, services, mock):
    """A gateway whose analysis timeout is short and whose custom pattern backtracks."""
    pii = {
        "recognizers": [{"name": "runaway", "pattern": r"(a|aa)+(?=b)", "score": 0.9}],
        "policies": {"default": {"entities": {"email": "pseudonymize", "runaway": "redact"}}},
    }
    old = os.environ.get("GATEWAY_PII_TIMEOUT_S")
    os.environ["GATEWAY_PII_TIMEOUT_S"] = "0.5"
    try:
        g = Gateway(tmp_root, _config(mock, pii), services)
    finally:
        if old is None:
            os.environ.pop("GATEWAY_PII_TIMEOUT_S")
        else:
            os.environ["GATEWAY_PII_TIMEOUT_S"] = old
    yield g
    g.stop()


def test_item2_timed_out_analysis_gets_503_and_the_worker_is_replaced(slow_gw, api_key, mock):
    r = _chat(slow_gw, api_key, f"mail {EMAIL} first")
    assert r.status_code == 200, r.text  # the worker is ready and works
    (pid,) = _worker_pids(slow_gw)
    mock.clear()
    r = _chat(slow_gw, api_key, f"{EMAIL} " + "a" * 80)  # the pattern backtracks past the timeout
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "pii_unavailable"
    assert not mock.requests()  # nothing left unscrubbed
    wait_until(lambda: _worker_pids(slow_gw) and _worker_pids(slow_gw)[0] != pid, what="a new worker")
    assert pid not in _worker_pids(slow_gw)
    r = _chat(slow_gw, api_key, f"and now mail {EMAIL}")  # the replacement serves (once loaded)
    assert r.status_code == 200, r.text
    assert EMAIL not in json.dumps(mock.last()["body"])
    assert "exceeded" in slow_gw.log() and EMAIL not in slow_gw.log()


def test_item2_calls_queued_behind_a_timed_out_one_are_served(slow_gw, api_key, mock):
    """The killed worker had other requests queued: they are innocent, and are sent again."""
    results: dict[int, httpx.Response] = {}

    def send(i: int, content: str) -> None:
        results[i] = _chat(slow_gw, api_key, content)

    threads = [threading.Thread(target=send, args=(0, f"{EMAIL} " + "a" * 80))]
    threads += [threading.Thread(target=send, args=(i, f"{i} mail {i}.{EMAIL}")) for i in range(1, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results[0].status_code == 503
    assert all(results[i].status_code == 200 for i in range(1, 4)), {i: r.text for i, r in results.items()}


# --- item 16: card numbers of every current scheme ----------------------------------------

SCHEME_CARDS = [
    ("mastercard 2-series", "2223 0031 2200 3222"),
    ("mastercard 2-series", "2222400070000005"),
    ("mastercard 2720", "2720 9900 0000 0007"),
    ("mastercard 5-series", "5555 5555 5555 4444"),
    ("visa", "4242-4242-4242-4242"),
    ("visa 19", "4000 0000 0000 0000 006"),
    ("amex", "3782 822463 10005"),
    ("discover 6011", "6011 1111 1111 1117"),
    ("discover 644-649", "6445 6445 6445 6445"),
    ("discover 65", "6500 3112 3456 7892"),
    ("jcb", "3566 0020 2036 0505"),
    ("diners 36", "3622 720627 1667"),
    ("diners 300-305", "3056 9300 0902 0004"),
    ("diners 38", "38520000023237"),
    ("unionpay", "6200 0000 0000 0005"),
    ("unionpay 19", "6205500000000000004"),
    ("maestro", "6759 6498 2643 8453"),
    ("mir", "2200 1234 5678 9019"),
    ("rupay", "6522 1234 5678 9011"),
    ("troy", "9792 0300 0000 1230"),
    ("verve", "5060991234567890129"),
    ("dankort", "5019 5555 4444 5555"),
    ("hipercard", "6062 8288 8866 6688"),
    ("uzcard", "8600 1234 5678 9012"),
    ("humo", "9860 1234 5678 9015"),
]


@pytest.mark.parametrize(("scheme", "number"), SCHEME_CARDS)
def test_item16_card_numbers_of_every_current_scheme_are_found(scheme, number):
    text = f"please charge {number} today"
    assert [text[a:b] for a, b, _ in cards.find(text)] == [number], scheme


@pytest.mark.parametrize(
    "text",
    [
        "SKU 4006-381-333-931 is out of stock",  # an EAN in 4-3-3-3
        "IMEI 490154203237518 (15 digits, Luhn-valid)",
        "IMEI 356938035643809",
        "Order #112-4567890-1234567 has shipped",  # Luhn-valid digits in 3-7-7
        "Ref 4111 1111 1111 1112",  # fails Luhn
        "Batch 1714557600123",  # a ms timestamp
        "code 4222222222222 for the voucher",  # a 13-digit Visa-shaped number, no card word
    ],
)
def test_item16_card_lookalikes_are_not_cards(text):
    assert cards.find(text) == []


def test_item16_mastercard_2_series_is_masked_end_to_end(gw, api_key, mock):
    mock.clear()
    r = _chat(gw, api_key, "my new Mastercard is 2223 0031 2200 3222, the old one 5555 5555 5555 4444")
    assert r.status_code == 200, r.text
    sent = mock.last()["body"]["messages"][0]["content"]
    assert sent == "my new Mastercard is **** **** **** 3222, the old one **** **** **** 4444"


def test_item16_blocked_card_of_a_new_scheme_is_refused(gw, strict_key, mock):
    mock.clear()
    r = _chat(gw, strict_key, "Карта Мир 2200 1234 5678 9019")
    assert r.status_code == 400 and r.json()["error"]["code"] == "pii_blocked", r.text
    assert "2200" not in r.text and not mock.requests()


# --- item 17: product codes in digit groups are not phone numbers --------------------------

PRODUCT_CODES = [
    "SKU 4006-381-333-931 is out of stock",
    "P/N 12-3456-7890 fits the older model",
    "Part no. 800-4711-0815 is discontinued",
    "Artikelnummer 4711 0815 2342",
    "ISBN 0-306-40615-2",
    "UPC 0 36000 29145 2 on the label",
    "Model no. 06 12 34 56 78 90 AB",
    "Routing 021000021 account 123456789",
    "Meeting 2024-05-01 10:30 to 2024-05-01 11:45",
    "Flight LH 2024 00 1234 departs",
    "UPS 1Z 999 AA1 01 2345 6784 is out for delivery",
    "Order number 0151 23456789 has shipped",  # a label between the code word and its number
]
REAL_NUMBERS = [
    ("Call me at (212) 555-0147 tomorrow.", "(212) 555-0147"),
    ("Reach the front desk at 415-555-0132.", "415-555-0132"),
    ("Ring the London office on 020 7946 0123.", "020 7946 0123"),
    ("Handy: 0151 23456789", "0151 23456789"),
    ("Appelez le 01 23 45 67 89 avant midi", "01 23 45 67 89"),
    ("UK: +44 7700 900077", "+44 7700 900077"),
    ("Part of the team? Call 0161 496 0742", "0161 496 0742"),  # a phone word nearer than "part"
    # a code word that names something else, words before the number (found by hypothesis)
    ("after reviewing order NYC line (212) 555-0199 is open.", "(212) 555-0199"),
]


def _phones(spec, texts: list[str]) -> list[list[str]]:
    found = asyncio.run(Analyzer(0, 0).find(spec, texts))
    return [[t[a:b] for a, b, e, _ in fs if e == "PHONE_NUMBER"] for t, fs in zip(texts, found, strict=True)]


def test_item17_product_codes_in_digit_groups_are_not_phone_numbers(tmp_path):
    spec = pii_corpus.spec(str(tmp_path))
    assert _phones(spec, PRODUCT_CODES) == [[] for _ in PRODUCT_CODES]


def test_item17_real_numbers_in_the_configured_regions_are_still_found(tmp_path):
    spec = pii_corpus.spec(str(tmp_path))
    got = _phones(spec, [t for t, _ in REAL_NUMBERS])
    assert got == [[n] for _, n in REAL_NUMBERS]


# A labelled code word ("order number", "Bestellnummer", "numéro de commande") still names the
# number a few words on; an unlabelled one, a sentence end or another number between does not.
LABELLED_CODES = [
    "Your order number for the shoes is 020 7946 0958",
    "Invoice number of the last month: (212) 555-0199",
    "the tracking number of the package is 212-555-0199",
    "Ihre Bestellnummer lautet 0151 23456789",
    "Numéro de commande de votre achat : 01 23 45 67 89",
]
UNLABELLED_PHONES = [
    ("My order number is 12345 and you can reach me at 020 7946 0958", "020 7946 0958"),
    ("Order number for the shoes. Reach me at 020 7946 0958", "020 7946 0958"),
    ("The order number was lost, my brother John is at 020 7946 0958", "020 7946 0958"),
    ("Sur ma commande, rappelez-moi au 01 23 45 67 89", "01 23 45 67 89"),
]


def test_item17_order_number_label_reaches_over_a_few_words_to_its_number(tmp_path):
    spec = pii_corpus.spec(str(tmp_path))
    assert _phones(spec, LABELLED_CODES) == [[] for _ in LABELLED_CODES]
    got = _phones(spec, [t for t, _ in UNLABELLED_PHONES])
    assert got == [[n] for _, n in UNLABELLED_PHONES]


def test_item17_sku_reaches_the_provider_and_the_phone_beside_it_does_not(gw, api_key, mock):
    mock.clear()
    r = _chat(gw, api_key, f"SKU 4006-381-333-931 and P/N 12-3456-7890 are late; call me on {PHONE}")
    assert r.status_code == 200, r.text
    sent = mock.last()["body"]["messages"][0]["content"]
    assert sent == "SKU 4006-381-333-931 and P/N 12-3456-7890 are late; call me on <PHONE_1>"
    assert PHONE in r.json()["choices"][0]["message"]["content"]  # restored for the client


# --- item 18: every text that leaves is scrubbed ----------------------------------------------


def test_item18_tool_definitions_names_metadata_prediction_and_user_are_scrubbed(gw, api_key, mock):
    body = {
        "model": "gpt-mock",
        "messages": [
            {"role": "system", "content": "You help with orders."},
            {"role": "user", "name": "jane.roe@example.org", "content": "Where is ORD-48213?"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "lookup_order",
                    "description": f"Looks up orders; escalate to boss@example.org or {PHONE}",
                    "parameters": {
                        "type": "object",
                        "properties": {
                            "order": {"type": "string", "description": "an id such as ORD-11111"},
                            "notify": {"type": "string", "enum": ["ops@example.org", "nobody"]},
                        },
                        "required": ["order"],
                    },
                },
            }
        ],
        "store": True,  # (metadata reaches an OpenAI provider only with store: true)
        "metadata": {"customer": "cust@example.org", "bob@example.org": "vip", "agent": "support"},
        "prediction": {"type": "content", "content": f"Dear {EMAIL}, your order ORD-48213"},
        "stop": ["Regards, jane.roe@example.org", "END"],
        "user": "end.user@example.org",
    }
    mock.clear()
    r = _post(gw, api_key, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    sent = mock.last()["body"]
    raw = json.dumps(sent)
    for value in ("example.org", PHONE, "ORD-48213", "ORD-11111"):
        assert value not in raw, value
    assert sent["messages"][1]["name"] == "_EMAIL_1_"  # a name providers accept
    fn = sent["tools"][0]["function"]
    assert fn["name"] == "lookup_order"
    assert fn["description"] == "Looks up orders; escalate to <EMAIL_2> or <PHONE_1>"
    assert fn["parameters"]["properties"]["notify"]["enum"] == ["<EMAIL_3>", "nobody"]
    assert fn["parameters"]["required"] == ["order"]  # structure untouched
    assert set(fn["parameters"]["properties"]) == {"order", "notify"}
    assert sent["prediction"]["content"] == "Dear <EMAIL_1>, your order <ORDER_ID_1>"  # the name's address
    assert sent["metadata"] == {"customer": "<EMAIL_4>", "<EMAIL_5>": "vip", "agent": "support"}
    assert list(sent["metadata"]) == ["customer", "<EMAIL_5>", "agent"]  # a key renamed in place
    assert sent["stop"] == ["Regards, <EMAIL_1>", "END"]
    assert sent["user"] == "<EMAIL_6>"


def test_item18_attribution_reads_metadata_as_sent_by_the_client(gw, api_key, mock):
    """The gateway attributes spend from the client's metadata before scrubbing: the provider
    gets a pseudonym, the audit record the customer the client named."""
    mock.clear()
    r = _post(
        gw,
        api_key,
        "/v1/chat/completions",
        {
            "model": "gpt-mock",
            "messages": [{"role": "user", "content": "hello"}],
            "store": True,  # (metadata reaches an OpenAI provider only with store: true)
            "metadata": {"customer": "vip.customer@example.org", "workflow": "refunds"},
        },
    )
    assert r.status_code == 200, r.text
    assert mock.last()["body"]["metadata"] == {"customer": "<EMAIL_1>", "workflow": "refunds"}
    rid = r.headers["x-request-id"]

    def record():
        got = httpx.get(f"{gw.url}/admin/requests/{rid}", headers={"Authorization": f"Bearer {MASTER_KEY}"})
        return got.json() if got.status_code == 200 else None

    wait_until(record, timeout=30, what="audit record")
    assert record()["workflow"] == "refunds"
    assert record()["customer"] == "vip.customer@example.org"


def test_item18_personal_data_in_a_tool_name_is_refused(gw, api_key, mock):
    mock.clear()
    body = {
        "model": "gpt-mock",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "lookup-ORD-48213", "parameters": {"type": "object"}}}],
    }
    r = _post(gw, api_key, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "pii_blocked" and err["param"] == "tools[0].function.name"
    assert "48213" not in r.text and not mock.requests()


def test_item18_token_array_embeddings_are_decoded_scrubbed_and_encoded_again(gw, api_key, mock):
    enc = encoding_for(EMBED)
    arrays = [enc.encode(f"contact {EMAIL} today"), enc.encode("nothing personal here")]
    mock.clear()
    r = _post(gw, api_key, "/v1/embeddings", {"model": EMBED, "input": arrays})
    assert r.status_code == 200, r.text
    sent = mock.last()["body"]["input"]
    assert enc.decode(sent[0]) == "contact <EMAIL_1> today"
    assert sent[1] == arrays[1]  # nothing found: the client's tokens, untouched
    mock.clear()
    r = _post(gw, api_key, "/v1/embeddings", {"model": EMBED, "input": enc.encode(f"call {PHONE}")})
    assert r.status_code == 200, r.text
    assert enc.decode(mock.last()["body"]["input"]) == "call <PHONE_1>"


def test_item18_token_arrays_with_an_unknown_tokenizer_are_refused(gw, api_key, mock):
    mock.clear()
    r = _post(gw, api_key, "/v1/embeddings", {"model": "embed-mock", "input": [[1, 2, 3]]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "pii_undecodable" and r.json()["error"]["param"] == "input"
    r = _post(gw, api_key, "/v1/embeddings", {"model": EMBED, "input": [[10_000_000]]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "pii_undecodable", r.text
    assert not mock.requests()


def test_item18_token_arrays_holding_a_blocked_entity_are_refused(gw, strict_key, mock):
    enc = encoding_for(EMBED)
    mock.clear()
    r = _post(gw, strict_key, "/v1/embeddings", {"model": EMBED, "input": enc.encode("card 4111 1111 1111 1111")})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "pii_blocked" and r.json()["error"]["param"] == "input"
    assert not mock.requests()


# --- item 2, linear but heavy: the work one request may cause is bounded --------------------


def _dense_phones(chars: int, seed: int) -> str:
    """Distinct US numbers, one after another: every one is checked (about half a millisecond)."""
    rnd = random.Random(seed)
    parts, n = [], 0
    while n < chars:
        part = f"call ({rnd.randint(201, 989)}) {rnd.randint(200, 999)}-{rnd.randint(1000, 9999)} or "
        parts.append(part)
        n += len(part)
    return "".join(parts)[:chars]


def test_item2_a_request_dense_with_numbers_past_the_budget_is_refused_before_any_analysis(gw, api_key, mock):
    """Analysis is linear, but each phone-shaped number costs about half a millisecond: a request
    of 8 MB of them held the PII worker — and every tenant's requests queued behind it — for the
    whole 60 s timeout, then got 503. A request whose text around candidates is past
    ``pii.max_analysed_chars`` (128 KiB) is now refused with a 400 naming the field, before any
    analysis, and the worker is not replaced; a long text with few candidates is served."""
    workers = _worker_pids(gw)
    mock.clear()
    dense = _dense_phones(200_000, seed=7)
    body = {"model": "gpt-mock", "messages": [{"role": "user", "content": "hello"}, {"role": "user", "content": dense}]}
    r = _post(gw, api_key, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"]
    assert error["code"] == "pii_too_much_to_check" and error["param"] == "messages[1].content"
    assert error["type"] == "invalid_request_error" and "131,072" in error["message"]
    assert mock.requests() == []  # nothing left the gateway
    assert _worker_pids(gw) == workers  # refused, not timed out: the worker was not replaced
    prose = ("The quick brown fox jumps over the lazy dog. " * 4500)[:200_000] + f" Call me at {PHONE}."
    served = _chat(gw, api_key, prose)
    assert served.status_code == 200, served.text[:300]
    assert PHONE not in mock.last()["body"]["messages"][-1]["content"]  # still scrubbed


def test_item2_the_budget_counts_each_character_once_and_is_checked_in_the_thread_too(tmp_path):
    """The pieces of one window overlap (OVERLAP): a character is counted once. With analysis in
    the serving process (pii.workers: 0) the same bound holds."""
    assert analysis._covered([(0, "a" * 4096, (), False, True), (3584, "b" * 1000, (), True, False)]) == 4584
    assert analysis._covered([(10, "x" * 5, ()), (100, "y" * 5, ())]) == 10
    spec = pii_corpus.spec(str(tmp_path))
    small = Analyzer(0, 0, max_chars=8192, max_checks=None)  # the characters alone (phone checks: below)
    with pytest.raises(analysis.TooMuchToCheck) as refused:
        asyncio.run(small.find(spec, ["ok", _dense_phones(10_000, seed=3)]))
    assert refused.value.chars > 8192 and refused.value.budget == 8192
    (found,) = asyncio.run(small.find(spec, [_dense_phones(4_000, seed=4)]))
    assert len(found) > 50


def _crafted_phones(chars: int, seed: int) -> str:
    """Distinct runs of two-digit groups with the area code in parentheses: each is a phone
    candidate whose every cut is tried in a dozen numbering plans (a few dozen checks each)."""
    rnd = random.Random(seed)
    parts, n = [], 0
    while n < chars:
        part = f"({rnd.randint(10, 99)}) " + " ".join(f"{rnd.randint(0, 99):02d}" for _ in range(5)) + ", "
        parts.append(part)
        n += len(part)
    return "".join(parts)[: chars - 2]


@pytest.fixture(scope="module")
def other_tenant_key(services, tmp_root) -> str:
    out = run_cli("keys", "create", "--name", "pii-other", "--tenant", "pii-other", urls=services, tmp=tmp_root)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()[0].strip()


def test_item2_a_request_packed_with_phone_like_numbers_is_refused_and_others_are_served(
    gw, api_key, other_tenant_key, mock
):
    """Under ``pii.max_analysed_chars`` (128 KiB), a text of distinct phone-shaped numbers whose
    every cut libphonenumber tries took ≈ 25 s of the PII worker (each number several dozen
    checks): past the 5-8 s timeout the worker was killed (503), and every tenant's requests
    that needed analysis queued behind it. The libphonenumber checks one request may take are
    bounded (``pii.max_phone_checks``): it is analysed or refused with a 400 naming the field it
    ran out in — never sent unscrubbed, never a timeout — and another tenant's request sent
    meanwhile is served (scrubbed)."""
    workers = _worker_pids(gw)
    hostile = _crafted_phones(128 * 1024 - 256, seed=11)
    result: dict = {}

    def send_hostile() -> None:
        body = {
            "model": "gpt-mock",
            "messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": hostile}],
        }
        result["response"] = _post(gw, api_key, "/v1/chat/completions", body, timeout=300)

    mock.clear()
    thread = threading.Thread(target=send_hostile)
    thread.start()
    try:
        other = _chat(gw, other_tenant_key, f"Please call me back on {PHONE}, thanks")
    finally:
        thread.join(300)
    assert other.status_code == 200, other.text[:300]
    r = result["response"]
    assert r.status_code in (200, 400), r.text[:300]
    sent = [m["body"]["messages"][-1]["content"] for m in mock.requests()]
    assert all(PHONE not in c for c in sent)  # the other tenant's number left scrubbed
    if r.status_code == 400:
        error = r.json()["error"]
        assert error["code"] == "pii_too_much_to_check" and error["param"] == "messages[1].content", error
        assert error["type"] == "invalid_request_error" and "pii.max_phone_checks" in error["message"]
        assert all(hostile[:20] not in c for c in sent)  # nothing of it left the gateway
    assert _worker_pids(gw) == workers  # refused or answered, not timed out: the worker was not replaced


def test_item2_phone_checks_are_counted_per_distinct_number_whatever_is_memoized(tmp_path):
    """The bound counts libphonenumber's work on each distinct candidate of the request, memoized
    or not: the same request is refused on a fresh worker and on one that has seen its numbers
    (a replica's luck never decides), a number repeated a thousand times is counted once, and
    the refusal names the text it ran out in."""
    from policies.pii import phone

    spec = pii_corpus.spec(str(tmp_path))
    small = Analyzer(0, 0, max_checks=300)
    dense = _crafted_phones(4_000, seed=5)
    for _ in range(2):  # the second time, every answer is memoized
        with pytest.raises(analysis.TooMuchToCheck) as refused:
            asyncio.run(small.find(spec, ["ok", "call me", dense, "and more"]))
        assert refused.value.setting == "max_phone_checks" and refused.value.budget == 300
        assert refused.value.text == 2 and refused.value.chars > 300
    phone._costed.cache_clear()
    (found,) = asyncio.run(small.find(spec, [f"call {PHONE} now; " * 1000]))
    assert len(found) == 1000
    unbounded = Analyzer(0, 0, max_checks=None)
    (found,) = asyncio.run(unbounded.find(spec, [dense]))
    assert len(found) > 20  # the same text, without the bound, is analysed in full


@pytest.mark.parametrize("value", [0, 99, -1, 10**9, "many", 1.5])
def test_item2_max_phone_checks_must_be_a_sane_count(value):
    from core.config import ConfigError, parse_config

    cfg = gateway_config(type("M", (), {"url": "http://mock"})(), pii={"max_phone_checks": value, **PII})
    with pytest.raises(ConfigError) as err:
        parse_config(cfg)
    assert any("pii.max_phone_checks" in p for p in err.value.problems), err.value.problems


def test_item2_max_phone_checks_is_read_from_config_with_a_default():
    from core.config import parse_config

    mock = type("M", (), {"url": "http://mock"})()
    assert parse_config(gateway_config(mock, pii=PII)).pii.max_phone_checks == analysis.MAX_PHONE_CHECKS
    assert parse_config(gateway_config(mock, pii={**PII, "max_phone_checks": 5000})).pii.max_phone_checks == 5000
