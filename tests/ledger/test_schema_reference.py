"""sql/schema.sql, the readable reference of the current schema, equals what the migrations
build: one database migrated to head, one built by executing schema.sql, compared object by
object from the catalogs and as pg_dump --schema-only output."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

from eos_airflow.ledger.migrate import head_revision, migrate
from eos_airflow.ledger.queries import execute_script
from tests.conftest import ROOT, create_database, drop_database
from tests.ledger.schema_compare import differences, pg_dump_for, schema_dump, snapshot

ODD_SCHEMA = "_eos_audit_2"


@pytest.fixture
def pair(pg_admin_dsn: str) -> Iterator[tuple[str, str]]:
    """Two empty databases: (to migrate, to build from schema.sql)."""
    names = [f"eos_ref_{side}_{uuid.uuid4().hex[:8]}" for side in ("m", "s")]
    dsns = [create_database(pg_admin_dsn, name) for name in names]
    yield dsns[0], dsns[1]
    for name in names:
        drop_database(pg_admin_dsn, name)


def build_reference(dsn: str, schema: str) -> None:
    with psycopg.connect(dsn) as conn:
        execute_script(conn, "schema.sql", schema)


@pytest.mark.parametrize("schema", ["eos", ODD_SCHEMA])
def test_schema_sql_equals_the_migrated_schema(pair: tuple[str, str], schema: str):
    migrated, reference = pair
    migrate(migrated, schema)
    build_reference(reference, schema)
    with psycopg.connect(migrated) as a, psycopg.connect(reference) as b:
        left, right = snapshot(a), snapshot(b)
    found = differences(left, right)
    assert not found, "sql/schema.sql differs from the migrated schema:\n" + "\n".join(found)
    # The comparison looked at the whole ledger, not at an empty catalog.
    assert len(left["function"]) >= 35
    assert {f"{schema}.{t}" for t in ("ledger", "ledger_events", "outbox")} <= set(left["relation"])
    assert f"{schema}.ledger_events.ledger_events_append_only" in left["trigger"]


def test_pg_dump_of_both_is_the_same(pair: tuple[str, str], pg_version: int):
    migrated, reference = pair
    migrate(migrated)
    build_reference(reference, "eos")
    pg_dump = pg_dump_for(pg_version)
    assert pg_dump is not None, f"no pg_dump for PostgreSQL {pg_version} or newer"
    left, right = schema_dump(pg_dump, migrated), schema_dump(pg_dump, reference)
    assert any(line.startswith("CREATE FUNCTION eos.claim(") for line in left)
    assert left == right


def test_the_comparison_sees_each_kind_of_difference(pair: tuple[str, str]):
    """Not vacuous: a changed body, a privilege, a default, an index, a comment, a trigger
    and a missing function are each reported, by name."""
    migrated, reference = pair
    migrate(migrated)
    build_reference(reference, "eos")
    with psycopg.connect(reference, autocommit=True) as conn:
        body = conn.execute("SELECT prosrc FROM pg_proc WHERE proname = 'is_awaited'").fetchone()
        conn.execute(
            "CREATE OR REPLACE FUNCTION eos.is_awaited(p_key text) RETURNS boolean "
            "LANGUAGE plpgsql STABLE PARALLEL SAFE AS "
            + psycopg.sql.quote(body[0].replace("now()", "clock_timestamp()"))
        )
        conn.execute("GRANT EXECUTE ON FUNCTION eos.outbox_mark(bigint[], text) TO PUBLIC")
        conn.execute("ALTER TABLE eos.ledger ALTER COLUMN version SET DEFAULT 1")
        conn.execute("DROP INDEX eos.ledger_state_idx")
        conn.execute("COMMENT ON COLUMN eos.ledger.owner IS NULL")
        conn.execute("ALTER TABLE eos.ledger_events DISABLE TRIGGER ledger_events_append_only")
        conn.execute("DROP FUNCTION eos.twophase_forget(text, uuid)")
        conn.execute("GRANT INSERT ON eos.ledger TO PUBLIC")
    with psycopg.connect(migrated) as a, psycopg.connect(reference) as b:
        found = differences(snapshot(a), snapshot(b))
    headlines = {line for line in found if not line.startswith("    ")}
    assert headlines == {
        "function eos.is_awaited(text): definition differs",
        "function eos.outbox_mark(bigint[],text): acl differs",
        "column eos.ledger.version: default differs",
        "index eos.ledger_state_idx: made by the migrations, missing in schema.sql",
        "relation eos.ledger_state_idx: made by the migrations, missing in schema.sql",
        "column eos.ledger.owner: comment differs",
        "trigger eos.ledger_events.ledger_events_append_only: enabled differs",
        "function eos.twophase_forget(text,uuid): made by the migrations, missing in schema.sql",
        "relation eos.ledger: acl differs",
    }
    removed = (
        "-                   WHERE w.key = p_key AND NOT w.is_prefix AND w.expires_at > now())"
    )
    assert "    " + removed in found, "\n".join(found)


def test_schema_sql_names_the_head_revision_it_shows():
    first = (ROOT / "eos_airflow" / "ledger" / "sql" / "schema.sql").read_text().splitlines()[0]
    assert f"at their head revision ({head_revision()})" in first, first
