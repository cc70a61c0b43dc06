"""The streams moved into PostgreSQL — the audit ledger, agent runs, conversation memory — and
their dead letters (super-admin only: records of every tenant).

- ``GET /admin/streams``: each stream's depth (``length``), entries read but not yet written
  (``pending``) and dead letters.
- ``GET /admin/streams/{stream}/dead-letters?limit=&after=``: records PostgreSQL refused (a value
  beyond its column, a constraint), oldest first, with the SQLSTATE it gave. The ledger's keep no
  message content; memory's keep the turn (until its conversation is erased or expires: they
  are tagged by conversation, ``core.stream_writer.drop_dead_tagged``).
- ``POST /admin/streams/{stream}/dead-letters/{id}/retry``: back into the stream once the cause
  is mended (written as any entry; refused again, it is a dead letter again).
- ``DELETE /admin/streams/{stream}/dead-letters/{id}``: dropped.

Spooled ledger records PostgreSQL refused are in ``ledger-dead.jsonl`` in each replica's data
directory (``spool_dead_bytes`` here: this replica's; no route retries them). An erasure or a
retention served by the replica rewrites its file (``runtime.erased_records.retag_dead_file``).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core import http
from core.errors import InvalidRequest, NotFound, PermissionDenied
from core.stream_writer import StreamWriter, entry_id
from gateway import admin as base  # a module, not names: admin.py imports this module in turn


class StreamsAdmin:
    def __init__(self, admin) -> None:
        self.admin = admin

    def _writers(self, request: Request) -> dict[str, StreamWriter]:
        if not base._ident(request).is_master:
            raise PermissionDenied("Only the master key can manage streams.", code="super_admin_required")
        svc = self.admin.svc
        found = {"ledger": svc.ledger}
        if svc.runs is not None:
            found["runs"] = svc.runs.writer
        if svc.memory is not None:
            found["memory"] = svc.memory.writer
        return found

    def _writer(self, request: Request) -> StreamWriter:
        writers = self._writers(request)
        name = request.path_params["stream"]
        if name not in writers:
            raise NotFound(f"No stream {name[:64]!r}; known: {', '.join(writers)}.", param="stream")
        return writers[name]

    def _dead_id(self, request: Request) -> str:
        dead_id = request.path_params["dead_id"]
        if not entry_id(dead_id):
            raise NotFound(f"No dead letter {dead_id[:64]!r}.", param="dead_id")
        return dead_id

    async def list_streams(self, request: Request) -> Response:
        data = []
        for name, writer in self._writers(request).items():
            stats = await writer.stats()
            if name == "ledger":
                dead_file = writer.spool.dead_path
                stats["spool_dead_bytes"] = dead_file.stat().st_size if dead_file.exists() else 0
            data.append({"object": "stream", "name": name, **stats})
        return base._json({"object": "list", "data": data})

    async def dead_letters(self, request: Request) -> Response:
        writer = self._writer(request)
        limit = http.query_limit(request.query_params, 100, 1000)
        after = request.query_params.get("after")
        if after is not None and not entry_id(after):
            raise InvalidRequest("'after' must be a dead letter's id.", param="after", code="invalid_value")
        data, more = await writer.dead_letters(limit, after)
        return base._json({"object": "list", "data": data, "has_more": more})

    async def retry_dead(self, request: Request) -> Response:
        writer = self._writer(request)
        dead_id = self._dead_id(request)
        if not await writer.retry_dead(dead_id):
            raise NotFound(f"No dead letter {dead_id!r}.", param="dead_id")
        return base._json({"id": dead_id, "object": "stream.dead_letter", "retried": True})

    async def drop_dead(self, request: Request) -> Response:
        writer = self._writer(request)
        dead_id = self._dead_id(request)
        if not await writer.drop_dead(dead_id):
            raise NotFound(f"No dead letter {dead_id!r}.", param="dead_id")
        return base._json({"id": dead_id, "object": "stream.dead_letter", "deleted": True})

    def routes(self) -> list[Route]:
        return [
            Route("/admin/streams", self.list_streams, methods=["GET"]),
            Route("/admin/streams/{stream}/dead-letters", self.dead_letters, methods=["GET"]),
            Route("/admin/streams/{stream}/dead-letters/{dead_id}/retry", self.retry_dead, methods=["POST"]),
            Route("/admin/streams/{stream}/dead-letters/{dead_id}", self.drop_dead, methods=["DELETE"]),
        ]


def routes(admin) -> list[Route]:
    """The stream admin routes, for gateway/admin.py's route list."""
    return StreamsAdmin(admin).routes()
