-- Agents, their immutable prompt versions, labels (with weighted A/B variants), experiments and
-- feedback. Every table is a tenant's: row-level security walls tenants apart (migration 0004).

CREATE TABLE IF NOT EXISTS agents (
    id          text PRIMARY KEY,                  -- 'agt_' + random; never client-chosen
    tenant      text NOT NULL,
    name        text NOT NULL,
    model       text NOT NULL,                     -- the model group its turns are served from
    description text NOT NULL DEFAULT '',
    -- defaults, tools, builtins, memory, max_steps, fallback_message, knowledge_bases
    settings    jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    archived_at timestamptz
);
-- A name is unique among a tenant's active agents; an archived agent frees its name.
CREATE UNIQUE INDEX IF NOT EXISTS agents_tenant_name ON agents (tenant, name) WHERE archived_at IS NULL;

CREATE TABLE IF NOT EXISTS prompt_versions (
    agent_id   text NOT NULL REFERENCES agents (id),
    tenant     text NOT NULL,
    version    integer NOT NULL CHECK (version > 0),
    template   text NOT NULL,
    variables  jsonb NOT NULL DEFAULT '{}',
    note       text,
    created_at timestamptz NOT NULL DEFAULT now(),
    created_by text,                               -- the key id that saved it
    PRIMARY KEY (agent_id, version)
);

-- A saved version is history: it never changes and is never removed.
CREATE OR REPLACE FUNCTION prompt_versions_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'prompt versions are immutable; save a new version instead';
END $$;
DROP TRIGGER IF EXISTS prompt_versions_no_change ON prompt_versions;
CREATE TRIGGER prompt_versions_no_change BEFORE UPDATE OR DELETE OR TRUNCATE ON prompt_versions
    FOR EACH STATEMENT EXECUTE FUNCTION prompt_versions_immutable();

CREATE TABLE IF NOT EXISTS prompt_labels (
    agent_id   text NOT NULL REFERENCES agents (id),
    tenant     text NOT NULL,
    label      text NOT NULL,
    target     jsonb NOT NULL,                     -- {"7": 1} or weighted variants {"7": 50, "8": 50}
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (agent_id, label)
);

CREATE TABLE IF NOT EXISTS experiments (
    id             text PRIMARY KEY,               -- 'exp_' + random
    tenant         text NOT NULL,
    agent_id       text NOT NULL REFERENCES agents (id),
    label          text NOT NULL,
    variants       jsonb NOT NULL,                 -- {"7": 50, "8": 50}
    primary_metric text NOT NULL DEFAULT 'thumbs_up_rate',
    started_at     timestamptz NOT NULL DEFAULT now(),
    stopped_at     timestamptz,
    promoted       text                            -- the variant the label was moved to on stop
);
-- At most one running experiment per label.
CREATE UNIQUE INDEX IF NOT EXISTS experiments_running ON experiments (agent_id, label) WHERE stopped_at IS NULL;
CREATE INDEX IF NOT EXISTS experiments_agent ON experiments (agent_id, started_at);

-- Outcomes sent by clients (POST /v1/feedback). Keyed by the caller's tenant and the request or
-- conversation id it names: reports join on (tenant, id), so one tenant's feedback can never
-- reach another's records, whatever ids it sends.
CREATE TABLE IF NOT EXISTS feedback (
    id              bigserial PRIMARY KEY,
    tenant          text NOT NULL,
    key_id          text,
    request_id      text,
    conversation_id text,
    agent_id        text,
    thumbs          smallint CHECK (thumbs IN (-1, 1)),
    score           real CHECK (score >= 0 AND score <= 1),
    resolved        boolean,
    text            text CHECK (length(text) <= 4000),
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (request_id IS NOT NULL OR conversation_id IS NOT NULL)
);
CREATE INDEX IF NOT EXISTS feedback_tenant_request ON feedback (tenant, request_id) WHERE request_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS feedback_tenant_conversation ON feedback (tenant, conversation_id)
    WHERE conversation_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS feedback_tenant_ts ON feedback (tenant, created_at);

SELECT gateway_isolate_tenant('agents');
SELECT gateway_isolate_tenant('prompt_versions');
SELECT gateway_isolate_tenant('prompt_labels');
SELECT gateway_isolate_tenant('experiments');
SELECT gateway_isolate_tenant('feedback');
GRANT USAGE ON SEQUENCE feedback_id_seq TO gateway_tenant;
