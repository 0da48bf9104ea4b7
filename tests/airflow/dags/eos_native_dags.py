"""DAGs for Airflow-native behaviour: asset events once per committed version, and input
fingerprints meeting a changed task (tests/airflow/test_native.py)."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, dag, task

from eos_airflow import ExactlyOnceSQLOperator

ARGS = {"retries": 2, "retry_delay": timedelta(seconds=1)}
START = pendulum.datetime(2024, 1, 1, tz="UTC")
DAILY = Asset(name="sales_daily", uri="s3://warehouse/sales_daily")


@dag(schedule=None, start_date=START, catchup=False, default_args=ARGS)
def eos_assets():
    @task.exactly_once(conn_id="warehouse", key="assets/{{ ds }}", outlets=[DAILY])
    def load(eos, ds=None):
        eos.conn.execute("INSERT INTO sales VALUES (%s, 100, %s)", [ds, eos.attempt])
        return {"day": ds}

    load()


@dag(schedule=None, start_date=START, catchup=False, default_args=ARGS)
def eos_assets_replace():
    @task.exactly_once(
        conn_id="warehouse", key="assets/{{ ds }}", outlets=[DAILY], on_committed="replace"
    )
    def load(eos, ds=None):
        eos.conn.execute("DELETE FROM sales WHERE day = %s", [ds])
        eos.conn.execute("INSERT INTO sales VALUES (%s, 200, %s)", [ds, eos.attempt])
        return {"day": ds}

    load()


@dag(schedule=None, start_date=START, catchup=False, default_args=ARGS)
def eos_mismatch():
    """Each task keyed by the day; the amount comes from the run's conf: a second run with
    another amount meets the committed version made from the first."""
    for choice in ("warn", "fail", "replace"):
        ExactlyOnceSQLOperator(
            task_id=f"load_{choice}",
            conn_id="warehouse",
            sql=[
                "DELETE FROM sql_sales WHERE day = %(day)s",
                "INSERT INTO sql_sales VALUES (%(day)s, {{ dag_run.conf.get('amount', 1) | int }})",
            ],
            parameters={"day": choice},
            key="mismatch/" + choice + "/{{ ds }}",
            on_mismatch=choice,
        )


@dag(schedule=None, start_date=START, catchup=False, default_args=ARGS)
def eos_deferred():
    """Its key is held by another live run when it starts: it waits in the triggerer."""

    @task.exactly_once(conn_id="warehouse", key="held/{{ ds }}", deferrable=True, wait_timeout=1)
    def load(eos, ds=None):
        eos.conn.execute("INSERT INTO sales VALUES (%s, 1, %s)", [ds, eos.attempt])
        return {"by": "dag"}

    load()


eos_assets()
eos_assets_replace()
eos_mismatch()
eos_deferred()
