"""Finding PII in texts: a cheap pre-filter, Presidio on the windows it flags, a cache.

Every built-in entity has a shape a single regular expression can spot cheaply (an ``@``,
a run of seven or more digits, a dotted quad, two colons around hex digits); Presidio only
analyses windows of text around such spots, widened to whole words and far enough to hold the
longest entity and its context words. Text with no candidate never reaches Presidio, and text
seen before (earlier turns of a conversation) is answered from a cache keyed by its hash.

Work per text is linear and bounded (issue #11, item 2: 16 KB of ``@`` stalled a gateway for
14 s, because each spot widened itself to whole words by walking the text):

* spots are merged first and only the merged windows are widened, at most ``REACH``
  characters each way;
* a window longer than ``CHUNK`` characters is analysed in chunks that overlap by ``OVERLAP``
  (more than the longest entity and its context), so no single Presidio call sees more than
  ``CHUNK`` characters whatever the text; findings touching a cut are taken from the chunk
  that holds them whole;
* custom patterns run on RE2 (linear) or under a timeout (``patterns``).

Analysis runs in worker processes (``workers``) under a timeout; the serving process only
hashes texts, looks them up and pre-filters short ones (at most ``INLINE_CHARS`` per call, all
of them on linear-time patterns): a long or hostile text never runs on the event loop.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import hashlib
import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from core import metrics

log = logging.getLogger("gateway.pii")

Finding = tuple[int, int, str, float]  # start, end, Presidio entity type, score

# Written-out addresses (policies.pii.emails): "%40", "at]", "at example dot" — each its own
# pattern, as one alternation with "@" would scan slower than the three apart.
_WRITTEN_EMAIL = (r"%40", r"(?i:at)(?:\s?[\])}>]|\s[^\s@]{1,63}\s(?i:dot)\s)")

# digits in groups; the separators include those ``fold`` reads as ASCII (no-break spaces, dashes)
_DIGITS = r"\d(?:[ \-./()\u00a0\u2007\u2009\u200a\u202f\u3000\u2010-\u2014\u2212\uff0d\uff08\uff09]{0,3}\d){6,}"
_PREFILTER = {  # the shapes each entity type is spotted by
    "EMAIL_ADDRESS": (r"@+", *_WRITTEN_EMAIL),
    "PHONE_NUMBER": (_DIGITS,),
    "CREDIT_CARD": (_DIGITS,),
    "US_SSN": (_DIGITS,),
    "IBAN_CODE": (_DIGITS,),
    "IP_ADDRESS": (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}|:[0-9A-Fa-f]{0,4}:",),
}
_NOT_A_CANDIDATE = re.compile(r"\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}")  # dates
MARGIN = 48  # characters of context kept on each side of a candidate
REACH = 256  # at most this far further to the whole word (an email is at most 254 characters)
CHUNK = 4096  # characters per Presidio call at most
OVERLAP = 512  # between chunks of one window: more than the longest entity and its context words
WHOLE = 0.6  # windows covering more of a text than this: the whole text is analysed (chunked)
INLINE_CHARS = 4096  # characters per call pre-filtered in the serving process; longer: in the worker
TIMEOUT_S = 5.0  # an analysis call's timeout: this ...
TIMEOUT_PER_CHAR_S = 20e-6  # ... plus this per character sent ...
TIMEOUT_MAX_S = 60.0  # ... at most this
# Characters one request's texts may send to Presidio after pre-filtering (the windows around
# candidates, or whole texts for NER): the work is linear, but 8 MB of phone-shaped numbers
# held a worker, and every tenant's requests queued behind it, for the whole 60 s timeout.
# Past it the request is refused (400) before any analysis.
MAX_ANALYSED_CHARS = 128 * 1024
# libphonenumber checks one request's texts may take (``phone.checking``): each costs about
# 0.1-0.4 ms, a phone-shaped number one to a dozen or more. Within 128 KiB, distinct numbers
# took up to 19 s of a worker (loadtest/results/bench-pii-cost*.md); past this bound (≈ 0.2-0.5 s)
# the request is refused (400) instead.
MAX_PHONE_CHECKS = 1000
# MB a worker's resident memory may grow by after it is ready before it is recycled (``workers``):
# spaCy keeps every distinct word it has read, ≈ 420 bytes each (a 128 KiB request of distinct
# IP addresses: +3.4 MB), for the life of the process.
WORKER_MAX_GROWTH_MB = 256


class TooMuchToCheck(Exception):
    """A request whose texts need more than the budget (``setting``) to analyse: ``chars``
    characters, or ``chars`` phone-number checks, at least. ``item``: the item analysed when the
    phone-number checks ran out, or the one with the most characters to analyse; ``text``: that
    item's index among the texts of ``Analyzer.find``."""

    def __init__(self, chars: int, budget: int, setting: str = "max_analysed_chars", item: int | None = None) -> None:
        super().__init__(f"{chars} to analyse, at most {budget} (pii.{setting})")
        self.chars = chars
        self.budget = budget
        self.setting = setting
        self.item = item
        self.text: int | None = None


_WS = re.compile(r"\s")
_LAST_WS = re.compile(r"\s(?=\S*\Z)")


class AnalysisTimeout(RuntimeError):
    pass


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
# A piece of a text for one Presidio call: start, end, entity types, and whether its start / end
# is a cut inside a longer window (findings touching a cut are dropped: a neighbour holds them).
Chunk = tuple[int, int, tuple[str, ...], bool, bool]
# What one text needs analysed: the text itself (pre-filtered where it is analysed), or its
# chunks cut out already, each as (offset, chunk text, entity types, cut at start, cut at end).
Item = str | list[tuple[int, str, tuple[str, ...], bool, bool]]


class Prefilter:
    """Spots candidates, one regular expression per shape (shapes overlap: a dotted quad is
    also a run of digits), and turns them into windows, each with the entity types whose shape
    was spotted in it: Presidio then runs only those types' recognizers there."""

    def __init__(self, spec: Spec) -> None:
        from policies.pii.patterns import CustomPattern

        shapes: dict[str, set[str]] = {}
        for e in spec.entities:
            for shape in _PREFILTER.get(e, ()):
                shapes.setdefault(shape, set()).add(e)
        # (spans of a text, entity types, whether date-shaped spots are dropped: built-in shapes only)
        self.shapes: list = []
        for p in sorted(shapes):
            compiled = re.compile(p)
            self.shapes.append((_spans(compiled), frozenset(shapes[p]), True))
        custom = [CustomPattern(c.pattern, c.ignore_case) for c in spec.custom]
        self.shapes += [(p.spans, frozenset([c.entity]), False) for p, c in zip(custom, spec.custom, strict=True)]
        # Built-in shapes are linear; a custom pattern RE2 cannot run is run in workers only.
        self.linear = all(p.linear for p in custom)
        self.all = tuple(spec.entities)
        self.whole = spec.needs_ner  # NER looks at every word: no shortcut
        # Cache keys hash a text with this spec's identity, so policies never share findings.
        self.person = hashlib.blake2b(repr(spec).encode(), digest_size=16).digest()

    def key(self, text: str) -> bytes:
        return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16, person=self.person).digest()

    def windows(self, text: str) -> list[Window]:
        """Spans of ``text`` that may hold an entity, merged; [] when none can. Linear in the
        length of the text: spots are merged before any widening, each window widens once."""
        n = len(text)
        if self.whole:
            return [(0, n, self.all)] if text.strip() else []
        spots: list[tuple[int, int, frozenset]] = []
        for spans, entities, skip_dates in self.shapes:
            for a, b in spans(text):
                if not (skip_dates and _NOT_A_CANDIDATE.fullmatch(text, a, b)):
                    spots.append((max(0, a - MARGIN), min(n, b + MARGIN), entities))
        if not spots:
            return []
        spots.sort(key=lambda s: s[0])
        merged: list[list] = []
        for a, b, entities in spots:
            if merged and a <= merged[-1][1]:
                last = merged[-1]
                if b > last[1]:
                    last[1] = b
                if not entities <= last[2]:
                    last[2] = last[2] | entities
            else:
                merged.append([a, b, entities])
        out: list[list] = []
        for a, b, entities in merged:
            a, b = _word_start(text, a), _word_end(text, b)
            if out and a <= out[-1][1]:
                out[-1][1] = max(out[-1][1], b)
                out[-1][2] = out[-1][2] | entities
            else:
                out.append([a, b, entities])
        if sum(w[1] - w[0] for w in out) > WHOLE * n:
            return [(0, n, tuple(sorted(frozenset().union(*(w[2] for w in out)))))]
        return [(a, b, tuple(sorted(e))) for a, b, e in out]

    def chunks(self, text: str) -> list[Chunk]:
        """The windows of ``text``, each cut into pieces of at most ``CHUNK`` characters."""
        out: list[Chunk] = []
        for a, b, kinds in self.windows(text):
            start = a
            while True:
                if b - start <= CHUNK:
                    out.append((start, b, kinds, start > a, False))
                    break
                end = _cut(text, start + CHUNK, start + CHUNK - OVERLAP // 2)
                out.append((start, end, kinds, start > a, True))
                start = end - OVERLAP
        return out


def _spans(pattern: re.Pattern):
    def spans(text: str):
        for m in pattern.finditer(text):
            yield m.span()

    return spans


def _word_start(text: str, i: int) -> int:
    """The start of the word at ``i``, looking back at most ``REACH`` characters."""
    lo = max(0, i - REACH)
    m = _LAST_WS.search(text, lo, i)
    return m.end() if m is not None else lo


def _word_end(text: str, i: int) -> int:
    """The end of the word at ``i``, looking ahead at most ``REACH`` characters."""
    m = _WS.search(text, i, min(len(text), i + REACH))
    return m.start() if m is not None else min(len(text), i + REACH)


def _cut(text: str, at: int, lo: int) -> int:
    """Where to end a chunk: the last whitespace in text[lo:at], else ``at``."""
    m = _LAST_WS.search(text, lo, at)
    return m.start() + 1 if m is not None else at


# --- in the worker (or, with workers: 0, in a thread of the serving process) ----------------

_analyzers: dict[Spec, object] = {}
_prefilters: dict[Spec, Prefilter] = {}


# A spec whose engine failed to build in this process, and why: refused at once afterwards rather
# than built again per request (a model that exists but does not load is a whole ``spacy.load`` of
# CPU each time). A worker restarted, a fresh process, tries again.
_unloadable: dict[Spec, str] = {}


def _analyzer(spec: Spec):
    found = _analyzers.get(spec)
    if found is not None:
        return found
    failed = _unloadable.get(spec)
    if failed is not None:
        raise RuntimeError(failed)
    try:
        return _build(spec)
    except Exception as exc:
        _unloadable[spec] = f"{type(exc).__name__}: {exc}"
        raise


def _build(spec: Spec):
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.predefined_recognizers import EmailRecognizer, SpacyRecognizer

    from policies.pii import presidio_offline
    from policies.pii.cards import CardRecognizer
    from policies.pii.emails import WrittenEmailRecognizer
    from policies.pii.iban import GreedySafeIbanRecognizer
    from policies.pii.ip import FastIpRecognizer
    from policies.pii.phone import FastPhoneRecognizer
    from policies.pii.ssn import SsnRecognizer

    presidio_offline.setup()
    model = spec.ner_model if spec.needs_ner else presidio_offline.blank_pipeline(Path(spec.data_dir))
    registry = RecognizerRegistry(supported_languages=["en"])
    builtin = {
        "EMAIL_ADDRESS": EmailRecognizer,
        "CREDIT_CARD": CardRecognizer,
        "IBAN_CODE": GreedySafeIbanRecognizer,
        "US_SSN": SsnRecognizer,
        "IP_ADDRESS": FastIpRecognizer,
    }
    for entity in spec.entities:
        if entity in builtin:
            registry.add_recognizer(builtin[entity]())
    if "EMAIL_ADDRESS" in spec.entities:
        registry.add_recognizer(WrittenEmailRecognizer())
    if "PHONE_NUMBER" in spec.entities:
        registry.add_recognizer(FastPhoneRecognizer(spec.regions))
    if spec.needs_ner:
        registry.add_recognizer(
            SpacyRecognizer(supported_entities=[e for e in ("PERSON", "LOCATION") if e in spec.entities])
        )
    for c in spec.custom:
        registry.add_recognizer(_custom_recognizer(c))
    engine = AnalyzerEngine(
        nlp_engine=presidio_offline.nlp_engine(model, blank=not spec.needs_ner),
        registry=registry,
        supported_languages=["en"],
        context_aware_enhancer=presidio_offline.context_enhancer(),
    )
    _analyzers[spec] = engine
    return engine


def _custom_recognizer(c: CustomRecognizer):
    """A config-defined pattern as a Presidio recognizer running on RE2 or under a timeout."""
    from presidio_analyzer import AnalysisExplanation, EntityRecognizer, RecognizerResult

    from policies.pii.patterns import CustomPattern

    class CustomPatternRecognizer(EntityRecognizer):
        def load(self) -> None:
            pass

        def analyze(self, text: str, entities: list[str], nlp_artifacts=None) -> list[RecognizerResult]:
            return [
                RecognizerResult(
                    c.entity,
                    a,
                    b,
                    c.score,
                    analysis_explanation=AnalysisExplanation(self.name, c.score, pattern=c.pattern),
                    recognition_metadata={
                        RecognizerResult.RECOGNIZER_NAME_KEY: self.name,
                        RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: self.id,
                    },
                )
                for a, b in pattern.spans(text)
            ]

    pattern = CustomPattern(c.pattern, c.ignore_case)
    return CustomPatternRecognizer(
        supported_entities=[c.entity], name=f"custom:{c.entity}", context=list(c.context) or None
    )


def _prefilter_for(spec: Spec) -> Prefilter:
    p = _prefilters.get(spec)
    if p is None:
        p = _prefilters[spec] = Prefilter(spec)
    return p


def analyze_texts(spec: Spec, texts: list[str], entities: list[tuple[str, ...]] | None = None) -> list[list[Finding]]:
    """Presidio over each text as given (for the entity types given per text, else all of the
    spec's); overlapping findings resolved (higher score, then longer, wins)."""
    engine = _analyzer(spec)
    out = []
    for i, text in enumerate(texts):
        wanted = list(entities[i]) if entities is not None else list(spec.entities)
        out.append(resolve(_presidio(engine, spec, text, wanted)))
    return out


def _presidio(engine, spec: Spec, text: str, wanted: list[str]) -> list[Finding]:
    results = engine.analyze(text, language="en", entities=wanted, score_threshold=spec.min_score)
    found = [(r.start, r.end, r.entity_type, r.score) for r in results]
    return [f for f in found if _plausible(text, f[0], f[1], f[2])]


def _covered(pieces: list) -> int:
    """Characters of a text its pieces cover (chunks of one window overlap), each counted once."""
    total, reach = 0, 0
    for offset, chunk, *_ in sorted(pieces, key=lambda p: p[0]):
        end = offset + len(chunk)
        if end > reach:
            total += end - max(offset, reach)
            reach = end
    return total


def analyze_items(
    spec: Spec, items: list[Item], budget: int | None = None, checks: int | None = None
) -> list[list[Finding]]:
    """Findings per item, in text coordinates, resolved. An item is a whole text (pre-filtered
    and chunked here) or the chunks the serving process cut out of it. ``budget``: at most this
    many characters go to Presidio over all the items, else ``TooMuchToCheck`` before any does;
    ``checks``: at most this many phone-number checks over all the items, else ``TooMuchToCheck``
    as soon as they are used up."""
    from policies.pii import phone

    engine = _analyzer(spec)
    cut: list[list] = []
    for item in items:
        if isinstance(item, str):
            cut.append([(a, item[a:b], kinds, cl, cr) for a, b, kinds, cl, cr in _prefilter_for(spec).chunks(item)])
        else:
            cut.append(item)
    if budget is not None:
        covered = [_covered(pieces) for pieces in cut]
        chars = sum(covered)
        if chars > budget:  # naming the item with the most to check (not the longest: prose costs nothing)
            raise TooMuchToCheck(chars, budget, item=max(range(len(covered)), key=covered.__getitem__))
    out: list[list[Finding]] = []
    with phone.checking(checks):
        for pieces in cut:
            acc: list[Finding] = []
            for offset, chunk, kinds, cut_start, cut_end in pieces:
                n = len(chunk)
                try:
                    found = _presidio(engine, spec, chunk, list(kinds))
                except phone.TooManyChecks as exc:
                    raise TooMuchToCheck(exc.checks, exc.budget, "max_phone_checks", len(out)) from None
                for s, e, t, sc in found:
                    if (cut_start and s == 0) or (cut_end and e == n):
                        continue  # cut in two here; the overlapping neighbour holds it whole
                    acc.append((s + offset, e + offset, t, sc))
            out.append(resolve(acc))
    return out


_DOTTED_BEFORE = re.compile(r"\d\.$")
_DOTTED_AFTER = re.compile(r"\.\d+\.\d")  # (one more number is a port: tcpdump's "10.0.0.1.443")
# Right before a dotted quad that is no address: a package pin ("foo==2.4.10.1", not a filter
# such as "ip.addr==10.0.0.1" nor a setting named for an address, "host==10.0.0.1"), a "v", or
# a version, section or OID word.
_VERSION_BEFORE = re.compile(
    r"(?:(?<![\w.])(?P<pin>[A-Za-z][\w-]*)(?:\[[\w,-]*\])?[ \t]*(?:==|~=|>=|<=|!=)[ \t]*"
    r"|(?<![\w.])v"
    r"|(?<![\w.])(?:version|versions|ver|firmware|chapter|section|rev|oid)\.?:?[ \t]*"
    r"|(?<![\w./:-])(?P<product>[A-Za-z][\w.-]*)/)$",
    re.IGNORECASE,
)

# A name before "==" that says an address follows: a filter or setting, not a package. Its words
# (split at "-", "_", "." and case: "sourceIPAddress"; a trailing number or "v", "for" aside) end
# in one naming an address ("DB_HOST", "src_ip", "X-Forwarded-For", "ipv4"); or its words are
# all words a network setting and a package share ("server", "dns_servers", "HTTP_PROXY"; a
# package has others: "assemblyline-service-client==4.7.4.25", "vmware-vapi-common-client==9.1.1.0",
# "backports-ssl-match-hostname==3.7.0.1" are pins).
_NAME_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
_ADDRESS_WORD = re.compile(
    r"ip|ips|ipv|ipaddr|ipaddress|addr|addrs|address|addresses|host|hosts|src|dst|dest|saddr|daddr|srcaddr"
    r"|dstaddr|srcip|dstip|clientip|remoteip|sourceip|destip|hostip|remoteaddr|nexthop|subnet|cidr|xff|forwarded"
    r"|nameserver|nameservers|upstream|endpoint|peer|remote|router|gw|loopback|inet|vip|sip|dip",
    re.IGNORECASE,
)
_NETWORK_WORD = re.compile(
    r"servers?|clients?|source|destination|target|gateway|proxy|dns|net|bind|listen|nodes?|origin|instance|from"
    r"|to|nat|lb|master|sender|caller|attacker|victim|hostname|http|https|\d+",
    re.IGNORECASE,
)


def _names_address(name: str) -> bool:
    words = _NAME_WORDS.findall(name)
    while words and (words[-1].isdigit() or words[-1].lower() in ("v", "for")):
        words.pop()
    if not words:
        return False
    if _ADDRESS_WORD.fullmatch(words[-1]):
        return True
    if name.upper() == name and _NETWORK_WORD.fullmatch(words[-1]):  # an environment variable
        return True
    return all(_NETWORK_WORD.fullmatch(w) for w in words)


# After user@host, a colon and a path: an SSH or SCP target ("git@github.com:acme/app.git",
# "deploy@build:/srv"), a login on a machine, not a mailbox. A colon and a word is no path: a
# leaked "name@example.com:password" keeps its address.
_REMOTE_AFTER = re.compile(r":(?:[~/]|[\w.-]+/)")


def _may_follow_a_version_word(text: str, lo: int, end: int) -> bool:
    """Whether ``_VERSION_BEFORE`` can match ``text[lo:end]``: every way it ends (an operator,
    "/", a word, "v", then spaces or tabs) leaves one of "=/.:" or a letter before the spaces.
    ``$`` also matches before a final newline. Running the pattern itself on every address of a
    text dense with them was a tenth of analysing it."""
    ends = (end, end - 1) if end > lo and text[end - 1] == "\n" else (end,)
    for j in ends:
        while j > lo and text[j - 1] in " \t":
            j -= 1
        if j > lo and (text[j - 1] in "=/.:" or text[j - 1].isalpha()):
            return True
    return False


def _plausible(text: str, start: int, end: int, entity: str) -> bool:
    """Drops what Presidio accepts but is not personal: IPv6 shorthands like ``::2`` (slices
    in code) with fewer than three groups (a dotted IPv4 tail counts as two: ``::ffff:192.0.2.1``
    is an address); dotted quads that are part of a longer dotted number (an SNMP OID
    ``1.3.6.1.4.1.2021``; an address followed by its port, ``10.0.0.1.443``, stays), followed
    by a pre-release tag (``1.2.3.4-beta``), or written as a version, a section, a package pin
    or a product's version (``foo==2.4.10.1``, ``Firmware
    2.0.0.1``, ``chapter 3.1.4.1``, ``Chrome/120.0.0.0``; a filter, ``ip.addr==10.0.0.1``, and
    ``host/10.0.0.1`` stay); and an SSH or SCP target taken for an email address
    (``git@github.com:acme/app.git``)."""
    if entity == "EMAIL_ADDRESS":
        return not _REMOTE_AFTER.match(text, end)
    if entity != "IP_ADDRESS":
        return True
    value = text[start:end]
    if ":" in value:
        groups = [g for g in value.split(":") if g]
        return len(groups) + (1 if groups and "." in groups[-1] else 0) >= 3
    # (a tag after it, "10.0.0.1-beta", is not read as a version's: real addresses carry such
    # suffixes in file names and keys, and a version scrubbed costs less than an address sent)
    if _DOTTED_BEFORE.search(text, max(0, start - 2), start) or _DOTTED_AFTER.match(text, end):
        return False
    lo = max(0, start - 40)
    if not _may_follow_a_version_word(text, lo, start):
        return True
    before = _VERSION_BEFORE.search(text, lo, start)
    if before is None:
        return True
    name = before["pin"] or before["product"]
    return name is not None and _names_address(name)


def resolve(findings: list[Finding]) -> list[Finding]:
    """Overlapping findings: the higher score, then the longer, wins. O(k log k)."""
    starts: list[int] = []  # kept findings, sorted by start (they never overlap each other)
    ends: list[int] = []
    kept: list[Finding] = []
    for f in sorted(findings, key=lambda f: (-f[3], -(f[1] - f[0]), f[0])):
        i = bisect.bisect_left(starts, f[0])
        if i < len(starts) and starts[i] < f[1]:
            continue  # a kept one starts inside f
        if i > 0 and ends[i - 1] > f[0]:
            continue  # the kept one before f reaches into it
        starts.insert(i, f[0])
        ends.insert(i, f[1])
        kept.insert(i, f)
    return kept


def warm(spec: Spec) -> bool:
    analyze_texts(spec, ["warm-up: call +1 202 555 0173 or mail a@example.com from 10.0.0.1"])
    return True


# --- in the serving process -----------------------------------------------------------------


def timeout_for(base: float, chars: int) -> float:
    return min(TIMEOUT_MAX_S, base + TIMEOUT_PER_CHAR_S * chars)


class Analyzer:
    """Finds PII in texts for one process: cache → pre-filter → Presidio (in a worker pool)."""

    def __init__(
        self,
        workers: int,
        cache_size: int,
        timeout: float | None = None,
        max_chars: int | None = MAX_ANALYSED_CHARS,
        max_checks: int | None = MAX_PHONE_CHECKS,
        max_growth_mb: float | None = WORKER_MAX_GROWTH_MB,
    ) -> None:
        self.workers = workers
        self.max_growth_mb = max_growth_mb  # per worker process; None: never recycled
        self.cache_size = cache_size
        self.max_chars = max_chars  # per ``find`` (one request's texts); None: no bound
        self.max_checks = max_checks  # phone-number checks per ``find``; None: no bound
        self.timeout = timeout if timeout is not None else float(os.environ.get("GATEWAY_PII_TIMEOUT_S", TIMEOUT_S))
        self._cache: OrderedDict[bytes, tuple[Finding, ...]] = OrderedDict()
        self._prefilters: dict[Spec, Prefilter] = {}
        self._pool = None  # workers.WorkerPool when analysis runs in worker processes
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None  # workers: 0
        self._cached = metrics.pii_texts.get("cached")
        self._clean = metrics.pii_texts.get("clean")
        self._analysed = metrics.pii_texts.get("analysed")

    async def start(self, specs: list[Spec]) -> None:
        if self.workers > 0:
            from policies.pii.workers import WorkerPool

            self._pool = WorkerPool(self.workers, self.max_growth_mb)
            await self._pool.start(specs)  # Presidio loads in the workers now, not on the first request
            return
        # In the serving process: loaded now, in the analysis thread (several seconds), not by the
        # first request within its own analysis timeout. A spec that cannot load (a NER model not
        # installed, or one that fails to load) is logged here and remembered (``_unloadable``):
        # each request is refused at once, not loaded again (a whole ``spacy.load`` each time).
        loop = asyncio.get_running_loop()
        for spec in specs:
            try:
                await loop.run_in_executor(self._executor(), warm, spec)
            except Exception as exc:
                log.error("PII analysis for %s could not load: %s", list(spec.entities), exc)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.stop()
        if self._thread is not None:
            self._thread.shutdown(wait=False, cancel_futures=True)

    def _prefilter(self, spec: Spec) -> Prefilter:
        p = self._prefilters.get(spec)
        if p is None:
            p = self._prefilters[spec] = Prefilter(spec)
        return p

    async def find(self, spec: Spec, texts: list[str]) -> list[tuple[Finding, ...]]:
        """Findings for each text, in order."""
        results: list[tuple[Finding, ...] | None] = [None] * len(texts)
        todo: list[tuple[int, bytes]] = []
        items: list[Item] = []
        prefilter = self._prefilter(spec)
        budget = INLINE_CHARS if prefilter.linear else 0
        for i, text in enumerate(texts):
            key = prefilter.key(text)
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self._cached.inc()
                results[i] = hit
                continue
            if len(text) <= budget:  # short: pre-filtered here, only its windows are sent
                budget -= len(text)
                chunks = prefilter.chunks(text)
                if not chunks:
                    self._clean.inc()
                    results[i] = ()
                    self._remember(key, ())
                    continue
                items.append([(a, text[a:b], kinds, cl, cr) for a, b, kinds, cl, cr in chunks])
            else:  # long (or a pattern without a linear engine): all of it in the worker
                items.append(text)
            todo.append((i, key))
        if items:
            try:
                found = await self._analyze(spec, items)
            except TooMuchToCheck as exc:
                exc.text = todo[exc.item][0] if exc.item is not None and exc.item < len(todo) else None
                raise
            for (i, key), fs in zip(todo, found, strict=True):
                self._analysed.inc()
                results[i] = tuple(fs)
                self._remember(key, results[i])
        return results  # type: ignore[return-value]

    async def _analyze(self, spec: Spec, items: list[Item]) -> list[list[Finding]]:
        chars = sum(len(it) if isinstance(it, str) else sum(len(c[1]) for c in it) for it in items)
        timeout = timeout_for(self.timeout, chars)
        if self._pool is not None:
            return await self._pool.call(spec, items, timeout, self.max_chars, self.max_checks)
        failed = _unloadable.get(spec)  # (refused here: not queued behind the analysis thread's work)
        if failed is not None:
            raise RuntimeError(f"could not load: {failed}")
        # In the serving process: a thread of its own, so the event loop keeps serving; a thread
        # cannot be stopped, but the request is answered (refused) when the timeout passes.
        fut = asyncio.get_running_loop().run_in_executor(
            self._executor(), analyze_items, spec, items, self.max_chars, self.max_checks
        )
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise AnalysisTimeout(f"PII analysis took longer than {timeout:.1f} s") from None

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._thread is None:
            self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pii")
        return self._thread

    def _remember(self, key: bytes, value: tuple[Finding, ...]) -> None:
        if self.cache_size <= 0:
            return
        self._cache[key] = value
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
