"""Helpers of the security tests: the CLI in this process, and a snapshot of the catalog."""

from __future__ import annotations

import contextlib
import io
import subprocess

import psycopg

from eos_airflow.cli.main import main


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
    return {(s, n, k) for s, n, k in rows
            if s not in ("pg_catalog", "information_schema", "pg_toast") and s != skip_schema
            and not s.startswith("pg_temp") and not s.startswith("pg_toast_temp")}
