"""Self-review s25 (an attacker's review of the day's four changes: the CLI's --model check, the
VAPI caller id, the per-tenant bound on pinned-version reads and the WhatsApp template room):
each test is a finding that failed before its fix, against real processes (a gateway with the
WhatsApp channel on the mock Graph API, the CLI as a subprocess on the embedded PostgreSQL)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid

import asyncpg
import httpx
import openai
import pytest
import yaml

from tests.conftest import MASTER_KEY, Gateway, Proc, environ, free_port, run_cli, wait_until
from tests.test_agents_admin import _CLI, agents_cli
from tests.test_agents_admin import config as agents_config
from tests.test_channels_whatsapp import admin, new_wa_id, notification, post, queue_idle, text

RUN = uuid.uuid4().hex[:6]
TENANT = f"s25-{RUN}"
AGENT = f"s25bot-{RUN}"
ACCOUNT = "s25wa"
PNID = "8118"
SECRET = "s25-app-secret-0123"
GRAPH_TOKEN = "graph-token-test"  # the token GraphMock is started with
WINDOW = "s25window"
WA_ENV = {
    "GATEWAY_CHANNEL_WORKER": "1",
    "GATEWAY_WA_VISIBILITY_TIMEOUT": "2",
    "GATEWAY_WA_MAX_RETRIES": "1",
    "GATEWAY_WA_BACKOFF": "0.2",
}


@pytest.fixture(scope="module")
def wa(tmp_root, services, module_mock, graph):
    out = run_cli("keys", "create", "--name", f"s25-wa-{RUN}", "--tenant", TENANT, urls=services, tmp=tmp_root)
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
                    "max_reply_parts": 1,
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


def _say_late(gw: Gateway, wa_id: str, body: str) -> None:
    """A customer message whose 24-hour window has closed (sent 25 hours ago)."""
    msg = text(wa_id, body, ts=time.time() - 25 * 3600)
    r = post(gw, ACCOUNT, notification([msg], pnid=PNID, name="Ada"), secret=SECRET)
    assert r.status_code == 200, r.text


def _hydrated(body: str, params: list[str]) -> str:
    for i, p in enumerate(params, 1):
        body = body.replace(f"{{{{{i}}}}}", p)
    return body


# ---- WhatsApp: a placeholder used more than once ------------------------------------------------
def test_a_window_template_using_a_placeholder_twice_is_kept_within_metas_1024(wa, graph):
    """A template body may use a placeholder more than once (Meta fills every one of them: "Hi
    {{1}}! ... Talk soon, {{1}}."). The reply's room was 1,024 less the body's own text and each
    OTHER value counted once: the customer's name, filled in twice, took a long answer's pieces
    past 1,024 (132005), Meta refused them, and the customer got the fallback instead of the
    answer. Now every use of a placeholder is counted."""
    body = "Hi {{1}}! Here is our answer: {{2}} Talk soon, {{1}}."
    tpl = {"account": ACCOUNT, "name": WINDOW, "variables": ["customer_name", "reply"], "body": body}
    assert admin(wa, "POST", "/admin/channels/whatsapp/templates", json=tpl).status_code == 201
    graph.configure(templates={WINDOW: body})
    try:
        wa_id = new_wa_id()
        word = "y" * 1500  # one long word: the pieces are cut hard, each as long as the room allows
        _say_late(wa, wa_id, word)
        wait_until(lambda: queue_idle(wa, "wa-inbound"), what="the turn done (sent, or dead-lettered)")
    finally:
        graph.configure(templates={})
    sent = graph.sent_to(wa_id)
    assert all(s["type"] == "template" for s in sent), [s.get("text") for s in sent]  # not the fallback
    params = [[p["text"] for p in s["template"]["components"][0]["parameters"]] for s in sent]
    assert all(len(_hydrated(body, p)) <= 1024 for p in params), [len(_hydrated(body, p)) for p in params]
    assert "".join(p[1] for p in params) == "echo: " + word, [len(p[1]) for p in params]


def test_a_proactive_send_counts_every_use_of_a_placeholder(wa, graph):
    """The admin send's check (the body filled in within 1,024) counted each value once: with a
    body that uses {{1}} twice, a 600-character value passed (202), and Meta, filling it in
    twice, refused the send (132005) after it was queued. Now it is a 400 naming the values."""
    body = "Your code is {{1}}. Once more, your code: {{1}}."
    tpl = {"account": ACCOUNT, "name": "s25code", "variables": ["code"], "body": body}
    assert admin(wa, "POST", "/admin/channels/whatsapp/templates", json=tpl).status_code == 201
    send = {"account": ACCOUNT, "to": new_wa_id(), "template": {"name": "s25code", "variables": {"code": "C" * 600}}}
    r = admin(wa, "POST", "/admin/channels/whatsapp/send", json=send)
    assert r.status_code == 400 and r.json()["error"]["param"] == "template.variables", r.text
    send["template"]["variables"]["code"] = "C" * 450  # 2 x 450 + its own text: within 1,024
    assert admin(wa, "POST", "/admin/channels/whatsapp/send", json=send).status_code == 202


def test_a_long_customer_name_does_not_push_the_window_templates_past_1024(wa, graph):
    """The other values of a window template (the customer's name: the profile name Meta sends,
    up to 256 characters here) take their share of the 1,024 too. When they left the reply fewer
    than 100 characters, its room was raised to 100 anyway and every piece went past 1,024
    (132005): the customer got the fallback. The other values are now cut to leave the reply its
    100 characters."""
    body = "Dear {{1}}, " + "thank you for writing to us. " * 30 + "Our answer: {{2}}"  # 890 of its own
    tpl = {"account": ACCOUNT, "name": WINDOW, "variables": ["customer_name", "reply"], "body": body}
    assert admin(wa, "POST", "/admin/channels/whatsapp/templates", json=tpl).status_code == 201
    graph.configure(templates={WINDOW: body})
    try:
        wa_id = new_wa_id()
        name = "Bartholomew " * 10  # 120 characters: 1,024 - 890 - 120 leaves the reply 14
        msg = text(wa_id, "Tell me. " * 30, ts=time.time() - 25 * 3600)
        r = post(wa, ACCOUNT, notification([msg], pnid=PNID, name=name), secret=SECRET)
        assert r.status_code == 200, r.text
        wait_until(lambda: queue_idle(wa, "wa-inbound"), what="the turn done (sent, or dead-lettered)")
    finally:
        graph.configure(templates={})
    params = [[p["text"] for p in s["template"]["components"][0]["parameters"]] for s in graph.sent_to(wa_id)]
    assert params, "nothing reached the customer: every template (the fallback's too) was refused"
    assert all(len(_hydrated(body, p)) <= 1024 for p in params), [len(_hydrated(body, p)) for p in params]
    assert " ".join(p[1] for p in params) == "echo: " + " ".join(("Tell me. " * 30).split())
    assert all(p[0] and name.strip().startswith(p[0].rstrip(".")) for p in params)  # the name, cut


# ---- pinned prompt versions: a tenant's third read at once ---------------------------------------
def test_a_third_pinned_version_at_once_waits_its_turn_instead_of_a_429(wa, services):
    """A tenant may have two reads of pinned versions in flight per replica; a third turn pinning
    another uncached version at that moment got 429 at once. Three turns pinning three old
    versions (a single-tenant install: every key is the `default` tenant's; a replica just
    started) are ordinary traffic, and a client that does not retry (VAPI's custom LLM; an SDK
    with max_retries=0) failed. Now a tenant's reads past two wait for one of its own (others'
    slots are not theirs to take: another tenant's read still goes), and only a tenant with more
    than MAX_QUEUED_PER_TENANT reads in flight or waiting gets the 429. PostgreSQL is held up for
    real (a transaction holds the table's lock), so the first two reads stay in flight."""
    tenant, name = f"s25pin-{RUN}", f"s25pin-{RUN}"
    body = {"name": name, "tenant": tenant, "model": "agent-model", "template": "v1"}
    assert admin(wa, "POST", "/admin/agents", json=body).status_code == 201
    for i in range(2, 6):  # production stays at 1, latest moves to 5: 2, 3 and 4 are read on demand
        r = admin(wa, "POST", f"/admin/agents/{name}/versions", params={"tenant": tenant}, json={"template": f"v{i}"})
        assert r.status_code == 201, r.text
    r = admin(wa, "POST", "/admin/keys", json={"name": f"s25pin-{RUN}", "tenant": tenant})
    assert r.status_code == 201, r.text
    client = openai.AsyncOpenAI(base_url=f"{wa.url}/v1", api_key=r.json()["key"], max_retries=0, timeout=30)

    def turn(version: int):
        return asyncio.ensure_future(
            client.chat.completions.create(
                model=f"agent:{name}@{version}", messages=[{"role": "user", "content": "hi"}]
            )
        )

    async def go():
        lock = await asyncpg.connect(services[0])
        waiting = (  # the reads of pinned versions waiting on the lock (a reload of agents may wait too)
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND wait_event = 'relation' "
            "AND query LIKE 'SELECT version, template, variables, note, created_at FROM prompt_versions%'"
        )
        try:
            tx = lock.transaction()
            await tx.start()
            await lock.execute("LOCK TABLE prompt_versions IN ACCESS EXCLUSIVE MODE")
            first = [turn(2), turn(3)]
            for _ in range(500):  # the two reads reach PostgreSQL and wait on the lock
                await lock.execute("SELECT pg_stat_clear_snapshot()")  # else kept to the end of the transaction
                if await lock.fetchval(waiting) >= 2 or any(f.done() for f in first):
                    break
                await asyncio.sleep(0.01)
            third = turn(4)
            await asyncio.wait([third], timeout=1.0)  # refused at once, before: 429
            refused = third.done() and third.exception()
            await tx.rollback()
            assert not refused, f"the third pinned version was refused: {refused!r}"
            answers = await asyncio.gather(*first, third)
            assert all(a.choices[0].message.content for a in answers)
        finally:
            await lock.close()
            await client.close()

    asyncio.run(go())


# ---- the CLI: a config whose secrets are not in the admin's shell --------------------------------
def test_cli_create_checks_model_of_a_config_whose_secrets_are_not_set_here(services, module_mock, tmp_path):
    """`gateway agents create` now finds ./gateway.yaml as `gateway serve` does, and loaded it
    whole: a production config's `${OPENAI_API_KEY}` (set in the service's environment, not in the
    admin's shell) made every create fail ("did not load"), where before it was created. The
    check needs the config's model groups only: unset variables no longer refuse the command,
    and --model is still checked."""
    cfg = agents_config(module_mock)
    cfg["providers"][0]["api_keys"] = ["${S25_UNSET_PROVIDER_KEY}"]
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(cfg))
    os.environ.pop("S25_UNSET_PROVIDER_KEY", None)
    tenant = f"s25cli-{RUN}"
    made = agents_cli(
        "create", "--name", "a", "--model", "gpt-mock", "--template", "faq", "--tenant", tenant,
        urls=services, tmp=tmp_path, cwd=tmp_path,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    refused = agents_cli(
        "create", "--name", "b", "--model", "gpt-4o-mini", "--template", "faq", "--tenant", tenant,
        urls=services, tmp=tmp_path, cwd=tmp_path,
    )  # fmt: skip
    assert refused.returncode == 1 and "'gpt-4o-mini' is not a chat model group" in refused.stderr, refused.stderr


def test_a_window_template_body_leaving_no_room_for_the_reply_is_refused(wa, graph):
    """A body whose own text left the reply less than MIN_REPLY_ROOM (100) characters was taken
    (201): the reply's room was then raised to 100 anyway, so every answer longer than what was
    really left went as templates Meta refuses (132005) and the customer got the fallback. Such
    a body (of a template with a `reply` variable) is now a 400 naming `body`; one that leaves
    room is taken."""
    tight = "A" * 940 + " {{1}} " + "{{2}}"  # 941 + 1 (the name, at least "-") + the reply: 82 left
    tpl = {"account": ACCOUNT, "name": "s25tight", "variables": ["reply", "customer_name"], "body": tight}
    r = admin(wa, "POST", "/admin/channels/whatsapp/templates", json=tpl)
    assert r.status_code == 400 and r.json()["error"]["param"] == "body", r.text
    fits = {**tpl, "body": "A" * 900 + " {{1}} {{2}}"}  # 121 left
    assert admin(wa, "POST", "/admin/channels/whatsapp/templates", json=fits).status_code == 201
    plain = {**tpl, "variables": ["code", "customer_name"]}  # not a reply's template: its values are the sender's
    assert admin(wa, "POST", "/admin/channels/whatsapp/templates", json=plain).status_code == 201


def test_cli_create_checks_model_against_the_config_serve_was_given(services, module_mock, tmp_root, tmp_path):
    """`make run ARGS="--config prod.yaml"` (or `gateway serve --config prod.yaml`) on the embedded
    database: `gateway agents create --model <a group of prod.yaml>` took the demo as the config
    being served (no --config, $GATEWAY_CONFIG or ./gateway.yaml in the shell) and refused a
    valid model ("not a chat model group of demo.yaml"). `gateway serve` now notes in its data
    directory which config it runs, and the CLI on that embedded database checks against it."""
    data_dir = tmp_root / "embedded"  # the suite's embedded servers: serve and the CLI attach to them
    cfg = tmp_path / "prod.yaml"
    cfg.write_text(yaml.safe_dump(agents_config(module_mock)))
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "GATEWAY_CONFIG")}
    env.update(GATEWAY_DATA_DIR=str(data_dir), GATEWAY_MASTER_KEY=MASTER_KEY, GATEWAY_KB_WORKER="0")
    env.update(GATEWAY_CHANNEL_WORKER="0")
    port = free_port()
    serve = Proc(
        [sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--port", str(port)],
        env,
        tmp_path / "serve.log",
    )
    try:
        wait_until(lambda: _ready(port), timeout=60, what="gateway serve on the embedded database")
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        tenant = f"s25serve-{RUN}"
        run = [sys.executable, "-c", _CLI, "agents", "create", "--template", "faq", "--tenant", tenant]
        made = subprocess.run(
            [*run, "--name", "a", "--model", "gpt-mock"], env=env, capture_output=True, text=True, timeout=120,
            cwd=elsewhere,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        refused = subprocess.run(
            [*run, "--name", "b", "--model", "demo-gpt"], env=env, capture_output=True, text=True, timeout=120,
            cwd=elsewhere,
        )  # fmt: skip
        assert refused.returncode == 1 and "prod.yaml" in refused.stderr, refused.stderr
    finally:
        serve.stop()
        (data_dir / "serving-config").unlink(missing_ok=True)


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
    except httpx.HTTPError:
        return False
