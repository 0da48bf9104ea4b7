"""DAGs driven by tests/airflow/test_lineage.py: an INSERT ... SELECT, a transfer, an Iceberg and
a Delta load whose OpenLineage events name their tables and carry the ``eos`` run facet."""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import dag

from eos_airflow import (
    ExactlyOnceDeltaOperator,
    ExactlyOnceIcebergOperator,
    ExactlyOnceSQLOperator,
    ExactlyOnceTransferOperator,
)

START = pendulum.datetime(2026, 11, 1, tz="UTC")
LAKE = os.environ.get("EOS_TEST_LAKE", "file:///tmp/eos-test-lake")
DAY = "SELECT day, amount FROM lineage_orders WHERE day = %(day)s"


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
    ExactlyOnceTransferOperator(
        task_id="copy",
        source_conn_id="warehouse",
        sql=DAY,
        parameters={"day": "{{ ds }}"},
        target_conn_id="warehouse",
        table="lineage_copy",
        key="lineage/copy/{{ ds }}",
    )


@dag(schedule=None, start_date=START, catchup=False)
def eos_lineage_lake():
    ExactlyOnceIcebergOperator(
        task_id="iceberg",
        source_conn_id="warehouse",
        sql=DAY,
        parameters={"day": "{{ ds }}"},
        conn_id="lakehouse",
        table="lake.orders",
        warehouse=LAKE,
        key="lineage/iceberg/{{ ds }}",
    )
    ExactlyOnceDeltaOperator(
        task_id="delta",
        source_conn_id="warehouse",
        sql=DAY,
        parameters={"day": "{{ ds }}"},
        conn_id="lakehouse",
        table_uri=f"{LAKE}/delta_orders",
        key="lineage/delta/{{ ds }}",
    )


eos_lineage_sql()
eos_lineage_lake()
