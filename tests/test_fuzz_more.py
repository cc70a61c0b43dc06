"""Fuzzing the rest of the public surface (tests/test_fuzz.py has chat on plain models,
embeddings, raw bodies, model paths and auth headers): agent turns and their tool loop,
feedback, files and vector stores, rerank, conversation reads, the admin API with a tenant admin
key and the master key, and the WhatsApp and VAPI webhooks with valid credentials.

Whatever arrives: never a 500, never a traceback, an OpenAI-shaped error naming the field on a
4xx, and a refused request changes no stored state (a digest of the tables the endpoint writes,
taken before and after it). Each finding the fuzzing made is an explicit ``test_finding_*``
below, pinned with its fix."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import os
import posixpath
import uuid
from collections import Counter
from urllib.parse import quote, urlencode

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import MASTER_KEY, Gateway, gateway_config, run_cli
from tests.test_fuzz import json_values
from tests.test_tools import ToolServer

TENANT = f"fz-{uuid.uuid4().hex[:6]}"
WA_SECRET = "fuzz-app-secret-0123"
WA_PNID = "7007"
VAPI_TOKEN = "fuzz-vapi-token-0123456789"


def fuzz(n: int) -> settings:
    """``n`` examples, the same ones every run; FUZZ_SCALE=10 explores ten times as many."""
    return settings(
        max_examples=n * int(os.environ.get("FUZZ_SCALE", "1")),
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )


# ---- strategies ------------------------------------------------------------------------------

odd_text = st.sampled_from(
    ["", " ", "\x00", "a\x00b", "../../etc/passwd", "%00", "'; DROP TABLE x;--", "{{ ''.__class__ }}", "é" * 300]
) | st.text(max_size=30)
odd_id = odd_text | st.sampled_from(["-1", "0", "1", "9" * 30, "latest", "production", "file-x", "vs_x", "..", "."])
odd_value = json_values | odd_text
# a header value httpx can send (latin-1 without control characters)
header_text = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"), max_size=300
)
header_bytes = header_text.map(lambda s: s.strip().encode("latin-1") or b"-")  # (h11 sends no edge spaces)


def body_of(fields: list[str], extra: st.SearchStrategy | None = None) -> st.SearchStrategy:
    """A JSON object with some of ``fields`` (hostile values) and perhaps an unknown field."""
    known = st.fixed_dictionaries({}, optional={f: extra or odd_value for f in fields})
    return st.one_of(
        known,
        known.map(lambda d: {**d, "unknown_field": 1}),
        json_values,
    )


DROP = object()


def mutants(valid: dict, hostile: dict | None = None) -> st.SearchStrategy:
    """``valid`` with up to three fields replaced by hostile values, dropped, or added: deep
    enough to pass the first check and reach the next."""
    hostile = hostile or {}
    keys = sorted({*valid, *hostile, "unknown_field"})

    def change(key: str) -> st.SearchStrategy:
        return st.tuples(st.just(key), hostile.get(key, odd_value) | odd_value | st.just(DROP))

    def apply(changes: list) -> dict:
        out = dict(valid)
        for key, value in changes:
            if value is DROP:
                out.pop(key, None)
            else:
                out[key] = value
        return out

    return st.lists(st.sampled_from(keys).flatmap(change), max_size=3).map(apply)


odd_param = st.sampled_from(
    ["2024-01-01", "0001-01-01T00:00:00-23:59", "9999-12-31T23:59:59+14:00", "2024-13-01", "1e400", "NaN", "inf",
     "-1", "0", "99999999999999999999", "true", "asc", "desc", "day", "model,day", "tag", "tenant", "x,y", " 1"]
)  # fmt: skip


def query_of(names: list[str]) -> st.SearchStrategy:
    values = odd_text | st.integers(-5, 10**20) | odd_param
    return st.dictionaries(st.sampled_from(names) | st.text(max_size=8), values, max_size=4)


# ---- checks ----------------------------------------------------------------------------------


def check(resp: httpx.Response, *, upstream_ok: bool = False) -> None:
    assert resp.status_code < 500 or (upstream_ok and resp.status_code in (502, 503, 504)), (
        resp.status_code,
        resp.text[:2000],
    )
    assert "Traceback" not in resp.text and 'File "' not in resp.text, resp.text[:2000]
    if resp.status_code < 400:
        return
    body = resp.json()
    assert isinstance(body, dict) and set(body) >= {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    if resp.status_code >= 500:
        assert body["error"]["type"] == "upstream_error", body
    if resp.status_code == 400 and not upstream_ok:  # a provider's own 400 is relayed as it came
        # a bad field is named; only a body that is not JSON at all has no field to name
        assert body["error"]["param"] is not None or body["error"]["code"] == "invalid_json", body


def _digest_sql(tables: tuple[str, ...]) -> str:
    # Every row version a write leaves: an INSERT adds a tuple, an UPDATE (even to the same values)
    # replaces one with a tuple of the writer's transaction id (xmin), a DELETE removes one. The
    # xmins themselves (sorted) change with any committed write: for them to stay, a removed
    # version's xmin would have to be the writer's own id, of a transaction that had committed
    # before the digest was read. (Their sum does not: a writer whose id is older than a row it
    # updates lowers it, and can make up for another row's rise.) Reading xmins never de-toasts
    # a row (hashing whole rows — 60 KB prompt versions the suite stores — cost seconds per
    # request once the tables had grown).
    xmins = "md5(coalesce(string_agg(xmin::text, ',' ORDER BY xmin::text::bigint), ''))"
    parts = [f"(SELECT count(*) || ':' || {xmins} FROM {t}) AS {t}" for t in tables]
    return "SELECT " + ", ".join(parts)


STATS: Counter = Counter()  # FUZZ_STATS=1: (test, status, code, param is null) counts, printed at the end


class Db:
    """A connection of the test's own to read table digests (one round trip per digest)."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.conn = self.loop.run_until_complete(asyncpg.connect(url))

    def digest(self, tables: tuple[str, ...]) -> dict:
        return dict(self.loop.run_until_complete(self.conn.fetchrow(_digest_sql(tables))))

    def fetch(self, sql: str, *args) -> list[dict]:
        return [dict(r) for r in self.loop.run_until_complete(self.conn.fetch(sql, *args))]

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()


CONFIG_TABLES = (
    "api_keys",
    "budgets",
    "agents",
    "prompt_versions",
    "prompt_labels",
    "experiments",
    "knowledge_bases",
    "kb_documents",
    "openai_files",
    "kb_file_batches",
    "escalations",
    "learned_examples",
    "whatsapp_templates",
)


class Fz:
    def __init__(self, gw: Gateway, db: Db, user_key: str, admin_key: str, tools: ToolServer) -> None:
        self.gw, self.db, self.user_key, self.admin_key, self.tools = gw, db, user_key, admin_key, tools
        self.http = httpx.Client(base_url=gw.url, timeout=30)
        self.answered_turns = 0  # agent turns answered (200) that named a conversation

    def call(self, method: str, path: str, key: str | None = None, *, tables=(), upstream_ok=False, **kw):
        """One request, checked; when refused (4xx), ``tables`` must be unchanged by it."""
        headers = kw.pop("headers", {})
        if key is not None:
            headers = {"Authorization": f"Bearer {key}", **headers}
        before = self.db.digest(tables) if tables else None
        resp = self.http.request(method, path, headers=headers, **kw)
        if os.environ.get("FUZZ_STATS") and resp.elapsed.total_seconds() > 1:
            print("SLOW", resp.elapsed.total_seconds(), method, path[:200], resp.status_code, flush=True)
        check(resp, upstream_ok=upstream_ok)
        if os.environ.get("FUZZ_STATS"):
            err = resp.json().get("error", {}) if resp.status_code >= 400 else {}
            STATS[
                (
                    os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[-1].split(" ")[0],
                    resp.status_code,
                    err.get("code"),
                    err.get("param") is None,
                )
            ] += 1
        if tables and resp.status_code >= 400:
            assert self.db.digest(tables) == before, (method, path, resp.status_code, resp.text[:500])
        return resp


def test_the_table_digest_sees_every_kind_of_write(services):
    """The fuzzers' "nothing stored changed" check: an insert, an update to the same values and a
    delete each change the digest; a read does not."""
    db = Db(services[0])
    try:
        db.fetch("CREATE TABLE fz_digest_probe (id int PRIMARY KEY, v text)")
        seen = [db.digest(("fz_digest_probe",))]
        for sql in (
            "INSERT INTO fz_digest_probe VALUES (1, repeat('x', 100000))",
            "UPDATE fz_digest_probe SET v = v",
            "DELETE FROM fz_digest_probe",
        ):
            db.fetch(sql)
            seen.append(db.digest(("fz_digest_probe",)))
        db.fetch("SELECT * FROM fz_digest_probe")
        assert db.digest(("fz_digest_probe",)) == seen[-1]
        assert all(a != b for a, b in itertools.pairwise(seen)), seen  # (empty again after the delete)
    finally:
        db.fetch("DROP TABLE IF EXISTS fz_digest_probe")
        db.close()


def test_the_table_digest_sees_writes_whose_row_versions_keep_the_xmin_sum(services):
    """Rows changed without changing count and sum(xmin): a transaction that took its id (X)
    before another inserted a row (Y > X) updates that row (its xmin drops by Y - X) and an
    older one (Z < X: it rises by X - Z); with Y - X = X - Z the sum is as it was. (Any
    transaction of the gateway's that stays open across another's commit can.) The digest now
    holds the rows' xmins themselves, which no committed write leaves as they were: a removed
    version's xmin would have to be the writer's own id, a transaction that had committed
    before the digest was taken."""
    db = Db(services[0])
    table = ("fz_digest_probe2",)
    holder = db.loop.run_until_complete(asyncpg.connect(services[0]))

    def xid(sql: str, *args) -> int:
        return int(db.fetch(sql, *args)[0]["x"]) % 2**32

    try:
        db.fetch("CREATE TABLE fz_digest_probe2 (id bigint PRIMARY KEY, v text)")
        # older rows, one transaction each (xmins Z, Z+1, ...), then the open transaction's id X
        older = [
            xid("INSERT INTO fz_digest_probe2 VALUES ($1, 'a') RETURNING xmin::text::bigint AS x", i) for i in range(20)
        ]
        tx = holder.transaction()
        db.loop.run_until_complete(tx.start())
        x = int(db.loop.run_until_complete(holder.fetchval("SELECT txid_current()"))) % 2**32
        y = xid("INSERT INTO fz_digest_probe2 VALUES (100, 'b') RETURNING xmin::text::bigint AS x")
        z = 2 * x - y  # the older row whose rise (X - Z) makes up for the new row's drop (Y - X)
        assert z in older, (older, x, y)
        before = db.digest(table)
        db.loop.run_until_complete(
            holder.execute("UPDATE fz_digest_probe2 SET v = 'changed' WHERE id IN ($1, 100)", older.index(z))
        )
        db.loop.run_until_complete(tx.commit())
        assert len(db.fetch("SELECT 1 FROM fz_digest_probe2 WHERE v = 'changed'")) == 2
        assert db.digest(table) != before
    finally:
        db.loop.run_until_complete(holder.close())
        db.fetch("DROP TABLE IF EXISTS fz_digest_probe2")
        db.close()


def test_the_table_digest_ignores_vacuum_and_rolled_back_writes_and_sees_swaps_and_savepoints(services):
    """What else a request's writes (or the server's housekeeping) may do between two digests:
    VACUUM FREEZE and a rolled-back write store nothing new (no false alarm); a row deleted and
    another inserted in one transaction (the count kept), a HOT update and a write inside a
    released savepoint are writes."""
    db = Db(services[0])
    table = ("fz_digest_probe3",)

    def run(sql: str) -> None:  # (several statements: not a prepared one)
        db.loop.run_until_complete(db.conn.execute(sql))

    try:
        db.fetch("CREATE TABLE fz_digest_probe3 (id int PRIMARY KEY, v text)")
        db.fetch("INSERT INTO fz_digest_probe3 SELECT g, 'v' FROM generate_series(1, 50) g")
        seen = db.digest(table)
        db.fetch("VACUUM (FREEZE) fz_digest_probe3")
        assert db.digest(table) == seen
        run("BEGIN; UPDATE fz_digest_probe3 SET v = 'w'; INSERT INTO fz_digest_probe3 VALUES (99, 'x'); ROLLBACK")
        assert db.digest(table) == seen
        for sql in (
            "BEGIN; DELETE FROM fz_digest_probe3 WHERE id = 1; INSERT INTO fz_digest_probe3 VALUES (1, 'v'); COMMIT",
            "UPDATE fz_digest_probe3 SET v = v WHERE id = 2",  # HOT: no index column changed
            "BEGIN; SAVEPOINT s; UPDATE fz_digest_probe3 SET v = 'y' WHERE id = 3; RELEASE s; COMMIT",
        ):
            run(sql)
            now = db.digest(table)
            assert now != seen, sql
            seen = now
    finally:
        db.fetch("DROP TABLE IF EXISTS fz_digest_probe3")
        db.close()


def _admin(gw: Gateway, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, f"{gw.url}{path}", headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=30, **kw)


@pytest.fixture(scope="module")
def fz(tmp_root, services, module_mock):
    tools = ToolServer(tmp_root)
    out = run_cli("keys", "create", "--name", "fuzz-channel", "--tenant", TENANT, urls=services, tmp=tmp_root)
    assert out.returncode == 0, out.stderr
    channel_key = out.stdout.splitlines()[0].strip()
    cfg = gateway_config(module_mock)
    cfg["router"]["max_attempts"] = 1
    cfg["models"].append(
        {"name": "rerank-mock", "mode": "rerank", "deployments": [{"provider": "mock-openai", "model": "mock-rerank"}]}
    )
    cfg["channels"] = {
        "whatsapp": {
            "acme": {
                "tenant": TENANT,
                "phone_numbers": {WA_PNID: "fzbot"},
                "app_secret": WA_SECRET,
                "verify_token": "verify-fuzz",
                "access_token": "graph-token",
                "api_key": channel_key,
                "graph_base_url": "http://127.0.0.1:9",
            }
        },
        "vapi": {
            "main": {
                "tenant": TENANT,
                "api_key": channel_key,
                "public_url": "https://gw.example",
                "auth": {"bearer_token": VAPI_TOKEN},
                "phone_numbers": {"pn_main": "fzbot"},
                "default_agent": "fzbot",
            }
        },
    }
    saved = os.environ.get("GATEWAY_CHANNEL_WORKER")
    os.environ["GATEWAY_CHANNEL_WORKER"] = "0"
    try:
        gw = Gateway(tmp_root, cfg, services)
    finally:
        if saved is None:
            os.environ.pop("GATEWAY_CHANNEL_WORKER", None)
        else:
            os.environ["GATEWAY_CHANNEL_WORKER"] = saved
    db = Db(services[0])
    try:
        user = _admin(gw, "POST", "/admin/keys", json={"name": "fz-user", "tenant": TENANT, "rpm": 1_000_000})
        assert user.status_code == 201, user.text
        adm = _admin(
            gw,
            "POST",
            "/admin/keys",
            json={"name": "fz-admin", "tenant": TENANT, "scopes": ["admin"], "rpm": 1_000_000},
        )
        assert adm.status_code == 201, adm.text
        agent = {
            "name": "fzbot",
            "tenant": TENANT,
            "model": "gpt-mock",
            "template": "You help {{ company }}.{% if vip %} VIP.{% endif %}",
            "variables": {
                "company": {"type": "string", "required": True},
                "vip": {"type": "boolean", "default": False},
            },
            "defaults": {"company": "Acme"},
        }
        r = _admin(gw, "POST", "/admin/agents", json=agent)
        assert r.status_code == 201, r.text
        tool = {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 50}},
                "required": ["city"],
                "additionalProperties": False,
            },
            "kind": "http",
            "config": {
                "method": "GET",
                "url": f"{tools.url}/weather?city={{city}}",
                "allowed_hosts": ["127.0.0.1"],
                "allow_private_networks": True,
            },
        }
        order = {
            "name": "get_order",
            "description": "An order by id",
            "parameters": {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]},
            "kind": "http",
            "config": {
                "method": "POST",
                "url": f"{tools.url}/orders/{{id}}",
                "allowed_hosts": ["127.0.0.1"],
                "allow_private_networks": True,
            },
        }
        r = _admin(
            gw,
            "POST",
            "/admin/agents",
            json={
                "name": "fztool",
                "tenant": TENANT,
                "model": "gpt-mock",
                "template": "Tools.",
                "tools": [tool, order],
            },
        )
        assert r.status_code == 201, r.text
        fz = Fz(gw, db, user.json()["key"], adm.json()["key"], tools)
        yield fz
        gw.stop()  # flushes the ledger and the conversation messages written off the request path
        # a refused agent turn stores nothing in its conversation; an answered one does
        stored = db.fetch(
            """SELECT l.status / 100 AS class, count(*) AS n FROM messages m
               JOIN ledger l ON l.request_id = m.request_id WHERE m.tenant = $1 GROUP BY 1""",
            TENANT,
        )
        by_class = {r["class"]: r["n"] for r in stored}
        assert by_class.get(4, 0) == 0, by_class
        assert by_class.get(2, 0) > 0 or not fz.answered_turns, by_class  # (the join finds turns)
    finally:
        db.close()
        gw.stop()
        tools.stop()


@pytest.fixture(scope="module", autouse=True)
def no_tracebacks_logged(fz):
    yield
    if os.environ.get("FUZZ_STATS"):
        for k, v in sorted(STATS.items(), key=str):
            print(k, v)
    log = fz.gw.log()
    assert "Traceback" not in log, log[log.index("Traceback") - 2000 : log.index("Traceback") + 3000]


# ---- agents ----------------------------------------------------------------------------------

AGENT_MODELS = st.sampled_from(
    ["agent:fzbot", "agent:fzbot@1", "agent:fzbot@latest", "agent:fzbot@99", "agent:fzbot@", "agent:fzbot@x@y",
     "agent:", "agent:nope", "agent:fztool", "agent:FZBOT", "agent:fzbot@-1"]
)  # fmt: skip
client_tools = st.lists(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["function", "x"]) | odd_value},
        optional={
            "function": st.fixed_dictionaries(
                {"name": st.sampled_from(["get_weather", "lookup", "end_conversation"]) | odd_text},
                optional={"parameters": json_values, "description": odd_value},
            )
            | json_values
        },
    ),
    max_size=3,
)
metadata = st.fixed_dictionaries(
    {},
    optional={
        "conversation_id": odd_id | json_values,
        "variables": st.dictionaries(st.sampled_from(["company", "vip", "x"]) | odd_text, odd_value, max_size=3)
        | json_values,
        "user": odd_value,
        "tags": odd_value,
    },
)
agent_body = st.fixed_dictionaries(
    {
        "model": AGENT_MODELS,
        "messages": st.just([{"role": "user", "content": "hello"}])
        | st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "assistant", "tool", "system"]) | json_values, "content": odd_value}
            ),
            max_size=3,
        ),
    },
    optional={
        "metadata": metadata | json_values,
        "variables": st.dictionaries(st.sampled_from(["company", "vip"]) | odd_text, odd_value, max_size=3)
        | json_values,
        "tools": client_tools | json_values,
        "tool_choice": st.sampled_from(["auto", "none", "required"]) | json_values,
        "stream": st.booleans(),
    },
)
STATE_OF_TURNS = ("api_keys", "agents", "prompt_versions", "prompt_labels", "experiments", "budgets", "feedback")


@fuzz(240)
@given(
    body=agent_body
    | mutants(
        {
            "model": "agent:fzbot",
            "messages": [{"role": "user", "content": "hi"}],
            "metadata": {"conversation_id": "fz-c1", "variables": {"company": "Acme", "vip": True}},
            "variables": {"company": "Beta"},
            "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
            "stream": True,
        },
        {"metadata": metadata, "variables": metadata, "tools": client_tools},
    ),
    conv=st.none() | header_bytes,
    idem=st.none() | st.sampled_from([b"k1", b"k2"]) | header_bytes,
)
def test_fuzz_agent_chat(fz, body, conv, idem):
    headers = {"x-gateway-conversation": conv} if conv is not None else {}
    if idem is not None:
        headers["idempotency-key"] = idem
    resp = fz.call(
        "POST",
        "/v1/chat/completions",
        fz.user_key,
        content=json.dumps(body),
        headers=headers,
        tables=STATE_OF_TURNS,
        upstream_ok=True,
    )
    meta = body.get("metadata")
    if resp.status_code == 200 and (conv is not None or (isinstance(meta, dict) and meta.get("conversation_id"))):
        fz.answered_turns += 1


tool_call = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["get_weather", "get_order", "lookup", "knowledge_search", "escalate_to_human"])
        | odd_text
    },
    optional={"arguments": json_values | odd_text | st.dictionaries(st.sampled_from(["city", "id"]), odd_value)},
) | st.one_of(  # calls of the agent's own tools with hostile argument values: they reach the tool server
    st.fixed_dictionaries({"name": st.just("get_weather"), "arguments": st.fixed_dictionaries({"city": odd_text})}),
    st.fixed_dictionaries({"name": st.just("get_order"), "arguments": st.fixed_dictionaries({"id": odd_text})}),
)


@fuzz(160)
@given(
    calls=st.lists(tool_call, max_size=3),
    steps=st.none() | st.lists(st.lists(tool_call, max_size=2), max_size=3),
    always=st.booleans(),
    stream=st.booleans(),
    client=st.none() | client_tools,
)
def test_fuzz_agent_tool_loop(fz, calls, steps, always, stream, client):
    plan = {"tool_calls_steps": steps} if steps is not None else {"tool_calls": calls}
    if always:
        plan["tool_calls_always"] = True
    body = {
        "model": "agent:fztool",
        "messages": [{"role": "user", "content": f"go [[mock:{json.dumps(plan)}]]"}],
        "stream": stream,
    }
    if client is not None:
        body["tools"] = client
    fz.call(
        "POST",
        "/v1/chat/completions",
        fz.user_key,
        content=json.dumps(body),
        tables=STATE_OF_TURNS,
        upstream_ok=True,
    )
    # whatever the model put in the arguments, the tools were called on their own paths only
    for sent in fz.tools.requests():
        raw = sent["raw_path"].split("?", 1)[0]
        assert raw in ("/weather", "/health") or (raw.startswith("/orders/") and "/" not in raw[8:]), sent


# ---- feedback --------------------------------------------------------------------------------

feedback_body = st.fixed_dictionaries(
    {},
    optional={
        "request_id": odd_id | json_values,
        "conversation_id": odd_id | json_values,
        "thumbs": st.sampled_from(["up", "down", 1, -1, 0, True, "UP"]) | json_values,
        "score": st.floats() | st.integers(-3, 3) | json_values,
        "resolved": json_values,
        "text": odd_text | json_values,
        "agent": st.sampled_from(["fzbot", "agent:fzbot@2", "agent:", "nope"]) | odd_value,
    },
) | body_of(["request_id", "x"])


@fuzz(200)
@given(
    body=feedback_body
    | mutants(
        {"conversation_id": "fz-c1", "thumbs": "up", "score": 0.5, "resolved": True, "text": "ok", "agent": "fzbot"}
    )
)
def test_fuzz_feedback(fz, body):
    fz.call("POST", "/v1/feedback", fz.user_key, content=json.dumps(body), tables=("feedback",))


# ---- files and vector stores -----------------------------------------------------------------

STORE_TABLES = ("openai_files", "knowledge_bases", "kb_documents", "kb_file_batches")


@pytest.fixture(scope="module")
def store(fz):
    up = fz.call(
        "POST",
        "/v1/files",
        fz.user_key,
        files={"file": ("a.txt", b"refunds in 30 days")},
        data={"purpose": "assistants"},
    )
    assert up.status_code == 200, up.text
    vs = fz.call("POST", "/v1/vector_stores", fz.user_key, json={"name": "fz", "file_ids": [up.json()["id"]]})
    assert vs.status_code == 200, vs.text
    return vs.json()["id"], up.json()["id"]


@fuzz(120)
@given(
    filename=odd_text,
    purpose=st.none() | st.sampled_from(["assistants", "user_data", "batch", "fine-tune"]) | odd_text,
    content=st.binary(max_size=300),
    ctype=st.none() | header_text,
    extra=st.dictionaries(st.sampled_from(["purpose", "file", "expires_after[anchor]", "x"]), odd_text, max_size=2),
)
def test_fuzz_file_uploads(fz, filename, purpose, content, ctype, extra):
    data = dict(extra)
    if purpose is not None:
        data["purpose"] = purpose
    file = (filename, content, ctype) if ctype is not None else (filename, content)
    try:
        fz.call("POST", "/v1/files", fz.user_key, files={"file": file}, data=data, tables=STORE_TABLES)
    except (UnicodeEncodeError, ValueError):  # a name or type httpx cannot put in a part header
        pass


@fuzz(80)
@given(raw=st.binary(max_size=200), ctype=header_bytes)
def test_fuzz_file_upload_raw_bodies(fz, raw, ctype):
    fz.call("POST", "/v1/files", fz.user_key, content=raw, headers={"content-type": ctype}, tables=STORE_TABLES)


LIST_PARAMS = ["limit", "after", "before", "order", "purpose", "filter"]


@fuzz(120)
@given(
    method=st.sampled_from(["GET", "DELETE", "POST"]),
    fid=odd_id,
    suffix=st.sampled_from(["", "/content"]),
    query=query_of(LIST_PARAMS),
)
def test_fuzz_file_ids_and_lists(fz, method, fid, suffix, query):
    fz.call(method, f"/v1/files/{quote(fid, safe='')}{suffix}", fz.user_key, tables=STORE_TABLES)
    fz.call("GET", "/v1/files?" + urlencode(query), fz.user_key)


filter_leaf = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["eq", "ne", "gt", "gte", "lt", "lte", "in", "nin", "and", "or", "like"]) | odd_value,
        "key": st.sampled_from(["kind", "year", "public"]) | odd_value,
        "value": odd_value | st.lists(odd_value, max_size=3),
    },
)
filters = st.recursive(
    filter_leaf,
    lambda inner: st.fixed_dictionaries(
        {"type": st.sampled_from(["and", "or"]) | odd_value, "filters": st.lists(inner, max_size=3) | json_values}
    ),
    max_leaves=6,
)
search_body = st.fixed_dictionaries(
    {},
    optional={
        "query": odd_text | st.lists(odd_text, max_size=12) | json_values,
        "filters": filters | json_values,
        "max_num_results": st.integers(-2, 60) | json_values,
        "ranking_options": st.fixed_dictionaries(
            {},
            optional={
                "ranker": st.sampled_from(["none", "auto", "x"]) | odd_value,
                "score_threshold": odd_value | st.floats(),
            },
        )
        | json_values,
        "rewrite_query": json_values,
    },
) | body_of(["query"])


@fuzz(160)
@given(
    body=search_body
    | mutants(
        {
            "query": "refunds",
            "max_num_results": 3,
            "filters": {"type": "and", "filters": [{"type": "eq", "key": "kind", "value": "policy"}]},
            "ranking_options": {"ranker": "none", "score_threshold": 0.1},
            "rewrite_query": False,
        },
        {"filters": filters},
    )
)
def test_fuzz_vector_store_search(fz, store, body):
    vs, _ = store
    fz.call("POST", f"/v1/vector_stores/{vs}/search", fz.user_key, content=json.dumps(body), tables=STORE_TABLES)


vs_body = body_of(["name", "description", "file_ids", "chunking_strategy", "metadata", "expires_after"]) | mutants(
    {
        "name": "n",
        "description": "d",
        "metadata": {"team": "x"},
        "expires_after": {"anchor": "last_active_at", "days": 7},
        "chunking_strategy": {"type": "static", "static": {"max_chunk_size_tokens": 200, "chunk_overlap_tokens": 20}},
    }
)
attach_body = st.fixed_dictionaries(
    {},
    optional={
        "file_id": odd_id | json_values,
        "file_ids": st.lists(odd_id, max_size=3) | json_values,
        "attributes": st.dictionaries(odd_text, odd_value, max_size=4) | json_values,
        "chunking_strategy": st.fixed_dictionaries(
            {"type": st.sampled_from(["auto", "static", "other"]) | odd_value},
            optional={
                "static": st.fixed_dictionaries(
                    {},
                    optional={
                        "max_chunk_size_tokens": odd_value | st.integers(-10, 10**6),
                        "chunk_overlap_tokens": odd_value | st.integers(-10, 10**6),
                    },
                )
                | json_values
            },
        )
        | json_values,
    },
) | body_of(["file_id"])


@fuzz(160)
@given(
    kind=st.sampled_from(["create", "update", "files", "file_batches", "file_update"]),
    vs_body=vs_body,
    attach=attach_body,
)
def test_fuzz_vector_store_writes(fz, store, kind, vs_body, attach):
    vs, fid = store
    path, body = {
        "create": ("/v1/vector_stores", vs_body),
        "update": (f"/v1/vector_stores/{vs}", vs_body),
        "files": (f"/v1/vector_stores/{vs}/files", attach),
        "file_batches": (f"/v1/vector_stores/{vs}/file_batches", attach),
        "file_update": (f"/v1/vector_stores/{vs}/files/{fid}", attach),
    }[kind]
    fz.call("POST", path, fz.user_key, content=json.dumps(body), tables=STORE_TABLES)


@fuzz(160)
@given(
    method=st.sampled_from(["GET", "DELETE", "POST"]),
    which=st.sampled_from(["vs", "file", "file_content", "batch", "batch_files", "batch_cancel", "files", "stores"]),
    a=odd_id,
    b=odd_id,
    real=st.booleans(),
    query=query_of(LIST_PARAMS),
)
def test_fuzz_vector_store_ids_and_lists(fz, store, method, which, a, b, real, query):
    vs, _ = store
    a = vs if real else quote(a, safe="")
    b = quote(b, safe="")
    path = {
        "vs": f"/v1/vector_stores/{a}",
        "file": f"/v1/vector_stores/{a}/files/{b}",
        "file_content": f"/v1/vector_stores/{a}/files/{b}/content",
        "batch": f"/v1/vector_stores/{a}/file_batches/{b}",
        "batch_files": f"/v1/vector_stores/{a}/file_batches/{b}/files",
        "batch_cancel": f"/v1/vector_stores/{a}/file_batches/{b}/cancel",
        "files": f"/v1/vector_stores/{a}/files",
        "stores": "/v1/vector_stores",
    }[which]
    if method == "DELETE" and which == "vs" and real:
        method = "GET"  # the fixture's store stays
    fz.call(method, path + "?" + urlencode(query), fz.user_key, tables=STORE_TABLES if method != "GET" else ())


# ---- rerank, conversation reads, models --------------------------------------------------------

rerank_body = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["rerank-mock", "gpt-mock", "embed-mock", "nope", "agent:fzbot"]) | odd_value,
        "query": odd_text | json_values,
        "documents": st.lists(odd_text | st.fixed_dictionaries({"text": odd_value}) | json_values, max_size=4)
        | json_values,
        "top_n": st.integers(-2, 10) | json_values,
        "return_documents": json_values,
        "max_chunks_per_doc": json_values,
        "rank_fields": json_values,
    },
) | body_of(["model", "query"])


@fuzz(160)
@given(
    body=rerank_body
    | mutants(
        {"model": "rerank-mock", "query": "q", "documents": ["a", {"text": "b"}], "top_n": 1, "return_documents": True}
    )
)
def test_fuzz_rerank(fz, body):
    fz.call("POST", "/v1/rerank", fz.user_key, content=json.dumps(body), upstream_ok=True)


@fuzz(120)
@given(
    name=st.sampled_from(["fzbot", "fztool", "nope"]) | odd_text,
    conv=st.sampled_from(["c1", "wa:123", "vapi:x", "a" * 257]) | odd_text,
    tail=st.sampled_from(["/messages", "/x/messages", "/messages/"]),
    model=st.sampled_from(["agent:fzbot", "agent:fzbot@1", "rerank-mock"]) | odd_text,
)
def test_fuzz_conversation_reads_and_models(fz, name, conv, tail, model):
    path = f"/v1/agents/{quote(name, safe='')}/conversations/{quote(conv, safe='')}{tail}"
    fz.call("GET", path, fz.user_key, tables=STATE_OF_TURNS)
    fz.call("GET", f"/v1/models/{quote(model, safe='')}", fz.user_key)


# ---- the admin API ---------------------------------------------------------------------------

ADMIN_TABLES = (
    "api_keys",
    "budgets",
    "agents",
    "prompt_versions",
    "prompt_labels",
    "experiments",
    "knowledge_bases",
    "kb_documents",
    "escalations",
    "learned_examples",
    "whatsapp_templates",
    "vapi_calls",
    "erased_conversations",
)
# (method, path with {a} / {b} for ids, a valid body to mutate)
AGENT_BODY = {
    "name": "fz-new",
    "model": "gpt-mock",
    "template": "Hi {{ who }}.",
    "variables": {"who": {"type": "string"}},
    "tools": [],
    "max_steps": 3,
    "memory": {"window_turns": 10},
    "defaults": {"who": "x"},
}
ADMIN_ROUTES = [
    ("POST", "/admin/keys", {"name": "fz-k", "rpm": 10, "scopes": ["admin"], "models": ["gpt-mock"], "budget_usd": 1,
                             "budget_period": "daily", "allowed_ips": ["10.0.0.0/8"], "attribution": {"user": ["a*"]},
                             "require_tags": ["t"], "expires_at": "2099-01-01T00:00:00Z"}),
    ("GET", "/admin/keys", None),
    ("DELETE", "/admin/keys/{a}", None),
    ("POST", "/admin/budgets", {"scope": "agent", "scope_value": "fzbot", "limit_usd": 5, "period": "monthly",
                                "enforcement": "soft", "thresholds": [0.5, 1.0], "webhook_url": "https://example.com/h"}),
    ("GET", "/admin/budgets", None),
    ("GET", "/admin/budgets/{budget}", None),
    ("PATCH", "/admin/budgets/{budget}", {"limit_usd": 7, "enforcement": "hard", "thresholds": [0.8]}),
    ("DELETE", "/admin/budgets/{a}", None),
    ("GET", "/admin/spend", None),
    ("GET", "/admin/requests", None),
    ("GET", "/admin/requests/{a}", None),
    ("GET", "/admin/access-log", None),
    ("GET", "/admin/runs/{a}", None),
    ("POST", "/admin/agents", AGENT_BODY),
    ("GET", "/admin/agents", None),
    ("GET", "/admin/agents/{a}", None),
    ("PATCH", "/admin/agents/fzpatch", {"model": "gpt-mock", "description": "d", "max_steps": 2,
                                         "fallback_message": "x", "builtins": ["end_conversation"], "defaults": {}}),
    ("DELETE", "/admin/agents/{a}", None),
    ("POST", "/admin/agents/fzpatch/versions", {"template": "v {{ a }}", "variables": {"a": {"type": "string"}},
                                                 "note": "n", "labels": ["staging"]}),
    ("GET", "/admin/agents/{a}/versions", None),
    ("GET", "/admin/agents/{a}/versions/{b}", None),
    ("GET", "/admin/agents/{a}/diff", None),
    ("PUT", "/admin/agents/fzpatch/labels/{b}", {"version": 1}),
    ("PUT", "/admin/agents/fzpatch/labels/exp", {"variants": {"1": 50, "2": 50}, "primary_metric": "score"}),
    ("GET", "/admin/agents/{a}/experiments", None),
    ("POST", "/admin/agents/{a}/experiments/{b}/stop", {"promote": "1"}),
    ("GET", "/admin/prompt-templates", None),
    ("GET", "/admin/escalations", None),
    ("GET", "/admin/escalations/stats", None),
    ("POST", "/admin/escalations/claim-next", {"team": "t", "skill": "s"}),
    ("GET", "/admin/escalations/{a}", None),
    ("POST", "/admin/escalations/{a}/claim", {}),
    ("POST", "/admin/escalations/{a}/reply", {"text": "hello"}),
    ("POST", "/admin/escalations/{a}/resolve", {"outcome": "resolved", "corrected_answer": "x",
                                                 "approve_draft": False}),
    ("POST", "/admin/escalations/{a}/reassign", {"team": "t", "skills": ["s"], "urgency": "high"}),
    ("POST", "/admin/escalations/{a}/release", {}),
    ("GET", "/admin/agents/{a}/learned", None),
    ("POST", "/admin/agents/{a}/learned/{b}/approve", {}),
    ("POST", "/admin/agents/{a}/learned/{b}/reject", {}),
    ("GET", "/admin/agents/{a}/training-data", None),
    ("GET", "/admin/agents/{a}/conversations/{b}/messages", None),
    ("DELETE", "/admin/agents/{a}/conversations/{b}", None),
    ("POST", "/admin/knowledge-bases", {"name": "fz-kb", "description": "d", "settings": {"chunk_size": 200}}),
    ("GET", "/admin/knowledge-bases", None),
    ("GET", "/admin/knowledge-bases/{kb}", None),
    ("PATCH", "/admin/knowledge-bases/{kb}", {"description": "d", "settings": {"top_k": 3}}),
    ("DELETE", "/admin/knowledge-bases/{a}", None),
    ("GET", "/admin/knowledge-bases/{kb}/documents", None),
    ("GET", "/admin/knowledge-bases/{kb}/documents/{b}", None),
    ("DELETE", "/admin/knowledge-bases/{kb}/documents/{b}", None),
    ("POST", "/admin/knowledge-bases/{kb}/query", {"query": "refunds", "top_k": 3, "threshold": 0.1,
                                                   "max_context_tokens": 100, "candidates": 10, "lexical_floor": 0.1}),
    ("GET", "/admin/queues/{a}", None),
    ("GET", "/admin/queues/{a}/dead-letters", None),
    ("POST", "/admin/queues/{a}/dead-letters/{b}/retry", {}),
    ("DELETE", "/admin/queues/{a}/dead-letters/{b}", None),
    ("GET", "/admin/channels/whatsapp/templates", None),
    ("POST", "/admin/channels/whatsapp/templates", {"account": "acme", "name": "reengage", "language": "en",
                                                   "category": "utility", "description": "d"}),
    ("GET", "/admin/channels/whatsapp/messages", None),
    ("POST", "/admin/channels/whatsapp/send", {"account": "acme", "to": "15550001", "text": "hello"}),
    ("POST", "/admin/channels/vapi/calls", {"account": "main", "to": "+14155550100", "agent": "fzbot",
                                            "variables": {"company": "x"}}),
    ("GET", "/admin/channels/vapi/calls", None),
    ("GET", "/admin/channels/vapi/calls/{a}", None),
]  # fmt: skip
ADMIN_QUERY = ["tenant", "limit", "after", "before", "order", "from", "to", "since", "until", "group_by", "all",
               "status", "agent", "key", "model", "format", "account", "page", "q", "version", "label", "min_samples",
               "cursor", "conversation_id", "metric", "alpha", "start", "end", "request_id", "team",
               "wa_id"]  # fmt: skip
ADMIN_IDS = st.sampled_from(["fzbot", "fzpatch", "kb-ingest", "1", "2", "production", "latest", "0-0"]) | odd_id


@fuzz(600)
@given(
    route=st.sampled_from(ADMIN_ROUTES),
    master=st.booleans(),
    a=ADMIN_IDS,
    b=ADMIN_IDS,
    body=st.data(),
    query=query_of(ADMIN_QUERY) | st.sampled_from([{"tenant": TENANT}, {"limit": "1"}, {"from": "1", "to": "2"}]),
)
def test_fuzz_admin_api(fz, admin_ids, route, master, a, b, body, query):
    method, path, valid = route
    ids = {"a": quote(a, safe=""), "b": quote(b, safe=""), **admin_ids}
    path = path.format(**ids)
    if query:
        path += "?" + urlencode(query)
    kw = {}
    if method in ("POST", "PUT", "PATCH"):
        kw["content"] = json.dumps(body.draw(mutants(valid) if valid else json_values))
    if method == "DELETE" and a in ("fzbot", "fztool", "fzpatch"):
        method = "GET"  # the agents the fuzzing uses stay
    # the fixture's knowledge base stays too, whatever dot segments a drawn id adds (the client
    # resolves "…/{kb}/documents/.." to the knowledge base itself)
    if method == "DELETE" and posixpath.normpath(path.split("?")[0]) == f"/admin/knowledge-bases/{admin_ids['kb']}":
        method = "GET"
    key = MASTER_KEY if master else fz.admin_key
    fz.call(method, path, key, tables=ADMIN_TABLES, **kw)


@fuzz(80)
@given(
    filename=odd_text,
    content=st.binary(max_size=300),
    ctype=st.none() | header_text.map(str.strip),
    field=st.sampled_from(["file", "document", "x"]),
    master=st.booleans(),
)
def test_fuzz_admin_kb_document_uploads(fz, admin_ids, filename, content, ctype, field, master):
    key = MASTER_KEY if master else fz.admin_key
    file = (filename, content, ctype) if ctype else (filename, content)
    try:
        fz.call(
            "POST", f"/admin/knowledge-bases/{admin_ids['kb']}/documents", key, files={field: file}, tables=ADMIN_TABLES
        )
    except (UnicodeEncodeError, ValueError):  # a name or type httpx cannot put in a part header
        pass


@fuzz(20)
@given(master=st.booleans(), query=query_of(["tenant"]))
def test_fuzz_admin_escalation_feed(fz, master, query):
    """The feed is an event stream that stays open: its answer is checked by its headers."""
    key = MASTER_KEY if master else fz.admin_key
    headers = {"Authorization": f"Bearer {key}"}
    with fz.http.stream("GET", "/admin/escalations/feed?" + urlencode(query), headers=headers) as resp:
        if resp.status_code == 200:
            assert resp.headers["content-type"].startswith("text/event-stream")
        else:
            resp.read()
            check(resp)


@pytest.fixture(scope="module")
def admin_ids(fz) -> dict:
    """Real ids for the admin routes to reach past their lookups: a budget, a knowledge base and
    an agent of the fuzzed tenant (fzpatch, whose versions and labels the fuzzing changes)."""
    budget = fz.call(
        "POST", "/admin/budgets", fz.admin_key, json={"scope": "user", "scope_value": "u1", "limit_usd": 9}
    )
    assert budget.status_code == 201, budget.text
    kb = fz.call("POST", "/admin/knowledge-bases", fz.admin_key, json={"name": "fz-admin-kb"})
    assert kb.status_code == 201, kb.text
    agent = fz.call("POST", "/admin/agents", fz.admin_key, json={**AGENT_BODY, "name": "fzpatch"})
    assert agent.status_code == 201, agent.text
    return {"budget": budget.json()["id"], "kb": kb.json()["id"]}


# ---- channels: WhatsApp and VAPI with valid credentials ---------------------------------------

wa_message = st.fixed_dictionaries(
    {},
    optional={
        "from": st.sampled_from(["15550001", "0", ""]) | odd_value,
        "id": odd_id | json_values,
        "timestamp": st.sampled_from(["1700000000", "-1", "9" * 30, "x"]) | odd_value,
        "type": st.sampled_from(["text", "image", "audio", "interactive", "button", "location", "reaction", "unknown"])
        | odd_value,
        "text": st.fixed_dictionaries({}, optional={"body": odd_value}) | json_values,
        "image": st.fixed_dictionaries({}, optional={"id": odd_value, "mime_type": odd_value, "caption": odd_value}),
        "interactive": json_values,
        "context": json_values,
    },
)
wa_value = st.fixed_dictionaries(
    {},
    optional={
        "messaging_product": st.just("whatsapp") | odd_value,
        "metadata": st.fixed_dictionaries(
            {},
            optional={
                "phone_number_id": st.sampled_from([WA_PNID, "1", ""]) | odd_value,
                "display_phone_number": odd_value,
            },
        )
        | json_values,
        "contacts": st.lists(
            st.fixed_dictionaries({}, optional={"profile": json_values, "wa_id": odd_value}), max_size=2
        )
        | json_values,
        "messages": st.lists(wa_message, max_size=3) | json_values,
        "statuses": st.lists(
            st.fixed_dictionaries(
                {}, optional={"id": odd_value, "status": odd_value, "recipient_id": odd_value, "errors": json_values}
            ),
            max_size=2,
        )
        | json_values,
    },
)
wa_doc = (
    st.fixed_dictionaries(
        {},
        optional={
            "object": st.just("whatsapp_business_account") | odd_value,
            "entry": st.lists(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "id": odd_value,
                        "changes": st.lists(
                            st.fixed_dictionaries(
                                {}, optional={"field": st.just("messages") | odd_value, "value": wa_value}
                            ),
                            max_size=2,
                        )
                        | json_values,
                    },
                ),
                max_size=2,
            )
            | json_values,
        },
    )
    | json_values
)
WA_TABLES = ("whatsapp_conversations", "whatsapp_messages", "whatsapp_templates")


WA_MSG = {"from": "15550001", "id": "wamid.FZ1", "timestamp": "1700000000", "type": "text", "text": {"body": "hi"}}


def _wa_notification(messages: list, value: dict) -> dict:
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "1555", "phone_number_id": WA_PNID},
        "contacts": [{"profile": {"name": "Ada"}, "wa_id": "15550001"}],
        "messages": messages,
        **value,
    }
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": "W", "changes": [{"field": "messages", "value": value}]}],
    }


wa_valid = st.builds(
    _wa_notification,
    st.lists(mutants(WA_MSG, {"id": st.uuids().map(lambda u: f"wamid.FZ{u.hex}")}), min_size=1, max_size=2),
    st.fixed_dictionaries({}, optional={"statuses": json_values, "contacts": json_values, "metadata": json_values}),
)


@fuzz(200)
@given(
    doc=wa_doc | wa_valid,
    raw=st.none() | st.binary(max_size=100),
    account=st.sampled_from(["acme", "acme", "nope", ""]),
)
def test_fuzz_whatsapp_webhook_signed(fz, doc, raw, account):
    body = raw if raw is not None else json.dumps(doc).encode()
    sig = "sha256=" + hmac.new(WA_SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = {"Content-Type": "application/json", "X-Hub-Signature-256": sig}
    fz.call("POST", f"/channels/whatsapp/{account}", content=body, headers=headers, tables=WA_TABLES)


@fuzz(80)
@given(
    query=query_of(["hub.mode", "hub.verify_token", "hub.challenge"])
    | st.fixed_dictionaries(
        {
            "hub.mode": st.just("subscribe") | odd_text,
            "hub.verify_token": st.just("verify-fuzz"),
            "hub.challenge": odd_text,
        }
    )
)
def test_fuzz_whatsapp_verification(fz, query):
    fz.call("GET", "/channels/whatsapp/acme?" + urlencode(query))


vapi_call = st.fixed_dictionaries(
    {},
    optional={
        "id": odd_id | json_values,
        "type": st.sampled_from(["inboundPhoneCall", "outboundPhoneCall", "webCall"]) | odd_value,
        "phoneNumberId": st.sampled_from(["pn_main", "pn_x"]) | odd_value,
        "customer": st.fixed_dictionaries({}, optional={"number": odd_value, "name": odd_value}) | json_values,
        "metadata": json_values,
        "assistantOverrides": json_values,
    },
)
vapi_message = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            ["assistant-request", "tool-calls", "transfer-destination-request", "status-update", "end-of-call-report",
             "hang", "conversation-update"]
        )
        | odd_value
    },
    optional={
        "call": vapi_call | json_values,
        "toolCallList": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "id": odd_value,
                    "type": odd_value,
                    "function": st.fixed_dictionaries(
                        {}, optional={"name": st.sampled_from(["get_weather", "x"]) | odd_value, "arguments": odd_value}
                    )
                    | json_values,
                },
            ),
            max_size=3,
        )
        | json_values,
        "status": odd_value,
        "endedReason": odd_value,
        "cost": odd_value | st.floats(),
        "durationSeconds": odd_value | st.floats(),
        "artifact": json_values,
        "recordingUrl": odd_value,
        "summary": odd_value,
        "transcript": odd_value,
        "startedAt": odd_value,
        "endedAt": odd_value,
    },
)  # fmt: skip
VAPI_TABLES = ("vapi_calls",)
VAPI_CALL = {"id": "call-fz-1", "type": "inboundPhoneCall", "phoneNumberId": "pn_main", "customer": {"number": "+1415"}}
VAPI_VALID = {
    "assistant-request": {"type": "assistant-request", "call": VAPI_CALL},
    "tool-calls": {
        "type": "tool-calls",
        "call": VAPI_CALL,
        "toolCallList": [
            {"id": "t1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "x"}}}
        ],
    },
    "status-update": {"type": "status-update", "call": VAPI_CALL, "status": "in-progress"},
    "end-of-call-report": {
        "type": "end-of-call-report",
        "call": VAPI_CALL,
        "endedReason": "hangup",
        "cost": 0.1,
        "durationSeconds": 30,
        "summary": "s",
        "transcript": "t",
        "recordingUrl": "https://x.example/r.wav",
        "startedAt": "2026-01-01T00:00:00Z",
        "endedAt": "2026-01-01T00:01:00Z",
    },
}


@fuzz(200)
@given(
    message=vapi_message
    | json_values
    | st.sampled_from(list(VAPI_VALID)).flatmap(lambda kind: mutants(VAPI_VALID[kind], {"call": vapi_call})),
    wrap=st.booleans(),
)
def test_fuzz_vapi_events(fz, message, wrap):
    body = {"message": message} if wrap else message
    headers = {"Authorization": f"Bearer {VAPI_TOKEN}"}
    fz.call("POST", "/channels/vapi/main/events", content=json.dumps(body), headers=headers, tables=VAPI_TABLES)


@fuzz(120)
@given(
    body=st.fixed_dictionaries(
        {},
        optional={
            "model": odd_value,
            "messages": st.lists(
                st.fixed_dictionaries(
                    {"role": st.sampled_from(["user", "assistant", "system"]) | odd_value, "content": odd_value}
                ),
                max_size=3,
            )
            | json_values,
            "call": vapi_call | json_values,
            "stream": json_values,
            "metadata": json_values,
            "tools": json_values,
        },
    )
    | json_values
)
def test_fuzz_vapi_llm(fz, body):
    headers = {"Authorization": f"Bearer {VAPI_TOKEN}"}
    fz.call(
        "POST",
        "/channels/vapi/main/chat/completions",
        content=json.dumps(body),
        headers=headers,
        tables=VAPI_TABLES,
        upstream_ok=True,
    )


# ---- findings: each input the fuzzing found, as a plain test -----------------------------------


def error_of(resp: httpx.Response, status: int) -> dict:
    check(resp)
    assert resp.status_code == status, resp.text
    return resp.json()["error"]


def test_finding_files_nul_in_ids_and_cursors(fz):
    up = fz.call("POST", "/v1/files", fz.user_key, files={"file": ("b.txt", b"x")}, data={"purpose": "assistants"})
    fid = up.json()["id"]
    vs = fz.call("POST", "/v1/vector_stores", fz.user_key, json={"name": "nul", "file_ids": [fid]}).json()["id"]
    assert error_of(fz.call("GET", "/v1/files/%00", fz.user_key), 404)["param"] == "file_id"
    assert error_of(fz.call("DELETE", "/v1/files/a%00", fz.user_key, tables=STORE_TABLES), 404)["param"] == "file_id"
    assert error_of(fz.call("GET", f"/v1/vector_stores/{vs}%00", fz.user_key), 404)["param"] == "vector_store_id"
    assert error_of(fz.call("GET", f"/v1/vector_stores/{vs}/files/%00", fz.user_key), 404)["param"] == "file_id"
    assert error_of(fz.call("GET", "/v1/files?after=%00", fz.user_key), 400)["param"] == "after"
    assert error_of(fz.call("GET", "/v1/vector_stores?before=x%00", fz.user_key), 400)["param"] == "before"
    assert error_of(fz.call("GET", "/v1/files?purpose=%00", fz.user_key), 400)["param"] == "purpose"
    resp = fz.call("POST", "/v1/vector_stores", fz.user_key, json={"file_ids": [fid, "\x00"]}, tables=STORE_TABLES)
    assert error_of(resp, 400)["param"] == "file_ids[1]"


@pytest.mark.parametrize("master", [False, True])
def test_finding_admin_nul_in_path_ids_and_query(fz, admin_ids, master):
    key = MASTER_KEY if master else fz.admin_key
    kb = admin_ids["kb"]
    for path, param in [
        (f"/admin/knowledge-bases/{kb}/documents/%00", "doc_id"),
        ("/admin/knowledge-bases/kb%00", "kb_id"),
        ("/admin/budgets/%00", "budget_id"),
        ("/admin/escalations/1%00", "id"),
        ("/admin/agents/fzbot/versions/%00", "version"),
    ]:
        assert error_of(fz.call("GET", path, key), 404)["param"] == param
    resp = fz.call("DELETE", "/admin/keys/%00", key, tables=ADMIN_TABLES)
    assert error_of(resp, 404)["param"] == "key_id"
    assert error_of(fz.call("GET", "/admin/keys?tenant=%00", key), 400)["param"] == "tenant"
    assert error_of(fz.call("GET", "/admin/spend?group_by=a%00", key), 400)["param"] == "group_by"


def test_finding_feedback_nul_in_agent(fz):
    resp = fz.call(
        "POST",
        "/v1/feedback",
        fz.user_key,
        json={"conversation_id": "c", "thumbs": "up", "agent": "\x00"},
        tables=("feedback",),
    )
    assert error_of(resp, 400)["param"] == "agent"
    resp = fz.call(
        "POST",
        "/v1/feedback",
        fz.user_key,
        json={"request_id": "r", "score": 1, "agent": "agent:a\x00"},
        tables=("feedback",),
    )
    assert error_of(resp, 400)["param"] == "agent"


def _wa_post(fz, doc) -> httpx.Response:
    body = json.dumps(doc).encode()
    sig = "sha256=" + hmac.new(WA_SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = {"Content-Type": "application/json", "X-Hub-Signature-256": sig}
    return fz.call("POST", "/channels/whatsapp/acme", content=body, headers=headers, tables=WA_TABLES)


def test_finding_whatsapp_invalid_notification_names_its_field(fz):
    assert error_of(_wa_post(fz, {"object": "page"}), 400)["param"] == "object"
    assert error_of(_wa_post(fz, {"object": "whatsapp_business_account", "entry": {}}), 400)["param"] == "entry"
    doc = {"object": "whatsapp_business_account", "entry": [{"changes": []}, {"changes": 5}]}
    assert error_of(_wa_post(fz, doc), 400)["param"] == "entry[1].changes"


@pytest.mark.parametrize("role", [[], {}, ["user"], {"user": 1}])
def test_finding_chat_message_role_not_a_string(fz, role):
    body = {"model": "gpt-mock", "messages": [{"role": role, "content": "hi"}]}
    resp = fz.call("POST", "/v1/chat/completions", fz.user_key, json=body)
    assert error_of(resp, 400)["param"] == "messages[0].role"
    resp = fz.call(
        "POST", "/channels/vapi/main/chat/completions", json=body, headers={"Authorization": f"Bearer {VAPI_TOKEN}"}
    )
    assert error_of(resp, 400)["param"] == "messages[0].role"


def _deep(depth: int, kind: str) -> str:
    """JSON nested ``depth`` levels: within orjson's 1024, past Python's recursion limit."""
    return ("[" * depth + "]" * depth) if kind == "list" else ('{"a":' * depth + "1" + "}" * depth)


DEEP_TARGETS = [
    ("/v1/chat/completions", '{"model": "agent:fzbot", "messages": [{"role": "user", "content": "x"}], "%s": %s}',
     ["metadata", "variables", "tools", "tool_choice", "response_format", "stream_options", "stop", "user"]),
    ("/v1/chat/completions", '{"model": "gpt-mock", "messages": [{"role": "user", "content": %s}], "%s": 1}', ["x"]),
    ("/v1/chat/completions", '{"model": "gpt-mock", "messages": [{"role": "user", "content": "x"}], "%s": %s}',
     ["metadata", "tools", "response_format", "logit_bias", "user", "stop"]),
    ("/v1/embeddings", '{"model": "embed-mock", "%s": %s}', ["input", "dimensions"]),
    ("/v1/rerank", '{"model": "rerank-mock", "query": "q", "%s": %s}', ["documents", "top_n"]),
    ("/v1/feedback", '{"conversation_id": "c", "thumbs": "up", "%s": %s}', ["text", "score"]),
    ("/v1/vector_stores", '{"name": "n", "%s": %s}', ["metadata", "chunking_strategy", "expires_after", "file_ids"]),
    ("/admin/agents", '{"name": "deep", "model": "gpt-mock", "template": "x", "%s": %s}',
     ["variables", "defaults", "tools", "memory", "escalation"]),
    ("/admin/keys", '{"name": "deep", "%s": %s}', ["attribution", "models"]),
    ("/channels/vapi/main/events", '{"message": {"type": "end-of-call-report", "call": {"id": "c-deep"}, "%s": %s}}',
     ["artifact", "metadata", "analysis"]),
    ("/channels/vapi/main/chat/completions", '{"model": "x", "messages": [{"role": "user", "content": "x"}], "%s": %s}',
     ["call", "metadata"]),
]  # fmt: skip
DEEP_KEYS = {"/admin": MASTER_KEY, "/channels/vapi": VAPI_TOKEN}


@pytest.mark.parametrize("kind", ["list", "dict"])
@pytest.mark.parametrize("depth", [900, 1000])
def test_fuzz_deeply_nested_json(fz, store, kind, depth):
    vs, _ = store
    failed = []
    targets = [
        *DEEP_TARGETS,
        (f"/v1/vector_stores/{vs}/search", '{"query": "q", "%s": %s}', ["filters", "ranking_options"]),
    ]
    for path, template, fields in targets:
        for field in fields:
            if "content" in template and '%s": 1' in template:
                body = template % (_deep(depth, kind), field)
            else:
                body = template % (field, _deep(depth, kind))
            key = next((k for prefix, k in DEEP_KEYS.items() if path.startswith(prefix)), fz.user_key)
            try:
                fz.call("POST", path, key, content=body, tables=ADMIN_TABLES, upstream_ok=True)
            except AssertionError as exc:
                failed.append((path, field, str(exc)[:300]))
    assert not failed, failed


def test_finding_chat_field_nested_past_what_can_be_written_again(fz):
    """orjson reads 1024 levels and writes 255: a metadata nested 300 deep was read, then failed
    to serialize upstream (a 500). It is now refused when read, naming the field."""
    deep = _deep(300, "dict")
    for model, field in (("gpt-mock", "metadata"), ("agent:fzbot", "metadata"), ("gpt-mock", "logit_bias")):
        head = json.dumps({"model": model, "messages": [{"role": "user", "content": "x"}]})[:-1]
        body = f'{head}, "{field}": {deep}}}'
        resp = fz.call("POST", "/v1/chat/completions", fz.user_key, content=body, tables=STATE_OF_TURNS)
        assert error_of(resp, 400)["param"] == field


@pytest.mark.parametrize("field", ["interactive", "context", "text", "referral", "contacts"])
def test_fuzz_whatsapp_deeply_nested_message_field(fz, field):
    msg = json.dumps({**WA_MSG, "id": f"wamid.DEEP{uuid.uuid4().hex}", "type": field})[:-1]
    msg = f'{msg}, "{field}": {_deep(300, "dict")}}}'
    doc = json.dumps(_wa_notification([], {})).replace('"messages": []', f'"messages": [{msg}]')
    body = doc.encode()
    sig = "sha256=" + hmac.new(WA_SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = {"Content-Type": "application/json", "X-Hub-Signature-256": sig}
    fz.call("POST", "/channels/whatsapp/acme", content=body, headers=headers, tables=WA_TABLES)


def _multipart(filename: bytes, purpose: bytes, content: bytes = b"hello", ctype: bytes = b"text/plain") -> dict:
    """A multipart body built by hand: bytes httpx would refuse to put in a part header."""
    boundary = b"fuzzboundary0123"
    body = (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n' + purpose + b"\r\n"
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n'
        b"Content-Type: " + ctype + b"\r\n\r\n" + content + b"\r\n--" + boundary + b"--\r\n"
    )
    return {"content": body, "headers": {"content-type": "multipart/form-data; boundary=fuzzboundary0123"}}


@pytest.mark.parametrize(
    ("filename", "purpose", "ctype"),
    [
        (b"a\x00b.txt", b"assistants", b"text/plain"),
        (b"\xff\xfe.txt", b"assistants", b"text/plain"),
        (b"ok.txt", b"assist\x00ants", b"text/plain"),
        (b"ok.txt", b"\xff", b"text/plain"),
        (b"ok.txt", b"assistants", b"text/\x00plain"),
        (b"ok.txt", b"assistants", b"\xff/\xfe"),
        (b"", b"assistants", b"text/plain"),
        (b"x" * 5000, b"assistants", b"text/plain"),
    ],
)
def test_fuzz_multipart_bytes_httpx_would_not_send(fz, admin_ids, filename, purpose, ctype):
    kw = _multipart(filename, purpose, ctype=ctype)
    fz.call("POST", "/v1/files", fz.user_key, tables=STORE_TABLES, **kw)
    kw = _multipart(filename, purpose, ctype=ctype)
    fz.call("POST", f"/admin/knowledge-bases/{admin_ids['kb']}/documents", fz.admin_key, tables=ADMIN_TABLES, **kw)


def test_finding_upload_part_content_type_with_nul(fz, admin_ids):
    kw = _multipart(b"ok.txt", b"assistants", ctype=b"text/\x00plain")
    assert error_of(fz.call("POST", "/v1/files", fz.user_key, tables=STORE_TABLES, **kw), 400)["param"] == "file"
    kw = _multipart(b"ok.txt", b"assistants", ctype=b"text/\x00plain")
    resp = fz.call(
        "POST", f"/admin/knowledge-bases/{admin_ids['kb']}/documents", fz.admin_key, tables=ADMIN_TABLES, **kw
    )
    assert error_of(resp, 400)["param"] == "file"


@fuzz(120)
@given(
    filename=st.sampled_from([b"ok.txt"]) | st.binary(max_size=40),
    purpose=st.sampled_from([b"assistants", b"user_data"]) | st.binary(max_size=20),
    ctype=st.sampled_from([b"text/plain", b"application/pdf"]) | st.binary(max_size=30),
    content=st.binary(max_size=100),
    admin=st.booleans(),
)
def test_fuzz_multipart_part_headers_as_bytes(fz, admin_ids, filename, purpose, ctype, content, admin):
    kw = _multipart(filename, purpose, content, ctype)
    if admin:
        path, key, tables = f"/admin/knowledge-bases/{admin_ids['kb']}/documents", fz.admin_key, ADMIN_TABLES
    else:
        path, key, tables = "/v1/files", fz.user_key, STORE_TABLES
    fz.call("POST", path, key, tables=tables, **kw)
