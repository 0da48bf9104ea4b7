"""A database that cannot be reached when a task starts, under real Airflow (`airflow dags
test`): down for the first try and back within the retry delay → the task succeeds on its
retry (exactly once); a wrong password → the task fails at once, without retries.

"Down" is real: connection ``flaky_db`` points at a port where nothing listens until the
test sees the first try fail; then a forwarding proxy to the database starts on that port.
"""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator

import psycopg
import pytest

from eos_airflow import Ledger
from eos_airflow.hooks.ledger import airflow_conn_json
from tests.airflow.conftest import AIRFLOW
from tests.conftest import events
from tests.faults.proxy import FaultProxy
from tests.faults.server import LocalServer

pytestmark = pytest.mark.airflow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def upstream_of(dsn: str) -> tuple[str, int] | str:
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    host, port = params.get("host", "127.0.0.1"), int(params.get("port") or 5432)
    return f"{host}/.s.PGSQL.{port}" if host.startswith("/") else (host, port)


def meta_dsn(airflow) -> str:
    return airflow.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].replace("+psycopg", "")


def tries(airflow, dag_id: str) -> dict[str, tuple[str, int]]:
    with psycopg.connect(meta_dsn(airflow)) as conn:
        return {
            task: (state, n)
            for task, state, n in conn.execute(
                "SELECT task_id, state, try_number FROM task_instance WHERE dag_id = %s", [dag_id]
            )
        }


def run_while_down(
    airflow, dag_id: str, db: str, port: int
) -> tuple[subprocess.CompletedProcess[str], bool]:
    """`airflow dags test dag_id` with ``flaky_db`` unreachable until its first try fails
    to connect; returns the run and whether the database was brought back."""
    env = {**airflow.env, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [AIRFLOW, "dags", "test", dag_id, "2024-01-01"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    proxy: list[FaultProxy] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if not proxy and "cannot connect to Airflow connection 'flaky_db'" in line:
                proxy.append(FaultProxy(upstream_of(db), port=port))  # the database is back

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=300)
        reader.join(10)
    finally:
        proc.kill()
        for p in proxy:
            p.close()
    out = "".join(lines)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, ""), bool(proxy)


@pytest.fixture
def flaky(airflow, db) -> Iterator[int]:
    """Connection ``flaky_db``: ``db`` through a port where nothing listens yet."""
    port = free_port()
    user = psycopg.conninfo.conninfo_to_dict(db).get("user", "postgres")
    dbname = psycopg.conninfo.conninfo_to_dict(db)["dbname"]
    airflow.env["AIRFLOW_CONN_FLAKY_DB"] = airflow_conn_json(
        f"postgresql://{user}@127.0.0.1:{port}/{dbname}"
    )
    yield port


def test_database_down_at_task_start_and_back_within_the_retry_delay(airflow, db, flaky):
    run, restored = run_while_down(airflow, "eos_db_down", db, flaky)
    out = run.stdout
    assert restored, "the first try never reported the database unreachable: " + out[-4000:]
    assert run.returncode == 0, out[-6000:]
    assert "DatabaseUnavailableError" in out or "nothing accepts connections" in out
    assert tries(airflow, "eos_db_down") == {"load": ("success", 2)}
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT day, written_by_try FROM sales").fetchall() == [
            ("2024-01-01", 2)
        ]
        # the first try never reached the database: the second claimed and committed
        assert events(conn, "down/2024-01-01") == [("claimed", 2), ("committed", 2)]


def test_sensor_with_the_database_down_at_start_retries_and_passes(airflow, db, flaky):
    with Ledger(db) as ledger:
        ledger.run("ready/2024-01-01", lambda eos: {"ready": True})
    run, restored = run_while_down(airflow, "eos_sensor_db_down", db, flaky)
    out = run.stdout
    assert restored, "the first poke never reported the database unreachable: " + out[-4000:]
    assert run.returncode == 0, out[-6000:]
    assert tries(airflow, "eos_sensor_db_down") == {"wait": ("success", 2)}


@pytest.fixture(scope="module")
def password_server() -> Iterator[LocalServer]:
    server = LocalServer().init()
    hba = server.pgdata / "pg_hba.conf"
    hba.write_text("host all pw 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
    server.start()
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute("CREATE ROLE pw LOGIN PASSWORD 'right-password'")
    try:
        yield server
    finally:
        server.destroy()


def test_wrong_password_fails_at_once_without_retries(airflow, password_server):
    airflow.env["AIRFLOW_CONN_WRONG_PASSWORD"] = airflow_conn_json(
        f"postgresql://pw:wrong-password@127.0.0.1:{password_server.port}/postgres"
    )
    run = airflow.dags_test("eos_wrong_password")
    out = run.stdout + run.stderr
    assert run.returncode == 1, out[-4000:]
    assert tries(airflow, "eos_wrong_password") == {"load": ("failed", 1)}
    assert "cannot connect to Airflow connection 'wrong_password'" in out
    assert "password authentication failed for user" in out
    assert "the server refused the credentials: fix the password" in out
    assert "wrong-password" not in out and "right-password" not in out
    assert "a task that cannot connect never runs its function" not in out
