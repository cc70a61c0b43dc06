"""Zero data retention: the request fields that ask a provider to keep what it is sent.

``store: true`` (OpenAI's stored completions, kept 30 days with the request's ``metadata``) and
``prompt_cache_retention`` other than ``in_memory`` (extended prompt caching: the prompt's cache
kept for up to a day) each make the provider retain the request. A request that requires the
``zdr`` tag may send neither: the pipeline refuses a client's (gateway/routing/constraints.py)
and the adapters drop them from every other call (``without_retention``).
"""

from __future__ import annotations

ZDR = "zdr"


def retaining_field(body: dict) -> str | None:
    """The field of an OpenAI request asking the provider to keep the request, if one does."""
    store = body.get("store")
    if store is not None and store is not False:
        return "store"
    cache = body.get("prompt_cache_retention")
    if cache is not None and cache != "in_memory":
        return "prompt_cache_retention"
    return None


def without_retention(payload: dict) -> dict:
    """``payload`` (a copy the caller owns) without the fields that make a provider retain it."""
    if payload.get("store") is not None and payload.get("store") is not False:
        del payload["store"]
    if payload.get("prompt_cache_retention") not in (None, "in_memory"):
        del payload["prompt_cache_retention"]
    return payload
