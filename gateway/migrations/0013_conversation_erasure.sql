-- Conversations erased on request (DELETE /admin/agents/{name}/conversations/{id}): the memory
-- writer skips every turn of the conversation recorded up to `erased_at` that was still on its
-- way to PostgreSQL (in the memory stream, or spilled to disk), so an erased conversation is not
-- written back. The caller's conversation id is kept as its SHA-256 only: it may itself be
-- personal data (a phone number in a channel's id).
CREATE TABLE IF NOT EXISTS erased_conversations (
    id            bigserial PRIMARY KEY,
    tenant        text NOT NULL,
    agent_id      text NOT NULL,
    external_hash text NOT NULL,
    erased_at     timestamptz NOT NULL,
    UNIQUE (tenant, agent_id, external_hash)
);
SELECT gateway_isolate_tenant('erased_conversations');
GRANT USAGE ON SEQUENCE erased_conversations_id_seq TO gateway_tenant;
