"""Texts dense with found entities (IP addresses, emails) and with their look-alikes.

A worker's cost per found entity is what bounds such a text (bench: loadtest/bench_pii_cost.py).
These tests pin the causes, counted, never timed: the per-finding operations that were removed
stay removed as the number of findings grows, and what is found in the dense texts is exactly
the addresses in them (held-out texts in real-world formats: RFC 5737 documentation ranges,
private ranges, addresses with ports, in URLs and in log lines; RFC 5322 mailboxes).
"""

from __future__ import annotations

import asyncio
import ipaddress
import random

import pytest

from loadtest import pii_corpus
from policies.pii.analysis import Analyzer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("pii-data"))


def _found(data_dir: str, text: str) -> list[tuple[str, str]]:
    (found,) = asyncio.run(Analyzer(0, 0, max_checks=None).find(pii_corpus.spec(data_dir), [text]))
    return [(e, text[a:b]) for a, b, e, _ in found]


# --- held-out dense texts, and the addresses in them ----------------------------------------

_RANGES = [ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")]  # RFC 5737
_PRIVATE = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")]  # RFC 1918


def _address(rnd: random.Random) -> str:
    net = rnd.choice(_RANGES + _PRIVATE)
    return str(net[rnd.randrange(1, net.num_addresses - 1)])


def _log_line(rnd: random.Random) -> tuple[str, list[str]]:
    """One line of a real log format, and the IPv4 addresses in it."""
    a, b = _address(rnd), _address(rnd)
    port = rnd.randint(1024, 65535)
    lines = [
        f'{a} - - [10/Oct/2023:13:55:{rnd.randint(10, 59)} +0000] "GET /index.html HTTP/1.1" 200 {port}',
        f"Oct 10 13:55:36 bastion sshd[{rnd.randint(100, 9999)}]: Failed password for root from {a} port {port} ssh2",
        f"kernel: IN=eth0 OUT= SRC={a} DST={b} LEN=60 PROTO=TCP SPT={port} DPT=443",
        f"upstream http://{a}:{rnd.randint(80, 9000)}/health timed out, retrying on {b}:{port}",
        f"{a}:{port} -> {b}:443 ESTABLISHED",
    ]
    i = rnd.randrange(len(lines))
    return lines[i], [a] if i in (0, 1) else [a, b]


def _dense_log(n: int, seed: int) -> tuple[str, list[str]]:
    rnd = random.Random(seed)
    lines, addresses = [], []
    for _ in range(n):
        line, ips = _log_line(rnd)
        lines.append(line)
        addresses += ips
    return "\n".join(lines), addresses


def test_every_address_in_a_dense_log_is_found_and_nothing_else(data_dir):
    text, addresses = _dense_log(300, 1)
    assert _found(data_dir, text) == [("IP_ADDRESS", a) for a in addresses]


def test_addresses_mixed_with_ipv6_documentation_addresses_are_all_found(data_dir):
    rnd = random.Random(2)
    items = []
    for _ in range(400):
        if rnd.random() < 0.5:
            items.append(_address(rnd))
        else:
            items.append(str(ipaddress.ip_address("2001:db8::") + rnd.randrange(1, 2**64)))  # RFC 3849
    text = ", ".join(items)
    assert _found(data_dir, text) == [("IP_ADDRESS", a) for a in items]


def test_every_mailbox_in_a_dense_address_list_is_found(data_dir):
    rnd = random.Random(3)
    names = ["Jane Doe", "O'Brien, Pat", "Zoë Ångström", "admin", "J. R. Smith"]
    boxes = []
    parts = []
    for i in range(300):
        local = rnd.choice(["jane.doe", "o'brien", "user+tag", "first_last", "x"]) + str(i)
        box = f"{local}@{rnd.choice(['example.com', 'example.org', 'mail.example.net', 'example.co.uk'])}"
        boxes.append(box)
        name = rnd.choice(names)
        parts.append(rnd.choice([f'"{name}" <{box}>', f"{name} <{box}>", box]))
    text = "To: " + ", ".join(parts)
    assert _found(data_dir, text) == [("EMAIL_ADDRESS", b) for b in boxes]


@pytest.mark.parametrize(
    "lookalike",
    [
        "snmpget 1.3.6.1.4.1.2021.10.1.3.1",
        "SKU-48213-BLK-M",
        "part AB-1234-56",
        "on 2024-03-15 at 10:22:31Z",
    ],
)
def test_dense_look_alikes_are_not_found(data_dir, lookalike):
    text = "; ".join([lookalike] * 200)
    assert _found(data_dir, text) == []


@pytest.mark.parametrize(
    "line, address",
    [
        # pre/post-change captures named for the device (network change checks), metrics dumps
        ("saved show-run to 192.0.2.10-pre.txt", "192.0.2.10"),
        ("diff 192.0.2.11-post.txt", "192.0.2.11"),
        ("wrote metrics-full/tikv-10.0.3.7-pre.prom.gz", "10.0.3.7"),
        ("rate limit exceeded for key 203.0.113.9-post", "203.0.113.9"),  # `${ip}-post` keys
        ("ssh-copy-id to 10.20.30.40-dev failed", "10.20.30.40"),
        ("restored 172.16.5.4-final.cfg", "172.16.5.4"),
        ("capture 198.51.100.23-beta.pcap", "198.51.100.23"),
        ("log 10.1.1.1-rc1-old.log", "10.1.1.1"),
        ("node 10.9.8.7-nightly_backup", "10.9.8.7"),
        # a pre-release tag ending the word too: an address or a four-part version, scrubbed as
        # an address (a version scrubbed costs less than an address sent to a provider)
        ("router 10.0.0.1-beta", "10.0.0.1"),
        ("host 10.0.0.2-rc1 is up", "10.0.0.2"),
        ("release 1.2.3.4-beta", "1.2.3.4"),
    ],
)
def test_an_address_with_a_file_or_key_suffix_is_still_found(data_dir, line, address):
    """A suffix never makes a dotted quad a version: "-pre", "-post", "-dev", "-final" and
    pre-release tags follow real addresses in file names, keys and host names."""
    assert _found(data_dir, line) == [("IP_ADDRESS", address)]


def test_an_address_followed_by_a_range_or_a_word_is_still_found(data_dir):
    assert _found(data_dir, "block 10.0.0.1-10.0.0.255 and 192.0.2.7-gateway") == [
        ("IP_ADDRESS", "10.0.0.1"),
        ("IP_ADDRESS", "10.0.0.255"),
        ("IP_ADDRESS", "192.0.2.7"),
    ]


# --- the per-finding operations, counted ----------------------------------------------------


def _engine(data_dir: str):
    from policies.pii import analysis

    return analysis._analyzer(pii_corpus.spec(data_dir))


def test_plain_dotted_quads_are_validated_without_ipaddress(data_dir, monkeypatch):
    """Presidio validated every match with ``ipaddress.ip_interface`` (≈ 30 µs): a text of
    plain dotted quads makes no such call; a prefix length or IPv6 still does."""
    from presidio_analyzer.predefined_recognizers.generic import ip_recognizer

    calls: list[str] = []
    real = ip_recognizer.ipaddress.ip_interface

    def counting(value):
        calls.append(value)
        return real(value)

    monkeypatch.setattr(ip_recognizer.ipaddress, "ip_interface", counting)
    text, addresses = _dense_log(200, 4)
    assert _found(data_dir, text) == [("IP_ADDRESS", a) for a in addresses]
    assert calls == []
    assert _found(data_dir, "route 192.0.2.0/24 via 2001:db8::1") == [
        ("IP_ADDRESS", "192.0.2.0/24"),
        ("IP_ADDRESS", "2001:db8::1"),
    ]
    assert sorted(calls) == ["192.0.2.0/24", "2001:db8::1"]


def test_ipv6_patterns_search_only_the_words_holding_a_colon(data_dir):
    """Presidio's IPv6 pattern tried its alternatives at every hex digit of a text (4.5 ms per
    4 KiB of dotted quads). The characters searched by the patterns that need a colon: none in
    a text of dotted quads, and those of the words with a colon (and less than a region's gap
    between them) elsewhere, however long the text."""
    engine = _engine(data_dir)
    (ip,) = [r for r in engine.registry.recognizers if "IP_ADDRESS" in r.supported_entities]
    searched: list[int] = []

    class Spy:
        def __init__(self, compiled):
            self.compiled = compiled

        def finditer(self, text, *args, **kwargs):
            start, end = (*args, 0, len(text))[:2]
            searched.append(end - start)
            return self.compiled.finditer(text, *args, **kwargs)

    ip.analyze("warm 10.0.0.1", ["IP_ADDRESS"])  # patterns compiled
    colon = [p for p in ip.patterns if p.name in ("IPv4_mapped", "IPv4_embedded", "IPv6", "IPv6_unspecified")]
    assert len(colon) == 4
    inner = [p.compiled_regex for p in colon]
    try:
        for p in colon:
            p.compiled_regex.compiled = Spy(p.compiled_regex.compiled)
        quads = ", ".join(_address(random.Random(i)) for i in range(2000))
        assert len(ip.analyze(quads, ["IP_ADDRESS"])) == 2000
        assert searched == []
        line = "x " * 300 + "peer 2001:db8::7 up" + " y" * 300
        assert len(ip.analyze(line, ["IP_ADDRESS"])) == 1
        assert searched == [len("2001:db8::7")] * 4
    finally:
        for p, c in zip(colon, inner, strict=True):
            p.compiled_regex = c


def test_context_search_runs_only_for_findings_with_a_context_word_near(data_dir, monkeypatch):
    """Presidio's enhancer searched every finding's context words for its recognizer's (≈ 15 µs
    a finding). The search now runs once per finding whose context holds one: none in a text of
    addresses alone, one per address written after "IP" (each boosted, as before)."""
    from presidio_analyzer.context_aware_enhancers import LemmaContextAwareEnhancer

    calls = []
    real = LemmaContextAwareEnhancer._find_supportive_word_in_context

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(LemmaContextAwareEnhancer, "_find_supportive_word_in_context", staticmethod(counting))
    spec = pii_corpus.spec(data_dir)
    rnd = random.Random(5)
    for n in (50, 500):
        calls.clear()
        (found,) = asyncio.run(Analyzer(0, 0).find(spec, [", ".join(_address(rnd) for _ in range(n))]))
        assert len(found) == n
        assert calls == []
    text = " ".join(f"IP {_address(rnd)} was seen; then {rnd.randint(10, 99)} bytes came" for _ in range(40))
    calls.clear()
    (found,) = asyncio.run(Analyzer(0, 0).find(spec, [text]))
    assert len(found) == 40
    assert len(calls) == 40
    assert all(score == pytest.approx(0.95) for *_, score in found)


def test_a_blank_pipeline_computes_only_the_word_attributes_presidio_reads(data_dir):
    """spaCy computed some twenty attributes of every distinct word (shape, prefix, suffix,
    like_url, ...), interning their strings for the life of the worker; a blank pipeline feeds
    them to no model, and Presidio reads a word's norm and whether it is a stop word or
    punctuation. 2,000 distinct addresses add their own strings and their norms only."""
    from spacy import attrs

    nlp = _engine(data_dir).nlp_engine.nlp["en"]
    assert set(nlp.vocab.lex_attr_getters) == {attrs.NORM, attrs.IS_STOP, attrs.IS_PUNCT}
    rnd = random.Random(6)
    words = [
        f"{rnd.randint(1, 223)}.{rnd.randint(0, 255)}.{rnd.randint(0, 255)}.{rnd.randint(1, 254)}" for _ in range(2000)
    ]
    new = {w for w in words if w not in nlp.vocab.strings}
    before = len(nlp.vocab.strings)
    doc = nlp(" ".join(words))
    assert len(nlp.vocab.strings) - before == len(new)  # norm of an address: itself
    assert [t.norm_ for t in doc] == words
    assert not any(t.is_stop or t.is_punct for t in doc)


def test_version_word_pattern_runs_only_where_a_version_word_can_end(data_dir, monkeypatch):
    """The pattern of words before a dotted quad that make it a version (``v``, ``version``,
    ``foo==``, ``Chrome/``) ran for every address (a tenth of analysing a text dense with them).
    It runs only where the character before the address (spaces aside) can end such a word, and
    skipping it never changes its answer."""
    from policies.pii import analysis

    real = analysis._VERSION_BEFORE
    runs: list[int] = []

    class Counting:
        def search(self, *args):
            runs.append(1)
            return real.search(*args)

    monkeypatch.setattr(analysis, "_VERSION_BEFORE", Counting())
    _, addresses = _dense_log(100, 7)
    listing = ", ".join(addresses)
    assert _found(data_dir, listing) == [("IP_ADDRESS", a) for a in addresses]
    assert runs == []
    assert _found(data_dir, "Firmware 2.0.0.1, version:\n3.1.4.1 and pip foo==2.4.10.1") == []
    assert len(runs) == 3
    rnd = random.Random(8)
    alphabet = "vV=/.:- \t\nafirmwaeonsctd0123ſK_"
    for _ in range(20000):
        s = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 30)))
        lo = rnd.randint(0, len(s))
        if not analysis._may_follow_a_version_word(s, 0, len(s)):
            assert real.search(s, 0, len(s)) is None, s
        if not analysis._may_follow_a_version_word(s, lo, len(s)):
            assert real.search(s, lo, len(s)) is None, (s, lo)


def test_dotted_quad_words_are_read_as_one_word_per_shape_with_the_same_tokens_and_lemmas(data_dir):
    """spaCy learned every distinct address as a new word (the largest cost of a text dense with
    them, and memory kept for good). A blank pipeline reads a dotted-quad word with its digits
    as zeros: 3,000 distinct addresses add a few words, not 3,000, and the tokens, lemmas and
    keywords Presidio gets are those of the text as written (compared with an engine that reads
    it as written, on held-out log lines and on texts built of tokenizer edge cases)."""
    from pathlib import Path

    from policies.pii import presidio_offline

    engine = _engine(data_dir).nlp_engine
    vocab = engine.nlp["en"].vocab
    rnd = random.Random(9)
    text = ", ".join(_address(rnd) for _ in range(3000))
    before = len(vocab)
    art = engine.process_text(text, "en")
    assert len(vocab) - before < 100
    assert art.lemmas[::2] == text.split(", ")

    as_written = presidio_offline.nlp_engine(presidio_offline.blank_pipeline(Path(data_dir)))

    def seen(e, t):
        a = e.process_text(t, "en")
        return [(tok.idx, len(tok)) for tok in a.tokens], a.lemmas, sorted(a.keywords)

    pieces = [
        "10.0.0.1",
        "8.8.8.8",
        "0.0.0.0",
        "01.02.003.4",
        "999.1.1.1",
        "1.2.3",
        "1.2.3.4.5",
        ",",
        ";",
        ".",
        ":",
        "(",
        ")",
        "-",
        "ip:",
        "8)",
        "0.0",
        "<3",
        "'s",
        "http://",
        "/x",
        "\n",
        "\t",
        " ",
        "\u00a0",
        "…",
    ]
    texts = [_dense_log(20, 10)[0]]
    texts += ["".join(rnd.choice(pieces) for _ in range(rnd.randint(1, 12))) for _ in range(2000)]
    for t in texts:
        assert seen(engine, t) == seen(as_written, t), t
