"""DAGs driven by tests/airflow/test_lineage.py: an INSERT ... SELECT and an Iceberg load whose
OpenLineage events name their tables and carry the ``eos`` run facet."""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import dag

from eos_airflow import ExactlyOnceIcebergOperator, ExactlyOnceSQLOperator

START = pendulum.datetime(2026, 11, 1, tz="UTC")


@dag(schedule=None, start_date=START, catchup=False)
def eos_lineage_sql():
    ExactlyOnceSQLOperator(
        task_id="summarize",
        conn_id="warehouse",
        sql=(
            "INSERT INTO lineage_totals (day, total) "
            "SELECT day, sum(amount) FROM lineage_orders WHERE day = %(day)s GROUP BY day"
        ),
        parameters={"day": "{{ ds }}"},
        key="lineage/totals/{{ ds }}",
    )


@dag(schedule=None, start_date=START, catchup=False)
def eos_lineage_iceberg():
    ExactlyOnceIcebergOperator(
        task_id="load",
        source_conn_id="warehouse",
        sql="SELECT day, amount FROM lineage_orders WHERE day = %(day)s",
        parameters={"day": "{{ ds }}"},
        conn_id="lakehouse",
        table="lake.orders",
        warehouse=os.environ.get("EOS_TEST_LAKE", "file:///tmp/eos-test-lake"),
        key="lineage/iceberg/{{ ds }}",
    )


eos_lineage_sql()
eos_lineage_iceberg()
