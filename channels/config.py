"""Validation of the channel accounts in the config (``channels.whatsapp.<account>``), at start-up.

The kernel's config keeps each account as a raw mapping (it does not know the channels); this
module turns it into typed settings and lists every problem at once, naming the field.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ACCOUNT_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}\Z")
PHONE_NUMBER_ID = re.compile(r"^[0-9]{1,32}\Z")  # ASCII: \d takes any script's digits
AGENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}\Z")
_GRAPH_VERSION = re.compile(r"^v[0-9]{1,3}\.[0-9]{1,3}\Z")
_HOST = re.compile(r"^[a-z0-9.\-]{1,253}(:[0-9]{1,5})?\Z")


class ChannelConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WhatsAppAccount(_Strict):
    """One WhatsApp Business account (its app, its numbers) and the agent answering it."""

    tenant: str = Field("default", min_length=1, max_length=128)
    # The agent answering every number of the account, or one agent per phone_number_id; a
    # number that is in neither is refused (its messages are not for this account).
    agent: str | None = None
    phone_numbers: dict[str, str] = Field(default_factory=dict)  # phone_number_id -> agent
    app_secret: str = Field(min_length=8, max_length=512, repr=False)  # X-Hub-Signature-256's key
    verify_token: str = Field(min_length=8, max_length=512, repr=False)  # the webhook handshake's token
    access_token: str = Field(min_length=8, max_length=4096, repr=False)  # Graph API bearer token
    api_key: str = Field(min_length=8, max_length=512, repr=False)  # this channel's key on the gateway
    graph_base_url: str = "https://graph.facebook.com"
    graph_version: str = "v21.0"
    # Hosts media download URLs may point at, besides graph_base_url's own (Meta's CDN).
    media_hosts: list[str] = Field(default_factory=lambda: ["lookaside.fbsbx.com"])
    media_max_bytes: int = Field(5 * 1024 * 1024, gt=0, le=100 * 1024 * 1024)
    # Bytes of media the channel may keep under the data directory for this account (customers
    # choose what they send): past it a file is passed on when it can be (images) but not kept.
    media_quota_bytes: int = Field(1024**3, ge=0, le=1024**4)
    fallback_message: str = Field(
        "Sorry, we could not answer your message right now. Please try again later.", max_length=4096
    )
    debounce: float = Field(0.0, ge=0, le=60)  # seconds: a burst within it is one agent turn
    debounce_max_wait: float = Field(10.0, gt=0, le=600)  # a burst that never pauses waits no longer
    window_template: str | None = Field(None, max_length=512)  # template for replies outside 24 h
    template_language: str = Field("en_US", max_length=16)
    pacing_per_second: float = Field(20.0, gt=0, le=10_000)  # sends per second per number
    mark_read: bool = True
    max_reply_parts: int = Field(10, ge=1, le=50)

    @field_validator("agent")
    @classmethod
    def _agent(cls, v: str | None) -> str | None:
        if v is not None and not AGENT_NAME.match(v):
            raise ValueError("an agent name: letters, digits, '_', '.', '-'")
        return v

    @field_validator("access_token", "api_key")
    @classmethod
    def _header_safe(cls, v: str) -> str:
        if any(ord(c) < 0x21 or ord(c) > 0x7E for c in v):  # sent as a bearer header
            raise ValueError("printable ASCII without spaces")
        return v

    @field_validator("phone_numbers")
    @classmethod
    def _numbers(cls, v: dict[str, str]) -> dict[str, str]:
        for pnid, agent in v.items():
            if not PHONE_NUMBER_ID.match(str(pnid)):
                raise ValueError(f"{pnid!r} is not a phone_number_id (digits)")
            if not isinstance(agent, str) or not AGENT_NAME.match(agent):
                raise ValueError(f"the agent of {pnid} is not an agent name")
        return {str(k): v2 for k, v2 in v.items()}

    @field_validator("graph_base_url")
    @classmethod
    def _base(cls, v: str) -> str:
        if not re.match(r"^https?://[^/?#@\s]+$", v.rstrip("/")):
            raise ValueError("an http(s) origin such as https://graph.facebook.com (no path)")
        return v.rstrip("/")

    @field_validator("graph_version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not _GRAPH_VERSION.match(v):
            raise ValueError("a Graph API version such as v21.0")
        return v

    @field_validator("media_hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        for h in v:
            if not _HOST.match(h.lower()):
                raise ValueError(f"{h!r} is not a host name")
        return [h.lower() for h in v]

    @model_validator(mode="after")
    def _some_agent(self) -> WhatsAppAccount:
        if self.agent is None and not self.phone_numbers:
            raise ValueError("set agent (every number) or phone_numbers (phone_number_id: agent)")
        return self

    def agent_for(self, phone_number_id: str) -> str | None:
        """The agent answering this business number, None when the number is not this account's."""
        return self.phone_numbers.get(phone_number_id) or (self.agent if not self.phone_numbers else None)


def whatsapp_accounts(raw: dict[str, dict[str, Any]]) -> dict[str, WhatsAppAccount]:
    """Validates ``channels.whatsapp``; raises ChannelConfigError listing every problem."""
    problems: list[str] = []
    out: dict[str, WhatsAppAccount] = {}
    for name, fields in (raw or {}).items():
        where = f"channels.whatsapp.{name}"
        if not isinstance(name, str) or not ACCOUNT_NAME.match(name):
            problems.append(f"{where}: an account name is 1-64 of [a-z0-9_-]")
            continue
        if not isinstance(fields, dict):
            problems.append(f"{where}: must be a mapping")
            continue
        try:
            out[name] = WhatsAppAccount.model_validate(fields)
        except ValidationError as exc:
            for e in exc.errors():
                loc = ".".join(str(p) for p in e["loc"])
                problems.append(f"{where}{'.' + loc if loc else ''}: {e['msg'].removeprefix('Value error, ')}")
    problems += _shared(out)
    if problems:
        raise ChannelConfigError(problems)
    return out


def _shared(accounts: dict[str, WhatsAppAccount]) -> list[str]:
    """A business number answers for one account (one tenant): a phone_number_id listed by two
    accounts, or an account taking every number (``agent`` without ``phone_numbers``) that shares
    its app secret with another account, would let a notification signed for one account (Meta
    posts every number of an app to the app's callback URL; a captured payload can be re-posted
    to the other URL) be answered under another account's tenant."""
    problems: list[str] = []
    owner: dict[str, str] = {}
    for name, acct in accounts.items():
        for pnid in acct.phone_numbers:
            if pnid in owner:
                problems.append(f"channels.whatsapp.{name}.phone_numbers: {pnid} is account {owner[pnid]}'s already")
            owner.setdefault(pnid, name)
    for name, acct in accounts.items():
        if acct.phone_numbers:
            continue
        for other, acct2 in accounts.items():
            if other != name and acct2.app_secret == acct.app_secret:
                problems.append(
                    f"channels.whatsapp.{name}: shares its app secret with account {other}; "
                    "list its phone_numbers (an account taking every number must have its own app)"
                )
                break
    return problems
