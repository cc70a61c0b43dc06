"""Channel adapters: clients of the gateway's OpenAI API that carry conversations in from other
networks (WhatsApp, VAPI phone calls) and the answers back out.

A channel imports only the kernel (``core``): it talks to the gateway over HTTP with a channel
API key, exactly as any OpenAI client would (``gateway_client``), and keeps its own records in
its own tables. The composition (``gateway/``) mounts its webhooks and starts its workers.
"""
