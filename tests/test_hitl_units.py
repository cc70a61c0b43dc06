"""Human in the loop, part by part: the confidence score, the agent settings, the delivery
registry with a real deliverer, and the escalation queue's SQL on the embedded PostgreSQL
(concurrent claims, SKIP LOCKED, aging, leases, row-level security, SLA alerts claimed once by
two sweepers)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from core.errors import InvalidRequest, NotFound
from gateway.db import migrate, tenant_transaction
from runtime.delivery import Delivered, Delivery, Outbound
from runtime.hitl import confidence, escalations, held, learning, sla
from runtime.hitl import settings as hitl_settings
from runtime.hitl.confidence import Signals

ON = hitl_settings.build({"enabled": True, "threshold": 0.4})


# ---- confidence ---------------------------------------------------------------------------------
def test_a_plain_answer_is_confident():
    c = confidence.score(Signals(question="What are your opening hours?", answer="9 to 5."), ON)
    assert c.score == 1.0 and c.reasons == [] and not c.escalate


def test_asking_for_a_person_escalates_whatever_the_score():
    c = confidence.score(Signals(question="Can I talk to a person please"), ON)
    assert c.escalate and c.rule == "asked_for_human" and "asked_for_human" in c.reasons
    off = confidence.score(Signals(question="Can I talk to a person please"), hitl_settings.build({}))
    assert not off.escalate and off.reasons == ["asked_for_human"]  # scored and recorded, never escalated


def test_escalate_tool_scores_zero_with_its_urgency():
    c = confidence.score(Signals(question="hm", escalate_tool=True, escalate_urgency="high"), ON)
    assert c.score == 0.0 and c.rule == "escalate_tool" and c.urgency == "high"
    bogus = confidence.score(Signals(escalate_tool=True, escalate_urgency="whenever"), ON)
    assert bogus.urgency == "normal"


def test_low_logprobs_escalate_below_threshold():
    c = confidence.score(Signals(question="x", logprobs=[-2.0, -2.0, -2.0]), ON)
    assert c.escalate and c.rule is None and c.reasons == ["low_logprobs"] and c.score < 0.2
    sure = confidence.score(Signals(question="x", logprobs=[-0.01, -0.02]), ON)
    assert not sure.escalate and sure.reasons == []


def test_repeated_question_and_negative_sentiment():
    c = confidence.score(Signals(question="Where is my order?", previous_questions=["where is my order"]), ON)
    assert "repeated_question" in c.reasons and c.escalate
    angry = confidence.score(Signals(question="This is terrible, useless and ridiculous service"), ON)
    assert angry.reasons == ["negative_sentiment"] and angry.urgency == "high" and angry.score == 0.4
    assert not angry.escalate  # 0.4 is not below 0.4


def test_retrieval_strength_and_failures():
    none = confidence.score(Signals(question="q", has_knowledge=True, sources=0), ON)
    assert none.reasons == ["no_sources"] and none.score == 0.45 and not none.escalate
    weak = confidence.score(Signals(question="q", has_knowledge=True, sources=2, best_similarity=0.1), ON)
    assert weak.reasons == ["weak_sources"] and weak.score == 0.5
    both = confidence.score(Signals(question="q", tool_failures=1, fallback=True), ON)
    assert both.reasons == ["tool_failure", "fallback"] and both.escalate and both.score == 0.12


def test_routes_and_urgent_phrases():
    s = hitl_settings.build(
        hitl_settings.check(
            {"enabled": True, "routes": [{"phrases": ["refund"], "team": "billing", "urgency": "high"}]}
        )
    )
    c = confidence.score(Signals(question="I want a REFUND"), s)
    assert c.team == "billing" and c.urgency == "high"
    assert confidence.score(Signals(question="this is urgent"), s).urgency == "urgent"


@pytest.mark.parametrize(
    ("value", "param"),
    [
        ({"threshold": 2}, "escalation.threshold"),
        ({"bogus": 1}, "escalation.bogus"),
        ({"mode": "x"}, "escalation.mode"),
        ({"team": "a b"}, "escalation.team"),
        ({"phrases": ["x" * 101]}, "escalation.phrases[0]"),
        ({"routes": [{"team": "x"}]}, "escalation.routes[0]"),
        ({"judge": {"model": "m", "weight": 0}}, "escalation.judge.weight"),
        ({"hold_message": "x" * 3000}, "escalation.hold_message"),
    ],
)
def test_settings_refused_naming_the_field(value, param):
    with pytest.raises(InvalidRequest) as exc:
        hitl_settings.check(value)
    assert exc.value.param == param


def test_settings_defaults_follow_the_escalate_builtin():
    assert hitl_settings.build({}, default_enabled=True).enabled
    assert not hitl_settings.build({"enabled": False}, default_enabled=True).enabled
    assert hitl_settings.build(hitl_settings.check({"hold_message": ""})).hold_message == ""


def test_training_line_is_openai_fine_tuning_shape():
    line = learning.training_line({"question": "q?", "answer": "a."})
    assert orjson.loads(line) == {
        "messages": [{"role": "user", "content": "q?"}, {"role": "assistant", "content": "a."}]
    }
    assert line.endswith(b"\n")


# ---- delivery through a registered channel ------------------------------------------------------
class Phone:
    """A channel deliverer as a channel package registers it: it owns the conversations it
    started (its own records), sends to those and answers None for the rest."""

    def __init__(self) -> None:
        self.owned: set[tuple[str, str]] = set()
        self.sent: list[Outbound] = []

    async def deliver(self, message: Outbound) -> Delivered | None:
        if (message.tenant, message.conversation_id) not in self.owned:
            return None
        self.sent.append(message)
        return Delivered("whatsapp", "sent", f"wamid.{len(self.sent)}")


class Broken:
    async def deliver(self, message: Outbound) -> Delivered | None:
        raise ConnectionError("down")


def test_delivery_goes_to_the_channel_that_owns_the_conversation():
    delivery = Delivery()
    phone = Phone()
    phone.owned.add(("acme", "wa-1"))
    delivery.register("whatsapp", phone)
    reply = Outbound("acme", "support", "wa-1", "Hello from a person", ref="esc_1")
    assert asyncio.run(delivery.deliver(reply)) == Delivered("whatsapp", "sent", "wamid.1")
    assert phone.sent == [reply]
    # the same id in another tenant is not the channel's: a plain API conversation (stored only)
    assert asyncio.run(delivery.deliver(Outbound("other", "support", "wa-1", "x"))) == Delivered("api", "stored")
    delivery.register("vapi", Broken())
    assert asyncio.run(delivery.deliver(Outbound("acme", "support", "api-1", "x"))).status == "failed"


# ---- the queue on PostgreSQL --------------------------------------------------------------------
def run(coro):
    return asyncio.run(coro)


def _esc(tenant: str, conv: str | None = None, urgency: str = "normal", **extra) -> dict:
    return {
        "id": escalations.new_id(),
        "tenant": tenant,
        "agent_id": "agt_unit",
        "agent": "unit",
        "conversation_id": conv or uuid.uuid4().hex,
        "urgency": urgency,
        "base_priority": escalations.base_priority(urgency, extra.pop("tier", None), {"vip": 150}),
        "team": extra.pop("team", "support"),
        "sla_first_s": extra.pop("sla_first_s", 3600),
        "sla_resolve_s": extra.pop("sla_resolve_s", 7200),
        "question": "q",
        "draft": "d",
        **extra,
    }


@pytest.fixture(scope="module")
def pool(services):
    """A database of the module's own: no other module's gateway sweeps these escalations."""
    from tests.test_hitl import own_database

    url = own_database(services[0])

    async def make():
        p = await asyncpg.create_pool(url, min_size=2, max_size=6)
        async with p.acquire() as conn:
            await migrate(conn)
        return p

    loop = asyncio.new_event_loop()
    p = loop.run_until_complete(make())
    yield loop, p
    loop.run_until_complete(p.close())
    loop.close()


async def _open(p, esc):
    async with p.acquire() as conn, conn.transaction():
        return await escalations.open_escalation(conn, esc)


def test_one_open_escalation_per_conversation_and_concurrent_claims(pool):
    loop, p = pool
    tenant = f"u-{uuid.uuid4().hex[:6]}"

    async def go():
        first, created = await _open(p, _esc(tenant, "conv-1"))
        again, created_again = await _open(p, _esc(tenant, "conv-1"))
        assert created and not created_again and again["id"] == first["id"]

        async def claim(holder):
            async with tenant_transaction(p, tenant) as conn:
                return await escalations.claim(conn, tenant, first["id"], holder, 30)

        results = await asyncio.gather(*(claim(f"key-{i}") for i in range(4)), return_exceptions=True)
        wins = [r for r in results if isinstance(r, dict)]
        losses = [r for r in results if isinstance(r, escalations.Conflict)]
        assert len(wins) == 1 and len(losses) == 3 and wins[0]["claims"] == 1
        # another tenant's wall: even the "every tenant" filter finds nothing through RLS
        async with tenant_transaction(p, "someone-else") as conn:
            assert await escalations.get(conn, None, first["id"]) is None

    loop.run_until_complete(go())


def test_claim_next_skips_locked_rows_and_aging_lifts_old_items(pool):
    loop, p = pool
    tenant = f"u-{uuid.uuid4().hex[:6]}"

    async def go():
        old, _ = await _open(p, _esc(tenant, urgency="low", team="t1"))
        new, _ = await _open(p, _esc(tenant, urgency="normal", team="t1"))
        vip, _ = await _open(p, _esc(tenant, urgency="normal", team="t1", tier="vip"))
        async with p.acquire() as conn:  # waiting ten hours: 600 points of aging at 1 a minute
            await conn.execute(
                "UPDATE escalations SET created_at = now() - interval '10 hours' WHERE id = $1", old["id"]
            )
            queue = await escalations.list_queue(conn, tenant, team="t1", aging=1.0)
        assert [e["id"] for e in queue] == [old["id"], vip["id"], new["id"]]

        async def take(holder):
            async with tenant_transaction(p, tenant) as conn:
                return await escalations.claim_next(conn, tenant, holder, 30, team="t1")

        taken = await asyncio.gather(take("a"), take("b"), take("c"))
        assert len({t["id"] for t in taken}) == 3
        async with tenant_transaction(p, tenant) as conn:
            assert await escalations.claim_next(conn, tenant, "d", 30, team="t1") is None

    loop.run_until_complete(go())


def test_expired_lease_returns_to_queue(pool):
    loop, p = pool
    tenant = f"u-{uuid.uuid4().hex[:6]}"

    async def go():
        esc, _ = await _open(p, _esc(tenant))
        async with tenant_transaction(p, tenant) as conn:
            await escalations.claim(conn, tenant, esc["id"], "holder", 0.05)
        await asyncio.sleep(0.1)
        async with p.acquire() as conn:
            expired = await escalations.expire_leases(conn)
        assert esc["id"] in {r["id"] for r in expired}
        async with tenant_transaction(p, tenant) as conn:
            with pytest.raises(escalations.Conflict):
                await escalations.check_can_reply(conn, tenant, esc["id"], "holder")

    loop.run_until_complete(go())


def test_attack_lease_lost_while_the_reply_is_sent(pool):
    """The lease runs out (and someone else claims) between the check and the send: the reply
    the customer already has is recorded (a 409 would invite a second copy), and the new
    holder's lease is neither taken back nor extended."""
    loop, p = pool
    tenant = f"u-{uuid.uuid4().hex[:6]}"

    async def go():
        esc, _ = await _open(p, _esc(tenant))
        async with tenant_transaction(p, tenant) as conn:
            await escalations.claim(conn, tenant, esc["id"], "slow", 0.05)
            await escalations.check_can_reply(conn, tenant, esc["id"], "slow")
        await asyncio.sleep(0.1)  # ... the send takes longer than the lease
        async with tenant_transaction(p, tenant) as conn:
            theirs = await escalations.claim(conn, tenant, esc["id"], "quick", 30)
        async with tenant_transaction(p, tenant) as conn:
            done = await escalations.record_reply(conn, tenant, esc["id"], "slow", {"status": "sent"}, 3600)
        assert done["first_response_at"] is not None and done["delivery"] == {"status": "sent"}
        assert done["claimed_by"] == "quick" and done["lease_until"] == theirs["lease_until"]
        async with tenant_transaction(p, "someone-else") as conn:  # another tenant records nothing
            with pytest.raises(NotFound):
                await escalations.record_reply(conn, tenant, esc["id"], "slow", {}, 30)

    loop.run_until_complete(go())


def test_sla_alerts_claimed_once_by_concurrent_sweepers(pool, services):
    loop, p = pool
    tenant = f"u-{uuid.uuid4().hex[:6]}"

    async def go():
        esc, _ = await _open(p, _esc(tenant, urgency="urgent", sla_first_s=0.2, sla_resolve_s=0.3))
        await asyncio.sleep(0.35)
        r = aioredis.from_url(services[1])
        fired: list[dict] = []

        async def emit(alert):
            fired.append(alert)

        sweepers = [sla.Sweeper(p, r, held.Holds(r), emit, repair_every=10_000) for _ in range(3)]
        for _ in range(3):
            await asyncio.gather(*(s.sweep() for s in sweepers))
        await r.aclose()
        mine = sorted((a["type"], a["sla"]) for a in fired if a["escalation_id"] == esc["id"])
        assert mine == [
            ("escalation.sla_breach", "first_response"),
            ("escalation.sla_breach", "resolution"),
            ("escalation.sla_warning", "first_response"),
            ("escalation.sla_warning", "resolution"),
        ]

    loop.run_until_complete(go())


def test_feed_fans_out_only_the_subscribers_tenant():
    feed = held.Feed(redis=None)
    with feed.subscribe("acme") as mine, feed.subscribe(None) as everyone, feed.subscribe("other") as theirs:
        feed._on(orjson.dumps({"type": "claimed", "tenant": "acme", "id": "esc_1"}))
        feed._on(b"not json")
        assert mine.get_nowait()["id"] == "esc_1" and everyone.get_nowait()["id"] == "esc_1"
        assert theirs.empty()
    assert not feed._subscribers


def test_skills_route_the_queue(pool):
    loop, p = pool
    tenant = f"u-{uuid.uuid4().hex[:6]}"

    async def go():
        french, _ = await _open(p, _esc(tenant, team="t2", skills=["french"]))
        await _open(p, _esc(tenant, team="t2"))
        async with tenant_transaction(p, tenant) as conn:
            assert [e["id"] for e in await escalations.list_queue(conn, tenant, skill="french")] == [french["id"]]
            assert await escalations.claim_next(conn, tenant, "k", 30, team="t2", skill="german") is None
            taken = await escalations.claim_next(conn, tenant, "k", 30, team="t2", skill="french")
        assert taken["id"] == french["id"]

    loop.run_until_complete(go())


def test_attack_feed_subscribers_are_bounded_per_tenant_and_process(monkeypatch):
    """Each open console stream holds a queue of up to MAX_SUBSCRIBER_BACKLOG events: a tenant
    admin opening streams without end would grow memory without bound."""
    feed = held.Feed(redis=None)
    with contextlib.ExitStack() as stack:
        for _ in range(held.MAX_SUBSCRIBERS_PER_TENANT):
            stack.enter_context(feed.subscribe("greedy"))
        assert not feed.has_room("greedy")
        with pytest.raises(held.FeedFull):
            stack.enter_context(feed.subscribe("greedy"))
        assert feed.has_room("modest")  # another tenant is not locked out by the greedy one
        monkeypatch.setattr(held, "MAX_SUBSCRIBERS", held.MAX_SUBSCRIBERS_PER_TENANT + 1)
        stack.enter_context(feed.subscribe("modest"))
        with pytest.raises(held.FeedFull):  # the process's own bound
            stack.enter_context(feed.subscribe("third"))
    assert not feed._subscribers and feed.has_room("greedy")


def test_attack_nul_in_customer_text_still_escalates(pool):
    """PostgreSQL text and jsonb cannot hold U+0000, which a customer (or a model) can put in any
    message: the hand-over must not fail on it (the customer would get the AI's answer instead)."""
    loop, p = pool
    tenant = f"u-{uuid.uuid4().hex[:6]}"

    async def go():
        esc = _esc(tenant, question="help\x00me", draft="d\x00", tier="v\x00ip", context={"variables": {"x": "\x00"}})
        row, created = await _open(p, esc)
        assert created and row["question"] == "help\ufffdme" and row["context"]["variables"]["x"] == "\ufffd"

    loop.run_until_complete(go())


def test_spooled_escalation_is_opened_and_held_by_the_sweeper(pool, services):
    """An escalation PostgreSQL could not take on its turn waits in Redis; a sweep opens it and
    holds the conversation, and an entry that can never go in does not block the others."""
    loop, p = pool
    tenant = f"u-{uuid.uuid4().hex[:6]}"

    async def go():
        r = aioredis.from_url(f"{services[1]}?db=13")  # no gateway sweeps this db's spool
        try:
            await r.delete(held.PENDING_KEY)
            good = _esc(tenant, "spooled-conv")
            await held.spool(r, {"id": "esc_broken"})  # lacks every field: dropped, logged
            await held.spool(r, good)
            holds = held.Holds(r)

            async def emit(alert):
                pass

            assert await sla.Sweeper(p, r, holds, emit).open_spooled() == 1
            assert await r.llen(held.PENDING_KEY) == 0
            async with tenant_transaction(p, tenant) as conn:
                assert (await escalations.must_get(conn, tenant, good["id"]))["status"] == "queued"
            assert await holds.get(tenant, "agt_unit", "spooled-conv") == good["id"]
        finally:
            await r.aclose()

    loop.run_until_complete(go())


def test_attack_hostile_provider_logprobs():
    """Log-probabilities come from the provider: a positive or enormous one must not overflow
    the score (a 500 on the customer's turn), nor make an unsure answer look sure."""
    for lps in ([1e6, 1e6], [-1e308, -1e308], [800.0]):
        c = confidence.score(Signals(question="x", logprobs=lps), ON)
        assert 0.0 <= c.score <= 1.0
    assert confidence.score(Signals(question="x", logprobs=[-1e308]), ON).escalate
    from gateway.hitl_stage import _logprobs

    for odd in (b'{"choices": ["x"]}', b'{"choices": {}}', b"[]", b'{"choices": [{"logprobs": {"content": 5}}]}'):
        assert _logprobs(odd) is None  # an odd shape is a missing signal, not a 500 on the turn
    assert _logprobs(b'{"choices": [{"logprobs": {"content": [{"logprob": -1.5}, {"logprob": "x"}]}}]}') == [-1.5]


def test_attack_flood_of_held_messages_floods_postgresql(pool, services, monkeypatch):
    """A held message costs its turn no PostgreSQL, but its count on the escalation does: a burst
    of held messages starts at most MAX_COUNTING counts, run COUNTING_CONCURRENCY at a time."""
    from types import SimpleNamespace

    from gateway import hitl_stage

    loop, p = pool
    tenant = f"u-{uuid.uuid4().hex[:6]}"
    monkeypatch.setattr(hitl_stage, "MAX_COUNTING", 20)

    async def go():
        esc, _ = await _open(p, _esc(tenant, "flooded"))
        r = aioredis.from_url(f"{services[1]}?db=13")
        svc = SimpleNamespace(pool=p, redis=r, hitl=SimpleNamespace(holds=held.Holds(r)))
        agent = SimpleNamespace(tenant=tenant, id="agt_unit")
        started = [hitl_stage.spawn_count(svc, agent, "flooded", esc["id"]) for _ in range(50)]
        assert started.count(True) == 20 and len(hitl_stage._PENDING) == 20
        await asyncio.gather(*list(hitl_stage._PENDING))
        await r.aclose()
        async with tenant_transaction(p, tenant) as conn:
            assert (await escalations.must_get(conn, tenant, esc["id"]))["customer_messages"] == 20

    loop.run_until_complete(go())


def test_redis_down_does_not_stop_sla_alerts(pool):
    """The sweep reads the spool from Redis first: a Redis outage must not also silence the SLA
    alerts and lease expiry, which live in PostgreSQL."""
    loop, p = pool
    tenant = f"u-{uuid.uuid4().hex[:6]}"

    async def go():
        esc, _ = await _open(p, _esc(tenant, sla_first_s=0.01, sla_resolve_s=3600))
        await asyncio.sleep(0.05)
        dead = aioredis.from_url("redis://127.0.0.1:1", socket_connect_timeout=0.2)
        fired: list[dict] = []

        async def emit(alert):
            fired.append(alert)

        with contextlib.suppress(Exception):  # putting hold keys back fails too, after the alerts
            await sla.Sweeper(p, dead, held.Holds(dead), emit).sweep()
        await dead.aclose()
        assert ("escalation.sla_breach", "first_response") in {
            (a["type"], a["sla"]) for a in fired if a["escalation_id"] == esc["id"]
        }

    loop.run_until_complete(go())


def test_a_learned_example_past_a_pii_bound_is_a_400_naming_the_corrected_answer():
    """Redacting an example for learning past a per-request PII bound (pii.max_phone_checks,
    pii.max_analysed_chars) was an uncaught error: the resolve answered a generic 500."""
    import asyncio
    from types import SimpleNamespace

    from core.errors import InvalidRequest
    from gateway import hitl_service
    from policies.pii.analysis import TooMuchToCheck

    class Analyzer:
        async def find(self, spec, texts):
            exc = TooMuchToCheck(1001, 1000, "max_phone_checks", 1)
            exc.text = 1
            raise exc

    policy = SimpleNamespace(actions={"phone": "redact"}, spec=None, labels={})
    config = SimpleNamespace(models={}, tenants={"t": "p"})
    pii = SimpleNamespace(config=config, policies={"p": policy}, analyzer=Analyzer())
    with pytest.raises(InvalidRequest) as err:
        asyncio.run(hitl_service.redact_for_learning(pii, "t", "m", ["question", "answer"]))
    assert err.value.code == "pii_too_much_to_check" and err.value.param == "corrected_answer"
    assert "corrected answer" in str(err.value)
