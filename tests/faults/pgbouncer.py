"""Private PgBouncer instances in front of the test server (Debian's /usr/sbin/pgbouncer).

Each instance has its own directory (ini, auth file, log, pid file), its own 127.0.0.1 port,
``auth_type = trust`` and one pool mode (``session`` or ``transaction``); every database of
the test server is reachable through it under its own name. As root, PgBouncer runs as an
unprivileged user (it refuses root), like the fault tests' own servers.

Without the binary the tests using it skip, unless EOS_REQUIRE_PGBOUNCER=1 (CI) turns the
skip into a failure.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def require_pgbouncer() -> None:
    if Path(PGBOUNCER).exists():
        return
    message = "pgbouncer is not installed (apt-get install pgbouncer)"
    if os.environ.get("EOS_REQUIRE_PGBOUNCER") == "1":
        pytest.fail(message + "; EOS_REQUIRE_PGBOUNCER=1 makes this a failure")
    pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgBouncer:
    """One PgBouncer process in ``mode`` in front of the server that ``admin_dsn`` names."""

    def __init__(self, admin_dsn: str, mode: str, *, pool_size: int = 20) -> None:
        assert mode in ("session", "transaction", "statement")
        self.mode = mode
        self.admin_dsn = admin_dsn
        target = psycopg.conninfo.conninfo_to_dict(admin_dsn)
        self.user = str(target.get("user") or "postgres")
        host = self.host = str(target.get("host") or "/tmp")
        port = str(target.get("port") or "5432")
        self.root = Path(tempfile.mkdtemp(prefix=f"eos-pgbouncer-{mode}-", dir="/tmp"))
        self.root.chmod(0o755)
        self.port = _free_port()
        self.log = self.root / "pgbouncer.log"
        password = f" password={target['password']}" if target.get("password") else ""
        (self.root / "users.txt").write_text(f'"{self.user}" ""\n')
        (self.root / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={host} port={port}{password}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.root / 'users.txt'}\n"
            f"admin_users = {self.user}\n"
            f"pool_mode = {mode}\n"
            "max_client_conn = 500\n"
            f"default_pool_size = {pool_size}\n"
            "server_reset_query = DISCARD ALL\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
            "server_login_retry = 1\n"
            f"logfile = {self.log}\n"
            f"pidfile = {self.root / 'pgbouncer.pid'}\n"
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> PgBouncer:
        command = [PGBOUNCER, str(self.root / "pgbouncer.ini")]
        if os.geteuid() == 0:
            entry = self._runner()
            for path in self.root.iterdir():
                os.chown(path, entry.pw_uid, entry.pw_gid)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            command[1:1] = ["-u", entry.pw_name]
        # its log goes to the logfile; stderr must not be a pipe nobody reads (PgBouncer
        # would block on a full one)
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return self
            except psycopg.OperationalError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"pgbouncer did not start: {self.log_text()}") from None
                time.sleep(0.1)

    def _runner(self) -> pwd.struct_passwd:
        """Who runs PgBouncer as root: the owner of the server's socket directory (it must
        reach the socket), else ``postgres``, else ``nobody``."""
        if self.host.startswith("/"):
            owner = os.stat(self.host).st_uid
            if owner != 0:
                return pwd.getpwuid(owner)
        for name in ("postgres", "nobody"):
            try:
                return pwd.getpwnam(name)
            except KeyError:
                continue
        raise RuntimeError("no unprivileged user to run pgbouncer as")

    def log_text(self) -> str:
        try:
            return self.log.read_text()[-3000:]
        except OSError:
            return ""

    def dsn(self, dbname: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def through(self, direct_dsn: str) -> str:
        """The DSN of ``direct_dsn``'s database through this PgBouncer."""
        return self.dsn(str(psycopg.conninfo.conninfo_to_dict(direct_dsn)["dbname"]))

    def show(self, what: str) -> list[dict[str, Any]]:
        """``SHOW <what>`` on the admin console (SERVERS, CLIENTS, POOLS ...)."""
        with psycopg.connect(self.dsn("pgbouncer"), autocommit=True) as conn:
            cur = conn.cursor(row_factory=psycopg.rows.dict_row)
            cur.execute(f"SHOW {what}")  # admin console: simple protocol, fixed words only
            return cur.fetchall()

    def close_servers(self) -> None:
        """Close every server connection (RECONNECT), e.g. before dropping a database."""
        with psycopg.connect(self.dsn("pgbouncer"), autocommit=True) as conn:
            conn.cursor().execute("RECONNECT")
            conn.cursor().execute("KILL")
            conn.cursor().execute("RESUME")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.destroy()
