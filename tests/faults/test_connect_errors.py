"""A failed connection attempt says whether another try can succeed — against real servers.

A server that is down, shutting down, not accepting connections yet or full may be fine for
the next try: ``DatabaseUnavailableError`` (retryable, so Airflow retries the task). A wrong
password, user or database, or a malformed connection string fails every try:
``ConfigurationError`` (Airflow fails the task without retries), saying what to fix.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest

from eos_airflow import ConfigurationError, DatabaseUnavailableError, Ledger
from tests.faults.server import LocalServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def auth_server() -> Iterator[LocalServer]:
    """A server that checks passwords for role ``pw`` and limits role ``busy`` to one
    connection."""
    server = LocalServer().init()
    hba = server.pgdata / "pg_hba.conf"
    hba.write_text("host all pw 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
    server.start()
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute("CREATE ROLE pw LOGIN PASSWORD 'right-password'")
        conn.execute("CREATE ROLE busy LOGIN CONNECTION LIMIT 1")
        conn.execute("CREATE ROLE nologin")
    try:
        yield server
    finally:
        server.destroy()


def attempt(dsn: str) -> Exception:
    with (
        Ledger(dsn) as ledger,
        pytest.raises((ConfigurationError, DatabaseUnavailableError)) as raised,
    ):
        ledger.run("k", lambda eos: None)
    return raised.value


def at(
    server: LocalServer, user: str = "postgres", db: str = "postgres", password: str | None = None
) -> str:
    auth = f"{user}:{password}" if password else user
    return f"postgresql://{auth}@127.0.0.1:{server.port}/{db}?connect_timeout=5"


#: case → (the DSN on the test's server, what the message says to fix)
PERMANENT = {
    "wrong password": (
        lambda s: at(s, "pw", password="wrong"),
        "the server refused the credentials: fix the password",
    ),
    "no password given": (
        lambda s: at(s, "pw"),
        "the server refused the credentials: fix the password",
    ),
    "unknown user": (
        lambda s: at(s, "nobody_here"),
        "the user does not exist on the server: fix the user name",
    ),
    "unknown database": (
        lambda s: at(s, db="no_such_db"),
        "the database does not exist on the server: fix its name",
    ),
    "role without LOGIN": (lambda s: at(s, "nologin"), "the role may not log in"),
    "malformed port": (
        lambda s: f"postgresql://postgres@127.0.0.1:{s.port}x/postgres",
        "the connection parameters are malformed",
    ),
}


@pytest.mark.parametrize("case", PERMANENT)
def test_a_connection_no_retry_can_fix_is_a_configuration_error(auth_server, case):
    make, fix = PERMANENT[case]
    error = attempt(make(auth_server))
    assert type(error) is ConfigurationError, error
    assert not error.retryable
    assert fix in str(error) and "Retrying does not help" in str(error)
    assert "right-password" not in str(error) and "wrong" not in str(error).split("(")[0]


def hold_role_slot(server: LocalServer) -> Callable[[], None]:
    held = psycopg.connect(at(server, "busy"))
    return held.close


def smart_shutdown(server: LocalServer) -> Callable[[], None]:
    """``pg_ctl stop -m smart`` with a session open: the server refuses new connections
    ("shutting down") until that session ends."""
    held = psycopg.connect(server.dsn())
    server._pg("pg_ctl", "-D", str(server.pgdata), "-m", "smart", "-W", "stop")
    for _ in range(100):
        try:
            psycopg.connect(server.dsn(), connect_timeout=2).close()
        except psycopg.OperationalError as exc:
            if "shutting down" in str(exc):
                break
        time.sleep(0.05)

    def back() -> None:
        held.close()
        server.stop()
        server.start()

    return back


def test_passing_failures_are_retryable(auth_server):
    """Closed port, stopped server, role connection limit, server shutting down, server
    that is not accepting connections (a standby without hot standby)."""
    cases: dict[str, tuple[str, str]] = {}

    cases["closed port"] = (
        attempt(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"),
        "nothing accepts connections at that address",
    )

    release = hold_role_slot(auth_server)
    try:
        cases["role connection limit"] = (
            attempt(at(auth_server, "busy")),
            "no free connection slot",
        )
    finally:
        release()

    back = smart_shutdown(auth_server)
    try:
        cases["shutting down"] = (attempt(at(auth_server)), "shutting down")
    finally:
        back()

    stopped = LocalServer().init().start()
    try:
        stopped.stop()
        cases["stopped server"] = (
            attempt(stopped.dsn()),
            "nothing accepts connections at that address",
        )
    finally:
        stopped.destroy()

    full = LocalServer({"max_connections": "3", "superuser_reserved_connections": "0"})
    full.init().start()
    try:
        held = [psycopg.connect(full.dsn()) for _ in range(3)]
        cases["too many clients"] = (attempt(full.dsn()), "no free connection slot")
        for conn in held:
            conn.close()
    finally:
        full.destroy()

    standby = LocalServer({"hot_standby": "off"}).init()
    (standby.pgdata / "standby.signal").touch()
    try:
        standby._pg("pg_ctl", "-D", str(standby.pgdata), "-l", str(standby.logfile), "-W", "start")
        for _ in range(200):  # until the postmaster answers (and refuses)
            error = attempt(standby.dsn())
            if "not accepting connections" in str(error) or "starting up" in str(error):
                break
            time.sleep(0.05)
        cases["standby, not accepting connections"] = (
            error,
            "the server is starting up, shutting down or recovering",
        )
    finally:
        standby.destroy()

    for case, (error, why) in cases.items():
        assert type(error) is DatabaseUnavailableError, (case, error)
        assert error.retryable, case
        assert why in str(error), (case, str(error))
        assert "Airflow retries the task" in str(error), case
    print({case: str(error)[:160] for case, (error, _) in cases.items()})


def test_connect_error_keeps_libpqs_error_as_its_cause(auth_server):
    error = attempt(at(auth_server, "pw", password="wrong"))
    assert isinstance(error.__cause__, psycopg.OperationalError)
    assert "password authentication failed for user" in str(error)
