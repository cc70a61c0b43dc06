-- vapi_calls.erased_before: the latest erasure time of the call's conversation (erased_conversations
-- .erased_at, the one clock an erasure is kept in) when the gateway recorded the call's start (its
-- assistant-request, or the outbound call placed); '-infinity' when there was none. NULL: the
-- gateway's first record of the call was not its start (a status update or a report, maybe sent
-- late), so every erasure of its conversation counts (channels.vapi.calls).
ALTER TABLE vapi_calls ADD COLUMN IF NOT EXISTS erased_before timestamptz;

-- feedback.agent_ids: the agents (ids) the posting key could use when it named none and was
-- restricted to some models; an experiment report counts such feedback for those agents only.
-- NULL: a key that may use every model (or feedback naming its agent: agent_id).
ALTER TABLE feedback ADD COLUMN IF NOT EXISTS agent_ids text[];
