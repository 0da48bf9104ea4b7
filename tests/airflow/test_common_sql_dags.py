"""A DAG written for SQLExecuteQueryOperator runs exactly once after changing the class name
to ExactlyOnceSQLOperator, under real Airflow (`airflow dags test`)."""

from __future__ import annotations

import re

import psycopg
import pytest

from tests.conftest import events

pytestmark = pytest.mark.airflow


def query(dsn: str, sql: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql).fetchall()


def reports(stdout: str) -> dict[str, str]:
    return dict(re.findall(r"REPORT (\w+) (.*)", stdout))


def test_switched_dag_returns_what_common_sql_returns_and_skips_on_rerun(airflow, db):
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("CREATE TABLE plain_sales (day text, n int)")
    plain = airflow.dags_test("sql_common", "2024-01-01")
    assert plain.returncode == 0, plain.stdout[-4000:] + plain.stderr[-2000:]
    expected = reports(plain.stdout)
    assert expected == {
        "totals": '[["2024-01-01", 1]]',
        "every": '[null, [[1]], [["done"]]]',
    }

    first = airflow.dags_test("eos_common_sql", "2024-01-01")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    assert reports(first.stdout) == expected
    assert "Operator output is: [['2024-01-01', 1]]" in first.stdout
    assert query(db, "SELECT day, n FROM sql_sales") == [("2024-01-01", 2)]

    # another run of the same day: both effects skip and return the stored results
    second = airflow.dags_test("eos_common_sql", "2024-01-01T06:00:00+00:00")
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-2000:]
    assert reports(second.stdout) == expected
    assert second.stdout.count("was committed already (version 1") == 2
    assert "Operator output is: [['2024-01-01', 1]]" in second.stdout
    assert query(db, "SELECT day, n FROM sql_sales") == [("2024-01-01", 2)]
    with psycopg.connect(db) as conn:
        for key in ("totals/2024-01-01", "every/2024-01-01"):
            assert events(conn, key) == [("claimed", 1), ("committed", 1), ("skipped", 1)]
        stored = conn.execute("SELECT key, result FROM eos.ledger ORDER BY key").fetchall()
    assert stored == [
        ("every/2024-01-01", [None, [[1]], [["done"]]]),
        ("totals/2024-01-01", [["2024-01-01", 1]]),
    ]
