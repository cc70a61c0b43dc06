"""Which conversation a path names: ``…/agents/{name}/conversations/{conversation_id}[/messages]``.

A conversation id is the caller's (any visible ASCII, ``/`` included), so the routes take the rest
of the path; the server hands the routes that path percent-decoded, where ``x%2Fmessages`` and
``x/messages`` are one string. The rule, read from the raw path: the id is everything after
``/conversations/``, percent-decoded, except a final literal ``/messages``, which names the
messages sub-resource. So ``…/x/messages`` is always the messages of ``x``; an id with a ``/``
may send it as is or as ``%2F``, and one that ends in ``/messages`` must send that slash as
``%2F`` (``urllib.parse.quote(id, safe="")`` always works).
"""

from __future__ import annotations

from urllib.parse import unquote

from core.errors import InvalidRequest, MethodNotAllowed, NotFound

MESSAGES = "/messages"


def split(scope: dict, prefix: str) -> tuple[str, str, bool] | None:
    """(agent name, conversation id, whether it is the messages sub-resource) of the request's
    raw path after ``prefix`` (``/admin/agents/``, ``/v1/agents/``); None when it is no such path."""
    raw = scope.get("raw_path")
    path = raw.decode("latin-1") if isinstance(raw, bytes) else scope["path"]
    path = path.split("?", 1)[0]
    if not path.startswith(prefix):
        return None
    name, sep, rest = path[len(prefix) :].partition("/conversations/")
    if not sep or "/" in name:
        return None
    messages = rest.endswith(MESSAGES)
    if messages:
        rest = rest[: -len(MESSAGES)]
    return unquote(name), unquote(rest), messages


ADMIN_PREFIX = "/admin/agents/"


def admin_conversation_id(scope: dict, path_params: dict, *, messages: bool) -> str:
    """The conversation id an admin route's path names (``split``), checked: 405 when the path
    names the conversation and the route serves its messages, or the other way round (``DELETE
    …/x/messages`` never erases a conversation ``x/messages``), 400 when it is not 1 to 256
    characters."""
    found = split(scope, ADMIN_PREFIX)
    if found is None:  # (a path not as the server received it: the route's own reading)
        conversation_id, sub = path_params["conversation_id"], messages
    else:
        name, conversation_id, sub = found
        if name != path_params.get("name"):  # ("a%2Fconversations%2Fb": the router's name is "a")
            raise NotFound(f"No agent named {name[:64]!r}.", param="name")
    if sub and not messages:
        raise MethodNotAllowed(
            "A conversation's messages are erased with the conversation: DELETE "
            "/admin/agents/{name}/conversations/{conversation_id} (an id that ends in '/messages' "
            "sends that slash as %2F).",
            param="conversation_id",
            code="method_not_allowed",
            headers={"allow": "GET"},
        )
    if messages and not sub:
        raise MethodNotAllowed(
            "A conversation is read at /admin/agents/{name}/conversations/{conversation_id}/messages "
            "(a '/' in the id may be sent as %2F).",
            param="conversation_id",
            code="method_not_allowed",
            headers={"allow": "DELETE"},
        )
    if not 0 < len(conversation_id) <= 256 or "\x00" in conversation_id:
        raise InvalidRequest("'conversation_id' is 1 to 256 characters.", param="conversation_id")
    return conversation_id
