"""Real Airflow for the tests: a metadata database, AIRFLOW_HOME, and `airflow dags test`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from eos_airflow.hooks.ledger import airflow_conn_json as airflow_conn
from eos_airflow.hooks.ledger import sqlalchemy_url
from tests.conftest import create_database, drop_database

DAGS = Path(__file__).parent / "dags"
AIRFLOW = str(Path(sys.executable).parent / "airflow")

pytestmark = pytest.mark.airflow


@pytest.fixture(scope="session")
def airflow_base(pg_admin_dsn: str, tmp_path_factory) -> Iterator[dict[str, str]]:
    """A migrated Airflow metadata database (template) and the environment to run Airflow."""
    home = tmp_path_factory.mktemp("airflow_home")
    name = f"eos_af_tpl_{uuid.uuid4().hex[:8]}"
    meta = create_database(pg_admin_dsn, name)
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": sqlalchemy_url(meta),
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    env.pop("EOS_FAILPOINTS", None)
    done = subprocess.run(
        [AIRFLOW, "db", "migrate"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    yield {"env": env, "template": name}
    drop_database(pg_admin_dsn, name)


class AirflowRunner:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.meta: str | None = None

    def dags_test(
        self,
        dag_id: str,
        logical_date: str = "2024-01-01",
        *,
        failpoints: str | None = None,
        timeout: float = 300,
        conf: dict[str, Any] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        env = dict(self.env)
        if failpoints:
            env["EOS_FAILPOINTS"] = failpoints
        extra = ["--conf", json.dumps(conf)] if conf is not None else []
        return subprocess.run(
            [AIRFLOW, "dags", "test", dag_id, logical_date, *extra],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def python(self, code: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", code],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture
def airflow(airflow_base, pg_admin_dsn: str, db: str, empty_db: str) -> Iterator[AirflowRunner]:
    """Airflow with a fresh metadata database and connections ``warehouse`` (``db``, with
    the ledger and tables sales/sql_sales) and ``no_ledger`` (``empty_db``)."""
    name = f"eos_af_{uuid.uuid4().hex[:8]}"
    meta = create_database(pg_admin_dsn, name, template=airflow_base["template"])
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("CREATE TABLE sales (day text, amount int, written_by_try int)")
        conn.execute("CREATE TABLE sql_sales (day text, n int)")
    env = {
        **airflow_base["env"],
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": sqlalchemy_url(meta),
        "AIRFLOW_CONN_WAREHOUSE": airflow_conn(db),
        "AIRFLOW_CONN_NO_LEDGER": airflow_conn(empty_db),
    }
    runner = AirflowRunner(env)
    runner.meta = meta  # the metadata database (asset events, task instances)
    yield runner
    drop_database(pg_admin_dsn, name)
