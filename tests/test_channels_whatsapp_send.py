"""A WhatsApp answer of several pieces when Meta accepts some of them and refuses others at once:
each piece reaches the customer exactly once, in order. Real processes: a gateway with the
channel worker inside, the mock Graph API (loadtest/mock_graph.py) and the mock LLM as real HTTP
servers, webhooks signed like Meta's."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import asyncpg
import pytest
import redis.asyncio as aioredis

from channels.config import whatsapp_accounts
from channels.whatsapp import store
from channels.whatsapp.content import split_reply
from channels.whatsapp.graph import Graph, GraphError
from channels.whatsapp.sender import STATE_TTL, Sender, forget_states, state_key
from core.queue import Retry
from tests.conftest import Gateway, environ, run_cli, wait_until
from tests.test_channels_whatsapp import admin, new_wa_id, notification, post, queue_idle, rows, text

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


def _account(graph, key: str) -> dict:
    return {
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


@pytest.fixture(scope="module")
def wa(tmp_root, services, module_mock, graph):
    out = run_cli("keys", "create", "--name", f"wasend-{RUN}", "--tenant", TENANT, urls=services, tmp=tmp_root)
    assert out.returncode == 0, out.stderr
    key = out.stdout.splitlines()[0].strip()
    config = {
        "router": {"max_attempts": 1},
        "providers": [{"name": "llm", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k"]}],
        "models": [{"name": "agent-model", "deployments": [{"provider": "llm", "model": "m"}]}],
        "channels": {"whatsapp": {ACCOUNT: _account(graph, key)}},
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


def _window_template(wa) -> None:
    """The account's window template (one variable: the text), registered."""
    tpl = {"account": ACCOUNT, "name": WINDOW, "variables": ["reply"]}
    assert admin(wa, "POST", "/admin/channels/whatsapp/templates", json=tpl).status_code == 201


def _statuses_in_order(wa, graph, orders: list) -> None:
    """The mock sends status webhooks for the free-form pieces, the n-th piece's in ``orders[n]``."""
    graph.configure(
        statuses=True,
        webhook_url=f"{wa.url}/channels/whatsapp/{ACCOUNT}",
        app_secret=SECRET,
        text_status_orders=orders,
    )


def test_a_retry_that_finds_the_window_closed_sends_as_templates_only_the_pieces_not_yet_sent(wa, graph, services):
    """Meta accepts the first piece of a three-piece answer and refuses the second at once
    (130429, answered late); by the retry the customer's 24-hour window has closed, so the rest
    goes as the window template. The retry sent the whole answer as templates: the customer read
    the first piece a second time. The templates now carry pieces 2 and 3 only."""
    _window_template(wa)
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


# ---- free-form pieces: Meta accepts them all and fails a later one for the closed window --------
@pytest.mark.parametrize("third", [["failed:131047"], []])
def test_a_piece_failed_later_for_the_closed_window_is_followed_by_templates_of_only_what_did_not_arrive(
    wa, graph, third
):
    """A three-piece answer: Meta accepts every piece, delivers the first, and fails the second
    later for the closed 24-hour window (a 131047 status); the third fails too, or its status is
    not in yet when the window templates go (one job per answer). The templates carried the whole
    answer: the customer read piece 1 a second time. They now carry pieces 2 and 3, once, in order,
    after piece 1."""
    _window_template(wa)
    _statuses_in_order(wa, graph, [["sent", "delivered"], ["failed:131047"], third])
    try:
        wa_id = new_wa_id()
        answer = _ask(wa, wa_id, [_sentences("A", 95), _sentences("B", 95), _sentences("C", 95)])
        pieces = split_reply(answer)
        assert len(pieces) == 3
        rest = " ".join(" ".join(pieces[1:]).split())

        def params() -> list[str]:
            return [s["template"]["components"][0]["parameters"][0]["text"] for s in graph.sent_to(wa_id)[3:]]

        wait_until(lambda: len(" ".join(params())) >= len(rest), timeout=60, what="the rest's templates")
        wait_until(lambda: queue_idle(wa, "wa-status") and queue_idle(wa, "wa-inbound"), what="statuses processed")
    finally:
        graph.configure(statuses=False, text_status_orders=[])
    sent = graph.sent_to(wa_id)
    assert [s["text"] for s in sent[:3]] == pieces and all(s["type"] == "template" for s in sent[3:])
    assert " ".join(params()) == rest  # piece 1 not again, pieces 2 and 3 whole, in order


def _status_of(services, wamid: str) -> str | None:
    found = rows(services[0], "SELECT status FROM whatsapp_messages WHERE tenant = $1 AND wamid = $2", TENANT, wamid)
    return found[0]["status"] if found else None


def test_a_pieces_own_failure_that_comes_after_a_later_pieces_is_carried_by_the_templates_once_in_order(
    wa, graph, services
):
    """Both free-form pieces of an answer fail later for the closed window (131047), and the
    second piece's failure is handled before the first's comes in (the status queue is
    unordered). Its window templates counted the first piece as received (accepted, not failed
    yet) and carried the second only: the customer never read the first, recorded ``failed``.
    The templates now wait for the first piece's own status and carry both, once, in order."""
    _window_template(wa)
    _statuses_in_order(wa, graph, [["sent", "hold", "failed:131047"], ["failed:131047"]])
    try:
        wa_id = new_wa_id()
        answer = _ask(wa, wa_id, [_sentences("A", 95), _sentences("B", 95)])
        pieces = split_reply(answer)
        assert len(pieces) == 2
        wait_until(lambda: len(graph.sent_to(wa_id)) >= 2, timeout=60, what="both pieces")
        first, second = (s["wamid"] for s in graph.sent_to(wa_id)[:2])
        wait_until(lambda: _status_of(services, second) == "failed", timeout=60, what="the second piece failed")

        def handled() -> bool:  # its window job ran: it sent templates, or waits (a retry)
            stats = admin(wa, "GET", "/admin/queues/wa-inbound").json()
            return len(graph.sent_to(wa_id)) > 2 or stats["delayed"] > 0

        wait_until(handled, timeout=60, what="the second piece's failure handled")
        graph._post("/_mock/release", {})  # the first piece's own failure comes in now
        wait_until(lambda: _status_of(services, first) == "failed", timeout=60, what="the first piece failed")
        wait_until(lambda: queue_idle(wa, "wa-status") and queue_idle(wa, "wa-inbound"), what="statuses processed")
    finally:
        graph._post("/_mock/release", {})
        graph.configure(statuses=False, text_status_orders=[])
    sent = graph.sent_to(wa_id)
    assert [s["text"] for s in sent[:2]] == pieces and all(s["type"] == "template" for s in sent[2:])
    params = [s["template"]["components"][0]["parameters"][0]["text"] for s in sent[2:]]
    assert " ".join(params) == " ".join(answer.split())  # both pieces, once each, in order
    templates = rows(
        services[0],
        "SELECT status FROM whatsapp_messages WHERE tenant = $1 AND wa_id = $2 AND kind = 'template'",
        TENANT,
        wa_id,
    )
    assert len(templates) == len(params) and {r["status"] for r in templates} <= {"sent", "delivered", "read"}


# ---- two tries of one key at once ---------------------------------------------------------------
async def _until(check, what: str, bound_s: float = 30.0) -> None:
    """Polls an async condition until it holds (bounded)."""
    end = asyncio.get_running_loop().time() + bound_s
    while not await check():
        if asyncio.get_running_loop().time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def _senders(services, n: int, lease_s: float | None = None):
    """The pool and ``n`` Senders, each with its own Redis client and Graph connections, on the
    real Redis, PostgreSQL and mock Graph API (the tries of a key in two workers)."""
    import redis.asyncio as aioredis

    pool = await asyncpg.create_pool(services[0], min_size=1, max_size=4)
    clients = [aioredis.from_url(services[1]) for _ in range(n)]
    graphs = [Graph() for _ in range(n)]
    try:
        yield pool, [Sender(r, pool, g, lease_s=lease_s) for r, g in zip(clients, graphs, strict=True)]
    finally:
        for g in graphs:
            await g.close()
        for r in clients:
            await r.aclose()
        await pool.close()


async def _records(pool, wa_id: str) -> list[dict]:
    found = await pool.fetch(
        "SELECT status, error, body FROM whatsapp_messages WHERE tenant = $1 AND wa_id = $2"
        " AND direction = 'out' AND kind = 'human' ORDER BY id",
        TENANT,
        wa_id,
    )
    return [dict(r) for r in found]


async def _two_tries(services, graph, wa_id: str, text: str, second) -> tuple[list, list]:
    """Two tries of one key at once: try one begins the send; when its first piece reads
    ``pending`` (it is inside its POST, held there by the mock), ``second(b, acct, conv, key,
    first)`` runs the other try. Then try one is awaited, and one more try of the key runs after
    both (a queue's retry). The outcomes of the three tries, and the key's records."""
    acct = whatsapp_accounts({ACCOUNT: _account(graph, "sk-unused-000000")})[ACCOUNT]
    key = f"deliver:human:{wa_id}"
    outcomes: list = []
    async with _senders(services, 2) as (pool, (a, b)):
        conv = await store.get_conversation(pool, TENANT, ACCOUNT, PNID, wa_id)
        assert conv is not None and conv.window_open()
        first = asyncio.ensure_future(a.send_text(acct, conv, key, text, kind="human"))

        async def pending() -> bool:
            return (await a.state(ACCOUNT, key)).get("p0") == "pending"

        await _until(pending, "the first piece on its way")
        outcomes.append(await _outcome(second(b, acct, conv, key, first)))
        outcomes.append(await _outcome(first))
        outcomes.append(await _outcome(b.send_text(acct, conv, key, text, kind="human")))
        assert "pending" not in (await a.state(ACCOUNT, key)).values()
        return outcomes, await _records(pool, wa_id)


async def _outcome(aw) -> str:
    try:
        out = await aw
    except Retry:
        return "retry"
    except GraphError as exc:
        return f"error {exc.status}"
    return out.status


def _answered(wa, graph, wa_id: str) -> None:
    """A turn first: the conversation exists, its window open (the mock's first text to the number)."""
    _ask(wa, wa_id, ["hello"])
    wait_until(lambda: graph.sent_to(wa_id), timeout=60, what="the turn's answer")
    _turn_done(wa)


def test_a_second_try_of_a_key_while_the_first_is_inside_its_post_waits_and_records_nothing_false(wa, graph, services):
    """An admin's reply of three pieces delivered twice at once (or a job taken over from a slow
    but live worker): the second try found the first piece ``pending`` while the first try was
    still inside its POST, concluded that try's worker had stopped, recorded the piece as of
    unknown fate ("the worker stopped during the send") and went on with the later pieces. Now
    the first try owns the piece for its lease: the second waits (a retry), records nothing, and
    the customer reads each piece once, in order."""
    wa_id = new_wa_id()
    _answered(wa, graph, wa_id)
    text = " ".join([_sentences("A", 95), _sentences("B", 95), _sentences("C", 95)])
    pieces = split_reply(text)
    assert len(pieces) == 3
    graph.configure(text_answer_delays_ms=[0, 3000])  # the first piece's POST is answered 3 s late
    try:

        def second(b, acct, conv, key, first):
            return b.send_text(acct, conv, key, text, kind="human")

        outcomes, records = asyncio.run(_two_tries(services, graph, wa_id, text, second))
    finally:
        graph.configure(text_answer_delays_ms=[])
    assert [(r["status"], r["body"]) for r in records] == [("sent", p) for p in pieces], records
    assert [s["text"] for s in graph.sent_to(wa_id)[1:]] == pieces
    assert outcomes == ["retry", "sent", "sent"]


def test_a_try_that_read_a_piece_pending_before_its_send_failed_sends_it_not_records_it_unknown(wa, graph, services):
    """The second try of a key read its state while the first try's POST of the first piece was
    on its way (as a worker's turn reads it before it sends); that POST then failed (a 500: it
    never reached the customer) and the first try released the piece for a retry. The second
    try marked the piece ``unknown`` anyway: it was never sent, and the customer read only the
    later pieces. Now the piece is taken over only while it still reads ``pending`` (one script):
    the second try sends all three, in order."""
    wa_id = new_wa_id()
    _answered(wa, graph, wa_id)
    fail = '[[graph:{"error": 500, "times": 1, "delay_ms": 2000}]]'
    text = " ".join([f"{fail} " + _sentences("A", 90), _sentences("B", 95), _sentences("C", 95)])
    pieces = split_reply(text)
    assert len(pieces) == 3 and fail in pieces[0]

    async def second(b, acct, conv, key, first):
        stale = await b.state(ACCOUNT, key)  # the first piece reads "pending"
        with pytest.raises(GraphError):
            await first  # its POST failed: the piece is released
        return await b.send_text(acct, conv, key, text, kind="human", state=stale)

    outcomes, records = asyncio.run(_two_tries(services, graph, wa_id, text, second))
    assert outcomes == ["sent", "error 500", "sent"], outcomes
    assert [s["text"] for s in graph.sent_to(wa_id)[1:]] == pieces
    assert [(r["status"], r["body"]) for r in records] == [("sent", p) for p in pieces], records


def test_a_piece_an_older_release_left_pending_is_waited_for_one_lease_then_recorded_unknown(wa, graph, services):
    """Rolling deploy: a worker of the release before leases left the first piece ``pending``,
    with no lease. That try may still be inside its POST: the new try gives it one lease from
    when it first finds the piece (a retry meanwhile); after that the piece is of unknown fate
    (recorded once, never re-sent) and the later pieces go, in order."""
    wa_id = new_wa_id()
    _answered(wa, graph, wa_id)
    text = " ".join([_sentences("A", 95), _sentences("B", 95), _sentences("C", 95)])
    pieces = split_reply(text)
    acct = whatsapp_accounts({ACCOUNT: _account(graph, "sk-unused-000000")})[ACCOUNT]
    key = f"deliver:human:{wa_id}"

    async def go() -> tuple[list, list]:
        async with _senders(services, 1, lease_s=1.0) as (pool, (sender,)):
            conv = await store.get_conversation(pool, TENANT, ACCOUNT, PNID, wa_id)
            skey = state_key(ACCOUNT, key)
            await sender.kv.note(skey, 3600, {"started": "1", "p0": "pending"})  # as the older try left it
            outcomes = [await _outcome(sender.send_text(acct, conv, key, text, kind="human"))]

            async def done() -> bool:
                outcomes.append(await _outcome(sender.send_text(acct, conv, key, text, kind="human")))
                return outcomes[-1] != "retry"

            await _until(done, "the older try's lease run out")
            return outcomes, await _records(pool, wa_id)

    outcomes, records = asyncio.run(go())
    assert outcomes[0] == "retry" and outcomes[-1] == "sent"
    assert [s["text"] for s in graph.sent_to(wa_id)[1:]] == pieces[1:]
    assert [(r["status"], r["body"]) for r in records] == [("unknown", pieces[0])] + [("sent", p) for p in pieces[1:]]
    assert records[0]["error"] == "the worker stopped during the send"


def test_a_piece_settled_after_its_key_was_erased_mid_send_leaves_no_key_without_expiry(wa, graph, services):
    """An erasure of the conversation (``forget_states``) while a piece's POST is on its way: the
    settle that follows wrote the wamid into a hash the erasure had deleted, creating it anew with
    no expiry (and outside the conversation's index): a key that never went away. Now the settle
    gives a hash it creates the state's expiry."""
    wa_id = new_wa_id()
    _answered(wa, graph, wa_id)
    text = _sentences("A", 20)
    acct = whatsapp_accounts({ACCOUNT: _account(graph, "sk-unused-000000")})[ACCOUNT]
    key = f"deliver:human:{wa_id}"

    async def go() -> int:
        async with _senders(services, 1) as (pool, (sender,)):
            conv = await store.get_conversation(pool, TENANT, ACCOUNT, PNID, wa_id)
            first = asyncio.ensure_future(sender.send_text(acct, conv, key, text, kind="human"))

            async def pending() -> bool:
                return (await sender.state(ACCOUNT, key)).get("p0") == "pending"

            await _until(pending, "the piece on its way")
            r = aioredis.from_url(services[1])
            try:
                assert await forget_states(r, TENANT, [conv.conversation_id]) >= 1
                assert (await first).status == "sent"
                assert (await sender.state(ACCOUNT, key)).get("p0") not in (None, "pending", "unknown")
                return int(await r.ttl(state_key(ACCOUNT, key)))
            finally:
                await r.aclose()

    graph.configure(text_answer_delays_ms=[0, 2000])  # (after the turn's answer) answered 2 s late
    try:
        ttl = asyncio.run(go())
    finally:
        graph.configure(text_answer_delays_ms=[])
    assert 0 < ttl <= STATE_TTL, ttl
