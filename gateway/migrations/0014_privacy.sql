-- What an erasure or a retention looks up by conversation (runtime.conversations.forget_copies):
-- the feedback on a conversation's turns is found through its runs (without this index, every run
-- of the agent was read: 80 ms an erasure at a million runs), and the words its escalations kept
-- (and the learned examples drawn from them) by the conversation, resolved escalations included.
--
-- Plain CREATE INDEX: the migration runner applies each file in a transaction, where CONCURRENTLY
-- is refused. It holds writes to the table (not reads) while the index is built: the run records
-- reach PostgreSQL from a Redis stream in batches, which wait for it (a second or two a million
-- runs); nothing on a request's path waits. An operator with a very large table can build them
-- beforehand with CREATE INDEX CONCURRENTLY under the same names: IF NOT EXISTS then skips them.
CREATE INDEX IF NOT EXISTS runs_tenant_agent_conversation
    ON runs (tenant, agent_id, conversation_id) INCLUDE (request_id) WHERE conversation_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS escalations_tenant_agent_conversation ON escalations (tenant, agent_id, conversation_id);
CREATE INDEX IF NOT EXISTS learned_examples_escalation ON learned_examples (tenant, escalation_id)
    WHERE escalation_id IS NOT NULL;
