"""A VAPI simulator: plays phone calls against a gateway's VAPI channel the way VAPI does, over
real HTTP, and a mock of VAPI's REST API for outbound calls.

Playing a call (``VapiCall.play``), in VAPI's order and wire formats:

    assistant-request   → the assistant the channel configures for the inbound number
    status-update       in-progress
    turns               POST <custom-LLM url>/chat/completions, stream: true, the whole
                        transcript as messages plus the call / phoneNumber / customer objects
                        (metadataSendMode "variable"); time to first token measured per turn
    tool-calls          toolCallList with arguments as objects; the results' ids are checked
    status-update       ended
    end-of-call-report  transcript, recording URL, duration, cost — sent twice, as VAPI's
                        retries do

    python -m loadtest.vapi_sim call --gateway http://127.0.0.1:8000 --account main --token T
    python -m loadtest.vapi_sim api --port 8010      # the mock REST API

The mock REST API: ``POST /call`` (Bearer key; ``--api-key`` to require one) answers a call
object ``{"id", "status": "queued", ...}``; ``?fail=<status>`` or a ``customer.number`` ending
in ``0000`` makes it refuse. ``GET /_requests`` lists what it received, ``DELETE`` clears.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import aiohttp
import orjson

from loadtest import serve


@dataclass
class Turn:
    said: str
    answer: str = ""
    ttft_ms: float | None = None  # request sent → first content token
    total_ms: float = 0.0
    chunks: int = 0
    status: int = 0
    tool_calls: list = field(default_factory=list)


@dataclass
class CallResult:
    call_id: str
    assistant: dict | None = None
    turns: list[Turn] = field(default_factory=list)
    tool_results: dict | None = None
    transfer: dict | None = None
    reports: list[dict] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)


class VapiCall:
    """One simulated call. ``headers`` are what VAPI's credential sends (bearer or secret)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base: str,
        headers: dict[str, str],
        *,
        call_id: str | None = None,
        phone_number_id: str = "pn_sim",
        assistant_id: str | None = None,
        customer: str = "+14155550123",
        called: str = "+14155550100",
        metadata: dict | None = None,
        follow_assistant: bool = True,
    ) -> None:
        self.session = session
        self.base = base.rstrip("/")
        self.headers = headers
        self.call_id = call_id or str(uuid.uuid4())
        self.phone_number_id = phone_number_id
        self.assistant_id = assistant_id
        self.customer = {"number": customer, "name": "Sim Caller"}
        self.phone = {"id": phone_number_id, "number": called}
        self.metadata = metadata or {}
        self.messages: list[dict] = []
        self.llm_url = f"{self.base}/chat/completions"
        # VAPI calls the custom-LLM URL the assistant names; a test whose gateway's public URL is
        # not reachable from here keeps calling the channel it was given
        self.follow_assistant = follow_assistant

    def call(self, status: str = "in-progress") -> dict:
        out = {
            "id": self.call_id,
            "orgId": "org_sim",
            "type": "inboundPhoneCall",
            "status": status,
            "phoneNumberId": self.phone_number_id,
            "customer": self.customer,
            "metadata": self.metadata,
        }
        if self.assistant_id:
            out["assistantId"] = self.assistant_id
        return out

    async def event(self, message: dict) -> tuple[int, dict]:
        body = {"message": {**message, "call": self.call(), "phoneNumber": self.phone, "customer": self.customer}}
        async with self.session.post(f"{self.base}/events", data=orjson.dumps(body), headers=self._json()) as resp:
            raw = await resp.read()
            return resp.status, (orjson.loads(raw) if raw else {})

    def _json(self) -> dict[str, str]:
        return {**self.headers, "Content-Type": "application/json"}

    async def assistant_request(self) -> dict:
        status, answer = await self.event({"type": "assistant-request", "timestamp": time.time() * 1000})
        if status != 200:
            raise RuntimeError(f"assistant-request answered {status}: {answer}")
        model = (answer.get("assistant") or {}).get("model") or {}
        if model.get("url") and self.follow_assistant:
            self.llm_url = f"{model['url'].rstrip('/')}/chat/completions"
        return answer

    async def say(self, text: str, *, model: str = "agent", tools: list | None = None) -> Turn:
        """One turn: the caller's words, then the custom-LLM request with the whole transcript."""
        self.messages.append({"role": "user", "content": text})
        body = {
            "model": model,
            "messages": self.messages,
            "stream": True,
            "temperature": 0.7,
            "call": self.call(),
            "phoneNumber": self.phone,
            "customer": self.customer,
            "metadata": self.metadata,
        }
        if tools:
            body["tools"] = tools
        turn = Turn(said=text)
        started = time.perf_counter()
        async with self.session.post(self.llm_url, data=orjson.dumps(body), headers=self._json()) as resp:
            turn.status = resp.status
            if resp.status != 200:
                turn.answer = (await resp.read()).decode(errors="replace")
                turn.total_ms = (time.perf_counter() - started) * 1000
                return turn
            parts: list[str] = []
            buf = b""
            async for data in resp.content.iter_any():
                buf += data
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    for line in event.split(b"\n"):
                        if not line.startswith(b"data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            continue
                        chunk = orjson.loads(payload)
                        turn.chunks += 1
                        for choice in chunk.get("choices") or ():
                            delta = choice.get("delta") or {}
                            if delta.get("content"):
                                if turn.ttft_ms is None:
                                    turn.ttft_ms = (time.perf_counter() - started) * 1000
                                parts.append(delta["content"])
                            if delta.get("tool_calls"):
                                turn.tool_calls.extend(delta["tool_calls"])
        turn.total_ms = (time.perf_counter() - started) * 1000
        turn.answer = "".join(parts)
        self.messages.append({"role": "assistant", "content": turn.answer})
        return turn

    async def tool_calls(self, calls: list[dict]) -> tuple[int, dict]:
        """``calls``: [{"id", "name", "arguments": {...}}] as VAPI's toolCallList."""
        entries = [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}}
            for c in calls
        ]
        return await self.event({"type": "tool-calls", "toolCallList": entries, "toolWithToolCallList": []})

    async def end(self, cost: float = 0.1234, duration_s: float = 42.0) -> list[dict]:
        """status-update ended, then the end-of-call report twice (VAPI retries it)."""
        await self.event({"type": "status-update", "status": "ended", "endedReason": "customer-ended-call"})
        transcript = "\n".join(f"{'User' if m['role'] == 'user' else 'AI'}: {m['content']}" for m in self.messages)
        report = {
            "type": "end-of-call-report",
            "endedReason": "customer-ended-call",
            "cost": cost,
            "durationSeconds": duration_s,
            "startedAt": "2026-01-01T10:00:00.000Z",
            "endedAt": "2026-01-01T10:00:42.000Z",
            "artifact": {
                "transcript": transcript,
                "messages": self.messages,
                "recordingUrl": f"https://storage.vapi.example/{self.call_id}.wav",
            },
            "analysis": {"summary": "A simulated call."},
        }
        out = []
        for _ in range(2):
            status, answer = await self.event(report)
            out.append({"status": status, **answer})
        return out

    async def play(self, utterances: list[str], tool_calls: list[dict] | None = None) -> CallResult:
        result = CallResult(call_id=self.call_id)
        result.assistant = await self.assistant_request()
        await self.event({"type": "status-update", "status": "in-progress"})
        for i, text in enumerate(utterances):
            result.turns.append(await self.say(text))
            if i == 0 and tool_calls:
                status, result.tool_results = await self.tool_calls(tool_calls)
                result.statuses.append(status)
        result.reports = await self.end()
        return result


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


# ---- the mock REST API ---------------------------------------------------------------------------
class MockVapiApi:
    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.requests: deque = deque(maxlen=1000)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path, method = scope["path"], scope["method"]
        headers = {k.decode(): v.decode("latin-1") for k, v in scope["headers"]}
        if path == "/health":
            return await _json(send, 200, {"status": "ok"})
        if path == "/_requests":
            if method == "DELETE":
                self.requests.clear()
            return await _json(send, 200, {"requests": list(self.requests)})
        if path == "/call" and method == "POST":
            data = orjson.loads(body) if body else {}
            self.requests.append({"path": path, "headers": headers, "body": data})
            if self.api_key and headers.get("authorization") != f"Bearer {self.api_key}":
                return await _json(send, 401, {"message": "Invalid API key", "statusCode": 401})
            number = ((data.get("customer") or {}).get("number")) or ""
            query = scope.get("query_string", b"").decode()
            if "fail=" in query or number.endswith("0000"):
                return await _json(send, 400, {"message": ["customer.number is not reachable"], "statusCode": 400})
            call = {
                "id": str(uuid.uuid4()),
                "orgId": "org_sim",
                "type": "outboundPhoneCall",
                "status": "queued",
                "phoneNumberId": data.get("phoneNumberId"),
                "customer": data.get("customer"),
                "createdAt": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            }
            return await _json(send, 201, call)
        await _json(send, 404, {"message": "Not Found", "statusCode": 404})


async def _json(send, status: int, obj) -> None:
    body = orjson.dumps(obj)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ---- command line --------------------------------------------------------------------------------
async def _play(opts: argparse.Namespace) -> None:
    headers = {"Authorization": f"Bearer {opts.token}"} if opts.token else {"X-Vapi-Secret": opts.secret}
    base = f"{opts.gateway.rstrip('/')}/channels/vapi/{opts.account}"
    ttfts: list[float] = []
    async with aiohttp.ClientSession() as session:
        for _ in range(opts.calls):
            call = VapiCall(session, base, headers, phone_number_id=opts.phone_number_id)
            result = await call.play([f"Hello, this is turn {i + 1}." for i in range(opts.turns)])
            for t in result.turns:
                if t.ttft_ms is not None:
                    ttfts.append(t.ttft_ms)
                print(f"{result.call_id} turn status={t.status} ttft={t.ttft_ms or float('nan'):.1f} ms")
    if ttfts:
        print(f"ttft p50 {statistics.median(ttfts):.1f} ms, p95 {percentile(ttfts, 95):.1f} ms over {len(ttfts)} turns")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="vapi-sim", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    call = sub.add_parser("call", help="play simulated calls against a gateway")
    call.add_argument("--gateway", default="http://127.0.0.1:8000")
    call.add_argument("--account", required=True)
    call.add_argument("--token", help="the account's bearer token")
    call.add_argument("--secret", help="the account's X-Vapi-Secret")
    call.add_argument("--phone-number-id", default="pn_sim")
    call.add_argument("--calls", type=int, default=1)
    call.add_argument("--turns", type=int, default=3)
    api = sub.add_parser("api", help="serve the mock VAPI REST API")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8010)
    api.add_argument("--api-key", default=None)
    opts = p.parse_args(argv)
    if opts.cmd == "call":
        asyncio.run(_play(opts))
        return
    serve.run(MockVapiApi(opts.api_key), opts.host, opts.port)


if __name__ == "__main__":
    main()
