"""The shared kernel: types, errors, the config schema, background tasks, pub/sub, metrics,
token counting, SSE framing, ASGI helpers and the pooled upstream HTTP client.

Every other package (``gateway``, ``policies``, ``runtime``, ``rag``) may import it; it imports
none of them (an import-linter contract in ``make test`` holds it to that)."""
