"""PII scrubbing: find personal data in what leaves the gateway and redact, mask, hash, block or
pseudonymize it, restoring pseudonyms in what comes back.

``entities`` names the entity types, ``analysis`` finds them (Presidio, offline, behind a cheap
pre-filter and a cache), ``anonymize`` applies the actions, ``scrub`` walks a request body,
``restore`` puts original values back into responses and streams.
"""
