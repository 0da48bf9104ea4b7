"""DAGs driven by tests/airflow: each exercises one promise of @task.exactly_once."""

from __future__ import annotations

import json
from datetime import timedelta

import pendulum
from airflow.sdk import dag, task

from eos_airflow import ExactlyOnceSQLOperator

ARGS = {"retries": 2, "retry_delay": timedelta(seconds=1)}
START = pendulum.datetime(2024, 1, 1, tz="UTC")


@dag(schedule=None, start_date=START, catchup=False, default_args=ARGS)
def eos_load():
    @task.exactly_once(conn_id="warehouse", key="sales/{{ ds }}")
    def load(eos, ds=None):
        eos.conn.execute("INSERT INTO sales VALUES (%s, 100, %s)", [ds, eos.attempt])
        return {"day": ds, "rows": 1, "written_by_try": eos.attempt}

    @task
    def report(loaded):
        print("REPORT received " + json.dumps(loaded, sort_keys=True))

    sql_load = ExactlyOnceSQLOperator(
        task_id="sql_load",
        conn_id="warehouse",
        sql=["INSERT INTO sql_sales VALUES (%(day)s, 1)", "UPDATE sql_sales SET n = n + 1"],
        parameters={"day": "{{ ds }}"},
        key="sql_sales/{{ ds }}",
    )
    report(load()) >> sql_load


@dag(schedule=None, start_date=START, catchup=False, default_args=ARGS)
def eos_flaky():
    @task.exactly_once(conn_id="warehouse")
    def load(eos):
        eos.conn.execute("INSERT INTO sales VALUES ('flaky', 1, %s)", [eos.attempt])
        if eos.attempt == 1:
            raise RuntimeError("upstream file truncated")
        return {"try": eos.attempt}

    load()


@dag(schedule=None, start_date=START, catchup=False, default_args=ARGS)
def eos_mapped():
    @task.exactly_once(conn_id="warehouse")
    def load(region: str, eos=None):
        eos.conn.execute("INSERT INTO sales VALUES (%s, 1, %s)", [region, eos.attempt])
        return {"region": region, "key": eos.key}

    load.expand(region=["eu", "us", "apac"])


@dag(schedule=None, start_date=START, catchup=False, default_args=ARGS)
def eos_bad():
    @task.exactly_once(conn_id="no_such_connection")
    def unknown_connection(eos):
        eos.conn.execute("INSERT INTO sales VALUES ('unknown_connection', 1, 1)")

    @task.exactly_once(conn_id="warehouse", key="sales/{{ params.region }}")
    def bad_key_template(eos):
        eos.conn.execute("INSERT INTO sales VALUES ('bad_key_template', 1, 1)")

    @task.exactly_once(conn_id="warehouse")
    def non_json_result(eos):
        eos.conn.execute("INSERT INTO sales VALUES ('non_json_result', 1, 1)")
        return {"at": pendulum.now()}

    @task.exactly_once(conn_id="warehouse")
    def missing_table(eos):
        eos.conn.execute("INSERT INTO sales VALUES ('missing_table', 1, 1)")
        eos.conn.execute("INSERT INTO no_such_table VALUES (1)")

    @task.exactly_once(conn_id="no_ledger")
    def missing_ledger_schema(eos):
        eos.conn.execute("SELECT 1")

    [
        unknown_connection(),
        bad_key_template(),
        non_json_result(),
        missing_table(),
        missing_ledger_schema(),
    ]


@dag(schedule=None, start_date=START, catchup=False, default_args=ARGS)
def eos_no_logical_date():
    @task.exactly_once(conn_id="warehouse", key="sales/{{ ds }}")
    def load(eos):
        eos.conn.execute("INSERT INTO sales VALUES ('no_logical_date', 1, 1)")

    load()


eos_load()
eos_flaky()
eos_mapped()
eos_bad()
no_logical_date = eos_no_logical_date()
