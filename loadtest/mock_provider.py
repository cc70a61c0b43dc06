"""A mock LLM provider: a real HTTP server speaking OpenAI's and Anthropic's wire formats.

Deterministic replies (an echo of the last user message), injectable latency and faults, and a
record of every request it received. A plain ASGI app on uvicorn (httptools, uvloop), so it is
never the bottleneck of a benchmark.

Faults, per process (flags, or ``POST /_mock/config``) or per request, as a directive in the
last user message ``[[mock:{"status": 429, "retry_after": 2}]]`` or an ``x-mock`` header:

    status        answer with this HTTP error (provider-shaped body, 429 with retry-after
                  and x-ratelimit-* headers)
    retry_after   seconds, for 429 / 503
    fail_rate     (process-wide) fraction of requests answered with fail_status,
                  deterministic: every 1/rate-th request fails
    delay_ms      time to first byte (overrides ttft_ms)
    chunk_ms      time between stream chunks;  chunks: number of content chunks
    hang          never answer (a timeout for the client)
    malformed     200 with a body that is not JSON (or a stream event that is not JSON)
    cut_after     drop the connection after this many stream chunks (or mid-body)
    error_after   end a stream with a provider-shaped error event after this many chunks
    message       the error message of ``status`` / ``error_after``
    logprob       the log-probability of every token (when the request asks for logprobs)
    reply         answer with exactly this text (instead of the echo)
    reply_words   answer with this many words, "w0 w1 ..." (a long answer to a short prompt)
    usage         fields merged into the answer's usage object as given (any JSON: a provider
                  that reports negative, huge or non-numeric counts)
    stall         a name: the answer stops (a stream after ``stall_after`` events, default 0,
                  its headers sent; a whole answer before its headers) until ``POST
                  /_mock/release {"key": <name>}``, or until the caller hangs up;
                  ``GET /_mock/stalls`` tells each name's state: waiting, released, or
                  hung_up (the caller closed the connection during the stall)
    ignore_max_tokens  true: answer in full whatever max_tokens / max_completion_tokens say
                  (its usage counts all of it), as a provider that ignores them
    raw           answer verbatim, whatever was asked: ``{"status": 200, "content_type":
                  "text/event-stream", "headers": {...}, "pieces": ["data: ...\\n\\n", ...],
                  "flood": <bytes>}``; ``flood`` then sends that many bytes of one endless
                  line (no event ever ends) in 64 KiB pieces, or of ``fill`` (an event,
                  repeated) when given (a provider answering garbage);
                  also process-wide through ``POST /_mock/config``

Tool calls. By default a request with ``tools`` is answered with a call of the first (or the
forced) tool, and a request whose last message is a tool result with ``tool result: <the
results>``. Directives choose instead (they sit in the last user message, so they hold for every
call of an agent's tool loop):

    tool_calls          [{"name": "get_weather", "arguments": {"city": "Paris"}}, ...]: answer
                        with exactly these calls (``arguments`` an object, or a string sent as
                        is, e.g. invalid JSON) when the last message is the user's; after tool
                        results, answer ``tool result: <each result, joined by " | ">``.
                        An empty list answers with text even when tools are offered.
    tool_calls_steps    [[calls of step 1], [calls of step 2], ...]: the calls of the n-th model
                        call since the user's message (steps counted by the assistant messages
                        with tool calls after it); text once the steps run out
    tool_calls_always   true: answer with the calls every time (a loop that never ends)

Ids of these calls are unique per response (``call_<n>_<i>``; Anthropic ``toolu_<n>_<i>``).

Inspection: ``GET /_mock/requests`` (recent requests: path, headers, body), ``DELETE`` clears
them; ``GET /_mock/stats``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import itertools
import re
import struct
import time
from collections import Counter, deque

import orjson

from loadtest import serve

_ERROR_KIND = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


class Cut(Exception):
    """Raised mid-response to drop the connection (uvicorn closes it)."""


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for p in content:
            if isinstance(p, dict):
                if p.get("type") == "text":
                    out.append(p.get("text", ""))
                elif p.get("type") == "tool_result":
                    out.append(_text(p.get("content")))
        return " ".join(out)
    return ""


def _split(items: list[str], n: int) -> list[str]:
    """``items`` joined into ``n`` non-empty pieces (fewer only if the text is shorter than n)."""
    n = max(1, n)
    if len(items) < n:
        items = list("".join(items)) or [""]
        n = min(n, len(items))
    size, extra = divmod(len(items), n)
    out, i = [], 0
    for k in range(n):
        step = size + (1 if k < extra else 0)
        out.append("".join(items[i : i + step]))
        i += step
    return out


def _tool_args(schema: dict | None, text: str) -> dict:
    props = (schema or {}).get("properties") or {}
    args = {}
    for name, spec in props.items():
        kind = spec.get("type") if isinstance(spec, dict) else None
        args[name] = {"integer": 1, "number": 1.5, "boolean": True, "array": [], "object": {}}.get(kind, text[:200])
    return args


def _directive_span(text: str) -> tuple[int, int, dict] | None:
    """Where the first ``[[mock:{...}]]`` directive in ``text`` is, and its JSON. The JSON may
    itself contain ``]]`` (nested lists of tool calls), so each ``}]]`` after the opening is
    tried until one parses."""
    start = text.find("[[mock:{")
    if start < 0:
        return None
    body = start + len("[[mock:")
    end = text.find("}]]", body)
    while end >= 0:
        try:
            found = orjson.loads(text[body : end + 1])
        except orjson.JSONDecodeError:
            end = text.find("}]]", end + 1)
            continue
        return (start, end + 3, found) if isinstance(found, dict) else None
    return start, len(text), orjson.loads(text[body:])  # unterminated: the error says what is wrong


def _directive(text: str) -> dict | None:
    span = _directive_span(text)
    return span[2] if span else None


def _without_directive(text: str) -> str:
    span = _directive_span(text)
    return text if span is None else text[: span[0]] + text[span[1] :]


def _trailing_results(messages: list) -> list[str]:
    """The tool results at the end of the conversation (OpenAI tool messages, or the
    tool_result blocks of an Anthropic user message), in order."""
    out: list[str] = []
    for m in reversed(messages):
        if not isinstance(m, dict):
            break
        if m.get("role") == "tool":
            out.append(_text(m.get("content")))
            continue
        content = m.get("content")
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "tool_result" for p in content):
            out.extend(reversed([_text(p.get("content")) for p in content if p.get("type") == "tool_result"]))
        break
    return list(reversed(out))


def _directed_calls(plan: dict, messages: list, last_is_result: bool) -> list | None:
    """The calls a tool directive asks for now: a list (perhaps empty: answer with text), or
    None when there is no tool directive."""
    if "tool_calls_steps" in plan:
        steps = plan["tool_calls_steps"] or []
        done = 0
        for m in reversed(messages):
            if not isinstance(m, dict):
                continue
            if m.get("role") == "user" and not _is_results(m):
                break
            if m.get("role") == "assistant" and (
                m.get("tool_calls")
                or (isinstance(m.get("content"), list) and any(p.get("type") == "tool_use" for p in m["content"]))
            ):
                done += 1
        wanted = steps[done] if done < len(steps) else []
    elif "tool_calls" in plan:
        wanted = plan["tool_calls"] or []
        if last_is_result and not plan.get("tool_calls_always"):
            wanted = []
    else:
        return None
    calls = []
    for call in wanted if isinstance(wanted, list) else []:
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            args = call.get("arguments", {})
            calls.append((call["name"], args if isinstance(args, dict | str) else {}))
    return calls


def _only_results(message: dict) -> bool:
    """An Anthropic user message that carries nothing but tool results (not the user's words)."""
    content = message.get("content")
    return (
        isinstance(content, list)
        and bool(content)
        and all(isinstance(p, dict) and p.get("type") == "tool_result" for p in content)
    )


def _is_results(message: dict) -> bool:
    content = message.get("content")
    return isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "tool_result" for p in content)


class Mock:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.cfg = {
            "ttft_ms": opts.ttft_ms,
            "chunk_ms": opts.chunk_ms,
            "chunks": opts.chunks,
            "fail_rate": opts.fail_rate,
            "fail_status": opts.fail_status,
            "fail_code": opts.fail_code,
            "cut_after": opts.cut_after,
            "retry_after": opts.retry_after,
            "rpm": opts.rpm,
            "api_keys": [k for k in (opts.api_keys or "").split(",") if k],
            "record": not opts.no_record,
            "dims": opts.dims,
            "raw": None,
        }
        self.requests: deque = deque(maxlen=2000)
        self.stats: Counter = Counter()
        self._seq = itertools.count()
        self._window: dict[str, list] = {}
        self._ids = itertools.count(1)
        self.stalls: dict[str, str] = {}  # stall name -> waiting | released | hung_up
        self._releases: dict[str, asyncio.Event] = {}

    # ---- ASGI -------------------------------------------------------------------------
    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path, method = scope["path"], scope["method"]
        headers = {k.decode(): v.decode("latin-1") for k, v in scope["headers"]}
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        if path == "/health":
            return await self._json(send, 200, {"status": "ok"})
        if path.startswith("/_mock/"):
            return await self._control(send, path, method, body)
        if path == "/v1/models":
            data = [
                {"id": m, "object": "model", "created": 0, "owned_by": "mock"} for m in ("mock-gpt", "mock-embedding")
            ]
            return await self._json(send, 200, {"object": "list", "data": data})
        handler = {
            "/v1/chat/completions": self._chat,
            "/v1/embeddings": self._embeddings,
            "/v1/messages": self._messages,
            "/v1/rerank": self._rerank,
        }.get(path)
        anthropic = path == "/v1/messages"
        if handler is None or method != "POST":
            return await self._error(send, 404, f"Unknown path {method} {path}", anthropic)
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError:
            return await self._error(send, 400, "body is not valid JSON", anthropic)
        if not isinstance(req, dict):
            return await self._error(send, 400, "body must be a JSON object", anthropic)
        if self.cfg["record"]:
            self.requests.append({"path": path, "headers": headers, "body": req, "ts": time.time()})
        plan = self._plan(req, headers)
        plan["_receive"] = receive  # (a stall watches for the caller hanging up)
        key = headers.get("x-api-key") if anthropic else headers.get("authorization", "").removeprefix("Bearer ")
        if not key:
            return await self._error(send, 401, "missing API key", anthropic)
        if self.cfg["api_keys"] and key not in self.cfg["api_keys"]:
            return await self._error(send, 401, "invalid API key", anthropic)
        if anthropic and "anthropic-version" not in headers:
            return await self._error(send, 400, "anthropic-version: header is required", anthropic)
        limits = self._rate(key)
        if isinstance(limits, float):  # over the per-key rpm: seconds until the window resets
            return await self._error(
                send, 429, "Rate limit reached for requests", anthropic, retry=max(1, round(limits))
            )
        status = plan.get("status")
        if status:
            return await self._error(
                send,
                int(status),
                plan.get("message", f"mock failure {status}"),
                anthropic,
                retry=plan.get("retry_after"),
                extra=limits,
                code=plan.get("code"),
            )
        if plan.get("hang"):
            await asyncio.sleep(3600)
        if isinstance(plan.get("raw"), dict):
            return await self._verbatim(send, plan["raw"])
        try:
            await handler(send, req, plan, limits)
        except Cut:
            self.stats["cut"] += 1
            raise

    async def _control(self, send, path: str, method: str, body: bytes) -> None:
        if path == "/_mock/requests":
            if method == "DELETE":
                self.requests.clear()
                return await self._json(send, 200, {"cleared": True})
            return await self._json(send, 200, {"requests": list(self.requests)})
        if path == "/_mock/config":
            if method == "POST":
                update = orjson.loads(body or b"{}")
                self.cfg.update({k: v for k, v in update.items() if k in self.cfg})
            return await self._json(send, 200, self.cfg)
        if path == "/_mock/stalls":
            return await self._json(send, 200, self.stalls)
        if path == "/_mock/release":
            key = str(orjson.loads(body or b"{}").get("key"))
            self._releases.setdefault(key, asyncio.Event()).set()
            return await self._json(send, 200, {"released": key})
        if path == "/_mock/stats":
            if method == "DELETE":
                self.stats.clear()
            return await self._json(send, 200, dict(self.stats))
        return await self._json(send, 404, {"error": "unknown control path"})

    # ---- faults and limits ----------------------------------------------------------------
    def _plan(self, req: dict, headers: dict) -> dict:
        plan: dict = {}
        rate = self.cfg["fail_rate"]
        if rate:
            i = next(self._seq)
            if int((i + 1) * rate) > int(i * rate):
                plan["status"] = self.cfg["fail_status"]
                plan["retry_after"] = self.cfg["retry_after"]
                if self.cfg["fail_code"]:
                    plan["code"] = self.cfg["fail_code"]
        if self.cfg["cut_after"] is not None:
            plan["cut_after"] = self.cfg["cut_after"]
        if self.cfg["raw"]:
            plan["raw"] = self.cfg["raw"]
        if "x-mock" in headers:
            plan.update(orjson.loads(headers["x-mock"]))
        msgs = req.get("messages")
        if isinstance(msgs, list):
            for m in reversed(msgs):
                if isinstance(m, dict) and m.get("role") == "user" and not _only_results(m):
                    found = _directive(_text(m.get("content")))
                    if found:
                        plan.update(found)
                    break
        return plan

    def _rate(self, key: str) -> dict | float:
        """Rate-limit headers for this key (none when unlimited), or seconds until its window resets."""
        rpm = self.cfg["rpm"]
        if not rpm:
            return {}
        now = time.monotonic()
        window = self._window.get(key)
        if window is None or now - window[0] >= 60:
            window = self._window[key] = [now, 0]
        window[1] += 1
        limit = rpm
        reset = max(0.0, 60 - (now - window[0]))
        if window[1] > rpm:
            return reset
        return {
            "x-ratelimit-limit-requests": str(limit),
            "x-ratelimit-remaining-requests": str(max(0, limit - window[1])),
            "x-ratelimit-reset-requests": f"{reset:.3f}s",
            "x-ratelimit-limit-tokens": "1000000",
            "x-ratelimit-remaining-tokens": "999000",
            "x-ratelimit-reset-tokens": "60ms",
        }

    async def _stall(self, plan: dict) -> bool:
        """Waits for ``POST /_mock/release`` of the plan's stall, or for the caller to hang up
        (False then: nothing more is to be sent)."""
        key = str(plan["stall"])
        release = self._releases.setdefault(key, asyncio.Event())
        self.stalls[key] = "waiting"
        receive = plan["_receive"]

        async def hangup() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        waits = [asyncio.ensure_future(release.wait()), asyncio.ensure_future(hangup())]
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        released = waits[0] in done
        self.stalls[key] = "released" if released else "hung_up"
        return released

    # ---- responses ------------------------------------------------------------------------
    @staticmethod
    def _hdrs(ctype: bytes, extra: dict | None) -> list:
        out = [(b"content-type", ctype)]
        for k, v in (extra or {}).items():
            out.append((k.encode(), str(v).encode()))
        return out

    async def _json(self, send, status: int, obj, extra: dict | None = None) -> None:
        body = orjson.dumps(obj)
        self.stats[str(status)] += 1
        headers = self._hdrs(b"application/json", extra)
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _error(self, send, status: int, message: str, anthropic: bool, retry=None, extra=None, code=None) -> None:
        kind = _ERROR_KIND.get(status, "api_error")
        headers = dict(extra or {})
        if retry is not None:
            headers["retry-after"] = str(retry)
        if status == 429:
            headers.update({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": f"{retry or 1}s"})
        if anthropic:
            body = {"type": "error", "error": {"type": kind, "message": message}}
        else:
            code = code or ("rate_limit_exceeded" if status == 429 else None)
            body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        await self._json(send, status, body, headers)

    async def _stream_start(self, send, plan: dict, limits: dict) -> None:
        headers = self._hdrs(b"text/event-stream", limits)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        self.stats["200"] += 1
        delay = plan.get("delay_ms", self.cfg["ttft_ms"])
        if delay:
            await asyncio.sleep(delay / 1000)

    async def _events(self, send, events: list[bytes], plan: dict, anthropic: bool = False) -> None:
        gap = plan.get("chunk_ms", self.cfg["chunk_ms"]) / 1000
        cut = plan.get("cut_after")
        error_after = plan.get("error_after")
        stall_at = plan.get("stall_after", 0) if plan.get("stall") is not None else None
        for i, ev in enumerate(events):
            if i == stall_at and not await self._stall(plan):
                return
            if cut is not None and i >= cut:
                raise Cut
            if error_after is not None and i >= error_after:
                message = plan.get("message", "mock stream error")
                if anthropic:
                    err = {"type": "error", "error": {"type": "api_error", "message": message}}
                    ev = b"event: error\ndata: " + orjson.dumps(err) + b"\n\n"
                else:
                    err = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
                    ev = b"data: " + orjson.dumps(err) + b"\n\n"
                await send({"type": "http.response.body", "body": ev, "more_body": True})
                break
            if plan.get("malformed") and i == 1:
                ev = b"data: {not json\n\n"
            await send({"type": "http.response.body", "body": ev, "more_body": True})
            if gap:
                await asyncio.sleep(gap)
        await send({"type": "http.response.body", "body": b""})

    async def _whole(self, send, obj: dict, plan: dict, limits: dict, pieces: int) -> None:
        if plan.get("stall") is not None and not await self._stall(plan):
            return
        delay = plan.get("delay_ms", self.cfg["ttft_ms"]) + pieces * plan.get("chunk_ms", self.cfg["chunk_ms"])
        if delay:
            await asyncio.sleep(delay / 1000)
        if plan.get("malformed"):
            return await self._raw(send, 200, b'{"id": "broken", "choices": [', limits)
        if plan.get("cut_after") is not None:
            body = orjson.dumps(obj)
            headers = [*self._hdrs(b"application/json", limits), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
            raise Cut
        await self._json(send, 200, obj, limits)

    async def _verbatim(self, send, raw: dict) -> None:
        ctype = str(raw.get("content_type", "text/event-stream")).encode()
        headers = self._hdrs(ctype, raw.get("headers"))
        status = int(raw.get("status", 200))
        self.stats[str(status)] += 1
        await send({"type": "http.response.start", "status": status, "headers": headers})
        for piece in raw.get("pieces") or ():
            await send({"type": "http.response.body", "body": str(piece).encode(), "more_body": True})
        left = int(raw.get("flood", 0))
        fill = str(raw.get("fill") or "a").encode()  # the flood: one endless line, or events repeated
        block = fill * max(1, 65536 // len(fill))
        while left > 0:
            await send({"type": "http.response.body", "body": block[: min(left, len(block))], "more_body": True})
            left -= len(block)
        await send({"type": "http.response.body", "body": b""})

    async def _raw(self, send, status: int, body: bytes, extra: dict) -> None:
        headers = [*self._hdrs(b"application/json", extra), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    # ---- what the model "says" --------------------------------------------------------------
    def _reply(self, req: dict, messages: list, tools: list | None, forced: str | None, plan: dict):
        last = messages[-1] if messages else {}
        user_text = ""
        for m in reversed(messages):
            if isinstance(m, dict) and m.get("role") == "user":
                user_text = _without_directive(_text(m.get("content"))).strip()
                break
        prompt_tokens = sum(len(_text(m.get("content")).split()) + 3 for m in messages if isinstance(m, dict))
        if isinstance(req.get("system"), str):
            prompt_tokens += len(req["system"].split())
        last_is_result = last.get("role") == "tool" or (
            isinstance(last.get("content"), list)
            and any(isinstance(p, dict) and p.get("type") == "tool_result" for p in last["content"])
        )
        directed = _directed_calls(plan, messages, last_is_result)
        if directed:
            return None, directed, prompt_tokens
        if directed is None and tools and forced != "none" and not last_is_result:
            tool = next((t for t in tools if t["name"] == forced), tools[0])
            return None, [(tool["name"], _tool_args(tool.get("schema"), user_text))], prompt_tokens
        if last_is_result:
            text = "tool result: " + " | ".join(_trailing_results(messages))
        else:
            text = "echo: " + (user_text or "(nothing)")
        if isinstance(plan.get("reply"), str):  # directive: answer with exactly this text
            text = plan["reply"]
        if isinstance(plan.get("reply_words"), int):  # directive: a long answer from a short prompt
            text = " ".join(f"w{i}" for i in range(plan["reply_words"]))
        fmt = req.get("response_format") or {}
        wants_json = (
            "JSON object" in _text(req.get("system"))
            if not isinstance(req.get("system"), str)
            else ("JSON object" in req["system"])
        )
        if fmt.get("type") in ("json_object", "json_schema") or wants_json:
            text = orjson.dumps({"echo": user_text}).decode()
        return text, [], prompt_tokens

    @staticmethod
    def _limit(text: str, stop, max_tokens) -> tuple[list[str], str]:
        finish = "stop"
        stops = [stop] if isinstance(stop, str) else (stop or [])
        for s in stops:
            if s and s in text:
                text = text[: text.index(s)]
        words = re.findall(r"\S+\s*", text) or [text]
        words = [w for w in words if w]
        if max_tokens and len(words) > max_tokens:
            words = words[:max_tokens]
            finish = "length"
        return words, finish

    # ---- OpenAI chat ------------------------------------------------------------------------
    async def _chat(self, send, req: dict, plan: dict, limits: dict) -> None:
        messages = req.get("messages") or []
        if req.get("metadata") is not None and req.get("store") is not True:  # as OpenAI answers it
            return await self._error(
                send, 400, "The 'metadata' parameter is only allowed when 'store' is enabled.", False
            )
        for i, t in enumerate(req.get("tools") or []):  # as OpenAI: a function without a name is a 400
            if (
                isinstance(t, dict)
                and isinstance(t.get("function"), dict)
                and not isinstance(t["function"].get("name"), str)
            ):
                return await self._error(send, 400, f"Missing required parameter: 'tools[{i}].function.name'.", False)
        tools = [
            {"name": t["function"]["name"], "schema": t["function"].get("parameters")}
            for t in req.get("tools") or []
            if isinstance(t, dict) and isinstance(t.get("function"), dict)
        ]
        choice = req.get("tool_choice")
        forced = (
            choice
            if isinstance(choice, str) and choice == "none"
            else (choice.get("function", {}).get("name") if isinstance(choice, dict) else None)
        )
        text, calls, prompt_tokens = self._reply(req, messages, tools, forced, plan)
        n = req.get("n") or 1
        chunks = plan.get("chunks", self.cfg["chunks"])
        cid = f"chatcmpl-mock{next(self._ids)}"
        created = int(time.time())
        model = req.get("model", "mock-gpt")
        fp = f"fp_mock_{req['seed']}" if req.get("seed") is not None else "fp_mock"
        limit = None if plan.get("ignore_max_tokens") else req.get("max_completion_tokens") or req.get("max_tokens")
        words, finish = self._limit(text or "", req.get("stop"), limit)
        if calls:
            finish = "tool_calls"
        completion_tokens = (len(words) if text is not None else 8) * n
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }
        if isinstance(plan.get("usage"), dict):  # directive: these usage fields, as given
            usage.update(plan["usage"])
        directed = "tool_calls" in plan or "tool_calls_steps" in plan
        seq = cid.removeprefix("chatcmpl-mock")
        tool_calls = [
            {
                "id": f"call_{seq}_{i}" if directed else f"call_mock{i}",
                "type": "function",
                "function": {"name": name, "arguments": args if isinstance(args, str) else orjson.dumps(args).decode()},
            }
            for i, (name, args) in enumerate(calls)
        ]
        logprobs = None
        if req.get("logprobs"):
            logprobs = {
                "content": [
                    {
                        "token": w,
                        "logprob": plan.get("logprob", -0.01 * (i + 1)),  # directive: a fixed (low) value
                        "bytes": list(w.encode()),
                        "top_logprobs": [],
                    }
                    for i, w in enumerate(words)
                ],
                "refusal": None,
            }
        if not req.get("stream"):
            message = {"role": "assistant", "content": "".join(words) if text is not None else None, "refusal": None}
            if tool_calls:
                message["tool_calls"] = tool_calls
            obj = {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "system_fingerprint": fp,
                "choices": [
                    {"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish} for i in range(n)
                ],
                "usage": usage,
            }
            return await self._whole(send, obj, plan, limits, chunks)
        include_usage = bool((req.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict, finish_reason=None, index=0, lp=None) -> bytes:
            obj = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": fp,
                "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}],
            }
            if include_usage:
                obj["usage"] = None
            return b"data: " + orjson.dumps(obj) + b"\n\n"

        events = []
        for i in range(n):
            events.append(chunk({"role": "assistant", "content": "", "refusal": None}, index=i))
        if tool_calls:
            for j, call in enumerate(tool_calls):
                args = call["function"]["arguments"]
                half = len(args) // 2
                events.append(
                    chunk(
                        {
                            "tool_calls": [
                                {
                                    "index": j,
                                    "id": call["id"],
                                    "type": "function",
                                    "function": {"name": call["function"]["name"], "arguments": ""},
                                }
                            ]
                        }
                    )
                )
                events.append(chunk({"tool_calls": [{"index": j, "function": {"arguments": args[:half]}}]}))
                events.append(chunk({"tool_calls": [{"index": j, "function": {"arguments": args[half:]}}]}))
        else:
            pieces = _split(list(words), chunks)
            for _k, piece in enumerate(pieces):
                for i in range(n):
                    lp = (
                        {
                            "content": [
                                {"token": piece, "logprob": -0.01, "bytes": list(piece.encode()), "top_logprobs": []}
                            ]
                        }
                        if logprobs
                        else None
                    )
                    events.append(chunk({"content": piece}, index=i, lp=lp))
        for i in range(n):
            events.append(chunk({}, finish, index=i))
        if include_usage:
            events.append(
                b"data: "
                + orjson.dumps(
                    {
                        "id": cid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "system_fingerprint": fp,
                        "choices": [],
                        "usage": usage,
                    }
                )
                + b"\n\n"
            )
        events.append(b"data: [DONE]\n\n")
        await self._stream_start(send, plan, limits)
        await self._events(send, events, plan)

    # ---- Anthropic messages ---------------------------------------------------------------------
    async def _messages(self, send, req: dict, plan: dict, limits: dict) -> None:
        for field, kind in (("model", str), ("max_tokens", int), ("messages", list)):
            if not isinstance(req.get(field), kind):
                return await self._error(send, 400, f"{field}: Field required", True)
        for i, m in enumerate(req["messages"]):
            if m.get("role") not in ("user", "assistant"):
                return await self._error(send, 400, f"messages.{i}.role: Input should be 'user' or 'assistant'", True)
            content = m.get("content")
            if isinstance(content, list):
                for block in content:
                    if block.get("type") == "text" and not block.get("text"):
                        return await self._error(send, 400, "messages: text content blocks must be non-empty", True)
        tools = [{"name": t["name"], "schema": t.get("input_schema")} for t in req.get("tools") or []]
        tc = req.get("tool_choice") or {}
        forced = "none" if tc.get("type") == "none" else tc.get("name")
        text, calls, prompt_tokens = self._reply(req, req["messages"], tools, forced, plan)
        limit = None if plan.get("ignore_max_tokens") else req["max_tokens"]
        words, finish = self._limit(text or "", req.get("stop_sequences"), limit)
        stop_reason = {"stop": "end_turn", "length": "max_tokens"}[finish]
        stop_seq = None
        for s in req.get("stop_sequences") or []:
            if text and s in text:
                stop_reason, stop_seq = "stop_sequence", s
        if calls:
            stop_reason = "tool_use"
        mid = f"msg_mock{next(self._ids)}"
        out_tokens = len(words) if text is not None else 8
        content = []
        if text is not None:
            content.append({"type": "text", "text": "".join(words)})
        directed = "tool_calls" in plan or "tool_calls_steps" in plan
        seq = mid.removeprefix("msg_mock")
        call_ids = [f"toolu_{seq}_{i}" if directed else f"toolu_mock{i}" for i in range(len(calls))]
        calls = [(name, args if isinstance(args, dict) else {}) for name, args in calls]
        for i, (name, args) in enumerate(calls):
            content.append({"type": "tool_use", "id": call_ids[i], "name": name, "input": args})
        usage = {
            "input_tokens": prompt_tokens,
            "output_tokens": out_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        }
        if isinstance(plan.get("usage"), dict):  # directive: these usage fields, as given
            usage.update(plan["usage"])
            out_tokens = usage.get("output_tokens", out_tokens)
        if not req.get("stream"):
            obj = {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "model": req["model"],
                "content": content,
                "stop_reason": stop_reason,
                "stop_sequence": stop_seq,
                "usage": usage,
            }
            return await self._whole(send, obj, plan, limits, plan.get("chunks", self.cfg["chunks"]))

        def ev(name: str, data: dict) -> bytes:
            return f"event: {name}\n".encode() + b"data: " + orjson.dumps(data) + b"\n\n"

        start_msg = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": req["model"],
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**usage, "output_tokens": 1},
        }
        events = [ev("message_start", {"type": "message_start", "message": start_msg}), ev("ping", {"type": "ping"})]
        index = 0
        if text is not None:
            events.append(
                ev(
                    "content_block_start",
                    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                )
            )
            for piece in _split(list(words), plan.get("chunks", self.cfg["chunks"])):
                events.append(
                    ev(
                        "content_block_delta",
                        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}},
                    )
                )
            events.append(ev("content_block_stop", {"type": "content_block_stop", "index": 0}))
            index = 1
        for i, (name, args) in enumerate(calls):
            raw = orjson.dumps(args).decode()
            half = len(raw) // 2
            events.append(
                ev(
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {"type": "tool_use", "id": call_ids[i], "name": name, "input": {}},
                    },
                )
            )
            for part in (raw[:half], raw[half:]):
                events.append(
                    ev(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": index,
                            "delta": {"type": "input_json_delta", "partial_json": part},
                        },
                    )
                )
            events.append(ev("content_block_stop", {"type": "content_block_stop", "index": index}))
            index += 1
        events.append(
            ev(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": stop_seq},
                    "usage": {"output_tokens": out_tokens},
                },
            )
        )
        events.append(ev("message_stop", {"type": "message_stop"}))
        await self._stream_start(send, plan, limits)
        await self._events(send, events, plan, anthropic=True)

    # ---- embeddings -------------------------------------------------------------------------
    async def _embeddings(self, send, req: dict, plan: dict, limits: dict) -> None:
        inputs = req.get("input")
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        dims = req.get("dimensions") or self.cfg["dims"]
        data, tokens = [], 0
        for i, item in enumerate(inputs or []):
            text = item if isinstance(item, str) else " ".join(map(str, item))
            tokens += len(text.split()) or 1
            seed = hashlib.sha256(text.encode()).digest()
            raw = [((seed[j % 32] ^ (j * 31)) % 255) / 127.0 - 1.0 for j in range(dims)]
            norm = sum(v * v for v in raw) ** 0.5 or 1.0
            vec = [v / norm for v in raw]
            if req.get("encoding_format") == "base64":
                emb = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode()
            else:
                emb = vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        obj = {
            "object": "list",
            "data": data,
            "model": req.get("model", "mock-embedding"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        await self._whole(send, obj, plan, limits, 0)

    # ---- rerank (Cohere-compatible) -----------------------------------------------------------
    async def _rerank(self, send, req: dict, plan: dict, limits: dict) -> None:
        """Relevance = the share of the query's words found in the document (deterministic)."""
        words = set(re.findall(r"\w+", str(req.get("query", "")).lower()))
        results = []
        for i, doc in enumerate(req.get("documents") or []):
            text = doc.get("text", "") if isinstance(doc, dict) else str(doc)
            found = words & set(re.findall(r"\w+", text.lower()))
            results.append({"index": i, "relevance_score": round(len(found) / (len(words) or 1), 6)})
        results.sort(key=lambda r: (-r["relevance_score"], r["index"]))
        if isinstance(req.get("top_n"), int):
            results = results[: req["top_n"]]
        obj = {"id": f"rr-{len(self.requests)}", "results": results, "meta": {"billed_units": {"search_units": 1}}}
        await self._whole(send, obj, plan, limits, 0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gateway mock-provider", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--ttft-ms", type=float, default=0.0, help="time to first byte / token")
    p.add_argument("--chunk-ms", type=float, default=0.0, help="time between stream chunks")
    p.add_argument("--chunks", type=int, default=8, help="content chunks per streamed reply")
    p.add_argument("--fail-rate", type=float, default=0.0, help="fraction of requests that fail")
    p.add_argument("--fail-status", type=int, default=500, help="status of those failures")
    p.add_argument("--retry-after", type=float, default=1.0, help="retry-after of 429/503 failures")
    p.add_argument("--fail-code", default=None, help="error code of those failures (e.g. context_length_exceeded)")
    p.add_argument("--cut-after", type=int, default=None, help="drop every stream after this many chunks")
    p.add_argument("--rpm", type=int, default=0, help="requests per minute per API key (0: unlimited)")
    p.add_argument("--api-keys", default="", help="comma-separated keys to accept (default: any)")
    p.add_argument("--dims", type=int, default=8, help="embedding dimensions")
    p.add_argument("--no-record", action="store_true", help="do not keep received requests")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    serve.run(Mock(opts), opts.host, opts.port)


if __name__ == "__main__":
    main()
