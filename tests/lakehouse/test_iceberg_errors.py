"""``eos.iceberg``'s bad input and unreachable storage: clear errors, nothing committed (on
file:// and s3://)."""

from __future__ import annotations

import psycopg
import pyarrow as pa
import pytest
from pyiceberg.catalog.sql import SqlCatalog

from eos_airflow import ConfigurationError, LakehouseStorageError, Ledger, Origin
from eos_airflow.protocol.iceberg import reader_uri
from tests.conftest import events
from tests.lakehouse.conftest import Lake

TI = Origin("lake", "load", "manual__1", -1)
SCHEMA = pa.schema([pa.field("day", pa.string()), pa.field("amount", pa.int64())])


@pytest.fixture
def created(ledger: Ledger, lake: Lake, db: str) -> SqlCatalog:
    ledger.run(
        "create",
        lambda eos: bool(
            eos.iceberg(
                "lake.sales", schema=SCHEMA, warehouse=lake.uri("wh"), properties=lake.iceberg
            )
        ),
    )
    return SqlCatalog("eos", uri=reader_uri(db), warehouse=lake.uri("wh"), **lake.iceberg)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (pa.table({"day": ["d"], "amount": ["five"]}), "amount: optional long"),
        (pa.table({"day": ["d"], "amount": [5], "extra": [1]}), "more columns: extra"),
    ],
    ids=["wrong type", "extra column"],
)
def test_data_that_does_not_fit_the_schema_is_refused(
    ledger: Ledger, lake: Lake, created: SqlCatalog, conn, data, message
):
    def fn(eos):
        eos.iceberg("lake.sales", properties=lake.iceberg).append(data)

    with pytest.raises(ConfigurationError, match="does not match the table's schema") as caught:
        ledger.run("day1", fn, origin=TI)
    assert message in str(caught.value)
    assert created.load_table("lake.sales").current_snapshot() is None
    assert [e for e, _ in events(conn, "day1")] == ["claimed", "failed"]


def test_unreachable_storage_is_a_retryable_error_and_nothing_commits(ledger: Ledger, conn):
    properties = {
        "s3.endpoint": "http://127.0.0.1:9",
        "s3.access-key-id": "x",
        "s3.secret-access-key": "y",
        "s3.region": "us-east-1",
        "s3.connect-timeout": "1",
    }

    def fn(eos):
        eos.iceberg("lake.t", schema=SCHEMA, warehouse="s3://nowhere/wh", properties=properties)

    with pytest.raises(LakehouseStorageError, match="could not be reached") as caught:
        ledger.run("k", fn, origin=TI)
    assert caught.value.retryable
    # the catalog's tables, created by this effect, went with it
    assert conn.execute("SELECT to_regclass('public.iceberg_tables')").fetchone() == (None,)
    assert [e for e, _ in events(conn, "k")] == ["claimed", "failed"]


def test_each_snapshot_names_the_effect_that_wrote_it(
    ledger: Ledger, lake: Lake, created: SqlCatalog
):
    """The ledger's result names the snapshot; the snapshot's summary names the ledger entry
    (key, version, attempt, run): an auditor can go either way."""
    data = pa.table({"day": ["d"], "amount": [5]}, schema=SCHEMA)

    def fn(eos):
        table = eos.iceberg("lake.sales", properties=lake.iceberg)
        table.append(data, snapshot_properties={"source": "orders"})
        return {"snapshot": table.current_snapshot().snapshot_id}

    first = ledger.run_outcome("day1", fn, origin=TI)
    again = ledger.run_outcome("day1", fn, origin=TI, on_committed="replace", attempt=2)
    snapshots = created.load_table("lake.sales").snapshots()
    assert [s.snapshot_id for s in snapshots] == [
        first.result["snapshot"],
        again.result["snapshot"],
    ]
    summaries = [s.summary.additional_properties for s in snapshots]
    for summary, outcome in zip(summaries, (first, again), strict=True):
        assert summary["eos.key"] == "day1"
        assert summary["eos.version"] == str(outcome.version)
        assert summary["eos.attempt"] == str(outcome.attempt)
        assert summary["eos.run-id"] == "manual__1"
        assert summary["source"] == "orders"
    assert [first.version, again.version] == [1, 2]


def test_pyiceberg_configuration_of_the_catalog_eos_applies(
    ledger: Ledger, lake: Lake, db: str, monkeypatch
):
    """The warehouse and FileIO settings can come from pyiceberg's own configuration of the
    catalog ``eos`` (here its environment variables), as for a stock reader."""
    monkeypatch.setenv("PYICEBERG_CATALOG__EOS__WAREHOUSE", lake.uri("configured"))
    monkeypatch.setenv("PYICEBERG_CATALOG__EOS__URI", "postgresql+psycopg://nobody@nowhere/x")
    for name, value in lake.iceberg.items():
        variable = name.upper().replace(".", "__").replace("-", "_")
        monkeypatch.setenv(f"PYICEBERG_CATALOG__EOS__{variable}", value)
    data = pa.table({"day": ["d"], "amount": [5]}, schema=SCHEMA)
    ledger.run("k", lambda eos: eos.iceberg("lake.sales", schema=SCHEMA).append(data), origin=TI)
    assert any(f.endswith(".parquet") for f in lake.files("configured"))
    catalog = SqlCatalog(
        "eos", uri=reader_uri(db), warehouse=lake.uri("configured"), **lake.iceberg
    )
    assert catalog.load_table("lake.sales").scan().to_arrow().num_rows == 1


def test_the_reader_uri_of_a_unix_socket_dsn_reaches_the_server(db: str, tmp_path):
    """A libpq DSN naming a socket directory (the embedded server's, a local service's)
    becomes a URL whose query carries the host: a stock reader connects through it."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    url = make_url(reader_uri("host=/run/pg dbname=lake user=etl port=5433"))
    assert (url.host, url.database, url.username) == (None, "lake", "etl")
    assert url.query == {"host": "/run/pg", "port": "5433"}
    with psycopg.connect(db) as conn:
        socket_dir = conn.execute("SHOW unix_socket_directories").fetchone()[0].split(",")[0]
        port, user = conn.info.port, conn.info.user
    dbname = psycopg.conninfo.conninfo_to_dict(db)["dbname"]
    dsn = f"host={socket_dir.strip()} port={port} dbname={dbname} user={user}"
    engine = create_engine(reader_uri(dsn))
    with engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT current_database()").scalar() == dbname
    engine.dispose()
