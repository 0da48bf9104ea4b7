"""The lakehouse operators' load path on real PostgreSQL (no Airflow): PostgreSQL types as
Arrow types, rows streamed in bounded batches from a server-side cursor, Iceberg loads as one
snapshot (append, overwrite of a filter's rows), Delta loads, and bad input refused before
anything is written."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import psycopg
import pyarrow as pa
import pytest
from pyiceberg.catalog.sql import SqlCatalog

from eos_airflow import (
    ConfigurationError,
    ExactlyOnceDeltaOperator,
    ExactlyOnceIcebergOperator,
    Ledger,
)
from eos_airflow.protocol.iceberg import reader_uri
from eos_airflow.protocol.lakeload import (
    describe,
    record_batches,
    write_delta,
    write_iceberg,
)

TYPES = """
SELECT 1::int2 AS i2, 2::int4 AS i4, 3::int8 AS i8, 1.5::float4 AS f4, 2.5::float8 AS f8,
       12.34::numeric(10,2) AS money, 1.25::numeric AS free, true AS flag, 'x'::text AS t,
       'y'::varchar(3) AS v, date '2026-12-01' AS d,
       timestamp '2026-12-01 10:00' AS ts, timestamptz '2026-12-01 10:00+02' AS tstz,
       '{"a": [1, 2]}'::jsonb AS doc, NULL::int4 AS nothing
"""


def connect(dsn: str):
    return lambda: psycopg.connect(dsn, autocommit=True)


def test_postgres_types_become_arrow_types(db):
    schema = describe(connect(db), TYPES, None)
    assert {f.name: str(f.type) for f in schema} == {
        "i2": "int16",
        "i4": "int32",
        "i8": "int64",
        "f4": "float",
        "f8": "double",
        "money": "decimal128(10, 2)",
        "free": "double",
        "flag": "bool",
        "t": "string",
        "v": "string",
        "d": "date32[day]",
        "ts": "timestamp[us]",
        "tstz": "timestamp[us, tz=UTC]",
        "doc": "string",
        "nothing": "int32",
    }
    with psycopg.connect(db, autocommit=True) as conn:
        row = record_batches(conn, TYPES).read_all().to_pylist()[0]
    assert row["money"] == Decimal("12.34") and row["free"] == 1.25
    assert row["tstz"] == dt.datetime(2026, 12, 1, 8, 0, tzinfo=dt.timezone.utc)
    assert row["ts"] == dt.datetime(2026, 12, 1, 10, 0)
    assert row["d"] == dt.date(2026, 12, 1) and row["nothing"] is None
    assert row["doc"] == '{"a": [1, 2]}'


def test_a_type_without_arrow_mapping_is_refused_naming_the_column(db):
    with pytest.raises(ConfigurationError, match=r"'span'.*interval.*cast it"):
        describe(connect(db), "SELECT interval '1 day' AS span", None)
    with pytest.raises(ConfigurationError, match="twice"):
        describe(connect(db), "SELECT 1 AS a, 2 AS a", None)
    with pytest.raises(ConfigurationError, match="not valid SQL"):
        describe(connect(db), "SELECT FROM WHERE", None)


def test_rows_stream_in_bounded_batches_from_a_server_side_cursor(db):
    with psycopg.connect(db, autocommit=True) as conn:
        reader = record_batches(
            conn,
            "SELECT g AS id, repeat('x', 200) AS pad FROM generate_series(1, 50000) g",
            batch_rows=1000,
        )
        sizes, peak = [], 0
        for batch in reader:
            sizes.append(batch.num_rows)
            peak = max(peak, pa.total_allocated_bytes())
            if len(sizes) == 1:
                cursors = conn.execute("SELECT name FROM pg_cursors").fetchall()
        assert sizes == [1000] * 50
        assert cursors == [("eos_lakeload",)]
        # one batch's data (about 200 kB) at a time, not the 10 MB of the whole result
        assert peak < 2_000_000, peak
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def catalog(db, lake):
    return SqlCatalog("eos", uri=reader_uri(db), warehouse=lake.as_uri())


@pytest.fixture
def orders(db):
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE orders AS SELECT g AS id, (g * 1.5)::numeric(10,2) AS amount, "
            "date '2026-11-30' + g % 2 AS order_date FROM generate_series(1, 1000) g"
        )
    return db


def load_iceberg(db, lake, key, sql, **options):
    def fn(eos):
        with psycopg.connect(db, autocommit=True) as conn:
            return write_iceberg(
                eos,
                record_batches(conn, sql, batch_rows=100),
                table="lake.orders",
                warehouse=lake.as_uri(),
                **options,
            )

    with Ledger(db) as ledger:
        return ledger.run(key, fn)


def test_iceberg_overwrite_rewrites_a_partly_matching_file_in_one_snapshot(orders, tmp_path):
    db = orders
    first = load_iceberg(db, tmp_path, "all", "SELECT * FROM orders", chunk_bytes=4000)
    assert first["rows"] == 1000 and first["batches"] == 10 and first["files_added"] > 1
    day = "SELECT id, (amount + 1)::numeric(10,2) AS amount, order_date FROM orders WHERE order_date = '2026-12-01'"
    second = load_iceberg(
        db, tmp_path, "day", day, mode="overwrite", overwrite_filter="order_date = '2026-12-01'"
    )
    table = catalog(db, tmp_path).load_table("lake.orders")
    assert len(table.snapshots()) == 2
    assert table.current_snapshot().snapshot_id == second["snapshot_id"]
    assert second["previous_snapshot_id"] == first["snapshot_id"]
    assert second["files_removed"] == first["files_added"]  # unpartitioned: every file mixed
    rows = table.scan().to_arrow()
    assert rows.num_rows == 1000 and sorted(rows["id"].to_pylist()) == list(range(1, 1001))
    day_rows = table.scan(row_filter="order_date = '2026-12-01'").to_arrow()
    source = (
        psycopg.connect(db)
        .execute("SELECT sum(amount + 1) FROM orders WHERE order_date = '2026-12-01'")
        .fetchone()[0]
    )
    assert sum(day_rows["amount"].to_pylist()) == source


def test_iceberg_bad_input_writes_nothing(orders, tmp_path):
    db = orders
    load_iceberg(db, tmp_path, "all", "SELECT * FROM orders")
    before = catalog(db, tmp_path).load_table("lake.orders").current_snapshot().snapshot_id
    with pytest.raises(ConfigurationError, match="do not match the table's schema"):
        load_iceberg(
            db, tmp_path, "bad-types", "SELECT id::text AS id, amount, order_date FROM orders"
        )
    with pytest.raises(ConfigurationError, match="is not a filter"):
        load_iceberg(
            db,
            tmp_path,
            "bad-filter",
            "SELECT * FROM orders",
            mode="overwrite",
            overwrite_filter="no_such_column = 1",
        )
    table = catalog(db, tmp_path).load_table("lake.orders")
    assert table.current_snapshot().snapshot_id == before and len(table.snapshots()) == 1
    with psycopg.connect(db) as conn:
        states = conn.execute("SELECT key, state::text FROM eos.ledger ORDER BY key").fetchall()
    assert states == [("all", "committed"), ("bad-filter", "failed"), ("bad-types", "failed")]


def test_delta_load_and_its_retry_after_the_commit(orders, tmp_path):
    db = orders
    uri = f"{tmp_path.as_uri()}/delta"
    calls = []

    def fn(eos):
        conns = []

        def source():
            calls.append(1)
            conns.append(psycopg.connect(db, autocommit=True))
            return record_batches(conns[-1], "SELECT * FROM orders", batch_rows=300)

        try:
            return write_delta(eos, source, table_uri=uri, partition_by=["order_date"])
        finally:
            for c in conns:
                c.close()

    with Ledger(db) as ledger:
        result = ledger.run("delta", fn)
        assert ledger.run("delta", fn) == result
    assert result["rows"] == 1000 and result["batches"] == 4 and result["written"]
    assert calls == [1]
    from deltalake import DeltaTable

    table = DeltaTable(uri)
    assert table.to_pyarrow_table().num_rows == 1000
    assert table.metadata().partition_columns == ["order_date"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mode": "upsert"}, "mode='upsert' is not valid"),
        ({"on_committed": "replace"}, "would add the rows again"),
        ({"overwrite_filter": "day = 1"}, "use it with mode='overwrite'"),
        ({"table": "orders"}, "not 'namespace.table'"),
        ({"partition_by": "day(("}, "not a column name or a transform"),
        ({"batch_rows": 0}, "batch_rows must be a positive integer"),
        ({"sql": ""}, "sql must be a non-empty"),
        ({"source_conn_id": ""}, "source_conn_id is required"),
        ({"on_committed": "later"}, "on_committed"),
    ],
)
def test_iceberg_operator_refuses_bad_arguments(options, message):
    args = {
        "task_id": "load",
        "source_conn_id": "src",
        "sql": "SELECT 1",
        "conn_id": "lake",
        "table": "lake.orders",
        **options,
    }
    with pytest.raises(ConfigurationError, match=message):
        ExactlyOnceIcebergOperator(**args)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mode": "merge"}, "mode='merge' is not valid"),
        ({"on_committed": "replace"}, "would add the rows again"),
        ({"predicate": "day = 1"}, "use it with mode='overwrite'"),
        ({"table_uri": ""}, "table_uri is required"),
        ({"partition_by": "day(d)"}, "column names, not transforms"),
        ({"storage_options": ["x"]}, "storage_options must be a dict"),
    ],
)
def test_delta_operator_refuses_bad_arguments(options, message):
    args = {
        "task_id": "load",
        "source_conn_id": "src",
        "sql": "SELECT 1",
        "conn_id": "lake",
        "table_uri": "file:///tmp/x",
        **options,
    }
    with pytest.raises(ConfigurationError, match=message):
        ExactlyOnceDeltaOperator(**args)


def test_replace_with_overwrite_is_accepted_and_fields_are_templated():
    op = ExactlyOnceIcebergOperator(
        task_id="load",
        source_conn_id="src",
        sql="SELECT 1",
        conn_id="lake",
        table="lake.orders",
        mode="overwrite",
        overwrite_filter="d = '{{ ds }}'",
        on_committed="replace",
        partition_by="d",
    )
    assert {"sql", "table", "overwrite_filter"} <= set(op.template_fields)
    delta = ExactlyOnceDeltaOperator(
        task_id="d",
        source_conn_id="src",
        sql="SELECT 1",
        conn_id="lake",
        table_uri="file:///x",
        mode="overwrite",
        predicate="d = '{{ ds }}'",
        on_committed="replace",
    )
    assert {"sql", "table_uri", "predicate"} <= set(delta.template_fields)


def test_iceberg_transforms_need_pyiceberg_core_or_work():
    import importlib.util

    args = {"task_id": "t", "source_conn_id": "s", "sql": "SELECT 1", "conn_id": "c"}
    if importlib.util.find_spec("pyiceberg_core") is None:
        with pytest.raises(ConfigurationError, match="pyiceberg-core"):
            ExactlyOnceIcebergOperator(table="a.b", partition_by="day(ordered_at)", **args)
    else:
        op = ExactlyOnceIcebergOperator(table="a.b", partition_by="day(ordered_at)", **args)
        assert op.partition_by == ["day(ordered_at)"]


def test_the_iceberg_snapshot_names_its_effect(orders, tmp_path):
    load_iceberg(orders, tmp_path, "all", "SELECT * FROM orders")
    summary = catalog(orders, tmp_path).load_table("lake.orders").current_snapshot().summary
    assert (summary["eos.key"], summary["eos.version"], summary["eos.attempt"]) == ("all", "1", "1")
