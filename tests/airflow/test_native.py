"""Airflow-native behaviour under real Airflow (`airflow dags test`): asset events once per
committed version, and input fingerprints meeting a changed task (docs/usage.md)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psycopg
import pytest

from tests.airflow.conftest import AIRFLOW
from tests.conftest import ROOT, events

pytestmark = pytest.mark.airflow


def query(dsn: str, sql: str, params=None) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, params).fetchall()


def asset_events(meta: str, name: str) -> list[dict]:
    return [
        extra
        for (extra,) in query(
            meta,
            "SELECT e.extra FROM asset_event AS e JOIN asset AS a ON a.id = e.asset_id "
            "WHERE a.name = %s ORDER BY e.id",
            [name],
        )
    ]


def test_asset_events_once_per_committed_version(airflow, db):
    key = "assets/2024-01-01"
    # (a) try 1 commits, then fails; its retry skips and reports version 1
    first = airflow.dags_test("eos_assets", "2024-01-01", failpoints="after_commit@1=raise")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    # (b) another run for the same day skips: nothing to report
    again = airflow.dags_test("eos_assets", "2024-01-01T06:00:00+00:00")
    assert again.returncode == 0, again.stdout[-4000:]
    assert "was reported before: no asset events" in again.stdout
    # (c) a replace writes version 2 and reports it
    replaced = airflow.dags_test("eos_assets_replace", "2024-01-01")
    assert replaced.returncode == 0, replaced.stdout[-4000:]

    found = asset_events(airflow.meta, "sales_daily")
    assert [e["eos"] for e in found] == [
        {"key": key, "version": 1, "action": "committed"},
        {"key": key, "version": 2, "action": "replaced"},
    ]
    assert query(db, "SELECT day, amount FROM sales") == [("2024-01-01", 200)]
    with psycopg.connect(db) as conn:
        assert [e for e, _ in events(conn, key)] == [
            "claimed",
            "committed",
            "skipped",
            "announced",
            "skipped",
            "claimed",
            "replaced",
            "announced",
        ]
        (announced,) = conn.execute(
            "SELECT detail FROM eos.ledger_events WHERE key = %s AND event = 'announced' "
            "ORDER BY seq LIMIT 1",
            [key],
        ).fetchone()
    assert announced["assets"] == ["s3://warehouse/sales_daily"]
    runs = query(airflow.meta, "SELECT run_id FROM dag_run WHERE dag_id = 'eos_assets' ORDER BY id")
    assert announced["run_id"] == runs[0][0]


def test_the_events_name_the_dag_version_and_bundle_that_ran(airflow, db):
    run = airflow.dags_test("eos_assets", "2024-01-01")
    assert run.returncode == 0, run.stdout[-4000:]
    claimed, committed = query(
        db,
        "SELECT detail FROM eos.ledger_events WHERE key = 'assets/2024-01-01' "
        "AND event IN ('claimed', 'committed') ORDER BY seq",
    )
    versions = query(airflow.meta, "SELECT id::text FROM dag_version WHERE dag_id = 'eos_assets'")
    for (detail,) in (claimed, committed):
        assert (detail["dag_version_id"],) in versions
        # `dags test` runs the tasks in its own process, without a DAG bundle; a worker
        # records bundle_name and bundle_version too (tests/airflow/test_e2e_stack.py)
        assert detail.get("bundle_name") in (None, "dags-folder")


def test_a_changed_task_meets_its_committed_version_as_on_mismatch_says(airflow, db):
    first = airflow.dags_test("eos_mismatch", "2024-01-01", conf={"amount": 1})
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    second = airflow.dags_test("eos_mismatch", "2024-01-01T06:00:00+00:00", conf={"amount": 2})
    out = second.stdout + second.stderr
    assert "FingerprintMismatchError" in out
    assert "was committed from other inputs" in out
    # warn: kept and skipped; fail: refused, kept; replace: the new amount
    assert dict(query(db, "SELECT day, n FROM sql_sales")) == {
        "warn": 1,
        "fail": 1,
        "replace": 2,
    }
    with psycopg.connect(db) as conn:
        kinds = {
            c: [e for e, _ in events(conn, f"mismatch/{c}/2024-01-01")]
            for c in ("warn", "fail", "replace")
        }
    assert kinds["warn"] == ["claimed", "committed", "skipped", "mismatch"]
    # fail is permanent: one try, no retry
    assert kinds["fail"] == ["claimed", "committed", "skipped", "mismatch"]
    assert kinds["replace"] == [
        "claimed",
        "committed",
        "skipped",
        "mismatch",
        "claimed",
        "replaced",
    ]
    states = dict(
        query(
            airflow.meta,
            "SELECT task_id, state FROM task_instance WHERE dag_id = 'eos_mismatch' "
            "AND run_id = (SELECT run_id FROM dag_run WHERE dag_id = 'eos_mismatch' "
            "ORDER BY id DESC LIMIT 1)",
        )
    )
    assert states == {"load_warn": "success", "load_fail": "failed", "load_replace": "success"}
    tries = query(
        airflow.meta,
        "SELECT max(try_number) FROM task_instance WHERE dag_id = 'eos_mismatch' "
        "AND task_id = 'load_fail'",
    )
    assert tries == [(1,)]


HOLDER = """
import sys
from eos_airflow import Ledger, Origin

def hold(eos):
    eos.conn.execute("INSERT INTO sales VALUES ('2024-01-01', 7, 1)")
    print("holding", flush=True)
    assert sys.stdin.readline().strip() == "go"
    return {"by": "holder"}

with Ledger(sys.argv[1]) as ledger:
    print(ledger.run("held/2024-01-01", hold, origin=Origin("other", "load", "r", -1)))
"""


def wait_for(what, check, run: subprocess.Popen[str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline or run.poll() is not None:
            run.kill()
            out, _ = run.communicate()
            pytest.fail(f"timed out waiting for {what}; airflow dags test said:\n{out[-6000:]}")
        time.sleep(0.5)


def test_a_deferrable_task_waits_in_the_triggerer_for_a_held_key(airflow, db):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, db],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        run = subprocess.Popen(
            [AIRFLOW, "dags", "test", "eos_deferred", "2024-01-01"],
            env=airflow.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        # the task handed its wait to the trigger: its waiter is registered in the ledger
        # (`dags test` runs the trigger in-process, the task instance queued meanwhile)
        wait_for(
            "the trigger's waiter",
            lambda: (
                query(db, "SELECT count(*) FROM eos.waiters WHERE key = 'held/2024-01-01'")
                != [(0,)]
            ),
            run,
        )
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.wait(60) == 0
        out, _ = run.communicate(timeout=300)
    finally:
        holder.kill()
    assert run.returncode == 0, out[-4000:]
    assert "deferring until it is committed or released" in out
    assert "Pausing task as DEFERRED" in out
    assert "resumed after waiting (committed)" in out
    assert query(db, "SELECT amount FROM sales") == [(7,)]  # the holder's write, once
    with psycopg.connect(db) as conn:
        assert [e for e, _ in events(conn, "held/2024-01-01")] == [
            "claimed",
            "committed",
            "skipped",
        ]
    assert query(airflow.meta, "SELECT state FROM task_instance WHERE dag_id = 'eos_deferred'") == [
        ("success",)
    ]
