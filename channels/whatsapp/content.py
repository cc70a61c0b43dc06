"""What the agent is sent for a burst of inbound messages, and how its answer is cut for
WhatsApp. Images become image parts (vision models read them); audio and documents are stored
under the data directory and named in the text as attachments the agent can refer to.

What is stored is the customer's: each file goes in its conversation's own folder,
``<data>/channels/whatsapp/<tenant hash>/c-<keyed hash of tenant and conversation>/<sha256>.<ext>``
(``store.conversation_digest``: a plain hash of the id gives the customer's number back), so
an erasure or a retention of the conversation deletes its files (``forget_media``) and none of
another conversation's, even when both sent the same bytes. No client-chosen string is ever part
of a path: the folders are hashes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import re
from pathlib import Path

from channels.config import WhatsAppAccount
from channels.whatsapp.graph import Graph, GraphError, GraphUnreachable, MediaRefused
from channels.whatsapp.store import conversation_digest, digest_of, digests
from core.erasure_key import is_legacy_name

log = logging.getLogger("channels.whatsapp")

MAX_BODY = 4096
MAX_INLINE = 6 * 1024 * 1024  # characters of data: URLs of the images of one turn
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/webp"})
OTHER_TYPES = frozenset(
    {
        "audio/ogg",
        "audio/mpeg",
        "audio/mp4",
        "audio/aac",
        "audio/amr",
        "application/pdf",
        "text/plain",
        "text/csv",
        "application/msword",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "application/vnd.ms-excel",
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "video/mp4",
        "image/webp",
    }
)
_EXT = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp", "application/pdf": "pdf", "audio/ogg": "ogg"}
_SENTENCE = re.compile(r"(?<=[.!?…])\s+|\n{2,}")


def split_reply(text: str, limit: int = MAX_BODY, max_parts: int = 10) -> list[str]:
    """Pieces of at most ``limit`` characters, cut at sentence ends (else at a space, else hard)."""
    text = text.strip()
    parts: list[str] = []
    while text and len(parts) < max_parts:
        if len(text) <= limit:
            parts.append(text)
            break
        window = text[:limit]
        cut = max((m.end() for m in _SENTENCE.finditer(window)), default=0)
        if cut < limit // 2:
            space = window.rfind(" ")
            cut = space + 1 if space > limit // 2 else limit
        parts.append(text[:cut].strip())
        text = text[cut:].strip()
    return [p for p in parts if p]


# KEYS: usage. ARGV: bytes, quota. 1: counted; 0: over the quota (nothing counted)
_RESERVE = """
local used = redis.call('INCRBY', KEYS[1], ARGV[1])
if used > tonumber(ARGV[2]) then redis.call('DECRBY', KEYS[1], ARGV[1]) return 0 end
return 1
"""


class MediaStore:
    def __init__(self, graph: Graph, data_dir: Path, redis=None) -> None:
        self.graph = graph
        self.root = Path(data_dir) / "channels" / "whatsapp"
        self.redis = redis  # the per-account usage counters (media_quota_bytes); None: no quota

    async def _reserve(self, acct: WhatsAppAccount, account: str, size: int) -> bool:
        """Counts ``size`` bytes against the account's quota across workers; False when over it."""
        if self.redis is None:
            return True
        key = f"gw:{{gw}}:wa:media-bytes:{account}"
        return bool(await self.redis.eval(_RESERVE, 1, key, size, acct.media_quota_bytes))

    async def forget(self, tenant: str, conversation: str) -> int:
        """Deletes the conversation's stored files (``forget_media``)."""
        return await forget_media(self.root.parent.parent, tenant, [conversation])

    def _path(self, tenant: str, conversation: str, digest: str, mime: str) -> Path:
        return conversation_folder(self.root, tenant, conversation) / f"{digest}.{_EXT.get(mime, 'bin')}"

    async def part(
        self, acct: WhatsAppAccount, media: dict, kind: str, account: str = "", *, conversation: str
    ) -> dict | str:
        """An image part, or a line of text naming the stored attachment (or why there is none);
        the file is kept in ``conversation``'s folder."""
        image = kind in ("image", "sticker")
        allowed = IMAGE_TYPES if image else OTHER_TYPES
        try:
            data, mime = await self.graph.media(acct, media["id"], allowed)
        except MediaRefused as exc:
            return f"[{kind} not shown: {exc}]"
        except (GraphError, GraphUnreachable) as exc:
            if isinstance(exc, GraphError) and exc.kind == "client":
                return f"[{kind} could not be downloaded]"
            raise  # transient: the turn is retried
        digest = hashlib.sha256(data).hexdigest()
        path = self._path(acct.tenant, conversation, digest, mime)
        kept = path.exists()
        if not kept and await self._reserve(acct, account, len(data)):
            await asyncio.to_thread(_write, path, data)
            kept = True
        if not kept:
            log.warning("whatsapp media not kept: the account's media quota is used up")
            if not image:
                return f"[{kind} not kept: the media storage of this account is full]"
        if image:
            return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}}
        name = media.get("filename") or f"{kind}.{_EXT.get(mime, 'bin')}"
        return f"[attachment: {kind} {name!r} ({mime}, {len(data)} bytes), ref wa-media:{digest[:24]}]"


def _tenant_folder(root: Path, tenant: str) -> Path:
    return root / hashlib.sha256(tenant.encode()).hexdigest()[:16]


def conversation_folder(root: Path, tenant: str, conversation: str) -> Path:
    """Where a conversation's files are kept: hashes only (a conversation id holds the customer's
    number, and a crafted one must name no other place)."""
    return _tenant_folder(root, tenant) / f"c-{conversation_digest(tenant, conversation)}"


def _remove_folder(folder: Path) -> int:
    """The files in ``folder`` deleted, then the folder; links are unlinked, never followed (and a
    folder that is a link is only unlinked); the number of files deleted."""
    try:
        if folder.is_symlink():
            folder.unlink()
            return 0
        names = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    removed = 0
    for entry in names:
        if entry.is_dir(follow_symlinks=False):
            continue  # never made by the store: left alone
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
            removed += 1
    with contextlib.suppress(OSError):  # (a file being written right now: its own erasure's)
        folder.rmdir()
    return removed


async def forget_media(data_dir: Path, tenant: str, conversations: list[str]) -> int:
    """Deletes the stored files of the tenant's conversations (ids of other channels are passed
    over; under the folder's name an older release gave it too, not renamed yet: ``upgrade_folders``);
    the number of files deleted."""
    root = Path(data_dir) / "channels" / "whatsapp"
    ours = [c for c in dict.fromkeys(conversations) if c.startswith("wa:")]
    folders = [_tenant_folder(root, tenant) / f"c-{d}" for c in ours for d in digests(tenant, c)]
    if not folders:
        return 0
    return await asyncio.to_thread(lambda: sum(_remove_folder(f) for f in folders))


def upgrade_folders(data_dir: Path) -> int:
    """The conversations' folders an older release named by a plain hash (``c-<32 hex>``) renamed
    as this release names them (``store.digest_of``); into the new one's files when both exist.
    Safe with several processes at once (each step is a rename or an unlink that another may have
    done first). Blocking: run in a thread. How many folders were renamed."""
    root = Path(data_dir) / "channels" / "whatsapp"
    renamed = 0
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for tenant in os.scandir(root):
            if not tenant.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(tenant.path):
                name = entry.name
                if name.startswith("c-") and is_legacy_name(name[2:]) and entry.is_dir(follow_symlinks=False):
                    renamed += _move_folder(Path(entry.path), Path(tenant.path) / f"c-{digest_of(name[2:])}")
    return renamed


def _move_folder(old: Path, new: Path) -> int:
    with contextlib.suppress(FileNotFoundError):
        try:
            os.rename(old, new)  # (fails when ``new`` exists and is not empty)
            return 1
        except OSError:
            pass
        for entry in os.scandir(old):  # both exist: the files go into the new one (same name: same bytes)
            if entry.is_dir(follow_symlinks=False):
                continue
            target = new / entry.name
            with contextlib.suppress(FileNotFoundError):
                if target.exists():
                    os.unlink(entry.path)
                else:
                    os.replace(entry.path, target)
        with contextlib.suppress(OSError):
            old.rmdir()
        return 1
    return 0


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}-{os.urandom(4).hex()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


async def build_content(
    store: MediaStore, acct: WhatsAppAccount, messages: list[dict], conversation: str
) -> str | list:
    """One user message for the burst of ``conversation``: plain text, or parts when an image is
    in it (its media kept in the conversation's folder). The images
    inlined in one turn are bounded together (``MAX_INLINE``, under the gateway's default request
    size): a burst of large photos would otherwise make the turn a request the gateway refuses,
    and the customer would get the fallback message instead of an answer."""
    parts: list[dict | str] = []
    inlined = 0
    for m in messages:
        if m.get("media"):
            part = await store.part(acct, m["media"], m["type"], m.get("account") or "", conversation=conversation)
            if isinstance(part, dict):
                inlined += len(part["image_url"]["url"])
                if inlined > MAX_INLINE:
                    part = f"[{m['type']} not shown: more images than one answer can look at]"
            parts.append(part)
        if m.get("text"):
            parts.append(m["text"])
    if all(isinstance(p, str) for p in parts):
        return "\n".join(parts) or "[an empty message]"
    out: list[dict] = []
    for p in parts:
        out.append({"type": "text", "text": p} if isinstance(p, str) else p)
    return out
