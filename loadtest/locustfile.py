"""Locust users for the gateway: what its clients do, over HTTP only.

    make loadtest ARGS="--users 50 --spawn-rate 10 --run-time 60s"     # headless, with a summary
    GATEWAY_API_KEY=sk-gw-... .venv-locust/bin/locust -f loadtest/locustfile.py --host http://127.0.0.1:8000

Users (each waits ``LOCUST_WAIT_MIN``..``LOCUST_WAIT_MAX`` seconds between requests, default
0.5..2, like a person or an app between calls; set both to 0 for a closed-loop flood):

- ``ChatUser``: a chat completion, varied prompts, ``max_tokens`` and end users (the ``user``
  field) and attribution metadata;
- ``StreamingChatUser``: the same with ``stream: true``, reading the server-sent events to the
  end. Besides the POST itself ("chat stream (headers)": time to the response headers) it reports
  "chat stream: first token" (time to the first content delta, request type ``SSE``) and
  "chat stream: complete" (the whole stream; a failure when the stream carries an error event,
  ends without ``[DONE]`` or has no content);
- ``EmbeddingUser``: embeddings of one to eight texts;
- ``AgentUser``: multi-turn conversations with an agent (``model: "agent:support"``, the
  conversation id in ``metadata.conversation_id``; only the new message is sent, the gateway
  keeps the memory). **Off by default** (weight 0), since it needs an agent of that name:
  create one (``gateway agents create --name support --model demo-gpt --template support
  --var company_name=Acme``), then ``LOCUST_WEIGHTS=chat=5,stream=3,embed=2,agent=2``.

Environment: ``GATEWAY_API_KEY`` (a virtual key, required), ``GATEWAY_URL`` (the host when
``--host`` is not given; default http://127.0.0.1:8000), ``LOCUST_CHAT_MODEL`` (demo-gpt),
``LOCUST_EMBEDDING_MODEL`` (demo-embedding), ``LOCUST_AGENT_MODEL`` (agent:support),
``LOCUST_WEIGHTS`` (``chat=5,stream=3,embed=2,agent=0``).
"""

from __future__ import annotations

import csv
import json
import os
import random
import time
import uuid

from locust import HttpUser, between, events, task
from locust.runners import WorkerRunner

API_KEY = os.environ.get("GATEWAY_API_KEY", "")
CHAT_MODEL = os.environ.get("LOCUST_CHAT_MODEL", "demo-gpt")
EMBEDDING_MODEL = os.environ.get("LOCUST_EMBEDDING_MODEL", "demo-embedding")
AGENT_MODEL = os.environ.get("LOCUST_AGENT_MODEL", "agent:support")
WAIT = (float(os.environ.get("LOCUST_WAIT_MIN", "0.5")), float(os.environ.get("LOCUST_WAIT_MAX", "2")))


def _weights(spec: str) -> dict[str, int]:
    weights = {"chat": 5, "stream": 3, "embed": 2, "agent": 0}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        if name.strip() not in weights or not value.strip().isdigit():
            raise SystemExit(f"LOCUST_WEIGHTS: {part!r} is not one of chat|stream|embed|agent=<n>")
        weights[name.strip()] = int(value)
    return weights


WEIGHTS = _weights(os.environ.get("LOCUST_WEIGHTS", ""))

SYSTEM = "You are a concise assistant for an online shop. Answer in at most three sentences."
PROMPTS = [
    "Where is my order #{n}? It was supposed to arrive yesterday.",
    "Summarise the return policy for electronics bought during a sale.",
    "Write a friendly two-line reply to a customer who says thanks for the quick refund.",
    "Translate to French: 'Your package has been dispatched and will arrive within 3 days.'",
    "Classify the sentiment of this review: 'Arrived late, but the quality is excellent.'",
    "Extract the product names from: 'I bought a USB-C hub, two HDMI cables and a 27-inch monitor.'",
    "Give me three subject lines for a newsletter about winter jackets, under 60 characters each.",
    "Explain in simple words what a chargeback is and how long it usually takes.",
]
TEXTS = [
    "Wireless noise-cancelling headphones with 30 hours of battery life.",
    "Stainless steel water bottle, keeps drinks cold for 24 hours.",
    "Ergonomic office chair with lumbar support and adjustable armrests.",
    "Refunds are issued to the original payment method within 5 business days.",
    "Orders above 50 EUR ship free within the European Union.",
    "The warranty covers manufacturing defects for two years from delivery.",
    "Gift cards cannot be exchanged for cash and do not expire.",
    "Track your parcel with the link in your confirmation email.",
]
TURNS = [
    "Hi, I need help with an order I placed last week.",
    "The order number is {n}. The tracking page has not changed for four days.",
    "Can you send a replacement instead of a refund?",
    "What address do you have on file for me?",
    "OK, please go ahead. Will I get an email confirmation?",
    "Thanks, that's all for now.",
]


def _prompt() -> str:
    return random.choice(PROMPTS).format(n=random.randint(100000, 999999))


def _chat_body(stream: bool) -> dict:
    body = {
        "model": CHAT_MODEL,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": _prompt()}],
        "max_tokens": random.choice([64, 128, 256]),
        "temperature": 0.3,
        "user": f"shopper-{random.randint(1, 200)}",
        "metadata": {"workflow": "support-chat", "tags": ["locust"]},
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


_ENV: list = []  # the locust Environment, kept at init for the quit listener


@events.init.add_listener
def _require_key(environment, **_kwargs) -> None:
    if not API_KEY:
        raise SystemExit("set GATEWAY_API_KEY to a virtual key (gateway keys create --name locust)")
    _ENV.append(environment)


@events.quit.add_listener
def _final_csv(**_kwargs) -> None:
    """The final statistics as CSV, for loadtest/locust_summary.py (locust's own --csv files are
    its last periodic snapshot, taken before the requests still running at the end finished)."""
    prefix = os.environ.get("LOCUST_RESULTS_PREFIX")
    if not prefix or not _ENV or isinstance(_ENV[-1].runner, WorkerRunner):
        return
    environment = _ENV[-1]
    from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

    writer = StatsCSV(environment, PERCENTILES_TO_REPORT)
    with open(f"{prefix}_stats.csv", "w", newline="") as f:
        writer.requests_csv(csv.writer(f))
    with open(f"{prefix}_failures.csv", "w", newline="") as f:
        writer.failures_csv(csv.writer(f))


class GatewayUser(HttpUser):
    abstract = True
    host = os.environ.get("GATEWAY_URL", "http://127.0.0.1:8000")
    wait_time = between(*WAIT)

    def on_start(self) -> None:
        self.client.headers.update({"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})

    def _post_json(self, path: str, body: dict, name: str, check) -> None:
        with self.client.post(path, json=body, name=name, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            try:
                problem = check(resp.json())
            except ValueError:
                problem = "response is not JSON"
            if problem:
                resp.failure(problem)


class ChatUser(GatewayUser):
    weight = WEIGHTS["chat"]
    abstract = weight == 0

    @task
    def chat(self) -> None:
        def check(data: dict) -> str | None:
            choices = data.get("choices") or []
            if not choices or not choices[0].get("message", {}).get("content"):
                return "no content in the first choice"
            return None

        self._post_json("/v1/chat/completions", _chat_body(stream=False), "chat", check)


class StreamingChatUser(GatewayUser):
    weight = WEIGHTS["stream"]
    abstract = weight == 0

    def _report(self, name: str, started: float, ms: float, length: int, error: str | None) -> None:
        events.request.fire(
            request_type="SSE",
            name=name,
            response_time=ms,
            response_length=length,
            exception=Exception(error) if error else None,
            context={},
            start_time=started,
            url="/v1/chat/completions",
        )

    @task
    def chat_stream(self) -> None:
        started_at = time.time()
        t0 = time.perf_counter()
        first_token: float | None = None
        done = False
        error: str | None = None
        size = 0
        with self.client.post(
            "/v1/chat/completions",
            json=_chat_body(stream=True),
            name="chat stream (headers)",
            stream=True,
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            try:
                for line in resp.iter_lines(chunk_size=None, decode_unicode=False):
                    size += len(line) + 1
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        done = True
                        break
                    event = json.loads(payload)
                    if "error" in event:
                        error = f"error event: {str(event['error'].get('message'))[:200]}"
                        break
                    if first_token is None:
                        for choice in event.get("choices") or []:
                            if (choice.get("delta") or {}).get("content"):
                                first_token = time.perf_counter()
                                self._report("chat stream: first token", started_at, (first_token - t0) * 1000, 0, None)
                                break
            except Exception as exc:  # a dropped connection, a malformed event
                error = f"{type(exc).__name__}: {exc}"
            if error is None and not done:
                error = "stream ended without [DONE]"
            if error is None and first_token is None:
                error = "stream carried no content"
            resp.success()  # the headers were fine; the stream's own outcome is reported below
        self._report("chat stream: complete", started_at, (time.perf_counter() - t0) * 1000, size, error)


class EmbeddingUser(GatewayUser):
    weight = WEIGHTS["embed"]
    abstract = weight == 0

    @task
    def embed(self) -> None:
        texts = random.sample(TEXTS, random.randint(1, 8))

        def check(data: dict) -> str | None:
            items = data.get("data") or []
            if len(items) != len(texts) or not all(item.get("embedding") for item in items):
                return f"expected {len(texts)} embeddings, got {len(items)}"
            return None

        body = {"model": EMBEDDING_MODEL, "input": texts, "user": f"indexer-{random.randint(1, 5)}"}
        self._post_json("/v1/embeddings", body, "embeddings", check)


class AgentUser(GatewayUser):
    """A customer in a conversation with an agent: a few turns under one conversation id,
    then a new conversation. Off unless LOCUST_WEIGHTS gives ``agent`` a weight (the agent
    named by LOCUST_AGENT_MODEL must exist)."""

    weight = WEIGHTS["agent"]
    abstract = weight == 0

    def on_start(self) -> None:
        super().on_start()
        self._new_conversation()

    def _new_conversation(self) -> None:
        self.conversation_id = f"locust-{uuid.uuid4()}"
        self.turn = 0
        self.length = random.randint(3, len(TURNS))

    @task
    def agent_turn(self) -> None:
        message = TURNS[self.turn].format(n=random.randint(100000, 999999))
        body = {
            "model": AGENT_MODEL,
            "messages": [{"role": "user", "content": message}],
            "user": f"customer-{self.conversation_id[-6:]}",
            "metadata": {"conversation_id": self.conversation_id, "tags": ["locust"]},
        }

        def check(data: dict) -> str | None:
            choices = data.get("choices") or []
            if not choices or not (choices[0].get("message") or {}).get("content"):
                return "no content in the agent's reply"
            return None

        self._post_json("/v1/chat/completions", body, "agent turn", check)
        self.turn += 1
        if self.turn >= self.length:
            self._new_conversation()
