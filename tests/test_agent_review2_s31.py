"""Second review of the s31 agent-runtime changes (registry version catch-up, tools kept across
reloads): each test is an interleaving or an admin change that a replica served wrongly before
its fix."""

from __future__ import annotations

from tests.test_agent_review_s31 import schema_tool


def test_a_reload_does_not_keep_a_tool_whose_schema_changed_from_true_to_1():
    """A full reload keeps an agent's parsed tools when its stored tools did not change, compared
    with Python's ``==``, for which ``true == 1``: an admin's change of ``{"const": true}`` to
    ``{"const": 1}`` (or ``"enum": [false, true]`` to ``[0, 1]``, a different schema) left every
    replica serving, and validating the model's arguments against, the old one."""
    from runtime.agents import agent_from_rows

    def row(value) -> dict:
        tool = schema_tool("flag", {"type": "object", "properties": {"on": {"const": value}}})
        return {
            "id": "agt_x",
            "tenant": "t",
            "name": "n",
            "model": "m",
            "description": "",
            "settings": {"tools": [tool]},
        }

    before = agent_from_rows(row(True), {}, {})
    after = agent_from_rows(row(1), {}, {}, before)
    const = after.tools[0].parameters["properties"]["on"]["const"]
    assert const == 1 and const is not True
    assert agent_from_rows(row(True), {}, {}, before).tools is before.tools  # unchanged: kept
