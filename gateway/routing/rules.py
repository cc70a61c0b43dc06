"""Rules that choose a model group from the request itself ("multi-model orchestration")."""

from __future__ import annotations

from core.config import RuleCondition
from core.types import RequestContext


def _has_images(body: dict) -> bool:
    for msg in body.get("messages") or []:
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "image_url" for p in content):
            return True
    return False


def matches(cond: RuleCondition, ctx: RequestContext) -> bool:
    body = ctx.body
    if cond.metadata:
        meta = body.get("metadata")
        if not isinstance(meta, dict):
            return False
        for k, v in cond.metadata.items():
            if str(meta.get(k)) != v:
                return False
    if cond.has_tools is not None and bool(body.get("tools")) != cond.has_tools:
        return False
    if cond.has_images is not None and _has_images(body) != cond.has_images:
        return False
    if cond.prompt_tokens_over is not None:
        # the body's size bounds the token count from above: count only when it could matter
        over = cond.prompt_tokens_over - ctx.grow_tokens  # (an agent's sources come after routing)
        if ctx.body_bytes <= over or ctx.prompt_tokens() <= over:
            return False
    return True
