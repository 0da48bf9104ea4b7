"""Transfers between two databases through real Airflow (`airflow dags test`).

One run injects failures (``after_prepare`` into each task's first try, ``after_precommit``
into the 3PC operator's second): the retries commit each transfer once. A second run is
killed right after the decorator's commit decision; ``eos-airflow recover --conn-id`` finds
the participants through the Airflow connections in the decision log and finishes it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import psycopg
import pytest

from eos_airflow.failpoints import EXIT_CODE
from eos_airflow.hooks.ledger import airflow_conn_json
from tests.conftest import ROOT, create_database, drop_database, prepared_transactions_or_skip
from tests.protocol.test_twophase import finish_leftovers

pytestmark = pytest.mark.airflow

SETUP = (
    "CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL); "
    "INSERT INTO accounts VALUES (1, 100);"
)


@pytest.fixture
def banks(pg_admin_dsn, template_db, airflow):
    prepared_transactions_or_skip(pg_admin_dsn)
    token = uuid.uuid4().hex[:8]
    names = {n: f"eos_af2pc_{n}_{token}" for n in ("a", "b")}
    dsns = {n: create_database(pg_admin_dsn, db, template=template_db) for n, db in names.items()}
    for name, dsn in dsns.items():
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SETUP)
        airflow.env[f"AIRFLOW_CONN_BANK_{name.upper()}"] = airflow_conn_json(dsn)
    yield dsns
    finish_leftovers(pg_admin_dsn, names.values())
    for db in names.values():
        drop_database(pg_admin_dsn, db)


def balances(dsns):
    out = []
    for name in ("a", "b"):
        with psycopg.connect(dsns[name]) as conn:
            out.append(conn.execute("SELECT balance FROM accounts").fetchone()[0])
            assert (
                conn.execute(
                    "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()"
                ).fetchone()[0]
                == 0
            )
    return tuple(out)


def ledger_events(dsn, key):
    with psycopg.connect(dsn) as conn:
        return [
            (e, a)
            for e, a in conn.execute(
                "SELECT event::text, attempt FROM eos.ledger_events WHERE key = %s ORDER BY seq",
                [key],
            )
        ]


def test_decorator_and_operator_transfer_once_across_failures_and_a_crash(airflow, banks):
    done = airflow.dags_test(
        "eos_twophase", "2024-01-01", failpoints="after_prepare@1=raise,after_precommit@2=raise"
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert balances(banks) == (85, 115)
    assert 'REPORT transfer {"amount": 10, "by_try": 2, "day": "2024-01-01"}' in done.stdout
    assert ledger_events(banks["a"], "transfer/2024-01-01") == [
        ("claimed", 1),
        ("aborted", 1),
        ("failed", 1),
        ("claimed", 2),
        ("prepared", 2),
        ("decided", 2),
        ("committed", 2),
    ]
    # the 3PC operator: try 1 fails before its decision (aborted), try 2 after every
    # participant pre-committed (so it will commit), and try 3 finishes try 2's transaction
    assert ledger_events(banks["a"], "sql_transfer/2024-01-01") == [
        ("claimed", 1),
        ("aborted", 1),
        ("failed", 1),
        ("claimed", 2),
        ("claimed", 3),
        ("recovered", 2),
        ("committed", 2),
        ("skipped", 3),
    ]

    crashed = airflow.dags_test("eos_twophase", "2024-01-02", failpoints="after_decision@1=exit")
    assert crashed.returncode == EXIT_CODE, crashed.stdout[-2000:] + crashed.stderr[-2000:]
    with psycopg.connect(banks["a"]) as conn:
        assert (
            conn.execute(
                "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()"
            ).fetchone()[0]
            == 1
        )  # a's; b holds the other
    recover = subprocess.run(
        [
            sys.executable,
            "-m",
            "eos_airflow.cli.main",
            "recover",
            "--conn-id",
            "bank_a",
            "--grace",
            "0s",
            "--format",
            "json",
        ],
        env=airflow.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert recover.returncode == 0, recover.stderr
    [transaction] = json.loads(recover.stdout)["transactions"]
    assert (transaction["key"], transaction["outcome"]) == ("transfer/2024-01-02", "committed")
    assert balances(banks) == (75, 125)
    assert [e for e, _ in ledger_events(banks["a"], "transfer/2024-01-02")][-2:] == [
        "committed",
        "recovered",
    ]
