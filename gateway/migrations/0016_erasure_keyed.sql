-- Erased conversations are kept under a keyed hash of (tenant, id) from now on
-- (core/erasure_key.py: HMAC-SHA256 with a key of the deployment that is not in the database);
-- a plain SHA-256 of a phone number is undone by hashing every number. The rows recorded before
-- hold a plain SHA-256 of the id, which the key cannot be applied to afterwards: they are marked
-- (keyed = false), still read by the memory writer (a turn still on its way), and deleted by the
-- retention sweep once 7 days old (runtime.conversations.drop_unkeyed).
ALTER TABLE erased_conversations ADD COLUMN IF NOT EXISTS keyed boolean NOT NULL DEFAULT false;
ALTER TABLE erased_conversations ALTER COLUMN keyed SET DEFAULT true;
-- The ledger's writer looks an erasure up by tenant and hash (a ledger row does not name its agent).
CREATE INDEX IF NOT EXISTS erased_conversations_tenant_hash ON erased_conversations (tenant, external_hash);
-- An erasure and a retention rewrite the conversation's ledger rows (runtime/erased_records.py):
-- the rows of one conversation of one tenant, by index. Plain CREATE INDEX (see 0014_privacy.sql):
-- an operator with a very large ledger can build it beforehand with CREATE INDEX CONCURRENTLY.
CREATE INDEX IF NOT EXISTS ledger_tenant_conversation ON ledger (tenant, conversation_id)
    WHERE conversation_id IS NOT NULL;
