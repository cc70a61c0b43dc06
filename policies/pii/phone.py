"""Phone numbers, found fast, told apart from product codes written in digit groups.

Presidio's ``PhoneRecognizer`` runs libphonenumber's matcher over the whole text once per
region, which costs ≈ 15 ms for 200 words with eight regions and flags IP addresses. This
recognizer finds digit runs that could be phone numbers first, drops the shapes that are
certainly not (dates, times, IPv4 addresses, too few or too many digits), and runs the same
matcher over each remaining candidate only, per configured region, memoized.

How sure the matcher must be depends on what surrounds the candidate (issue #11, item 17: SKUs
and part numbers such as ``P/N 12-3456-7890`` or ``Artikelnummer 4711 0815 2342`` were taken
for phone numbers):

* written with ``+`` and a country code: a *possible* number (the right length for its
  country) is enough — an explicit ``+44`` is a phone number even where libphonenumber's
  metadata does not know the range;
* written with ``00`` and a country code, next to a phone word (phone, call, mobile, Tel.,
  Handy, portable, 电话, ...) or with the area code in parentheses (``(030) 901820``): a *valid*
  number, however grouped;
* with no such sign: a valid number *grouped as its country writes it* (libphonenumber's
  ``STRICT_GROUPING``: ``0151 23456789`` yes, ``4006-381-333-931`` no);
* beside a currency sign or code of its own ("250 000 000 UGX", "Rp 1 500 000"): an amount,
  unless written internationally;
* right after a product, order, tracking or bank word (SKU, P/N, part, ISBN, order, invoice,
  tracking, IMEI, sort code, ...; only labels such as "no." or "number" between them) and with
  no phone word nearer: not a phone number, unless written internationally.

With a phone word near it (or its area code in parentheses), a number is also read in the
numbering plans of ``WIDE`` (the most populous and most connected countries), not only the
configured regions: "Meu celular é (11) 98765-4321", "携帯は090-1234-5678です" and "Mi móvil es
el 612 34 56 78" are phone numbers wherever the gateway runs, and the phone word is what says so.
Without one, a number valid somewhere in the world is no evidence: most digit runs are.

Digits and separators are read through ``fold`` (full-width digits, Unicode dashes and spaces);
digits glued to Chinese, Japanese or Korean letters are not glued to a word.

A number is looked for inside a longer run of digit groups (``+44 20 7946 0958 203.0``) only
when the run starts with ``+``/``00``/``(`` or a phone word is near: otherwise a valid number
hidden in a longer product code is a product code.

Each libphonenumber parse or match of a candidate is a *check* (≈ 0.1-0.3 ms; a candidate takes
one to a few dozen). Inside ``checking(limit)`` (one request's analysis) the checks of each
distinct candidate are counted, memoized or not, and past ``limit`` ``TooManyChecks`` is raised:
a request packed with phone-shaped numbers is refused instead of holding the worker, and every
other tenant's requests queued behind it, for seconds.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from functools import cache, lru_cache

import phonenumbers
from phonenumbers import Leniency, PhoneMetadata, PhoneNumberMatcher
from presidio_analyzer import AnalysisExplanation, EntityRecognizer, RecognizerResult

from policies.pii.fold import WORD, fold

# Not glued to an identifier on the left ("INV-2024-000123", "v1.2024553").
CANDIDATE = re.compile(rf"(?<![+])(?<!{WORD})(?<!{WORD}[-/.])\+?\(?\d[\d ().\-/]{{5,22}}\d(?!{WORD})")
_NOT_PHONE = re.compile(
    r"\d{4}[-/.]\d{1,2}[-/.]\d{1,2}"  # 2024-05-01
    r"|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}"  # 05/01/2024
    r"|\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}"  # 192.168.0.1
)
_DATE_FIRST = re.compile(r"\d{4}[-/.]\d{1,2}[-/.]\d{1,2}(?!\d)|\d{1,2}[-/.]\d{1,2}[-/.]\d{4}(?!\d)")
_IDD = re.compile(r"00[1-9]")  # "0044 20 …", dialled from Europe
_TIME_NEXT = re.compile(r"[:h]\d")  # "2024-05-01 10:30", "… 10h30"
# An amount: a currency sign or ISO 4217 code right before or after the digits ("250 000 000 UGX",
# "Rp 1 500 000", "R$ 1 299 000"): not a phone number, whatever phone word is near.
_CURRENCY = (
    r"[$€£¥₹₩₺₽₦₱₫₪฿]|R\$|zł|kr|Rp|円|元|원|(?:USD|EUR|GBP|JPY|CNY|INR|BRL|MXN|KRW|IDR|PHP|TRY|PLN|NGN|ZAR|UGX"
    r"|KES|GHS|AUD|CAD|CHF|SEK|NOK|DKK|RUB|AED|SAR|EGP|PKR|BDT|VND|THB|MYR|SGD|HKD|TWD|ARS|COP|CLP|PEN)(?![A-Za-z])"
)
# (a sign that belongs to the next amount, "… 78 $19.99", or to the one before, "20 € 06 12 …", is
# not this number's)
_AMOUNT_AFTER = re.compile(rf"[ \t]?(?:{_CURRENCY})(?![ \t]?\d)")
_AMOUNT_BEFORE = re.compile(rf"(?<![A-Za-z])(?<!\d)(?<!\d[ \t])(?:{_CURRENCY})\.?[ \t]?$")
CONTEXT = ["phone", "number", "telephone", "cell", "cellphone", "mobile", "call", "tel", "whatsapp", "fax"]

PHONE_WORDS = (
    "phone", "telephone", "tel", "cell", "cellphone", "mobile", "mob", "call", "calling", "ring",
    "dial", "fax", "whatsapp", "sms", "hotline", "helpline", "landline", "ext", "extension",
    "telefon", "telefonnummer", "rufnummer", "handy", "mobil", "mobilnummer", "anrufen", "ruf",
    "téléphone", "tél", "portable", "appelez", "appeler", "appel", "teléfono", "móvil", "celular",
    "llamar", "llame", "telefone", "telefono", "cellulare", "电话", "手机", "電話", "携帯", "телефон",
    "llámame", "llamame", "llámanos", "ligar", "ligue", "whats", "zap", "chiamami", "chiamare",
    "chiamaci", "bel", "bellen", "mobiel", "dzwonić", "zadzwoń", "zadzwonić", "komórka", "komórki",
    "komórkę", "arayın", "arayin", "telepon", "telp", "hubungi", "wa", "text", "texto", "tawag", "viber",
    "telegram",
    "전화", "휴대폰", "핸드폰", "연락처", "번호", "ケータイ", "連絡先", "联系", "微信",
)  # fmt: skip
# Stems of phone words that take endings ("telefonum", "telefonu", "Telefonnummer", "téléphonez").
PHONE_STEMS = ("telefon", "telefoon", "teléfon", "telephon", "téléphon")
CODE_WORDS = (
    "sku", "p/n", "pn", "part", "parts", "item", "article", "artikel", "artikelnummer", "art.-nr",
    "art-nr", "artnr", "model", "serial", "s/n", "sn", "isbn", "issn", "ean", "upc", "gtin", "asin",
    "mpn", "order", "invoice", "inv", "ticket", "case", "ref", "reference", "référence", "tracking",
    "track", "shipment", "parcel", "awb", "fedex", "ups", "usps", "dhl", "imei", "iccid", "imsi",
    "lot", "batch", "build", "version", "routing", "aba", "sort code", "account", "acct", "konto",
    "kontonummer", "iban", "bic", "swift", "flight", "booking", "confirmation", "pnr", "transaction",
    "txn", "receipt", "product", "produit", "bestellnummer", "rechnungsnummer", "sendungsnummer",
    "commande", "facture", "pedido", "factura", "coordinates", "barcode", "waybill", "consignment",
    "resi", "pesanan", "sipariş", "siparis", "zamówienie", "zamówienia", "bestelling", "ordine",
    "fattura", "rechnung", "kundennummer", "vertrag", "contract", "ssn", "ss", "social", "itin",
    "tin", "isin", "cusip", "nip", "regon", "cpf", "cnpj", "rfc", "curp", "npwp", "balance", "amount",
    "total", "price", "cost", "costs", "sum", "saldo", "importe", "monto", "valor", "preço", "betrag",
    "summe", "preis", "montant", "prix", "harga", "jumlah", "fiyat", "tutar", "cena", "kwota", "prezzo",
    "importo", "bedrag", "prijs",
    "주문", "송장", "운송장", "계좌", "사업자", "주민", "注文", "订单", "追跡", "运单", "快递", "伝票", "口座",
    "会員", "账号", "账户", "卡号", "身份证",
)  # fmt: skip


# Words that may stand between a code word and its number ("order no.", "tracking number", "ref
# id"); any other word between them means the code word is not this number's label.
_LABELS = frozenset(
    ("no", "nr", "n", "num", "number", "numbers", "nummer", "numéro", "numero", "número", "id", "code", "is", "was")
)

# The labels that say the code word names a number ("order number", "numéro de commande"): after
# one, a few more words may stand before the number ("order number for the shoes is ...") as long
# as no sentence ends and no other number comes between.
_NUMBER_LABELS = _LABELS - {"is", "was"}
_BRIDGE = 4  # words a labelled code word reaches over
_BREAK = re.compile(r"[.!?;,\n]\s|\d")

# Words, read from the text around a candidate: letters, joined by . / - ("p/n", "art.-nr").
_TOKEN = re.compile(r"[^\W\d_]+(?:[./-]+[^\W\d_]+)*")
_PHONE_SET = frozenset(PHONE_WORDS)
_CODE_SET = frozenset(CODE_WORDS)
# No spaces between CJK words: found inside a token. "주문번호" (order number) is a code word.
_CJK_PHONE = re.compile("|".join(w for w in PHONE_WORDS if ord(w[0]) >= 0x2E80))
_CJK_CODE = re.compile("|".join(w for w in CODE_WORDS if ord(w[0]) >= 0x2E80))


def _kind(token: str, previous: str) -> str | None:
    """ "phone", "code" or None for a word (and the word before it, for "sort code")."""
    word = token.lower()
    if not word.isascii():
        if _CJK_CODE.search(word):
            return "code"
        if _CJK_PHONE.search(word):
            return "phone"
    if word in _PHONE_SET or word.startswith(PHONE_STEMS):
        return "phone"
    if word in _CODE_SET or f"{previous} {word}" in _CODE_SET:
        return "code"
    return None


def _in_code(text: str, start: int, end: int) -> bool:
    """Letters glued to digits ("1Z", "AA1"): part of an alphanumeric code, not a word."""
    return (start > 0 and text[start - 1].isdigit()) or (end < len(text) and text[end].isdigit())


def _phone_word(text: str, start: int, end: int) -> bool:
    previous = ""
    for m in _TOKEN.finditer(text, start, end):
        if _kind(m.group(), previous) == "phone":
            return True
        previous = m.group().lower()
    return False


BEFORE = 40  # characters before a candidate searched for a phone or code word
AFTER = 24  # characters after it searched for a phone word ("0151 23456789 (mobile)")
SCORE = 0.4

# (leniency, whether a number may be cut out of a longer run of digit groups, whether the
# numbering plans of ``WIDE`` are read too)
_PLUS = (Leniency.POSSIBLE, True, False)
_SIGNED = (Leniency.VALID, True, True)
_PLAIN = (Leniency.STRICT_GROUPING, False, False)

# Where a number beside a phone word may come from, whatever the configured regions: the most
# populous countries of each continent and the most connected ones (ITU-T E.164 plans).
WIDE = (
    "IN", "BR", "MX", "JP", "KR", "NG", "ZA", "ID", "PH", "TR", "PL", "ES", "IT", "NL", "AU", "CA",
    "CN", "RU", "AR", "CO", "CL", "PE", "VE", "EG", "MA", "KE", "GH", "PK", "BD", "VN", "TH", "MY",
    "SG", "HK", "TW", "SA", "AE", "IL", "UA", "PT", "BE", "CH", "AT", "SE", "NO", "DK", "FI", "IE",
    "NZ", "GR", "CZ", "RO", "HU", "US", "GB", "DE", "FR",
)  # fmt: skip


class TooManyChecks(Exception):
    """One request's texts needed more than ``budget`` libphonenumber checks."""

    def __init__(self, checks: int, budget: int) -> None:
        super().__init__(f"{checks} phone-number checks, at most {budget}")
        self.checks = checks
        self.budget = budget


class _Budget:
    """The checks one request may use; each distinct candidate is charged once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.seen: set = set()

    def charge(self, key: object, checks: int) -> None:
        if key in self.seen:
            return
        self.seen.add(key)
        self.used += checks
        if self.used > self.limit:
            raise TooManyChecks(self.used, self.limit)


_BUDGET: ContextVar[_Budget | None] = ContextVar("phone_check_budget", default=None)
_tally = threading.local()  # checks done by this thread: what computing a memoized answer cost


def _check() -> None:
    _tally.n = getattr(_tally, "n", 0) + 1


@contextlib.contextmanager
def checking(limit: int | None) -> Iterator[None]:
    """Within it, at most ``limit`` checks (None: no bound), else ``TooManyChecks``."""
    token = _BUDGET.set(_Budget(limit) if limit is not None else None)
    try:
        yield
    finally:
        _BUDGET.reset(token)


def _valid_somewhere(candidate: str, regions: tuple[str, ...]) -> bool:
    """``candidate``, as a whole, is a valid national number of a ``WIDE`` region, grouped as
    that region writes it (its groups are the region's groups, or several of them run together,
    as libphonenumber's ``STRICT_GROUPING``: "123-45-6789" is grouped as no country writes a
    phone number). Not when a configured region writes exactly these groups and the number is
    invalid there: "(555) 010-9999" is a made-up US number, not a Turkish mobile.

    Cheap first: a region is parsed only when the digits match its numbering plan's general
    pattern (without its trunk prefix), which most regions' do not, and matched (the costly
    part) only when the number is valid there and its groups could be that region's."""
    digits = "".join(c for c in candidate if c.isdigit())
    cuts = _cuts(candidate)
    for region in WIDE:
        if region in regions:
            continue
        prefix, plan = _plan(region)
        if not (
            plan.fullmatch(digits) or (prefix and digits.startswith(prefix) and plan.fullmatch(digits, len(prefix)))
        ):
            continue
        _check()
        try:
            number = phonenumbers.parse(candidate, region)
        except phonenumbers.NumberParseException:
            continue
        if (
            phonenumbers.is_valid_number(number)
            and cuts <= _cuts(_national(number))
            and any(  # and what libphonenumber's matcher says of it (a trunk prefix it needs, ...)
                m.start == 0 and m.end == len(candidate)
                for m in PhoneNumberMatcher(candidate, region, leniency=Leniency.STRICT_GROUPING)
            )
        ):
            return not (cuts and _written_in(candidate, cuts, regions))
    return False


def _written_in(candidate: str, cuts: frozenset[int], regions: tuple[str, ...]) -> bool:
    """A configured region writes a number with exactly the groups of ``candidate``."""
    for region in regions:
        _check()
        try:
            number = phonenumbers.parse(candidate, region)
        except phonenumbers.NumberParseException:
            continue
        if _cuts(_national(number)) == cuts:
            return True
    return False


def _national(number: phonenumbers.PhoneNumber) -> str:
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL)


def _cuts(written: str) -> frozenset[int]:
    """Where the groups of a written number break, counted in digits from its end (a trunk
    prefix written or not then changes nothing)."""
    sizes = [len(g) for g in _GROUPS.findall(written)]
    return frozenset(sum(sizes[i:]) for i in range(1, len(sizes)))


@cache
def _plan(region: str) -> tuple[str, re.Pattern]:
    """A region's trunk prefix and the general pattern of its national numbers."""
    meta = PhoneMetadata.metadata_for_region(region)
    return meta.national_prefix or "", re.compile(meta.general_desc.national_number_pattern)


_GROUPS = re.compile(r"\d+")


def _match(candidate: str, regions: tuple[str, ...], leniency: Leniency) -> tuple[tuple[int, int], ...]:
    regions = regions[:1] if candidate.startswith("+") else regions  # international: one parse
    # A valid number wins over a merely possible one (which may be a part of the candidate).
    for level in (Leniency.VALID, Leniency.POSSIBLE) if leniency == Leniency.POSSIBLE else (leniency,):
        for region in regions:
            _check()
            found = tuple(
                (m.start, m.end)
                for m in PhoneNumberMatcher(candidate, region, leniency=level)
                if sum(c.isdigit() for c in m.raw_string) >= 7
                and (level != Leniency.POSSIBLE or (m.start == 0 and _whole(candidate, m.end)))
            )
            if found:
                return found
    return ()


def _one_number(candidate: str, head: str) -> bool:
    """An international run whose head is only a *possible* number and which holds no more
    digits than E.164 allows (15) is one number libphonenumber cannot read, not a number and
    a neighbour: "+52 1 33 1234 5678" (the mobile "1" Mexico dropped in 2019, which WhatsApp
    still shows) is scrubbed whole, not as "+52 1 33 1234" and a "5678" left in the text. A
    valid head keeps its neighbour out ("+44 20 7946 0958 2024")."""
    if sum(c.isdigit() for c in candidate) > 15:
        return False
    _check()
    try:
        return not phonenumbers.is_valid_number(phonenumbers.parse(head))
    except phonenumbers.NumberParseException:
        return False


def _whole(candidate: str, end: int) -> bool:
    """The match leaves at most an extension's digits of the candidate after it."""
    return sum(c.isdigit() for c in candidate[end:]) <= 4


@lru_cache(maxsize=8192)
def _costed(
    candidate: str, regions: tuple[str, ...], leniency: Leniency, cut: bool, wide: bool
) -> tuple[tuple[tuple[int, int], ...], int]:
    """``_matches`` and the checks it took (charged again when the answer is memoized)."""
    before = getattr(_tally, "n", 0)
    found = _matches(candidate, regions, leniency, cut, wide)
    return found, getattr(_tally, "n", 0) - before


def _matches(
    candidate: str, regions: tuple[str, ...], leniency: Leniency, cut: bool, wide: bool
) -> tuple[tuple[int, int], ...]:
    found = _match(candidate, regions, leniency)
    if not found and wide and not candidate.startswith("+") and _valid_somewhere(candidate, regions):
        return ((0, len(candidate)),)
    if not cut:
        # The number is the candidate, or the candidate less an extension ("901820-0").
        return tuple((a, b) for a, b in found if a <= 1 and _whole(candidate, b))
    if found or " " not in candidate:
        return found
    # A number glued to its neighbours ("+44 20 7946 0958 203.0"): drop words from the end,
    # then from the start, until libphonenumber recognizes what is left.
    cuts = [i for i, c in enumerate(candidate) if c == " "]
    for at in reversed(cuts):
        head = candidate[:at]
        if sum(c.isdigit() for c in head) < 7:
            break
        found = _match(head, regions, leniency)
        if found:
            if candidate.startswith("+") and _one_number(candidate, head):
                return ((0, len(candidate)),)
            return found
    for at in cuts:
        tail = candidate[at + 1 :]
        if sum(c.isdigit() for c in tail) < 7:
            break
        found = _match(tail, regions, leniency)
        if found:
            return tuple((a + at + 1, b + at + 1) for a, b in found)
    return ()


def _how(text: str, start: int, end: int, candidate: str) -> tuple[Leniency, bool, bool] | None:
    """How sure the matcher must be for the candidate at text[start:end]; None: not a phone."""
    plus = candidate.startswith("+")
    phone_before = code_before = -1  # where the last phone / code word before the candidate ends
    previous = ""
    between = 0  # words after the last code word that are not a label ("no", "number", "id")
    labelled = False  # the last code word has a number label ("order number", "numéro de commande")
    words: list[str] = []  # the last words, lower case
    for m in _TOKEN.finditer(text, max(0, start - BEFORE), start):
        word = m.group().lower()
        kind = _kind(m.group(), previous)
        if kind == "phone":
            phone_before = m.end()
        elif kind == "code":
            code_before = m.end()
            between = 0
            labelled = "nummer" in word or "number" in word or any(w in _NUMBER_LABELS for w in words[-2:])
        elif word in _NUMBER_LABELS and not _in_code(text, m.start(), m.end()):
            labelled = labelled or (code_before >= 0 and between == 0)
        elif word not in _LABELS and not _in_code(text, m.start(), m.end()):
            between += 1
        previous = word
        words.append(word)
    # "order NYC line (212) 555-0199": the code word names something else; but "order number for
    # the shoes is 020 7946 0958" names this number (no sentence end and no other number between)
    if between and not (labelled and between <= _BRIDGE and not _BREAK.search(text, code_before, start)):
        code_before = -1
    if phone_before < 0 and code_before < 0:  # no word of its own: its column's header, in a table
        header = _column(text, start)
        if header == "phone":
            phone_before = 0
        elif header == "code":
            code_before = 0
    if code_before > phone_before and not plus:
        return None  # "SKU 4006-381-333-931", "Sort code 40-47-84"
    if plus:
        return _PLUS
    if (
        phone_before >= 0
        or candidate.startswith("(")
        or _IDD.match(candidate)
        or _phone_word(text, end, min(len(text), end + AFTER))
    ):
        return _SIGNED
    return _PLAIN


HEADER_REACH = 2000  # characters before a table cell searched for its column's header
_CELL_SEPARATORS = "|\t;,"


def _line_start(text: str, i: int, lo: int) -> int | None:
    """Where the line holding ``text[i]`` starts; None if that is before ``lo``."""
    nl = text.rfind("\n", lo, i)
    if nl >= 0:
        return nl + 1
    return 0 if lo == 0 else None


def _column(text: str, start: int) -> str | None:
    """ "phone" or "code" when the number at ``start`` is a cell of a Markdown, CSV or TSV table
    (lines with as many separators as its own) whose header names its column so ("| agent |
    phone |", "order_id,status"); else None. Bounded: ``HEADER_REACH`` characters back."""
    lo = max(0, start - HEADER_REACH)
    row = _line_start(text, start, lo)
    if row is None:
        return None
    row_end = text.find("\n", start, start + HEADER_REACH)
    line = text[row : row_end if row_end >= 0 else start + HEADER_REACH]
    separator = next((c for c in _CELL_SEPARATORS if c in line), None)
    if separator is None:
        return None
    column = text.count(separator, row, start)
    width = line.count(separator)
    header = row
    while header > lo:  # up the lines with as many separators: the first is the header
        above = _line_start(text, header - 1, lo)
        if above is None or text.count(separator, above, header - 1) != width:
            break
        header = above
    if header == row:
        return None
    cells = text[header : header + len(line) + HEADER_REACH].split("\n", 1)[0].split(separator)
    previous = ""
    for m in _TOKEN.finditer(cells[column]):
        kind = _kind(m.group(), previous)
        if kind is not None:
            return kind
        previous = m.group().lower()
    return None


# A WhatsApp click-to-chat link holds an international number without its "+": wa.me/<number>,
# or whatsapp.com/send?...phone=<number> (the host looked for in the same token, a bounded way back).
_WA_LINK = re.compile(r"(?:\bwa\.me/|[?&]phone=)\+?(\d{7,15})(?!\d)", re.IGNORECASE)
_WA_SEND = re.compile(r"whatsapp\.com/send", re.IGNORECASE)
_WA_REACH = 200  # characters before ``phone=`` searched for the host


def _links(text: str, budget: _Budget | None) -> list[tuple[int, int]]:
    out = []
    for m in _WA_LINK.finditer(text):
        if m.group().lower().startswith(("?", "&")):  # phone=: only in a whatsapp.com/send link
            before = text[max(0, m.start() - _WA_REACH) : m.start()]
            token = before.rsplit(None, 1)[-1] if before.strip() else ""
            if not _WA_SEND.search(token):
                continue
        if budget is not None:
            budget.charge(("link", m.group(1)), 1)
        try:
            number = phonenumbers.parse("+" + m.group(1))
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_possible_number(number):
            out.append((m.start(1), m.end(1)))
    return out


def find(text: str, regions: tuple[str, ...]) -> list[tuple[int, int]]:
    text = fold(text)  # full-width digits, Unicode dashes and spaces: as ASCII, same offsets
    budget = _BUDGET.get()
    out = _links(text, budget)
    n = len(text)
    for m in CANDIDATE.finditer(text):
        s = m.group()
        digits = sum(c.isdigit() for c in s)
        if digits < 7 or _NOT_PHONE.fullmatch(s) or _DATE_FIRST.match(s):
            continue  # longer runs may hold a phone beside other numbers
        if m.end() < n and _TIME_NEXT.match(text, m.end()):
            continue  # a date and a time, "2024-05-01 10:30"
        if not s.startswith("+") and (
            _AMOUNT_AFTER.match(text, m.end()) or _AMOUNT_BEFORE.search(text, max(0, m.start() - 6), m.start())
        ):
            continue  # an amount
        how = _how(text, m.start(), m.end(), s)
        if how is None:
            continue
        found, checks = _costed(s, regions, *how)
        if budget is not None:
            budget.charge((s, how), checks)
        out.extend((m.start() + a, m.start() + b) for a, b in found)
    return out


class FastPhoneRecognizer(EntityRecognizer):
    def __init__(self, regions: tuple[str, ...]) -> None:
        self.regions = tuple(r for r in regions if r in phonenumbers.SUPPORTED_REGIONS)
        super().__init__(supported_entities=["PHONE_NUMBER"], name="FastPhoneRecognizer", context=CONTEXT)

    def load(self) -> None:
        for region in WIDE:  # the numbering plans read abroad, at start-up, not on a first request (≈ 30 ms)
            _plan(region)

    def analyze(self, text: str, entities: list[str], nlp_artifacts=None) -> list[RecognizerResult]:
        return [
            RecognizerResult(
                "PHONE_NUMBER",
                a,
                b,
                SCORE,
                analysis_explanation=AnalysisExplanation(self.name, SCORE, textual_explanation="libphonenumber"),
                recognition_metadata={
                    RecognizerResult.RECOGNIZER_NAME_KEY: self.name,
                    RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: self.id,
                },
            )
            for a, b in find(text, self.regions)
        ]
