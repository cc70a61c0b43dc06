"""PII detection and restoration in process: the corpus, stream restoration, windows, config."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.config import ConfigError, parse_config
from loadtest import pii_corpus
from policies.pii.analysis import Analyzer, Prefilter, Spec
from policies.pii.anonymize import Vault, mask
from policies.pii.restore import StreamRestorer, restore_body


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("pii-data"))


def test_corpus_precision_and_recall(data_dir):
    result = asyncio.run(pii_corpus.evaluate(data_dir))
    print("\n" + pii_corpus.report(result))
    for name in (*pii_corpus.ENTITIES, "all"):
        assert result[name]["recall"] >= 0.95, (name, result["errors"])
        assert result[name]["precision"] >= 0.95, (name, result["errors"])


# Floors a little under what was measured (loadtest/results/pii-heldout.md): a regression fails,
# noise in a corpus this size does not. The fresh corpus was measured once, after the fixes,
# and not tuned on: its misses are known gaps, listed in the results.
HELDOUT_FLOORS = {
    pii_corpus.HELDOUT: {"CREDIT_CARD": (0.97, 0.97), "PHONE_NUMBER": (0.95, 0.95), "all": (0.97, 0.97)},
    pii_corpus.FRESH: {"CREDIT_CARD": (0.95, 0.9), "PHONE_NUMBER": (0.95, 0.9), "all": (0.95, 0.88)},
    # measured once at 0.947 / 0.947 (loadtest/results/pii-heldout-3.md), then fixed against it
    pii_corpus.THIRD: {"CREDIT_CARD": (0.97, 0.97), "IP_ADDRESS": (0.95, 0.95), "all": (0.97, 0.97)},
    # measured once at 0.961 / 0.805 (loadtest/results/pii-heldout-4.md), then fixed against it
    pii_corpus.FOURTH: {
        "CREDIT_CARD": (0.97, 0.93),
        "EMAIL_ADDRESS": (0.95, 0.95),
        "IBAN_CODE": (0.95, 0.95),
        "PHONE_NUMBER": (0.97, 0.95),
        "all": (0.97, 0.96),
    },
}


@pytest.mark.parametrize("path", list(HELDOUT_FLOORS), ids=lambda p: p.name)
def test_heldout_corpus_precision_and_recall_floor(data_dir, path):
    """Items 16 and 17 of issue #11, on corpora not written beside the code (see pii_corpus)."""
    result = asyncio.run(pii_corpus.evaluate_heldout(data_dir, path))
    print("\n" + pii_corpus.heldout_report(result, path))
    for name, (precision, recall) in HELDOUT_FLOORS[path].items():
        assert result[name]["precision"] >= precision, (name, result["errors"])
        assert result[name]["recall"] >= recall, (name, result["errors"])


FILLER = (
    "the team shipped release 2.4.1 on 2024-05-01 after reviewing order A-12345 and pricing at $19.99 per seat "
).split()


def test_every_entity_is_found_beside_every_filler_word(data_dir):
    """Every positive of the corpus inserted at every position of the filler (so next to each of
    its words: versions, dates, prices, order ids), in one batch: the random examples of the test
    below found two such neighbours that hid a card ("… 00009 2.4.1", "… 4012888888881881
    2024-05-01") and one that hid a phone ("order NYC line (212) 555-0199"), one per run."""
    words = FILLER * 2
    cases = [(case, at) for case in pii_corpus.POSITIVES for at in range(len(FILLER) + 1)]
    texts = [" ".join([*words[:at], case[0], *words[at:]]) for case, at in cases]
    found = asyncio.run(Analyzer(0, 0).find(pii_corpus.spec(data_dir), texts))
    missed = []
    for (case, at), text, spans in zip(cases, texts, found, strict=True):
        offset = text.index(case[0])
        for entity, value in case[1]:
            start = offset + case[0].index(value)
            end = start + len(value)
            if not any(e == entity and a <= start and end <= b for a, b, e, _ in spans):
                missed.append((case[0], at, entity))
    assert not missed, missed


# derandomized: the same examples on every run, so CI is stable (the sweep above covers the
# neighbours exhaustively; this one, long texts across window boundaries)
@settings(max_examples=25, deadline=None, derandomize=True)
@given(case=st.sampled_from(pii_corpus.POSITIVES), at=st.integers(0, 200), length=st.integers(0, 200))
def test_windows_find_what_whole_text_analysis_finds(data_dir, case, at, length):
    """An entity anywhere in a long text is covered by a finding of its type (windows, not whole
    text). Covered, not equal: filler digits glued to a phone number may be taken with it."""
    words = (FILLER * 20)[:length]
    at = min(at, len(words))
    text = " ".join([*words[:at], case[0], *words[at:]])
    spec = pii_corpus.spec(data_dir)
    (found,) = asyncio.run(Analyzer(0, 0).find(spec, [text]))
    offset = text.index(case[0])
    for entity, value in case[1]:
        start = offset + case[0].index(value)
        end = start + len(value)
        assert any(e == entity and a <= start and end <= b for a, b, e, _ in found), (entity, value, found)


def test_prefilter_skips_text_without_candidates(data_dir):
    p = Prefilter(pii_corpus.spec(data_dir))
    assert p.windows(" ".join(FILLER * 10)) == []
    text = " ".join(FILLER * 5) + " mail a@b.example " + " ".join(FILLER * 5)
    (a, b, kinds), *rest = p.windows(text)
    assert not rest and "a@b.example" in text[a:b] and b - a < 200
    assert kinds == ("EMAIL_ADDRESS",)  # only the email recognizer runs there


PLACEHOLDERS = ["<EMAIL_1>", "<PHONE_12>", "<ORDER_ID_3>", "<US_SSN_1>"]
VALUES = {"EMAIL_1": 'j"o@x.org', "PHONE_12": "+1 202 555 0173", "ORDER_ID_3": "ORD-1", "US_SSN_1": "536-22-8726"}


def _vault() -> Vault:
    v = Vault()
    v.by_placeholder.update(VALUES)
    return v


def _chunks(delta: dict, finish=None) -> bytes:
    obj = {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _collect(events: list[bytes]) -> tuple[str, str]:
    content, args = "", ""
    for raw in events:
        for event in raw.split(b"\n\n"):
            if not event.startswith(b"data: {"):
                continue
            for choice in json.loads(event[6:])["choices"]:
                d = choice["delta"]
                content += d.get("content") or ""
                for call in d.get("tool_calls") or ():
                    args += call["function"].get("arguments") or ""
    return content, args


@settings(max_examples=200, deadline=None)
@given(
    parts=st.lists(
        st.sampled_from([*PLACEHOLDERS, "<", ">", "<EMAIL", "_1>", "a", " text ", "<b>", "x<y"]), max_size=30
    ),
    cuts=st.lists(st.integers(1, 7), min_size=1, max_size=40),
)
def test_stream_restoration_equals_whole_restoration(parts, cuts):
    text = "".join(parts)
    pieces, i, k = [], 0, 0
    while i < len(text):
        step = cuts[k % len(cuts)]
        pieces.append(text[i : i + step])
        i, k = i + step, k + 1
    r = StreamRestorer(_vault())
    events = [r.chunk(_chunks({"content": p})) for p in pieces]
    events.append(r.chunk(_chunks({}, "stop")))
    content, _ = _collect(events)
    whole = json.loads(restore_body(json.dumps({"choices": [{"message": {"content": text}}]}).encode(), _vault()))
    assert content == whole["choices"][0]["message"]["content"]
    for placeholder in PLACEHOLDERS:
        assert placeholder not in content


def test_tool_arguments_restored_json_escaped_across_chunks():
    args = json.dumps({"to": "<EMAIL_1>", "n": "<PHONE_12>"})
    r = StreamRestorer(_vault())
    events = [
        r.chunk(_chunks({"tool_calls": [{"index": 0, "function": {"arguments": args[i : i + 3]}}]}))
        for i in range(0, len(args), 3)
    ]
    events.append(r.chunk(_chunks({}, "tool_calls")))
    _, got = _collect(events)
    assert json.loads(got) == {"to": VALUES["EMAIL_1"], "n": VALUES["PHONE_12"]}


def test_stream_ending_without_finish_releases_held_text():
    r = StreamRestorer(_vault())
    first = r.chunk(_chunks({"content": "bye <EMAIL_"}))
    content, _ = _collect([first, r.tail()])
    assert content == "bye <EMAIL_"


def test_vault_numbering_and_mask():
    v = Vault()
    assert v.placeholder("EMAIL", "a@x.org") == "<EMAIL_1>"
    assert v.placeholder("PHONE", "1") == "<PHONE_1>"
    assert v.placeholder("EMAIL", "b@x.org") == "<EMAIL_2>"
    assert v.placeholder("EMAIL", "a@x.org") == "<EMAIL_1>"
    assert mask("4111 1111 1111 1111", 4) == "**** **** **** 1111"
    assert mask("DE89", 0) == "****"


def _cfg(pii: dict, models=None) -> dict:
    return {
        "providers": [{"name": "p", "kind": "openai", "base_url": "http://x", "api_keys": ["k"]}],
        "models": [{"name": m, "deployments": [{"provider": "p", "model": "m"}]} for m in (models or ["gpt"])],
        "pii": pii,
    }


@pytest.mark.parametrize(
    ("pii", "problem"),
    [
        ({"policies": {"default": {"entities": {"emial": "redact"}}}}, "pii.policies.default.entities.emial: unknown"),
        ({"policies": {"default": {"entities": {"email": "hash"}}}}, "needs pii.hash_secret"),
        ({"policies": {"default": {"entities": {"person": "redact"}}}}, "needs an NER model"),
        ({"policies": {"default": {"entities": {"email": "shred"}}}}, "pii.policies.default.entities.email"),
        ({"policies": {"a": {}}, "models": {"gpt": "b"}}, "pii.models.gpt: unknown policy 'b'"),
        ({"policies": {"a": {}}, "models": {"nope": "a"}}, "pii.models.nope: unknown model"),
        ({"recognizers": [{"name": "x", "pattern": "(unclosed"}]}, "pii.recognizers[0].pattern: not a valid regular"),
        ({"recognizers": [{"name": "x", "pattern": "a*"}]}, "matches the empty string"),
        ({"policies": {"a": {"phone_regions": ["XX"]}}}, "pii.policies.a.phone_regions"),
    ],
)
def test_config_problems_name_their_path(pii, problem):
    with pytest.raises(ConfigError) as err:
        parse_config(_cfg(pii))
    assert any(problem in p for p in err.value.problems), err.value.problems


def test_optional_ner_model_finds_person_names(tmp_path, data_dir):
    """Any installed spaCy pipeline with an NER component plugs in; here a rule-based one."""
    import spacy

    nlp = spacy.blank("en")
    ruler = nlp.add_pipe("entity_ruler")
    ruler.add_patterns([{"label": "PERSON", "pattern": [{"LOWER": "ada"}, {"LOWER": "lovelace"}]}])
    nlp.to_disk(tmp_path / "ner")
    spec = Spec(("EMAIL_ADDRESS", "PERSON"), ("US",), 0.4, (), str(tmp_path / "ner"), data_dir)
    (found,) = asyncio.run(Analyzer(0, 0).find(spec, ["Ada Lovelace wrote to ada@example.org"]))
    assert {(e, a, b) for a, b, e, _ in found} == {("PERSON", 0, 12), ("EMAIL_ADDRESS", 22, 37)}


def test_missing_ner_model_is_a_clear_error(data_dir):
    spec = Spec(("PERSON",), ("US",), 0.4, (), "en_core_web_nonexistent", data_dir)
    with pytest.raises(RuntimeError, match="never downloads"):
        asyncio.run(Analyzer(0, 0).find(spec, ["Ada Lovelace"]))


@pytest.fixture
def ner_loads(monkeypatch) -> list[str]:
    """The NER models this process tries to load (``presidio_offline.nlp_engine``), counted from a
    state with no engine built and no failure remembered (``analysis._analyzers``, ``_unloadable``)."""
    from policies.pii import analysis, presidio_offline

    loads: list[str] = []
    real_engine = presidio_offline.nlp_engine

    def counted(model: str, blank: bool = False):
        loads.append(model)
        return real_engine(model, blank)

    monkeypatch.setattr(presidio_offline, "nlp_engine", counted)
    monkeypatch.setattr(analysis, "_analyzers", {})
    monkeypatch.setattr(analysis, "_unloadable", {})
    return loads


def _missing_ner_pii(workers: int):
    """A PII config whose one policy needs a NER model that is not installed."""
    config = {
        "workers": workers,
        "ner_model": "en_core_web_nonexistent",
        "policies": {"default": {"entities": {"person": "redact"}}},
    }
    return parse_config(_cfg(config)).pii


def test_a_spec_that_could_not_load_at_start_is_refused_without_loading_again(tmp_path, ner_loads):
    """``workers: 0``: the start's failed load is remembered, and each request is refused at once
    (503 ``pii_unavailable``, as before) instead of trying to load the model again in the analysis
    thread: a model that exists but does not load cost each request a whole ``spacy.load``."""
    from core.errors import ServiceUnavailable
    from policies.pii.scrub import Scrubber, ScrubState

    loads = ner_loads
    pii = _missing_ner_pii(workers=0)
    scrubber = Scrubber(pii, tmp_path)
    policy = scrubber.policies["default"]
    body = {"model": "gpt", "messages": [{"role": "user", "content": "Ada Lovelace wrote"}]}

    async def requests() -> list[tuple[int, str | None]]:
        await scrubber.start()
        refused = []
        for _ in range(3):
            with pytest.raises(ServiceUnavailable) as err:
                await scrubber.scrub(body, "chat", policy, ScrubState())
            refused.append((err.value.status, err.value.code))
        with pytest.raises(RuntimeError, match="never downloads"):  # the start's reason, as before
            await scrubber.analyzer.find(policy.spec, ["Ada Lovelace"])
        await scrubber.close()
        return refused

    assert asyncio.run(requests()) == [(503, "pii_unavailable")] * 3
    assert loads == ["en_core_web_nonexistent"]  # once, at the start


def test_a_card_followed_by_a_version_number_is_found(data_dir):
    """Found by the property test above: "amex 3400 000000 00009 2.4.1" — the run of digit groups
    took the version's first digit, was then refused whole (glued to ".4"), and the card with it."""
    text = "the team shipped release amex 3400 000000 00009 2.4.1 on 2024-05-01"
    (found,) = asyncio.run(Analyzer(0, 0).find(pii_corpus.spec(data_dir), [text]))
    start = text.index("3400")
    assert any(e == "CREDIT_CARD" and a == start and b == start + len("3400 000000 00009") for a, b, e, _ in found)


def test_a_spaced_card_never_swallows_the_first_group_of_a_dashed_number_after_it(data_dir):
    """Found by the fuzz test of tests/test_pii.py: "4111 1111 1111 1111 219-09-9999" read as a
    19-digit Visa ending in 219 (it passes Luhn), which hid the SSN. Every 3-digit area that makes
    the 19 digits Luhn-valid, behind spaced cards of three schemes, and the dashed phone case."""
    from policies.pii.cards import find, luhn

    cards = ["4111 1111 1111 1111", "4012 8888 8888 1881", "6011 0009 9013 9424"]
    texts, ssns = [], []
    for card in cards:
        digits = card.replace(" ", "")
        for area in range(100, 900):
            if area == 666 or not luhn(f"{digits}{area}"):
                continue
            ssn = f"{area}-12-3456"
            texts.append(f"{card} {ssn}")
            ssns.append(ssn)
    assert len(texts) > 100
    for text in texts:
        assert find(text) and find(text)[0][:2] == (0, 19), text
    found = asyncio.run(Analyzer(0, 0).find(pii_corpus.spec(data_dir), texts))
    missed = [t for t, fs, ssn in zip(texts, found, ssns, strict=True) if not any(e == "US_SSN" for *_, e, _ in fs)]
    assert not missed, missed[:5]
    # a card alone, contiguous and glued to a dash, is still a card (no shorter reading exists)
    assert find("4111111111111111-05") == [(0, 16, "visa")]


@pytest.mark.parametrize(
    ("text", "card"),
    [
        ("My JCB is 3530.1113.3330.0000, the one I used in Tokyo.", "3530.1113.3330.0000"),
        ("card 4242-4242 4242-4242 cvv 999", "4242-4242 4242-4242"),
        ("name,card,exp\nJ. Smith,4012888888881881,09/26", "4012888888881881"),
        ("A. Rossi,5105-1051-0510-5100,01/27", "5105-1051-0510-5100"),
        ("visa 4111.1111.1111.1111.", "4111.1111.1111.1111"),
        ("totals: 1,234,4111111111111111", "4111111111111111"),  # a card after a thousands group
    ],
)
def test_cards_written_with_dots_mixed_separators_or_in_csv_are_found(text, card):
    """Misses of the third held-out corpus (loadtest/results/pii-heldout-3.md)."""
    from policies.pii.cards import find

    start = text.index(card)
    assert [(a, b) for a, b, _ in find(text)] == [(start, start + len(card))]


@pytest.mark.parametrize(
    "text",
    [
        "Revenue was 4,111,111,111,111,111 units",  # thousands separators, not a CSV cell
        "pi is 3.1415926535897932",  # a decimal
        "IP 192.168.100.200 and 10.100.200.300",  # dotted quads in threes
        "build 2024.0101.1234.5678",  # four groups of four that fail Luhn or any range
    ],
)
def test_dotted_and_comma_look_alikes_are_no_cards(text):
    from policies.pii.cards import find

    assert find(text) == []


@pytest.mark.parametrize(
    ("text", "ips"),
    [
        ("the socket shows ::ffff:192.0.2.128 as the peer", ["::ffff:192.0.2.128"]),
        ("We pin foo==2.4.10.1 in prod and bar==3.1.0.2 in staging", []),
        ("SNMP OID 1.3.6.1.4.1.2021.10.1.3.1 returns nothing", []),
        ("Firmware 2.0.0.1 was released in 2023", []),
        ("See chapter 3.1.4.1 of the installation manual", []),
        ("ssh root@10.0.0.5 then ping 192.168.1.20.", ["10.0.0.5", "192.168.1.20"]),
        ("client_ip=203.0.113.9 status=200", ["203.0.113.9"]),
        ("the version of the server at 198.51.100.7 is old", ["198.51.100.7"]),
    ],
)
def test_ip_addresses_and_their_look_alikes(data_dir, text, ips):
    (found,) = asyncio.run(Analyzer(0, 0).find(pii_corpus.spec(data_dir), [text]))
    assert [text[a:b] for a, b, e, _ in found if e == "IP_ADDRESS"] == ips


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("Chat with me: https://wa.me/5511912345678", "5511912345678"),
        ("https://api.whatsapp.com/send?phone=447700900123&text=hi", "447700900123"),
        ("wa.me/+4915123456789 anytime", "4915123456789"),
    ],
)
def test_whatsapp_links_hold_phone_numbers(data_dir, text, number):
    (found,) = asyncio.run(Analyzer(0, 0).find(pii_corpus.spec(data_dir), [text]))
    start = text.index(number)
    assert any(e == "PHONE_NUMBER" and a <= start and start + len(number) <= b for a, b, e, _ in found), found


def test_context_enhancer_finds_a_findings_token_by_bisection_as_presidio_would(data_dir):
    """Presidio's context enhancer found each finding's token by walking the chunk's tokens from
    the first: a 4 KiB chunk dense with findings (IP addresses, emails) was quadratic, ≈ 45 % of
    its analysis. Ours bisects, never iterating the tokens, and picks the token Presidio's walk
    picks for every offset (or fails where it fails)."""
    from pathlib import Path

    from presidio_analyzer.context_aware_enhancers import LemmaContextAwareEnhancer

    from policies.pii import presidio_offline

    engine = presidio_offline.nlp_engine(presidio_offline.blank_pipeline(Path(data_dir)))
    text = "From 10.0.0.1 to  192.168.2.7:\tcall +44 20 7946 0958, mail a@b.org!  ok \n"
    art = engine.process_text(text, "en")
    enhancer = presidio_offline.context_enhancer()

    class Unwalkable(type(art.tokens)):
        def __iter__(self):
            raise AssertionError("the tokens were walked")

    tokens = list(art.tokens)
    unwalkable = Unwalkable.__new__(Unwalkable)
    list.extend(unwalkable, tokens)
    unwalkable.ends = art.tokens.ends
    for start in range(len(text) + 2):
        try:
            want = LemmaContextAwareEnhancer._find_index_of_match_token("w", start, tokens, art.tokens_indices)
        except ValueError:
            with pytest.raises(ValueError):
                enhancer._find_index_of_match_token("w", start, unwalkable, art.tokens_indices)
            continue
        assert enhancer._find_index_of_match_token("w", start, unwalkable, art.tokens_indices) == want, start


def test_analysis_in_the_serving_process_loads_presidio_at_start(data_dir):
    """``workers: 0``: Presidio was loaded by the first request, in the analysis thread, and that
    took several seconds of the request's own analysis timeout (5 s): on a loaded host the first
    request after start-up was refused (``AnalysisTimeout``; seen in tests/test_ledger_content_pii.py).
    It loads at start now, as the worker processes do. (A score of its own: no other test of this
    process has built the analyzer of this spec.)"""
    from policies.pii import analysis

    spec = Spec(("EMAIL_ADDRESS",), ("US",), 0.4321, (), None, data_dir)
    assert spec not in analysis._analyzers
    analyzer = Analyzer(0, 0)

    async def start() -> None:
        await analyzer.start([spec])
        await analyzer.close()

    asyncio.run(start())
    assert spec in analysis._analyzers


def test_a_worker_does_not_load_again_a_spec_it_could_not_load(data_dir, ner_loads):
    """What a worker process runs (``analyze_items``; with ``workers: 1`` or more): a spec whose
    model failed to load is refused at once on the next call with the same reason, instead of
    loading again (a model that exists but does not load cost each request a whole ``spacy.load``
    of the worker's CPU). A restarted worker, a fresh process, tries again."""
    from policies.pii.analysis import analyze_items

    loads = ner_loads
    pii = _missing_ner_pii(workers=1)
    from policies.pii.scrub import Scrubber

    spec = Scrubber(pii, data_dir).policies["default"].spec
    reasons = []
    for _ in range(3):
        with pytest.raises(Exception) as err:
            analyze_items(spec, ["Ada Lovelace wrote the first program"])
        reasons.append("never downloads" in str(err.value))
    assert reasons == [True, True, True]
    assert loads == ["en_core_web_nonexistent"]
