"""A tool server for tests and the bench: plain HTTP endpoints an agent's ``http`` tools call, and
an MCP server (streamable HTTP) at ``/mcp``. ``python -m loadtest.mock_tools --port N``.

    GET  /weather?city=Paris        {"city", "temp_c", "conditions"}
    POST /orders/{id}               echoes {"id", "query", "body", "headers"} (GET too)
    GET  /slow?delay_ms=200         answers after the delay
    GET  /fail?status=500           always fails with that status
    GET  /flaky?key=k&fails=2       fails with 500 the first ``fails`` times for ``key``, then answers
    GET  /big?bytes=100000          that many bytes of text
    GET  /redirect                  302 to /weather
    GET  /echo-secret?form=b64&pad=0&status=200
                                    the request's bearer token written in ``form`` (see ``ECHO_FORMS``:
                                    url, base64, hex, JSON escapes, Basic, another case ...), after
                                    ``pad`` filler bytes, as text/plain with that status
    GET  /_requests                 every request received: method, path, query, headers, body,
                                    start and end (server clock, seconds); DELETE clears
    POST /mcp                       MCP over streamable HTTP: tools ``add`` {a, b} and
                                    ``lookup_order`` {order_id}; ``?sse=1`` answers as an event
                                    stream (``&flood=N``: after N tiny events); DELETE ends the
                                    session; POST /_mcp/expire ends all;
                                    an unlisted tool ``echo_secret`` {form, error} answers with the
                                    bearer token written in ``form`` (as an error when ``error``)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import html
import itertools
import time
import uuid
from collections import Counter, deque
from urllib.parse import parse_qsl, quote, quote_plus

import orjson

from loadtest import serve

MCP_TOOLS = [
    {
        "name": "add",
        "description": "Add two numbers.",
        "inputSchema": {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
        },
    },
    {
        "name": "lookup_order",
        "description": "Look up an order by its id.",
        "inputSchema": {
            "type": "object",
            "properties": {"order_id": {"type": "string"}},
            "required": ["order_id"],
        },
    },
]
ORDERS = {"A1": {"order_id": "A1", "status": "shipped", "items": 2}, "B2": {"order_id": "B2", "status": "pending"}}


def _json_u(s: str) -> str:
    return "".join(f"\\u{ord(c):04x}" for c in s)


# How a server may echo a secret it was sent: each form of ``s`` as the bytes it answers with.
ECHO_FORMS = {
    "raw": lambda s: s,
    "upper": str.upper,
    "lower": str.lower,
    "swapcase": str.swapcase,
    "url": lambda s: quote(s, safe=""),
    "url_lower": lambda s: quote(s, safe="").lower(),
    "url_plus": lambda s: quote_plus(s),
    "url_twice": lambda s: quote(quote(s, safe=""), safe=""),
    "json_slash": lambda s: orjson.dumps(s).decode()[1:-1].replace("/", "\\/"),
    "json_u": _json_u,
    "json_in_json": lambda s: orjson.dumps(orjson.dumps({"token": s}).decode().replace("/", "\\/")).decode()[1:-1],
    "hex": lambda s: s.encode().hex(),
    "hex_upper": lambda s: s.encode().hex().upper(),
    "base64": lambda s: base64.b64encode(s.encode()).decode(),
    "base64_url": lambda s: base64.urlsafe_b64encode(s.encode()).decode().rstrip("="),
    "basic": lambda s: "Authorization: Basic " + base64.b64encode(b"api:" + s.encode()).decode(),
    "basic_user": lambda s: "Basic " + base64.b64encode(s.encode() + b":x").decode(),
    "html": lambda s: "".join(f"&#{ord(c)};" for c in s),
    "html_escape": lambda s: html.escape(s),
}


class ToolServer:
    def __init__(self) -> None:
        self.requests: deque = deque(maxlen=5000)
        self.flaky: Counter = Counter()
        self.sessions: set[str] = set()
        self._seq = itertools.count(1)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        start = time.time()
        path, method = scope["path"], scope["method"]
        query = _query(scope.get("query_string", b""))
        headers = {k.decode(): v.decode("latin-1") for k, v in scope["headers"]}
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        record = None
        if not path.startswith("/_"):
            record = {
                "seq": next(self._seq),
                "method": method,
                "path": path,
                "raw_path": scope.get("raw_path", b"").decode("latin-1"),
                "query": query,
                "headers": headers,
                "body": body.decode("utf-8", "replace"),
                "start": start,
                "end": None,
            }
            self.requests.append(record)
        try:
            await self._route(send, method, path, query, headers, body)
        finally:
            if record is not None:
                record["end"] = time.time()

    async def _route(self, send, method: str, path: str, query: dict, headers: dict, body: bytes) -> None:
        if path == "/health":
            return await _json(send, 200, {"status": "ok"})
        if path == "/_requests":
            if method == "DELETE":
                self.requests.clear()
                self.flaky.clear()
            return await _json(send, 200, {"requests": list(self.requests)})
        if path == "/_mcp/expire":
            self.sessions.clear()
            return await _json(send, 200, {"expired": True})
        if path == "/weather":
            city = query.get("city", "")
            if not city:
                return await _json(send, 400, {"error": "city is required"})
            temp = sum(city.encode()) % 35
            return await _json(send, 200, {"city": city, "temp_c": temp, "conditions": "sunny"})
        if path.startswith("/orders/"):
            order_id = path.removeprefix("/orders/")
            try:
                parsed = orjson.loads(body) if body else None
            except orjson.JSONDecodeError:
                parsed = body.decode("utf-8", "replace")
            return await _json(send, 200, {"id": order_id, "query": query, "body": parsed, "headers": headers})
        if path == "/slow":
            delay = float(query.get("delay_ms", "200"))
            await asyncio.sleep(delay / 1000)
            return await _json(send, 200, {"slept_ms": delay, "tag": query.get("tag")})
        if path == "/fail":
            return await _json(send, int(query.get("status", "500")), {"error": "this endpoint always fails"})
        if path == "/flaky":
            key = query.get("key", "")
            self.flaky[key] += 1
            if self.flaky[key] <= int(query.get("fails", "1")):
                return await _json(send, 500, {"error": f"failure {self.flaky[key]}"})
            return await _json(send, 200, {"ok": True, "attempts": self.flaky[key]})
        if path == "/directory":  # a contact search: distinct US phone numbers (PII bounds)
            count = min(int(query.get("count", "10")), 100_000)
            rows = [f"Contact {i}: ({200 + i % 700}) 555-{i % 10000:04d}" for i in range(count)]
            return await _json(send, 200, {"contacts": rows})
        if path == "/big":
            size = min(int(query.get("bytes", "100000")), 50_000_000)
            return await _raw(send, 200, b"x" * size, b"text/plain")
        if path == "/echo-secret":
            token = headers.get("authorization", "").removeprefix("Bearer ")
            form = ECHO_FORMS.get(query.get("form", "raw"), ECHO_FORMS["raw"])
            body = b"x" * min(int(query.get("pad", "0")), 5_000_000) + f" echo: {form(token)} (end)".encode()
            return await _raw(send, int(query.get("status", "200")), body, b"text/plain")
        if path == "/redirect":
            await send({"type": "http.response.start", "status": 302, "headers": [(b"location", b"/weather")]})
            return await send({"type": "http.response.body", "body": b""})
        if path == "/mcp":
            return await self._mcp(send, method, query, headers, body)
        return await _json(send, 404, {"error": "not found"})

    # ---- MCP -------------------------------------------------------------------------------
    async def _mcp(self, send, method: str, query: dict, headers: dict, body: bytes) -> None:
        session = headers.get("mcp-session-id")
        if method == "DELETE":
            self.sessions.discard(session)
            return await _raw(send, 200, b"", b"text/plain")
        if method != "POST":
            return await _raw(send, 405, b"", b"text/plain")
        if "text/event-stream" not in headers.get("accept", "") or "application/json" not in headers.get("accept", ""):
            return await _json(send, 406, _rpc_error(None, -32600, "accept both JSON and event streams"))
        try:
            message = orjson.loads(body)
        except orjson.JSONDecodeError:
            return await _json(send, 400, _rpc_error(None, -32700, "parse error"))
        rpc = message.get("method") if isinstance(message, dict) else None
        ident = message.get("id") if isinstance(message, dict) else None
        extra: dict = {}
        if rpc == "initialize":
            session = uuid.uuid4().hex
            self.sessions.add(session)
            extra["mcp-session-id"] = session
            version = (message.get("params") or {}).get("protocolVersion") or "2025-06-18"
            result = {
                "protocolVersion": version,
                "capabilities": {"tools": {"listChanged": False}},
                "serverInfo": {"name": "mock-tools", "version": "1"},
            }
        elif not session:
            return await _json(send, 400, _rpc_error(ident, -32600, "missing Mcp-Session-Id"))
        elif session not in self.sessions:
            return await _json(send, 404, _rpc_error(ident, -32001, "session not found"))
        elif ident is None:  # a notification
            return await _raw(send, 202, b"", b"text/plain")
        elif rpc == "tools/list":
            result = {"tools": MCP_TOOLS}
        elif rpc == "tools/call":
            params = message.get("params") or {}
            if params.get("name") == "echo_secret":
                result = _echo_secret(params.get("arguments") or {}, headers)
            else:
                result = _call(params.get("name"), params.get("arguments") or {})
            if result is None:
                return await self._answer(send, query, _rpc_error(ident, -32602, "unknown tool"), extra)
        else:
            return await self._answer(send, query, _rpc_error(ident, -32601, "method not found"), extra)
        return await self._answer(send, query, {"jsonrpc": "2.0", "id": ident, "result": result}, extra)

    async def _answer(self, send, query: dict, message: dict, extra: dict) -> None:
        if query.get("sse") != "1":
            return await _json(send, 200, message, extra)
        headers = [(b"content-type", b"text/event-stream"), *((k.encode(), v.encode()) for k, v in extra.items())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        note = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "working"}}
        flood = min(int(query.get("flood", "0")), 1_000_000)  # that many tiny events first (a hostile server)
        if flood:
            await send({"type": "http.response.body", "body": b"data: 1\n\n" * flood, "more_body": True})
        for event in (note, message):
            data = b"event: message\ndata: " + orjson.dumps(event) + b"\n\n"
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


def _echo_secret(arguments: dict, headers: dict) -> dict:
    token = headers.get("authorization", "").removeprefix("Bearer ")
    form = ECHO_FORMS.get(str(arguments.get("form")), ECHO_FORMS["raw"])
    return {
        "content": [{"type": "text", "text": f"mcp echo: {form(token)} (end)"}],
        "isError": bool(arguments.get("error")),
    }


def _call(name, arguments: dict) -> dict | None:
    if name == "add":
        a, b = arguments.get("a"), arguments.get("b")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (a, b)):
            return {"content": [{"type": "text", "text": "a and b must be numbers"}], "isError": True}
        total = a + b
        return {"content": [{"type": "text", "text": str(total)}], "structuredContent": {"result": total}}
    if name == "lookup_order":
        order = ORDERS.get(str(arguments.get("order_id")))
        if order is None:
            return {"content": [{"type": "text", "text": "no such order"}], "isError": True}
        return {"content": [{"type": "text", "text": orjson.dumps(order).decode()}]}
    return None


def _rpc_error(ident, code: int, message: str) -> dict:
    return {"jsonrpc": "2.0", "id": ident, "error": {"code": code, "message": message}}


def _query(raw: bytes) -> dict:
    return dict(parse_qsl(raw.decode("latin-1"), keep_blank_values=True))


async def _json(send, status: int, obj, extra: dict | None = None) -> None:
    await _raw(send, status, orjson.dumps(obj), b"application/json", extra)


async def _raw(send, status: int, body: bytes, ctype: bytes, extra: dict | None = None) -> None:
    headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]
    headers.extend((k.encode(), str(v).encode()) for k, v in (extra or {}).items())
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="mock-tools", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8002)
    opts = p.parse_args(argv)
    serve.run(ToolServer(), opts.host, opts.port)


if __name__ == "__main__":
    main()
