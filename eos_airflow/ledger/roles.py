"""``eos-airflow db grant``: a role layout in which the audit trail is insert-only.

- **writer** — what tasks connect as: runs the protocol (claim, commit, release, reopen,
  waiting), so it reads and writes the ledger rows and *inserts* events; it has no UPDATE,
  DELETE or TRUNCATE on ``ledger_events`` (and no DELETE on ``ledger``), and may not run gc.
- **auditor** — reads everything in the ledger schema, writes nothing.
- the **owner** (the role that ran ``db migrate``) keeps everything else, including
  ``ledger gc``. Keep it for migrations and gc only; a superuser can bypass any of this,
  which ``ledger verify`` (and a checkpoint kept elsewhere) detects.

Roles that do not exist are created ``NOLOGIN``: grant them to login roles
(``GRANT eos_writer TO airflow_worker``) or ``ALTER ROLE ... LOGIN PASSWORD ...``.
Running the command again re-applies the layout (after a migration added tables, too).
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from eos_airflow.errors import ConfigurationError

#: Tables the writer may only read (the audit trail's bookkeeping and the schema's history).
WRITER_READ_ONLY = ("pruned_chains", "schema_migrations", "alembic_version")
#: The functions that remove history: owner only.
OWNER_ONLY_FUNCTIONS = ("gc_prune(text[], timestamptz, text)",)


def _exists(conn: psycopg.Connection[Any], role: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone() is not None


def _tables(conn: psycopg.Connection[Any], schema: str) -> list[str]:
    return [t for (t,) in conn.execute(
        "SELECT c.relname FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relkind IN ('r', 'p') ORDER BY 1", [schema])]


def grant(conn: psycopg.Connection[Any], schema: str, writer: str, auditor: str
          ) -> dict[str, Any]:
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
        for role in (w, a):
            conn.execute(sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA {} FROM {}").format(s, role))
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(s, role))
            conn.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(s, role))
            conn.execute(sql.SQL("GRANT USAGE ON ALL SEQUENCES IN SCHEMA {} TO {}").format(s, role))
            conn.execute(sql.SQL("GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {} TO {}")
                         .format(s, role))
            for function in OWNER_ONLY_FUNCTIONS:
                name, args = function.split("(", 1)
                conn.execute(sql.SQL("REVOKE EXECUTE ON FUNCTION {}.{}(" + args + " FROM {}")
                             .format(s, sql.Identifier(name), role))
        for table in tables:
            t = sql.Identifier(schema, table)
            if table == "ledger_events":
                privileges = "INSERT"
            elif table == "ledger":
                privileges = "INSERT, UPDATE"
            elif table in WRITER_READ_ONLY:
                continue
            else:  # the protocol's working tables (waiters, recovery points, offsets, ...)
                privileges = "INSERT, UPDATE, DELETE"
            conn.execute(sql.SQL("GRANT " + privileges + " ON {} TO {}").format(t, w))
    return {"schema": schema, "writer": writer, "auditor": auditor, "created": created,
            "tables": tables}
