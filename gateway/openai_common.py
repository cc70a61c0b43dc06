"""What the OpenAI-compatible Files and Vector Stores APIs share: ids, the caller's tenant,
JSON answers, and keyset pagination of lists (``limit``, ``order``, ``after``, ``before`` →
``first_id``, ``last_id``, ``has_more``)."""

from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import orjson
from starlette.requests import Request
from starlette.responses import Response

from core import http
from core.errors import InvalidRequest
from core.types import Identity

MAX_ID = 64


async def serialize(conn: asyncpg.Connection, what: str) -> None:
    """Holds a transaction-scoped advisory lock on ``what`` (e.g. ``files:<tenant>``) until the
    transaction ends, so a count-then-insert under a cap cannot be raced by concurrent requests:
    each one counts after the previous one's insert is committed (READ COMMITTED)."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", what)


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def json_response(obj, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(obj, default=str), status_code=status, media_type="application/json", headers=headers)


def ident(request: Request) -> Identity:
    return request.scope["state"]["identity"]


def tenant(request: Request) -> str:
    """Files and vector stores are the caller's tenant's; the master key acts for ``default``."""
    return ident(request).tenant or "default"


def ts(value) -> int | None:
    return int(value.timestamp()) if value is not None else None


def path_id(request: Request, name: str) -> str:
    # a NUL is no PostgreSQL text: such an id names nothing, so it is looked up as one that cannot match
    return request.path_params[name][:MAX_ID].replace("\x00", "\ufffd")


@dataclass(frozen=True)
class ListParams:
    limit: int
    order: str
    after: str | None
    before: str | None


def list_params(request: Request, *, default: int = 20, maximum: int = 100) -> ListParams:
    q = request.query_params
    limit = http.query_limit(q, default, maximum)
    order = q.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("'order' must be 'asc' or 'desc'.", param="order", code="invalid_value")
    cursors = {}
    for name in ("after", "before"):
        value = q.get(name)
        if value is not None and (not value or len(value) > MAX_ID or "\x00" in value):
            raise InvalidRequest(f"'{name}' must be an object id.", param=name, code="invalid_value")
        cursors[name] = value
    return ListParams(limit, order, cursors["after"], cursors["before"])


async def keyset_page(
    conn: asyncpg.Connection,
    *,
    table: str,
    id_col: str,
    select: str,
    where: str,
    args: list,
    lp: ListParams,
) -> tuple[list[asyncpg.Record], bool]:
    """(rows, has_more) of one page ordered by (created_at, id), after/before a cursor id.
    ``table``, ``id_col``, ``select`` and ``where`` are code, never client text; the client's
    values are all in ``args`` and the cursors, passed as parameters."""
    conds = [where]
    params = list(args)
    desc = lp.order == "desc"
    for name, cursor in (("after", lp.after), ("before", lp.before)):
        if cursor is None:
            continue
        at = await conn.fetchval(
            f"SELECT created_at FROM {table} WHERE {id_col} = ${len(args) + 1} AND ({where})", *args, cursor
        )
        if at is None:
            raise InvalidRequest(
                f"'{name}' must be the id of an object in this list; {cursor!r} is not.",
                param=name,
                code="invalid_value",
            )
        op = ">" if (name == "after") != desc else "<"
        params += [at, cursor]
        conds.append(f"(created_at, {id_col}) {op} (${len(params) - 1}, ${len(params)})")
    backwards = lp.before is not None and lp.after is None  # the page just before the cursor
    direction = "DESC" if desc != backwards else "ASC"
    rows = await conn.fetch(
        f"""SELECT {select} FROM {table} WHERE {" AND ".join(f"({c})" for c in conds)}
            ORDER BY created_at {direction}, {id_col} {direction} LIMIT {lp.limit + 1}""",
        *params,
    )
    has_more = len(rows) > lp.limit
    rows = rows[: lp.limit]
    if backwards:
        rows.reverse()
    return rows, has_more


def list_body(data: list[dict], has_more: bool) -> dict:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def link_or_copy(src: Path, dest: Path) -> None:
    """``dest`` gets ``src``'s bytes: a hard link when they share a file system, else a copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp-" + secrets.token_hex(4))
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
