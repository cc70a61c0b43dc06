-- The token audit ledger: one row per request, refused and failed ones included.
CREATE TABLE IF NOT EXISTS ledger (
    request_id        text PRIMARY KEY,
    ts                timestamptz NOT NULL,
    tenant            text,
    key_id            text,
    end_user          text,
    agent             text,
    workflow          text,
    customer          text,
    tags              text[] NOT NULL DEFAULT '{}',
    endpoint          text NOT NULL,
    model             text,
    served_model      text,
    provider          text,
    deployment        text,
    attempts          integer NOT NULL DEFAULT 0,
    fallbacks         integer NOT NULL DEFAULT 0,
    stream            boolean NOT NULL DEFAULT false,
    status            integer NOT NULL,
    error_code        text,
    prompt_tokens     integer NOT NULL DEFAULT 0,
    completion_tokens integer NOT NULL DEFAULT 0,
    cached_tokens     integer NOT NULL DEFAULT 0,
    usage_estimated   boolean NOT NULL DEFAULT false,
    cost_usd          double precision NOT NULL DEFAULT 0,
    latency_ms        double precision,
    ttft_ms           double precision
);
CREATE INDEX IF NOT EXISTS ledger_ts ON ledger (ts);
CREATE INDEX IF NOT EXISTS ledger_key_ts ON ledger (key_id, ts);

-- Budgets in USD on one attribution scope, with a period that resets on schedule.
CREATE TABLE IF NOT EXISTS budgets (
    id          text PRIMARY KEY,
    scope       text NOT NULL,      -- tenant | key | user | agent | workflow | customer | tag
    scope_value text NOT NULL,
    limit_usd   double precision NOT NULL CHECK (limit_usd > 0),
    period      text NOT NULL,      -- daily | weekly | monthly | none
    thresholds  double precision[] NOT NULL DEFAULT '{0.5,0.8,1.0}',
    webhook_url text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (scope, scope_value, period)
);
