"""The request pipeline, top to bottom.

    authenticate → parse & validate → agent (prompt, memory, tools; agents only) → route
      → admit (rate limits, budget reservation) → scrub (PII) → complete (with retries and
      fallbacks) → tools (server-side tool calls, back to admit; agents only) → settle (cost,
      budgets, alerts, audit record) → respond (pseudonyms restored)

Each stage is one small function over the ``RequestContext``; a stage short-circuits by
raising a ``GatewayError``, which the app renders. ``account`` always runs (app.py calls it
in a ``finally``), so refused and failed requests are counted too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import orjson

from core import http, metrics
from core.errors import GatewayError, PermissionDenied, UpstreamError, UpstreamTimeout
from core.hangup import Hangup
from core.logs import access_log
from core.sse import DONE
from core.types import RequestContext, Route, Usage, excerpt
from gateway import agent_stage, grounding, tools_loop, withholding
from gateway.agent_stage import is_agent
from gateway.output_cap import OutputCap
from gateway.providers.base import bad_response, map_upstream_status, stream_error_event
from gateway.routing import Group, run_attempts
from gateway.routing.constraints import check_retention, constraints_for
from gateway.services import Services
from gateway.usage import (
    OFF_LOOP_BYTES,
    compact,
    count_prompt_off_loop,
    estimate_stream_usage,
    estimate_usage,
    with_usage,
)
from gateway.validation import validate_chat, validate_embeddings
from policies import alerts
from policies.engine import attribution
from policies.pii.restore import StreamRestorer, restore_body
from policies.pii.scrub import ScrubState

log = logging.getLogger("gateway")

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


_MAX_MODEL_NAME = 256  # no configured name is longer (config: Model.name)


async def authenticate(svc: Services, ctx: RequestContext, scope: dict) -> None:
    ctx.identity = await svc.auth.authenticate_scope(scope)  # the key, then its IP allow-lists


async def parse(svc: Services, ctx: RequestContext, scope: dict, receive, validate: Callable) -> None:
    raw = await http.read_body(scope, receive, svc.config.server.max_body_bytes)
    body = http.parse_json(raw)
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        # Known early so refusals are audited by model. A name longer than any configured one
        # cannot be served; it is kept only as a bounded excerpt (in errors, logs, the ledger).
        model = body["model"]
        ctx.model = model if len(model) <= _MAX_MODEL_NAME else excerpt(model)
    validate(body)
    check_retention(svc.config, ctx.identity, scope, body)  # before anything runs, is charged or sent
    ctx.body = body
    ctx.body_bytes = len(raw)
    ctx.max_output = max(_int(body.get("max_completion_tokens")), _int(body.get("max_tokens")))
    ctx.stream = body.get("stream") is True
    opts = body.get("stream_options")
    ctx.include_usage = bool(ctx.stream and isinstance(opts, dict) and opts.get("include_usage"))


def _int(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def route(svc: Services, ctx: RequestContext, scope: dict, mode: str) -> Group:
    """The group serving the request. A key's model allow-list holds for every group that may
    serve it: the name asked for (here), the target of a routing rule (a rule whose target the
    key may not use is passed over: ``Router.resolve``) and every fallback group (skipped, never
    served: ``Router.fallbacks``), whatever triggers the fallback — a failing provider, a
    latency or price constraint, a prompt too long for the group's context window."""
    ident = ctx.identity
    if ctx.agent is None and ident is not None and ident.models:
        if ctx.model not in ident.models:
            raise PermissionDenied(
                f"This API key may not use model `{excerpt(ctx.model)}`.", param="model", code="model_not_allowed"
            )
        ctx.models_allowed = ident.models
    ctx.constraints = constraints_for(svc.config, ident, scope)
    return svc.router.resolve(ctx, mode)


def _gateway_headers(scope: dict) -> dict[bytes, bytes]:
    return {k: v for k, v in scope["headers"] if k.startswith(b"x-gateway-")}


async def admit(svc: Services, ctx: RequestContext, scope: dict) -> None:
    if not svc.config.policies.enabled:
        return
    attr = ctx.extra.get("attribution")
    if attr is None:
        ctx.extra["attribution"] = attr = _attribution(ctx, scope)
    await svc.policies.admit(ctx, attr)


def _attribution(ctx: RequestContext, scope: dict) -> dict:
    attr = attribution(ctx, _gateway_headers(scope))
    if ctx.agent is not None:  # an agent's turns are its own, whatever the client says
        attr["agent"] = ctx.agent.agent.name
    return attr


async def settle(svc: Services, ctx: RequestContext, scope: dict, now: bool = False) -> None:
    """Cost, budgets, alerts and the audit record — before the client hears the answer, so an
    acknowledged request always has its record (in Redis, or in the local spool). ``now``: the
    Redis command is written before this coroutine first yields (``settling``)."""
    if ctx.extra.get("settled") or not svc.config.policies.enabled:
        return
    ctx.extra["settled"] = True
    # (a turn refused before its admission too: its record holds the agent's variant)
    attr = ctx.extra.get("attribution") or _attribution(ctx, scope)
    elapsed = time.perf_counter() - ctx.started
    try:
        fired = await svc.policies.settle(ctx, attr, elapsed, now=now)
    except Exception as exc:
        log.error("settle failed; audit record spooled to disk: %s", exc)
        await svc.ledger.spool.add(svc.policies.spooled(ctx, attr, elapsed))  # (fsynced off the loop)
        return
    if fired:
        alerts.fired(fired)


async def settling(svc: Services, ctx: RequestContext, scope: dict) -> asyncio.Future:
    """Settlement started, not awaited: when this returns, the settle command (the audit record,
    the cost) has been written to Redis's socket, so Redis applies it before anything the client
    does after hearing the answer; its reply — alerts fired, or a failure that spools the record
    to disk — is awaited after the response is sent, so the client does not wait for that round
    trip. A process that dies between the two has still handed the command to Redis."""
    task = asyncio.ensure_future(settle(svc, ctx, scope, now=True))
    await asyncio.sleep(0)  # the task runs to its Redis call, which writes at once (FIFO ready queue)
    return task


async def scrub(svc: Services, ctx: RequestContext) -> None:
    """PII scrubbing of the body for the requested model group, before anything is sent: a
    ``block`` refuses the request here. Fallbacks to groups with another policy are scrubbed
    for theirs when an attempt goes there (``body_for``)."""
    if svc.pii is None:
        return
    policy = svc.pii.policy_for(ctx.identity, ctx.model)
    state = ctx.extra["pii"] = ScrubState()
    if policy is not None:
        started = time.perf_counter()
        try:
            await svc.pii.scrub(ctx.body, ctx.endpoint, policy, state)
        finally:
            ctx.extra["pii_ms"] = round((time.perf_counter() - started) * 1000, 3)


async def body_for(svc: Services, ctx: RequestContext, r: Route) -> dict:
    """The body to send for one attempt: scrubbed by the policy of the group serving it. In an
    agent turn whose tools have run, what that policy refuses of the steps' own messages is
    withheld, as at the step's scrub (``withholding``): the turn is not failed after its tools."""
    state: ScrubState | None = ctx.extra.get("pii")
    if state is None:
        return ctx.body
    policy = svc.pii.policy_for(ctx.identity, r.model)
    if policy is None:
        state.sent = ctx.body
        return ctx.body
    own = ctx.extra.get("tool_messages") if ctx.agent is not None else None
    if own:
        return await withholding.scrubbed(ctx, own, lambda: svc.pii.scrub(ctx.body, ctx.endpoint, policy, state))
    return await svc.pii.scrub(ctx.body, ctx.endpoint, policy, state)


def _route_headers(ctx: RequestContext) -> list[tuple[bytes, bytes]]:
    r = ctx.route
    headers = [(b"x-request-id", ctx.request_id.encode())]
    if r is not None:  # an agent's fallback message was served by no deployment
        headers += [
            (b"x-gateway-provider", r.provider.encode()),
            (b"x-gateway-deployment", r.deployment.encode()),
            (b"x-gateway-attempts", str(ctx.attempts).encode()),
        ]
    if ctx.client_request_id is not None:
        headers.append((b"x-client-request-id", ctx.client_request_id.encode()))
    return headers


async def complete(svc: Services, ctx: RequestContext, group: Group) -> bytes:
    """One non-streamed upstream call (retries, keys, fallbacks): the response as the client
    will see it (pseudonyms restored), usage known."""
    return await _answered(ctx, await _upstream(svc, ctx, group))


async def _upstream(svc: Services, ctx: RequestContext, group: Group) -> bytes:
    """The provider's response (``complete``'s upstream part: what a client's hang-up may cut)."""
    if ctx.endpoint == "embeddings":

        async def attempt(r: Route) -> bytes:
            return await svc.adapters[r.provider].embeddings(ctx, r, await body_for(svc, ctx, r))
    else:

        async def attempt(r: Route) -> bytes:
            return await svc.adapters[r.provider].chat(ctx, r, await body_for(svc, ctx, r))

    return await run_attempts(svc.router, ctx, group, attempt)


async def _answered(ctx: RequestContext, raw: bytes) -> bytes:
    """The provider's response as the client will see it (pseudonyms restored), usage known
    (counted when the provider gave none: the answer was made, and is paid for)."""
    ctx.status = 200
    if ctx.usage is None:
        ctx.usage = await _estimate(ctx, raw)
    state: ScrubState | None = ctx.extra.get("pii")
    if state is not None and state.vault and ctx.endpoint == "chat":
        raw = restore_body(raw, state.vault)
    return raw


async def _counted(ctx: RequestContext, raw: bytes) -> None:
    """The usage of an answer that came as its client hung up (``Hangup.until``'s discard)."""
    if ctx.usage is None:
        ctx.usage = await _estimate(ctx, raw)


async def respond(ctx: RequestContext, raw: bytes, send, extra: list[tuple[bytes, bytes]] = ()) -> None:
    headers = [(b"content-type", http.JSON), (b"content-length", str(len(raw)).encode()), *_route_headers(ctx), *extra]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": raw})


# A non-streamed request's hang-up watcher starts after this long: most answers come sooner and
# pay only for a timer (the watcher task cost ~8 % of a plain request's instructions); a client
# leaving a slow provider is noticed at most this late, and its slot and reservation let go then.
HANGUP_WATCH_AFTER_S = 0.5


async def call(svc: Services, ctx: RequestContext, group: Group, scope: dict, send, receive=None) -> None:
    """One non-streamed answer. With ``receive``, a client that hangs up while the provider works
    is noticed (within ``HANGUP_WATCH_AFTER_S``, then at once): the upstream call is cancelled
    and the request settled (its prompt).
    Only the upstream call: an answer that came is counted whatever the client does meanwhile
    (a hang-up cutting the count of a large answer from a provider without usage left it
    charged its prompt alone)."""
    if receive is None:
        raw = await complete(svc, ctx, group)
    else:
        hangup = Hangup(receive, after=HANGUP_WATCH_AFTER_S)
        try:
            raw = await hangup.until(_upstream(svc, ctx, group), discard=lambda came: _counted(ctx, came))
        except http.ClientGone:
            if ctx.usage is None and ctx.route is not None:  # the prompt was sent: it is paid for
                ctx.usage = await _estimate(ctx, b"")
            raise
        finally:
            hangup.close()
        raw = await _answered(ctx, raw)
    settled = await settling(svc, ctx, scope)
    try:
        await respond(ctx, raw, send)
    finally:
        await settled


# Relayed chunks kept whole (for the usage estimate, an agent's stored answer) before they are
# compacted to their text (gateway.usage.compact).
_MAX_KEPT_BYTES = 1024 * 1024

# What a stream may send before its first content (held so a failure can still fall back
# unseen): keep-alive comments and empty deltas are a few bytes; more than this is no answer.
_MAX_HEAD_BYTES = 4 * 1024 * 1024


def _commits(ctx: RequestContext, chunk: bytes) -> bool:
    """Whether a chunk carries something the client must see (content, a tool call, the end).

    Until one does, nothing has been sent, and a failure can still fall back unseen; an error
    event in that stretch is raised as the provider failure it is.
    """
    for event in chunk.split(b"\n\n"):
        if not event.startswith(b"data: "):
            continue
        if event.startswith(b"data: [DONE]"):
            return True
        try:
            data = orjson.loads(event[6:])
        except orjson.JSONDecodeError:
            return True  # not ours to judge: relay it
        if not isinstance(data, dict):
            return True
        err = data.get("error")
        if err is not None:
            message = err.get("message") if isinstance(err, dict) else str(err)
            raise map_upstream_status(ctx.route.provider, 500, str(message or "stream error"), {})
        choices = data.get("choices") or []
        if not isinstance(choices, list):
            return True  # not a chunk OpenAI sends: not ours to judge, relay it
        for choice in choices:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(choice, dict) or not isinstance(delta, dict | None):
                return True
            # Anything but the role is for the client: content, tool calls, a refusal, and what
            # OpenAI-compatible servers add (reasoning_content, reasoning, audio, images, ...).
            if choice.get("finish_reason") or any(v for k, v in (delta or {}).items() if k != "role"):
                return True
    return False


async def _open_stream(svc: Services, ctx: RequestContext, r: Route) -> tuple[list[bytes], AsyncIterator[bytes]]:
    events = await svc.adapters[r.provider].open_chat_stream(ctx, r, await body_for(svc, ctx, r))
    head: list[bytes] = []
    held = 0
    try:
        async for chunk in events:
            head.append(chunk)
            if _commits(ctx, chunk):
                ctx.ttft = time.perf_counter() - ctx.started
                return head, events
            held += len(chunk)
            if held > _MAX_HEAD_BYTES:
                raise bad_response(r.provider, "no content after several MiB of stream events")
        return head, events  # ended without content: relay what there was
    except GatewayError as err:
        await events.aclose()
        clean = getattr(svc.adapters[r.provider], "clean", None)
        if clean is not None:  # an error event the commit check found: the provider's words cleaned
            clean(err, ctx, r)
        raise
    except (TimeoutError, aiohttp.ClientError) as exc:
        await events.aclose()
        raise _stream_failure(r.provider, exc) from None
    except BaseException:
        await events.aclose()
        raise


async def _estimate(ctx: RequestContext, raw: bytes) -> Usage:
    """The usage of an answer whose provider reported none; a large one counted off the event
    loop (tiktoken takes seconds per MB of text like "aaaa…": every other request would wait).
    An embeddings answer is counted from its input: large by the request's size (an answer to a
    text of megabytes may be one short vector)."""
    if len(raw) >= OFF_LOOP_BYTES or (ctx.endpoint == "embeddings" and ctx.body_bytes >= OFF_LOOP_BYTES):
        return await asyncio.to_thread(estimate_usage, ctx, raw)
    return estimate_usage(ctx, raw)


async def _estimate_stream(ctx: RequestContext, sent: list[bytes], kept: int) -> Usage:
    """The usage of a stream whose provider reported none; a large one counted off the loop."""
    if kept >= OFF_LOOP_BYTES:
        return await asyncio.to_thread(estimate_stream_usage, ctx, sent)
    return estimate_stream_usage(ctx, sent)


async def _last_chunk(ctx: RequestContext, chunk: bytes, sent: list[bytes], kept: int) -> bytes:
    """A stream's last chunk (ending in ``[DONE]``): when the provider reported no usage, the
    estimate is counted, and put before ``[DONE]`` for a client that asked for ``include_usage``."""
    if ctx.usage is None:
        ctx.usage = await _estimate_stream(ctx, sent, kept)
        if ctx.include_usage:
            chunk = with_usage(chunk, ctx)
    return chunk


def _stream_failure(provider: str, exc: BaseException) -> GatewayError:
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(f"Provider {provider} stalled mid-stream.")
    return UpstreamError(
        f"Provider {provider} broke off the stream: {type(exc).__name__}.", code="upstream_disconnected"
    )


async def call_stream(
    svc: Services, ctx: RequestContext, group: Group, scope: dict, send, receive, extra: list = (), on_done=None
) -> None:
    """Relay a stream. ``on_done`` (an agent turn storing its answer) runs before the last chunk
    goes, with settlement, so a client that hears the end finds the turn recorded. A client that
    hangs up while the provider is silent (before its first byte too) is noticed at once
    (``Hangup``): the upstream read is cancelled, and the request settled for what was relayed."""
    hangup = Hangup(receive)
    try:
        head, events = await hangup.until(
            run_attempts(svc.router, ctx, group, lambda r: _open_stream(svc, ctx, r), hold=True),
            discard=lambda opened: _discard(svc, ctx, opened[1]),
        )
    except http.ClientGone:
        hangup.close()
        if ctx.usage is None and ctx.route is not None:  # the prompt was sent: it is paid for
            ctx.usage = await _estimate_stream(ctx, [], 0)
        raise
    except BaseException:
        hangup.close()
        raise
    r = ctx.route
    ctx.status = 200
    # A hard budget's reserved output, counted as it is relayed, in the provider's own text (not
    # with its pseudonyms restored: an address in place of ``<EMAIL_1>`` is not the provider's output)
    cap = OutputCap.for_request(ctx)
    capped = False  # the head went past it: what fits of it is relayed, then the stream is ended
    for i, chunk in enumerate(head if cap is not None else ()):
        fits = cap.take(chunk)
        if fits is not None:
            head, capped = [*head[:i], fits] if fits else head[:i], True
            break
    state: ScrubState | None = ctx.extra.get("pii")
    restorer = StreamRestorer(state.vault) if state is not None and state.vault else None
    if restorer is not None:
        try:
            head = [restorer.chunk(c) for c in head]
        except BaseException:  # nothing sent yet: an error response; the route and stream let go
            hangup.close()
            svc.router.release(r)
            await events.aclose()
            raise
    sent = head  # kept (by reference) so a broken stream's usage can still be counted
    ctx.extra["sent"] = sent  # and an agent turn's answer stored in memory
    kept = sum(len(c) for c in head)  # bytes in sent: past a bound, compacted (amortized linear)
    compacted = 0

    async def deliver(chunk: bytes) -> bool:
        """Sends one chunk; the last one (``[DONE]``) settled as it goes. True: the stream ended."""
        last = chunk.endswith(DONE)
        settled = None
        if last:
            chunk = await _last_chunk(ctx, chunk, sent, kept)
            if on_done is None:
                settled = await settling(svc, ctx, scope)
            else:  # an agent's turn: settled and stored before the end is heard
                await settle(svc, ctx, scope)
                await on_done()
        try:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finally:
            if settled is not None:
                await settled
        return last

    async def cut() -> None:
        """Ends the stream at its reserved output (a provider that ignored ``max_tokens``)."""
        log.warning(
            "stream cut at its reserved output (%d tokens): provider %s ignored max_tokens",
            cap.limit,
            r.provider,
            extra={"fields": {"request_id": ctx.request_id}},
        )
        tail = restorer.tail() if restorer is not None else b""
        if tail:
            sent.append(tail)
        usage = await _estimate_stream(ctx, sent, kept + len(tail))
        if ctx.usage is not None:  # the provider's own prompt count, when it gave one
            told = ctx.usage
            usage = dataclasses.replace(usage, prompt_tokens=told.prompt_tokens, cached_tokens=told.cached_tokens)
        ctx.usage = cap.charged(usage)
        await deliver(tail + cap.ending(ctx, ctx.usage if ctx.include_usage else None))

    try:
        headers = [*_SSE_HEADERS, *_route_headers(ctx), *extra]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        try:
            ended = False
            for chunk in list(head):
                if await deliver(chunk):
                    ended = True
                    break
            if capped and not ended:  # past the reserved output in the head: what fits went, now the end
                await cut()
                ended = True
            while not ended:
                try:
                    chunk = await hangup.until(events.__anext__())
                except StopAsyncIteration:
                    break
                fits = cap.take(chunk) if cap is not None else None
                if fits is not None:  # past the reserved output: what fits goes, then the end
                    if fits and restorer is not None:
                        fits = restorer.chunk(fits)
                    if fits:
                        sent.append(fits)
                        kept += len(fits)
                        await deliver(fits)
                    await cut()
                    break
                if restorer is not None:
                    chunk = restorer.chunk(chunk)
                sent.append(chunk)
                kept += len(chunk)
                if kept > max(_MAX_KEPT_BYTES, 2 * compacted):
                    sent[:] = [compact(sent)]
                    kept = compacted = len(sent[0])
                ended = await deliver(chunk)
        except http.ClientGone:  # the client left: the rest is not read (the upstream let go below)
            ctx.status = 499
            ctx.error_code = "client_closed_request"
        except (GatewayError, TimeoutError, aiohttp.ClientError) as exc:
            # Past the first byte nothing can be taken back: end the stream with an error event.
            err = _stream_failure(r.provider, exc)
            ctx.status = err.status
            ctx.error_code = err.code
            if ctx.usage is None:
                ctx.usage = await _estimate_stream(ctx, sent, kept)
            metrics.upstream_errors.get(r.provider, metrics.code_label(err.code)).inc()
            svc.router.finished(r, ctx, err, time.perf_counter() - ctx.started)
            await settle(svc, ctx, scope)
            tail = restorer.tail() if restorer is not None else b""
            await send({"type": "http.response.body", "body": tail + stream_error_event(err), "more_body": True})
        except Exception as exc:  # the gateway's own failure past the first byte: still a proper end
            log.error("stream relay failed: %s", type(exc).__name__, extra={"fields": {"request_id": ctx.request_id}})
            err = GatewayError("The server had an error while processing your request.")
            ctx.status = err.status
            ctx.error_code = "internal_error"
            if ctx.usage is None:
                ctx.usage = await _estimate_stream(ctx, sent, kept)
            await settle(svc, ctx, scope)
            await send({"type": "http.response.body", "body": stream_error_event(err), "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        hangup.close()
        svc.router.release(r)
        with contextlib.suppress(Exception):
            await events.aclose()
        if ctx.usage is None:  # the client left before the end (and its usage): it pays for what it was sent
            ctx.usage = await _estimate_stream(ctx, sent, kept)  # (last: an await, which a cancel may end)


async def _discard(svc: Services, ctx: RequestContext, events: AsyncIterator[bytes]) -> None:
    """A stream opened as its client hung up: the route and the upstream let go."""
    svc.router.release(ctx.route)
    with contextlib.suppress(Exception):
        await events.aclose()


async def agent(svc: Services, ctx: RequestContext, scope: dict) -> None:
    """The agent stage (only when the model names one): prompt, variables, memory, tools."""
    if is_agent(ctx.model):
        await agent_stage.prepare(svc, ctx, _gateway_headers(scope))


async def ground(svc: Services, ctx: RequestContext, group: Group | None = None) -> Group | None:
    """An agent turn's knowledge-base sources, once it is admitted (the search's embedding and
    re-ranking calls cost money: a turn a rate limit or a budget refuses makes none). Returns
    the group serving it: chosen again once the sources are in (routing rules counted the most
    they could add; a rule refusing the grounded prompt keeps the group admitted)."""
    if ctx.agent is not None:
        grew = ctx.grow_tokens
        await grounding.ground(svc, ctx)
        await count_prompt_off_loop(ctx)  # sources make a prompt large
        if grew and not ctx.grow_tokens and group is not None:
            with contextlib.suppress(GatewayError):
                group = svc.router.resolve(ctx, "chat")
    return group


async def chat(svc: Services, ctx: RequestContext, scope: dict, receive, send) -> None:
    await authenticate(svc, ctx, scope)
    await parse(svc, ctx, scope, receive, validate_chat)
    await agent(svc, ctx, scope)
    await count_prompt_off_loop(ctx)  # a large prompt is tokenized off the event loop
    group = route(svc, ctx, scope, "chat")
    await admit(svc, ctx, scope)
    group = await ground(svc, ctx, group)
    await scrub(svc, ctx)
    if ctx.agent is not None:
        await tools_loop.run_turn(svc, ctx, group, scope, send, receive)  # complete → tools → respond
    elif ctx.stream:
        await call_stream(svc, ctx, group, scope, send, receive)
    else:
        await call(svc, ctx, group, scope, send, receive)


async def embeddings(svc: Services, ctx: RequestContext, scope: dict, receive, send) -> None:
    await authenticate(svc, ctx, scope)
    await parse(svc, ctx, scope, receive, validate_embeddings)
    group = route(svc, ctx, scope, "embedding")
    await admit(svc, ctx, scope)
    await scrub(svc, ctx)
    await call(svc, ctx, group, scope, send, receive)


def account(svc: Services, ctx: RequestContext, now: float, error: GatewayError | None) -> None:
    """Metrics and the access-log line (the audit ledger joins here).

    Metric labels are never client-chosen strings: the model label is a configured group's name
    (the one asked for, once known to exist), else ``unknown``; provider and status come from
    the gateway. The log line bounds what the client chose (model name, error message)."""
    provider = ctx.route.provider if ctx.route else ""
    model = ctx.model if ctx.model in svc.router.groups else "unknown"
    elapsed = now - ctx.started
    metrics.requests.get(ctx.endpoint, model, provider, str(ctx.status)).inc()
    metrics.latency.get(ctx.endpoint, model, provider).observe(elapsed)
    if ctx.ttft is not None:
        metrics.ttft.get(model, provider).observe(ctx.ttft)
    pii: ScrubState | None = ctx.extra.get("pii")
    if pii is not None and pii.counts:
        actions = svc.pii.policies[pii.policy].actions
        for label, n in pii.counts.items():
            metrics.pii_entities.get(label, actions[label]).inc(n)
    usage = ctx.usage
    if usage is not None:
        metrics.tokens.get(model, provider, "prompt").inc(usage.prompt_tokens)
        metrics.tokens.get(model, provider, "completion").inc(usage.completion_tokens)
        if usage.cached_tokens:
            metrics.tokens.get(model, provider, "cached").inc(usage.cached_tokens)
    if svc.config.server.log_requests:
        line = {
            "level": "info" if ctx.status < 500 else "warning",
            "msg": "request",
            "request_id": ctx.request_id,
            "client_request_id": ctx.client_request_id,
            "endpoint": ctx.endpoint,
            "status": ctx.status,
            "model": ctx.model,  # bounded by parse
            "provider": provider,
            "deployment": ctx.route.deployment if ctx.route else None,
            "stream": ctx.stream,
            "attempts": ctx.attempts,
            "fallbacks": ctx.fallbacks,
            "key_id": ctx.identity.key_id if ctx.identity else None,
            "latency_ms": round(elapsed * 1000, 2),
            "ttft_ms": round(ctx.ttft * 1000, 2) if ctx.ttft is not None else None,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "usage_estimated": ctx.extra.get("usage_estimated", False),
            "completion_tokens": usage.completion_tokens if usage else None,
        }
        if "pii_ms" in ctx.extra:  # time spent scrubbing, and what was found (counts, never values)
            line["pii_ms"] = ctx.extra["pii_ms"]
            line["pii_entities"] = pii.counts if pii is not None else None
        if error is not None or ctx.error_code:
            line["error_code"] = ctx.error_code
            line["error"] = excerpt(error.message, 512) if error is not None else None
        access_log.write(line)
