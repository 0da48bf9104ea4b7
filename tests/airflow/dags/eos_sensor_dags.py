"""DAGs gated by LedgerSensor, driven by tests/airflow/test_sensor.py."""

from __future__ import annotations

import json
from datetime import timedelta

import pendulum
from airflow.sdk import dag, task

from eos_airflow import LedgerSensor

START = pendulum.datetime(2024, 1, 1, tz="UTC")
#: So long that a deferred sensor is woken by NOTIFY, never by its fallback poll, in a test.
NO_POLL = 3600.0

MODES = {
    "poke": {"mode": "poke", "poke_interval": 0.5},
    "reschedule": {"mode": "reschedule", "poke_interval": 1},
    "deferrable": {"deferrable": True, "trigger_poll_interval": NO_POLL},
}


def gated(mode: str):
    @dag(
        dag_id=f"eos_wait_{mode}",
        schedule=None,
        start_date=START,
        catchup=False,
        default_args={"retries": 2, "retry_delay": timedelta(seconds=1)},
    )
    def consumer():
        wait = LedgerSensor(
            task_id="wait",
            conn_id="warehouse",
            key=["sales/{{ ds }}", "sql_sales/{{ ds }}"],
            timeout=120,
            **MODES[mode],
        )

        @task
        def report(results):
            print("REPORT received " + json.dumps(results, sort_keys=True))

        report(wait.output)

    return consumer()


def never(mode: str):
    @dag(
        dag_id=f"eos_never_{mode}",
        schedule=None,
        start_date=START,
        catchup=False,
        default_args={"retries": 2, "retry_delay": timedelta(seconds=1)},
    )
    def consumer():
        LedgerSensor(
            task_id="times_out", conn_id="warehouse", key="never/{{ ds }}", timeout=3, **MODES[mode]
        )
        LedgerSensor(
            task_id="soft_fails",
            conn_id="warehouse",
            key="never/{{ ds }}",
            timeout=3,
            soft_fail=True,
            **MODES[mode],
        )

    return consumer()


@dag(schedule=None, start_date=START, catchup=False, default_args={"retries": 2})
def eos_wait_misc():
    LedgerSensor(
        task_id="wait", conn_id="warehouse", key="broken/{{ ds }}", timeout=60, poke_interval=0.5
    )
    LedgerSensor(task_id="no_connection", conn_id="no_such_connection", key="x", timeout=60)
    LedgerSensor(task_id="no_ledger", conn_id="no_ledger", key="x", timeout=60)
    LedgerSensor(
        task_id="mapped",
        conn_id="warehouse",
        wait_for_task=("eos_mapped", "load"),
        wait_for_run_id="manual__x",
        min_count=3,
        timeout=60,
        deferrable=True,
    )


for _mode in MODES:
    gated(_mode)
    never(_mode)
eos_wait_misc()
