-- Tenancy as a second wall, hard budgets, gateway-assigned request ids, the access audit log.

-- The ledger's key is the gateway's own request id; the caller's x-request-id is kept beside
-- it: echoed, searchable, never unique.
ALTER TABLE ledger ADD COLUMN IF NOT EXISTS client_request_id text;
CREATE INDEX IF NOT EXISTS ledger_tenant_client_rid ON ledger (tenant, client_request_id)
    WHERE client_request_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS ledger_tenant_ts ON ledger (tenant, ts);

-- Budgets belong to a tenant: every scope value (user, customer, tag, ...) is the tenant's own.
ALTER TABLE budgets ADD COLUMN IF NOT EXISTS tenant text NOT NULL DEFAULT 'default';
ALTER TABLE budgets ADD COLUMN IF NOT EXISTS enforcement text NOT NULL DEFAULT 'hard'
    CHECK (enforcement IN ('hard', 'soft'));
UPDATE budgets SET tenant = scope_value WHERE scope = 'tenant';
UPDATE budgets b SET tenant = k.tenant FROM api_keys k WHERE b.scope = 'key' AND k.id = b.scope_value;
ALTER TABLE budgets DROP CONSTRAINT IF EXISTS budgets_scope_scope_value_period_key;
CREATE UNIQUE INDEX IF NOT EXISTS budgets_tenant_scope ON budgets (tenant, scope, scope_value, period);

-- Every admin action and every read of audit records, conversations or spend: who, what, when,
-- from where. Append-only: the API has no route that changes it, and neither can SQL.
CREATE TABLE IF NOT EXISTS access_audit (
    id            bigserial PRIMARY KEY,
    ts            timestamptz NOT NULL DEFAULT now(),
    actor_key_id  text NOT NULL,
    actor_tenant  text,                -- NULL for the master key (super-admin)
    tenant        text,                -- whose data was read or changed (NULL: every tenant)
    action        text NOT NULL,       -- e.g. keys.create, spend.read, requests.read
    method        text NOT NULL,
    path          text NOT NULL,
    target        text,
    status        integer NOT NULL,
    client_addr   text,
    detail        jsonb
);
CREATE INDEX IF NOT EXISTS access_audit_ts ON access_audit (ts);
CREATE INDEX IF NOT EXISTS access_audit_actor ON access_audit (actor_key_id, ts);

CREATE OR REPLACE FUNCTION access_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'access_audit is append-only';
END $$;
DROP TRIGGER IF EXISTS access_audit_no_change ON access_audit;
CREATE TRIGGER access_audit_no_change BEFORE UPDATE OR DELETE OR TRUNCATE ON access_audit
    FOR EACH STATEMENT EXECUTE FUNCTION access_audit_append_only();

-- Row-level security. Tenant-scoped work runs in a transaction that sets `gateway.tenant` and
-- switches to the role `gateway_tenant`, which sees only rows of that tenant, so a query that
-- forgets its WHERE still cannot cross tenants. The gateway's own (owner) connections — key
-- lookup by hash, the ledger writer, the super-admin — are not subject to it.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'gateway_tenant') THEN
        CREATE ROLE gateway_tenant NOLOGIN;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE EXCEPTION 'the database user needs CREATEROLE once to create the role gateway_tenant '
        '(or create it yourself: CREATE ROLE gateway_tenant NOLOGIN; GRANT gateway_tenant TO <gateway user>)';
END $$;
GRANT gateway_tenant TO CURRENT_USER;
GRANT USAGE ON SCHEMA public TO gateway_tenant;

-- Every tenant-owned table calls this once (later migrations too).
CREATE OR REPLACE FUNCTION gateway_isolate_tenant(t regclass) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', t);
    EXECUTE format('DROP POLICY IF EXISTS tenant_isolation ON %s', t);
    EXECUTE format(
        'CREATE POLICY tenant_isolation ON %s '
        'USING (tenant = current_setting(''gateway.tenant'', true)) '
        'WITH CHECK (tenant = current_setting(''gateway.tenant'', true))', t);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %s TO gateway_tenant', t);
END $$;

SELECT gateway_isolate_tenant('api_keys');
SELECT gateway_isolate_tenant('budgets');
SELECT gateway_isolate_tenant('ledger');
-- A tenant admin's own actions are recorded through its scoped transaction: insert only.
ALTER TABLE access_audit ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS tenant_append ON access_audit;
CREATE POLICY tenant_append ON access_audit FOR INSERT
    WITH CHECK (actor_tenant = current_setting('gateway.tenant', true));
GRANT INSERT ON access_audit TO gateway_tenant;
GRANT USAGE ON SEQUENCE access_audit_id_seq TO gateway_tenant;

-- A budget set by the super-admin (a tenant's cap, a cap on one of its keys) is read-only for
-- the tenant's own admins: they cannot lift the limit they are held to.
ALTER TABLE budgets ADD COLUMN IF NOT EXISTS locked boolean NOT NULL DEFAULT false;
