"""Finding PII in texts: a cheap pre-filter, Presidio on the windows it flags, a cache.

Every built-in entity has a shape a single regular expression can spot cheaply (an ``@``,
a run of five or more digits, a dotted quad, two colons around hex digits); Presidio only
analyses windows of text around such spots, widened to whole words and far enough to hold the
longest entity and its context words. Text with no candidate never reaches Presidio, and text
seen before (earlier turns of a conversation) is answered from a cache keyed by its hash.
Analysis runs in worker processes (``workers``), so a long text never stalls the event loop.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from gateway import metrics

log = logging.getLogger("gateway.pii")

Finding = tuple[int, int, str, float]  # start, end, Presidio entity type, score

_DIGITS = r"\d(?:[ \-./()]{0,3}\d){6,}"
_PREFILTER = {
    "EMAIL_ADDRESS": r"@",
    "PHONE_NUMBER": _DIGITS,
    "CREDIT_CARD": _DIGITS,
    "US_SSN": _DIGITS,
    "IBAN_CODE": _DIGITS,
    "IP_ADDRESS": r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}|:[0-9A-Fa-f]{0,4}:",
}
_NOT_A_CANDIDATE = re.compile(r"\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}")  # dates
MARGIN = 48  # characters of context kept on each side of a candidate (whole words)
_WS = re.compile(r"\s")


@dataclass(frozen=True, slots=True)
class CustomRecognizer:
    entity: str
    pattern: str
    score: float
    context: tuple[str, ...]
    ignore_case: bool


@dataclass(frozen=True, slots=True)
class Spec:
    """What to look for: hashable, picklable, the key of analyzers and of the cache."""

    entities: tuple[str, ...]  # Presidio entity types
    regions: tuple[str, ...]
    min_score: float
    custom: tuple[CustomRecognizer, ...]
    ner_model: str | None
    data_dir: str

    @property
    def needs_ner(self) -> bool:
        return "PERSON" in self.entities or "LOCATION" in self.entities


Window = tuple[int, int, tuple[str, ...]]  # start, end, the entity types that may be in it


class Prefilter:
    """Spots candidates, one regular expression per shape (shapes overlap: a dotted quad is
    also a run of digits), and turns them into windows, each with the entity types whose shape
    was spotted in it: Presidio then runs only those types' recognizers there."""

    def __init__(self, spec: Spec) -> None:
        shapes: dict[str, set[str]] = {}
        for e in spec.entities:
            if e in _PREFILTER:
                shapes.setdefault(_PREFILTER[e], set()).add(e)
        # (pattern, entity types, whether date-shaped spots are dropped: built-in shapes only)
        self.shapes = [(re.compile(p), frozenset(shapes[p]), True) for p in sorted(shapes)]
        self.shapes += [
            (re.compile(c.pattern, re.IGNORECASE if c.ignore_case else 0), frozenset([c.entity]), False)
            for c in spec.custom
        ]
        self.all = tuple(spec.entities)
        self.whole = spec.needs_ner  # NER looks at every word: no shortcut
        # Cache keys hash a text with this spec's identity, so policies never share findings.
        self.person = hashlib.blake2b(repr(spec).encode(), digest_size=16).digest()

    def key(self, text: str) -> bytes:
        return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16, person=self.person).digest()

    def windows(self, text: str) -> list[Window]:
        """Spans of ``text`` that may hold an entity, merged; [] when none can."""
        if self.whole:
            return [(0, len(text), self.all)] if text.strip() else []
        spots: list[tuple[int, int, frozenset]] = []
        for pattern, entities, skip_dates in self.shapes:
            for m in pattern.finditer(text):
                if not (skip_dates and _NOT_A_CANDIDATE.fullmatch(m.group())):
                    spots.append((m.start(), m.end(), entities))
        if not spots:
            return []
        spots.sort(key=lambda s: s[0])
        out: list[list] = []
        n = len(text)
        for a, b, entities in spots:
            a = _word_start(text, max(0, _word_start(text, a) - MARGIN))
            b = _word_end(text, min(n, _word_end(text, b) + MARGIN))
            if out and a <= out[-1][1]:
                out[-1][1] = max(out[-1][1], b)
                out[-1][2] = out[-1][2] | entities
            else:
                out.append([a, b, entities])
        if sum(w[1] - w[0] for w in out) > 0.6 * n:
            return [(0, n, tuple(sorted(frozenset().union(*(w[2] for w in out)))))]
        return [(a, b, tuple(sorted(e))) for a, b, e in out]


def _word_start(text: str, i: int) -> int:
    while i > 0 and not text[i - 1].isspace():
        i -= 1
    return i


def _word_end(text: str, i: int) -> int:
    n = len(text)
    while i < n and not text[i].isspace():
        i += 1
    return i


# --- in the worker (or, with workers: 0, in the serving process) ---------------------------

_analyzers: dict[Spec, object] = {}


def _analyzer(spec: Spec):
    found = _analyzers.get(spec)
    if found is not None:
        return found
    from presidio_analyzer import AnalyzerEngine, Pattern, PatternRecognizer, RecognizerRegistry
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        EmailRecognizer,
        IpRecognizer,
        SpacyRecognizer,
        UsSsnRecognizer,
    )

    from policies.pii import presidio_offline
    from policies.pii.iban import GreedySafeIbanRecognizer
    from policies.pii.phone import FastPhoneRecognizer

    presidio_offline.setup()
    model = spec.ner_model if spec.needs_ner else presidio_offline.blank_pipeline(Path(spec.data_dir))
    registry = RecognizerRegistry(supported_languages=["en"])
    builtin = {
        "EMAIL_ADDRESS": EmailRecognizer,
        "CREDIT_CARD": CreditCardRecognizer,
        "IBAN_CODE": GreedySafeIbanRecognizer,
        "US_SSN": UsSsnRecognizer,
        "IP_ADDRESS": IpRecognizer,
    }
    for entity in spec.entities:
        if entity in builtin:
            registry.add_recognizer(builtin[entity]())
    if "PHONE_NUMBER" in spec.entities:
        registry.add_recognizer(FastPhoneRecognizer(spec.regions))
    if spec.needs_ner:
        registry.add_recognizer(
            SpacyRecognizer(supported_entities=[e for e in ("PERSON", "LOCATION") if e in spec.entities])
        )
    for c in spec.custom:
        flags = re.IGNORECASE if c.ignore_case else 0
        registry.add_recognizer(
            PatternRecognizer(
                supported_entity=c.entity,
                name=f"custom:{c.entity}",
                patterns=[Pattern(c.entity, c.pattern if not flags else f"(?i:{c.pattern})", c.score)],
                context=list(c.context) or None,
            )
        )
    engine = AnalyzerEngine(
        nlp_engine=presidio_offline.nlp_engine(model),
        registry=registry,
        supported_languages=["en"],
        context_aware_enhancer=presidio_offline.context_enhancer(),
    )
    _analyzers[spec] = engine
    return engine


def analyze_texts(spec: Spec, texts: list[str], entities: list[tuple[str, ...]] | None = None) -> list[list[Finding]]:
    """Presidio over each text (for the entity types given per text, else all of the spec's);
    overlapping findings resolved (higher score, then longer, wins)."""
    engine = _analyzer(spec)
    out = []
    for i, text in enumerate(texts):
        wanted = list(entities[i]) if entities is not None else list(spec.entities)
        results = engine.analyze(text, language="en", entities=wanted, score_threshold=spec.min_score)
        found = [(r.start, r.end, r.entity_type, r.score) for r in results]
        out.append(resolve([f for f in found if _plausible(text, f[0], f[1], f[2])]))
    return out


def _plausible(text: str, start: int, end: int, entity: str) -> bool:
    """Drops what Presidio accepts but is not personal: IPv6 shorthands like ``::2`` (slices
    in code) with fewer than three groups."""
    if entity == "IP_ADDRESS" and ":" in text[start:end]:
        return sum(1 for g in text[start:end].split(":") if g) >= 3
    return True


def resolve(findings: list[Finding]) -> list[Finding]:
    kept: list[Finding] = []
    for f in sorted(findings, key=lambda f: (-f[3], -(f[1] - f[0]), f[0])):
        if all(f[1] <= k[0] or f[0] >= k[1] for k in kept):
            kept.append(f)
    return sorted(kept)


def warm(spec: Spec) -> bool:
    analyze_texts(spec, ["warm-up: call +1 202 555 0173 or mail a@example.com from 10.0.0.1"])
    return True


# --- in the serving process -----------------------------------------------------------------


class Analyzer:
    """Finds PII in texts for one process: cache → pre-filter → Presidio (in a worker pool)."""

    def __init__(self, workers: int, cache_size: int) -> None:
        self.workers = workers
        self.cache_size = cache_size
        self._cache: OrderedDict[bytes, tuple[Finding, ...]] = OrderedDict()
        self._prefilters: dict[Spec, Prefilter] = {}
        self._pool = None  # workers.WorkerPool when analysis runs in worker processes
        self._cached = metrics.pii_texts.get("cached")
        self._clean = metrics.pii_texts.get("clean")
        self._analysed = metrics.pii_texts.get("analysed")

    async def start(self, specs: list[Spec]) -> None:
        if self.workers > 0:
            from policies.pii.workers import WorkerPool

            self._pool = WorkerPool(self.workers)
            await self._pool.start(specs)  # Presidio loads in the workers now, not on the first request

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.stop()

    def _prefilter(self, spec: Spec) -> Prefilter:
        p = self._prefilters.get(spec)
        if p is None:
            p = self._prefilters[spec] = Prefilter(spec)
        return p

    async def find(self, spec: Spec, texts: list[str]) -> list[tuple[Finding, ...]]:
        """Findings for each text, in order."""
        results: list[tuple[Finding, ...] | None] = [None] * len(texts)
        todo: list[tuple[int, bytes, list[Window]]] = []
        prefilter = self._prefilter(spec)
        for i, text in enumerate(texts):
            key = prefilter.key(text)
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self._cached.inc()
                results[i] = hit
                continue
            windows = prefilter.windows(text)
            if not windows:
                self._clean.inc()
                results[i] = ()
                self._remember(key, ())
                continue
            todo.append((i, key, windows))
        if todo:
            chunks = [texts[i][a:b] for i, _, windows in todo for a, b, _ in windows]
            kinds = [e for _, _, windows in todo for _, _, e in windows]
            found = await self._analyze(spec, chunks, kinds)
            j = 0
            for i, key, windows in todo:
                acc: list[Finding] = []
                for a, _b, _e in windows:
                    acc.extend((s + a, e + a, t, sc) for s, e, t, sc in found[j])
                    j += 1
                self._analysed.inc()
                results[i] = tuple(acc)
                self._remember(key, results[i])
        return results  # type: ignore[return-value]

    async def _analyze(self, spec: Spec, chunks: list[str], kinds: list[tuple[str, ...]]) -> list[list[Finding]]:
        if self._pool is None:
            return analyze_texts(spec, chunks, kinds)
        return await self._pool.call(spec, chunks, kinds)

    def _remember(self, key: bytes, value: tuple[Finding, ...]) -> None:
        if self.cache_size <= 0:
            return
        self._cache[key] = value
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
