"""`@task.exactly_once` and `ExactlyOnceSQLOperator` under real Airflow (`airflow dags test`)."""

from __future__ import annotations

import psycopg
import pytest

from eos_airflow.failpoints import EXIT_CODE
from tests.conftest import events

pytestmark = pytest.mark.airflow


def query(dsn: str, sql: str, params=None) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, params).fetchall()


def test_retry_after_commit_skips_and_downstream_gets_stored_result(airflow, db):
    run = airflow.dags_test("eos_load", "2024-01-01", failpoints="after_commit@1=raise")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert query(db, "SELECT day, amount, written_by_try FROM sales") == [("2024-01-01", 100, 1)]
    assert query(db, "SELECT day, n FROM sql_sales") == [("2024-01-01", 2)]
    with psycopg.connect(db) as conn:
        assert events(conn, "sales/2024-01-01") == [
            ("claimed", 1),
            ("committed", 1),
            ("skipped", 2),
        ]
        assert events(conn, "sql_sales/2024-01-01") == [
            ("claimed", 1),
            ("committed", 1),
            ("skipped", 2),
        ]
    assert 'REPORT received {"day": "2024-01-01", "rows": 1, "written_by_try": 1}' in run.stdout
    assert "was committed already (version 1" in run.stdout
    row = query(
        db,
        "SELECT dag_id, task_id, map_index, state::text FROM eos.ledger "
        "WHERE key = 'sales/2024-01-01'",
    )
    assert row == [("eos_load", "load", -1, "committed")]


def test_process_killed_after_commit_then_new_run_of_same_partition(airflow, db):
    crashed = airflow.dags_test(
        "eos_load", "2024-01-01T00:00:00+00:00", failpoints="after_commit=exit"
    )
    assert crashed.returncode == EXIT_CODE, crashed.stdout[-3000:]
    assert query(db, "SELECT count(*) FROM sales") == [(1,)]
    # a second DAG run (another run_id) for the same day: the partition key is the same
    rerun = airflow.dags_test("eos_load", "2024-01-01T06:00:00+00:00")
    assert rerun.returncode == 0, rerun.stdout[-4000:]
    assert query(db, "SELECT count(*) FROM sales") == [(1,)]
    assert query(db, "SELECT count(*) FROM sql_sales") == [(1,)]
    with psycopg.connect(db) as conn:
        kinds = [e for e, _ in events(conn, "sales/2024-01-01")]
    assert kinds == ["claimed", "committed", "skipped"]
    runs = query(
        db,
        "SELECT detail->>'run_id' FROM eos.ledger_events "
        "WHERE key = 'sales/2024-01-01' ORDER BY seq",
    )
    assert runs[0] != runs[2]  # claimed by the first run, skipped by the second


def test_exception_after_writes_leaves_nothing_then_retry_writes_once(airflow, db):
    run = airflow.dags_test("eos_flaky")
    assert run.returncode == 0, run.stdout[-4000:]
    assert "upstream file truncated" in run.stdout
    assert query(db, "SELECT day, written_by_try FROM sales") == [("flaky", 2)]
    with psycopg.connect(db) as conn:
        assert events(conn) == [("claimed", 1), ("failed", 1), ("claimed", 2), ("committed", 2)]
    (key,) = query(db, "SELECT key FROM eos.ledger")[0]
    assert key.startswith("eos_flaky/load/manual__") and key.endswith("/-1")


def test_mapped_tasks_are_separate_effects(airflow, db):
    run = airflow.dags_test("eos_mapped", failpoints="after_commit@1=raise")
    assert run.returncode == 0, run.stdout[-4000:]
    rows = query(
        db,
        "SELECT map_index, state::text, version, result->>'region' "
        "FROM eos.ledger ORDER BY map_index",
    )
    assert rows == [
        (0, "committed", 1, "eu"),
        (1, "committed", 1, "us"),
        (2, "committed", 1, "apac"),
    ]
    assert query(db, "SELECT day FROM sales ORDER BY day") == [("apac",), ("eu",), ("us",)]
    assert query(db, "SELECT count(*) FROM eos.ledger_events WHERE event = 'skipped'") == [(3,)]


def test_bad_input_fails_clearly_without_retry_and_writes_nothing(airflow, db, empty_db):
    run = airflow.dags_test("eos_bad")
    assert run.returncode == 1
    out = run.stdout
    assert "Airflow connection 'no_such_connection' is not defined" in out
    assert "airflow connections add no_such_connection" in out
    assert "effect key template 'sales/{{ params.region }}' failed to render" in out
    assert "the result must be JSON" in out
    assert "Create the table (or fix its name)" in out
    assert 'ledger schema "eos" is missing or incomplete' in out
    assert "eos-airflow db migrate" in out
    # nothing reached the target tables, and no task was retried (one claim per failed task)
    assert query(db, "SELECT count(*) FROM sales") == [(0,)]
    assert query(db, "SELECT task_id, state::text, attempt FROM eos.ledger ORDER BY task_id") == [
        ("missing_table", "failed", 1),
        ("non_json_result", "failed", 1),
    ]
    with psycopg.connect(empty_db) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'eos'"
        ).fetchone() == (0,)


def test_run_without_logical_date_names_the_fix(airflow, db):
    run = airflow.python(
        "import sys; sys.path.insert(0, 'tests/airflow/dags');"
        "import eos_test_dags as m;"
        "print('RUN STATE', m.no_logical_date.test(logical_date=None).state)"
    )
    assert "this run has no logical date, so ds is undefined" in run.stdout + run.stderr
    assert "RUN STATE failed" in run.stdout
    assert query(db, "SELECT count(*) FROM sales") == [(0,)]
    assert query(db, "SELECT count(*) FROM eos.ledger") == [(0,)]
