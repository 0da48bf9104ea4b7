"""`--conn-id`: the ledger database from an Airflow connection (AIRFLOW_CONN_* here)."""

from __future__ import annotations

import json
import subprocess
import sys

import psycopg

from eos_airflow import Ledger
from eos_airflow.hooks.ledger import airflow_conn_json as airflow_conn


def run_cli(*args: str, env: dict[str, str], tmp_path) -> subprocess.CompletedProcess[str]:
    full_env = {"AIRFLOW_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", **env}
    return subprocess.run(
        [sys.executable, "-m", "eos_airflow.cli.main", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
    )


def test_conn_id_reads_the_airflow_connection_and_keeps_stdout_clean(db: str, tmp_path):
    with Ledger(db) as ledger:
        ledger.run("sales/2024-01-01", lambda eos: {"rows": 3})
    out = run_cli(
        "ledger",
        "list",
        "--conn-id",
        "warehouse",
        "--format",
        "json",
        env={"AIRFLOW_CONN_WAREHOUSE": airflow_conn(db)},
        tmp_path=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["key"], r["state"], r["result"]) for r in rows] == [
        ("sales/2024-01-01", "committed", {"rows": 3})
    ]


def test_conn_id_migrates_through_the_airflow_connection(empty_db: str, tmp_path):
    out = run_cli(
        "db",
        "migrate",
        "--conn-id",
        "warehouse",
        "--format",
        "json",
        env={"AIRFLOW_CONN_WAREHOUSE": airflow_conn(empty_db)},
        tmp_path=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["applied"][0] == "0001"
    with psycopg.connect(empty_db) as conn:
        assert conn.execute("SELECT count(*) FROM eos.schema_migrations").fetchone()[0] >= 1


def test_unknown_conn_id_says_how_to_create_it(tmp_path):
    out = run_cli("ledger", "verify", "--conn-id", "nope", env={}, tmp_path=tmp_path)
    assert out.returncode == 2
    assert "Airflow connection 'nope' is not defined" in out.stderr
    assert "airflow connections add nope" in out.stderr


def test_conn_id_takes_the_schema_from_airflows_configuration(empty_db: str, tmp_path):
    """With --conn-id and no --schema, the schema is ``[eos_airflow] ledger_schema``; a
    --schema given wins; a setting that is not a schema name is refused, naming it."""
    env = {
        "AIRFLOW_CONN_WAREHOUSE": airflow_conn(empty_db),
        "AIRFLOW__EOS_AIRFLOW__LEDGER_SCHEMA": "eos_cfg",
    }
    out = run_cli(
        "db", "migrate", "--conn-id", "warehouse", "--format", "json", env=env, tmp_path=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["schema"] == "eos_cfg"
    given = run_cli(
        "db",
        "migrate",
        "--conn-id",
        "warehouse",
        "--schema",
        "eos_given",
        "--format",
        "json",
        env=env,
        tmp_path=tmp_path,
    )
    assert given.returncode == 0, given.stderr
    with psycopg.connect(empty_db) as conn:
        schemas = conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'eos%' ORDER BY 1"
        ).fetchall()
    assert schemas == [("eos_cfg",), ("eos_given",)]
    bad = run_cli(
        "ledger",
        "list",
        "--conn-id",
        "warehouse",
        env={**env, "AIRFLOW__EOS_AIRFLOW__LEDGER_SCHEMA": "Bad-Name"},
        tmp_path=tmp_path,
    )
    assert bad.returncode == 2
    assert "[eos_airflow] ledger_schema = 'Bad-Name' is not valid" in bad.stderr
