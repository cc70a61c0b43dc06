-- A delivery status of a wamid the records did not know (a send recorded later, or never: a POST
-- that got no answer; a message another tool sent from the business number) was kept by an older
-- release with its recipient's number (wa_id) and no conversation. No erasure can find such a row
-- (it names no conversation: runtime/erased_records.py rewrites a conversation's rows by id), so
-- the customer's number stayed in it for good. channels/whatsapp/store.record_status no longer
-- writes it; the rows kept before lose it here. A row keeps its status, and the send's record, if
-- it comes, names its conversation and customer again (its ON CONFLICT). One pass over the table
-- at the upgrade; rows only (no table lock beyond the rows it updates).
UPDATE whatsapp_messages SET wa_id = NULL WHERE conversation_id IS NULL AND wa_id IS NOT NULL;
