-- Conversation memory and agent run records (issue #12).

-- One conversation of one agent. `id` is ours ('conv_' + random); the caller's id
-- (metadata.conversation_id / x-gateway-conversation) is `external_id`, unique per tenant and agent
-- only: a client-chosen id is never a key of ours.
CREATE TABLE IF NOT EXISTS conversations (
    id              text PRIMARY KEY,
    tenant          text NOT NULL,
    agent_id        text NOT NULL,
    external_id     text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_at         timestamptz NOT NULL DEFAULT now(),
    turns           integer NOT NULL DEFAULT 0,
    status          text NOT NULL DEFAULT 'active',
    held_by_human   boolean NOT NULL DEFAULT false,
    metadata        jsonb,
    UNIQUE (tenant, agent_id, external_id)
);
CREATE INDEX IF NOT EXISTS conversations_tenant_last ON conversations (tenant, last_at);

-- Every message of a conversation, in order. `seq` is assigned in Redis (INCRBY per
-- conversation) when the turn is stored, so replicas never collide and a batch the writer
-- replays inserts nothing twice. `content` is the whole OpenAI message object.
CREATE TABLE IF NOT EXISTS messages (
    id               bigserial PRIMARY KEY,
    tenant           text NOT NULL,
    conversation_id  text NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq              integer NOT NULL,
    role             text NOT NULL,
    content          jsonb NOT NULL,
    request_id       text,
    prompt_version   integer,
    variant          text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (conversation_id, seq)
);
CREATE INDEX IF NOT EXISTS messages_tenant_conversation ON messages (tenant, conversation_id, seq);

-- One agent turn: what it ran (prompt version, A/B variant) and every step of it (model calls
-- and tool calls: sizes, durations, statuses; never the content). `request_id` is the gateway's
-- id, never the caller's; `conversation_id` is the caller's (conversations.external_id).
CREATE TABLE IF NOT EXISTS runs (
    request_id       text PRIMARY KEY,
    tenant           text NOT NULL,
    agent            text,
    agent_id         text,
    prompt_version   integer,
    variant          text,
    conversation_id  text,
    status           integer,
    degraded         boolean NOT NULL DEFAULT false,
    escalated        boolean NOT NULL DEFAULT false,
    memory_error     text,
    steps            jsonb NOT NULL DEFAULT '[]',
    latency_ms       real,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS runs_tenant_created ON runs (tenant, created_at);
CREATE INDEX IF NOT EXISTS runs_tenant_agent_created ON runs (tenant, agent_id, created_at);

-- The ledger learns which prompt version, variant, conversation and step of a turn a call was.
ALTER TABLE ledger
    ADD COLUMN IF NOT EXISTS prompt_version integer,
    ADD COLUMN IF NOT EXISTS variant text,
    ADD COLUMN IF NOT EXISTS conversation_id text,
    ADD COLUMN IF NOT EXISTS step integer;
CREATE INDEX IF NOT EXISTS ledger_tenant_agent_version ON ledger (tenant, agent, prompt_version);

SELECT gateway_isolate_tenant('conversations');
SELECT gateway_isolate_tenant('messages');
SELECT gateway_isolate_tenant('runs');
GRANT USAGE ON SEQUENCE messages_id_seq TO gateway_tenant;
