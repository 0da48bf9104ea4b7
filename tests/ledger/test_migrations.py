"""Creating the ledger schema: idempotent, serialised, equal to the declared tables, safe names."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from importlib import metadata
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from eos_airflow import ConfigurationError, Ledger, LedgerSchemaError
from eos_airflow.ledger import chain
from eos_airflow.ledger.migrate import MIGRATION_LOCK, check_revision, head_revision, migrate
from eos_airflow.ledger.tables import EFFECT_STATES, EVENT_KINDS, ledger_metadata
from tests.conftest import ROOT

VERSIONS = ROOT / "eos_airflow" / "ledger" / "migrations" / "versions"
SQL = ROOT / "eos_airflow" / "ledger" / "sql"
MIGRATION_FILES = {
    path.name[:4]: path for path in sorted(VERSIONS.glob("[0-9][0-9][0-9][0-9]_*.py"))
}
REVISIONS = list(MIGRATION_FILES)
HEAD = REVISIONS[-1]
ODD_SCHEMA = "_eos_audit_2"  # only plain lowercase identifiers are accepted as schemas
LEDGER_TABLES = {
    "alembic_version",
    "inbox",
    "ledger",
    "ledger_events",
    "offsets",
    "outbox",
    "precommits",
    "pruned_chains",
    "pruned_claims",
    "recovery_points",
    "schema_migrations",
    "twophase",
    "versions",
    "waiters",
}


def schemas(conn: psycopg.Connection) -> set[str]:
    return {
        name
        for (name,) in conn.execute(
            "SELECT nspname FROM pg_namespace "
            "WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'"
        )
    }


def tables_in(conn: psycopg.Connection, schema: str) -> set[str]:
    return {
        name
        for (name,) in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s", [schema]
        )
    }


def cli(*argv: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "EOS_LEDGER_DSN"}
    return subprocess.Popen(
        [sys.executable, "-m", "eos_airflow.cli.main", *argv],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_migrate_applies_every_revision_once_and_records_its_checksum(empty_db: str):
    assert migrate(empty_db) == REVISIONS
    assert migrate(empty_db) == []
    with psycopg.connect(empty_db) as conn:
        rows = conn.execute(
            "SELECT revision, description, checksum, package_version, applied_at "
            "FROM eos.schema_migrations ORDER BY revision"
        ).fetchall()
        version = conn.execute("SELECT version_num FROM eos.alembic_version").fetchall()
        assert check_revision(conn, "eos") == HEAD
    assert [r[0] for r in rows] == REVISIONS
    assert HEAD == head_revision()
    assert rows[0][1].startswith("Initial ledger")
    assert rows[1][1].startswith("Commit notifications")
    for revision, _, checksum, package_version, applied_at in rows:
        # sha256 of the sha256sum listing of the wrapper and the revision's SQL file(s)
        files = [MIGRATION_FILES[revision], *sorted(SQL.glob(f"{revision}_*.sql"))]
        listing = "".join(
            f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(SQL.parent).as_posix()}\n"
            for p in files
        )
        assert checksum == hashlib.sha256(listing.encode()).hexdigest()
        assert package_version == metadata.version("eos-airflow")
        assert applied_at is not None
    assert version == [(HEAD,)]


def test_concurrent_migrations_serialise_and_create_the_schema_once(empty_db: str):
    """Both `db migrate` processes wait on the migration lock at the same time (held here
    until both are blocked on it); one applies every revision, the other finds it up to date."""
    with psycopg.connect(empty_db, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", [MIGRATION_LOCK])
        procs = [cli("db", "migrate", "--dsn", empty_db) for _ in range(2)]
        deadline = time.monotonic() + 60
        waiting = 0
        while waiting < 2:
            assert time.monotonic() < deadline, "the migrations never waited on the lock"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.05)
            waiting = holder.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ).fetchone()[0]
        holder.execute("SELECT pg_advisory_unlock(%s)", [MIGRATION_LOCK])
        results = [p.communicate(timeout=60) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], results
        outputs = sorted(out for out, _ in results)
        assert outputs == [
            f"ledger schema 'eos' at revision {HEAD} (applied {', '.join(REVISIONS)})\n",
            f"ledger schema 'eos' at revision {HEAD} (up to date)\n",
        ]
        assert "eos" in schemas(holder)
        assert tables_in(holder, "eos") == LEDGER_TABLES
        assert holder.execute(
            "SELECT revision FROM eos.schema_migrations ORDER BY 1"
        ).fetchall() == [(r,) for r in REVISIONS]
        assert holder.execute("SELECT version_num FROM eos.alembic_version").fetchall() == [(HEAD,)]


# --- "all migrations applied" equals the declared metadata ---------------------------------


def schema_diff(dsn: str, schema: str, target: sa.MetaData) -> list[Any]:
    """Alembic's autogenerate diff between the database's ``schema`` and ``target``.

    Only ``schema`` is compared, without Alembic's own version table. Types and server
    defaults are compared too; column comments are compared by default (none is spurious).
    """

    def include_name(name: str | None, type_: str, parent_names: dict[str, Any]) -> bool:
        if type_ == "schema":
            return name == schema
        if type_ == "table":
            return parent_names.get("schema_name") == schema and name != "alembic_version"
        return True

    def include_object(
        obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
    ) -> bool:
        if type_ == "table":
            return obj.schema == schema and name != "alembic_version"
        return True

    engine = sa.create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(dsn), poolclass=sa.NullPool
    )
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection,
                opts={
                    "include_schemas": True,
                    "include_name": include_name,
                    "include_object": include_object,
                    "compare_type": True,
                    "compare_server_default": True,
                    "target_metadata": target,
                },
            )
            return compare_metadata(context, target)
    finally:
        engine.dispose()


@pytest.mark.parametrize("schema", ["eos", ODD_SCHEMA])
def test_migrated_schema_equals_the_declared_metadata(empty_db: str, schema: str):
    migrate(empty_db, schema)
    assert schema_diff(empty_db, schema, ledger_metadata(schema)) == []
    # Alembic does not compare enum labels: compare them here.
    with psycopg.connect(empty_db) as conn:
        labels = dict(
            conn.execute(
                "SELECT t.typname, array_agg(e.enumlabel::text ORDER BY e.enumsortorder) "
                "FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid "
                "JOIN pg_namespace n ON n.oid = t.typnamespace WHERE n.nspname = %s "
                "GROUP BY t.typname",
                [schema],
            ).fetchall()
        )
    assert labels == {"effect_state": list(EFFECT_STATES), "event_kind": list(EVENT_KINDS)}


def test_metadata_comparison_sees_differences(db: str):
    """The comparison above is not vacuous: it sees the tables, types, comments and indexes."""
    assert {(d[0], d[1].name) for d in schema_diff(db, "eos", sa.MetaData(schema="eos"))} == {
        ("remove_table", "ledger"),
        ("remove_table", "ledger_events"),
        ("remove_table", "schema_migrations"),
        ("remove_table", "waiters"),
        ("remove_index", "waiters_prefix_idx"),
        ("remove_index", "waiters_listener_idx"),
        ("remove_index", "ledger_origin_idx"),
        ("remove_index", "ledger_state_idx"),
        ("remove_index", "ledger_events_at_idx"),
        ("remove_table", "twophase"),
        ("remove_table", "precommits"),
        ("remove_index", "twophase_key_idx"),
        ("remove_index", "twophase_unresolved_idx"),
        ("remove_table", "pruned_chains"),
        ("remove_table", "pruned_claims"),
        ("remove_index", "pruned_claims_key_idx"),
        ("remove_table", "recovery_points"),
        ("remove_table", "offsets"),
        ("remove_table", "outbox"),
        ("remove_table", "inbox"),
        ("remove_index", "outbox_pending_idx"),
        ("remove_table", "versions"),
    }

    changed = ledger_metadata("eos")
    ledger = changed.tables["eos.ledger"]
    ledger.c.attempt.type = sa.BigInteger()
    ledger.c.owner.comment = None
    sa.Index("ledger_host_idx", ledger.c.host)
    kinds = set()
    for d in schema_diff(db, "eos", changed):
        entries = d if isinstance(d, list) else [d]
        kinds |= {
            (e[0], e[3]) if e[0].startswith("modify_") else (e[0], e[1].name) for e in entries
        }
    assert kinds == {
        ("modify_type", "attempt"),
        ("modify_comment", "owner"),
        ("add_index", "ledger_host_idx"),
    }


# --- schema names are identifiers, never SQL ------------------------------------------------


def test_odd_schema_name_migrates_into_exactly_that_schema(empty_db: str):
    assert migrate(empty_db, ODD_SCHEMA) == REVISIONS
    assert migrate(empty_db, ODD_SCHEMA) == []
    with psycopg.connect(empty_db, autocommit=True) as conn:
        assert schemas(conn) == {"public", ODD_SCHEMA}
        assert tables_in(conn, ODD_SCHEMA) == LEDGER_TABLES
        assert tables_in(conn, "public") == set()
        with Ledger(empty_db, schema=ODD_SCHEMA) as ledger:
            first = ledger.run_outcome("k", lambda eos: {"n": 1})
            again = ledger.run_outcome("k", lambda eos: {"n": 2})
        assert (first.action, again.action, again.result) == ("committed", "skipped", {"n": 1})
        entry = conn.execute(
            psycopg.sql.SQL("SELECT key, state::text, result FROM {}.ledger").format(
                psycopg.sql.Identifier(ODD_SCHEMA)
            )
        ).fetchall()
        assert entry == [("k", "committed", {"n": 1})]
        assert check_revision(conn, ODD_SCHEMA) == HEAD
        result = chain.verify(conn, ODD_SCHEMA)
        assert (result.ok, result.events, result.keys) == (True, 3, 1)
        with pytest.raises(LedgerSchemaError, match="eos-airflow db migrate"):
            check_revision(conn, "eos")


def test_schema_names_that_are_not_plain_identifiers_are_refused(empty_db: str):
    for schema in ("eos%s 100%", 'eos "audit"; drop', "e$$; DROP SCHEMA public; $$"):
        with pytest.raises(
            ConfigurationError,
            match="is not allowed: a ledger schema must be a plain lowercase identifier",
        ):
            migrate(empty_db, schema)
    with psycopg.connect(empty_db) as conn:
        assert schemas(conn) == {"public"}


# --- check_revision -------------------------------------------------------------------------


def test_check_revision_on_a_database_without_the_schema(empty_db: str):
    with psycopg.connect(empty_db) as conn:
        with pytest.raises(LedgerSchemaError, match="`eos-airflow db migrate`") as err:
            check_revision(conn, "eos")
    assert "missing" in str(err.value)


def test_check_revision_written_by_a_newer_package(db: str):
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("UPDATE eos.alembic_version SET version_num = '0042'")
        with pytest.raises(LedgerSchemaError, match="newer eos-airflow") as err:
            check_revision(conn, "eos")
    assert "0042" in str(err.value)
    assert "upgrade eos-airflow" in str(err.value)
