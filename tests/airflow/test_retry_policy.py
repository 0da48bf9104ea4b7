"""EosRetryPolicy: eos-airflow's permanent errors fail a task at once, its retryable ones are
retried — decided by Airflow's retry-policy mechanism in the task runner (`airflow dags test`),
not by AirflowFailException."""

from __future__ import annotations

import subprocess
import threading
import time

import psycopg
import pytest

from eos_airflow import Ledger
from eos_airflow.errors import (
    ConfigurationError,
    FencedError,
    KeyInProgressError,
    LakehouseStorageError,
    UserCodeError,
)
from eos_airflow.operators.retry import EosRetryPolicy
from tests.airflow.conftest import AIRFLOW
from tests.conftest import events

pytestmark = pytest.mark.airflow


def query(dsn: str, sql: str, params=None) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, params).fetchall()


def meta_dsn(airflow) -> str:
    return airflow.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].replace("+psycopg", "")


def tries(airflow, dag_id: str) -> dict[str, tuple[str, int]]:
    """task_id (with ``[map_index]`` when mapped) → (state, try_number) in Airflow's metadata
    database."""
    rows = query(
        meta_dsn(airflow),
        "SELECT task_id, map_index, state, try_number FROM task_instance WHERE dag_id = %s",
        [dag_id],
    )
    return {task if index < 0 else f"{task}[{index}]": (state, n) for task, index, state, n in rows}


@pytest.mark.parametrize(
    ("error", "action"),
    [
        (FencedError("fenced"), "fail"),
        (ConfigurationError("unknown connection"), "fail"),
        (UserCodeError("missing table", sqlstate="42P01"), "fail"),
        (KeyInProgressError("held"), "retry"),
        (LakehouseStorageError("no answer"), "retry"),
        (UserCodeError("raised by a function", sqlstate="P0001"), "retry"),
        (ValueError("the user's own"), "default"),
    ],
)
def test_the_policy_follows_each_errors_retryability(error, action):
    decision = EosRetryPolicy().evaluate(error, try_number=1, max_tries=3)
    assert decision.action.value == action
    assert decision.retry_delay is None  # the task's retry_delay applies
    if action != "default":
        assert type(error).__name__ in decision.reason and str(error) in decision.reason


def test_other_exceptions_go_to_the_fallback_and_the_policy_round_trips():
    from airflow.sdk import ExceptionRetryPolicy, RetryAction, RetryRule

    fallback = ExceptionRetryPolicy(
        rules=[RetryRule(exception=ValueError, action=RetryAction.FAIL)]
    )
    policy = EosRetryPolicy(fallback=fallback)
    assert policy.evaluate(ValueError("x"), 1, 3).action == RetryAction.FAIL
    assert policy.evaluate(KeyError("x"), 1, 3).action == RetryAction.DEFAULT
    assert policy.evaluate(KeyInProgressError("x"), 1, 3).action == RetryAction.RETRY
    again = EosRetryPolicy.deserialize(policy.serialize())
    assert again.serialize() == policy.serialize()
    assert again.evaluate(ValueError("x"), 1, 3).action == RetryAction.FAIL


def test_permanent_fails_at_once_retryable_is_retried_and_a_users_policy_wins(airflow, db):
    run = airflow.dags_test("eos_retry_policy")
    out = run.stdout + run.stderr
    assert run.returncode == 1, out[-4000:]
    assert tries(airflow, "eos_retry_policy") == {
        "permanent": ("failed", 1),  # retries=1, but a missing table is permanent
        "retryable": ("success", 2),
        "overridden": ("failed", 2),  # the user's policy retried the same error
        "permanent_mapped[0]": ("failed", 1),  # each mapped task instance has the policy
        "permanent_mapped[1]": ("failed", 1),
    }
    with psycopg.connect(db) as conn:
        assert events(conn, "retry/permanent") == [("claimed", 1), ("failed", 1)]
        assert events(conn, "retry/retryable") == [
            ("claimed", 1),
            ("failed", 1),
            ("claimed", 2),
            ("committed", 2),
        ]
    assert query(db, "SELECT day, written_by_try FROM sales") == [("retryable", 2)]
    # the decisions and their reasons are in the task log, and no AirflowFailException
    assert "Retry policy decision" in out
    assert "eos-airflow: permanent error, not retried" in out
    assert "UserCodeError: effect 'retry/permanent' attempt 1" in out
    assert "eos-airflow: retryable error, retried while the task has tries left" in out
    assert "AirflowFailException" not in out
    # the retry's reason is kept on the task instance
    (reason,) = query(
        meta_dsn(airflow),
        "SELECT retry_reason FROM task_instance_history WHERE dag_id = 'eos_retry_policy' "
        "AND task_id = 'retryable'",
    )[0]
    assert reason.startswith("eos-airflow: retryable error") and "UserCodeError" in reason


def test_key_held_by_another_run_is_retried_and_the_retry_commits(airflow, db):
    """KeyInProgressError (another live run holds the key past wait_timeout) is retried;
    the holder lets go while the task waits for its retry, and the retry commits."""
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        def block(eos):
            holding.set()
            release.wait(120)
            raise RuntimeError("the holder gives up")

        with Ledger(db) as ledger, pytest.raises(RuntimeError):
            ledger.run("held", block)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(30)
        proc = subprocess.Popen(
            [AIRFLOW, "dags", "test", "eos_key_held", "2024-01-01"],
            env=airflow.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 120
        while tries(airflow, "eos_key_held").get("load", ("", 0))[0] != "up_for_retry":
            assert proc.poll() is None and time.monotonic() < deadline, "no retry scheduled"
            time.sleep(0.1)
        release.set()
        out, _ = proc.communicate(timeout=180)
    finally:
        release.set()
        holder.join(30)
    assert proc.returncode == 0, out[-4000:]
    assert "KeyInProgressError" in out
    assert "eos-airflow: retryable error, retried while the task has tries left" in out
    assert tries(airflow, "eos_key_held") == {"load": ("success", 2)}
    assert query(db, "SELECT day, n FROM sql_sales") == [("held", 2)]
    with psycopg.connect(db) as conn:
        assert events(conn, "held") == [
            ("claimed", 1),
            ("failed", 1),
            ("claimed", 2),
            ("committed", 2),
        ]
