"""One exit-code table (docs/usage.md) for every command, with --dsn and with --conn-id."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from tests.conftest import ROOT, create_database, drop_database, dsn_for

UNREACHABLE = "postgresql://postgres@127.0.0.1:1/x"


def as_uri(dsn: str) -> str:
    """Airflow reads a connection variable as a URI; the fixtures give key=value strings."""
    if dsn.startswith("postgresql://"):
        return dsn
    p = psycopg.conninfo.conninfo_to_dict(dsn)
    return f"postgresql://{p.get('user', '')}@{p['host']}:{p.get('port', 5432)}/{p['dbname']}"


def run(argv: tuple[str, ...], dsn: str, by: str) -> subprocess.CompletedProcess[str]:
    """``eos-airflow ARGV`` with the database as ``--dsn`` or as an Airflow connection."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EOS_LEDGER", "AIRFLOW_CONN"))}
    if by == "dsn":
        where = ("--dsn", dsn)
    else:
        env["AIRFLOW_CONN_EOS_EXIT_TEST"] = as_uri(dsn)
        where = ("--conn-id", "eos_exit_test")
    return subprocess.run(
        [sys.executable, "-m", "eos_airflow.cli.main", *argv, *where],
        cwd=ROOT,
        env=env,
        text=True,
        capture_output=True,
        timeout=180,
    )


@pytest.fixture(scope="module")
def no_schema(pg_admin_dsn: str) -> Iterator[str]:
    name = f"eos_exit_{uuid.uuid4().hex[:10]}"
    dsn = create_database(pg_admin_dsn, name)
    try:
        yield dsn
    finally:
        drop_database(pg_admin_dsn, name)


COMMANDS = [("ledger", "list"), ("doctor",), ("outbox", "status"), ("recover",)]


@pytest.mark.parametrize("by", ["dsn", "conn_id"])
def test_database_problems_exit_3_for_every_command(by: str, no_schema: str, pg_admin_dsn: str):
    missing_db = dsn_for(pg_admin_dsn, f"eos_no_such_db_{uuid.uuid4().hex[:6]}")
    cases = [
        (argv, label, dsn)
        for argv in COMMANDS
        for label, dsn in (
            ("unreachable", UNREACHABLE),
            ("no such database", missing_db),
            ("no ledger schema", no_schema),
        )
    ]
    with ThreadPoolExecutor(max_workers=4) as pool:
        done = list(pool.map(lambda c: run(c[0], c[2], by), cases))
    got = {
        (" ".join(argv), label): d.returncode
        for (argv, label, _), d in zip(cases, done, strict=True)
    }
    assert got == dict.fromkeys(got, 3), {
        k: (v, d.stderr[-300:]) for (k, v), d in zip(got.items(), done, strict=True) if v != 3
    }
    for d in done:
        assert "Traceback" not in d.stderr, d.stderr
    schema_reports = [
        d
        for (argv, label, _), d in zip(cases, done, strict=True)
        if argv == ("doctor",) and label == "no ledger schema"
    ]
    assert "schema revision" in schema_reports[0].stdout  # doctor still prints its report


def test_unknown_connection_id_exits_2():
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN")}
    done = subprocess.run(
        [sys.executable, "-m", "eos_airflow.cli.main", "outbox", "status", "--conn-id", "nope"],
        cwd=ROOT,
        env=env,
        text=True,
        capture_output=True,
        timeout=180,
    )
    assert done.returncode == 2, done.stderr
    assert "'nope' is not defined" in done.stderr


def test_stack_up_takes_the_ledger_from_conn_id(monkeypatch: pytest.MonkeyPatch):
    from eos_airflow.cli.main import build_parser
    from eos_airflow.devtools.stack_cli import ledger_dsn
    from eos_airflow.errors import ConfigurationError

    monkeypatch.delenv("EOS_LEDGER_DSN", raising=False)
    monkeypatch.setenv(
        "AIRFLOW_CONN_EOS_STACK_LEDGER",
        "postgresql://eos:secret@db.example:5433/warehouse?sslmode=require",
    )
    args = build_parser().parse_args(["stack", "up", "--conn-id", "eos_stack_ledger"])
    dsn = ledger_dsn(args)
    assert dsn is not None
    for part in ("host=db.example", "port=5433", "user=eos", "dbname=warehouse", "sslmode=require"):
        assert part in dsn.split(" "), dsn
    unknown = build_parser().parse_args(["stack", "up", "--conn-id", "eos_no_such_conn"])
    with pytest.raises(ConfigurationError, match="eos_no_such_conn"):
        ledger_dsn(unknown)
    monkeypatch.setenv("EOS_LEDGER_DSN", "postgresql:///from_env")
    assert ledger_dsn(build_parser().parse_args(["stack", "up"])) == "postgresql:///from_env"


@pytest.mark.parametrize("argv", [("ledger", "list"), ("db", "migrate")])
@pytest.mark.parametrize("where", ["unreachable", "unknown_database"])
def test_database_problems_report_the_public_exception_name(
    argv: tuple[str, ...], where: str, pg_admin_dsn: str
):
    """One exception for "database unreachable" in the whole package: the CLI's JSON error
    names the public ``DatabaseUnavailableError``, also for a server that refuses the
    database name (a problem another try cannot fix, still exit 3)."""
    import json

    if where == "unreachable":
        dsn = UNREACHABLE
    else:
        params = psycopg.conninfo.conninfo_to_dict(pg_admin_dsn)
        params["dbname"] = f"eos_missing_{uuid.uuid4().hex[:8]}"
        dsn = psycopg.conninfo.make_conninfo(**params)
    out = run((*argv, "--format", "json"), dsn, "dsn")
    assert out.returncode == 3, out.stderr
    assert json.loads(out.stderr.strip().splitlines()[-1])["error"] == "DatabaseUnavailableError"
