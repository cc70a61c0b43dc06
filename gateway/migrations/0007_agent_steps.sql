-- One audit record per model call of an agent turn: the ledger's key becomes (request_id, step).
ALTER TABLE ledger ADD COLUMN IF NOT EXISTS step integer;
ALTER TABLE ledger ADD COLUMN IF NOT EXISTS prompt_version integer;
ALTER TABLE ledger ADD COLUMN IF NOT EXISTS variant text;
ALTER TABLE ledger ADD COLUMN IF NOT EXISTS conversation_id text;
UPDATE ledger SET step = 1 WHERE step IS NULL;
ALTER TABLE ledger ALTER COLUMN step SET DEFAULT 1;
ALTER TABLE ledger ALTER COLUMN step SET NOT NULL;
ALTER TABLE ledger DROP CONSTRAINT IF EXISTS ledger_pkey;
ALTER TABLE ledger ADD PRIMARY KEY (request_id, step);
