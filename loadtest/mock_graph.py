"""A mock of the WhatsApp Cloud API (Meta Graph API): a real HTTP server speaking its wire format.

- ``POST /{version}/{phone_number_id}/messages``: text and template sends (answered with new
  ``wamid``s, recorded) and mark-as-read (``"status": "read"``), with the bearer token checked.
- ``GET /{version}/{media_id}`` → ``{"url", "mime_type", "sha256", "file_size", "id"}`` and
  ``GET /_media/{id}`` → the bytes (token checked), for media registered with ``POST /_mock/media``
  ``{"id", "data_b64", "mime_type", "url"?, "hold"?}`` (``url`` overrides the download link: SSRF
  tests; ``hold``: each download of the bytes waits until ``POST /_mock/release``, at most 60 s,
  counted in ``/_mock/stats`` as ``media_held`` when it begins to wait).
- Delivery statuses posted back to the gateway's webhook (``webhook_url``), signed with
  ``app_secret`` like Meta's: sent, delivered, read — in ``status_order`` (out of order on
  directive; ``failed:<code>`` is a failed status with that error), or before the send is
  answered (``status_first_ms``: posted, then the answer waits that long, as Meta's can race the
  sender's own record of the send). ``text_answer_delays_ms``: the n-th free-form text sent
  to a number is answered that many ms late (its status, if any, goes out at once): a later
  piece of an answer still on its way while an earlier piece's status is handled; a negative
  delay holds that answer until ``POST /_mock/release`` (at most 60 s): a send kept open, by
  event, while the test does something else.
  ``text_status_orders``: the n-th free-form text sent to a number gets the n-th of these status
  orders instead of ``status_order`` (``[["sent", "delivered"], ["failed:131047"]]``: Meta
  delivers the first piece of an answer and fails the second later for the closed window).
  A ``hold`` in an order waits there until ``POST /_mock/release`` (``[["sent", "hold",
  "failed:131047"], ["failed:131047"]]``: the first piece's failure comes after the second's has
  been handled).

Faults, by directive: ``POST /_mock/faults {"to": "<wa_id>" | "*", "errors": [130429, 500, ...]}``
(each consumed by one send); with ``"nth_text": n`` (and a ``to``) the errors wait for the n-th
free-form text POST to that number instead (every POST counts, refused ones too), and are consumed
one per text POST from there (``{"to": ..., "errors": [429], "nth_text": 2}``: Meta accepts the
first piece of an answer and refuses the second once; 429 is answered as HTTP 429); or
``[[graph:{"error": 131047, "times": 1}]]`` inside a text body (the
first ``times`` sends carrying that directive fail; ``"on": "template"``: the templates carrying it
in a parameter instead; ``"delay_ms"``: the error is answered that late, a negative one once the
test posts ``/_mock/release``).
``POST /_mock/window {"wa_id", "open": false}`` closes a customer's 24-hour window (free-form
text then fails with 131047); ``rate_per_second`` (config) answers 130429 past that many sends a
second per number. A template parameter with a new line, a tab or more than four spaces in a row
is refused with 132018, as Meta does; a template whose approved body the mock was given
(config ``templates``: ``{name: body}``) is refused with 132005 when its body with the
parameters filled in runs past 1,024 characters, as Meta's is.

Inspection: ``GET /_mock/sent`` (sends), ``GET /_mock/reads``, ``DELETE /_mock/sent`` clears;
``POST /_mock/config`` sets token, webhook_url, app_secret, statuses, status_order, status_delay_ms,
status_first_ms, text_answer_delays_ms, text_status_orders, rate_per_second, record, templates, wa_ids
(``{input: wa_id}``: the WhatsApp id a send's answer names for that input, as Meta's does for
some Brazilian and Mexican numbers).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import itertools
import os
import re
import time
from collections import Counter, defaultdict, deque

import orjson

from loadtest import serve

_DIRECTIVE = re.compile(r"\[\[graph:(\{.*?\})\]\]")
_MESSAGES = re.compile(r"^/v\d+\.\d+/(\d+)/messages$")
_MEDIA = re.compile(r"^/v\d+\.\d+/([A-Za-z0-9_\-]+)$")
_ERRORS = {
    131047: (400, "Re-engagement message"),
    130429: (400, "Rate limit hit"),
    131056: (400, "(Business Account, Consumer Account) pair rate limit hit"),
    131026: (400, "Message Undeliverable"),
    100: (400, "Invalid parameter"),
    132018: (400, "There was an issue with the parameters in your template."),
    132005: (400, "Template Hydrated Text Too Long"),
}
THROUGHPUT = 130429
MAX_HYDRATED = 1024  # characters of a template's body with its parameters filled in
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_]+)\s*\}\}")
_BAD_PARAM = re.compile(r"[\n\t]| {5}")


def _graph_error(code: int) -> tuple[int, dict]:
    if code == 429:  # an HTTP 429 (the Graph API's own rate limit in front of the send)
        return 429, {"error": {"message": "Rate limit hit", "type": "OAuthException", "code": THROUGHPUT}}
    if 500 <= code < 600:
        return code, {"error": {"message": "Service temporarily unavailable", "type": "OAuthException", "code": 2}}
    status, message = _ERRORS.get(code, (400, "Error"))
    return status, {
        "error": {
            "message": message,
            "type": "OAuthException",
            "code": code,
            "error_subcode": 2494055,
            "fbtrace_id": "Amock",
        }
    }


def _template_texts(template) -> list[str]:
    components = template.get("components") if isinstance(template, dict) else None
    out = []
    for comp in components if isinstance(components, list) else ():
        for param in comp.get("parameters") or () if isinstance(comp, dict) else ():
            if isinstance(param, dict):
                out.append(str(param.get("text") or ""))
    return out


def _bad_template_params(template) -> bool:
    return any(_BAD_PARAM.search(text) for text in _template_texts(template))


def _hydrated(body: str, template) -> str:
    """An approved body with the send's parameters filled in ({{1}} is the first, as Meta numbers them)."""
    params = _template_texts(template)

    def fill(m: re.Match) -> str:
        name = m.group(1)
        i = int(name) - 1 if name.isdigit() else -1
        return params[i] if 0 <= i < len(params) else m.group(0)

    return _PLACEHOLDER.sub(fill, body)


def _status(wamid: str, status: str, to: str) -> dict:
    name, _, code = status.partition(":")
    out = {"id": wamid, "status": name, "timestamp": str(int(time.time())), "recipient_id": to}
    if code:
        out["errors"] = [{"code": int(code), "title": _ERRORS.get(int(code), (400, "Error"))[1]}]
    return out


class MockGraph:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.cfg = {
            "token": opts.token,
            "webhook_url": "",
            "app_secret": "",
            "statuses": False,
            "status_order": ["sent", "delivered", "read"],
            "status_delay_ms": 0,
            "status_first_ms": 0,
            "text_answer_delays_ms": [],  # [n]: the n-th text to one number is answered this late
            "text_status_orders": [],  # [n]: the statuses of the n-th text to one number (else status_order)
            "rate_per_second": 0,
            "record": True,
            "wa_ids": {},  # input number -> the WhatsApp id Meta answers with (Brazil's ninth digit...)
            "templates": {},  # name -> its approved body ({{1}}, {{2}}...): sends past 1,024 filled in fail
            "self_url": f"http://{opts.host}:{opts.port}",
        }
        self.sent: deque = deque(maxlen=200_000)
        self.reads: deque = deque(maxlen=200_000)
        self.faults: dict[str, deque] = defaultdict(deque)
        self.directive_uses: Counter = Counter()
        self.closed: set[str] = set()
        self.media: dict[str, dict] = {}
        self.counts: Counter = Counter()
        self.texts_to: Counter = Counter()
        self.text_posts: Counter = Counter()  # free-form text POSTs to a number, refused ones too
        self.nth_text_faults: dict[str, dict[int, deque]] = defaultdict(dict)
        self._ids = itertools.count(1)
        # wamids unique across mock processes (two test modules' mocks share one database)
        self._run = os.urandom(4).hex().upper()
        self._second: dict[str, tuple[int, int]] = {}
        self._session = None
        self._tasks: set = set()
        self._hold: asyncio.Event | None = None  # what a "hold" status waits for (/_mock/release)
        self._answer_hold: asyncio.Event | None = None  # what a held answer waits for (/_mock/release)
        self._media_hold: asyncio.Event | None = None  # what a held media download waits for

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    if self._session is not None:
                        await self._session.close()
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
        if headers.get("authorization") != f"Bearer {self.cfg['token']}":
            self.counts["unauthorized"] += 1
            return await self._json(
                send, 401, {"error": {"message": "Invalid OAuth access token.", "type": "OAuthException", "code": 190}}
            )
        if path.startswith("/_media/") and method == "GET":
            item = self.media.get(path[len("/_media/") :])
            if item is None:
                return await self._json(send, 404, {"error": {"message": "not found", "code": 100}})
            if item.get("hold"):
                self._media_hold = self._media_hold or asyncio.Event()
                self.counts["media_held"] += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._media_hold.wait(), 60)
            self.counts["media_downloads"] += 1
            return await self._bytes(send, 200, item["data"], item["mime_type"].encode())
        m = _MESSAGES.match(path)
        if m and method == "POST":
            return await self._messages(send, m.group(1), body)
        m = _MEDIA.match(path)
        if m and method == "GET":
            item = self.media.get(m.group(1))
            if item is None:
                return await self._json(send, 404, {"error": {"message": "Unsupported get request", "code": 100}})
            self.counts["media_lookups"] += 1
            return await self._json(
                send,
                200,
                {
                    "messaging_product": "whatsapp",
                    "url": item.get("url") or f"{self.cfg['self_url']}/_media/{m.group(1)}",
                    "mime_type": item["mime_type"],
                    "sha256": hashlib.sha256(item["data"]).hexdigest(),
                    "file_size": len(item["data"]),
                    "id": m.group(1),
                },
            )
        return await self._json(send, 404, {"error": {"message": f"Unknown path {method} {path}", "code": 100}})

    # ---- sends ------------------------------------------------------------------------------
    def _fault(self, to: str, req: dict) -> tuple[int | None, float]:
        """The error code to answer this send with (None: it goes), and how late to answer it."""
        if req.get("type") == "text":
            self.text_posts[to] += 1
            waiting = self.nth_text_faults.get(to, {})
            due = min((n for n in waiting if n <= self.text_posts[to]), default=None)
            if due is not None:
                code = waiting[due].popleft()
                if not waiting[due]:
                    del waiting[due]
                return code, 0.0
        for who in (to, "*"):
            if self.faults[who]:
                return self.faults[who].popleft(), 0.0
        text = ((req.get("text") or {}).get("body")) or ""
        if req.get("type") == "template":  # a directive in a parameter (an answer sent as the template)
            text = " ".join(_template_texts(req.get("template")))
        found = _DIRECTIVE.search(text) if isinstance(text, str) else None
        if found:
            try:
                d = orjson.loads(found.group(1))
            except orjson.JSONDecodeError:
                d = {}
            mark = (to, found.group(1))
            on = d.get("on", "text")  # the directive fails sends of this type only
            if "error" in d and on == req.get("type") and self.directive_uses[mark] < int(d.get("times", 1)):
                self.directive_uses[mark] += 1
                return int(d["error"]), float(d.get("delay_ms", 0)) / 1000
        return None, 0.0

    async def _messages(self, send, pnid: str, body: bytes) -> None:
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError:
            return await self._json(send, 400, {"error": {"message": "bad JSON", "code": 100}})
        if req.get("status") == "read":
            self.reads.append({"pnid": pnid, "message_id": req.get("message_id"), "ts": time.time()})
            return await self._json(send, 200, {"success": True})
        to, kind = req.get("to"), req.get("type")
        if req.get("messaging_product") != "whatsapp" or not isinstance(to, str) or kind not in ("text", "template"):
            return await self._json(send, 400, {"error": {"message": "Invalid parameter", "code": 100}})
        if kind == "text" and len(((req.get("text") or {}).get("body")) or "") > 4096:
            return await self._json(send, 400, {"error": {"message": "text too long", "code": 100}})
        code, late_error = self._fault(to, req)
        if code is None and kind == "template" and _bad_template_params(req.get("template")):
            code = 132018
        if code is None and kind == "template":  # an approved body the mock knows: Meta's 1,024 after filling in
            tpl = req.get("template") if isinstance(req.get("template"), dict) else {}
            body = self.cfg["templates"].get(str(tpl.get("name")))
            if isinstance(body, str) and len(_hydrated(body, tpl)) > MAX_HYDRATED:
                code = 132005
        if code is None and kind == "text" and to in self.closed:
            code = 131047
        limit = self.cfg["rate_per_second"]
        if code is None and limit:
            sec = int(time.time())
            start, n = self._second.get(pnid, (sec, 0))
            n = n + 1 if start == sec else 1
            self._second[pnid] = (sec, n)
            if n > limit:
                code = 130429
        if code is not None:
            self.counts[f"error_{code}"] += 1
            status, doc = _graph_error(code)
            if late_error < 0:  # held until the test releases it (bounded)
                self._answer_hold = self._answer_hold or asyncio.Event()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._answer_hold.wait(), 60)
            elif late_error:
                await asyncio.sleep(late_error)
            return await self._json(send, status, doc)
        wamid = f"wamid.MOCK{self._run}{next(self._ids):012d}"
        if self.cfg["record"]:
            self.sent.append(
                {
                    "pnid": pnid,
                    "to": to,
                    "type": kind,
                    "wamid": wamid,
                    "ts": time.time(),
                    "text": (req.get("text") or {}).get("body"),
                    "template": req.get("template"),
                }
            )
        self.counts["sent"] += 1
        late, order = 0.0, self.cfg["status_order"]
        if kind == "text":
            delays, orders, n = self.cfg["text_answer_delays_ms"], self.cfg["text_status_orders"], self.texts_to[to]
            self.texts_to[to] += 1
            late = delays[n] / 1000 if n < len(delays) else 0.0
            order = orders[n] if n < len(orders) else order
        if self.cfg["statuses"] and self.cfg["webhook_url"] and self.cfg["status_first_ms"]:
            await self._post_statuses(pnid, to, wamid, order)
            await asyncio.sleep(self.cfg["status_first_ms"] / 1000)
        elif self.cfg["statuses"] and self.cfg["webhook_url"]:
            task = asyncio.ensure_future(self._post_statuses(pnid, to, wamid, order))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if late < 0:  # held until the test releases it (bounded)
            self._answer_hold = self._answer_hold or asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._answer_hold.wait(), 60)
        elif late:
            await asyncio.sleep(late)
        await self._json(
            send,
            200,
            {
                "messaging_product": "whatsapp",
                "contacts": [{"input": to, "wa_id": self.cfg["wa_ids"].get(to, to)}],
                "messages": [{"id": wamid}],
            },
        )

    async def _post_statuses(self, pnid: str, to: str, wamid: str, order: list[str]) -> None:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession()
        delay = self.cfg["status_delay_ms"] / 1000
        for status in order:
            if status == "hold":
                self._hold = self._hold or asyncio.Event()
                await self._hold.wait()
                continue
            if delay:
                await asyncio.sleep(delay)
            doc = {
                "object": "whatsapp_business_account",
                "entry": [
                    {
                        "id": "0",
                        "changes": [
                            {
                                "field": "messages",
                                "value": {
                                    "messaging_product": "whatsapp",
                                    "metadata": {"display_phone_number": "15550000000", "phone_number_id": pnid},
                                    "statuses": [_status(wamid, status, to)],
                                },
                            }
                        ],
                    }
                ],
            }
            raw = orjson.dumps(doc)
            sig = "sha256=" + hmac.new(self.cfg["app_secret"].encode(), raw, hashlib.sha256).hexdigest()
            try:
                async with self._session.post(
                    self.cfg["webhook_url"],
                    data=raw,
                    headers={"Content-Type": "application/json", "X-Hub-Signature-256": sig},
                ) as resp:
                    await resp.read()
                    self.counts[f"status_posted_{resp.status}"] += 1
            except Exception:
                self.counts["status_post_failed"] += 1

    # ---- control ----------------------------------------------------------------------------
    async def _control(self, send, path: str, method: str, body: bytes) -> None:
        data = orjson.loads(body) if body else {}
        if path == "/_mock/sent":
            if method == "DELETE":
                self.sent.clear()
                self.reads.clear()
                self.counts.clear()
                self.texts_to.clear()
                self.text_posts.clear()
                return await self._json(send, 200, {"cleared": True})
            return await self._json(send, 200, {"sent": list(self.sent)})
        if path == "/_mock/reads":
            return await self._json(send, 200, {"reads": list(self.reads)})
        if path == "/_mock/stats":
            return await self._json(send, 200, dict(self.counts))
        if path == "/_mock/config" and method == "POST":
            self.cfg.update({k: v for k, v in data.items() if k in self.cfg})
            return await self._json(send, 200, self.cfg)
        if path == "/_mock/faults" and method == "POST":
            codes = [int(c) for c in data.get("errors", [])]
            if data.get("nth_text") is not None and codes:
                waiting = self.nth_text_faults[str(data["to"])]
                waiting.setdefault(int(data["nth_text"]), deque()).extend(codes)
                return await self._json(send, 200, {"ok": True})
            self.faults[str(data.get("to", "*"))].extend(codes)
            return await self._json(send, 200, {"ok": True})
        if path == "/_mock/release" and method == "POST":  # the statuses waiting at a "hold" go on
            if self._hold is not None:
                self._hold.set()
                self._hold = None
            if self._answer_hold is not None:
                self._answer_hold.set()
                self._answer_hold = None
            if self._media_hold is not None:
                self._media_hold.set()
                self._media_hold = None
            return await self._json(send, 200, {"ok": True})
        if path == "/_mock/window" and method == "POST":
            (self.closed.discard if data.get("open", True) else self.closed.add)(str(data["wa_id"]))
            return await self._json(send, 200, {"ok": True})
        if path == "/_mock/media" and method == "POST":
            self.media[str(data["id"])] = {
                "data": base64.b64decode(data["data_b64"]),
                "mime_type": data.get("mime_type", "image/jpeg"),
                "url": data.get("url"),
                "hold": bool(data.get("hold")),
            }
            return await self._json(send, 200, {"ok": True})
        return await self._json(send, 404, {"error": "unknown control path"})

    @staticmethod
    async def _bytes(send, status: int, body: bytes, ctype: bytes = b"application/json") -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _json(self, send, status: int, obj) -> None:
        await self._bytes(send, status, orjson.dumps(obj))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mock_graph", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8002)
    p.add_argument("--token", default="graph-token-test", help="the access token sends must carry")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    serve.run(MockGraph(opts), opts.host, opts.port)


if __name__ == "__main__":
    main()
