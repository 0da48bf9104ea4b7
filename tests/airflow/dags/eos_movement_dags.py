"""DAGs driven by tests/airflow/test_movement_dags.py: transfers, chunked loads with recovery
points, incremental copies, and their bad inputs, in one DAG run."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag

from eos_airflow import ExactlyOnceTransferOperator, IncrementalTableOperator

START = pendulum.datetime(2024, 1, 1, tz="UTC")
ARGS = {"retries": 1, "retry_delay": timedelta(seconds=1)}


@dag(schedule=None, start_date=START, catchup=False, default_args=ARGS)
def eos_movement():
    # bad inputs: each fails at once (no retry) and writes nothing
    unknown = ExactlyOnceTransferOperator(
        task_id="unknown_source",
        source_conn_id="no_such_source",
        target_conn_id="warehouse",
        sql="SELECT 1",
        table="move_dst",
    )
    missing = ExactlyOnceTransferOperator(
        task_id="missing_table",
        source_conn_id="warehouse",
        target_conn_id="warehouse",
        sql="SELECT id, payload FROM move_src",
        table="public.no_such_table",
    )
    bad_sql = ExactlyOnceTransferOperator(
        task_id="bad_sql",
        source_conn_id="warehouse",
        target_conn_id="warehouse",
        sql="SELECT id, payload FROM move_src WHERE",
        table="move_dst",
    )
    # the daily partition, replaced atomically on every run of the day
    replace_day = ExactlyOnceTransferOperator(
        task_id="replace_day",
        source_conn_id="warehouse",
        target_conn_id="warehouse",
        sql="SELECT day, count(*) FROM move_src WHERE day = %(day)s GROUP BY day",
        parameters={"day": "{{ ds }}"},
        table="move_daily",
        mode="replace",
        replace_where="day = %(day)s",
        key="move_daily/{{ ds }}",
        on_committed="replace",
        trigger_rule="all_done",
    )
    incremental = IncrementalTableOperator(
        task_id="incremental",
        source_conn_id="warehouse",
        source_table="readings",
        column="id",
        target_conn_id="warehouse",
        target_table="readings_copy",
    )
    # a long load in chunks: killed mid-load by an exit failpoint, resumed by the next try
    load = ExactlyOnceTransferOperator(
        task_id="load_chunked",
        source_conn_id="warehouse",
        target_conn_id="warehouse",
        sql="SELECT id, payload FROM move_src ORDER BY id",
        table="move_dst",
        chunk_rows=1000,
        key="move/{{ ds }}",
    )
    [unknown, missing, bad_sql] >> replace_day >> incremental >> load


eos_movement()
