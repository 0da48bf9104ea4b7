"""``ExactlyOnceSQLOperator`` with common.sql's arguments (docs/usage.md, "Switching from
SQLExecuteQueryOperator"), through the programmatic path: ``Ledger.run`` of the operator's
effect against real PostgreSQL.

Results are compared with what common.sql's own ``PostgresHook.run`` (which
``SQLExecuteQueryOperator`` calls) returns for the same SQL and arguments, rows as lists.
"""

from __future__ import annotations

import psycopg
import pytest
from airflow.providers.common.sql.hooks.handlers import fetch_all_handler, fetch_one_handler

from eos_airflow import ExactlyOnceSQLOperator, Ledger
from eos_airflow.errors import ConfigurationError, ResultError
from eos_airflow.hooks.ledger import airflow_conn_json
from eos_airflow.operators.sql import storable
from tests.conftest import events

KEY = "report/2024-01-01"


def operator(**kwargs) -> ExactlyOnceSQLOperator:
    return ExactlyOnceSQLOperator(task_id="t", conn_id="warehouse", **kwargs)


def run(ledger: Ledger, op: ExactlyOnceSQLOperator, key: str = KEY):
    return ledger.run(key, op.effect(op.statements()))


@pytest.fixture
def sales(conn: psycopg.Connection) -> psycopg.Connection:
    conn.execute("CREATE TABLE sales (day text, amount int)")
    conn.execute("INSERT INTO sales VALUES ('2024-01-01', 100), ('2024-01-02', 50)")
    conn.execute("CREATE TABLE totals (day text, total int)")
    return conn


@pytest.fixture
def hook(db: str, monkeypatch: pytest.MonkeyPatch):
    """common.sql's Postgres hook on the same database: what SQLExecuteQueryOperator runs."""
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE", airflow_conn_json(db))
    return PostgresHook(postgres_conn_id="warehouse")


READS = [
    "SELECT day, amount FROM sales ORDER BY day",
    "SELECT day, amount FROM sales ORDER BY day; SELECT count(*) AS n FROM sales",
    "-- totals\nSELECT sum(amount) FROM sales;\n\n/* days */ SELECT count(*) FROM sales;",
    ["SELECT day FROM sales ORDER BY day", "SELECT sum(amount) FROM sales"],
    ["SELECT 1 AS one"],
]


@pytest.mark.parametrize("sql", READS)
def test_result_is_what_common_sql_returns(ledger, sales, hook, sql):
    for handler in (fetch_all_handler, fetch_one_handler):
        for return_last in (True, False):
            for split in (None, True, False):
                op = operator(
                    sql=sql, handler=handler, return_last=return_last, split_statements=split
                )
                extra = {} if split is None else {"split_statements": split}
                expected = hook.run(sql, handler=handler, return_last=return_last, **extra)
                key = f"r/{handler.__name__}/{return_last}/{split}"
                result = run(ledger, op, key=key)
                assert result == storable(expected), key
                assert result is not None
                assert run(ledger, op, key=key) == result  # the skip returns the stored one


def test_split_statements_run_in_order_in_one_transaction_and_skip_returns_same(ledger, sales):
    op = operator(
        sql="INSERT INTO totals SELECT day, sum(amount) FROM sales GROUP BY day;\n"
        "-- the report\n"
        "SELECT day, total FROM totals ORDER BY day;",
        handler=fetch_all_handler,
        split_statements=True,
    )
    first = run(ledger, op)
    assert first == [["2024-01-01", 100], ["2024-01-02", 50]]
    assert op.executed_statements == [
        "INSERT INTO totals SELECT day, sum(amount) FROM sales GROUP BY day;",
        "SELECT day, total FROM totals ORDER BY day;",
    ]
    again = run(ledger, op)
    assert again == first
    assert sales.execute("SELECT count(*) FROM totals").fetchone() == (2,)
    assert events(sales, KEY) == [("claimed", 1), ("committed", 1), ("skipped", 1)]
    stored = sales.execute("SELECT result FROM eos.ledger WHERE key = %s", [KEY]).fetchone()
    assert stored == ([["2024-01-01", 100], ["2024-01-02", 50]],)


def test_return_last_false_returns_every_statements_result(ledger, sales):
    op = operator(
        sql="INSERT INTO totals VALUES ('x', 1); SELECT count(*) FROM totals",
        handler=fetch_all_handler,
        split_statements=True,
        return_last=False,
    )
    assert run(ledger, op) == [None, [[1]]]


def test_without_handler_returns_rowcounts(ledger, sales):
    op = operator(
        sql=["INSERT INTO totals SELECT day, amount FROM sales", "DELETE FROM totals"],
        parameters=None,
    )
    assert run(ledger, op) == {"rowcounts": [2, 2]}


def test_parameters_bind_in_every_statement(ledger, sales):
    op = operator(
        sql="INSERT INTO totals VALUES (%(day)s, 1); "
        "SELECT day, total FROM totals WHERE day = %(day)s",
        parameters={"day": "2024-01-03"},
        handler=fetch_one_handler,
        split_statements=True,
    )
    assert run(ledger, op) == ["2024-01-03", 1]


def test_failing_statement_rolls_back_the_earlier_ones(ledger, sales):
    op = operator(
        sql="INSERT INTO totals VALUES ('x', 1); INSERT INTO no_such_table VALUES (1)",
        split_statements=True,
    )
    with pytest.raises(Exception, match="no_such_table"):
        run(ledger, op)
    assert sales.execute("SELECT count(*) FROM totals").fetchone() == (0,)
    assert events(sales, KEY) == [("claimed", 1), ("failed", 1)]


def test_result_that_is_not_json_fails_before_anything_is_written(ledger, sales):
    op = operator(
        sql="INSERT INTO totals VALUES ('x', 1); SELECT now() AS at",
        handler=fetch_one_handler,
        split_statements=True,
    )
    with pytest.raises(ResultError) as raised:
        run(ledger, op)
    message = str(raised.value)
    assert "fetch_one_handler" in message
    assert "result[0] (datetime)" in message
    assert "cast such columns in the SQL" in message
    assert sales.execute("SELECT count(*) FROM totals").fetchone() == (0,)
    assert sales.execute(
        "SELECT count(*) FROM eos.ledger WHERE state = 'committed'"
    ).fetchone() == (0,)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"handler": "fetch_all_handler"}, "handler must be a function taking the cursor"),
        ({"database": "other"}, "database='other' is not supported"),
        ({"autocommit": True}, "autocommit=True is not supported"),
        ({"hook_params": {"options": "-c x=1"}}, "hook_params 'options' not supported"),
        ({"sql": ""}, "sql must be a non-empty SQL string"),
    ],
)
def test_bad_arguments_fail_when_the_dag_is_parsed(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        operator(**{"sql": "SELECT 1", **kwargs})


def test_log_sql_false_is_accepted_and_changes_no_result(ledger, sales):
    op = operator(sql="SELECT 7", handler=fetch_one_handler, hook_params={"log_sql": False})
    assert run(ledger, op) == [7]


def test_fingerprint_of_an_operator_without_the_new_arguments_is_unchanged():
    plain = operator(sql="SELECT 1", parameters={"a": 1})
    assert set(plain.fingerprint_inputs({})) == {"operator", "sql", "parameters"}
    with_handler = operator(sql="SELECT 1", handler=fetch_all_handler, split_statements=True)
    inputs = with_handler.fingerprint_inputs({})
    assert inputs["handler"].endswith("handlers.fetch_all_handler")
    assert inputs["split_statements"] is True


def test_statements_split_as_common_sql_splits_them():
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    text = "-- header\nSELECT 1;\n/* two */ SELECT ';' AS semi;\n\n"
    split = operator(sql=text, split_statements=True).statements()
    assert split == PostgresHook.split_sql_string(text) == ["SELECT 1;", "SELECT ';' AS semi;"]
    assert operator(sql=text).statements() == [text]  # not split unless asked
    assert operator(sql="-- nothing to run", split_statements=True).statements() == []
    assert operator(sql=["SELECT 1; SELECT 2"], split_statements=True).statements() == [
        "SELECT 1; SELECT 2"
    ]  # list items are not split, as in common.sql
