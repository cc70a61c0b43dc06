"""A VAPI account's settings (``channels.vapi.<account>`` in the gateway's config), validated at
start-up. The kernel's config keeps the accounts as raw mappings (``${VAR}`` already
interpolated); ``parse_accounts`` turns them into ``VapiAccount`` or raises ``ConfigError``
naming every problem with its path (``channels.vapi.main.auth: ...``).

    channels:
      vapi:
        main:
          tenant: acme
          api_key: ${VAPI_GATEWAY_KEY}        # a virtual key of that tenant: the adapter's own
          public_url: https://gw.example.com  # where VAPI reaches this gateway
          auth: {bearer_token: ${VAPI_SERVER_TOKEN}}   # and/or secret: (X-Vapi-Secret)
          assistants: {asst_123: support}     # VAPI assistant id -> agent name
          phone_numbers: {pn_456: sales}      # VAPI phone number id -> agent name
          default_agent: support
          transfer_number: "+14155550100"     # the human line
          vapi_api_key: ${VAPI_API_KEY}       # outbound calls (POST /call)
          outbound_phone_number_id: pn_456
          assistant: {voice: {provider: 11labs, voiceId: burt}, firstMessage: "Hello!"}
          metadata_variables: [order_id]      # call metadata names taken as prompt variables
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.config import ConfigError

AGENT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}\Z")  # as runtime/agents.py names agents
ACCOUNT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
VAPI_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}\Z")  # assistant, phone number and call ids (UUIDs)
E164 = re.compile(r"^\+[1-9][0-9]{6,14}\Z")
VARIABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}\Z")  # a prompt variable's name
MIN_SECRET = 16


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VapiAuth(_Strict):
    """How VAPI proves it is VAPI, on the server URL and the custom-LLM URL alike: the credential
    configured on the VAPI side, sent as ``Authorization: Bearer <token>`` and/or the older
    ``X-Vapi-Secret: <secret>``. Either configured value is accepted; nothing else is."""

    bearer_token: str | None = Field(None, min_length=MIN_SECRET, max_length=512)
    secret: str | None = Field(None, min_length=MIN_SECRET, max_length=512)

    @model_validator(mode="after")
    def _one(self) -> VapiAuth:
        if not self.bearer_token and not self.secret:
            raise ValueError("give bearer_token and/or secret (VAPI's requests are never accepted unauthenticated)")
        return self


def _url(v: str) -> str:
    if not re.match(r"^https?://[^\s/?#]+(/[^\s?#]*)?$", v):
        raise ValueError("must be an http:// or https:// URL without query or fragment")
    return v.rstrip("/")


def _agent(v: str, where: str) -> str:
    if not AGENT_NAME.match(v):
        raise ValueError(f"{where}: {v[:64]!r} is not an agent name (lowercase letters, digits, - and _)")
    return v


class VapiAccount(_Strict):
    tenant: str = Field(min_length=1, max_length=128)
    api_key: str = Field(min_length=8, max_length=512)  # the gateway virtual key the adapter calls with
    public_url: str  # this gateway as VAPI reaches it (assistant configs point VAPI here)
    auth: VapiAuth
    assistants: dict[str, str] = Field(default_factory=dict)
    phone_numbers: dict[str, str] = Field(default_factory=dict)
    default_agent: str | None = None
    transfer_number: str | None = None
    transfer_message: str = Field("Please hold while I connect you to a colleague.", max_length=1000)
    vapi_api_url: str = "https://api.vapi.ai"
    vapi_api_key: str | None = Field(None, min_length=8, max_length=512)
    outbound_phone_number_id: str | None = None
    assistant: dict[str, Any] = Field(default_factory=dict)  # merged into assistant-request answers
    # a long call's end-of-call report carries its whole transcript twice (text and messages)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=16 * 1024, le=16 * 1024 * 1024)
    tool_timeout_s: float = Field(15.0, gt=0, le=120)  # VAPI waits 20 s for tool results by default
    llm_timeout_s: float = Field(60.0, gt=0, le=600)  # one custom-LLM turn through the gateway
    # What a message for a call's customer outside the call (a human's reply) does: "report" it
    # undeliverable, or "callback": place an outbound call that speaks it.
    delivery: Literal["report", "callback"] = "report"
    attribute_customer: bool = True  # the caller's number as the ledger's `customer`
    # Call metadata is written by whoever starts the call (on a web call: any visitor holding the
    # assistant's public key), and prompt variables it sets win over the agent's defaults. So
    # only these names are taken from it; the calls the gateway places carry its signature and
    # their variables are taken whole.
    metadata_variables: frozenset[str] = Field(default_factory=frozenset, max_length=20)
    # Outbound calls (admin API and callbacks) this account places per minute, in each gateway
    # process: every call is telephony the tenant pays for and no budget counts (0: no limit).
    outbound_per_minute: int = Field(30, ge=0, le=10_000)
    # The numbers outbound calls may go to, as E.164 prefixes ("+1", "+4420"); empty: any number.
    outbound_prefixes: tuple[str, ...] = Field((), max_length=100)

    @field_validator("public_url", "vapi_api_url")
    @classmethod
    def _urls(cls, v: str) -> str:
        return _url(v)

    @field_validator("assistants", "phone_numbers")
    @classmethod
    def _mapping(cls, v: dict[str, str]) -> dict[str, str]:
        for key, agent in v.items():
            if not VAPI_ID.match(str(key)):
                raise ValueError(f"{str(key)[:64]!r} is not a VAPI id")
            _agent(agent, str(key))
        return v

    @field_validator("metadata_variables")
    @classmethod
    def _names(cls, v: frozenset[str]) -> frozenset[str]:
        for name in v:
            if not VARIABLE_NAME.match(name):
                raise ValueError(f"{name[:64]!r} is not a variable name (letters, digits and _)")
        return v

    @field_validator("outbound_prefixes")
    @classmethod
    def _prefixes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for prefix in v:
            if not re.match(r"^\+[1-9][0-9]{0,14}$", prefix):
                raise ValueError(f"{prefix[:20]!r} is not a number prefix (+ and 1 to 15 digits)")
        return v

    @field_validator("default_agent")
    @classmethod
    def _default(cls, v: str | None) -> str | None:
        return v if v is None else _agent(v, "default_agent")

    @field_validator("transfer_number")
    @classmethod
    def _number(cls, v: str | None) -> str | None:
        if v is not None and not E164.match(v):
            raise ValueError("must be an E.164 number (+ and 7 to 15 digits)")
        return v

    @field_validator("outbound_phone_number_id")
    @classmethod
    def _pn(cls, v: str | None) -> str | None:
        if v is not None and not VAPI_ID.match(v):
            raise ValueError("is not a VAPI id")
        return v

    @field_validator("assistant")
    @classmethod
    def _assistant(cls, v: dict) -> dict:
        if "model" in v:
            raise ValueError("'model' is the gateway's (custom-llm pointing at the agent); leave it out")
        return v

    def agents(self) -> frozenset[str]:
        """Every agent this account may reach."""
        names = {*self.assistants.values(), *self.phone_numbers.values()}
        if self.default_agent:
            names.add(self.default_agent)
        return frozenset(names)

    def agent_for(self, assistant_id: object, phone_number_id: object) -> str | None:
        """The agent of a call: by its assistant, then its phone number, then the default."""
        if isinstance(assistant_id, str) and assistant_id in self.assistants:
            return self.assistants[assistant_id]
        if isinstance(phone_number_id, str) and phone_number_id in self.phone_numbers:
            return self.phone_numbers[phone_number_id]
        return self.default_agent


def _loc(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)


def parse_accounts(raw: dict[str, dict[str, Any]], where: str = "channels.vapi") -> dict[str, VapiAccount]:
    problems: list[str] = []
    out: dict[str, VapiAccount] = {}
    for name, fields in (raw or {}).items():
        path = f"{where}.{name}"
        if not isinstance(name, str) or not ACCOUNT_NAME.match(name):
            problems.append(f"{path}: an account name is 1 to 64 letters, digits, - or _ (it is part of a URL)")
            continue
        try:
            out[name] = VapiAccount.model_validate(fields)
        except ValidationError as exc:
            for e in exc.errors():
                problems.append(f"{path}{_loc(e['loc'])}: {e['msg'].removeprefix('Value error, ')}")
    # The credential is what says which tenant a request is for: one shared by accounts of two
    # tenants would let either's VAPI side (an assistant pointed at the other account's URL)
    # write the other tenant's calls, ledger and budgets and run its agents' tools.
    seen: dict[str, tuple[str, str]] = {}
    for name, account in out.items():
        for value in (account.auth.bearer_token, account.auth.secret):
            if value is None:
                continue
            other = seen.setdefault(value, (name, account.tenant))
            if other[1] != account.tenant:
                problems.append(
                    f"{where}.{name}.auth: the same credential as account {other[0]!r} of another tenant; "
                    "each tenant's accounts need their own"
                )
                break
    if problems:
        raise ConfigError(problems)
    return out
