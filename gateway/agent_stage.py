"""The agent stage: a request whose model names an agent (``agent:<name>[@version|@label]``) gets
the agent's prompt (the version its label or A/B arm selects, rendered with the request's
variables), the conversation's stored history, and the agent's tools; then it continues down
the pipeline as a request for the agent's model group.

Everything here reads in-process caches (the agent registry) and Redis (memory): no PostgreSQL
on the path of a turn.

A WhatsApp turn carries the time its customer's message was queued, signed by the channel's
worker (``x-gateway-queued-at``: ``core.queued_proof``). When its conversation was erased since
(``channels.whatsapp.erasure.mark_erased``; read with the memory, in one round trip) the turn is
refused with 409 ``conversation_erased`` before any model call, memory read or store: the
customer's words from before the erasure do not start the conversation again. An erasure that
comes while the turn is answered stops its store (``runtime.memory``'s ``erased``).
"""

from __future__ import annotations

import logging
import re

import orjson

from channels.vapi import wire as vapi_wire
from channels.whatsapp.erasure import erased_key
from core import queued_proof
from core.erasure_key import conversation_tag, tag_parties
from core.errors import GatewayError, InvalidRequest, ModelNotFound, PermissionDenied, ServiceUnavailable
from core.tokens import count_text_cached
from core.types import RequestContext, excerpt
from gateway import grounding, hitl_stage
from policies.engine import attribution
from runtime.memory import Erased, ErasureUnknown, MemoryUnavailable, Window
from runtime.memory_window import for_model
from runtime.prompts import render, select
from runtime.types import AGENT_PREFIX, Turn

log = logging.getLogger("gateway.agents")

_CONVERSATION = re.compile(r"^[\x21-\x7e]{1,256}$")
_MAX_VARIABLES = 100


def is_agent(model: str) -> bool:
    return model.startswith(AGENT_PREFIX)


def split_name(model: str) -> tuple[str, str | None]:
    """``agent:support@staging`` → (``support``, ``staging``)."""
    name, _, selector = model[len(AGENT_PREFIX) :].partition("@")
    return name, selector or None


def conversation_id(ctx: RequestContext, scope_headers: dict[bytes, bytes]) -> str | None:
    """The caller's conversation id: ``metadata.conversation_id`` or ``x-gateway-conversation``.
    Without one the agent is stateless (the client sends the history)."""
    raw = scope_headers.get(b"x-gateway-conversation")
    value = raw.decode("latin-1") if raw else None
    meta = ctx.body.get("metadata")
    if value is None and isinstance(meta, dict) and meta.get("conversation_id") is not None:
        value = meta["conversation_id"]
    if value is None:
        return None
    if not isinstance(value, str) or not _CONVERSATION.match(value):
        raise InvalidRequest(
            "'conversation_id' must be 1 to 256 visible ASCII characters.",
            param="metadata.conversation_id",
            code="invalid_value",
        )
    return value


# Conversation ids the channels use; their customers' numbers make them guessable, so only the
# channel accounts' own keys may continue or read them (any other key of the tenant gets 403).
CHANNEL_PREFIXES = ("wa:", "vapi:")


def check_conversation_owner(svc, ident, conversation: str, param: str = "metadata.conversation_id") -> None:
    """Refuses a channel conversation id to a key that is not a channel account's key (403
    naming ``param``, the field that carried the id)."""
    if conversation.startswith(CHANNEL_PREFIXES) and (ident is None or ident.key_id not in svc.channel_keys):
        raise PermissionDenied(
            "Conversation ids starting with 'wa:' or 'vapi:' belong to the channels; use another id.",
            param=param,
            code="conversation_reserved",
        )


# The conversations whose erasures their channel marks (``channels.whatsapp.erasure``).
ERASURE_MARKED = ("wa:",)
_QUEUED = queued_proof.HEADER.encode()


class ConversationErased(GatewayError):
    """A channel's turn queued before its conversation's erasure: not answered (the worker drops it)."""

    status = 409
    type = "invalid_request_error"
    default_code = "conversation_erased"


def erased_mark(scope_headers: dict[bytes, bytes], tenant: str, conversation: str | None) -> tuple[str, int] | None:
    """The conversation's erasure mark (its Redis key) and the turn's queue time (µs), when the
    request proves the time (``core.queued_proof``); None without the header. A header that proves
    nothing for this tenant's conversation (forged, tampered, signed for another one, or on a
    conversation no channel marks) is refused: 400."""
    raw = scope_headers.get(_QUEUED)
    if raw is None:
        return None
    queued = None
    if conversation is not None and conversation.startswith(ERASURE_MARKED):
        queued = queued_proof.verify(raw.decode("latin-1"), tenant, conversation)
    if queued is None:
        raise InvalidRequest(
            f"'{queued_proof.HEADER}' is not a queue time signed for this conversation.",
            param=queued_proof.HEADER,
            code="invalid_value",
        )
    return erased_key(tenant, conversation), queued


def _refuse_erased(ctx: RequestContext, scope_headers: dict[bytes, bytes], tenant: str, conversation: str):
    """409: the turn is the erased conversation's. Its audit record (it is recorded, as every
    refusal) names the conversation's tag where its end user and customer are the customer
    (``core.erasure_key.names_party``: a WhatsApp turn's are the number), and keeps no content."""
    attr = attribution(ctx, scope_headers)
    tag_parties(attr, conversation, conversation_tag(tenant, conversation))
    ctx.extra["attribution"] = attr
    ctx.body.pop("messages", None)
    raise ConversationErased("The conversation was erased after this message was queued; it is not answered.")


def _variables(ctx: RequestContext) -> dict:
    body = ctx.body
    meta = body.get("metadata")
    found = body.pop("variables", None)  # extra_body={"variables": {...}}: not an OpenAI field
    param = "variables"
    if isinstance(meta, dict) and "variables" in meta:
        found, param = meta.pop("variables"), "metadata.variables"
    if found is None:
        return {}
    if not isinstance(found, dict) or len(found) > _MAX_VARIABLES:
        raise InvalidRequest(
            f"'{param}' must be an object of at most {_MAX_VARIABLES} values.", param=param, code="invalid_type"
        )
    return found


def allowed_identity(ident, name: str, model: str) -> bool:
    """A key restricted to models may use an agent it lists (``agent:<name>``), or one whose
    model group it may use."""
    return ident is None or not ident.models or f"{AGENT_PREFIX}{name}" in ident.models or model in ident.models


def allowed(ctx: RequestContext, name: str, model: str) -> bool:
    return allowed_identity(ctx.identity, name, model)


async def prepare(svc, ctx: RequestContext, scope_headers: dict[bytes, bytes]) -> None:
    # (imports at the module's top: one in a function runs on every call, ~2 µs each)
    name, selector = split_name(ctx.model)
    tenant = ctx.identity.tenant if ctx.identity is not None else "default"
    agent = svc.agents.get(tenant, name)
    if agent is None or not allowed(ctx, name, agent.model):
        if agent is not None:
            raise PermissionDenied(
                f"This API key may not use `{excerpt(ctx.model)}`.", param="model", code="model_not_allowed"
            )
        raise ModelNotFound(
            f"The model `{excerpt(ctx.model)}` does not exist or you do not have access to it.", param="model"
        )
    conv = conversation_id(ctx, scope_headers)
    if conv is not None:
        check_conversation_owner(svc, ctx.identity, conv)
    mark = erased_mark(scope_headers, tenant, conv)
    sticky = conv or str(ctx.body.get("user") or ctx.request_id)
    # an old version by number: read on demand, cached (no selector: nothing pinned, no coroutine)
    pinned = await svc.agents.pinned(agent, selector) if selector is not None else None
    selection = select(agent, selector, sticky, pinned)
    variables = _variables(ctx)
    meta = ctx.body.get("metadata")
    if isinstance(meta, dict):  # the gateway's own field never reaches the provider (OpenAI refuses
        meta.pop("conversation_id", None)  # metadata without store: true, and the id is the customer's)
        if not meta:
            del ctx.body["metadata"]
    if any(k in ctx.body for k in vapi_wire.CALL_OBJECTS):  # VAPI straight at /v1: call facts as variables
        variables = {**vapi_wire.take_call_variables(ctx.body), **variables}
    system = render(selection.version, variables, agent.defaults)
    client_messages = list(ctx.body.get("messages") or [])
    # (positional, in Turn's field order: a class called with keywords builds a dict of them first)
    turn = Turn(agent, selection, conv, variables, client_messages)
    turn.erased_mark = mark
    history: list[dict] = []
    hold = hitl_stage.start_check(svc, turn)  # is a person holding it? (a GET beside the memory read)
    if conv is not None:
        try:
            history = await svc.memory.load(tenant, agent, conv, erased=mark)
        except ErasureUnknown as exc:  # (the channel's turn is refused for now: its worker retries)
            if hold is not None:
                hold.cancel()
            log.warning("memory unavailable; a signed channel turn is refused for now: %s", exc.reason)
            raise ServiceUnavailable(
                "Whether this conversation was erased since the message was queued cannot be read just now; retry.",
                code="conversation_unverified",
            ) from None
        except MemoryUnavailable as exc:
            turn.memory_error = str(exc)[:200]
            log.warning("memory unavailable; the turn answers without history: %s", turn.memory_error)
        except Erased:
            if hold is not None:
                hold.cancel()
            _refuse_erased(ctx, scope_headers, tenant, conv)
    turn.history = history
    client_tools = ctx.body.get("tools") or []
    turn.client_tools = frozenset(  # (a tool not of type "function" was not checked: its name may be any JSON)
        t["function"]["name"]
        for t in client_tools
        if isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
    )
    server_tools = svc.tools.openai_tools(agent)
    server_names = {t["function"]["name"] for t in server_tools}
    # The gateway's own tool steps never come from the client (an agent without server-side tools
    # has none to forge: a stateless client's long history is not walked for them).
    for i, message in enumerate(client_messages if server_names else ()):
        if isinstance(message, dict) and message.get("role") in ("assistant", "function"):
            forged = _forged_call(message, server_names)
            if forged is not None:
                raise InvalidRequest(
                    "Calls of this agent's server-side tools cannot come from the client.",
                    param=f"messages[{i}].{forged}",
                    code="invalid_value",
                )
    clash = turn.client_tools & server_names
    if clash:
        raise InvalidRequest(
            f"Tool {sorted(clash)[0]!r} is a server-side tool of this agent; rename the client tool.",
            param="tools",
            code="tool_name_conflict",
        )
    if server_tools and ctx.body.get("n") not in (None, 1):  # the tools loop follows one answer
        raise InvalidRequest("'n' must be 1 for an agent with server-side tools.", param="n", code="invalid_value")
    # held: the message joins the escalation (checked first like any turn's: it is stored too)
    if await hitl_stage.on_prepare(svc, ctx, turn, hold):
        return
    sent = for_model(history)  # (``turn.history`` keeps the marks: the next window is stored from it)
    first = {"role": "system", "content": system}
    if server_tools:
        ctx.body["tools"] = [*client_tools, *server_tools]
    ctx.body["model"] = agent.model
    ctx.model = agent.model
    ctx.agent = turn
    ctx.grow_tokens = grounding.bound(agent)  # its sources come once the turn is admitted (pipeline.ground)
    ctx._prompt_tokens = None  # the body changed: counts and bounds are derived again
    ctx.body_bytes = _prompt_bound(ctx.body, first, sent, client_messages)
    ctx.body["messages"] = [first, *sent, *client_messages]
    ctx.known_tokens = _known_tokens(first, system)
    ctx.known_history = sent if isinstance(sent, Window) else None  # (mapped when a count needs it)


def _prompt_bound(body: dict, first: dict, sent: list[dict], client_messages: list) -> int:
    """``RequestContext.body_bytes`` of the turn's body: the prompt's bound (context windows,
    routing rules, the off-loop count), its size as JSON (bytes bound tokens from above). The
    stored history is not encoded for it: memory keeps each message's token count, exactly what
    the prompt's count takes for it (``known_history``: no tokenizer sees it again), so the bound
    is the rest of the body's bytes plus those counts."""
    if isinstance(sent, Window):
        body["messages"] = [first, *client_messages]
        return len(orjson.dumps(body)) + sum(sent.tokens)
    body["messages"] = [first, *sent, *client_messages]
    return len(orjson.dumps(body))


def _forged_call(message: dict, server_names: set[str]) -> str | None:
    """The field of a client's message that calls (or answers, as the legacy ``function`` role)
    one of the agent's server-side tools, or None: ``tool_calls``, the legacy ``function_call``,
    or a ``function`` message's ``name`` (any of them may hold any JSON here)."""
    if message.get("role") == "function":
        name = message.get("name")
        return "name" if isinstance(name, str) and name in server_names else None
    for call in message.get("tool_calls") or ():
        name = (call.get("function") or {}).get("name") if isinstance(call, dict) else None
        if isinstance(name, str) and name in server_names:
            return "tool_calls"
    legacy = message.get("function_call")
    if isinstance(legacy, dict) and isinstance(legacy.get("name"), str) and legacy["name"] in server_names:
        return "function_call"
    return None


def _known_tokens(first: dict, system: str) -> dict[int, tuple[dict, int]] | None:
    """What the turn's prompt count need not tokenize again besides the stored history (memory
    keeps each message's count: ``RequestContext.known_history``): the system prompt (an agent's
    renders recur), until grounding added sources to it."""
    if first.get("content") is system:
        return {id(first): (first, count_text_cached(system) + 3)}
    return None
