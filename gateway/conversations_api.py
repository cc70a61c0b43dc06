"""``GET /v1/agents/{name}/conversations/{conversation_id}/messages``: a REST client reads its
conversation back — the people's replies included (assistant messages with ``name: "human"``),
which reach a plain API conversation no other way — and whether a person holds it.

Authenticated like a chat completion (the client's own key: its tenant, and an agent the key may
use); it reads the recent window from Redis (PostgreSQL only when Redis no longer holds it), as
the next turn would. Each key may read at most its requests-per-minute limit (else the default
key limit, else ``key_window.DEFAULT_PER_MINUTE``) in a one-minute window shared by every replica, counted
before anything is read: ids that Redis does not hold each cost a PostgreSQL query, and no key
may turn that into a flood.

Who may read: any key of the tenant that may use the agent — the same keys that may continue the
conversation with a turn (the memory is the tenant's, keyed on tenant, agent and the caller's
conversation id, not on the key). Ids a customer's number makes guessable (``wa:…``,
``vapi:…``) are reserved to the channel accounts' own keys (``agent_stage.check_conversation_owner``).

What it shows is what the client saw: the agent's server-side tool steps are left out.

The conversation id is read as the admin routes read it (``gateway.conversation_paths``): the path
between ``/conversations/`` and the final ``/messages``, percent-decoded.
"""

from __future__ import annotations

from core import http
from core.errors import InvalidRequest, ModelNotFound, ServiceUnavailable
from gateway import agent_stage, conversation_paths, key_window
from runtime.hitl import settings as hitl_settings
from runtime.memory_window import CLIENT_SAW, unmarked

PREFIX = "/v1/agents/"


def matches(path: str) -> bool:
    return path.startswith(PREFIX) and path.endswith("/messages")


async def messages(svc, scope, send, rid: str, crid: str | None) -> None:
    ident = await svc.auth.authenticate_scope(scope)
    found = conversation_paths.split(scope, PREFIX)  # (an id with a '/': sent as is or as %2F)
    if found is None or not found[2] or "/" in found[0]:
        raise ModelNotFound("Unknown path; use /v1/agents/{name}/conversations/{conversation_id}/messages.")
    name, conversation_id, _ = found
    if not agent_stage._CONVERSATION.match(conversation_id):
        raise InvalidRequest("'conversation_id' must be 1 to 256 visible ASCII characters.", param="conversation_id")
    agent_stage.check_conversation_owner(svc, ident, conversation_id, param="conversation_id")
    agent = svc.agents.get(ident.tenant, name) if svc.agents is not None and not ident.is_master else None
    if agent is None or not agent_stage.allowed_identity(ident, agent.name, agent.model):
        raise ModelNotFound(f"No agent named {name[:64]!r} for this key.", param="name")
    await key_window.admit(svc, ident, "convread", "Conversation reads")
    from runtime.memory import MemoryUnavailable

    try:
        window = await svc.memory.load(ident.tenant, agent, conversation_id)
    except MemoryUnavailable:
        raise ServiceUnavailable("The conversation's memory is unavailable; try again shortly.") from None
    hold = None
    if getattr(svc, "hitl", None) is not None and hitl_settings.of(agent).enabled:
        hold = await svc.hitl.holds.get(agent.tenant, agent.id, conversation_id)
    body = {
        "object": "list",
        "agent": agent.name,
        "conversation_id": conversation_id,
        "held_by_human": hold is not None,
        "escalation_id": hold,
        "data": client_view(window),
    }
    await http.send_json(send, 200, body, rid, crid=crid)


def client_view(window: list[dict]) -> list[dict]:
    """The conversation as its client saw it: without the agent's server-side tool steps (the
    calls the model made of the agent's own tools and their raw results), which only the
    operator reads (``GET /admin/runs``). A tool call is the client's only when it was stored
    marked so (``memory_window.CLIENT_SAW``: the answer that called the client's tools, or what
    the client sent), whatever the agent's tools are now; an unmarked one (a server step, or one
    stored before the mark) is left out with its results, its words kept. A tool result is shown
    only right after the client's call it answers. The mark itself is never shown."""
    out = []
    shown: set = set()  # the client's calls of the assistant message just read
    for message in window:
        role = message.get("role")
        if role == "tool":
            if message.get("tool_call_id") in shown:
                out.append(message)
            continue
        calls = message.get("tool_calls") if role == "assistant" else None
        shown = set()
        if calls and message.get(CLIENT_SAW) is True:
            shown = {c.get("id") for c in calls if isinstance(c, dict)}
        elif calls:
            if not message.get("content"):
                continue
            message = {k: v for k, v in message.items() if k != "tool_calls"}
        out.append(unmarked(message))
    return out
