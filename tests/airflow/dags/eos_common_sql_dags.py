"""One DAG written for common.sql's SQLExecuteQueryOperator, built twice: as written, and
with the class name changed to ExactlyOnceSQLOperator (docs/usage.md, "Switching from
SQLExecuteQueryOperator")."""

from __future__ import annotations

import json
from datetime import timedelta

import pendulum
from airflow.providers.common.sql.hooks.handlers import fetch_all_handler
from airflow.providers.common.sql.operators.sql import SQLExecuteQueryOperator
from airflow.sdk import dag, task

from eos_airflow import ExactlyOnceSQLOperator

ARGS = {"retries": 2, "retry_delay": timedelta(seconds=1)}
START = pendulum.datetime(2024, 1, 1, tz="UTC")


def build(dag_id: str, operator: type, table: str, **eos_args) -> None:
    @dag(dag_id=dag_id, schedule=None, start_date=START, catchup=False, default_args=ARGS)
    def day_report():
        totals = operator(
            task_id="totals",
            conn_id="warehouse",
            sql="sql/day_totals.sql",
            params={"table": table},
            parameters={"day": "{{ ds }}"},
            split_statements=True,
            handler=fetch_all_handler,
            show_return_value_in_logs=True,
            **eos_args.get("totals", {}),
        )
        every = operator(
            task_id="every",
            conn_id="warehouse",
            sql="UPDATE {{ params.table }} SET n = n + 1 WHERE day = %(day)s; "
            "SELECT count(*) FROM {{ params.table }}; SELECT 'done' AS status",
            params={"table": table},
            parameters={"day": "{{ ds }}"},
            split_statements=True,
            return_last=False,
            handler=fetch_all_handler,
            **eos_args.get("every", {}),
        )

        @task
        def report(name, value):
            print(f"REPORT {name} " + json.dumps(value))

        report("totals", totals.output)
        report("every", every.output)
        totals >> every

    day_report()


build("sql_common", SQLExecuteQueryOperator, "plain_sales")
build(
    "eos_common_sql",
    ExactlyOnceSQLOperator,
    "sql_sales",
    totals={"key": "totals/{{ ds }}"},
    every={"key": "every/{{ ds }}"},
)
