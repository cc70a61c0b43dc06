"""Prompt selection, rendering and diffs (runtime/prompts.py), the template library and the
experiment statistics (runtime/experiments.py): in process, no servers."""

from __future__ import annotations

import math

import pytest

from core.errors import InvalidRequest, NotFound
from runtime import experiments, prompt_sandbox, prompts, templates
from runtime.types import Agent, PromptVersion


def version(number: int, template: str, variables: dict | None = None) -> PromptVersion:
    used = prompts.check_template(template)
    return PromptVersion(number, template, prompts.check_variables(variables or {}, used))


def agent(labels: dict, versions: dict[int, PromptVersion] | None = None) -> Agent:
    versions = versions or {n: version(n, f"prompt v{n}") for n in range(1, 10)}
    return Agent(id="agt_test", tenant="t", name="support", model="gpt-mock", labels=labels, versions=versions)


# ---- selection --------------------------------------------------------------------------------------
def test_default_selection_prefers_production_then_latest():
    assert prompts.select(agent({"latest": {3: 1}, "production": {2: 1}}), None, "c").version.version == 2
    sel = prompts.select(agent({"latest": {3: 1}}), None, "c")
    assert (sel.version.version, sel.label, sel.variant) == (3, "latest", None)


def test_pinned_version_and_named_label():
    a = agent({"latest": {3: 1}, "staging": {5: 1}})
    pinned = prompts.select(a, "7", "c")
    assert (pinned.version.version, pinned.label, pinned.variant) == (7, None, None)
    staging = prompts.select(a, "staging", "c")
    assert (staging.version.version, staging.label) == (5, "staging")


@pytest.mark.parametrize("selector", ["42", "nope", "0", "99999999999999999999"])
def test_unknown_version_or_label_is_404_on_model(selector):
    with pytest.raises(NotFound) as err:
        prompts.select(agent({"latest": {1: 1}}), selector, "c")
    assert err.value.param == "model"


def test_weighted_label_is_sticky_per_conversation_and_within_5_percent_of_weights():
    a = agent({"production": {7: 50, 8: 50}})
    picks = [prompts.select(a, None, f"conv-{i}") for i in range(1000)]
    share = sum(p.version.version == 8 for p in picks) / 1000
    assert abs(share - 0.5) <= 0.05
    assert all(p.variant == str(p.version.version) and p.label == "production" for p in picks)
    # the same conversation always gets the same arm
    for i in range(0, 1000, 37):
        again = prompts.select(a, None, f"conv-{i}")
        assert again.version.version == picks[i].version.version


def test_uneven_weights_hold_too():
    a = agent({"production": {1: 20, 2: 30, 3: 50}})
    counts = {1: 0, 2: 0, 3: 0}
    for i in range(1000):
        counts[prompts.select(a, None, f"k{i}").version.version] += 1
    assert abs(counts[1] / 1000 - 0.2) <= 0.05
    assert abs(counts[2] / 1000 - 0.3) <= 0.05
    assert abs(counts[3] / 1000 - 0.5) <= 0.05


def test_assignment_depends_on_the_label_and_agent_not_only_the_key():
    a = agent({"production": {7: 50, 8: 50}, "staging": {7: 50, 8: 50}})
    prod = [prompts.select(a, "production", f"c{i}").version.version for i in range(200)]
    stag = [prompts.select(a, "staging", f"c{i}").version.version for i in range(200)]
    assert prod != stag


# ---- rendering --------------------------------------------------------------------------------------
def test_render_values_over_defaults_over_variable_defaults():
    v = version(
        1,
        "Hi {{ name }}, {{ tone }}; {% for p in products %}[{{ p }}]{% endfor %}{% if vip %} VIP{% endif %}",
        {
            "name": "string",
            "tone": {"type": "string", "default": "calm"},
            "products": {"type": "array", "default": []},
            "vip": {"type": "boolean", "required": False},
        },
    )
    assert prompts.render(v, {"name": "Ana"}, {}) == "Hi Ana, calm; "
    assert prompts.render(v, {"name": "Ana"}, {"tone": "warm", "products": ["a", "b"]}) == "Hi Ana, warm; [a][b]"
    assert prompts.render(v, {"name": "Ana", "tone": "brisk", "vip": True}, {"tone": "warm"}) == "Hi Ana, brisk;  VIP"


@pytest.mark.parametrize(
    ("kind", "good", "bad"),
    [
        ("string", "x", 5),
        ("number", 1.5, "1.5"),
        ("integer", 3, 3.5),
        ("integer", 3, True),
        ("boolean", False, "false"),
        ("array", [1], {"a": 1}),
        ("object", {"a": 1}, [1]),
    ],
)
def test_each_declared_type_is_checked(kind, good, bad):
    v = version(1, "{{ x }}", {"x": {"type": kind}})
    prompts.render(v, {"x": good}, {})
    with pytest.raises(InvalidRequest) as err:
        prompts.render(v, {"x": bad}, {})
    assert (err.value.param, err.value.code) == ("metadata.variables.x", "invalid_variable")


def test_missing_required_variable_is_a_400_naming_it():
    v = version(1, "Hello {{ customer_name }} from {{ company }}", {"company": {"type": "string", "default": "Acme"}})
    with pytest.raises(InvalidRequest) as err:
        prompts.render(v, {}, {})
    assert err.value.code == "missing_variable"
    assert err.value.param == "metadata.variables.customer_name"
    assert "customer_name" in err.value.message


def test_template_code_in_a_value_stays_text():
    v = version(1, "Customer: {{ name }}", {"name": "string"})
    for attack in ["{{ ''.__class__ }}", "{% for x in ().__class__.__mro__ %}{{ x }}{% endfor %}", "{{ 7*7 }}"]:
        assert prompts.render(v, {"name": attack}, {}) == f"Customer: {attack}"


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ x['__class__'] }}",
        "{{ x.format(1) }}",
        "{{ x|attr('__class__') }}",
        "{% set y = x %}{{ y }}",
        "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}",
        "{% include 'other' %}",
        "{% for a in x %}{% for b in x %}{% for c in x %}.{% endfor %}{% endfor %}{% endfor %}",
        "{% for a in x recursive %}{{ loop(a) }}{% endfor %}",
        "{{ x|center(1000000000) }}",
        "{{ lipsum(1000000) }}",
        "{{ x }}" * (prompts.MAX_REFERENCES + 1),
        "{{ unclosed",
        "x" * (prompts.MAX_TEMPLATE + 1),
    ],
)
def test_unsafe_or_invalid_templates_are_refused_at_save(template):
    with pytest.raises(InvalidRequest) as err:
        prompts.check_template(template)
    assert err.value.param == "template"
    assert err.value.code in ("unsafe_template", "invalid_template", "template_too_large")


def test_a_template_stored_around_the_checks_fails_at_render_with_a_400_not_a_500():
    v = PromptVersion(1, "{{ ''.__class__.__mro__ }}", {})
    with pytest.raises(InvalidRequest) as err:
        prompts.render(v, {}, {})
    assert err.value.code == "prompt_render_failed"


@pytest.mark.parametrize(
    ("template", "values"),
    [
        ("{{ x * 100000 }}", {"x": "ab"}),
        ("{{ 10 ** 100000 }}", {}),
        ("{% for i in range(100000) %}{% endfor %}", {}),
        ("{{ x + x + x + x + x + x + x + x + x + x }}", {"x": "a" * 60000}),
        ("{% for a in x %}{% for b in x %}.{% endfor %}{% endfor %}", {"x": list(range(200))}),
        ("{% for a in x %}{{ y }}{% endfor %}", {"x": list(range(256)), "y": "z" * 60000}),
        ("{{ '%0*d' % (100000, 1) }}", {}),
    ],
)
def test_rendering_work_is_bounded(template, values):
    variables = {k: {"type": "array" if isinstance(v, list) else "string"} for k, v in values.items()}
    v = version(1, template, variables)
    with pytest.raises(InvalidRequest) as err:
        prompts.render(v, values, {})
    assert err.value.code in ("prompt_render_failed", "prompt_too_large", "invalid_variable")


def test_declared_variables_are_validated():
    used = prompts.check_template("{{ a }}")
    for bad, param in [
        ({"a": {"type": "float"}}, "variables.a.type"),
        ({"a": {"type": "string", "default": 5}}, "variables.a.default"),
        ({"_a": "string"}, "variables._a"),
        ({"a": {"type": "string", "secret": True}}, "variables.a.secret"),
        ([], "variables"),
    ]:
        with pytest.raises(InvalidRequest) as err:
            prompts.check_variables(bad, used)
        assert err.value.param == param
    # a variable used but not declared is declared as a required string
    assert prompts.check_variables({}, used) == {"a": {"type": "string", "required": True}}


def test_compiled_once_per_template():
    v = version(1, "Hi {{ n }}", {"n": "string"})
    prompts.render(v, {"n": "a"}, {})
    first = prompt_sandbox._compiled[v.template]
    prompts.render(v, {"n": "b"}, {})
    assert prompt_sandbox._compiled[v.template] is first


# ---- diff -------------------------------------------------------------------------------------------
def test_diff_of_templates_and_variables():
    a = version(6, "line one\nline two\n", {})
    b = version(7, "line one\nline 2 {{ who }}\n", {"who": {"type": "string", "default": "you"}})
    d = prompts.diff(a, b)
    assert (d["from"], d["to"]) == (6, 7)
    assert "-line two" in d["template"] and "+line 2 {{ who }}" in d["template"]
    assert d["variables_added"] == ["who"] and d["variables_removed"] == []
    assert '"who"' in d["variables"]
    assert prompts.diff(a, a)["template"] == ""


# ---- the library --------------------------------------------------------------------------------------
def test_every_library_template_passes_the_save_checks_and_renders_with_its_required_variables():
    assert {"sales", "support", "receptionist", "faq"} <= set(templates.ids())
    for entry in templates.library():
        used = prompts.check_template(entry["template"])
        declared = prompts.check_variables(entry["variables"], used)
        assert set(declared) == set(entry["variables"]), entry["id"]  # every variable documented
        assert all(spec.get("description") for spec in entry["variables"].values()), entry["id"]
        sample = {"string": "x", "integer": 3, "number": 1.0, "boolean": True, "array": ["a"], "object": {}}
        values = {k: sample[s["type"]] for k, s in declared.items() if s["required"]}
        text = prompts.render(PromptVersion(1, entry["template"], declared), values, {})
        assert text.strip()


# ---- statistics ---------------------------------------------------------------------------------------
def test_two_proportion_test_matches_the_textbook():
    r = experiments.two_proportion_test(50, 100, 65, 100)
    assert math.isclose(r["z"], 2.1456, abs_tol=1e-3)
    assert math.isclose(r["p_value"], 0.0319, abs_tol=1e-3)
    assert experiments.proportion_sample_size(0.5, 0.6) == 388


def test_student_t_p_values():
    assert math.isclose(experiments.student_t_two_sided(2.0, 10), 0.0734, abs_tol=1e-3)
    assert math.isclose(experiments.student_t_two_sided(1.0, 5), 0.3632, abs_tol=1e-3)
    assert math.isclose(experiments.student_t_two_sided(0.0, 7), 1.0, abs_tol=1e-9)


def test_report_on_seeded_aggregates():
    usage = [
        {"variant": "7", "turns": 300, "conversations": 100, "tokens": 9000, "cost": 0.9, "latency_p50": 100.0,
         "latency_p95": 300.0},
        {"variant": "8", "turns": 310, "conversations": 100, "tokens": 9300, "cost": 0.93, "latency_p50": 110.0,
         "latency_p95": 320.0},
    ]  # fmt: skip
    feedback = [
        {"variant": "7", "feedback": 100, "conversations_with_feedback": 80, "thumbs_up": 50, "thumbs_down": 50,
         "scores": 0, "score_mean": None, "score_var": None, "resolved_answers": 0, "resolved": 0},
        {"variant": "8", "feedback": 100, "conversations_with_feedback": 90, "thumbs_up": 65, "thumbs_down": 35,
         "scores": 0, "score_mean": None, "score_var": None, "resolved_answers": 0, "resolved": 0},
    ]  # fmt: skip
    out = experiments.report({"7": 50, "8": 50}, usage, feedback, None)
    arms = {a["variant"]: a for a in out["variants"]}
    assert arms["8"]["thumbs_up_rate"] == 0.65 and arms["7"]["feedback_rate"] == 0.8
    assert arms["7"]["escalation_rate"] is None  # no run records
    (test,) = out["tests"]
    assert test["significant"] and test["better"] == "8"
    assert math.isclose(test["p_value"], 0.0319, abs_tol=1e-3)
    assert test["still_needed_per_arm"] == 70  # 170 required, 100 each so far


def test_big_integer_arithmetic_in_a_template_is_refused_not_computed():
    """Found by review: a chain of products of huge integers held the event loop for minutes."""
    product = " * ".join(["((10**18)**64)"] * 50)
    v = PromptVersion(1, "{{ (" + product + ") > 0 }}", {})
    with pytest.raises(InvalidRequest):
        prompts.render(v, {}, {})


def test_a_template_nested_too_deeply_is_a_400_at_save():
    with pytest.raises(InvalidRequest) as err:
        prompts.check_template("{{ " + "1*" * 1500 + "1 }}")
    assert err.value.code == "invalid_template"
