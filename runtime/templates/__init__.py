"""The built-in prompt library: starting prompts for common agents (``GET /admin/prompt-templates``,
``gateway agents create --template support``). Each is a module here with ``TEMPLATE`` (the
Jinja2 source), ``VARIABLES`` (each documented) and ``DESCRIPTION``; every one passes the same
checks as a prompt saved through the admin API (tests/test_prompts.py)."""

from __future__ import annotations

from types import ModuleType

from runtime.templates import faq, receptionist, sales, support

_MODULES: dict[str, ModuleType] = {"sales": sales, "support": support, "receptionist": receptionist, "faq": faq}


def _entry(template_id: str, module: ModuleType) -> dict:
    return {
        "id": template_id,
        "object": "prompt_template",
        "name": module.NAME,
        "description": module.DESCRIPTION,
        "template": module.TEMPLATE,
        "variables": module.VARIABLES,
        "builtins": list(getattr(module, "BUILTINS", ())),
    }


def library() -> list[dict]:
    return [_entry(k, m) for k, m in _MODULES.items()]


def get(template_id: str) -> dict | None:
    module = _MODULES.get(template_id)
    return _entry(template_id, module) if module is not None else None


def ids() -> list[str]:
    return list(_MODULES)
