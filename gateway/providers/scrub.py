"""Provider error messages cleaned of secrets and addresses before a client (or a log) sees them.

Providers echo parts of keys (``Incorrect API key provided: sk-abc***xyz``), and connection
failures name internal hosts, IP addresses and URLs. ``Scrubber.clean`` replaces

- the configured secrets themselves (API keys, header values) and the configured hosts,
- key-shaped tokens: known key prefixes (``sk-``, ``AIza``, ``AKIA``, ``gsk_``, JWTs, ...),
  masked keys (``abc***xyz``), ``Bearer``/``Basic`` credentials, ``api_key=...`` pairs and
  long random-looking tokens,
- URLs, IP addresses (v4 and v6, with ports), ``host:port`` pairs and host names under
  common public or internal top-level domains,

and keeps the rest (status, type, what was wrong) readable. Names the caller chose to keep
(the model names of the request) are never altered. The text is capped before it is
scanned, so the work per message is bounded.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

MAX_MESSAGE = 1000  # characters of a provider message that reach a client

KEY = "[redacted]"
URL = "[url]"
HOST = "[host]"
IP = "[ip]"

# Top-level domains that make ``a.b`` a host name rather than a field path (``messages.0.content``)
# or a model name (``anthropic.claude-v2``): the common public ones and the usual internal ones.
_TLDS = frozenset(
    """com net org io ai dev app cloud co uk de fr eu nl ch se no fi dk at be es pt pl cz jp cn kr tw hk
    sg au nz ca br mx ru ua gov edu mil int info biz xyz tech sh cc run site online host page
    internal local localdomain localhost lan corp intra intranet home private svc cluster example
    test invalid arpa consul""".split()
)

_PATTERNS: list[tuple[re.Pattern[str], object]] = []


def _sub(pattern: str, repl, flags: int = 0) -> None:
    _PATTERNS.append((re.compile(pattern, flags), repl))


def _long_token(m: re.Match[str]) -> str:
    token = m.group(0)
    for run in re.findall(r"[A-Za-z0-9]{20,}", token):
        if any(c.isdigit() for c in run) and any(c.isalpha() for c in run):
            return KEY
    return token


def _basic(m: re.Match[str]) -> str:
    cred = m.group(3)
    looks_encoded = "=" in cred or any(c.isdigit() for c in cred) or any(c.isupper() for c in cred[1:])
    return f"{m.group(1)}{m.group(2)}{KEY}" if looks_encoded else m.group(0)


def _ipv6(m: re.Match[str]) -> str:
    text = m.group(0)
    core = text
    if core.startswith("["):
        core = core[1:].split("]", 1)[0]
    try:
        ipaddress.IPv6Address(core.split("%", 1)[0])
    except ValueError:
        return text
    return IP


def _host_port(m: re.Match[str]) -> str:
    host = m.group(1)
    return HOST if any(c.isalpha() for c in host) else m.group(0)


def _hostname(m: re.Match[str]) -> str:
    name = m.group(0)
    tld = name.rsplit(".", 1)[-1].lower()
    return HOST if tld in _TLDS else name


# Credentials ---------------------------------------------------------------------------------
_sub(r"\b(Bearer)(\s+)[A-Za-z0-9._~+/=\-]{4,}", rf"\1\2{KEY}", re.I)
_sub(r"\b(Basic|Digest)(\s+)([A-Za-z0-9+/]{8,}={0,2})", _basic, re.I)
_sub(
    r"\b((?:x-)?api[_-]?key|access[_-]?token|auth[_-]?token|refresh[_-]?token|secret[_-]?key|client[_-]?secret|"
    r"password|passwd|signature|sig)"
    r"([\"']?\s*[:=]\s*[\"']?)[^\s\"',;&)]+",
    rf"\1\2{KEY}",
    re.I,
)
_sub(
    r"\b(?:sk|rk|pk)[-_][\w*\-]{3,}"  # OpenAI, Anthropic (sk-ant-), Stripe-style
    r"|\bAIza[\w\-]{10,}"  # Google
    r"|\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[A-Z0-9]{12,}"  # AWS access key ids
    r"|\b(?:gsk|hf|ghp|gho|ghu|ghs|ghr|glpat|xai|pplx|nvapi|csk|fw|r8)[-_][\w\-]{8,}"
    r"|\bgithub_pat_\w+"
    r"|\bxox[abprs]-[\w\-]+"
    r"|\bya29\.[\w\-.]+"
    r"|\beyJ[\w\-]{5,}\.[\w\-]{5,}\.[\w\-]*",  # JWTs
    KEY,
)
_sub(r"[\w\-]*\*{3,}[\w\-]*", KEY)  # masked keys: abc***xyz, ****1234
# Addresses ----------------------------------------------------------------------------------
_sub(r"\b[A-Za-z][A-Za-z0-9+.\-]{1,15}://[^\s'\"<>`]+", URL)
_sub(r"(?<![\w:.])\[?[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:%\w+)?\]?(?::\d{1,5})?(?![\w:])", _ipv6)
_sub(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?::\d{1,5})?\b", IP)
_sub(r"\b(localhost|[A-Za-z0-9][A-Za-z0-9.\-]*[A-Za-z0-9]):\d{2,5}\b", _host_port)
_sub(r"\blocalhost\b", HOST, re.I)
_sub(r"\b(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z][A-Za-z0-9\-]{0,61}[A-Za-z0-9]\b", _hostname)
# Whatever random-looking token is left (a key of an unknown shape) -------------------------------
_sub(r"[A-Za-z0-9_\-+/=]{20,}", _long_token)


class Scrubber:
    """Cleans messages of the given secrets and hosts, and of anything shaped like one."""

    def __init__(self, secrets: Iterable[str] = (), hosts: Iterable[str] = ()) -> None:
        # Secrets match exactly, host names in any case; shorter ones would shred the text.
        self._secrets = self._alternation(secrets, 0)
        self._hosts = self._alternation(hosts, re.I)

    @staticmethod
    def _alternation(values: Iterable[str], flags: int) -> re.Pattern[str] | None:
        words = {v.strip() for v in values if isinstance(v, str) and len(v.strip()) >= 4}
        if not words:
            return None
        ordered = sorted(words, key=len, reverse=True)  # a key before its own prefix
        return re.compile("|".join(re.escape(w) for w in ordered), flags)

    @classmethod
    def for_provider(cls, base_url: str | None, api_keys: Iterable[str], headers: dict[str, str]) -> Scrubber:
        hosts: list[str] = []
        if base_url:
            parts = urlsplit(base_url)
            hosts = [h for h in (parts.netloc.rsplit("@", 1)[-1], parts.hostname) if h]
            if parts.password:
                api_keys = [*api_keys, parts.password]
        return cls([*api_keys, *headers.values()], hosts)

    def clean(self, text: str, keep: Iterable[str] = ()) -> str:
        """``text`` without secrets or addresses; the strings in ``keep`` are left as they are."""
        text = text[:MAX_MESSAGE]
        kept: list[str] = []
        for word in sorted({k for k in keep if k and len(k) >= 3}, key=len, reverse=True):
            if word in text:
                kept.append(word)
                text = text.replace(word, f"\x00{len(kept) - 1}\x00")
        if self._secrets is not None:
            text = self._secrets.sub(KEY, text)
        if self._hosts is not None:
            text = self._hosts.sub(HOST, text)
        for pattern, repl in _PATTERNS:
            text = pattern.sub(repl, text)
        for i, word in enumerate(kept):
            text = text.replace(f"\x00{i}\x00", word)
        return text


_SAFE_FIELD = re.compile(r"^[A-Za-z0-9_.\-\[\]]{1,100}$")


def safe_field(value: str | None) -> str | None:
    """An upstream ``param`` / ``code`` as the client may see it: short and plain, else nothing."""
    return value if isinstance(value, str) and _SAFE_FIELD.match(value) else None
