-- WhatsApp channel (issue #14): conversations (the 24-hour window), message records with their
-- delivery statuses, and the tenant's message templates.

-- One conversation per (account, business number, customer). `conversation_id` is the id the
-- channel uses with the gateway (wa:<phone_number_id>:<wa_id>); this row, never the prefix of
-- that id, is what says a conversation belongs to WhatsApp.
CREATE TABLE IF NOT EXISTS whatsapp_conversations (
    id                bigserial PRIMARY KEY,
    tenant            text NOT NULL,
    account           text NOT NULL,
    phone_number_id   text NOT NULL,
    wa_id             text NOT NULL,
    conversation_id   text NOT NULL,
    agent             text NOT NULL,
    profile_name      text,
    last_inbound_at   timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant, account, phone_number_id, wa_id)
);
CREATE INDEX IF NOT EXISTS whatsapp_conversations_cid ON whatsapp_conversations (tenant, conversation_id);

-- Inbound and outbound messages. `wamid` is Meta's id (unique per account: a redelivered
-- inbound message is found here). Outbound rows carry what they answer (`reply_to`, the first
-- inbound wamid of the turn) and the highest delivery status seen: statuses arrive out of order
-- and a late `delivered` never regresses a `read` (status_rank only grows).
CREATE TABLE IF NOT EXISTS whatsapp_messages (
    id                bigserial PRIMARY KEY,
    tenant            text NOT NULL,
    account           text NOT NULL,
    wamid             text,
    direction         text NOT NULL CHECK (direction IN ('in', 'out')),
    conversation_id   text,
    wa_id             text,
    kind              text NOT NULL DEFAULT 'text',     -- text, image, template, fallback, ...
    body              text,
    reply_to          text,
    status            text NOT NULL DEFAULT 'received'
                      CHECK (status IN ('received', 'sent', 'delivered', 'read', 'failed', 'held', 'unknown')),
    status_rank       smallint NOT NULL DEFAULT 0,
    error             text,
    sent_at           timestamptz,
    delivered_at      timestamptz,
    read_at           timestamptz,
    failed_at         timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS whatsapp_messages_wamid ON whatsapp_messages (tenant, account, wamid)
    WHERE wamid IS NOT NULL;
CREATE INDEX IF NOT EXISTS whatsapp_messages_conv ON whatsapp_messages (tenant, conversation_id, created_at);
CREATE INDEX IF NOT EXISTS whatsapp_messages_held ON whatsapp_messages (tenant, created_at) WHERE status = 'held';

-- Approved message templates (registered with Meta by the business; recorded here with the
-- variables that fill their body parameters, in order).
CREATE TABLE IF NOT EXISTS whatsapp_templates (
    id                bigserial PRIMARY KEY,
    tenant            text NOT NULL,
    account           text NOT NULL,
    name              text NOT NULL,
    language          text NOT NULL DEFAULT 'en_US',
    category          text NOT NULL DEFAULT 'utility',
    variables         jsonb NOT NULL DEFAULT '[]',
    description       text NOT NULL DEFAULT '',
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant, account, name, language)
);

SELECT gateway_isolate_tenant('whatsapp_conversations');
SELECT gateway_isolate_tenant('whatsapp_messages');
SELECT gateway_isolate_tenant('whatsapp_templates');
GRANT USAGE ON SEQUENCE whatsapp_conversations_id_seq, whatsapp_messages_id_seq, whatsapp_templates_id_seq
    TO gateway_tenant;
