"""A small MCP client over the streamable-HTTP transport: just what server-side tools need.

JSON-RPC 2.0 messages are POSTed to the server's one endpoint; the answer comes back as
``application/json`` or as a ``text/event-stream`` whose events carry JSON-RPC messages (the
response we wait for, and perhaps notifications or server requests we ignore). The session
starts with ``initialize`` then ``notifications/initialized``; the ``Mcp-Session-Id`` the server
hands out is sent on every later request, and a 404 on a request that carried it means the
session expired: the client starts a new one and sends the request again, once.

``MCPClient`` speaks to one server; ``MCPPool`` keeps one client per tenant, server URL and
headers, so every turn of a tenant's agents reuses the session (and no other tenant's does).
The HTTP session (with its guarded connector) is the caller's: the pool never opens
connections of its own.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict

import aiohttp
import orjson

from core.sse import EventSplitter, parse_event

PROTOCOL_VERSION = "2025-06-18"
CLIENT_INFO = {"name": "ai-gateway", "version": "1"}
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Events read from one answer's stream before the response must have come: each is parsed on the
# event loop (~2.5 us), and 4 MB of ``data: 1`` events are 466,000 of them (1.2 s a call).
MAX_EVENTS = 4096
MAX_POOL = 256


class MCPError(Exception):
    """The server could not be used (transport, protocol or JSON-RPC error). The message names
    no URL and no header."""


class SessionExpired(MCPError):
    pass


class MCPClient:
    def __init__(self, http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None) -> None:
        self._http = http
        self.url = url
        self._headers = dict(headers or {})
        self._ids = itertools.count(1)
        self._session_id: str | None = None
        self._protocol: str | None = None
        self._ready = False
        self._init_lock = asyncio.Lock()
        self.server_info: dict = {}

    async def list_tools(self, *, timeout_s: float = 10.0) -> list[dict]:
        """Every tool the server offers: [{"name", "description", "inputSchema"}, ...]."""
        tools: list[dict] = []
        cursor = None
        async with asyncio.timeout(timeout_s):
            for _ in range(32):  # pages
                params = {"cursor": cursor} if cursor else {}
                result = await self.request("tools/list", params)
                tools.extend(t for t in result.get("tools") or () if isinstance(t, dict))
                cursor = result.get("nextCursor")
                if not cursor:
                    break
        return tools

    async def call_tool(self, name: str, arguments: dict, *, timeout_s: float = 10.0) -> tuple[str, bool]:
        """(text of the result's content parts, joined; whether the tool reported an error)."""
        async with asyncio.timeout(timeout_s):
            result = await self.request("tools/call", {"name": name, "arguments": arguments})
        return content_text(result), bool(result.get("isError"))

    async def request(self, method: str, params: dict) -> dict:
        await self._ensure_ready()
        expired = self._session_id
        try:
            return await self._rpc(method, params)
        except SessionExpired:
            if self._session_id == expired:  # not already renewed by a concurrent request
                self._ready = False
            await self._ensure_ready()
            return await self._rpc(method, params)

    async def _ensure_ready(self) -> None:
        if self._ready:
            return
        async with self._init_lock:
            if self._ready:
                return
            self._session_id = None
            result = await self._rpc(
                "initialize",
                {"protocolVersion": PROTOCOL_VERSION, "capabilities": {}, "clientInfo": CLIENT_INFO},
            )
            self._protocol = result.get("protocolVersion") if isinstance(result.get("protocolVersion"), str) else None
            info = result.get("serverInfo")
            self.server_info = info if isinstance(info, dict) else {}
            await self._post({"jsonrpc": "2.0", "method": "notifications/initialized"}, None)
            self._ready = True

    async def _rpc(self, method: str, params: dict) -> dict:
        ident = next(self._ids)
        message = await self._post({"jsonrpc": "2.0", "id": ident, "method": method, "params": params}, ident)
        if message is None:
            raise MCPError(f"no answer to {method}")
        error = message.get("error")
        if error is not None:
            text = error.get("message") if isinstance(error, dict) else None
            raise MCPError(f"{method} failed: {str(text or 'error')[:300]}")
        result = message.get("result")
        if not isinstance(result, dict):
            raise MCPError(f"{method}: the result is not an object")
        return result

    async def _post(self, payload: dict, ident: int | None) -> dict | None:
        headers = {
            **self._headers,
            "content-type": "application/json",
            "accept": "application/json, text/event-stream",
        }
        if self._session_id:
            headers["mcp-session-id"] = self._session_id
        if self._protocol:
            headers["mcp-protocol-version"] = self._protocol
        try:
            async with self._http.post(
                self.url, data=orjson.dumps(payload), headers=headers, allow_redirects=False
            ) as resp:
                if resp.status == 404 and self._session_id and payload.get("method") != "initialize":
                    raise SessionExpired("session expired")
                if resp.status >= 300:  # redirects are not followed
                    raise MCPError(f"the MCP server answered HTTP {resp.status}")
                session_id = resp.headers.get("mcp-session-id")
                if session_id and payload.get("method") == "initialize":
                    self._session_id = session_id[:256]
                if ident is None:
                    return None
                ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
                if ctype == "text/event-stream":
                    return await _from_stream(resp, ident)
                if ctype == "application/json":
                    return _match(_loads(await _read(resp)), ident)
                raise MCPError("the MCP server answered with neither JSON nor an event stream")
        except aiohttp.ClientError as exc:
            raise MCPError(f"cannot reach the MCP server ({type(exc).__name__})") from exc


async def _read(resp: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():  # read() returns what is buffered, not the whole body
        size += len(chunk)
        if size > MAX_MESSAGE_BYTES:
            raise MCPError("the MCP server's answer is too large")
        chunks.append(chunk)
    return b"".join(chunks)


def _loads(raw: bytes):
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise MCPError("the MCP server's answer is not JSON") from None


def _match(message, ident: int) -> dict | None:
    """The response to request ``ident`` in a message (or a JSON-RPC batch of them)."""
    for item in message if isinstance(message, list) else [message]:
        if isinstance(item, dict) and item.get("id") == ident and ("result" in item or "error" in item):
            return item
    return None


async def _from_stream(resp: aiohttp.ClientResponse, ident: int) -> dict | None:
    splitter = EventSplitter()
    seen = 0
    events = 0
    async for chunk in resp.content.iter_any():
        seen += len(chunk)
        if seen > MAX_MESSAGE_BYTES:
            raise MCPError("the MCP server's answer is too large")
        for raw in splitter.feed(chunk):
            events += 1
            if events > MAX_EVENTS:
                raise MCPError("the MCP server sent too many events")
            _, data = parse_event(raw)
            if data and (found := _match(_loads(data), ident)) is not None:
                return found
    if splitter.rest.strip():
        _, data = parse_event(splitter.rest)
        if data:
            return _match(_loads(data), ident)
    return None


def content_text(result: dict) -> str:
    """A tools/call result as text: its text parts joined; other parts described; else the
    structured content as JSON."""
    parts = []
    for part in result.get("content") or ():
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind == "resource" and isinstance(part.get("resource"), dict):
            text = part["resource"].get("text")
            parts.append(text if isinstance(text, str) else f"[resource {part['resource'].get('uri', '')}]")
        elif kind in ("image", "audio"):
            parts.append(f"[{kind} {part.get('mimeType', '')}]")
        elif kind == "resource_link":
            parts.append(f"[resource {part.get('uri', '')}]")
    if not parts and result.get("structuredContent") is not None:
        return orjson.dumps(result["structuredContent"]).decode()
    return "\n".join(parts)


class MCPPool:
    """One MCPClient per (owner, server URL, headers), least recently used dropped beyond
    ``size``. ``owner`` (the tenant) walls sessions: a stateful server keeps what one tenant did
    in its session, and another tenant must never continue it."""

    def __init__(self, http: aiohttp.ClientSession, *, size: int = MAX_POOL) -> None:
        self._http = http
        self._size = size
        self._clients: OrderedDict[tuple, MCPClient] = OrderedDict()

    def client(self, url: str, headers: dict[str, str] | None = None, *, owner: str | None = None) -> MCPClient:
        key = (owner, url, tuple(sorted((headers or {}).items())))
        found = self._clients.get(key)
        if found is not None:
            self._clients.move_to_end(key)
            return found
        found = self._clients[key] = MCPClient(self._http, url, headers)
        while len(self._clients) > self._size:
            self._clients.popitem(last=False)
        return found
