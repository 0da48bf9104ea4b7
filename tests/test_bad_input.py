"""The bad-input catalogue: each bad input gets an error that says what happened and what to
do, and nothing is written (no ledger entry, no event, no target row).

One row per input; docs/reliability.md lists them. Bad inputs of the operators that need a
DAG run (key templates, unknown connections, missing tables under Airflow) are in
tests/airflow/test_dags.py; those of several databases, transfers and brokers next to their
features (tests/protocol/test_twophase.py, test_transfer.py, tests/messaging/).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from eos_airflow import (
    BadKeyError,
    ConfigurationError,
    DatabaseUnavailableError,
    Ledger,
    LedgerSchemaError,
    ResultError,
    UserCodeError,
)
from tests.cli.test_cli import cli_all


@pytest.fixture
def target(conn: psycopg.Connection) -> psycopg.Connection:
    conn.execute("CREATE TABLE target (v int)")
    return conn


def write(eos) -> dict[str, int]:
    eos.conn.execute("INSERT INTO target VALUES (1)")
    return {"rows": 1}


def returning(value: Any) -> Callable[[Any], Any]:
    def fn(eos):
        eos.conn.execute("INSERT INTO target VALUES (1)")
        return value

    return fn


def running(sql: str) -> Callable[[Any], Any]:
    def fn(eos):
        eos.conn.execute("INSERT INTO target VALUES (1)")
        eos.conn.execute(sql)
        return None

    return fn


#: (case, call(ledger), expected error type, message pattern)
API_CASES: list[tuple[str, Callable[[Ledger], Any], type[Exception], str]] = [
    (
        "key is not a string",
        lambda lg: lg.run(42, write),
        BadKeyError,
        r"effect key must be a string, got int: 42",
    ),
    (
        "key is empty",
        lambda lg: lg.run("  ", write),
        BadKeyError,
        r"effect key is empty; pass key= a non-empty string such as 'sales/\{\{ ds \}\}'",
    ),
    (
        "key is too long",
        lambda lg: lg.run("k" * 1001, write),
        BadKeyError,
        r"effect key is 1001 characters, the limit is 1000; use a shorter key",
    ),
    (
        "key has a control character",
        lambda lg: lg.run("sales/\n2024", write),
        BadKeyError,
        r"effect key 'sales/\\n2024' contains control character '\\n'; keys are printable text",
    ),
    (
        "key has a NUL byte",
        lambda lg: lg.run("a\x00b", write),
        BadKeyError,
        r"contains control character '\\x00'",
    ),
    (
        "unknown on_committed",
        lambda lg: lg.run("k", write, on_committed="sometimes"),
        ConfigurationError,
        r"on_committed='sometimes' is not valid; choose one of skip, replace, fail",
    ),
    (
        "attempt is zero",
        lambda lg: lg.run("k", write, attempt=0),
        ConfigurationError,
        r"attempt must be an integer >= 1, got 0",
    ),
    (
        "attempt is not a number",
        lambda lg: lg.run("k", write, attempt="2"),
        ConfigurationError,
        r"attempt must be an integer >= 1, got '2'",
    ),
    (
        "result is not JSON",
        lambda lg: lg.run("k", returning({1, 2})),
        ResultError,
        r"the result must be JSON .* got set: .*; return plain data",
    ),
    (
        "result is NaN",
        lambda lg: lg.run("k", returning(math.nan)),
        ResultError,
        r"the result must be JSON .* got float: Out of range float values",
    ),
    (
        "result holds a NUL character",
        lambda lg: lg.run("k", returning("a\x00b")),
        ResultError,
        r"the result contains a NUL character, which PostgreSQL cannot store",
    ),
    (
        "result is too large",
        lambda lg: lg.run("k", returning("x" * 2_000_000)),
        ResultError,
        r"the result is 2,000,002 bytes of JSON, the limit is 1,048,576; store large outputs",
    ),
    (
        "result is a cursor",
        lambda lg: lg.run("k", lambda eos: eos.conn.execute("SELECT 1")),
        ResultError,
        r"got Cursor",
    ),
    (
        "SQL syntax error",
        lambda lg: lg.run("k", running("SELEC 1")),
        UserCodeError,
        r"the database refused a statement \(42601: syntax error at or near \"SELEC\".*"
        r"nothing was written\. Fix the SQL\.",
    ),
    (
        "missing target table",
        lambda lg: lg.run("k", running("INSERT INTO nope VALUES (1)")),
        UserCodeError,
        r"\(42P01: relation \"nope\" does not exist.*nothing was written\. "
        r"Create the table \(or fix its name\) before running the task\.",
    ),
    (
        "constraint violated",
        lambda lg: lg.run("k", running("SELECT 1/0")),
        UserCodeError,
        r"\(22012: division by zero.*nothing was written",
    ),
    (
        "user code commits by itself",
        lambda lg: lg.run("k", lambda eos: eos.conn.commit()),
        UserCodeError,
        r"eos\.conn is inside the effect's transaction: do not call commit\(\) or "
        r"rollback\(\)",
    ),
]


@pytest.mark.parametrize("case,call,error,message", API_CASES, ids=[c[0] for c in API_CASES])
def test_bad_input_through_the_api(ledger: Ledger, target, case, call, error, message):
    with pytest.raises(error) as raised:
        call(ledger)
    assert re.search(message, str(raised.value), re.S), str(raised.value)
    assert target.execute("SELECT count(*) FROM target").fetchone() == (0,)
    # validation errors leave no trace; errors of the running effect leave a `failed` event
    rows = target.execute("SELECT state::text FROM eos.ledger").fetchall()
    assert rows in ([], [("failed",)]), rows
    assert target.execute(
        "SELECT count(*) FROM eos.ledger WHERE state = 'committed'"
    ).fetchone() == (0,)


def test_ledger_without_dsn_or_with_both():
    with pytest.raises(ConfigurationError, match="Ledger needs exactly one of dsn= or connect="):
        Ledger()
    with pytest.raises(ConfigurationError, match="Ledger needs exactly one of dsn= or connect="):
        Ledger("postgresql:///x", connect=lambda: None)
    with pytest.raises(ConfigurationError, match="schema must be a non-empty name"):
        Ledger("postgresql:///x", schema="")
    with pytest.raises(
        ConfigurationError,
        match=r"not a PostgreSQL connection string \(.*\); "
        r"use a URI such as postgresql://USER@HOST:5432/DBNAME",
    ):
        Ledger("warehouse please")


def test_unreachable_database_names_the_fix():
    with (
        Ledger("postgresql://nobody@127.0.0.1:1/warehouse") as ledger,
        pytest.raises(DatabaseUnavailableError) as raised,
    ):
        ledger.run("k", write)
    message = str(raised.value)
    assert message.startswith("cannot connect to the ledger database (connection failed")
    assert "port 1 failed: Connection refused" in message
    assert "nothing accepts connections at that address" in message
    assert message.endswith("check that the server runs and that the host and port are right")
    assert raised.value.retryable  # a database that is down may be up for the next try


def test_missing_ledger_schema(empty_db: str):
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE target (v int)")
        with Ledger(empty_db) as ledger, pytest.raises(LedgerSchemaError) as raised:
            ledger.run("k", write)
        assert conn.execute("SELECT count(*) FROM target").fetchone() == (0,)
    assert re.search(
        r'the ledger schema "eos" is missing or incomplete in database "\w+" .*; '
        r"create it with `eos-airflow db migrate`",
        str(raised.value),
    )


@pytest.mark.parametrize(
    "spec,message",
    [
        ("after_comit=exit", r"unknown step 'after_comit'; known steps: after_chunk, after_claim"),
        ("after_commit=explode", r"is not STEP=ACTION; ACTION is raise, exit or sleep:SECONDS"),
        ("after_commit", r"is not STEP=ACTION"),
        ("after_commit=sleep:soon", r"sleep needs seconds, e\.g\. sleep:2\.5"),
        ("after_commit@first=exit", r"@ATTEMPT and #HIT are whole numbers"),
    ],
)
def test_bad_failpoint_settings_refuse_to_run(ledger: Ledger, target, monkeypatch, spec, message):
    monkeypatch.setenv("EOS_FAILPOINTS", spec)
    with pytest.raises(ConfigurationError, match=message):
        ledger.run("k", write)
    assert target.execute("SELECT count(*) FROM target").fetchone() == (0,)
    assert target.execute(
        "SELECT count(*) FROM eos.ledger WHERE state = 'committed'"
    ).fetchone() == (0,)


def _stamp(dsn: str, revision: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE eos.alembic_version SET version_num = %s", [revision])


def test_cli_bad_inputs(db: str, empty_db: str, pg_admin_dsn: str, template_db: str):
    """Every CLI refusal: exit code 2 for usage, 3 for the database; nothing on stdout."""
    from tests.conftest import create_database

    newer = create_database(pg_admin_dsn, f"eos_newer_{os.getpid()}", template=template_db)
    older = create_database(pg_admin_dsn, f"eos_older_{os.getpid()}", template=template_db)
    _stamp(newer, "9999")
    _stamp(older, "0002")
    calls = {
        "unknown option": (
            ("ledger", "list", "--dsn", db, "--frobnicate"),
            2,
            r"unrecognized arguments: --frobnicate",
        ),
        "unknown command": (("ledger", "undo", "--dsn", db), 2, r"invalid choice: 'undo'"),
        "unknown format": (
            ("ledger", "list", "--dsn", db, "--format", "xml"),
            2,
            r"argument --format: invalid choice: 'xml'",
        ),
        "unknown key": (
            ("ledger", "show", "no/such/key", "--dsn", db),
            2,
            r"no ledger entry for key 'no/such/key'",
        ),
        "bad duration": (
            ("ledger", "stats", "--dsn", db, "--since", "3 fortnights"),
            2,
            r"--since '3 fortnights'",
        ),
        "reopen without a reason": (
            ("ledger", "reopen", "k", "--dsn", db),
            2,
            r"the following arguments are required: --reason",
        ),
        "reopen an unknown key": (
            ("ledger", "reopen", "nope", "--reason", "x", "--dsn", db),
            2,
            r"no ledger entry for key",
        ),
        "no database": (("ledger", "list"), 2, r"no ledger database given"),
        "bad DSN": (
            ("ledger", "list", "--dsn", "postgresql://nobody@127.0.0.1:1/x"),
            3,
            r"cannot connect to the ledger database",
        ),
        "DSN that is not a DSN": (
            ("ledger", "list", "--dsn", "not a dsn"),
            2,
            r"not a PostgreSQL connection string \(missing \"=\" after "
            r"\"…\" in connection info string\); use a URI such as",
        ),
        "unknown connection id": (
            ("ledger", "list", "--conn-id", "no_such_conn"),
            2,
            r"no_such_conn",
        ),
        "missing schema": (("ledger", "list", "--dsn", empty_db), 3, r"eos-airflow db migrate"),
        "ledger of a newer version": (
            ("ledger", "verify", "--dsn", newer),
            3,
            r"at revision 9999, written by a newer eos-airflow",
        ),
        "ledger of an older version": (
            ("ledger", "verify", "--dsn", older),
            3,
            r"at revision 0002, this eos-airflow needs \d{4}; run "
            r"`eos-airflow db migrate`",
        ),
    }
    results = cli_all(*(argv for argv, _, _ in calls.values()))
    failures = []
    for (case, (_argv, code, message)), out in zip(calls.items(), results, strict=True):
        if (
            out.returncode != code
            or not re.search(message, out.stderr)
            or out.stdout
            or "Traceback" in out.stderr
        ):
            failures.append(
                f"{case}: exit {out.returncode}, stderr {out.stderr.strip()!r}, "
                f"stdout {out.stdout.strip()!r}"
            )
    assert not failures, "\n".join(failures)
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM eos.ledger_events").fetchone() == (0,)
    assert len(API_CASES) + len(calls) + 5 + 3 >= 30
    print(json.dumps({"api": len(API_CASES), "cli": len(calls)}))
