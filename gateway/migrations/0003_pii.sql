-- Counts of personal data found in a request, by entity type: {"EMAIL": 2, "PHONE": 1}.
ALTER TABLE ledger ADD COLUMN IF NOT EXISTS pii_entities jsonb;
