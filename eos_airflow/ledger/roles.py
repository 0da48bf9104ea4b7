"""Ledger tier: ``eos-airflow db grant``: least privilege for the role tasks connect as.

Every function that changes the ledger runs as the ledger's owner (SECURITY DEFINER, schema
revision 0011) and records only what it does. So:

- **writer** — what tasks connect as: reads the ledger's tables and EXECUTEs the protocol's
  functions (claim, commit, release, chunk checkpoints, offsets, outbox and inbox, waiters,
  two-phase steps, recovery of abandoned attempts). No INSERT, UPDATE, DELETE or TRUNCATE on
  any ledger table: it cannot append an event, move a chain head or edit a row except through
  the protocol. It may not reopen keys or run gc.
- **auditor** — reads everything in the ledger schema, executes nothing that writes.
- the **owner** (the role that ran ``db migrate``) keeps everything else: ``ledger reopen``,
  ``ledger gc``, migrations. A superuser can bypass any of this, which ``ledger verify`` (and
  a heads file, ``ledger heads``, kept elsewhere) detects.

Roles that do not exist are created ``NOLOGIN``: grant them to login roles
(``GRANT eos_writer TO airflow_worker``) or ``ALTER ROLE ... LOGIN PASSWORD ...``.
Running the command again re-applies the layout (after a migration added functions, too).
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from eos_airflow.errors import ConfigurationError

#: Functions only the owner runs: they change what is committed on an operator's word.
OWNER_ONLY_FUNCTIONS = ("reopen", "gc_prune")


def _exists(conn: psycopg.Connection[Any], role: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone() is not None


def _tables(conn: psycopg.Connection[Any], schema: str) -> list[str]:
    return [
        t
        for (t,) in conn.execute(
            "SELECT c.relname FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind IN ('r', 'p') ORDER BY 1",
            [schema],
        )
    ]


def writer_functions(conn: psycopg.Connection[Any], schema: str) -> list[str]:
    """The protocol's functions the writer may execute: every SECURITY DEFINER function of
    the schema but the owner's (as ``schema.name(argument types)``, quoted by PostgreSQL)."""
    return [
        f
        for (f,) in conn.execute(
            "SELECT p.oid::regprocedure::text FROM pg_proc AS p "
            "JOIN pg_namespace AS n ON n.oid = p.pronamespace "
            "WHERE n.nspname = %s AND p.prosecdef AND p.proname <> ALL(%s) ORDER BY 1",
            [schema, list(OWNER_ONLY_FUNCTIONS)],
        )
    ]


def direct_writers(conn: psycopg.Connection[Any], schema: str) -> list[dict[str, Any]]:
    """Roles other than the owner that may write a ledger table directly (and so forge its
    history), with what they may do: ``[{role, table, privileges}]``."""
    return [
        {"role": r, "table": t, "privileges": p}
        for r, t, p in conn.execute(
            "SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END, "
            "c.relname::text, string_agg(a.privilege_type, ', ' ORDER BY a.privilege_type) "
            "FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace, "
            "aclexplode(c.relacl) AS a "
            "WHERE n.nspname = %s AND c.relkind IN ('r', 'p') "
            "AND a.privilege_type IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE') "
            "AND a.grantee NOT IN (c.relowner, n.nspowner) "
            "GROUP BY 1, 2 ORDER BY 1, 2",
            [schema],
        )
    ]


def grant(conn: psycopg.Connection[Any], schema: str, writer: str, auditor: str) -> dict[str, Any]:
    """Create (if missing) and grant the writer and auditor roles; one transaction."""
    if writer == auditor:
        raise ConfigurationError("--writer and --auditor must be different roles")
    created = []
    s = sql.Identifier(schema)
    w, a = sql.Identifier(writer), sql.Identifier(auditor)
    with conn.transaction():
        for role in (writer, auditor):
            if not _exists(conn, role):
                conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
                created.append(role)
        tables = _tables(conn, schema)
        for grantee in (w, a):
            for kind in ("TABLES", "SEQUENCES", "FUNCTIONS"):
                conn.execute(
                    sql.SQL("REVOKE ALL ON ALL " + kind + " IN SCHEMA {} FROM {}").format(
                        s, grantee
                    )
                )
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(s, grantee))
            conn.execute(
                sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(s, grantee)
            )
        functions = writer_functions(conn, schema)
        for function in functions:  # regprocedure text: qualified and quoted by PostgreSQL
            conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(sql.SQL(function), w))
    return {
        "schema": schema,
        "writer": writer,
        "auditor": auditor,
        "created": created,
        "tables": tables,
        "writer_functions": len(functions),
    }


def grant_tables(
    conn: psycopg.Connection[Any], schema: str, tables: list[str], writer: str, auditor: str
) -> None:
    """The writer reads and writes ``tables`` (of ``schema``: e.g. the Iceberg catalog's, whose
    pointer swaps are the effects' commits), the auditor reads them; one transaction."""
    s = sql.Identifier(schema)
    w, a = sql.Identifier(writer), sql.Identifier(auditor)
    with conn.transaction():
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}, {}").format(s, w, a))
        for table in tables:
            t = sql.Identifier(schema, table)
            conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {}").format(t, w))
            conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(t, a))
