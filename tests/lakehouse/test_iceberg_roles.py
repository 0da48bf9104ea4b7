"""A least-privileged writer (``db grant``) writes Iceberg tables once the owner ran
``db grant --iceberg``; without it, a clear error says what to run, and nothing is written."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pyarrow as pa
import pytest
from psycopg import sql
from pyiceberg.catalog.sql import SqlCatalog

from eos_airflow import ConfigurationError, Ledger, Origin
from eos_airflow.protocol.iceberg import reader_uri
from tests.conftest import dsn_for, events
from tests.lakehouse.conftest import Lake
from tests.security.conftest import cli

TI = Origin("lake", "load", "manual__1", -1)
DATA = pa.table({"day": ["2024-01-01"], "amount": [5]})


@pytest.fixture
def roles(db: str, pg_admin_dsn: str) -> Iterator[tuple[str, str]]:
    suffix = uuid.uuid4().hex[:8]
    names = (f"eos_w_{suffix}", f"eos_a_{suffix}")
    yield names
    with psycopg.connect(db, autocommit=True) as conn:
        for role in names:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
    with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
        for role in names:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def login(db: str, role: str) -> str:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(role)))
    return dsn_for(db, psycopg.conninfo.conninfo_to_dict(db)["dbname"]) + f" user={role}"


def load(lake: Lake):
    def fn(eos):
        table = eos.iceberg(
            "lake.sales", schema=DATA.schema, warehouse=lake.uri("wh"), properties=lake.iceberg
        )
        table.append(DATA)
        return {"snapshot": table.current_snapshot().snapshot_id}

    return fn


def test_a_granted_writer_writes_iceberg_tables(db: str, roles, lake: Lake):
    writer, auditor = roles
    done = cli("db", "grant", "--writer", writer, "--auditor", auditor, "--iceberg", "--dsn", db)
    assert done.returncode == 0, done.stderr
    assert "Iceberg catalog tables iceberg_namespace_properties, iceberg_tables" in done.stdout
    with Ledger(login(db, writer)) as ledger:
        result = ledger.run("day1", load(lake), origin=TI)
    catalog = SqlCatalog("eos", uri=reader_uri(db), warehouse=lake.uri("wh"), **lake.iceberg)
    table = catalog.load_table("lake.sales")
    assert table.current_snapshot().snapshot_id == result["snapshot"]
    assert table.scan().to_arrow().to_pylist() == [{"day": "2024-01-01", "amount": 5}]
    # the auditor reads the catalog, and cannot move a table's pointer
    with psycopg.connect(login(db, auditor)) as conn:
        assert conn.execute("SELECT count(*) FROM public.iceberg_tables").fetchone() == (1,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE public.iceberg_tables SET metadata_location = 'x'")


def test_without_the_catalog_tables_the_writer_is_told_what_to_run(db: str, roles, lake: Lake):
    writer, auditor = roles
    assert cli("db", "grant", "--writer", writer, "--auditor", auditor, "--dsn", db).returncode == 0
    with Ledger(login(db, writer)) as ledger, pytest.raises(ConfigurationError) as caught:
        ledger.run("day1", load(lake), origin=TI)
    assert "db grant --writer ROLE --auditor ROLE --iceberg" in str(caught.value)
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT to_regclass('public.iceberg_tables')").fetchone() == (None,)
        assert [e for e, _ in events(conn, "day1")] == ["claimed", "failed"]
    assert lake.files("wh") == []
