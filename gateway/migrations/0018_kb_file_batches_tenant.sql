-- A tenant keeps its newest file batches (gateway/kb_limits.py): the older ones are found by
-- tenant and age.
CREATE INDEX IF NOT EXISTS kb_file_batches_tenant ON kb_file_batches (tenant, created_at, id);
