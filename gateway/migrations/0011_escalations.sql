-- Human in the loop (issue #15): escalations with leases and SLAs, learned answers, and the
-- confidence of every agent turn in its run record.

-- One hand-over of a conversation to a person. `id` is ours ('esc_' + random); the caller's
-- conversation id is `conversation_id` (conversations.external_id), never a key of ours.
CREATE TABLE IF NOT EXISTS escalations (
    id                 text PRIMARY KEY,
    tenant             text NOT NULL,
    agent_id           text NOT NULL,
    agent              text NOT NULL,
    conversation_id    text NOT NULL,
    request_id         text,                       -- the turn that escalated
    prompt_version     integer,
    variant            text,
    status             text NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'claimed', 'resolved')),
    urgency            text NOT NULL DEFAULT 'normal' CHECK (urgency IN ('low', 'normal', 'high', 'urgent')),
    tier               text,
    base_priority      integer NOT NULL DEFAULT 0, -- urgency + tier; waiting time is added when read
    team               text NOT NULL DEFAULT 'support',
    skills             text[] NOT NULL DEFAULT '{}',
    confidence         real,
    reasons            jsonb NOT NULL DEFAULT '[]',
    question           text,                       -- the customer's message that escalated
    draft              text,                       -- the AI's answer (shown to the human, maybe sent)
    context            jsonb NOT NULL DEFAULT '{}',-- variables, sources, suggested actions
    customer_messages  integer NOT NULL DEFAULT 0, -- messages that joined while held
    last_customer_at   timestamptz,
    claimed_by         text,                       -- the key id of the holder (from authentication)
    lease_until        timestamptz,
    claims             integer NOT NULL DEFAULT 0,
    first_claimed_at   timestamptz,
    first_response_at  timestamptz,
    resolved_at        timestamptz,
    resolved_by        text,
    outcome            text,
    corrected_answer   text,
    delivery           jsonb,                      -- the outcome of the last human reply's delivery
    sla_first_s        real NOT NULL,
    sla_resolve_s      real NOT NULL,
    -- set once each by the SLA sweeper's conditional UPDATE: exactly one alert across replicas
    first_warned_at    timestamptz,
    first_breached_at  timestamptz,
    resolve_warned_at  timestamptz,
    resolve_breached_at timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
-- One open escalation per conversation: two replicas escalating at once end with one.
CREATE UNIQUE INDEX IF NOT EXISTS escalations_open_conversation
    ON escalations (tenant, agent_id, conversation_id) WHERE status <> 'resolved';
CREATE INDEX IF NOT EXISTS escalations_queue ON escalations (tenant, team, status, base_priority DESC, created_at)
    WHERE status <> 'resolved';
CREATE INDEX IF NOT EXISTS escalations_open ON escalations (created_at) WHERE status <> 'resolved';
CREATE INDEX IF NOT EXISTS escalations_tenant_created ON escalations (tenant, created_at);

-- What a person answered, as an example the agent learns from once approved.
CREATE TABLE IF NOT EXISTS learned_examples (
    id             text PRIMARY KEY,               -- 'lex_' + random
    tenant         text NOT NULL,
    agent_id       text NOT NULL,
    escalation_id  text,
    question       text NOT NULL CHECK (length(question) <= 8000),
    answer         text NOT NULL CHECK (length(answer) <= 16000),
    status         text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'approved', 'rejected')),
    kb_id          text,
    document_id    text,                           -- its document in the learned-answers knowledge base
    created_by     text,
    reviewed_by    text,
    reviewed_at    timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS learned_examples_agent ON learned_examples (tenant, agent_id, status, created_at);

ALTER TABLE runs
    ADD COLUMN IF NOT EXISTS confidence real,
    ADD COLUMN IF NOT EXISTS confidence_reasons jsonb,
    ADD COLUMN IF NOT EXISTS escalation_id text;

SELECT gateway_isolate_tenant('escalations');
SELECT gateway_isolate_tenant('learned_examples');
