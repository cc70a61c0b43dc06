"""Multipart uploads parsed as they stream in (the admin API's documents, ``/v1/files``): the file
field's bytes go straight to a temporary file on disk, hashed on the way, never whole into memory;
past ``MAX_UPLOAD_BYTES`` (or the caller's room) the upload is refused with a 413 before more is
read. Headers, part counts and file names are bounded and cleaned here."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
from pathlib import Path

from starlette.requests import Request

from core.errors import InvalidRequest, PayloadTooLarge

MAX_UPLOAD_BYTES = 50 * 1024 * 1024
MAX_MULTIPART_OVERHEAD = 64 * 1024  # headers, boundaries and small fields around the file
MAX_PART_HEADERS = 16 * 1024
MAX_PARTS = 32
MAX_FILENAME = 255

_PARAM = re.compile(r';\s*([a-zA-Z0-9_*-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


def _header_params(value: str) -> dict[str, str]:
    out = {}
    for key, raw in _PARAM.findall(value):
        raw = raw.strip()
        if raw.startswith('"') and raw.endswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        out[key.lower()] = raw
    return out


def _clean_filename(name: str) -> str:
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    return name[:MAX_FILENAME] or "upload"


class Upload:
    """The ``file`` part of a multipart body, written to ``path`` as it arrives."""

    def __init__(self, boundary: bytes, path: Path, room: int | None = None, over_room=None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.room, self.over_room = room, over_room  # the tenant's room left: past it, over_room is raised
        self.delim = b"\r\n--" + boundary
        self.buf = b"\r\n"  # the first boundary has no CRLF before it: pretend it had
        self.state = "preamble"
        self.path = path
        self.fh = None
        self.filename: str | None = None
        self.content_type = ""
        self.size = 0
        self.sha = hashlib.sha256()
        self.done = False
        self.other_bytes = 0
        self.fields: dict[str, bytes] = {}  # the small parts besides the file (bounded in total)
        self._field: str | None = None
        self.parts = 0

    def _headers(self, raw: bytes) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise _bad_multipart(f"more than {MAX_PARTS} parts")
        headers = {}
        for line in raw.decode("utf-8", "replace").split("\r\n"):
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        disposition = _header_params(";" + headers.get("content-disposition", "").partition(";")[2])
        if disposition.get("name") == "file" and "filename" in disposition and self.filename is None:
            self.filename = _clean_filename(disposition["filename"])
            self.content_type = headers.get("content-type", "")[:128]
            if any(c < " " or c == "\x7f" for c in self.content_type):  # (a NUL is no PostgreSQL text)
                raise _bad_multipart("the file's Content-Type holds control characters")
            self.fh = open(self.path, "wb")
            self.state = "file"
        else:
            self.state = "other"
            self._field = disposition.get("name", "")[:64]
            self.fields.setdefault(self._field, b"")

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        if self.state == "file":
            self.size += len(data)
            if self.size > MAX_UPLOAD_BYTES:
                raise PayloadTooLarge(f"The file exceeds the upload limit of {MAX_UPLOAD_BYTES // (1024 * 1024)} MB.")
            if self.room is not None and self.size > self.room:
                raise self.over_room
            self.sha.update(data)
            self.fh.write(data)
        else:
            self.other_bytes += len(data)
            if self.other_bytes > MAX_MULTIPART_OVERHEAD:
                raise PayloadTooLarge("The multipart fields besides 'file' are too large.")
            if self._field is not None:
                self.fields[self._field] += data

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        self.buf += data
        while not self.done:
            if self.state == "preamble":
                i = self.buf.find(self.delim)
                if i < 0:
                    if len(self.buf) > MAX_MULTIPART_OVERHEAD:
                        raise _bad_multipart("no multipart boundary found")
                    return
                self.buf = self.buf[i + len(self.delim) :]
                self.state = "delimiter"
            elif self.state == "delimiter":
                if len(self.buf) < 2:
                    return
                if self.buf[:2] == b"--":
                    self.done = True
                    if self.fh is not None:
                        self.fh.close()
                    return
                self.buf = self.buf.lstrip(b" \t")
                if len(self.buf) < 2:
                    return
                if self.buf[:2] != b"\r\n":
                    raise _bad_multipart("malformed boundary line")
                self.buf = self.buf[2:]
                self.state = "headers"
            elif self.state == "headers":
                i = self.buf.find(b"\r\n\r\n")
                if i < 0:
                    if len(self.buf) > MAX_PART_HEADERS:
                        raise _bad_multipart("part headers too long")
                    return
                raw, self.buf = self.buf[:i], self.buf[i + 4 :]
                self._headers(raw)
            else:  # file or other: data until the next delimiter
                i = self.buf.find(self.delim)
                if i < 0:
                    keep = len(self.delim) - 1
                    if len(self.buf) > keep:
                        self._emit(self.buf[:-keep])
                        self.buf = self.buf[-keep:]
                    return
                self._emit(self.buf[:i])
                self.buf = self.buf[i + len(self.delim) :]
                if self.state == "file":
                    self.fh.close()
                self.state = "delimiter"

    def close(self) -> None:
        if self.fh is not None and not self.fh.closed:
            self.fh.close()


def _bad_multipart(why: str) -> InvalidRequest:
    return InvalidRequest(f"The body is not valid multipart/form-data: {why}.", param="file", code="invalid_multipart")


async def receive_upload(
    request: Request, tmp_dir: Path, *, room: int | None = None, over_room: Exception | None = None
) -> Upload:
    """The upload's ``file`` part streamed to ``tmp_dir``; ``room``: the bytes the tenant may still
    store (storage_quota.precheck's), past which the upload is cut off with ``over_room``."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "multipart/form-data":
        raise InvalidRequest(
            "Upload the document as multipart/form-data with a 'file' field.", param="file", code="invalid_content_type"
        )
    boundary = _header_params(";" + ctype.partition(";")[2]).get("boundary", "")
    if not 1 <= len(boundary) <= 200:
        raise _bad_multipart("no boundary in the content type")
    limit = MAX_UPLOAD_BYTES + MAX_MULTIPART_OVERHEAD
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"The upload exceeds the limit of {MAX_UPLOAD_BYTES // (1024 * 1024)} MB.")
    upload = Upload(boundary.encode("latin-1"), tmp_dir / f"upload-{secrets.token_hex(8)}", room, over_room)
    received = 0
    try:
        async for data in request.stream():
            received += len(data)
            if received > limit:
                raise PayloadTooLarge(f"The upload exceeds the limit of {MAX_UPLOAD_BYTES // (1024 * 1024)} MB.")
            upload.feed(data)
        if upload.filename is None:
            raise InvalidRequest(
                "Missing required parameter: 'file' (a multipart file field).",
                param="file",
                code="missing_required_parameter",
            )
        if not upload.done:
            raise _bad_multipart("the body ended before its closing boundary")
    except BaseException:
        upload.close()
        with contextlib.suppress(OSError):
            upload.path.unlink()
        raise
    return upload


def bad_after(what: str) -> InvalidRequest:
    return InvalidRequest(
        f"'after' must be the id of a {what} (a list's last_id).", param="after", code="invalid_value"
    )


def place(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dest)
