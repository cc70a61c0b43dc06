"""Reading what VAPI sends, trusting none of it: the credential check (before any parsing), the
call facts out of ``call`` / ``phoneNumber`` / ``customer`` objects (each field type-checked and
bounded; anything odd is dropped, never passed on), and the turn's new messages.

Everything here is pure: no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field

import orjson

from channels.vapi.config import E164, VAPI_ID, VapiAccount, VapiAuth
from core import http
from core.errors import InvalidRequest

CONVERSATION_PREFIX = "vapi:"
MAX_MESSAGES = 2000  # in one custom-LLM request (a long call's whole transcript)
MAX_TOOLS = 64
MAX_METADATA_VARIABLES = 20
MAX_TEXT = 1000  # characters of one metadata value or name
_VARIABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
CALL_TYPES = frozenset({"inboundPhoneCall", "outboundPhoneCall", "webCall", "vapi.websocketCall"})
# A web call is started by whoever holds the assistant's public key (a browser): its `customer`
# object is the visitor's to write, so a number (or a name) in it is nobody's caller id.
WEB_CALL_TYPES = frozenset({"webCall", "vapi.websocketCall"})
# Only a phone call's `customer` is the telephone network's caller id: a call of no type, or of
# a type this release does not know (VAPI adds some), is treated as a web call would be.
PHONE_CALL_TYPES = frozenset({"inboundPhoneCall", "outboundPhoneCall"})
# VAPI's objects beside an OpenAI body (metadataSendMode "variable"): never an OpenAI field
CALL_OBJECTS = ("call", "phoneNumber", "customer")
# The gateway's signature over the metadata of the calls it places (``sign_metadata``).
SIGNATURE = "gateway_signature"
# The variables every call gives the agent's prompt (only those its prompt declares are used).
CHANNEL_VARIABLES = ("caller_number", "caller_name", "called_number", "call_id", "call_type", "channel")


def _header(scope: dict, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


_NOBODY = VapiAuth(bearer_token="\x00" * 32, secret="\x00" * 32)  # matches no header (no NUL in headers)


def authentic(account: VapiAccount | None, scope: dict) -> bool:
    """Whether the request carries the account's credential: ``Authorization: Bearer <token>``
    or ``X-Vapi-Secret: <secret>``, as configured. Constant-time comparisons; both are always
    made (when configured) so the time taken tells nothing about which one came close. An
    unknown account (None) is compared against a credential nothing matches, so it takes the
    same work as a known one and its name cannot be told apart by timing."""
    ok = False
    auth = account.auth if account is not None else _NOBODY
    if auth.bearer_token:
        got = _header(scope, b"authorization") or b""
        scheme, _, token = got.partition(b" ")
        match = hmac.compare_digest(token.strip(), auth.bearer_token.encode())
        ok |= match and scheme.lower() == b"bearer"
    if auth.secret:
        got = _header(scope, b"x-vapi-secret") or b""
        ok |= hmac.compare_digest(got, auth.secret.encode())
    return ok and account is not None


def _metadata_key(account: VapiAccount) -> bytes:
    """The key of the gateway's metadata signatures: derived from the account's gateway key,
    which only the gateway holds (VAPI and callers never see it)."""
    return hashlib.sha256(b"vapi-metadata\x00" + account.api_key.encode()).digest()


def _canonical(values: dict, to: str) -> bytes:
    body = orjson.dumps({k: v for k, v in values.items() if k != SIGNATURE}, option=orjson.OPT_SORT_KEYS)
    return to.encode() + b"\x00" + body


def sign_metadata(account: VapiAccount, values: dict, to: str) -> dict:
    """``values`` with the gateway's signature added: the metadata of a call the gateway places
    to ``to``, whose values (a tenant admin's) may then become the call's prompt variables. The
    number is signed too, so the set cannot be replayed on another call (a web call has none).
    Whole floats are sent as integers (JavaScript echoes 1.0 back as 1)."""
    out = {k: int(v) if isinstance(v, float) and v.is_integer() and abs(v) < 2**53 else v for k, v in values.items()}
    out.pop(SIGNATURE, None)
    out[SIGNATURE] = hmac.new(_metadata_key(account), _canonical(out, to), hashlib.sha256).hexdigest()
    return out


def signed(account: VapiAccount, values: dict, to: str | None) -> bool:
    """Whether ``values`` carry the gateway's signature for a call to ``to``."""
    got = values.get(SIGNATURE)
    if not isinstance(got, str) or to is None:
        return False
    try:
        want = hmac.new(_metadata_key(account), _canonical(values, to), hashlib.sha256).hexdigest()
    except (TypeError, orjson.JSONEncodeError):
        return False
    return hmac.compare_digest(got.encode(), want.encode())


def _id(value: object) -> str | None:
    return value if isinstance(value, str) and VAPI_ID.match(value) else None


def _number(value: object) -> str | None:
    return value if isinstance(value, str) and E164.match(value) else None


def _text(value: object, limit: int = 200) -> str | None:
    if not isinstance(value, str) or not value or "\x00" in value:
        return None
    return value[:limit]


def _line(value: object, limit: int = 200) -> str | None:
    """A caller's name, which reaches the agent's system prompt as ``caller_name``: one line of
    printable text (new lines and control characters become spaces), at most ``limit``."""
    if not isinstance(value, str):
        return None
    return " ".join("".join(ch if ch.isprintable() else " " for ch in value[: limit * 4]).split())[:limit] or None


@dataclass(frozen=True, slots=True)
class CallInfo:
    """What a request says about its call; every field checked (None when absent or invalid)."""

    call_id: str | None = None
    call_type: str | None = None
    assistant_id: str | None = None
    phone_number_id: str | None = None
    customer_number: str | None = None
    customer_name: str | None = None
    called_number: str | None = None
    status: str | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def conversation_id(self) -> str | None:
        return f"{CONVERSATION_PREFIX}{self.call_id}" if self.call_id else None

    @property
    def direction(self) -> str:
        if self.call_type == "outboundPhoneCall":
            return "outbound"
        if self.call_type in ("webCall", "vapi.websocketCall"):
            return "web"
        return "inbound"

    def variables(self) -> dict:
        """The agent's runtime variables: the channel's own, then the call's metadata (flat
        scalar values under plain names; the channel's names win)."""
        out: dict = dict(self.metadata)
        out.update(
            {
                "caller_number": self.customer_number,
                "caller_name": self.customer_name,
                "called_number": self.called_number,
                "call_id": self.call_id,
                "call_type": self.call_type,
                "channel": "vapi",
            }
        )
        return {k: v for k, v in out.items() if v is not None}


def _metadata(account: VapiAccount | None, to: str | None, *sources: object) -> dict:
    """The prompt variables of a call's metadata. With ``account`` (the channel): metadata is
    whatever started the call wrote — on a web call, any visitor of the page holding the
    public key — so a source counts whole only when it carries the gateway's signature (a call
    it placed); otherwise only the names the account lists in ``metadata_variables`` are taken.
    Signed sources are read last, so their values win. Without ``account`` (VAPI pointed at
    ``/v1``, whose key may set any variable anyway) every plain name is taken."""
    dicts = [s for s in sources if isinstance(s, dict)]
    trusted: set[int] = set()
    if account is not None:
        marked = [(signed(account, s, to), s) for s in dicts]
        dicts = [s for ok, s in marked if not ok] + [s for ok, s in marked if ok]
        trusted = {id(s) for ok, s in marked if ok}
    out: dict = {}
    for source in dicts:
        names = None if account is None or id(source) in trusted else account.metadata_variables
        for name, value in source.items():
            if len(out) >= MAX_METADATA_VARIABLES and name not in out:
                continue
            if not isinstance(name, str) or not _VARIABLE_NAME.match(name) or name in CHANNEL_VARIABLES:
                continue
            if name == SIGNATURE or (names is not None and name not in names):
                continue
            if isinstance(value, bool) or (isinstance(value, int) and abs(value) < 2**53):
                out[name] = value
            elif isinstance(value, float) and value == value and abs(value) < 1e15:
                out[name] = value
            elif isinstance(value, str) and "\x00" not in value:
                out[name] = value[:MAX_TEXT]
    return out


def call_info(
    call: object,
    phone_number: object = None,
    customer: object = None,
    metadata: object = None,
    account: VapiAccount | None = None,
) -> CallInfo:
    """The call facts of a custom-LLM body (``call``, ``phoneNumber``, ``customer``, ``metadata``)
    or a server message (the same objects inside ``message``). ``account``: the channel's
    account, which decides which metadata is trusted (``_metadata``). A web call has no
    customer number or name: those in its ``customer`` object are the visitor's own writing;
    for the channel, neither has a call of no or an unknown type.
    A phone caller's name is one line of printable text (it reaches the system prompt)."""
    call = call if isinstance(call, dict) else {}
    phone = phone_number if isinstance(phone_number, dict) else {}
    if not phone and isinstance(call.get("phoneNumber"), dict):
        phone = call["phoneNumber"]
    cust = customer if isinstance(customer, dict) else {}
    if not cust and isinstance(call.get("customer"), dict):
        cust = call["customer"]
    kind = call.get("type")
    call_type = kind if isinstance(kind, str) and kind in CALL_TYPES else None  # a list is unhashable
    # The channel takes a caller id from a phone call only; VAPI pointed at /v1 (no ``account``)
    # is a key holder, who may set any variable anyway.
    web = call_type in WEB_CALL_TYPES or (account is not None and call_type not in PHONE_CALL_TYPES)
    number = None if web else _number(cust.get("number"))
    return CallInfo(
        call_id=_id(call.get("id")),
        call_type=call_type,
        assistant_id=_id(call.get("assistantId")),
        phone_number_id=_id(call.get("phoneNumberId")) or _id(phone.get("id")),
        customer_number=number,
        customer_name=None if web else _line(cust.get("name")),  # a web visitor's is their own writing
        called_number=_number(phone.get("number")),
        status=_text(call.get("status"), 32),
        metadata=_metadata(account, number, call.get("metadata"), metadata),
    )


def new_turn(messages: list) -> list[dict]:
    """The messages of this turn: those after VAPI's last assistant message, without system or
    developer messages (the agent's own prompt is the system message). Memory holds the rest."""
    last = -1
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("role") == "assistant":
            last = i
    return [m for m in messages[last + 1 :] if isinstance(m, dict) and m.get("role") not in ("system", "developer")]


def without_system(messages: list) -> list[dict]:
    return [m for m in messages if isinstance(m, dict) and m.get("role") not in ("system", "developer")]


def parse_object(raw: bytes, what: str) -> dict:
    try:
        data = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise InvalidRequest(f"The body must be a JSON object ({what}).", code="invalid_json")
    http.check_depth(raw, data)
    return data


def take_call_variables(body: dict) -> dict:
    """For VAPI pointed straight at ``/v1``: removes VAPI's ``call``, ``phoneNumber`` and
    ``customer`` objects from an OpenAI body, whatever their type (they are not OpenAI fields,
    and the caller's number and name in them must not reach the provider around the PII
    scrubber), and returns the call's variables, as the channel endpoint would give them."""
    info = call_info(body.pop("call", None), body.pop("phoneNumber", None), body.pop("customer", None))
    return info.variables()
