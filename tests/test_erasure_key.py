"""``core.erasure_key.conversation_hash`` keeps its recent hashes: a cached one is always the HMAC
of the key in force, whatever key came before (a rotation, another environment)."""

from __future__ import annotations

import hashlib
import hmac

from core import erasure_key


def _hmac(key: bytes, tenant: str, conversation: str) -> str:
    return hmac.new(key, f"{tenant}\x00{conversation}".encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def test_a_cached_conversation_hash_is_the_hmac_of_the_key_in_force_after_a_rotation(monkeypatch):
    conversations = [("t1", "wa:1:+15550001"), ("t2", "wa:1:+15550001"), ("t1", "c\udc80"), ("t1", "")]
    for _ in range(2):  # the second round reads the cache
        for key in (b"key-a", b"key-b", b"key-a"):
            for tenant, conv in conversations:
                assert erasure_key.conversation_hash(tenant, conv, key) == _hmac(key, tenant, conv)
                assert erasure_key.conversation_tag(tenant, conv, key) == "erased:" + _hmac(key, tenant, conv)
    # without a key given, the process's key: read again from the environment on each call
    for own in ("env-key-1", "env-key-2", "env-key-1"):
        monkeypatch.setenv(erasure_key.ENV, own)
        assert erasure_key.conversation_hash("t1", "wa:1:+15550001") == _hmac(own.encode(), "t1", "wa:1:+15550001")


def test_values_equal_as_keys_but_written_differently_are_hashed_apart():
    # (callers pass strings; a cache keyed on equality alone would give True the hash of 1)
    key = b"key-a"
    assert erasure_key.conversation_hash(1, "c", key) == _hmac(key, "1", "c")  # type: ignore[arg-type]
    assert erasure_key.conversation_hash(True, "c", key) == _hmac(key, "True", "c")  # type: ignore[arg-type]
