"""Worst-case PII analysis CPU of one request at the default limits.

A request may send ``pii.max_analysed_chars`` (128 KiB) of text around candidates to analysis;
the analysis is linear, but each phone-shaped number is checked with libphonenumber, so a
request packed with distinct numbers is the most CPU one request can cost a worker (and every
tenant's request queued behind it on that replica). This builds such requests — distinct
numbers of real-world formats (US, UK, DE, FR, IN, international ``+CC`` and ``00CC``, with and
without phone words near them) and digit runs shaped like cards, IBANs and SSNs — each just
under the default ``max_analysed_chars``, and measures the CPU seconds of analysing one
(``analysis.analyze_items`` in this process, as a worker runs it: pre-filter, Presidio, our
recognizers; no cache), or of refusing it.

Alone: ``python -m loadtest.bench_pii_cost [--rounds N] [--out NAME]`` writes
``loadtest/results/NAME.{md,json}`` (default ``bench-pii-cost-latest``).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from loadtest import pii_corpus

CHARS = 128 * 1024 - 64  # just under the default pii.max_analysed_chars


def _d(rnd: random.Random, n: int) -> str:
    return "".join(rnd.choice("0123456789") for _ in range(n))


def _luhn_complete(rnd: random.Random, prefix: str, length: int) -> str:
    body = prefix + _d(rnd, length - len(prefix) - 1)
    for check in "0123456789":
        digits = body + check
        total = 0
        for i, c in enumerate(reversed(digits)):
            v = int(c) * (2 if i % 2 else 1)
            total += v - 9 if v > 9 else v
        if total % 10 == 0:
            return digits
    raise AssertionError("unreachable")


def _ipv4(r: random.Random) -> str:
    return f"{r.randint(1, 223)}.{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(1, 254)}"


def _ipv6(r: random.Random) -> str:
    return ":".join(f"{r.randint(0, 0xFFFF):x}" for _ in range(8))


def _fours(digits: str) -> str:
    return " ".join(digits[i : i + 4] for i in range(0, len(digits), 4))


def _iban_de(rnd: random.Random) -> str:
    bban = _d(rnd, 18)
    check = 98 - int(bban + "131400") % 97  # "DE" = 13 14, then "00"
    return _fours(f"DE{check:02d}{bban}")


# name -> a distinct number per call (``rnd``), as people write them
FORMATS: dict[str, Callable[[random.Random], str]] = {
    "US (212) 555-0199": lambda r: f"({r.randint(201, 989)}) {r.randint(200, 999)}-{_d(r, 4)}",
    "US 212-555-0199": lambda r: f"{r.randint(201, 989)}-{r.randint(200, 999)}-{_d(r, 4)}",
    "UK 020 7946 0958": lambda r: f"020 {r.randint(3000, 8999)} {_d(r, 4)}",
    "UK mobile 07700 900123": lambda r: f"07{r.randint(400, 999)} {_d(r, 6)}",
    "DE 030 901820 / 0151 23456789": lambda r: r.choice(
        [f"030 {r.randint(100000, 99999999)}", f"015{r.randint(1, 9)} {_d(r, 8)}"]
    ),
    "FR 06 12 34 56 78": lambda r: "0" + str(r.randint(1, 7)) + "".join(f" {_d(r, 2)}" for _ in range(4)),
    "IN 098765 43210": lambda r: f"0{r.randint(70000, 99999)} {_d(r, 5)}",
    "IN +91 98765 43210": lambda r: f"+91 {r.randint(70000, 99999)} {_d(r, 5)}",
    "+CC mixed (+44, +49, +33, +55, +81, +234)": lambda r: r.choice(
        [
            f"+44 20 {r.randint(3000, 8999)} {_d(r, 4)}",
            f"+49 30 {_d(r, 7)}",
            f"+33 {r.randint(1, 7)} {_d(r, 2)} {_d(r, 2)} {_d(r, 2)} {_d(r, 2)}",
            f"+55 11 9{_d(r, 4)}-{_d(r, 4)}",
            f"+81 90-{_d(r, 4)}-{_d(r, 4)}",
            f"+234 80{r.randint(1, 9)} {_d(r, 3)} {_d(r, 4)}",
        ]
    ),
    "00CC 0044 20 7946 0958": lambda r: f"00{r.choice(['44 20', '49 30', '33 1', '1 212'])} {_d(r, 4)} {_d(r, 4)}",
    "cards 4111 1111 1111 1111": lambda r: _fours(_luhn_complete(r, r.choice(["4", "51", "2221", "6011"]), 16)),
    "IBAN DE89 3704 0044 0532 0130 00": _iban_de,
    "SSN 219-09-9999": lambda r: f"{r.randint(100, 665)}-{r.randint(10, 99)}-{_d(r, 4)}",
    # crafted: many groups, so the search for a number inside the run tries every cut
    "crafted (12) 34 56 78 90 12": lambda r: f"({_d(r, 2)}) " + " ".join(_d(r, 2) for _ in range(5)),
    "crafted 0 1 2 3 4 5 6 7 8 9 1": lambda r: "0" + "".join(f" {_d(r, 1)}" for _ in range(10)),
    "emails a.b123@example.com": lambda r: f"user.{_d(r, 6)}@example.com",
    "IPv4 10.1.2.3": lambda r: _ipv4(r),
    "IPv4 mixed with IPv6 2001:db8::1": lambda r: r.choice(
        [_ipv4(r), f"2001:db8:{r.randint(0, 0xFFFF):x}::{r.randint(1, 0xFFFF):x}", _ipv6(r)]
    ),
    "IPv4 in log lines, URLs, with ports": lambda r: r.choice(
        [
            f"sshd[{_d(r, 4)}]: Failed password for root from {_ipv4(r)} port {r.randint(1024, 65535)} ssh2",
            f"http://{_ipv4(r)}:{r.randint(80, 9000)}/api/v1",
            f"{_ipv4(r)}:{r.randint(1024, 65535)}",
        ]
    ),
    "emails with display names": lambda r: (
        f'"{r.choice(_NAMES)} {r.choice(_NAMES)}" '
        f"<{r.choice(_NAMES).lower()}.{_d(r, 5)}@{r.choice(['example.com', 'example.org', 'mail.example.net'])}>"
    ),
}
# not entities, shaped like them: each must cost no more than prose
LOOKALIKES: dict[str, Callable[[random.Random], str]] = {
    "look-alike: versions 1.2.3.4-beta": lambda r: (
        f"v{r.randint(1, 9)}.{r.randint(0, 20)}.{r.randint(0, 99)}."
        f"{r.randint(0, 999)}-{r.choice(['beta', 'rc1', 'alpha'])}"
    ),
    "look-alike: OIDs 1.3.6.1.4.1": lambda r: f"1.3.6.1.4.1.{r.randint(1, 60000)}.{r.randint(1, 99)}.{r.randint(1, 9)}",
    "look-alike: product codes AB-1234-56": lambda r: f"{r.choice(['AB', 'XQ', 'MK', 'TZ'])}-{_d(r, 4)}-{_d(r, 2)}",
    "look-alike: SKU list SKU-48213-BLK-M": lambda r: (
        f"SKU-{_d(r, 5)}-{r.choice(['BLK', 'WHT', 'RED'])}-{r.choice('SML')}"
    ),
    "look-alike: dates 2024-03-15 and 15/03/2024": lambda r: r.choice(
        [f"2024-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}", f"{r.randint(1, 28):02d}/{r.randint(1, 12):02d}/2024"]
    ),
    "look-alike: URLs https://shop.example.com/item/123": lambda r: (
        f"https://{r.choice(_NAMES).lower()}.example.com/item/{_d(r, 6)}?ref={_d(r, 4)}"
    ),
}
_NAMES = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Margaret", "Ken", "Frances", "Niklaus")
WORDS = ("call", "phone", "tel:", "mobile", "ring", "whatsapp")


def text_for(fmt: Callable[[random.Random], str], words: bool, seed: int, chars: int = CHARS) -> tuple[str, int]:
    """Distinct numbers of one format, separated as a list would be, up to ``chars``: (text, numbers)."""
    rnd = random.Random(seed)
    parts, n, count = [], 0, 0
    while True:
        part = (f"{rnd.choice(WORDS)} " if words else "") + fmt(rnd) + ("; " if words else ", ")
        if n + len(part) > chars:
            break
        parts.append(part)
        n += len(part)
        count += 1
    return "".join(parts), count


def cases(chars: int = CHARS, seed: int = 0) -> dict[str, tuple[str, int]]:
    """The requests; another ``seed`` gives other numbers of the same formats (a fresh text)."""
    out = {}
    s = 1000 * seed
    for i, (name, fmt) in enumerate(FORMATS.items()):
        out[name] = text_for(fmt, False, s + i, chars)
        if not name.startswith(("cards", "IBAN", "SSN", "emails", "IPv4")):
            out[f"{name}, phone words"] = text_for(fmt, True, s + 100 + i, chars)
    for i, (name, fmt) in enumerate(LOOKALIKES.items()):
        out[name] = text_for(fmt, False, s + 200 + i, chars)
    # a request may use its phone-number checks and fill the rest with other findings: crafted
    # numbers (≈ 900 checks, under the default bound), then IP addresses
    phones, n = text_for(FORMATS["crafted (12) 34 56 78 90 12"], False, s + 50, 1300)
    ips, m = text_for(FORMATS["IPv4 10.1.2.3"], False, s + 51, chars - len(phones) - 2)
    out["mixed: crafted numbers (1.3 KB), then IPv4"] = (phones + "\n\n" + ips, n + m)
    prose = pii_corpus_prose(chars)
    out["normal prose with some personal data"] = (prose, prose.count("@"))
    return out


def pii_corpus_prose(chars: int) -> str:
    from loadtest.bench_pii import message

    parts, i = [], 0
    while sum(len(p) + 1 for p in parts) < chars:
        parts.append(message().replace("{n}", str(i)))
        i += 1
    return " ".join(parts)[:chars]


def _cpu_of(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.process_time()
    try:
        result: object = fn()
    except Exception as exc:  # a refusal is a result here
        result = exc
    return time.process_time() - t0, result


def measure(data_dir: str, rounds: int = 3, only: str | None = None) -> dict:
    """CPU seconds of analysing each worst-case request (median of ``rounds``, each a fresh text:
    spaCy remembers every distinct word it has read, so the same text again costs less)."""
    from policies.pii import analysis, phone

    spec = pii_corpus.spec(data_dir)
    analysis.warm(spec)
    # the default bounds (the code before max_phone_checks has only the first)
    bounds = [
        analysis.MAX_ANALYSED_CHARS,
        *([analysis.MAX_PHONE_CHECKS] if hasattr(analysis, "MAX_PHONE_CHECKS") else []),
    ]
    out: dict = {}
    texts = [cases(seed=r) for r in range(rounds)]
    for name, (text, numbers) in texts[0].items():
        if only and only not in name:
            continue
        cpus, outcome = [], ""
        for r in range(rounds):
            text, numbers = texts[r][name]
            for memo in ("_costed", "_matches", "_valid_somewhere"):  # a fresh worker: nothing memoized
                if hasattr(getattr(phone, memo, None), "cache_clear"):
                    getattr(phone, memo).cache_clear()
            cpu, result = _cpu_of(lambda text=text: analysis.analyze_items(spec, [text], *bounds))
            cpus.append(cpu)
            if isinstance(result, Exception):
                outcome = f"refused: {type(result).__name__}"
            else:
                outcome = f"analysed: {len(result[0])} found"
        out[name] = {
            "chars": len(text),
            "numbers": numbers,
            "cpu_s_p50": round(statistics.median(cpus), 3),
            "cpu_s_max": round(max(cpus), 3),
            "ms_per_number": round(statistics.median(cpus) / max(1, numbers) * 1000, 3),
            "outcome": outcome,
        }
        print(f"{name}: {out[name]}", flush=True)
    return out


def report(res: dict, date: str, title: str, before: dict | None = None) -> str:
    lines = [
        f"# {title} ({date})",
        "",
        f"CPU seconds of analysing one request of {CHARS:,} characters (just under the default "
        "`pii.max_analysed_chars`, 128 KiB) packed with distinct numbers of one format, as a PII worker "
        "runs it (`analysis.analyze_items`, pre-filter + Presidio + our recognizers, no cache; policy: "
        "all six built-in entity types, phone regions US, GB, DE, FR). Median of the rounds.",
        "",
    ]
    head = "| request | numbers | CPU s | ms / number | outcome |"
    rule = "|---|---:|---:|---:|---|"
    if before:
        head = "| request | numbers | CPU s before | CPU s after | after / before | outcome after |"
        rule = "|---|---:|---:|---:|---:|---|"
    lines += [head, rule]
    for name, r in res.items():
        if before and name in before:
            b = before[name]["cpu_s_p50"]
            ratio = r["cpu_s_p50"] / b if b else 0.0
            lines.append(
                f"| {name} | {r['numbers']} | {b:.3f} | {r['cpu_s_p50']:.3f} | {ratio:.2f}x | {r['outcome']} |"
            )
        else:
            lines.append(
                f"| {name} | {r['numbers']} | {r['cpu_s_p50']:.3f} | {r['ms_per_number']:.3f} | {r['outcome']} |"
            )
    worst = max(res.items(), key=lambda kv: kv[1]["cpu_s_p50"])
    lines += ["", f"Worst: **{worst[0]}**, {worst[1]['cpu_s_p50']:.3f} CPU s."]
    if before:
        bw = max(before.values(), key=lambda r: r["cpu_s_p50"])["cpu_s_p50"]
        lines.append(f"Worst before: {bw:.3f} CPU s; worst after / worst before: {worst[1]['cpu_s_p50'] / bw:.2f}x.")
    lines += ["", "Command: `.venv/bin/python -m loadtest.bench_pii_cost`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench-pii-cost-latest")
    parser.add_argument("--title", default="Worst-case PII analysis CPU per request")
    parser.add_argument("--before", help="a JSON of an earlier run, to compare with")
    parser.add_argument("--only", help="only the requests whose name holds this")
    args = parser.parse_args(argv)
    results = Path(__file__).resolve().parent / "results"
    with tempfile.TemporaryDirectory(prefix="gw-bench-pii-cost-") as tmp:
        res = measure(tmp, args.rounds, args.only)
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    before = json.loads(Path(args.before).read_text())["results"] if args.before else None
    text = report(res, date, args.title, before)
    if not args.only:
        (results / f"{args.out}.md").write_text(text)
        (results / f"{args.out}.json").write_text(json.dumps({"date": date, "results": res}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
