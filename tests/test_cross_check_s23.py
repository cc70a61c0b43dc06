"""Cross-check of the s23 merge (groups, prompts, perf, chan, rag and the lead's commits): how
the branches' changes meet. Real gateway processes over HTTP, real embedded PostgreSQL and
Valkey, the OpenAI SDK as client."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import MASTER_KEY
from tests.test_agents_admin import AgentGateway, call, config, create, unique


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    g = AgentGateway(tmp_root, config(module_mock), services)
    yield g
    g.stop()


def sdk(gw, key: str = MASTER_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)


@pytest.mark.parametrize("selector", ["\u00b2", "\u0663", "\U0001d7d1"])
def test_a_version_selector_of_non_ascii_digits_is_a_404_naming_model_not_a_500(gw, selector):
    """``agent:x@²`` — '²' passes str.isdigit() and int() raises: the on-demand version read
    (prompts branch) and the selection both took it for a version number, so the turn was a 500
    (server_error). A version number is ASCII digits; anything else is a label, and an unknown
    label is a 404 naming model."""
    name = unique("xc")
    assert create(gw, name=name).status_code == 201
    with pytest.raises(openai.NotFoundError) as err:
        sdk(gw).chat.completions.create(model=f"agent:{name}@{selector}", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["param"] == "model", err.value.body


@pytest.mark.parametrize(
    ("method", "path", "body", "param"),
    [
        ("PUT", "labels/production", {"variants": {"\u00b2": 50, "1": 50}}, "variants"),
        ("PUT", "labels/production", {"version": "\u00b2"}, "version"),
        ("GET", "versions/\u00b2", None, "version"),
    ],
)
def test_admin_version_numbers_of_non_ascii_digits_are_a_400_not_a_500(gw, method, path, body, param):
    """The same '²' where the admin API reads a version number: a 400 naming the field, the
    labels unchanged — not a 500."""
    name = unique("xc")
    assert create(gw, name=name).status_code == 201
    before = call(gw, "GET", f"/admin/agents/{name}").json()["labels"]
    resp = call(gw, method, f"/admin/agents/{name}/{path}", **({"json": body} if body is not None else {}))
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
    assert call(gw, "GET", f"/admin/agents/{name}").json()["labels"] == before
