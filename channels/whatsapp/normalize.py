"""A webhook notification (already authenticated) into the channel's own message schema.

Every field is the sender's: each is type-checked, matched against a pattern or clipped, and a
message that does not fit is skipped (counted), never half-used. The batch itself is bounded.

An inbound message becomes::

    {"kind": "in", "account", "pnid", "display", "wa_id", "name", "wamid", "ts", "type",
     "text", "media": {"id", "mime_type", "filename"} | None, "reply_id": str | None}

and a status ``{"kind": "status", "account", "pnid", "wamid", "status", "ts", "wa_id", "error"}``.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

MAX_ENTRIES = 50
MAX_CHANGES = 50
MAX_ITEMS = 500  # messages + statuses in one notification
MAX_TEXT = 4096
MAX_NAME = 256

WAMID = re.compile(r"^[A-Za-z0-9._:+/=\-]{1,256}\Z")
WA_ID = re.compile(r"^[0-9]{1,32}\Z")  # ASCII digits only: \d takes any script's (Arabic-Indic, ...)
PNID = re.compile(r"^[0-9]{1,32}\Z")
MEDIA_ID = re.compile(r"^[A-Za-z0-9_\-]{1,128}\Z")
MIME = re.compile(r"^[a-z0-9][a-z0-9.+\-]{0,63}/[a-z0-9][a-z0-9.+\-]{0,127}\Z")
STATUSES = ("sent", "delivered", "read", "failed")
MEDIA_TYPES = ("image", "audio", "document", "video", "sticker")
KNOWN_TYPES = (*MEDIA_TYPES, "text", "location", "interactive", "button", "reaction", "contacts", "unsupported")


class InvalidNotification(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param  # the field at fault, e.g. ``entry[0].changes``


@dataclass
class Parsed:
    messages: list[dict] = field(default_factory=list)
    statuses: list[dict] = field(default_factory=list)
    skipped: int = 0  # malformed items, or numbers not of this account


def _str(value, limit: int) -> str | None:
    if not isinstance(value, str):
        return None
    value = value.replace("\x00", "")
    return value if len(value) <= limit else value[:limit]


def _name(value) -> str | None:
    """A profile name, which may reach an agent's prompt as a variable: one line, no control
    characters."""
    name = _str(value, MAX_NAME)
    if name is None:
        return None
    return " ".join("".join(ch if ch.isprintable() else " " for ch in name).split()) or None


def _ts(value) -> float:
    """Unix seconds as Meta sends them (a string); never later than now."""
    now = time.time()
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 12:  # "²".isdigit()
        return min(float(value), now)
    return now


def _coord(value) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return round(float(value), 6)
    return None


def _message(m: dict) -> dict | None:
    wamid, sender, kind = m.get("id"), m.get("from"), m.get("type")
    if not (isinstance(wamid, str) and WAMID.match(wamid) and isinstance(sender, str) and WA_ID.match(sender)):
        return None
    kind = kind if kind in KNOWN_TYPES else "unsupported"
    out = {"wamid": wamid, "wa_id": sender, "ts": _ts(m.get("timestamp")), "type": kind, "text": "", "media": None}
    out["reply_id"] = None
    body = m.get(kind) if isinstance(m.get(kind), dict) else {}
    if kind == "text":
        out["text"] = _str(body.get("body"), MAX_TEXT) or ""
    elif kind in MEDIA_TYPES:
        media_id, mime = body.get("id"), body.get("mime_type")
        if not (isinstance(media_id, str) and MEDIA_ID.match(media_id)):
            return None
        mime = mime.split(";")[0].strip().lower() if isinstance(mime, str) else ""
        out["media"] = {
            "id": media_id,
            "mime_type": mime if MIME.match(mime) else "application/octet-stream",
            "filename": _str(body.get("filename"), 255),
        }
        out["text"] = _str(body.get("caption"), MAX_TEXT) or ""
    elif kind == "location":
        lat, lon = _coord(body.get("latitude")), _coord(body.get("longitude"))
        if lat is None or lon is None or abs(lat) > 90 or abs(lon) > 180:
            return None
        label = ", ".join(x for x in (_str(body.get("name"), 256), _str(body.get("address"), 512)) if x)
        out["text"] = f"[location: {label + ' ' if label else ''}({lat}, {lon})]"
    elif kind == "interactive":
        sub = body.get("type")
        reply = body.get(sub) if sub in ("button_reply", "list_reply") and isinstance(body.get(sub), dict) else None
        if reply is None:
            return None
        out["text"] = _str(reply.get("title"), 256) or ""
        out["reply_id"] = _str(reply.get("id"), 256)
        desc = _str(reply.get("description"), 512)
        if desc:
            out["text"] += f" ({desc})"
    elif kind == "button":  # a template's quick-reply button
        out["text"] = _str(body.get("text"), 256) or ""
        out["reply_id"] = _str(body.get("payload"), 256)
    elif kind == "reaction":
        emoji = _str(body.get("emoji"), 16)
        out["text"] = f"[the customer reacted with {emoji}]" if emoji else "[the customer removed a reaction]"
    elif kind == "contacts":
        out["text"] = "[the customer shared a contact card]"
    else:
        out["text"] = "[a message of a type this channel does not read]"
    return out


def _status(s: dict) -> dict | None:
    wamid, status = s.get("id"), s.get("status")
    if not (isinstance(wamid, str) and WAMID.match(wamid)) or status not in STATUSES:
        return None
    recipient = s.get("recipient_id")
    error = None
    errors = s.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        code = errors[0].get("code")
        error = str(code)[:16] if isinstance(code, int | str) else "error"
    return {
        "wamid": wamid,
        "status": status,
        "ts": _ts(s.get("timestamp")),
        "wa_id": recipient if isinstance(recipient, str) and WA_ID.match(recipient) else None,
        "error": error,
    }


def parse(doc, account: str, agent_for) -> Parsed:
    """``agent_for(phone_number_id)`` is the account's: None for a number not of this account."""
    if not isinstance(doc, dict) or doc.get("object") != "whatsapp_business_account":
        raise InvalidNotification("not a whatsapp_business_account notification", "object")
    entries = doc.get("entry")
    if not isinstance(entries, list) or len(entries) > MAX_ENTRIES:
        raise InvalidNotification(f"'entry' must be a list of at most {MAX_ENTRIES}", "entry")
    out = Parsed()
    items = 0
    for i, entry in enumerate(entries):
        changes = entry.get("changes") if isinstance(entry, dict) else None
        if not isinstance(changes, list) or len(changes) > MAX_CHANGES:
            raise InvalidNotification(f"'changes' must be a list of at most {MAX_CHANGES}", f"entry[{i}].changes")
        for change in changes:
            value = change.get("value") if isinstance(change, dict) else None
            if not isinstance(change, dict) or change.get("field") != "messages" or not isinstance(value, dict):
                out.skipped += 1
                continue
            meta = value.get("metadata") if isinstance(value.get("metadata"), dict) else {}
            pnid = meta.get("phone_number_id")
            messages = value.get("messages") if isinstance(value.get("messages"), list) else []
            statuses = value.get("statuses") if isinstance(value.get("statuses"), list) else []
            items += len(messages) + len(statuses)
            if items > MAX_ITEMS:
                raise InvalidNotification(f"at most {MAX_ITEMS} messages and statuses per notification", "entry")
            if not (isinstance(pnid, str) and PNID.match(pnid)) or agent_for(pnid) is None:
                out.skipped += len(messages) + len(statuses)
                continue
            display = _str(meta.get("display_phone_number"), 32) or ""
            names = {}
            for c in value.get("contacts") if isinstance(value.get("contacts"), list) else ():
                if isinstance(c, dict) and isinstance(c.get("wa_id"), str) and isinstance(c.get("profile"), dict):
                    names[c["wa_id"]] = _name(c["profile"].get("name"))
                if len(names) >= MAX_ITEMS:
                    break
            for m in messages:
                msg = _message(m) if isinstance(m, dict) else None
                if msg is None:
                    out.skipped += 1
                    continue
                base = {"kind": "in", "account": account, "pnid": pnid, "display": display}
                out.messages.append({**base, **msg, "name": names.get(msg["wa_id"])})
            for s in statuses:
                st = _status(s) if isinstance(s, dict) else None
                if st is None:
                    out.skipped += 1
                    continue
                out.statuses.append({"kind": "status", "account": account, "pnid": pnid, **st})
    return out
