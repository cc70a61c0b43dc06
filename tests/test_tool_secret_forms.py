"""A tool server that echoes the operator's ``${TOOL_*}`` secret in another form — URL-encoded,
JSON-escaped, base64 (standard, URL-safe, inside ``Basic``), hex, HTML entities, another letter
case — leaked it: only the exact text was redacted. Each form goes through a real gateway
process (the OpenAI SDK as client, the mock model answering with the tool results) from the real
tool server of loadtest/mock_tools, and no form of the secret may reach the model, the client,
the run record, the conversation store, the audit ledger (``log_content: true``), Redis or the
gateway's log."""

from __future__ import annotations

import asyncio
import base64
import os
import uuid

import asyncpg
import openai
import orjson
import pytest
import redis.asyncio as aioredis

from loadtest.mock_tools import ECHO_FORMS
from runtime.redaction import redactor
from tests.conftest import Gateway, wait_until
from tests.test_tools_review_s22 import ToolServer, call, http_tool, new_key, unique

SECRET_ENV = "TOOL_SECRET_FORMS_KEY"
SECRET = f"opS3cret/{uuid.uuid4().hex[:16]}+Key="
CAP = 4096


@pytest.fixture(scope="module")
def tools(tmp_root):
    server = ToolServer(tmp_root)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    os.environ[SECRET_ENV] = SECRET
    config = {
        "router": {"max_attempts": 1},
        "policies": {"log_content": True},
        "providers": [{"name": "pp", "kind": "openai", "base_url": f"{module_mock.url}/v1", "api_keys": ["k"]}],
        "models": [{"name": "agent-model", "deployments": [{"provider": "pp", "model": "m"}]}],
    }
    g = Gateway(tmp_root, config, services)
    yield g
    g.stop()


def leaks(text: str) -> list[str]:
    """Which written forms of the secret ``text`` holds (the core of a base64 form: its edges
    carry bits of the neighbouring bytes)."""
    found = [name for name, form in ECHO_FORMS.items() if form(SECRET) in text and name != "html_escape"]
    if SECRET.lower() in text.lower():
        found.append("any case")
    raw = SECRET.encode()
    for offset in range(3):
        core = base64.b64encode(b"\0" * offset + raw).decode()[offset + 1 : len(raw) * 4 // 3 - 1]
        for alphabet in (core, core.replace("+", "-").replace("/", "_")):
            if alphabet in text:
                found.append(f"base64 at offset {offset}")
    return found


def _calls() -> list[dict]:
    calls = [
        {"name": "mecho", "arguments": {"form": "base64"}},
        {"name": "mecho", "arguments": {"form": "json_u", "error": True}},
    ]
    calls += [{"name": "echo", "arguments": {"form": form}} for form in ECHO_FORMS]
    calls.append({"name": "echo", "arguments": {"form": "raw", "pad": CAP - 10}})  # across the size cap
    calls.append({"name": "echo", "arguments": {"form": "url", "status": "500"}})  # quoted in an error
    calls.append({"name": "echo", "arguments": {"form": "raw", "pad": 480, "status": "500"}})  # across its cut
    return calls


def test_every_form_of_an_echoed_secret_is_redacted_everywhere_it_goes(gw, tools, module_mock, services):
    tenant = unique("t")
    tool = http_tool(
        "echo",
        f"{tools.url}/echo-secret",
        {"form": {"type": "string"}, "pad": {"type": "integer"}, "status": {"type": "string"}},
        method="GET",
        headers={"Authorization": f"Bearer ${{{SECRET_ENV}}}"},
        max_response_bytes=CAP,
    )
    mcp_tool = {
        "name": "mecho",
        "kind": "mcp",
        "description": "the MCP echo tool",
        "parameters": {"type": "object", "properties": {"form": {"type": "string"}, "error": {"type": "boolean"}}},
        "config": {
            "url": f"{tools.url}/mcp",
            "tool": "echo_secret",
            "allow_private_networks": True,
            "headers": {"Authorization": f"Bearer ${{{SECRET_ENV}}}"},
        },
    }
    name = unique("sf")
    body = {"name": name, "model": "agent-model", "template": "You help.", "tenant": tenant, "tools": [tool, mcp_tool]}
    assert call(gw, "POST", "/admin/agents", json=body).status_code == 201
    calls = _calls()
    directive = "[[mock:" + orjson.dumps({"tool_calls": calls}).decode() + "]]"
    c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=new_key(gw, tenant), max_retries=0, timeout=60)
    conv = unique("conv")
    raw = c.chat.completions.with_raw_response.create(
        model=f"agent:{name}",
        messages=[{"role": "user", "content": directive}],
        metadata={"conversation_id": conv},
    )
    answer = raw.parse().choices[0].message.content or ""
    request_id = raw.headers["x-request-id"]

    # the tool did get the secret, and echoed every form of it
    sent = [r for r in tools.requests() if r["path"] == "/echo-secret"]
    assert len(sent) == len(calls) - 2 and {r["headers"]["authorization"] for r in sent} == {f"Bearer {SECRET}"}
    # what the model saw, and so the client: every result, each form redacted
    results = answer.removeprefix("tool result: ").split(" | ")
    assert len(results) == len(calls), answer[:2000]
    for spec, result in zip(calls, results, strict=True):
        assert "echo:" in result and "[redacted]" in result, (spec, result[-300:])
        assert not leaks(result), (spec, leaks(result), result[-300:])
    assert results[-3].endswith(f"[truncated: the answer exceeded {CAP} bytes]")
    model_saw = orjson.dumps([r["body"] for r in module_mock.requests()[-3:]]).decode()
    assert "[redacted]" in model_saw and not leaks(model_saw)

    # the run record, the conversation store, the ledger: PostgreSQL and Redis, whole
    def stored() -> str:
        return asyncio.run(_everything(services))

    wait_until(lambda: asyncio.run(_written(services, request_id, conv)), timeout=30, what="run, turn, ledger written")
    run = call(gw, "GET", f"/admin/runs/{request_id}")
    assert run.status_code == 200 and "echo" in run.text and not leaks(run.text)
    everything = stored()
    assert "[redacted]" in everything
    assert not leaks(everything), leaks(everything)
    wait_until(lambda: request_id in gw.log(), timeout=30, what="the turn's access-log line")  # the log is flushed
    assert not leaks(gw.log()), leaks(gw.log())


async def _written(services, request_id: str, conv: str) -> bool:
    conn = await asyncpg.connect(services[0])
    try:
        return bool(
            await conn.fetchval(
                """SELECT (SELECT count(*) FROM ledger WHERE request_id LIKE $1 || '%') >= 2
                      AND EXISTS (SELECT 1 FROM runs WHERE request_id = $1)
                      AND EXISTS (SELECT 1 FROM messages m JOIN conversations c ON c.id = m.conversation_id
                                  WHERE c.external_id = $2)""",
                request_id,
                conv,
            )
        )
    finally:
        await conn.close()


async def _everything(services) -> str:
    """Every row of every table and every value in Redis, as text."""
    conn = await asyncpg.connect(services[0])
    parts: list[str] = []
    try:
        tables = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        for t in tables:
            rows = await conn.fetch(f'SELECT t::text AS row FROM "{t["tablename"]}" t')
            parts.extend(r["row"] for r in rows)
    finally:
        await conn.close()
    redis = aioredis.from_url(services[1])
    try:
        async for key in redis.scan_iter(count=1000):
            kind = (await redis.type(key)).decode()
            if kind == "string":
                value = await redis.get(key)
            elif kind == "list":
                value = await redis.lrange(key, 0, -1)
            elif kind == "hash":
                value = await redis.hgetall(key)
            elif kind == "stream":
                value = await redis.xrange(key)
            elif kind == "zset":
                value = await redis.zrange(key, 0, -1)
            elif kind == "set":
                value = await redis.smembers(key)
            else:
                continue
            parts.append(repr(value))
    finally:
        await redis.aclose()
    # a repr of bytes escapes what is not ASCII and doubles backslashes: undo for JSON's escapes
    return "\n".join(parts).replace("\\\\", "\\")


def test_one_pass_over_a_megabyte_result_finds_every_form():
    hide = redactor([SECRET, "another-secret-" + uuid.uuid4().hex])
    filler = ("The order shipped on time; nothing to report. " * 22_000)[:1_000_000]
    forms = [form(SECRET) for form in ECHO_FORMS.values()]
    text = filler[:500_000] + " ".join(forms) + filler[500_000:]
    out = hide(text)
    assert not leaks(out) and out.count("[redacted]") >= len(forms) - 1
    assert len(out) < len(text)


def test_many_long_secrets_are_grouped_into_bounded_patterns_and_each_is_still_found():
    """One pattern of 32 secrets of 512 characters outgrew RE2's DFA memory: its slower engine
    took 2.8 s per MB. Secrets are grouped (GROUP_SECRETS, GROUP_CHARS), a pass per group."""
    from runtime import redaction

    secrets = [f"k{i:02d}-" + uuid.uuid4().hex * 16 for i in range(20)]  # 20 secrets of 516 characters
    hide = redaction.redactor(secrets)
    assert len(hide._patterns) == -(-20 // min(redaction.GROUP_SECRETS, redaction.GROUP_CHARS // 516))
    text = " ".join(form(s) for s in secrets for form in (ECHO_FORMS["url"], ECHO_FORMS["base64"], str.upper))
    out = hide(text)
    assert out.count("[redacted]") == 3 * len(secrets), out[:500]
    assert not any(s.lower() in out.lower() for s in secrets)
