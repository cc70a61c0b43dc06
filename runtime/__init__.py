"""The agent runtime: agents and their versioned prompts, conversation memory, server-side tools
and run records. A domain package: it imports ``core`` only; the gateway composes it."""
