-- Virtual API keys: only a SHA-256 of the key is stored, never the key itself.
CREATE TABLE IF NOT EXISTS api_keys (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    tenant      text NOT NULL DEFAULT 'default',
    key_hash    text NOT NULL UNIQUE,
    key_prefix  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    metadata    jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS api_keys_active ON api_keys (key_hash) WHERE revoked_at IS NULL;
