"""The admit and account stages: rate limits and budget reservations before the call, the true
cost, alerts and the audit record after it — one Redis round trip each.

``admit`` refuses with 429 ``rate_limit_exceeded`` (retry-after, x-ratelimit-* headers) or 429
``insufficient_quota`` (``x-should-retry: false``, so the OpenAI SDK does not retry).
``settle`` always runs, for refused and failed requests too, and appends the request's audit
record to the ledger stream in the same script that settles its budgets; ledger.py moves the
records to PostgreSQL.
"""

from __future__ import annotations

import logging
import time

import orjson
from redis.exceptions import NoScriptError, RedisError

from core.config import Config, Limit
from core.errors import PermissionDenied, QuotaExceeded, RateLimited, ServiceUnavailable
from core.fastredis import PipelinedRedis
from core.http import header_text
from core.tokens import approx_prompt
from core.types import RequestContext, Usage
from policies import scripts
from policies.budgets import NANO, Budget, BudgetCache
from policies.credit import LEASE_TTL_MS, Credit, leases_key

log = logging.getLogger("gateway.policies")

LEDGER_STREAM = "gw:{gw}:ledger"
ALERT_STREAM = "gw:{gw}:alerts"
MINUTE_MS = 60_000
MAX_ATTRIBUTION = 200  # characters of a user, agent, workflow or customer a request is attributed to
MAX_TAG = 100  # characters of a tag
MAX_TAGS = 20  # distinct tags a request is attributed to
# Entries of ``metadata.tags`` (a list, or a comma-separated string) and of ``x-gateway-labels``
# looked at: a body of millions of them held the event loop for a second, for 20 that count.
SCANNED_TAGS = 1000


def _text(value, limit: int) -> str:
    """A client's value as attribution text, at most ``limit`` characters: an object or array as
    its JSON (in C: its ``str`` walked a body of megabytes in Python, a second of the event loop)."""
    if isinstance(value, str):
        return value[:limit]
    if isinstance(value, bool | int | float) or value is None:
        return str(value)[:limit]
    try:
        return orjson.dumps(value)[: limit * 4].decode("utf-8", "ignore")[:limit]
    except orjson.JSONEncodeError:  # (not what a parsed body holds)
        return ""


def _split_tags(text: str) -> list[str]:
    return [t.strip() for t in text.split(",", SCANNED_TAGS)[:SCANNED_TAGS] if t.strip()]


def attribution(ctx: RequestContext, scope_headers: dict[bytes, bytes]) -> dict:
    """Who spends: tenant and key from the caller's identity; user, agent, workflow, customer
    and free tags from the body (``user``, ``metadata``) or ``x-gateway-*`` headers (UTF-8, or
    latin-1 when not: ``core.http.header_text``)."""
    ident = ctx.identity
    body = ctx.body if isinstance(ctx.body, dict) else {}
    meta = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}

    def pick(field: str, header: bytes) -> str | None:
        value = scope_headers.get(header)
        if value:
            return header_text(value)[:MAX_ATTRIBUTION]
        value = meta.get(field)
        return _text(value, MAX_ATTRIBUTION) if value is not None and value != "" else None

    user = scope_headers.get(b"x-gateway-user")
    tags = meta.get("tags")
    if isinstance(tags, str):
        tags = _split_tags(tags)
    elif isinstance(tags, list):
        tags = tags[:SCANNED_TAGS]
    else:
        tags = []
    header_tags = scope_headers.get(b"x-gateway-labels")
    if header_tags:
        tags = [*tags, *_split_tags(header_text(header_tags))]
    return {
        "tenant": ident.tenant if ident else None,
        "key": ident.key_id if ident else None,
        "user": header_text(user)[:MAX_ATTRIBUTION]
        if user
        else (str(body["user"])[:MAX_ATTRIBUTION] if body.get("user") else None),
        "agent": pick("agent", b"x-gateway-agent"),
        "workflow": pick("workflow", b"x-gateway-workflow"),
        "customer": pick("customer", b"x-gateway-customer"),
        "tags": list(dict.fromkeys(_text(t, MAX_TAG) for t in tags))[
            :MAX_TAGS
        ],  # each once: a tag's budget counts once
    }


ATTRIBUTION_FIELDS = ("user", "agent", "workflow", "customer", "tags")


def attribution_refusal(allowed: dict | None, attr: dict) -> tuple[str, str] | None:
    """(field, value) of the first attribution value the key may not assert, else None.

    ``allowed`` maps a field to the values the key may assert: exact names, or a prefix ending
    in ``*``. Without this, any key holder could charge its requests to another customer's
    budget, or dodge its own by naming a customer that has none.
    """
    if not allowed:
        return None
    for name, patterns in allowed.items():
        if name not in ATTRIBUTION_FIELDS or patterns is None:
            continue
        values = (attr.get(name) or ()) if name == "tags" else ([attr[name]] if attr.get(name) else [])
        for value in values:
            if not any(value == p or (p.endswith("*") and value.startswith(p[:-1])) for p in patterns):
                return name, value
    return None


def fill_fixed_attribution(allowed: dict, attr: dict) -> None:
    """A field the key may assert exactly one value for is that value when the request leaves it
    out, so leaving it out cannot dodge that value's budget."""
    for name, patterns in allowed.items():
        if name in ("user", "agent", "workflow", "customer") and not attr.get(name):
            if isinstance(patterns, list) and len(patterns) == 1 and not patterns[0].endswith("*"):
                attr[name] = patterns[0]


_LOW_DETAIL_IMAGE = 85  # an image as core.tokens counts it
_TEXT_PARTS = ("text", "refusal")  # parts core.tokens counts by their text


def media_tokens(body: dict, per_part: int) -> int:
    """Prompt tokens beyond what ``core.tokens.count_prompt`` counts for a chat request's media
    parts (it counts an image as a low-detail one, 85 tokens, and other media as nothing):
    ``per_part`` for each part that is not text — an image, audio, a file, and the kinds
    OpenAI-compatible servers add (vLLM: ``video_url``, ``audio_url``, ``image_embeds``). An
    image marked ``detail: low`` too: 85 is what OpenAI's gpt-4o bills for one, but gpt-4o-mini
    bills 2,833, and Anthropic has no such setting (the translation drops it; Claude bills an
    image by its size, up to ~1,600)."""
    extra = 0
    for msg in body.get("messages") or ():
        content = msg.get("content") if isinstance(msg, dict) else None
        for part in content if isinstance(content, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image_url":
                extra += max(0, per_part - _LOW_DETAIL_IMAGE)
            elif kind not in _TEXT_PARTS:
                extra += per_part
    return extra


def cost_usd(route, usage: Usage | None) -> float:
    """What the call cost, from the deployment's prices (config overrides, else the price map)."""
    if route is None or usage is None:
        return 0.0
    dep = route.state
    inp = dep.input_cost or 0.0
    out = dep.output_cost or 0.0
    return usage.prompt_tokens * inp + usage.completion_tokens * out


def _member(ctx: RequestContext) -> str:
    """What names a reservation in Redis: the gateway's own request id (never the caller's) and
    the model call of the turn."""
    return f"{ctx.request_id}:{ctx.step}"


def input_bytes(body: dict) -> int:
    """The UTF-8 bytes of an embeddings or rerank request's texts (and the length of token
    arrays): no tokenizer that falls back to bytes makes more tokens of them."""
    total = 3
    inp = body.get("input")
    texts = [inp] if isinstance(inp, str) else []
    for item in inp if isinstance(inp, list) else ():
        if isinstance(item, str):
            texts.append(item)
        else:
            total += len(item) if isinstance(item, list) else 1
    if isinstance(body.get("query"), str):
        texts.append(body["query"])
    docs = body.get("documents")
    for doc in docs if isinstance(docs, list) else ():
        texts.append(doc.get("text") if isinstance(doc, dict) else doc)
    return total + sum(len(t.encode("utf-8", "surrogatepass")) for t in texts if isinstance(t, str))


class PolicyEngine:
    def __init__(self, config: Config, redis: PipelinedRedis, budgets: BudgetCache, router) -> None:
        self.config = config
        self.limits = config.limits
        self._redis = redis
        self.budgets = budgets
        self._router = router
        self._threshold_args: dict[tuple, str] = {}  # thresholds -> the script's argument
        self._prices: dict[str, tuple[float, float]] = {}  # group -> highest (input, output) price
        self._admit_sha: str | None = None
        self._settle_sha: str | None = None
        p = config.policies
        self.credit = Credit(redis, p.lease_requests, p.lease_headroom) if p.local_admission else None
        self._hold_ms = int(p.reservation_hold_s * 1000)

    async def start(self) -> None:
        try:
            self._admit_sha = await self._redis.script_load(scripts.ADMIT)
            self._settle_sha = await self._redis.script_load(scripts.SETTLE)
        except BaseException:  # the connection the first load opened: closed, not left open
            await self._redis.close()
            raise
        if self.credit is not None:
            self.credit.start()

    async def close(self) -> None:
        if self.credit is not None:
            await self.credit.stop()
        await self._redis.close()

    def _unreachable(self, exc: RedisError, doing: str) -> None:
        """Redis cannot check limits: go on without them (``policies.fail_open``) or refuse (503)."""
        if not self.config.policies.fail_open:
            raise ServiceUnavailable(
                "The gateway cannot check limits and budgets right now.", code="policy_store_unavailable"
            ) from None
        log.warning("policy store unreachable, %s without limits: %s", doing, exc)

    async def _run(self, name: str, argv: list, now: bool = False) -> list:
        sha = self._admit_sha if name == "admit" else self._settle_sha
        try:
            return await self._redis.evalsha(sha, 0, *argv, now=now)
        except NoScriptError:  # the server restarted and forgot the script
            sha = await self._redis.script_load(scripts.ADMIT if name == "admit" else scripts.SETTLE)
            if name == "admit":
                self._admit_sha = sha
            else:
                self._settle_sha = sha
            return await self._redis.evalsha(sha, 0, *argv)

    # ---- limits that apply to a request -----------------------------------------------------
    def _rate_limits(self, ctx: RequestContext, attr: dict) -> list[tuple[str, str, int]]:
        """(scope label, counter base, limit) for requests and tokens per minute."""
        out: list[tuple[str, str, Limit]] = []
        ident = ctx.identity
        key_limit = ident.limits if ident is not None and ident.limits is not None else self.limits.key
        if attr["key"]:
            out.append(("key", f"key:{attr['key']}", key_limit))
            for minter, limit in ident.shared_limits if ident is not None else ():
                out.append(("minting key", f"key:{minter}", limit if limit is not None else self.limits.key))
        # the tenant's name carries its length: a tenant named "acme" whose client says it is user
        # "x:alice" never counts in (or fills) tenant "acme:x"'s user "alice"'s window
        tenant_tag = f"{len(attr['tenant'] or '')}:{attr['tenant']}"
        if attr["user"] and (self.limits.user.rpm or self.limits.user.tpm):
            out.append(("user", f"user:{tenant_tag}:{attr['user']}", self.limits.user))
        tenant = self.limits.tenant.get(attr["tenant"] or "")
        if tenant is not None:
            out.append(("tenant", f"tenant:{attr['tenant']}", tenant))
        model = self.limits.model.get(ctx.model)
        if model is not None:
            out.append(("model", f"model:{ctx.model}", model))
        agent = attr.get("agent") if ctx.agent is not None else None
        if agent:
            limit = self.limits.agent.get(agent)
            if limit is not None:
                out.append(("agent", f"agent:{tenant_tag}:{agent}", limit))
            if attr["user"] and (self.limits.agent_user.rpm or self.limits.agent_user.tpm):
                out.append(("agent user", f"agent-user:{tenant_tag}:{agent}:{attr['user']}", self.limits.agent_user))
        flat = []
        for label, base, limit in out:
            if limit.rpm:
                flat.append((f"{label} requests", f"gw:{{gw}}:rl:{base}:r", limit.rpm))
            if limit.tpm:
                flat.append((f"{label} tokens", f"gw:{{gw}}:rl:{base}:t", limit.tpm))
        return flat

    def reachable_prices(self, model: str) -> tuple[float, float]:
        """The highest (input, output) price per token of any deployment a request for
        ``model`` could be served by: the targets of its rules, and every fallback chain of
        each (fallbacks, context-window and content-policy fallbacks)."""
        found = self._prices.get(model)
        if found is not None:
            return found
        groups = self._router.groups
        start = groups.get(model)
        seen: set[str] = set()
        todo = [start] if start is not None else []
        inp = out = 0.0
        while todo:
            group = todo.pop()
            if group.model.name in seen:
                continue
            seen.add(group.model.name)
            for d in group.deployments:
                inp = max(inp, d.input_cost or 0.0)
                out = max(out, d.output_cost or 0.0)
            m = group.model
            names = [r.use for r in m.rules]
            names += [*m.fallbacks, *m.context_window_fallbacks, *m.content_policy_fallbacks]
            todo += [groups[n] for n in names if n in groups and n not in seen]
        found = self._prices[model] = (inp, out)
        return found

    def _estimate_nano(self, ctx: RequestContext, hard: bool) -> tuple[int, int]:
        """(the reservation, its prompt part) in nano-USD. The reservation: prompt tokens plus the
        most the answers may use (``n`` of them), at the highest price the request could be
        served at (which deployment will serve it, after rules and fallbacks, is not known yet).

        Under a *hard* budget the reservation must be an upper bound, so the prompt of a chat
        request is counted exactly (tiktoken; the character estimate can be fooled by text in
        tool-call arguments or scripts that take more tokens per character) and a request that
        names no output limit is given one: ``max_completion_tokens`` =
        ``policies.default_max_output``, the amount reserved. Otherwise the cheap estimate does."""
        inp, out = self.reachable_prices(ctx.model)
        if not inp and not out:
            return 0, 0
        if hard and ctx.endpoint == "chat":  # (counted already, or not: the schema on top either way)
            prompt = ctx.prompt_tokens() + approx_prompt({"tools": ctx.body.get("response_format")})
            prompt += media_tokens(ctx.body, self.config.policies.media_part_tokens)  # images, audio, files
        elif ctx._prompt_tokens is not None:
            prompt = ctx._prompt_tokens
        else:
            prompt = approx_prompt(ctx.body)  # no tokenizing on the hot path otherwise
        prompt += ctx.grow_tokens  # what the prompt gains once admitted (an agent's sources)
        if ctx.endpoint != "chat":
            if hard:  # an upper bound: "a a a" or emoji take more tokens than a third of their characters
                prompt = max(prompt, input_bytes(ctx.body))
            return round(prompt * inp * NANO), round(prompt * inp * NANO)
        max_out = ctx.max_output or self.config.policies.default_max_output
        if hard and not ctx.max_output and isinstance(ctx.body, dict):
            ctx.body["max_completion_tokens"] = ctx.max_output = max_out
        n = ctx.body.get("n") if isinstance(ctx.body, dict) else None
        choices = n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1
        return round((prompt * inp + choices * max_out * out) * NANO), round(prompt * inp * NANO)

    # ---- the two round trips -----------------------------------------------------------------
    async def admit(self, ctx: RequestContext, attr: dict) -> None:
        ident = ctx.identity
        if ident is not None and ident.attribution:
            fill_fixed_attribution(ident.attribution, attr)
            refused = attribution_refusal(ident.attribution, attr)
            if refused is not None:
                field, value = refused
                raise PermissionDenied(
                    f"This API key may not attribute requests to {field} {value[:64]!r}.",
                    param=f"metadata.{field}",
                    code="attribution_not_allowed",
                )
        rates = self._rate_limits(ctx, attr)
        budgets = self.budgets.applicable(attr)
        ctx.extra["budgets"] = budgets
        if not rates and not budgets:
            return
        hard = any(b.enforcement == "hard" for b in budgets)
        estimate, floor = self._estimate_nano(ctx, hard) if budgets else (0, 0)
        ctx.extra["reserved_nano"] = estimate
        ctx.extra["reservation_unknown"] = False
        now_ms = int(time.time() * 1000)
        slot = now_ms // MINUTE_MS
        keys = ctx.extra["budget_keys"] = [b.keys() for b in budgets]  # settled there, past midnight too
        credit = self.credit
        # Credit only when every limit can lend some: request counts large enough to share, and
        # budgets (the script decides by their headroom); a tokens-per-minute check needs the window.
        leasing = credit is not None and all(
            label.endswith("requests") and credit.rate_lease(limit) > 0 for label, _, limit in rates
        )
        lease_keys = [credit.lease_keys(k[1]) for k in keys] if leasing else []
        if leasing and credit.take(
            slot,
            [(base, limit) for _, base, limit in rates],
            [(own, b.limit_nano) for (_, own), b in zip(lease_keys, budgets, strict=True)],
            estimate,
        ):
            ctx.extra["admitted"] = True
            ctx.extra["leased"] = [own for _, own in lease_keys]
            return
        argv: list = [now_ms, len(rates)]
        for label, base, limit in rates:
            cost = 1 if label.endswith("requests") else 0
            # a lease only where this process has no credit left (a window shared by many keys or
            # end users is not leased again, and its credit thrown away, by each of them)
            lease = credit.rate_lease(limit) if leasing and not credit.has_rate(base, slot, limit) else 0
            argv += [base, limit, MINUTE_MS, cost, lease]
        argv.append(len(budgets))
        asking = []
        for i, b in enumerate(budgets):
            spent, reserved, alert_prefix, ttl = keys[i]
            hard = "1" if b.enforcement == "hard" else "0"
            argv += [spent, reserved, b.limit_nano, estimate, ttl, alert_prefix, self._thresholds(b), b.id, hard]
            if leasing and credit.asking_now(lease_keys[i][1]):  # counted as Redis has it
                argv += [lease_keys[i][0], "", 0, 0]
            elif leasing and b.limit_nano - estimate < credit.headroom * max(estimate, 1) * credit.lease_requests:
                # a budget too small ever to lend this lease is not asked for one: an ask on its way
                # is counted as held (the renewer writes it), and would hold it for nothing
                argv += [lease_keys[i][0], "", 0, 0]
            elif leasing:
                leases, own = lease_keys[i]
                lease = max(estimate, 1) * credit.lease_requests
                asking.append((i, own, estimate + lease))
                argv += [leases, own, lease, credit.asking(leases, own, estimate + lease)]
            else:  # no lease asked for, but every replica's leases of the budget are counted
                argv += [leases_key(reserved), "", 0, 0]
        argv += [LEASE_TTL_MS, credit.headroom if credit is not None else 0, ALERT_STREAM, _member(ctx), self._hold_ms]
        argv.append(floor)  # what the request costs at the least: its prompt
        try:
            result = await self._run("admit", argv)
        except RedisError as exc:
            for _, own, asked in asking:
                credit.answered(own, 0, 0, asked)
            # Redis may have run the script and its reply been lost (a timeout): the settle releases
            # the reservation if it is there (SETTLE releases only a member of ``reserved:exp``), else
            # it would hold the budget until its hold ends. A spooled settlement releases it if it is
            # there too, and counts the cost either way.
            ctx.extra["reservation_unknown"] = True
            self._unreachable(exc, "serving")
            return
        if int(result[0]) == 1:
            ctx.extra["admitted"] = True
            if leasing:
                for i, (_, base, limit) in enumerate(rates):
                    if int(result[1 + i]):
                        credit.granted_rate(base, slot, int(result[1 + i]), limit)
                leased = []
                for i, own, asked in asking:
                    granted = int(result[1 + len(rates) + i])
                    credit.answered(own, granted, estimate if granted else 0, asked, budgets[i].limit_nano)
                    if granted:
                        leased.append(own)
                if leased:  # these budgets hold the request's estimate in the lease, not in reserved
                    ctx.extra["leased"] = leased
            return
        for _, own, asked in asking:
            credit.answered(own, 0, 0, asked)
        ctx.extra["reserved_nano"] = 0
        kind, index, retry_ms = result[1], int(result[2]) - 1, int(result[3])
        kind = kind.decode() if isinstance(kind, bytes) else kind
        retry = str(max(1, -(-retry_ms // 1000)))
        if kind == "rate":
            label, _, limit = rates[index]
            raise RateLimited(
                f"Rate limit reached: {label} per minute (limit {limit}). Retry after {retry} s.",
                headers={
                    "retry-after": retry,
                    f"x-ratelimit-limit-{'tokens' if 'tokens' in label else 'requests'}": str(limit),
                    f"x-ratelimit-remaining-{'tokens' if 'tokens' in label else 'requests'}": "0",
                    f"x-ratelimit-reset-{'tokens' if 'tokens' in label else 'requests'}": f"{retry}s",
                },
            )
        if len(result) > 4:
            from policies.alerts import fired

            fired(result[4:])
        budget = budgets[index]
        what = f"the {budget.period} budget of {budget.limit_usd:g} USD for {budget.scope} '{budget.scope_value}'"
        if kind == "reserved":
            raise RateLimited(
                f"Budget busy: what is left of {what} is reserved by requests in flight. Retry after {retry} s.",
                code="budget_reserved",
                headers={"retry-after": retry},
            )
        if kind == "short":
            raise QuotaExceeded(
                f"Budget nearly used up: what is left of {what} cannot cover this request, which could cost "
                f"up to {estimate / NANO:.6g} USD; lower max_tokens (or n)."
            )
        if kind == "oversized":
            raise QuotaExceeded(
                f"This request could cost up to {estimate / NANO:.6g} USD, more than {what}; lower max_tokens (or n).",
                code="budget_too_small",
            )
        raise QuotaExceeded(f"Budget exceeded: {what} is used up.")

    async def admit_replay(self, ident) -> None:
        """A stored answer replayed for an Idempotency-Key (gateway/idempotency.py): no model call
        and no cost, but a request all the same. It counts in the caller's requests-per-minute
        windows — its key's, the keys' that minted it, its tenant's — and is refused with 429 when
        one is full, so replays are no unmetered way to fetch stored answers. One round trip."""
        if not self.config.policies.enabled:
            return
        limits = [("key", ident.key_id, ident.limits if ident.limits is not None else self.limits.key)]
        for minter, limit in ident.shared_limits:
            limits.append(("minting key", minter, limit if limit is not None else self.limits.key))
        rates = [(f"{label} requests", f"gw:{{gw}}:rl:key:{who}:r", lim.rpm) for label, who, lim in limits if lim.rpm]
        tenant = self.limits.tenant.get(ident.tenant or "")
        if tenant is not None and tenant.rpm:
            rates.append(("tenant requests", f"gw:{{gw}}:rl:tenant:{ident.tenant}:r", tenant.rpm))
        if not rates:
            return
        argv: list = [int(time.time() * 1000), len(rates)]
        for _, base, limit in rates:
            argv += [base, limit, MINUTE_MS, 1, 0]
        argv += [0, LEASE_TTL_MS, 0, ALERT_STREAM, "", 0]  # no budgets: a replay costs nothing
        try:
            result = await self._run("admit", argv)
        except RedisError as exc:
            self._unreachable(exc, "replaying")
            return
        if int(result[0]) == 1:
            return
        label, _, limit = rates[int(result[2]) - 1]
        retry = str(max(1, -(-int(result[3]) // 1000)))
        raise RateLimited(
            f"Rate limit reached: {label} per minute (limit {limit}). Retry after {retry} s.",
            headers={
                "retry-after": retry,
                "x-ratelimit-limit-requests": str(limit),
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": f"{retry}s",
            },
        )

    def _thresholds(self, b: Budget) -> str:
        key = b.thresholds
        found = self._threshold_args.get(key)
        if found is None:
            found = self._threshold_args[key] = ",".join(f"{t:g}" for t in (key or self.config.alerts.thresholds))
        return found

    def record(self, ctx: RequestContext, attr: dict, elapsed: float, cost: float) -> dict:
        usage = ctx.usage or Usage()
        route = ctx.route
        rec = {
            "request_id": ctx.request_id,
            "client_request_id": ctx.client_request_id,
            "ts": time.time(),
            **{k: attr.get(k) for k in ("tenant", "user", "agent", "workflow", "customer")},
            "key_id": attr.get("key"),
            "tags": attr.get("tags") or [],
            "endpoint": ctx.endpoint,
            "model": ctx.model or None,
            "served_model": route.model if route else None,
            "provider": route.provider if route else None,
            "deployment": route.deployment if route else None,
            "attempts": ctx.attempts,
            "fallbacks": ctx.fallbacks,
            "stream": ctx.stream,
            "status": ctx.status,
            "error_code": ctx.error_code,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "cached_tokens": usage.cached_tokens,
            "usage_estimated": bool(ctx.extra.get("usage_estimated")),
            "cost_usd": cost,
            "latency_ms": round(elapsed * 1000, 3),
            "ttft_ms": round(ctx.ttft * 1000, 3) if ctx.ttft is not None else None,
            "step": ctx.step,
        }
        turn = ctx.agent
        if turn is not None:  # runtime.types.Turn
            rec["prompt_version"] = turn.selection.version.version
            rec["variant"] = turn.selection.variant
            rec["conversation_id"] = turn.conversation_id
        pii = ctx.extra.get("pii")
        if pii is not None and pii.counts:
            rec["pii_entities"] = pii.counts
        if self.config.policies.log_content and isinstance(ctx.body, dict):
            body = self._logged_body(ctx.body, pii)
            if body is not None:
                rec["content"] = body.get("messages") or body.get("input")
        return rec

    def _logged_body(self, body: dict, pii) -> dict | None:
        """What content logging may keep of a request: the body as it last left, scrubbed. With
        PII scrubbing configured, a request that sent nothing (refused at the scrub, or before it,
        or scrubbed for no attempt) keeps none: its body was never checked, or failed the check."""
        if pii is not None:
            return pii.sent
        return None if self.config.pii.enabled else body

    async def charge(self, attr: dict, cost_usd: float) -> list:
        """Spend that happened outside a request (a VAPI call's telephony, known from its
        end-of-call report): counted in every budget ``attr`` falls under, alerting as settle
        does, so hard budgets refuse the requests that follow. Writes no ledger record (the
        caller writes its own, once) and reserves nothing. Returns the alerts fired."""
        actual = round(cost_usd * NANO)
        budgets = self.budgets.applicable(attr)
        if actual <= 0 or not budgets:
            return []
        argv: list = [len(budgets)]
        for b in budgets:
            spent, _reserved, alert_prefix, ttl = b.keys()
            argv += [spent, actual, b.limit_nano, ttl, alert_prefix, self._thresholds(b), b.id]
        argv.append(ALERT_STREAM)
        sha = getattr(self, "_charge_sha", None) or await self._redis.script_load(scripts.CHARGE)
        try:
            fired = await self._redis.evalsha(sha, 0, *argv)
        except NoScriptError:  # the server restarted and forgot the script
            sha = await self._redis.script_load(scripts.CHARGE)
            fired = await self._redis.evalsha(sha, 0, *argv)
        self._charge_sha = sha
        return fired

    def spooled(self, ctx: RequestContext, attr: dict, elapsed: float) -> bytes:
        """The audit record of a request whose settle Redis did not take, for the local spool:
        with what the settle would have done to budgets (``_settle``), so the spool's replay
        counts the spend and releases the reservation (policies/ledger.py, ``SETTLE_LATE``)."""
        rec = self.record(ctx, attr, elapsed, cost_usd(ctx.route, ctx.usage))
        if "settlement" in ctx.extra:
            rec["_settle"] = ctx.extra["settlement"]
        return orjson.dumps(rec)

    async def settle(self, ctx: RequestContext, attr: dict, elapsed: float, now: bool = False) -> list:
        """Releases the reservation, adds the cost and appends the audit record, in one round
        trip. ``now``: the command is written to Redis before this coroutine first yields."""
        cost = cost_usd(ctx.route, ctx.usage)
        actual = round(cost * NANO)
        budgets: list[Budget] = ctx.extra.get("budgets") or []
        reserved = ctx.extra.get("reserved_nano", 0)
        leased = ctx.extra.pop("leased", ())
        # The period the request was admitted in: its reservation or lease is released there, and
        # its cost counted there (where the room for it was checked), should the period have ended.
        keys = ctx.extra.get("budget_keys")
        if keys is None or len(keys) != len(budgets):
            keys = [b.keys() for b in budgets]
        member = _member(ctx)
        ctx.extra.pop("settlement", None)  # (an earlier step's, settled)
        argv: list = [int(time.time() * 1000), member, len(budgets)]
        late: list = []  # what a settle that fails must still do (spooled with the record)
        for b, (spent, reserved_key, alert_prefix, ttl) in zip(budgets, keys, strict=True):
            held = reserved
            if leased and self.credit is not None:
                own = self.credit.lease_keys(reserved_key)[1]
                if own in leased:  # the estimate is in this process's lease: it leaves that
                    self.credit.settled(own, reserved)
                    held = 0
            argv += [spent, reserved_key, held, actual, b.limit_nano, ttl, alert_prefix, self._thresholds(b), b.id]
            # (a reservation the admit may not have made, as its negative: the replay releases it if it
            # is there and counts the cost either way)
            late.append([spent, reserved_key, -held if ctx.extra.get("reservation_unknown") else held, actual, ttl])
        if any(held or actual for _, _, held, actual, _ in late):  # (a refused request's has nothing to do)
            ctx.extra["settlement"] = [member, late]
        tokens = (ctx.usage.total_tokens if ctx.usage else 0) if ctx.extra.get("admitted") else 0
        token_limits = [(b, lim) for label, b, lim in self._rate_limits(ctx, attr) if label.endswith("tokens")]
        argv.append(len(token_limits))
        for base, _ in token_limits:
            argv += [base, MINUTE_MS, tokens]
        argv += [LEDGER_STREAM, orjson.dumps(self.record(ctx, attr, elapsed, cost)), ALERT_STREAM]
        return await self._run("settle", argv, now)
