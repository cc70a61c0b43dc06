"""The rendered-prompt cache (runtime/prompts.render) never serves one version's or one set of
values' prompt for another."""

from __future__ import annotations

from runtime import prompts
from runtime.types import PromptVersion

VARS = {"name": {"type": "string", "required": True}, "vip": {"type": "boolean", "default": False}}


def test_cached_renders_follow_the_version_and_the_values():
    a = PromptVersion(1, "Hello {{ name }}.{% if vip %} VIP.{% endif %}", VARS)
    b = PromptVersion(2, "Bye {{ name }}.", VARS)
    for _ in range(2):  # the second pass is served from the cache
        assert prompts.render(a, {"name": "Ann"}, {}) == "Hello Ann."
        assert prompts.render(a, {"name": "Ann", "vip": True}, {}) == "Hello Ann. VIP."
        assert prompts.render(a, {"name": "Bob"}, {}) == "Hello Bob."
        assert prompts.render(b, {"name": "Ann"}, {}) == "Bye Ann."
        assert prompts.render(a, {}, {"name": "Default"}) == "Hello Default."
    # an equal but distinct version object (a reloaded registry) renders the same text
    assert prompts.render(PromptVersion(1, a.template, VARS), {"name": "Ann"}, {}) == "Hello Ann."
