"""A WhatsApp answer of several pieces when Meta accepts some of them and refuses others at once:
each piece reaches the customer exactly once, in order. Real processes: a gateway with the
channel worker inside, the mock Graph API (loadtest/mock_graph.py) and the mock LLM as real HTTP
servers, webhooks signed like Meta's."""

from __future__ import annotations

import time
import uuid

import pytest

from channels.whatsapp.content import split_reply
from tests.conftest import Gateway, environ, run_cli, wait_until
from tests.test_channels_whatsapp import GraphMock, admin, new_wa_id, notification, post, queue_idle, rows, text

RUN = uuid.uuid4().hex[:6]
TENANT = f"wasend-{RUN}"
AGENT = f"wasendbot-{RUN}"
ACCOUNT = "wasend"
PNID = "9119"
SECRET = "wasend-app-secret-0123"
GRAPH_TOKEN = "graph-token-test"  # the token GraphMock is started with
WINDOW = "wasendwindow"
WA_ENV = {
    "GATEWAY_CHANNEL_WORKER": "1",
    "GATEWAY_WA_VISIBILITY_TIMEOUT": "2",
    "GATEWAY_WA_MAX_RETRIES": "1",
    "GATEWAY_WA_BACKOFF": "0.2",
}


@pytest.fixture(scope="module")
def graph(tmp_root):
    g = GraphMock(tmp_root)
    yield g
    g.stop()


@pytest.fixture(scope="module")
def wa(tmp_root, services, module_mock, graph):
    out = run_cli("keys", "create", "--name", f"wasend-{RUN}", "--tenant", TENANT, urls=services, tmp=tmp_root)
    assert out.returncode == 0, out.stderr
    key = out.stdout.splitlines()[0].strip()
    config = {
        "router": {"max_attempts": 1},
        "providers": [{"name": "llm", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k"]}],
        "models": [{"name": "agent-model", "deployments": [{"provider": "llm", "model": "m"}]}],
        "channels": {
            "whatsapp": {
                ACCOUNT: {
                    "tenant": TENANT,
                    "phone_numbers": {PNID: AGENT},
                    "app_secret": SECRET,
                    "verify_token": "verify-token-0123",
                    "access_token": GRAPH_TOKEN,
                    "api_key": key,
                    "graph_base_url": graph.url,
                    "window_template": WINDOW,
                    "debounce": 1.0,  # the messages of one notification are one turn: a long answer
                    "fallback_message": "Sorry, we are having trouble.",
                }
            }
        },
    }
    with environ(WA_ENV):
        gw = Gateway(tmp_root, config, services)
    body = {"name": AGENT, "tenant": TENANT, "model": "agent-model", "template": "You help our customers."}
    r = admin(gw, "POST", "/admin/agents", json=body)
    assert r.status_code == 201, r.text
    yield gw
    gw.stop()


def _ask(gw: Gateway, wa_id: str, bodies: list[str], *, ts: float | None = None) -> str:
    """One notification of several messages (one turn): the answer the mock LLM echoes back."""
    msgs = [text(wa_id, b, ts=ts) for b in bodies]
    r = post(gw, ACCOUNT, notification(msgs, pnid=PNID, name="Ada"), secret=SECRET)
    assert r.status_code == 200, r.text
    return "echo: " + "\n".join(bodies)


def _sentences(tag: str, n: int) -> str:
    return " ".join(f"Part {tag} sentence {i:03d} of the answer." for i in range(n))


def _turn_done(gw: Gateway) -> None:
    wait_until(lambda: queue_idle(gw, "wa-inbound"), timeout=60, what="the turn done (sent, or dead-lettered)")


# ---- free-form pieces: Meta refuses the second at once ------------------------------------------
@pytest.mark.parametrize("error", [429, 500])
def test_a_second_piece_refused_at_once_is_sent_after_the_first_and_the_first_is_not_sent_again(wa, graph, error):
    """A three-piece answer: Meta accepts the first piece, refuses the second at once (an HTTP 429,
    or a 5xx), then takes it on the retry. The customer reads pieces 1, 2 and 3 exactly once
    each, in that order."""
    wa_id = new_wa_id()
    graph._post("/_mock/faults", {"to": wa_id, "errors": [error], "nth_text": 2})
    answer = _ask(wa, wa_id, [_sentences("A", 95), _sentences("B", 95), _sentences("C", 95)])
    pieces = split_reply(answer)
    assert len(pieces) == 3
    wait_until(lambda: len(graph.sent_to(wa_id)) >= 3, timeout=60, what="three pieces")
    _turn_done(wa)
    assert graph.stats().get(f"error_{error}", 0) >= 1  # the second piece was refused once
    assert [s["text"] for s in graph.sent_to(wa_id)] == pieces


def test_a_retry_that_finds_the_window_closed_sends_as_templates_only_the_pieces_not_yet_sent(wa, graph, services):
    """Meta accepts the first piece of a three-piece answer and refuses the second at once
    (130429, answered late); by the retry the customer's 24-hour window has closed, so the rest
    goes as the window template. The retry sent the whole answer as templates: the customer read
    the first piece a second time. The templates now carry pieces 2 and 3 only."""
    tpl = {"account": ACCOUNT, "name": WINDOW, "variables": ["reply"]}
    assert admin(wa, "POST", "/admin/channels/whatsapp/templates", json=tpl).status_code == 201
    throttle = '[[graph:{"error": 130429, "times": 1, "delay_ms": 4000}]]'
    wa_id = new_wa_id()
    answer = _ask(wa, wa_id, [_sentences("A", 116), f"{throttle} " + _sentences("B", 100), _sentences("C", 60)])
    pieces = split_reply(answer)
    assert len(pieces) == 3 and throttle in pieces[1]
    # Piece 1 went; the first try's answer for piece 2 is a refusal, held back 4 s by the mock.
    # Meanwhile the window closes (the customer wrote 25 hours ago): the try already read it open.
    wait_until(lambda: graph.sent_to(wa_id), timeout=60, what="the first piece")
    moved = rows(
        services[0],
        "UPDATE whatsapp_conversations SET last_inbound_at = now() - interval '25 hours'"
        " WHERE tenant = $1 AND wa_id = $2 RETURNING 1",
        TENANT,
        wa_id,
    )
    assert moved
    _turn_done(wa)
    sent = graph.sent_to(wa_id)
    assert [s["type"] for s in sent][:1] == ["text"] and sent[0]["text"] == pieces[0]
    assert all(s["type"] == "template" for s in sent[1:])
    params = [s["template"]["components"][0]["parameters"][0]["text"] for s in sent[1:]]
    assert " ".join(params) == " ".join(" ".join(pieces[1:]).split())


# ---- window templates: the template registered again, with a longer body, between tries ---------
def _hydrated(body: str, params: list[str]) -> str:
    for i, p in enumerate(params, 1):
        body = body.replace(f"{{{{{i}}}}}", p)
    return body


def test_a_window_template_registered_again_with_a_longer_body_between_tries_never_runs_past_1024(wa, graph):
    """Outside the window a long answer goes as several window templates, cut for the room the
    template's body leaves (1,024 filled in). The second template is refused at once (130429,
    answered late); while it is on its way an admin registers the template again with a longer
    approved body. The retry cut the rest of the answer for the room its first try pinned: each
    template ran past Meta's 1,024 (132005) and the customer never read the rest of the answer.
    The retry keeps the template Meta accepted and cuts the rest for the body as it is now."""
    short = "Our answer: {{1}}"
    longer = "Hello again! We are sorry this took a while. " * 8 + "Here is our answer to your message: {{1}}"
    tpl = {"account": ACCOUNT, "name": WINDOW, "variables": ["reply"], "body": short}
    assert admin(wa, "POST", "/admin/channels/whatsapp/templates", json=tpl).status_code == 201
    graph.configure(templates={WINDOW: short})
    throttle = '[[graph:{"error": 130429, "times": 1, "on": "template", "delay_ms": 4000}]]'
    try:
        wa_id = new_wa_id()
        # about 2,900 characters: three templates of the short body; the throttle in the second
        answer = _ask(
            wa, wa_id, [_sentences("A", 28) + f" {throttle} " + _sentences("B", 50)], ts=time.time() - 25 * 3600
        )
        whole = " ".join(answer.split())
        # The first template went (the whole answer was cut for the short body before it did); the
        # second one's refusal is held back 4 s by the mock. Meanwhile the template is registered
        # again, as WhatsApp Manager now approves it.
        wait_until(lambda: graph.sent_to(wa_id), timeout=60, what="the first template")
        registered = admin(wa, "POST", "/admin/channels/whatsapp/templates", json={**tpl, "body": longer})
        assert registered.status_code == 201, registered.text
        graph.configure(templates={WINDOW: longer})
        _turn_done(wa)
    finally:
        graph.configure(templates={})
    sent = graph.sent_to(wa_id)
    assert sent and all(s["type"] == "template" for s in sent)
    params = [s["template"]["components"][0]["parameters"][0]["text"] for s in sent]
    assert graph.stats().get("error_132005", 0) == 0
    assert len(_hydrated(short, params[:1])) <= 1024
    assert all(len(_hydrated(longer, [p])) <= 1024 for p in params[1:]), [len(p) for p in params]
    assert " ".join(params) == whole  # the whole answer, each part of it once, in order
