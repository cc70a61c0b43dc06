"""Attacks on the PII look-alike rules (an independent review of cards with dots, commas and mixed separators,
and of the dotted-quad exclusions): each text holds real personal data that must be found."""

from __future__ import annotations

import asyncio

import pytest

from loadtest import pii_corpus
from policies.pii.analysis import Analyzer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("pii-data"))


def _found(data_dir, text):
    (found,) = asyncio.run(Analyzer(0, 0).find(pii_corpus.spec(data_dir), [text]))
    return found


@pytest.mark.parametrize(
    ("text", "ips"),
    [
        # tcpdump / BSD netstat print address.port: both addresses were found before 2edb69d
        ("IP 192.168.1.10.51234 > 10.0.0.1.443: Flags [S], seq 1", ["192.168.1.10", "10.0.0.1"]),
        ("tcp4 0 0 192.168.1.5.22 10.20.30.40.51515 ESTABLISHED", ["192.168.1.5", "10.20.30.40"]),
        # Wireshark / BPF-style filters use == and != before an address
        ("wireshark filter ip.addr==192.168.7.21 shows the leak", ["192.168.7.21"]),
        ("ip.src == 172.16.4.9 and ip.dst != 10.8.0.3", ["172.16.4.9", "10.8.0.3"]),
        # a setting or filter named for an address is no package pin (they were dropped as pins)
        ("set host==10.0.0.1 in the env", ["10.0.0.1"]),
        ("DB_HOST==10.2.3.4 and src_ip != 192.168.1.20", ["10.2.3.4", "192.168.1.20"]),
        ("where server_ip>=172.16.0.9", ["172.16.0.9"]),
        # "FW" is a firewall or a forwarded mail, "build"/"rev"/"section" words beside a host
        ("FW: 203.0.113.77 is down again", ["203.0.113.77"]),
        ("fw 10.1.2.3 blocks port 22", ["10.1.2.3"]),
        ("build 10.4.5.6 failed", ["10.4.5.6"]),
        # a word ending in "ver" padded to a column: the 24-character window starts inside it
        ("server" + " " * 21 + "10.11.12.13", ["10.11.12.13"]),
    ],
)
def test_real_ip_addresses_beside_the_new_look_alike_exclusions_are_found(data_dir, text, ips):
    found = _found(data_dir, text)
    assert [text[a:b] for a, b, e, _ in found if e == "IP_ADDRESS"] == ips


@pytest.mark.parametrize(
    ("text", "card"),
    [
        # a 4-digit group before a card printed with another separator: mixed separators in
        # fours now join them, and the card's tail is left unmasked (was found whole before)
        ("PIN 6476 4012-8888-8888-1881 please", "4012-8888-8888-1881"),
        ("ticket 4619 6977 5105-1051-0510-5100", "5105-1051-0510-5100"),
        ("ext 2327 4012-8888-8888-1881", "4012-8888-8888-1881"),
        # CSV rows the commit claims: a numeric field before, a CVV after
        ("1001,4012888888881881,09/26", "4012888888881881"),
        ("Smith,4012888888881881,123,09/26", "4012888888881881"),
        ("4111-1111-1111-1111,555", "4111-1111-1111-1111"),
    ],
)
def test_cards_beside_numbers_are_masked_whole(data_dir, text, card):
    found = _found(data_dir, text)
    start = text.index(card)
    assert any(e == "CREDIT_CARD" and a <= start and start + len(card) <= b for a, b, e, _ in found), [
        (text[a:b], e) for a, b, e, _ in found
    ]


def test_pip_freeze_pins_named_client_server_or_hostname_are_not_addresses(data_dir):
    """A name before "==" ending in a word such as "client", "server" or "hostname" was taken for
    an address, so real pins of popular packages (pip freeze output) were scrubbed as IP
    addresses; the words of a package's name say it is one."""
    text = (
        "assemblyline-service-client==4.7.4.25\nassemblyline-service-server==4.7.2.4\n"
        "backports-ssl-match-hostname==3.7.0.1\nvmware-vapi-common-client==9.1.1.0\nrequests==2.31.0\n"
    )
    assert [text[a:b] for a, b, e, _ in _found(data_dir, text) if e == "IP_ADDRESS"] == []


@pytest.mark.parametrize(
    ("text", "ips"),
    [
        ("env DNS_SERVERS==10.0.0.2 and dns_servers==10.0.0.36", ["10.0.0.2", "10.0.0.36"]),
        ("waf rule X-Forwarded-For==203.0.113.14 blocked", ["203.0.113.14"]),
        ("where dest==10.0.0.7 or hosts==10.0.0.33", ["10.0.0.7", "10.0.0.33"]),
    ],
)
def test_addresses_after_plural_or_header_names_are_found(data_dir, text, ips):
    """Names the address rule missed ("dest", plurals, a header's "-For"): the address was dropped as a pin."""
    assert [text[a:b] for a, b, e, _ in _found(data_dir, text) if e == "IP_ADDRESS"] == ips
