"""A/B experiments on prompt labels: what each variant did, and whether the difference is real.

An experiment starts when a label is pointed at several weighted versions and ends when the
label is moved to one (``stopped_at``, PostgreSQL's clock): a stopped experiment's report is fixed
as of its stop — feedback and resolutions recorded after it (PostgreSQL's clock too) and turns
after it do not count. ``gather`` reads what happened in the experiment's window — the audit
ledger's rows of the agent (``variant``, ``conversation_id``, tokens, cost, latency), the run
records (escalations, degradations; optional: the table may not exist yet) and the feedback the
clients sent — as per-variant aggregates computed in SQL; ``report`` turns them into rates and a
two-sided significance test of the primary metric against the control (the first variant), with
the p-value and the sample size per arm still needed for 80 % power at alpha 0.05.
"""

from __future__ import annotations

import logging
import math
import secrets
from typing import Any

import orjson

log = logging.getLogger("gateway.experiments")

DEFAULT_METRIC = "thumbs_up_rate"
# metric -> (kind, higher is better)
METRICS = {
    "thumbs_up_rate": ("proportion", True),
    "resolved_rate": ("proportion", True),
    "escalation_rate": ("proportion", False),
    "mean_score": ("mean", True),
}
ALPHA = 0.05
POWER = 0.80
_Z_ALPHA = 1.959963984540054  # two-sided 0.05
_Z_BETA = 0.8416212335729143  # power 0.80


# ---- the store ------------------------------------------------------------------------------------
async def start(conn, tenant: str, agent_id: str, label: str, variants: dict[str, int], metric: str) -> str:
    exp_id = "exp_" + secrets.token_hex(8)
    await conn.execute(
        """INSERT INTO experiments (id, tenant, agent_id, label, variants, primary_metric)
           VALUES ($1, $2, $3, $4, $5::jsonb, $6)""",
        exp_id,
        tenant,
        agent_id,
        label,
        orjson.dumps(variants).decode(),
        metric,
    )
    return exp_id


async def end_running(conn, agent_id: str, label: str, promoted: str | None = None):
    """Stop the experiment running on a label (if any); returns its row."""
    return await conn.fetchrow(
        """UPDATE experiments SET stopped_at = now(), promoted = $3
           WHERE agent_id = $1 AND label = $2 AND stopped_at IS NULL RETURNING *""",
        agent_id,
        label,
        promoted,
    )


async def running(conn, agent_id: str, label: str):
    return await conn.fetchrow(
        "SELECT * FROM experiments WHERE agent_id = $1 AND label = $2 AND stopped_at IS NULL", agent_id, label
    )


async def list_for_agent(conn, agent_id: str, limit: int = 20) -> list:
    return await conn.fetch(
        "SELECT * FROM experiments WHERE agent_id = $1 ORDER BY started_at DESC LIMIT $2", agent_id, limit
    )


# ---- gathering ------------------------------------------------------------------------------------
_TURNS = """
    turns AS (
        SELECT request_id, max(variant) AS variant, max(conversation_id) AS conversation_id,
               sum(prompt_tokens + completion_tokens) AS tokens, sum(cost_usd) AS cost,
               sum(latency_ms) AS latency_ms
        FROM ledger
        WHERE tenant = $1 AND agent = $2 AND ts >= $3 AND ($4::timestamptz IS NULL OR ts < $4)
          AND variant = ANY($5::text[])
        GROUP BY request_id)"""

_USAGE_SQL = f"""WITH {_TURNS}
    SELECT variant, count(*) AS turns, count(DISTINCT coalesce(conversation_id, request_id)) AS conversations,
           coalesce(sum(tokens), 0) AS tokens, coalesce(sum(cost), 0) AS cost,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS latency_p50,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) AS latency_p95
    FROM turns GROUP BY variant"""

_FEEDBACK_SQL = f"""WITH {_TURNS},
    conv AS (SELECT DISTINCT ON (conversation_id) conversation_id, variant FROM turns
             WHERE conversation_id IS NOT NULL ORDER BY conversation_id, variant),
    fb AS (
        SELECT coalesce(t.variant, c.variant) AS variant, f.thumbs, f.score, f.resolved,
               CASE WHEN f.request_id IS NOT NULL THEN coalesce(t.conversation_id, f.request_id)
                    ELSE f.conversation_id END AS conv_key
        -- one vote per answer (its request id, whatever conversation id came with it) or per
        -- conversation: the latest one counts, so repeating a vote cannot decide an experiment.
        -- Feedback naming another agent is that agent's (conversation ids are per agent); feedback
        -- naming none counts for the agents its key could use (``agent_ids``; NULL: every one).
        -- A stopped experiment counts what came before its stop (its figures are the decision's).
        FROM (SELECT DISTINCT ON (vote) *
              FROM (SELECT *, CASE WHEN request_id IS NOT NULL THEN 'r:' || request_id
                                   ELSE 'c:' || conversation_id END AS vote
                    FROM feedback WHERE tenant = $1 AND created_at >= $3
                      AND ($4::timestamptz IS NULL OR created_at < $4)
                      AND (agent_id = $6 OR (agent_id IS NULL AND (agent_ids IS NULL OR $6 = ANY(agent_ids))))) v
              ORDER BY vote, created_at DESC, id DESC) f
        LEFT JOIN turns t ON f.request_id IS NOT NULL AND t.request_id = f.request_id
        LEFT JOIN conv c ON f.request_id IS NULL AND c.conversation_id = f.conversation_id)
    SELECT variant, count(*) AS feedback, count(DISTINCT conv_key) AS conversations_with_feedback,
           count(*) FILTER (WHERE thumbs = 1) AS thumbs_up, count(*) FILTER (WHERE thumbs = -1) AS thumbs_down,
           count(score) AS scores, avg(score) AS score_mean, var_samp(score) AS score_var,
           count(resolved) AS resolved_answers, count(*) FILTER (WHERE resolved) AS resolved
    FROM fb WHERE variant IS NOT NULL GROUP BY variant"""

_RUNS_SQL = f"""WITH {_TURNS}
    SELECT t.variant, count(*) AS runs,
           count(DISTINCT coalesce(t.conversation_id, t.request_id)) FILTER (WHERE r.escalated)
               AS escalated_conversations,
           count(*) FILTER (WHERE r.escalated) AS escalated_turns,
           count(*) FILTER (WHERE r.degraded) AS degraded_turns,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY r.latency_ms) AS latency_p50,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY r.latency_ms) AS latency_p95
    FROM runs r JOIN turns t ON t.request_id = r.request_id
    WHERE r.tenant = $1 GROUP BY t.variant"""


# Escalations opened by the experiment's turns, and how many were resolved (human in the loop).
_ESCALATIONS_SQL = """
    SELECT variant, count(*) AS escalations,
           count(*) FILTER (WHERE status = 'resolved' AND ($4::timestamptz IS NULL OR resolved_at < $4)) AS resolutions
    FROM escalations
    WHERE tenant = $1 AND agent = $2 AND created_at >= $3 AND ($4::timestamptz IS NULL OR created_at < $4)
      AND variant = ANY($5::text[])
    GROUP BY variant"""


async def gather(conn, agent_name: str, experiment) -> dict:
    """The report of one experiment row, read within the caller's (tenant-walled) transaction."""
    variants = {str(k): int(v) for k, v in _json(experiment["variants"]).items()}
    args = (experiment["tenant"], agent_name, experiment["started_at"], experiment["stopped_at"], list(variants))
    notes: list[str] = []
    usage = await _fetch(conn, _USAGE_SQL, args, notes, "ledger")
    feedback = await _fetch(conn, _FEEDBACK_SQL, (*args, experiment["agent_id"]), notes, "feedback")
    runs = None
    if await conn.fetchval("SELECT to_regclass('runs') IS NOT NULL"):
        runs = await _fetch(conn, _RUNS_SQL, args, notes, "runs")
    else:
        notes.append("no run records yet: escalation rate and degraded turns unavailable")
    out = report(variants, usage, feedback, runs, experiment["primary_metric"])
    if await conn.fetchval("SELECT to_regclass('escalations') IS NOT NULL"):
        counted = {r["variant"]: r for r in await _fetch(conn, _ESCALATIONS_SQL, args, notes, "escalations")}
        for arm in out["variants"]:
            row = counted.get(arm["variant"], {})
            arm["escalations"] = int(row.get("escalations") or 0)
            arm["resolutions"] = int(row.get("resolutions") or 0)
    out.update(
        id=experiment["id"],
        label=experiment["label"],
        started_at=experiment["started_at"],
        stopped_at=experiment["stopped_at"],
        promoted=experiment["promoted"],
        notes=notes,
    )
    return out


async def _fetch(conn, sql: str, args: tuple, notes: list[str], what: str) -> list[dict]:
    try:
        async with conn.transaction():  # a savepoint: a failed read leaves the transaction usable
            return [dict(r) for r in await conn.fetch(sql, *args)]
    except Exception as exc:
        if getattr(exc, "sqlstate", None) not in ("42703", "42P01"):  # undefined column / table
            raise
        log.warning("experiment report: %s unavailable: %s", what, exc)
        notes.append(f"{what} data unavailable ({type(exc).__name__})")
        return []


def _json(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value


# ---- the report -----------------------------------------------------------------------------------
def report(
    variants: dict[str, int],
    usage: list[dict],
    feedback: list[dict],
    runs: list[dict] | None,
    primary_metric: str = DEFAULT_METRIC,
) -> dict:
    """Per-variant figures and the test of ``primary_metric`` of each variant against the first
    (the control). ``usage``, ``feedback``, ``runs``: per-variant aggregate rows (see the SQL)."""
    by_usage = {r["variant"]: r for r in usage}
    by_feedback = {r["variant"]: r for r in feedback}
    by_runs = {r["variant"]: r for r in runs or ()}
    total_weight = sum(variants.values()) or 1
    arms: dict[str, dict] = {}
    for variant in sorted(variants, key=int):
        u, f, r = by_usage.get(variant, {}), by_feedback.get(variant, {}), by_runs.get(variant)
        conversations = int(u.get("conversations") or 0)
        thumbs_n = int(f.get("thumbs_up") or 0) + int(f.get("thumbs_down") or 0)
        arm = {
            "variant": variant,
            "version": int(variant),
            "weight": variants[variant],
            "share": variants[variant] / total_weight,
            "conversations": conversations,
            "turns": int(u.get("turns") or 0),
            "feedback": int(f.get("feedback") or 0),
            "feedback_rate": _rate(f.get("conversations_with_feedback"), conversations),
            "thumbs_up": int(f.get("thumbs_up") or 0),
            "thumbs_down": int(f.get("thumbs_down") or 0),
            "thumbs_up_rate": _rate(f.get("thumbs_up"), thumbs_n),
            "scores": int(f.get("scores") or 0),
            "mean_score": _float(f.get("score_mean")),
            "score_var": _float(f.get("score_var")),
            "resolved_rate": _rate(f.get("resolved"), f.get("resolved_answers")),
            "escalation_rate": _rate(r.get("escalated_conversations"), conversations) if r else None,
            "escalated_turns": int(r.get("escalated_turns") or 0) if r else None,
            "degraded_turns": int(r.get("degraded_turns") or 0) if r else None,
            "tokens": int(u.get("tokens") or 0),
            "cost_usd": float(u.get("cost") or 0),
            "latency_ms_p50": _float((r or {}).get("latency_p50") or u.get("latency_p50")),
            "latency_ms_p95": _float((r or {}).get("latency_p95") or u.get("latency_p95")),
        }
        arm["_n"] = {
            "thumbs_up_rate": (int(f.get("thumbs_up") or 0), thumbs_n),
            "resolved_rate": (int(f.get("resolved") or 0), int(f.get("resolved_answers") or 0)),
            "escalation_rate": (int(r.get("escalated_conversations") or 0) if r else 0, conversations if r else 0),
        }
        arms[variant] = arm
    metric = primary_metric if primary_metric in METRICS else DEFAULT_METRIC
    kind, higher_better = METRICS[metric]
    order = list(arms)
    tests = []
    if order:
        control = arms[order[0]]
        for variant in order[1:]:
            tests.append(_test(metric, kind, higher_better, control, arms[variant]))
    for arm in arms.values():
        arm.pop("_n")
    return {
        "object": "experiment.report",
        "primary_metric": metric,
        "control": order[0] if order else None,
        "variants": list(arms.values()),
        "tests": tests,
        "alpha": ALPHA,
        "power": POWER,
    }


def _test(metric: str, kind: str, higher_better: bool, a: dict, b: dict) -> dict:
    out: dict = {"metric": metric, "control": a["variant"], "variant": b["variant"]}
    if kind == "proportion":
        (x1, n1), (x2, n2) = a["_n"][metric], b["_n"][metric]
        result = two_proportion_test(x1, n1, x2, n2)
        out.update(test="two-proportion z-test", n_control=n1, n_variant=n2, **result)
    else:
        result = welch_test(a["mean_score"], a["score_var"], a["scores"], b["mean_score"], b["score_var"], b["scores"])
        out.update(test="Welch's t-test", n_control=a["scores"], n_variant=b["scores"], **result)
    effect = out.get("effect")
    p = out.get("p_value")
    out["significant"] = p is not None and p < ALPHA
    if out["significant"] and effect:
        out["better"] = b["variant"] if (effect > 0) == higher_better else a["variant"]
    else:
        out["better"] = None
    required = out.get("required_per_arm")
    out["still_needed_per_arm"] = (
        max(0, required - min(out["n_control"], out["n_variant"])) if required is not None else None
    )
    return out


def two_proportion_test(x1: int, n1: int, x2: int, n2: int) -> dict:
    """Two-sided z-test of p2 - p1 with the pooled standard error; and the sample size per arm
    that would detect the observed difference with 80 % power at alpha 0.05."""
    if n1 <= 0 or n2 <= 0:
        return {"effect": None, "z": None, "p_value": None, "required_per_arm": None}
    p1, p2 = x1 / n1, x2 / n2
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    effect = p2 - p1
    if se == 0:
        z, p = None, (1.0 if effect == 0 else None)
    else:
        z = effect / se
        p = math.erfc(abs(z) / math.sqrt(2))
    return {"effect": effect, "z": z, "p_value": p, "required_per_arm": proportion_sample_size(p1, p2)}


def proportion_sample_size(p1: float, p2: float) -> int | None:
    delta = abs(p2 - p1)
    if delta == 0:
        return None  # no observed effect: no finite sample detects it
    mean = (p1 + p2) / 2
    n = (
        _Z_ALPHA * math.sqrt(2 * mean * (1 - mean)) + _Z_BETA * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))
    ) ** 2 / delta**2
    return math.ceil(n)


def welch_test(m1, v1, n1: int, m2, v2, n2: int) -> dict:
    """Two-sided Welch's t-test of mean2 - mean1 (unequal variances), the p-value from the t
    distribution with Welch–Satterthwaite degrees of freedom; sample size from the normal
    approximation with the pooled variance."""
    if n1 < 2 or n2 < 2 or m1 is None or m2 is None or v1 is None or v2 is None:
        return {"effect": None, "t": None, "df": None, "p_value": None, "required_per_arm": None}
    effect = m2 - m1
    s1, s2 = v1 / n1, v2 / n2
    se2 = s1 + s2
    if se2 <= 0:
        return {
            "effect": effect,
            "t": None,
            "df": None,
            "p_value": 1.0 if effect == 0 else None,
            "required_per_arm": None,
        }
    t = effect / math.sqrt(se2)
    df = se2**2 / ((s1**2 / (n1 - 1) if s1 else 0) + (s2**2 / (n2 - 1) if s2 else 0) or 1e-300)
    p = student_t_two_sided(t, df)
    pooled = (v1 + v2) / 2
    required = math.ceil(2 * (_Z_ALPHA + _Z_BETA) ** 2 * pooled / effect**2) if effect else None
    return {"effect": effect, "t": t, "df": df, "p_value": p, "required_per_arm": required}


def student_t_two_sided(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom: I_{df/(df+t²)}(df/2, 1/2)."""
    if df > 1e6:
        return math.erfc(abs(t) / math.sqrt(2))
    x = df / (df + t * t)
    return min(1.0, max(0.0, _betai(df / 2, 0.5, x)))


def _betai(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) (continued fraction, Lentz)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1 - x) / b


def _betacf(a: float, b: float, x: float) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((a + m2 - 1) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-12:
            break
    return h


def _rate(num, den) -> float | None:
    den = int(den or 0)
    return int(num or 0) / den if den else None


def _float(value) -> float | None:
    return float(value) if value is not None else None
