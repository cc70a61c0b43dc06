"""The config file: interpolation, validation with paths, and the shipped examples."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from core.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent


def _problems(data) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    return exc.value.problems


def test_every_problem_is_reported_with_its_path():
    problems = _problems(
        {
            "providers": [
                {"name": "a", "kind": "openai", "api_keys": ["k"]},
                {"name": "b", "kind": "telepathy", "api_keys": ["k"]},
            ],
            "models": [
                {"name": "m", "deployments": [{"provider": "nowhere", "model": "x", "weight": -1}]},
            ],
        }
    )
    joined = "\n".join(problems)
    assert "providers[1].kind" in joined
    assert "models[0].deployments[0].weight" in joined
    assert len(problems) >= 2


def test_cross_references_and_duplicates():
    problems = _problems(
        {
            "providers": [
                {"name": "a", "kind": "openai", "api_keys": ["k"]},
                {"name": "a", "kind": "anthropic", "api_keys": ["k"]},
            ],
            "models": [
                {"name": "m", "deployments": [{"provider": "zzz", "model": "x"}]},
                {"name": "m", "mode": "embedding", "deployments": [{"provider": "a", "model": "x"}]},
            ],
        }
    )
    assert "providers[0].base_url: required for kind 'openai'" in problems
    assert "providers[1].name: duplicate provider name 'a'" in problems
    assert "models[0].deployments[0].provider: unknown provider 'zzz'" in problems
    assert "models[1].name: duplicate model name 'm'" in problems


def test_unknown_fields_are_rejected_not_ignored():
    problems = _problems(
        {
            "providers": [
                {"name": "a", "kind": "openai", "base_url": "http://x", "api_keys": ["k"], "api_kyes": ["typo"]}
            ]
        }
    )
    assert any(p.startswith("providers[0].api_kyes") for p in problems)


def test_env_interpolation_with_defaults_and_missing(monkeypatch):
    monkeypatch.setenv("GW_TEST_KEY", "secret-1")
    monkeypatch.delenv("GW_TEST_MISSING", raising=False)
    cfg = parse_config(
        {
            "providers": [
                {
                    "name": "a",
                    "kind": "openai",
                    "base_url": "${GW_TEST_URL:-http://localhost:1/v1}",
                    "api_keys": ["${GW_TEST_KEY}"],
                }
            ],
            "models": [{"name": "m", "deployments": [{"provider": "a", "model": "x"}]}],
        }
    )
    assert cfg.providers[0].api_keys == ["secret-1"]
    assert cfg.providers[0].base_url == "http://localhost:1/v1"
    problems = _problems({"providers": [{"name": "a", "kind": "anthropic", "api_keys": ["${GW_TEST_MISSING}"]}]})
    assert "providers[0].api_keys[0]: environment variable GW_TEST_MISSING is not set" in problems


def test_interpolated_values_cannot_inject_yaml(monkeypatch, tmp_path):
    monkeypatch.setenv("GW_TEST_KEY", "x]\nmodels: [oops")
    path = tmp_path / "c.yaml"
    path.write_text("providers:\n  - {name: a, kind: anthropic, api_keys: [${GW_TEST_KEY}]}\n")
    cfg = load_config(path)
    assert cfg.providers[0].api_keys == ["x]\nmodels: [oops"]


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("providers:\n  - name: a\n   kind: [\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert "line" in exc.value.problems[0] and "invalid YAML" in exc.value.problems[0]


def _check_config(path: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


def test_check_config_cli_prints_every_problem_and_exits_1(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "providers:\n  - {name: a, kind: openai, api_keys: []}\n"
        "models:\n  - {name: m, deployments: [{provider: b, model: x}]}\n"
    )
    out = _check_config(path)
    assert out.returncode == 1
    assert "providers[0].base_url" in out.stderr
    assert "providers[0].api_keys" in out.stderr
    assert "models[0].deployments[0].provider: unknown provider 'b'" in out.stderr


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_examples_are_valid(example):
    env = {
        "OPENAI_API_KEY": "x",
        "ANTHROPIC_API_KEY": "x",
        "GROQ_API_KEY_1": "x",
        "GROQ_API_KEY_2": "x",
        "GEMINI_API_KEY": "x",
        "OPENAI_KEY_1": "x",
        "OPENAI_KEY_2": "x",
        "PII_HASH_SECRET": "x",
        "WHATSAPP_APP_SECRET": "app-secret-from-meta",
        "WHATSAPP_VERIFY_TOKEN": "a-verify-token-you-choose",
        "WHATSAPP_ACCESS_TOKEN": "EAAG-system-user-token",
        "WHATSAPP_GATEWAY_KEY": "sk-gw-channel-key",
    }
    out = _check_config(example, env)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_demo_config_is_valid(monkeypatch):
    monkeypatch.setenv("MOCK_URL", "http://127.0.0.1:1")
    cfg = load_config(ROOT / "gateway" / "demo.yaml")
    assert {m.name for m in cfg.models} == {"demo-gpt", "demo-claude", "demo-embedding"}


def _modes(models: list[dict], providers: list[dict] | None = None) -> dict[str, str]:
    providers = providers or [
        {"name": "o", "kind": "openai", "base_url": "http://x/v1", "api_keys": ["k"]},
        {"name": "g", "kind": "litellm", "litellm_provider": "gemini"},
    ]
    cfg = parse_config({"providers": providers, "models": models})
    return {m.name: m.mode for m in cfg.models}


def test_item19_embedding_mode_is_inferred_from_the_bundled_model_map():
    modes = _modes(
        [
            {"name": "small", "deployments": [{"provider": "o", "model": "text-embedding-3-small"}]},
            {"name": "gemini-embed", "deployments": [{"provider": "g", "model": "gemini-embedding-001"}]},
            {"name": "chat", "deployments": [{"provider": "o", "model": "gpt-4o-mini"}]},
            {"name": "unknown", "deployments": [{"provider": "o", "model": "my-own-model"}]},
            # a group whose rules all lead to embedding groups is one too
            {"name": "routed", "rules": [{"use": "small"}]},
            # a fallback to an inferred embedding group is checked against the inferred mode
            {
                "name": "with-fallback",
                "fallbacks": ["small"],
                "deployments": [{"provider": "o", "model": "text-embedding-3-large"}],
            },
        ]
    )
    assert modes == {
        "small": "embedding",
        "gemini-embed": "embedding",
        "chat": "chat",
        "unknown": "chat",
        "routed": "embedding",
        "with-fallback": "embedding",
    }


def test_item19_explicit_mode_always_wins_and_a_mix_must_be_explicit():
    modes = _modes(
        [{"name": "forced", "mode": "chat", "deployments": [{"provider": "o", "model": "text-embedding-3-small"}]}]
    )
    assert modes == {"forced": "chat"}
    problems = _problems(
        {
            "providers": [{"name": "o", "kind": "openai", "base_url": "http://x/v1", "api_keys": ["k"]}],
            "models": [
                {
                    "name": "mixed",
                    "deployments": [
                        {"provider": "o", "model": "text-embedding-3-small"},
                        {"provider": "o", "model": "gpt-4o-mini"},
                    ],
                }
            ],
        }
    )
    assert problems == ["models[0].mode: its deployments mix chat and embedding models; set mode explicitly"]
