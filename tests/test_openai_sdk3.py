"""The gateway through the OpenAI Python SDK's newest major release (3.x), in a venv of its own:
the gateway's venv keeps 2.x (litellm, a runtime dependency, needs openai<3), and clients in the
field use both. Chat (OpenAI- and Anthropic-backed), streams with usage, the SDK's stream helper
and structured-output parsing, embeddings, models, raw responses, error shapes and an agent
turn held by a conversation id — each through the real SDK over real HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MASTER_KEY

HERE = Path(__file__).parent

CLIENT = r"""
import json, sys, uuid
import openai, pydantic

url, key = sys.argv[1], sys.argv[2]
c = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)
out = {"version": openai.__version__}
hi = [{"role": "user", "content": "hello"}]
for model in ("gpt-mock", "claude-mock"):
    r = c.chat.completions.create(model=model, messages=hi, max_tokens=20)
    out[model] = [r.object, r.choices[0].message.role, bool(r.choices[0].message.content), r.usage.total_tokens > 0]
    chunks = list(c.chat.completions.create(
        model=model, messages=hi, max_tokens=20, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    last = chunks[-1]
    out[model + ":stream"] = [bool(text), last.choices == [], bool(last.usage and last.usage.total_tokens > 0)]
    with c.chat.completions.stream(model=model, messages=hi, max_tokens=20) as s:
        kinds = {e.type for e in s}
        final = s.get_final_completion()
    out[model + ":helper"] = ["content.delta" in kinds, final.choices[0].message.content == text]

class Echo(pydantic.BaseModel):
    echo: str

ask = [{"role": "user", "content": "json"}]
parsed = c.chat.completions.parse(model="gpt-mock", messages=ask, response_format=Echo)
out["parse"] = parsed.choices[0].message.parsed.model_dump()
e = c.embeddings.create(model="embed-mock", input=["one", "two"])
out["embeddings"] = [len(e.data), all(len(d.embedding) > 0 for d in e.data)]
out["models"] = sorted(m.id for m in c.models.list())
raw = c.chat.completions.with_raw_response.create(model="gpt-mock", messages=hi, max_tokens=5)
out["raw"] = [raw.headers.get("x-request-id", "").startswith("req_"), raw.parse().object]
errors = {}
for name, call in (
    ("404", lambda: c.chat.completions.create(model="no-such-model", messages=hi)),
    ("400", lambda: c.chat.completions.create(model="gpt-mock", messages=[{"role": "bogus", "content": "x"}])),
    ("401", lambda: openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0).models.list()),
):
    try:
        call()
        errors[name] = None
    except openai.APIStatusError as exc:
        errors[name] = [type(exc).__name__, exc.status_code, exc.code, exc.param, exc.type]
out["errors"] = errors
agent = sys.argv[3]
conv = {"conversation_id": "sdk3-" + uuid.uuid4().hex[:8]}
extra = {"variables": {"company": "Acme"}}
first = c.chat.completions.create(
    model=agent, messages=[{"role": "user", "content": "one"}], metadata=conv, extra_body=extra)
second = c.chat.completions.with_raw_response.create(
    model=agent, messages=[{"role": "user", "content": "two"}], metadata=conv, extra_body=extra)
out["agent"] = [bool(first.choices[0].message.content), second.headers.get("x-gateway-prompt-version"),
                bool(second.parse().choices[0].message.content)]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def sdk3(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("sdk3") / "venv"
    # No pip of its own (ensurepip takes a third of the set-up): this venv's pip installs into it.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env["PIP_COMPILE"] = "0"  # pip's --no-compile: the client compiles the few modules it imports
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
         "--disable-pip-version-check", "-r", str(HERE / "sdk3-requirements.lock")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return venv / "bin" / "python"


def test_the_gateway_through_openai_sdk_3(gateway, api_key, sdk3, tmp_path):
    import httpx

    agent = f"sdk3-{os.getpid()}"
    r = httpx.post(
        f"{gateway.url}/admin/agents",
        headers={"Authorization": f"Bearer {MASTER_KEY}"},
        json={"name": agent, "model": "gpt-mock", "template": "You are {{ company }}'s assistant.",
              "variables": {"company": {"type": "string", "required": True}}},
        timeout=30,
    )  # fmt: skip
    assert r.status_code == 201, r.text
    script = tmp_path / "client3.py"
    script.write_text(CLIENT)
    done = subprocess.run(
        [str(sdk3), str(script), gateway.url, api_key, f"agent:{agent}"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout)
    assert out["version"].startswith("3.")
    for model in ("gpt-mock", "claude-mock"):
        assert out[model] == ["chat.completion", "assistant", True, True], out
        assert out[model + ":stream"] == [True, True, True], out
        assert out[model + ":helper"] == [True, True], out
    assert out["parse"] == {"echo": "json"}
    assert out["embeddings"] == [2, True]
    assert {"gpt-mock", "claude-mock", "embed-mock", f"agent:{agent}"} <= set(out["models"])
    assert out["raw"] == [True, "chat.completion"]
    assert out["errors"]["404"][:3] == ["NotFoundError", 404, "model_not_found"]
    assert out["errors"]["400"][:4] == ["BadRequestError", 400, "invalid_value", "messages[0].role"]
    assert out["errors"]["401"][:3] == ["AuthenticationError", 401, "invalid_api_key"]
    assert out["agent"] == [True, "1", True]
