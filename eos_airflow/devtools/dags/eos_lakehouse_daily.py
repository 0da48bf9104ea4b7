"""Daily orders into a lakehouse, exactly once: an Iceberg table and a Delta table.

``to_iceberg`` loads one day of ``orders`` into the Iceberg table ``lake.orders`` (catalog
``eos`` in the warehouse database, partitioned by ``order_date``); ``to_delta`` loads the same
day into a Delta table. Both are keyed by the day and use ``on_committed="replace"`` with
``mode="overwrite"`` and a filter for the run's day: a retry after a crash lands the day
once, and a re-run of the day replaces its partition (one new snapshot / Delta version,
the same rows) instead of adding it again.

Connection ``eos_warehouse``: the warehouse database, with the ledger created by
``eos-airflow db migrate --conn-id eos_warehouse`` and the table from ``SETUP_SQL``. The
lake is local files by default (param ``lake``, default ``$EOS_LAKE`` or
``file:///tmp/eos-lake``); for object storage set the connection's extra
``iceberg_warehouse``, ``iceberg_properties`` (e.g. ``{"s3.endpoint": ...}``) and
``delta_storage_options``, and ``lake`` to the ``s3://`` location.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag

from eos_airflow import ExactlyOnceDeltaOperator, ExactlyOnceIcebergOperator

SETUP_SQL = """
CREATE TABLE IF NOT EXISTS orders (
    id bigint PRIMARY KEY, customer text, amount numeric(12, 2),
    ordered_at timestamptz, order_date date, details jsonb
);
"""

DAY = """
SELECT id, customer, amount, ordered_at, order_date, details
FROM orders WHERE order_date = %(day)s
"""


@dag(
    schedule="@daily",
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=2)},
    params={"lake": Param(os.environ.get("EOS_LAKE", "file:///tmp/eos-lake"), type="string")},
    tags=["eos-airflow", "example", "lakehouse"],
)
def eos_lakehouse_daily():
    ExactlyOnceIcebergOperator(
        task_id="to_iceberg",
        source_conn_id="eos_warehouse",
        sql=DAY,
        parameters={"day": "{{ ds }}"},
        conn_id="eos_warehouse",
        table="lake.orders",
        warehouse="{{ params.lake }}/iceberg",
        partition_by="order_date",
        mode="overwrite",
        overwrite_filter="order_date = '{{ ds }}'",
        key="lakehouse/iceberg/orders/{{ ds }}",
        on_committed="replace",
    )
    ExactlyOnceDeltaOperator(
        task_id="to_delta",
        source_conn_id="eos_warehouse",
        sql=DAY,
        parameters={"day": "{{ ds }}"},
        conn_id="eos_warehouse",
        table_uri="{{ params.lake }}/delta/orders",
        partition_by="order_date",
        mode="overwrite",
        predicate="order_date = '{{ ds }}'",
        key="lakehouse/delta/orders/{{ ds }}",
        on_committed="replace",
    )


eos_lakehouse_daily()
