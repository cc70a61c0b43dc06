-- A tenant's keys, newest first (its admin's key list, a page at a time) and counted live against
-- policies.max_keys_per_tenant when its admin creates one: read by index, not by scanning every
-- tenant's keys.
CREATE INDEX IF NOT EXISTS api_keys_tenant_created ON api_keys (tenant, created_at);
