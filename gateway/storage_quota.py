"""What a tenant may keep on the gateway's disk: files uploaded to ``/v1/files`` and documents
uploaded to its knowledge bases through the admin API count together, in number and in bytes
(``policies.max_files_per_tenant``, ``policies.max_file_bytes_per_tenant``). Without a bound on
the second, a tenant's admin key could upload 50 MB documents until the disk every tenant shares
was full. A vector store's documents are its files (counted once here, as files; each store a
file is attached to counts it again in gateway/kb_limits.py); the learned answers of the
human-in-the-loop count as the small documents they are.

A check runs under the tenant's advisory lock, held to the end of the caller's transaction, from
the count to the insert: concurrent uploads cannot both pass a cap that has room for one.

While an upload is received it is on the disk already: it is cut off once its file is past the
room the tenant had left when it began (``precheck``), and a tenant has at most
``MAX_UPLOADS_IN_FLIGHT`` uploads being received at once in a process (429 past that, before the
body is read). Otherwise a tenant with 1,000 bytes of room could hold thousands of 50 MB uploads
open at once on the disk every tenant shares.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import asyncpg

from core.errors import InvalidRequest, RateLimited
from gateway.openai_common import serialize

DEFAULT_MAX_FILES = 10_000
DEFAULT_MAX_BYTES = 10 * 2**30
MAX_UPLOADS_IN_FLIGHT = 4  # a tenant's uploads being received at once, in one process

_receiving: dict[str, int] = {}  # tenant → its uploads being received in this process

_USED_SQL = """
SELECT (SELECT count(*) FROM openai_files WHERE tenant = $1)
     + (SELECT count(*) FROM kb_documents WHERE tenant = $1 AND file_id IS NULL) AS files,
       (SELECT coalesce(sum(bytes), 0) FROM openai_files WHERE tenant = $1)
     + (SELECT coalesce(sum(bytes), 0) FROM kb_documents WHERE tenant = $1 AND file_id IS NULL) AS bytes
"""


@dataclass(frozen=True, slots=True)
class StorageQuota:
    max_files: int = DEFAULT_MAX_FILES
    max_bytes: int = DEFAULT_MAX_BYTES


def of(svc) -> StorageQuota:
    policies = svc.config.policies
    return StorageQuota(policies.max_files_per_tenant, policies.max_file_bytes_per_tenant)


def full(quota: StorageQuota, param: str = "file") -> InvalidRequest:
    return InvalidRequest(
        f"This tenant has reached its file storage limit ({quota.max_files:,} files and documents, "
        f"{quota.max_bytes:,} bytes: policies.max_files_per_tenant, policies.max_file_bytes_per_tenant); "
        "delete some first.",
        param=param,
        code="too_many_files",
    )


async def used(conn: asyncpg.Connection, tenant: str) -> tuple[int, int]:
    """(files and documents, bytes) the tenant keeps."""
    row = await conn.fetchrow(_USED_SQL, tenant)
    return int(row["files"]), int(row["bytes"])


async def precheck(conn: asyncpg.Connection, tenant: str, quota: StorageQuota, param: str = "file") -> int:
    """Refuses an upload before its body reaches the disk when the tenant is already full; else
    the bytes it may still store (the most an upload's file may hold)."""
    files, stored = await used(conn, tenant)
    if files >= quota.max_files or stored >= quota.max_bytes:
        raise full(quota, param)
    return quota.max_bytes - stored


@contextlib.contextmanager
def receiving(tenant: str) -> Iterator[None]:
    """One of the tenant's ``MAX_UPLOADS_IN_FLIGHT`` uploads being received (429 past them)."""
    n = _receiving.get(tenant, 0)
    if n >= MAX_UPLOADS_IN_FLIGHT:
        raise RateLimited(
            f"This tenant has {MAX_UPLOADS_IN_FLIGHT} uploads in progress on this server; retry when one is done.",
            code="too_many_uploads",
            headers={"retry-after": "1"},
        )
    _receiving[tenant] = n + 1
    try:
        yield
    finally:
        if _receiving[tenant] <= 1:
            del _receiving[tenant]
        else:
            _receiving[tenant] -= 1


async def lock(conn: asyncpg.Connection, tenant: str) -> None:
    """The tenant's storage lock, to the end of the transaction (take it before inserting)."""
    await serialize(conn, f"openai_files:{tenant}")


async def check(
    conn: asyncpg.Connection, tenant: str, quota: StorageQuota, adding: int, *, counted: bool = False, param="file"
) -> None:
    """Refuses one more file or document of ``adding`` bytes past the quota. ``counted``: its
    row is already inserted in this transaction (under ``lock``), so the count includes it."""
    files, stored = await used(conn, tenant)
    if counted:
        files, stored = files - 1, stored - adding
    if files + 1 > quota.max_files or stored + adding > quota.max_bytes:
        raise full(quota, param)
