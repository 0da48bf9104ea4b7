"""DAGs of tests/airflow/test_connect_failures.py: a database that is down when the task
starts (connection ``flaky_db``), and one whose password is wrong (``wrong_password``)."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag, task

from eos_airflow import LedgerSensor

#: The retry delay leaves the test time to bring the database back after the first try.
ARGS = {"retries": 2, "retry_delay": timedelta(seconds=3)}
START = pendulum.datetime(2024, 1, 1, tz="UTC")


@dag(schedule=None, start_date=START, catchup=False, default_args=ARGS)
def eos_db_down():
    @task.exactly_once(conn_id="flaky_db", key="down/{{ ds }}")
    def load(eos, ds=None):
        eos.conn.execute("INSERT INTO sales VALUES (%s, 1, %s)", [ds, eos.attempt])
        return {"day": ds, "written_by_try": eos.attempt}

    load()


@dag(schedule=None, start_date=START, catchup=False, default_args=ARGS)
def eos_sensor_db_down():
    LedgerSensor(
        task_id="wait",
        conn_id="flaky_db",
        key="ready/{{ ds }}",
        mode="poke",
        poke_interval=1,
        timeout=60,
    )


@dag(schedule=None, start_date=START, catchup=False, default_args=ARGS)
def eos_wrong_password():
    @task.exactly_once(conn_id="wrong_password", key="never/{{ ds }}")
    def load(eos):
        raise AssertionError("a task that cannot connect never runs its function")

    load()


eos_db_down()
eos_sensor_db_down()
eos_wrong_password()
