"""DAGs driven by tests/airflow/test_retry_policy.py: eos-airflow's errors under Airflow's retry
policies (one retry allowed each)."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import ExceptionRetryPolicy, RetryAction, dag, task

from eos_airflow import ExactlyOnceSQLOperator

ARGS = {"retries": 1, "retry_delay": timedelta(seconds=1)}
START = pendulum.datetime(2024, 1, 1, tz="UTC")


@dag(schedule=None, start_date=START, catchup=False, default_args=ARGS)
def eos_retry_policy():
    @task.exactly_once(conn_id="warehouse", key="retry/permanent")
    def permanent(eos):
        eos.conn.execute("INSERT INTO sales VALUES ('permanent', 1, %s)", [eos.attempt])
        eos.conn.execute("INSERT INTO no_such_table VALUES (1)")

    @task.exactly_once(conn_id="warehouse", key="retry/retryable")
    def retryable(eos):
        eos.conn.execute("INSERT INTO sales VALUES ('retryable', 1, %s)", [eos.attempt])
        if eos.attempt == 1:  # the database refuses with a SQLSTATE another try can pass
            eos.conn.execute("DO $$ BEGIN RAISE EXCEPTION 'upstream batch not ready'; END $$")
        return eos.attempt

    # the user's own policy replaces eos-airflow's: this one retries everything
    @task.exactly_once(
        conn_id="warehouse",
        key="retry/overridden",
        retry_policy=ExceptionRetryPolicy(rules=[], default=RetryAction.RETRY),
    )
    def overridden(eos):
        eos.conn.execute("INSERT INTO sales VALUES ('overridden', 1, %s)", [eos.attempt])
        eos.conn.execute("INSERT INTO no_such_table VALUES (1)")

    @task.exactly_once(conn_id="warehouse")
    def permanent_mapped(region: str, eos=None):
        eos.conn.execute("INSERT INTO no_such_table VALUES (%s)", [region])

    permanent()
    retryable()
    overridden()
    permanent_mapped.expand(region=["eu", "us"])


@dag(
    schedule=None,
    start_date=START,
    catchup=False,
    default_args={"retries": 1, "retry_delay": timedelta(seconds=4)},
)
def eos_key_held():
    # the test holds the key "held" from another process: try 1 gives up after 1 s with the
    # retryable KeyInProgressError; the test lets go while the task waits for its retry
    ExactlyOnceSQLOperator(
        task_id="load",
        conn_id="warehouse",
        key="held",
        wait_timeout=1,
        sql="INSERT INTO sql_sales VALUES ('held', {{ ti.try_number }})",
    )


eos_retry_policy()
eos_key_held()
