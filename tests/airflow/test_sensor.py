"""LedgerSensor and LedgerTrigger under real Airflow: `airflow dags test` (triggers inline)."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime, timezone

import psycopg
import pytest

from eos_airflow import Ledger, LedgerTrigger
from tests.airflow.conftest import AIRFLOW

pytestmark = pytest.mark.airflow

KEYS = ["sales/2024-01-01", "sql_sales/2024-01-01"]


def test_trigger_serialize_round_trips():
    trigger = LedgerTrigger(
        conn_id="warehouse",
        keys=["a", "b"],
        prefix="p/",
        min_count=3,
        schema="audit",
        poll_interval=5.0,
        fail_on_failed=False,
        deadline=1700000000.5,
    )
    classpath, kwargs = trigger.serialize()
    assert classpath == "eos_airflow.triggers.ledger.LedgerTrigger"
    json.dumps(kwargs)  # stored by Airflow as JSON
    again = LedgerTrigger(**kwargs)
    assert again.serialize() == (classpath, kwargs)
    assert kwargs == {
        "conn_id": "warehouse",
        "keys": ["a", "b"],
        "prefix": "p/",
        "min_count": 3,
        "schema": "audit",
        "poll_interval": 5.0,
        "fail_on_failed": False,
        "deadline": 1700000000.5,
    }


def meta_dsn(airflow) -> str:
    return airflow.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].replace("+psycopg", "")


def task_states(airflow, dag_id: str) -> dict[str, str]:
    with psycopg.connect(meta_dsn(airflow)) as conn:
        return dict(
            conn.execute(
                "SELECT task_id, state FROM task_instance WHERE dag_id = %s", [dag_id]
            ).fetchall()
        )


def commit_keys(db: str) -> None:
    with Ledger(db) as ledger:
        for key in KEYS:
            ledger.run(key, lambda eos, key=key: {"key": key})


def dags_test_async(airflow, dag_id: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [AIRFLOW, "dags", "test", dag_id, "2024-01-01"],
        env=airflow.env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.parametrize("mode", ["deferrable"])  # poke/reschedule: the same first poke
def test_sensor_passes_when_the_keys_are_committed_before(airflow, db, mode):
    commit_keys(db)
    run = airflow.dags_test(f"eos_wait_{mode}")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    expected = {k: {"key": k} for k in KEYS}
    assert "REPORT received " + json.dumps(expected, sort_keys=True) in run.stdout
    if mode == "deferrable":
        assert "not deferring" in run.stdout


@pytest.mark.parametrize("mode", ["poke", "reschedule", "deferrable"])
def test_sensor_wakes_when_the_keys_commit_while_it_waits(airflow, db, mode):
    proc = dags_test_async(airflow, f"eos_wait_{mode}")
    try:

        def waiting() -> bool:
            if mode == "deferrable":  # the trigger registered its waiter rows
                with psycopg.connect(db) as conn:
                    return conn.execute("SELECT count(*) FROM eos.waiters").fetchone()[0] == 2
            return task_states(airflow, f"eos_wait_{mode}").get("wait") in (
                "running",
                "up_for_reschedule",
            )

        wait_until(waiting, 120, f"the {mode} sensor to wait")
        time.sleep(1.0)
        commit_keys(db)
        committed = datetime.now(timezone.utc)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-4000:]
    expected = {k: {"key": k} for k in KEYS}
    assert "REPORT received " + json.dumps(expected, sort_keys=True) in out
    with psycopg.connect(meta_dsn(airflow)) as conn:
        (end,) = conn.execute(
            "SELECT end_date FROM task_instance WHERE dag_id = %s AND task_id = 'wait'",
            [f"eos_wait_{mode}"],
        ).fetchone()
    delay = (end - committed).total_seconds()
    print(f"{mode}: commit -> sensor task finished {delay:.2f} s")
    if mode == "deferrable":
        assert "deferring" in out
        # woken by NOTIFY: its fallback poll is an hour away
        assert delay < 10


@pytest.mark.parametrize("mode", ["poke", "reschedule", "deferrable"])
def test_sensor_times_out_when_the_key_never_commits(airflow, db, mode):
    run = airflow.dags_test(f"eos_never_{mode}", timeout=240)
    states = task_states(airflow, f"eos_never_{mode}")
    assert states == {"times_out": "failed", "soft_fails": "skipped"}, run.stdout[-4000:]
    assert "AirflowSensorTimeout" in run.stdout
    with psycopg.connect(db) as conn:  # no waiter left behind
        assert conn.execute("SELECT count(*) FROM eos.waiters").fetchone() == (0,)


def test_failed_key_missing_connection_or_ledger_fail_without_retry_mapped_wait(airflow, db):
    with Ledger(db) as ledger:
        with pytest.raises(RuntimeError):
            ledger.run(
                "broken/2024-01-01", lambda eos: (_ for _ in ()).throw(RuntimeError("bad input"))
            )
        for i in range(3):
            ledger.run(f"eos_mapped/load/manual__x/{i}", lambda eos, i=i: {"region": i})
    run = airflow.dags_test("eos_wait_misc")
    out = run.stdout
    assert task_states(airflow, "eos_wait_misc") == {
        "wait": "failed",
        "no_connection": "failed",
        "no_ledger": "failed",
        "mapped": "success",
    }, out[-4000:]
    assert "effect 'broken/2024-01-01' failed (its last attempt rolled back)" in out
    assert "Airflow connection 'no_such_connection' is not defined" in out
    assert "eos-airflow db migrate" in out
    with psycopg.connect(meta_dsn(airflow)) as conn:  # permanent errors: one try each
        tries = dict(
            conn.execute(
                "SELECT task_id, try_number FROM task_instance WHERE dag_id = 'eos_wait_misc'"
            ).fetchall()
        )
    assert tries == {"wait": 1, "no_connection": 1, "no_ledger": 1, "mapped": 1}


def test_deferred_sensor_in_the_real_triggerer_process(airflow, db, tmp_path):
    """scheduler (LocalExecutor) + dag-processor + api-server + triggerer as processes: the
    sensor defers, the triggerer process waits, a commit wakes it, the task succeeds."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **airflow.env,
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API_AUTH__JWT_SECRET": "eos-test-secret",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
    }
    procs = []
    try:
        for command in (
            ["api-server", "--port", str(port)],
            ["scheduler"],
            ["dag-processor"],
            ["triggerer"],
        ):
            log = open(tmp_path / f"{command[0]}.log", "w")  # noqa: SIM115
            procs.append(
                subprocess.Popen([AIRFLOW, *command], env=env, stdout=log, stderr=subprocess.STDOUT)
            )

        def run(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [AIRFLOW, *argv], env=env, capture_output=True, text=True, timeout=120
            )

        wait_until(
            lambda: (
                run("dags", "list-import-errors").returncode == 0
                and "eos_wait_deferrable" in run("dags", "list").stdout
            ),
            180,
            "DAG parsed",
        )
        assert (
            run(
                "dags",
                "trigger",
                "eos_wait_deferrable",
                "--logical-date",
                "2024-01-01T00:00:00+00:00",
            ).returncode
            == 0
        )
        wait_until(
            lambda: task_states(airflow, "eos_wait_deferrable").get("wait") == "deferred",
            240,
            "the sensor to defer",
        )
        with psycopg.connect(db) as conn:
            wait_until(
                lambda: conn.execute("SELECT count(*) FROM eos.waiters").fetchone()[0] == 2,
                60,
                "the triggerer to register its waiters",
            )
        commit_keys(db)
        wait_until(
            lambda: (
                task_states(airflow, "eos_wait_deferrable")
                == {"wait": "success", "report": "success"}
            ),
            180,
            "the sensor and report to succeed",
        )
    except AssertionError:
        logs = "".join(
            (tmp_path / f"{c}.log").read_text()[-3000:] for c in ("triggerer", "scheduler")
        )
        raise AssertionError(logs) from None
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
