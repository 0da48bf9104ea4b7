"""DAGs driven by tests/airflow/test_lakehouse_dags.py: a day's orders loaded into an Iceberg
and a Delta table (append, and replace of the day), with the lake under ``EOS_TEST_LAKE``."""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import dag

from eos_airflow import ExactlyOnceDeltaOperator, ExactlyOnceIcebergOperator

START = pendulum.datetime(2026, 11, 1, tz="UTC")
ARGS = {"retries": 1, "retry_delay": timedelta(seconds=1)}
LAKE = os.environ.get("EOS_TEST_LAKE", "file:///tmp/eos-test-lake")
DAY = "SELECT id, customer, amount, ordered_at, order_date, note FROM orders WHERE order_date = %(day)s"


@dag(schedule=None, start_date=START, catchup=False, default_args=ARGS)
def eos_lake_iceberg():
    ExactlyOnceIcebergOperator(
        task_id="load",
        source_conn_id="warehouse",
        sql=DAY,
        parameters={"day": "{{ ds }}"},
        conn_id="lakehouse",  # its extra names the warehouse
        table="lake.orders",
        partition_by="order_date",
        key="lake/iceberg/{{ ds }}",
        batch_rows=40,
    )


@dag(schedule=None, start_date=START, catchup=False, default_args=ARGS)
def eos_lake_iceberg_replace():
    ExactlyOnceIcebergOperator(
        task_id="load",
        source_conn_id="warehouse",
        sql=DAY,
        parameters={"day": "{{ ds }}"},
        conn_id="lakehouse",
        table="lake.orders_daily",
        mode="overwrite",
        overwrite_filter="order_date = '{{ ds }}'",
        partition_by="order_date",
        key="lake/iceberg-replace/{{ ds }}",
        on_committed="replace",
    )


@dag(schedule=None, start_date=START, catchup=False, default_args=ARGS)
def eos_lake_delta():
    ExactlyOnceDeltaOperator(
        task_id="load",
        source_conn_id="warehouse",
        sql=DAY,
        parameters={"day": "{{ ds }}"},
        conn_id="lakehouse",
        table_uri=f"{LAKE}/delta_orders",
        partition_by="order_date",
        key="lake/delta/{{ ds }}",
        batch_rows=40,
    )


@dag(schedule=None, start_date=START, catchup=False, default_args=ARGS)
def eos_lake_delta_replace():
    ExactlyOnceDeltaOperator(
        task_id="load",
        source_conn_id="warehouse",
        sql=DAY,
        parameters={"day": "{{ ds }}"},
        conn_id="lakehouse",
        table_uri=f"{LAKE}/delta_daily",
        mode="overwrite",
        predicate="order_date = '{{ ds }}'",
        key="lake/delta-replace/{{ ds }}",
        on_committed="replace",
    )


eos_lake_iceberg()
eos_lake_iceberg_replace()
eos_lake_delta()
eos_lake_delta_replace()
