"""``POST /v1/feedback``: what a client says about an answer (thumbs, a 0–1 score, resolved, free
text), for the experiment reports.

Feedback names a request (the gateway's ``x-request-id``) or a conversation (the caller's
``conversation_id``). It is stored in the caller's tenant, keyed by the id as given, and reports
join it to the ledger on (tenant, id): the ledger row may not be written yet when feedback
arrives (records are batched), and another tenant's ids can never be reached, whatever is sent.
Not the hot path: one INSERT under the tenant's row-level security. Each key may send at most
its own requests-per-minute limit of feedback (else ``limits.key``'s, else
``key_window.DEFAULT_PER_MINUTE``) in a fixed one-minute window shared by every replica, counted before the
body is read: a leaked or busy key cannot fill the table. A channel's conversation ids (``wa:``,
``vapi:``) are a customer's phone number away from guessable: feedback on one by its id comes
from a channel account's key only (403 ``conversation_reserved`` naming ``conversation_id``, as
``agent_stage.check_conversation_owner`` refuses such ids to a turn), so another key of the
tenant (a public widget's) cannot vote in the experiment reports for the channels' customers.
Feedback by ``request_id`` is stored as given: the gateway's request ids are random, and the
conversation of the request is resolved only by the reports' join. ``agent`` names an agent the
key may use (another is 404, as one that does not exist), and feedback naming an agent counts in
that agent's reports alone: conversation ids are per agent. Feedback naming none from a key
restricted to some models keeps the ids of the tenant's agents the key may use then
(``agent_ids``) and counts in their reports alone: a key limited to one agent cannot vote in
another's experiment by its (guessable) conversation ids. It is stored all the same (201), so the
answer tells nothing of which conversations exist; a key that may use every model keeps no list
(its feedback counts for every agent, as before).
"""

from __future__ import annotations

import math
import re

from core import http
from core.errors import InvalidRequest, NotFound
from core.types import Identity
from gateway import key_window
from gateway.agent_stage import allowed_identity, check_conversation_owner
from gateway.db import tenant_transaction

MAX_BODY = 64 * 1024
MAX_TEXT = 4000
FIELDS = frozenset({"request_id", "conversation_id", "thumbs", "score", "resolved", "text", "agent"})
_ID = re.compile(r"^[\x21-\x7e](?:[\x20-\x7e]{0,254}[\x21-\x7e])?$")  # visible ASCII, at most 256
_THUMBS = {"up": 1, "down": -1, 1: 1, -1: -1}


def _id(data: dict, name: str) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not _ID.match(value):
        raise InvalidRequest(
            f"'{name}' must be a string of 1 to 256 visible ASCII characters.", param=name, code="invalid_value"
        )
    return value


def parse(data: object) -> dict:
    """The feedback fields, checked; a 400 naming the first bad one."""
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        name = str(unknown[0])[:64]
        raise InvalidRequest(
            f"Unknown parameter '{name}'; known: {', '.join(sorted(FIELDS))}.", param=name, code="unknown_parameter"
        )
    out = {"request_id": _id(data, "request_id"), "conversation_id": _id(data, "conversation_id")}
    if out["request_id"] is None and out["conversation_id"] is None:
        raise InvalidRequest(
            "Give 'request_id' (the x-request-id of an answer) or 'conversation_id'.",
            param="request_id",
            code="missing_required_parameter",
        )
    thumbs = data.get("thumbs")
    if thumbs is not None:
        if isinstance(thumbs, bool) or not isinstance(thumbs, str | int) or thumbs not in _THUMBS:
            raise InvalidRequest('\'thumbs\' must be "up", "down", 1 or -1.', param="thumbs", code="invalid_value")
        thumbs = _THUMBS[thumbs]
    score = data.get("score")
    if score is not None and (
        isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score) or not 0 <= score <= 1
    ):
        raise InvalidRequest("'score' must be a number from 0 to 1.", param="score", code="invalid_value")
    resolved = data.get("resolved")
    if resolved is not None and not isinstance(resolved, bool):
        raise InvalidRequest("'resolved' must be a boolean.", param="resolved", code="invalid_type")
    text = data.get("text")
    if text is not None and (not isinstance(text, str) or len(text) > MAX_TEXT or "\x00" in text):
        raise InvalidRequest(
            f"'text' must be a string of at most {MAX_TEXT} characters.", param="text", code="invalid_value"
        )
    if thumbs is None and score is None and resolved is None and not text:
        raise InvalidRequest(
            "Give at least one of 'thumbs', 'score', 'resolved' or 'text'.",
            param="thumbs",
            code="missing_required_parameter",
        )
    agent = data.get("agent")
    if agent is not None:
        name = agent.removeprefix("agent:").split("@", 1)[0] if isinstance(agent, str) else ""
        if not name or len(agent) > 128 or "\x00" in agent:  # (empty: it names no agent)
            raise InvalidRequest("'agent' must be an agent name.", param="agent", code="invalid_value")
        agent = name
    out.update(thumbs=thumbs, score=None if score is None else float(score), resolved=resolved, text=text, agent=agent)
    return out


async def _agent_id(svc, conn, ident: Identity, name: str) -> str:
    """The id of the agent ``name`` of the caller's tenant that the caller may use; another is
    "not found" as one that does not exist (``GET /v1/models`` does not list it to the key)."""
    registry = getattr(svc, "agents", None)
    agent = registry.get(ident.tenant, name) if registry is not None else None
    found = (agent.id, agent.model) if agent is not None else None
    if found is None:  # not cached here (yet): ask the table, within the tenant's wall
        found = await conn.fetchrow(
            "SELECT id, model FROM agents WHERE tenant = $1 AND name = $2 AND archived_at IS NULL", ident.tenant, name
        )
    if found is None or not allowed_identity(ident, name, found[1]):
        raise NotFound(f"No agent named {name[:64]!r}.", param="agent")
    return found[0]


async def _usable_agents(conn, ident: Identity) -> list[str] | None:
    """The ids of the tenant's agents a restricted key may use now; None: every model is the
    key's (nothing to keep)."""
    if not ident.models:
        return None
    rows = await conn.fetch(
        "SELECT id, name, model FROM agents WHERE tenant = $1 AND archived_at IS NULL", ident.tenant
    )
    return sorted(r["id"] for r in rows if allowed_identity(ident, r["name"], r["model"]))


async def feedback(svc, scope, receive, send, rid: str, crid: str | None = None, ident: Identity | None = None) -> None:
    """The ``POST /v1/feedback`` handler (plain ASGI; errors raise GatewayError for the app to
    render). ``ident``: the caller when already authenticated, else the bearer key is checked."""
    if ident is None:
        ident = await svc.auth.authenticate_scope(scope)
    await key_window.admit(svc, ident, "fb", "Feedback calls")
    data = parse(http.parse_json(await http.read_body(scope, receive, MAX_BODY)))
    if data["conversation_id"] is not None:
        check_conversation_owner(svc, ident, data["conversation_id"], param="conversation_id")
    tenant = ident.tenant
    async with tenant_transaction(svc.pool, tenant) as conn:
        agent_id = await _agent_id(svc, conn, ident, data["agent"]) if data["agent"] else None
        agent_ids = await _usable_agents(conn, ident) if agent_id is None else None
        row = await conn.fetchrow(
            """INSERT INTO feedback (tenant, key_id, request_id, conversation_id, agent_id, thumbs, score,
                                     resolved, text, agent_ids)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id, created_at""",
            tenant,
            ident.key_id,
            data["request_id"],
            data["conversation_id"],
            agent_id,
            data["thumbs"],
            data["score"],
            data["resolved"],
            data["text"],
            agent_ids,
        )
    body = {
        "id": f"fb_{row['id']}",
        "object": "feedback",
        "created_at": int(row["created_at"].timestamp()),
        "request_id": data["request_id"],
        "conversation_id": data["conversation_id"],
    }
    await http.send_json(send, 201, body, rid, crid=crid)
