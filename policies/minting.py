"""What a tenant admin may put on a key it mints: never more than it has itself.

A key minted by a tenant admin lives in the admin's tenant and is at most as wide as the admin's
own key on every axis — scopes, models, expiry, PII policy, required tags, rate limits, client
networks and the attribution values it may assert. A setting the request leaves out is
inherited from the minting key, so "no restriction given" never means "no restriction". Only
the master key (the super-admin) mints freely.
"""

from __future__ import annotations

import ipaddress

from core.errors import PermissionDenied
from core.types import Identity


def _wider(field: str, why: str) -> PermissionDenied:
    return PermissionDenied(
        f"A key cannot be minted wider than the key minting it: {why}.", param=field, code="key_wider_than_minter"
    )


def _within(pattern: str, allowed: list[str]) -> bool:
    """Whether every value ``pattern`` admits is admitted by one of ``allowed``."""
    for q in allowed:
        if pattern == q or (q.endswith("*") and pattern.startswith(q[:-1])):
            return True
    return False


def _shared(key_id: str, limit) -> dict:
    """One shared window as metadata: its limit, or ``default`` (the default key limit)."""
    if limit is None:
        return {"key": key_id, "default": True}
    return {"key": key_id, "rpm": limit.rpm, "tpm": limit.tpm}


MAX_SHARED_LIMITS = 16  # minting depth whose windows a key shares (deeper: its minter and the root-ward)


def narrow(minter: Identity, tenant: str | None, settings: dict) -> tuple[str, dict]:
    """(tenant, settings) for a key minted by ``minter``; raises when it asks for more.

    ``settings`` is the key's metadata as the admin API builds it (scopes, models, limits,
    expires_at, pii_policy, require_tags, allowed_ips, attribution)."""
    if minter.is_master:
        return tenant or "default", settings
    if tenant is not None and tenant != minter.tenant:
        raise PermissionDenied(
            f"This admin key belongs to tenant {minter.tenant!r} and cannot mint keys in another.",
            param="tenant",
            code="tenant_mismatch",
        )
    out = dict(settings)
    out["minted_by"] = minter.key_id  # revoking the minter revokes this key (policies/keys.py)
    extra_scopes = set(out.get("scopes") or ()) - set(minter.scopes)
    if extra_scopes:
        raise _wider("scopes", f"scope {sorted(extra_scopes)[0]!r} is not held by the minting key")
    if minter.models:
        models = out.get("models")
        if not models:
            out["models"] = sorted(minter.models)
        elif not set(models) <= minter.models:
            raise _wider("models", f"model {sorted(set(models) - minter.models)[0]!r} is not allowed to it")
    if minter.expires_at is not None:
        expires = out.get("expires_at")
        if expires is None:
            out["expires_at"] = minter.expires_at
        elif expires > minter.expires_at:
            raise _wider("expires_at", "it would outlive the minting key")
    policy = out.get("pii_policy")
    if minter.pii_policy is not None:
        if policy is None:
            out["pii_policy"] = minter.pii_policy
        elif policy != minter.pii_policy:
            raise _wider("pii_policy", f"the minting key is held to PII policy {minter.pii_policy!r}")
    elif policy is not None:
        # A key's PII policy wins over its model group's and its tenant's (policies/pii): naming
        # one would lift the scrubbing the operator put on the tenant or the model.
        raise _wider(
            "pii_policy", "a key's PII policy overrides its tenant's and model's; only the master key sets one"
        )
    if minter.require_tags:
        out["require_tags"] = sorted(set(out.get("require_tags") or ()) | set(minter.require_tags))
    limits = minter.limits
    if limits is not None and (limits.rpm or limits.tpm):
        mine = dict(out.get("limits") or {})
        for name in ("rpm", "tpm"):
            cap = getattr(limits, name)
            if not cap:
                continue
            asked = mine.get(name) or 0
            if not asked:
                mine[name] = cap
            elif asked > cap:
                raise _wider(name, f"{name} {asked} exceeds the minting key's {cap}")
        out["limits"] = {"rpm": mine.get("rpm") or 0, "tpm": mine.get("tpm") or 0}
    # the child's requests count in the minter's windows too (and in those the minter shares)
    # (a minter without limits of its own is held to the default key limit: its children share
    # that window too, resolved when a request is served, else each child had a default window)
    shared = [_shared(k, lim) for k, lim in getattr(minter, "shared_limits", ())]
    if limits is not None and (limits.rpm or limits.tpm):
        shared.insert(0, _shared(minter.key_id, limits))
    elif limits is None and minter.key_id:
        shared.insert(0, _shared(minter.key_id, None))
    if len(shared) > MAX_SHARED_LIMITS:  # the nearest and the root-ward ones: the chain's root
        shared = shared[:1] + shared[-(MAX_SHARED_LIMITS - 1) :]  # window is never dropped
    if shared:
        out["shared_limits"] = shared
    else:
        out.pop("shared_limits", None)
    allowed_ips = getattr(minter, "allowed_ips", None)
    if allowed_ips:
        nets = [ipaddress.ip_network(n, strict=False) for n in allowed_ips]
        asked = out.get("allowed_ips")
        if not asked:
            out["allowed_ips"] = [str(n) for n in nets]
        else:
            for cidr in asked:
                net = ipaddress.ip_network(cidr, strict=False)
                if not any(net.version == n.version and net.subnet_of(n) for n in nets):
                    raise _wider("allowed_ips", f"{cidr} is outside the minting key's networks")
    if minter.attribution:
        mine = dict(out.get("attribution") or {})
        for name, patterns in minter.attribution.items():
            asked = mine.get(name)
            if asked is None:
                mine[name] = list(patterns)
            else:
                for p in asked:
                    if not _within(p, list(patterns)):
                        raise _wider(f"attribution.{name}", f"{p!r} is not a value the minting key may assert")
        out["attribution"] = mine
    return minter.tenant, out
