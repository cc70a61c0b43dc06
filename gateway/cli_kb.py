"""``gateway kb ...``: create knowledge bases and upload documents to a running gateway, through
its admin API (the files go where that gateway keeps them, and its worker processes them).

The gateway: ``--url``, else ``$GATEWAY_URL``, else http://127.0.0.1:8000. The key: ``--key``,
else ``$GATEWAY_MASTER_KEY``, else the master key ``gateway serve`` wrote in the data directory
(``$GATEWAY_DATA_DIR/master.key``, ``./.data`` by default).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import httpx

from gateway.embedded import default_data_dir

TERMINAL = ("ready", "failed")


def add_parser(sub) -> None:
    kb = sub.add_parser("kb", help="knowledge bases on a running gateway (admin API)")
    kb.add_argument("--url", help="the gateway (default: $GATEWAY_URL, else http://127.0.0.1:8000)")
    kb.add_argument("--key", help="an admin key (default: $GATEWAY_MASTER_KEY, else <data dir>/master.key)")
    cmds = kb.add_subparsers(dest="kb_cmd", required=True)
    create = cmds.add_parser("create", help="create a knowledge base")
    create.add_argument("name")
    create.add_argument("--tenant")
    create.add_argument("--description", default="")
    create.add_argument("--chunk-size", type=int)
    create.add_argument("--top-k", type=int)
    create.add_argument("--threshold", type=float)
    add = cmds.add_parser("add", help="upload documents and wait until each is ready or failed")
    add.add_argument("kb", help="the knowledge base's id or name")
    add.add_argument("files", nargs="+", metavar="FILE")
    add.add_argument("--tenant")
    add.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for processing")
    lst = cmds.add_parser("list", help="knowledge bases")
    lst.add_argument("--tenant")


def _key(args) -> str:
    key = args.key or os.environ.get("GATEWAY_MASTER_KEY")
    if not key:
        path = default_data_dir() / "master.key"
        try:
            key = path.read_text().strip()
        except OSError:
            raise SystemExit(
                f"no admin key: pass --key, set GATEWAY_MASTER_KEY, or run `gateway serve` ({path})"
            ) from None
    return key


def _client(args) -> httpx.Client:
    url = (args.url or os.environ.get("GATEWAY_URL") or "http://127.0.0.1:8000").rstrip("/")
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {_key(args)}"}, timeout=120)


def _check(r: httpx.Response) -> dict:
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except Exception:
            message = r.text[:500]
        raise SystemExit(f"error {r.status_code}: {message}")
    return r.json()


def _resolve(client: httpx.Client, ref: str, tenant: str | None) -> dict:
    if ref.startswith("kb_"):
        r = client.get(f"/admin/knowledge-bases/{ref}")
        if r.status_code != 404:
            return _check(r)
    params = {"tenant": tenant} if tenant else {}
    found = []
    while True:  # every page: the super-admin's list spans every tenant
        page = _check(client.get("/admin/knowledge-bases", params=params))
        found += [k for k in page["data"] if k["name"] == ref]
        if not page.get("has_more"):
            break
        params = {**params, "after": page["last_id"]}
    if not found:
        raise SystemExit(f"no knowledge base {ref!r}")
    if len(found) > 1:
        raise SystemExit(f"several tenants have a knowledge base named {ref!r}; name one with --tenant")
    return found[0]


def _create(client: httpx.Client, args) -> int:
    body: dict = {"name": args.name}
    if args.description:
        body["description"] = args.description
    if args.tenant:
        body["tenant"] = args.tenant
    settings = {
        k: v
        for k, v in (("chunk_size", args.chunk_size), ("top_k", args.top_k), ("threshold", args.threshold))
        if v is not None
    }
    if settings:
        body["settings"] = settings
    kb = _check(client.post("/admin/knowledge-bases", json=body))
    print(kb["id"])
    print(f"created knowledge base {kb['name']!r} ({kb['embedding_model']}) for tenant {kb['tenant']}", file=sys.stderr)
    return 0


def _add(client: httpx.Client, args) -> int:
    kb = _resolve(client, args.kb, args.tenant)
    total = len(args.files)
    failed = 0
    for n, name in enumerate(args.files, 1):
        path = Path(name)
        label = f"[{n}/{total}] {path.name}"
        if not path.is_file():
            print(f"{label} … not a file", file=sys.stderr)
            failed += 1
            continue
        print(f"{label} … uploading", file=sys.stderr, flush=True)
        with path.open("rb") as fh:
            r = client.post(f"/admin/knowledge-bases/{kb['id']}/documents", files={"file": (path.name, fh)})
        if r.status_code >= 400:
            print(f"{label} … upload refused: {_error(r)}", file=sys.stderr)
            failed += 1
            continue
        doc = r.json()
        deadline = time.monotonic() + args.timeout
        last = None
        while doc["status"] not in TERMINAL and time.monotonic() < deadline:
            if doc["status"] != last:
                print(f"{label} … {doc['status']}", file=sys.stderr, flush=True)
                last = doc["status"]
            time.sleep(0.5)
            doc = _check(client.get(f"/admin/knowledge-bases/{kb['id']}/documents/{doc['id']}"))
        if doc["status"] == "ready":
            print(f"{label} … ready ({doc['chunks']} chunks)", file=sys.stderr)
        elif doc["status"] == "failed":
            print(f"{label} … failed: {doc['reason']}", file=sys.stderr)
            failed += 1
        else:
            print(f"{label} … still {doc['status']} after {args.timeout:g} s", file=sys.stderr)
            failed += 1
        print(f"{doc['id']}\t{doc['status']}\t{path.name}")
    return 1 if failed else 0


def _error(r: httpx.Response) -> str:
    try:
        return r.json()["error"]["message"]
    except Exception:
        return f"HTTP {r.status_code}"


def _list(client: httpx.Client, args) -> int:
    params = {"tenant": args.tenant} if args.tenant else {}
    for kb in _check(client.get("/admin/knowledge-bases", params=params))["data"]:
        print(f"{kb['id']}\t{kb['tenant']}\t{kb['name']}\t{kb['embedding_model']}")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        with _client(args) as client:
            return {"create": _create, "add": _add, "list": _list}[args.kb_cmd](client, args)
    except httpx.HTTPError as exc:
        print(f"cannot reach the gateway: {exc}", file=sys.stderr)
        return 2
