"""The README's Agents section, run as a newcomer runs it: every ```bash and ```python block of
the section, in order and as written, against `gateway serve` on the demo default (what
`make run` starts: no config, embedded PostgreSQL and Valkey, the bundled mock provider), from a
directory laid out like the repository (`.data`, `.venv`, `examples/`). The admin block of the
Budgets section runs after it, with the same exports.

What the test changes in a block is only what differs on this machine: the port (8000 → a free
one, and the tool server's 8002 → a free one), the request id the reader copies from one block
into the next, and the tool-server line (the test starts that server itself and stops it). A
`curl` that gets an HTTP error fails the block, as does a Python block that raises."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, free_port, wait_until
from tests.test_agents_e2e import ToolServer

TOOLS_LINE = ".venv/bin/python -m loadtest.mock_tools --port 8002 &"
CURL_FAILS = 'curl() { command curl --fail-with-body "$@"; echo; }\n'  # an HTTP error fails the block


def agents_blocks(heading: str = "## Agents") -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(f"\n{heading}") :]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```(bash|python)\n(.*?)```", section, re.S)


def _ready(url: str) -> bool:
    return httpx.get(f"{url}/readyz").status_code == 200


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory):
    """A repository-like working directory and `make run` serving from it."""
    work = tmp_path_factory.mktemp("readme")
    tools = ToolServer(work)
    port = free_port()
    venv = ROOT / ".venv" if (ROOT / ".venv" / "bin" / "gateway").exists() else Path(sys.prefix)
    (work / ".venv").symlink_to(venv)
    shutil.copytree(ROOT / "examples", work / "examples")
    demo = work / "examples" / "agent-orders-demo.json"
    if demo.exists():
        demo.write_text(demo.read_text().replace("127.0.0.1:8002", f"127.0.0.1:{tools.port}"))
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GATEWAY_", "OPENAI_", "TOOL_")) and k not in ("DATABASE_URL", "REDIS_URL")
    }
    log = open(work / "serve.log", "w")
    serve = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--port", str(port)],
        env={**env, "TOOL_ORDERS_TOKEN": "demo-token"},  # as the section says to start it
        cwd=work,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _ready(url), timeout=120, what="the demo gateway")
        yield {"work": work, "env": env, "url": url, "port": port, "tools": tools}
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)
        log.close()
        tools.stop()


class Reader:
    """Runs the section's blocks one by one, with the exports of its first block."""

    def __init__(self, ctx: dict) -> None:
        self.ctx = ctx
        self.setup = ""
        self.env = dict(ctx["env"])
        self.request_id = ""

    def localize(self, code: str) -> str:
        code = code.replace("localhost:8000", f"localhost:{self.ctx['port']}")
        code = code.replace("127.0.0.1:8000", f"127.0.0.1:{self.ctx['port']}")
        if "req_..." in code and "print(" not in code:
            assert self.request_id, "a block uses the request id before one was printed"
            code = code.replace("req_...", self.request_id)
        return code

    def bash(self, code: str) -> str:
        code = self.localize(code)
        if TOOLS_LINE in code:  # the tool server: the fixture runs it on a free port
            code = code.replace(TOOLS_LINE, "")
        script = "set -euo pipefail\n" + CURL_FAILS + self.setup + code
        out = subprocess.run(
            ["bash", "-c", script], env=self.env, cwd=self.ctx["work"], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, f"```bash\n{code}```\nfailed:\n{out.stdout}\n{out.stderr}"
        if not self.setup:  # the first block: its exports hold for every later block
            self.setup = code
            probe = subprocess.run(
                ["bash", "-c", f"set -euo pipefail\n{code}\nenv -0"],
                env=self.env,
                cwd=self.ctx["work"],
                capture_output=True,
                text=True,
                check=True,
            )
            self.env = dict(kv.split("=", 1) for kv in probe.stdout.split("\0") if "=" in kv)
        return out.stdout

    def python(self, code: str) -> str:
        code = self.localize(code)
        prelude = "" if "client = OpenAI(" in code else "from openai import OpenAI\n\nclient = OpenAI()\n"
        out = subprocess.run(
            [sys.executable, "-c", prelude + code],
            env=self.env,
            cwd=self.ctx["work"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, f"```python\n{code}```\nfailed:\n{out.stdout}\n{out.stderr}"
        found = re.findall(r"req_[0-9a-f]+", out.stdout)
        if found:
            self.request_id = found[-1]
        return out.stdout

    def admin(self, path: str) -> httpx.Response:
        key = self.env["GATEWAY_MASTER_KEY"]
        return httpx.get(f"{self.ctx['url']}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=30)


def test_the_agents_section_runs_as_written(newcomer):
    blocks = agents_blocks()
    assert len(blocks) >= 8 and blocks[0][0] == "bash" and "OPENAI_BASE_URL" in blocks[0][1]
    assert any(TOOLS_LINE in code for _, code in blocks), "the tool server line the test stands in for"
    reader = Reader(newcomer)
    outputs = []
    for lang, code in blocks:
        if "/experiments -H" in code:  # the report reads what the previous block's turns wrote, in batches
            wait_until(
                lambda: (
                    sum(
                        v["conversations"]
                        for v in reader.admin("/admin/agents/helpdesk/experiments").json()["data"][0]["variants"]
                    )
                    >= 20
                ),
                timeout=30,
                what="the A/B turns in the report",
            )
        if "/admin/runs/" in code:  # the run record is written off the request path
            wait_until(lambda: reader.admin(f"/admin/runs/{reader.request_id}").status_code == 200, 30, "the run")
        if "/conversations/" in code:
            wait_until(
                lambda: (
                    len(
                        reader.admin("/admin/agents/helpdesk/conversations/whatsapp-4915112345678/messages").json()[
                            "data"
                        ]
                    )
                    >= 4
                ),
                timeout=30,
                what="the conversation's turns",
            )
        outputs.append((code, reader.bash(code) if lang == "bash" else reader.python(code)))
    printed = "\n".join(out for _, out in outputs)
    # What the section says the blocks print.
    assert "echo: Where is my order A-1234?" in printed
    assert "echo: And when will it arrive?" in printed
    assert '"agent:helpdesk"' in printed and '"agent:support"' in printed  # GET /v1/models
    assert "agent:helpdesk -> version 1" in printed and "agent:helpdesk@staging -> version 2" in printed
    assert "agent:helpdesk@1 -> version 1" in printed
    assert "400 metadata.variables.customer_name" in printed
    assert '"promoted":"2"' in printed
    assert "true Sorry, I can't answer right now." in printed  # agent-support.json's fallback_message
    assert "tool result: " in printed and '"status":"pending"' in printed and '"id":"A1"' in printed
    run = json.loads(next(out for code, out in outputs if "/admin/runs/" in code))
    tools = [s for s in run["steps"] if s["kind"] == "tool"]
    assert {(s["name"], s["status"]) for s in tools} == {("order_status", "ok"), ("lookup_order", "ok")}
    # The run record's reason codes are a list (or null), not JSON text inside a string.
    assert run["confidence_reasons"] is None or isinstance(run["confidence_reasons"], list), run
    # The admin block of the budgets section, with the same exports.
    admin = [reader.bash(code) for lang, code in agents_blocks("## Budgets") if lang == "bash"]
    assert admin and '"key":"sk-gw-' in admin[0] and '"scope":"customer"' in admin[0], admin
    # The conversation the section held is stored, both turns.
    messages = next(out for code, out in outputs if "/conversations/" in code)
    assert "And when will it arrive?" in messages


def test_a_key_restricted_to_an_agent_lists_and_finds_only_what_it_may_use(newcomer):
    """GET /v1/models said a key restricted to `agent:<name>` could use demo-gpt, demo-claude and
    demo-embedding, which it is refused (403) on; it lists and finds only what it may call."""
    url = newcomer["url"]
    admin = {"Authorization": f"Bearer {(newcomer['work'] / '.data' / 'master.key').read_text().strip()}"}
    agent = {"name": "scoped", "model": "demo-claude", "template": "You answer briefly."}
    assert httpx.post(f"{url}/admin/agents", headers=admin, json=agent, timeout=30).status_code == 201
    created = httpx.post(f"{url}/admin/keys", headers=admin, json={"name": "one-agent", "models": ["agent:scoped"]})
    assert created.status_code == 201, created.text
    key = {"Authorization": f"Bearer {created.json()['key']}"}
    wait_until(lambda: "agent:scoped" in httpx.get(f"{url}/v1/models", headers=key).text, 10, "the agent")
    listed = {m["id"] for m in httpx.get(f"{url}/v1/models", headers=key).json()["data"]}
    assert listed == {"agent:scoped"}
    assert httpx.get(f"{url}/v1/models/demo-gpt", headers=key).status_code == 404
    assert httpx.get(f"{url}/v1/models/agent:scoped", headers=key).status_code == 200
    chat = {"model": "demo-gpt", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(f"{url}/v1/chat/completions", headers=key, json=chat, timeout=30).status_code == 403
    chat["model"] = "agent:scoped"
    assert httpx.post(f"{url}/v1/chat/completions", headers=key, json=chat, timeout=30).status_code == 200
    # An unrestricted key still lists every model group and the agents, and finds each.
    dev = {"Authorization": f"Bearer {(newcomer['work'] / '.data' / 'dev.key').read_text().strip()}"}
    everything = {m["id"] for m in httpx.get(f"{url}/v1/models", headers=dev).json()["data"]}
    assert {"demo-gpt", "demo-claude", "demo-embedding", "agent:scoped"} <= everything
    assert httpx.get(f"{url}/v1/models/demo-gpt", headers=dev).status_code == 200


def test_the_run_record_gives_reason_codes_as_a_list(newcomer):
    """GET /admin/runs/{id} answered `"confidence_reasons": "[\\"tool_failure\\"]"` (and `"null"`):
    the jsonb column came back as its JSON text inside a string."""
    url, tools = newcomer["url"], newcomer["tools"]
    admin = {"Authorization": f"Bearer {(newcomer['work'] / '.data' / 'master.key').read_text().strip()}"}
    failing = {
        "name": "broken",
        "description": "Always fails",
        "parameters": {"type": "object", "properties": {}},
        "kind": "http",
        "config": {
            "method": "GET",
            "url": f"{tools.url}/fail?status=500",
            "allowed_hosts": ["127.0.0.1"],
            "allow_private_networks": True,
        },
    }
    agent = {"name": "flaky", "model": "demo-claude", "template": "You answer briefly.", "tools": [failing]}
    assert httpx.post(f"{url}/admin/agents", headers=admin, json=agent, timeout=30).status_code == 201
    dev = {"Authorization": f"Bearer {(newcomer['work'] / '.data' / 'dev.key').read_text().strip()}"}
    ids = []
    for content in ("hi", 'hi [[mock:{"tool_calls": []}]]'):  # the tool called (and failing), then none
        wait_until(lambda: "agent:flaky" in httpx.get(f"{url}/v1/models", headers=dev).text, 10, "the agent")
        chat = {"model": "agent:flaky", "messages": [{"role": "user", "content": content}]}
        r = httpx.post(f"{url}/v1/chat/completions", headers=dev, json=chat, timeout=30)
        assert r.status_code == 200, r.text
        ids.append(r.headers["x-request-id"])
    runs = []
    for rid in ids:
        wait_until(lambda rid=rid: httpx.get(f"{url}/admin/runs/{rid}", headers=admin).status_code == 200, 30, "run")
        runs.append(httpx.get(f"{url}/admin/runs/{rid}", headers=admin).json())
    assert runs[0]["confidence_reasons"] == ["tool_failure"], runs[0]
    assert runs[1]["confidence_reasons"] is None, runs[1]


def test_the_cli_lists_every_label_of_a_version(newcomer):
    """`gateway agents versions helpdesk` showed `latest,production,stagin`: the labels column was
    cut at 24 characters. Labels now come last, whole."""
    url = newcomer["url"]
    admin = {"Authorization": f"Bearer {(newcomer['work'] / '.data' / 'master.key').read_text().strip()}"}
    agent = {"name": "labelled", "model": "demo-claude", "template": "You answer briefly.", "note": "first"}
    assert httpx.post(f"{url}/admin/agents", headers=admin, json=agent, timeout=30).status_code == 201
    labels = ["staging", "canary-eu-west-1", "holiday-campaign"]
    for label in labels:
        r = httpx.put(f"{url}/admin/agents/labelled/labels/{label}", headers=admin, json={"version": 1}, timeout=30)
        assert r.status_code == 200, r.text
    out = subprocess.run(
        [".venv/bin/gateway", "agents", "versions", "labelled"],
        env=newcomer["env"],
        cwd=newcomer["work"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.split()[0] == "1")
    assert set(row.split()[-1].split(",")) == {"latest", "production", *labels}, out.stdout
