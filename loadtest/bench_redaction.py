"""What redacting a tool's answer costs (runtime/redaction.py): one RE2 pass per result.

``python -m loadtest.bench_redaction [--out-dir loadtest/results]``

For 1, 4 and 16 secrets: building the pattern (once per secret set), and one pass over a 1 MB
answer of each kind — JSON with no secret in it, the same with every echoed form of a secret
(loadtest/mock_tools.ECHO_FORMS) in it, and adversarial text made of near misses (the secret's
prefixes, ``%25%25…``, runs of backslashes, base64 characters) — against the exact-text
``str.replace`` loop it replaced (which finds only the first of those forms).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from loadtest.mock_tools import ECHO_FORMS
from runtime.redaction import Redactor

MB = 1_000_000


def _secrets(n: int) -> list[str]:
    rng = random.Random(n)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/+=-_"
    return ["sk-" + "".join(rng.choice(alphabet) for _ in range(45)) for _ in range(n)]


def _texts(secret: str) -> dict[str, str]:
    record = json.dumps({"order_id": "A1", "status": "shipped", "items": [{"sku": "X-1", "qty": 2}], "note": "ok"})
    plain = ((record + "\n") * (MB // len(record) + 1))[:MB]
    forms = " ".join(form(secret) for form in ECHO_FORMS.values())
    echoed = plain[: MB // 2] + forms + plain[MB // 2 + len(forms) :]
    rng = random.Random(7)
    near = [secret[:k] for k in range(1, len(secret))] + ["%25" * 20, "\\" * 40 + "u00", "&#", "QUJD" * 10]
    pieces, size = [], 0
    while size < MB:
        piece = rng.choice(near)
        pieces.append(piece)
        size += len(piece)
    return {"plain_json": plain, "every_form_echoed": echoed, "near_misses": "".join(pieces)[:MB]}


def _time(fn, repeat: int = 7) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def _replace_loop(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, "[redacted]")
    return text


def run() -> dict:
    rows = []
    for n in (1, 4, 16):
        secrets = _secrets(n)
        build_ms = _time(lambda secrets=secrets: Redactor(tuple(secrets)), repeat=3)
        hide = Redactor(tuple(secrets))
        for kind, text in _texts(secrets[0]).items():
            rows.append(
                {
                    "secrets": n,
                    "text": kind,
                    "bytes": len(text.encode()),
                    "build_ms": round(build_ms, 2),
                    "redact_ms": round(_time(lambda text=text, hide=hide: hide(text)), 2),
                    "replace_loop_ms": round(_time(lambda text=text, s=secrets: _replace_loop(text, s)), 2),
                    "redactions": hide(text).count("[redacted]"),
                }
            )
    return {"rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(prog="bench_redaction", description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path)
    opts = p.parse_args()
    result = run()
    lines = [
        "# Redacting a tool's answer (runtime/redaction.py)",
        "",
        "`python -m loadtest.bench_redaction`: median of 7 passes over a 1 MB answer; `build` is the",
        "pattern's construction (once per secret set, then cached).",
        "",
        "| secrets | answer | build ms | redact ms | old str.replace loop ms | redactions |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['secrets']} | {r['text']} | {r['build_ms']} | {r['redact_ms']} | {r['replace_loop_ms']} "
            f"| {r['redactions']} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if opts.out_dir:
        (opts.out_dir / "bench-redaction-latest.md").write_text(text)
        (opts.out_dir / "bench-redaction-latest.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
