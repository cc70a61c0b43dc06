-- VAPI phone calls (issue #14): one record per call of a configured VAPI account.
--
-- The call id is VAPI's (chosen outside the gateway, and sent by whoever holds the account's
-- server credential), so it is never the key alone: a row is (tenant, account, call id), and the
-- primary key is the gateway's own ('vcall_' + random). `reported_at` is set by the first
-- end-of-call report; a repeated report finds it set and changes nothing (and writes no second
-- ledger record: both happen in the one transaction that sets it).
CREATE TABLE IF NOT EXISTS vapi_calls (
    id               text PRIMARY KEY,
    tenant           text NOT NULL,
    account          text NOT NULL,
    call_id          text NOT NULL,
    conversation_id  text NOT NULL,                 -- 'vapi:' || call_id, the agent's conversation
    agent            text,
    direction        text NOT NULL DEFAULT 'inbound' CHECK (direction IN ('inbound', 'outbound', 'web')),
    status           text NOT NULL DEFAULT 'queued',
    customer_number  text,
    phone_number     text,                          -- the business number called (or calling)
    assistant_id     text,
    phone_number_id  text,
    ended_reason     text,
    duration_s       double precision,
    cost_usd         double precision,
    transcript       text,
    recording_url    text,
    summary          text,
    metadata         jsonb NOT NULL DEFAULT '{}',
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    ended_at         timestamptz,
    reported_at      timestamptz,
    UNIQUE (tenant, account, call_id)
);
CREATE INDEX IF NOT EXISTS vapi_calls_tenant_created ON vapi_calls (tenant, created_at DESC);
CREATE INDEX IF NOT EXISTS vapi_calls_tenant_conversation ON vapi_calls (tenant, conversation_id);
SELECT gateway_isolate_tenant('vapi_calls');
