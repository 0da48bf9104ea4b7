"""Helpers of the security tests: the CLI in this process, and a snapshot of the catalog."""

from __future__ import annotations

import contextlib
import io
import subprocess
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from eos_airflow.cli.main import main
from tests.conftest import dsn_for


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    """``eos-airflow ARGV`` in this process (the command's code path without its start-up)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 2
    return subprocess.CompletedProcess(list(argv), code, out.getvalue(), err.getvalue())


def catalog(dsn: str, *, skip_schema: str | None = None) -> set[tuple[str, str, str]]:
    """(schema, name, kind) of every relation, function, type and schema outside the system
    schemas (and outside ``skip_schema``)."""
    query = """
        SELECT n.nspname, c.relname, c.relkind::text FROM pg_class c
          JOIN pg_namespace n ON n.oid = c.relnamespace
        UNION ALL SELECT n.nspname, p.proname || '(' || pg_get_function_identity_arguments(p.oid)
          || ')', 'f' FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        UNION ALL SELECT n.nspname, t.typname, 'type' FROM pg_type t
          JOIN pg_namespace n ON n.oid = t.typnamespace
        UNION ALL SELECT nspname, '', 'schema' FROM pg_namespace
    """
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(query).fetchall()
    return {
        (s, n, k)
        for s, n, k in rows
        if s not in ("pg_catalog", "information_schema", "pg_toast")
        and s != skip_schema
        and not s.startswith("pg_temp")
        and not s.startswith("pg_toast_temp")
    }


@pytest.fixture
def granted(db: str, pg_admin_dsn: str) -> Iterator[tuple[str, str, str]]:
    """(owner DSN, writer DSN, auditor DSN) of a ledger with both roles granted."""
    suffix = uuid.uuid4().hex[:8]
    writer, auditor = f"eos_w_{suffix}", f"eos_a_{suffix}"
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("CREATE TABLE target (key text, n int); CREATE TABLE source (n int)")
        conn.execute("INSERT INTO source SELECT generate_series(1, 10)")
    done = cli("db", "grant", "--writer", writer, "--auditor", auditor, "--dsn", db)
    assert done.returncode == 0, done.stderr
    with psycopg.connect(db, autocommit=True) as conn:
        for role in (writer, auditor):
            conn.execute(sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(role)))
        conn.execute(
            sql.SQL("GRANT SELECT, INSERT ON target, source TO {}").format(sql.Identifier(writer))
        )
    dbname = psycopg.conninfo.conninfo_to_dict(db)["dbname"]
    yield db, dsn_for(db, dbname) + f" user={writer}", dsn_for(db, dbname) + f" user={auditor}"
    with psycopg.connect(db, autocommit=True) as conn:
        for role in (writer, auditor):
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
    with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
        for role in (writer, auditor):
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
