"""The lakehouse operators under real Airflow (`airflow dags test`): a day's orders land in an
Iceberg or Delta table once, whatever crashes, retries and re-runs happen; a replace swaps
the day's rows in one snapshot / Delta version."""

from __future__ import annotations

import json

import psycopg
import pytest

from eos_airflow.failpoints import EXIT_CODE
from eos_airflow.hooks.ledger import airflow_conn_json
from eos_airflow.ledger.chain import verify
from tests.conftest import events

# Each test runs a few `airflow dags test` processes (about a minute each): the heavy tier.
pytestmark = [pytest.mark.airflow, pytest.mark.slow]

DAY, PREV = "2026-12-01", "2026-11-30"
PER_DAY = 100


def query(dsn: str, sql: str, params=None) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, params).fetchall()


@pytest.fixture
def lakehouse(airflow, db: str, tmp_path):
    """Orders for two days in ``db``; connection ``lakehouse`` (the ledger and the Iceberg
    catalog in ``db``, its extra naming the warehouse); the lake under tmp_path."""
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE orders AS SELECT g AS id, 'c' || g %% 7 AS customer, "
            "(g * 1.25)::numeric(10,2) AS amount, "
            "timestamptz '2026-11-30 08:00+00' + (g / %s) * interval '1 day' AS ordered_at, "
            "date '2026-11-30' + (g / %s) AS order_date, jsonb_build_object('g', g) AS note "
            "FROM generate_series(0, %s) AS g",
            [PER_DAY, PER_DAY, 2 * PER_DAY - 1],
        )
    lake = tmp_path / "lake"
    lake.mkdir()
    conn = json.loads(airflow_conn_json(db))
    conn["extra"] = json.dumps({"iceberg_warehouse": lake.as_uri()})
    airflow.env["AIRFLOW_CONN_LAKEHOUSE"] = json.dumps(conn)
    airflow.env["EOS_TEST_LAKE"] = lake.as_uri()
    return lake


def iceberg(db: str, lake, name: str):
    from pyiceberg.catalog.sql import SqlCatalog

    from eos_airflow.protocol.iceberg import reader_uri

    catalog = SqlCatalog("eos", uri=reader_uri(db), warehouse=lake.as_uri())
    return catalog.load_table(name)


def ledger_row(db: str, key: str) -> tuple:
    return query(db, "SELECT state::text, version, result FROM eos.ledger WHERE key = %s", [key])[0]


def run(airflow, dag_id: str, day: str, failpoints: str | None = None, code: int = 0):
    done = airflow.dags_test(dag_id, day, failpoints=failpoints)
    assert done.returncode == code, done.stdout[-4000:] + done.stderr[-3000:]
    return done


def test_iceberg_load_lands_once(airflow, lakehouse, db):
    run(airflow, "eos_lake_iceberg", PREV)
    table = iceberg(db, lakehouse, "lake.orders")
    first = table.current_snapshot().snapshot_id
    assert table.scan().to_arrow().num_rows == PER_DAY

    # a crash before the commit: the table's current snapshot is unchanged
    run(airflow, "eos_lake_iceberg", DAY, failpoints="before_commit@1=exit", code=EXIT_CODE)
    table = iceberg(db, lakehouse, "lake.orders")
    assert table.current_snapshot().snapshot_id == first
    assert len(table.snapshots()) == 1
    assert query(
        db, "SELECT state::text FROM eos.ledger WHERE key = %s", [f"lake/iceberg/{DAY}"]
    ) == [("running",)]

    # the next run: its try 1 commits and fails after the commit; try 2 skips
    run(airflow, "eos_lake_iceberg", DAY, failpoints="after_commit@1=raise")
    table = iceberg(db, lakehouse, "lake.orders")
    assert len(table.snapshots()) == 2
    committed = table.current_snapshot().snapshot_id
    state, version, result = ledger_row(db, f"lake/iceberg/{DAY}")
    assert (state, version) == ("committed", 1)
    assert result["rows"] == PER_DAY and result["snapshot_id"] == committed
    assert result["previous_snapshot_id"] == first and result["key"] == f"lake/iceberg/{DAY}"
    assert result["batches"] == PER_DAY // 40 + 1
    with psycopg.connect(db) as conn:
        assert [e for e, _ in events(conn, f"lake/iceberg/{DAY}")][-2:] == ["committed", "skipped"]
        assert verify(conn).ok

    # a second DAG run for the same day: no rows, no snapshot added
    run(airflow, "eos_lake_iceberg", DAY)
    table = iceberg(db, lakehouse, "lake.orders")
    assert table.current_snapshot().snapshot_id == committed and len(table.snapshots()) == 2
    rows = table.scan().to_arrow()
    assert rows.num_rows == 2 * PER_DAY
    import duckdb

    counts = duckdb.sql(
        "SELECT order_date::text, count(*), count(DISTINCT id), sum(amount)::double "
        "FROM rows GROUP BY 1 ORDER BY 1"
    ).fetchall()
    expected = query(
        db,
        "SELECT order_date::text, count(*), count(DISTINCT id), sum(amount)::float8 "
        "FROM orders GROUP BY 1 ORDER BY 1",
    )
    assert counts == expected
    assert table.snapshot_by_id(committed).summary["eos.key"] == f"lake/iceberg/{DAY}"


def test_iceberg_replace_swaps_the_partition(airflow, lakehouse, db):
    run(airflow, "eos_lake_iceberg_replace", PREV)
    run(airflow, "eos_lake_iceberg_replace", DAY)
    table = iceberg(db, lakehouse, "lake.orders_daily")
    before = len(table.snapshots())
    assert table.scan().to_arrow().num_rows == 2 * PER_DAY
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("UPDATE orders SET amount = amount + 1 WHERE order_date = %s", [DAY])

    run(airflow, "eos_lake_iceberg_replace", DAY)
    table = iceberg(db, lakehouse, "lake.orders_daily")
    assert len(table.snapshots()) == before + 1
    assert table.current_snapshot().summary.operation.value == "overwrite"
    rows = table.scan().to_arrow()
    assert rows.num_rows == 2 * PER_DAY
    day = table.scan(row_filter=f"order_date = '{DAY}'").to_arrow()
    source = query(db, "SELECT sum(amount) FROM orders WHERE order_date = %s", [DAY])[0][0]
    assert day.num_rows == PER_DAY and sum(day["amount"].to_pylist()) == source
    state, version, result = ledger_row(db, f"lake/iceberg-replace/{DAY}")
    assert (state, version) == ("committed", 2)
    assert result["files_removed"] >= 1 and result["rows"] == PER_DAY
    with psycopg.connect(db) as conn:
        assert "replaced" in [e for e, _ in events(conn, f"lake/iceberg-replace/{DAY}")]


def delta_table(lake, name: str):
    from deltalake import DeltaTable

    return DeltaTable(f"{lake.as_uri()}/{name}")


def test_delta_load_lands_once(airflow, lakehouse, db):
    run(airflow, "eos_lake_delta", PREV)
    assert delta_table(lakehouse, "delta_orders").version() == 1  # created, then written

    # a crash before the ledger's commit (Delta not written yet): the table is unchanged
    run(airflow, "eos_lake_delta", DAY, failpoints="before_commit@1=exit", code=EXIT_CODE)
    # ... before_commit comes after the write: Delta holds the write with its marker
    table = delta_table(lakehouse, "delta_orders")
    crashed_version = table.version()
    assert table.transaction_version(f"lake/delta/{DAY}") == 1
    # the next run finds the marker: nothing is written again, the ledger commits
    run(airflow, "eos_lake_delta", DAY, failpoints="after_commit@1=raise")
    table = delta_table(lakehouse, "delta_orders")
    assert table.version() == crashed_version
    state, version, result = ledger_row(db, f"lake/delta/{DAY}")
    assert (state, version, result["written"]) == ("committed", 1, False)

    # another run for the same day: no version added, the stored result returned
    run(airflow, "eos_lake_delta", DAY)
    table = delta_table(lakehouse, "delta_orders")
    assert table.version() == crashed_version
    rows = table.to_pyarrow_table()
    assert rows.num_rows == 2 * PER_DAY
    assert len(set(rows["id"].to_pylist())) == 2 * PER_DAY
    with psycopg.connect(db) as conn:
        names = [e for e, _ in events(conn, f"lake/delta/{DAY}")]
        assert names.count("committed") == 1 and "skipped" in names
        assert verify(conn).ok


def test_delta_crash_after_its_commit_lands_once(airflow, lakehouse, db):
    run(airflow, "eos_lake_delta", PREV)
    # try 1 dies right after Delta's commit, before the ledger's; the next run's try finds it
    run(airflow, "eos_lake_delta", DAY, failpoints="after_delta_commit@1=exit", code=EXIT_CODE)
    table = delta_table(lakehouse, "delta_orders")
    landed = table.version()
    assert landed == 2
    assert query(
        db, "SELECT state::text FROM eos.ledger WHERE key = %s", [f"lake/delta/{DAY}"]
    ) == [("running",)]
    run(airflow, "eos_lake_delta", DAY, failpoints="after_delta_commit@1=raise")
    table = delta_table(lakehouse, "delta_orders")
    assert table.version() == landed  # one Delta write for the key
    assert table.to_pyarrow_table().num_rows == 2 * PER_DAY
    state, version, result = ledger_row(db, f"lake/delta/{DAY}")
    assert (state, version, result["written"], result["rows"]) == ("committed", 1, False, None)
    writes = [
        h for h in table.history() if h.get("operation") == "WRITE" and h.get("version", 0) >= 1
    ]
    assert len(writes) == 2  # one per day


def test_delta_replace_swaps_the_day(airflow, lakehouse, db):
    run(airflow, "eos_lake_delta_replace", PREV)
    run(airflow, "eos_lake_delta_replace", DAY)
    before = delta_table(lakehouse, "delta_daily").version()
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("UPDATE orders SET amount = amount + 1 WHERE order_date = %s", [DAY])
    run(airflow, "eos_lake_delta_replace", DAY)
    table = delta_table(lakehouse, "delta_daily")
    assert table.version() == before + 1
    rows = table.to_pyarrow_table()
    assert rows.num_rows == 2 * PER_DAY
    source = query(db, "SELECT sum(amount) FROM orders")[0][0]
    assert sum(rows["amount"].to_pylist()) == source
    state, version, result = ledger_row(db, f"lake/delta-replace/{DAY}")
    assert (state, version, result["written"]) == ("committed", 2, True)
    assert table.transaction_version(f"lake/delta-replace/{DAY}") == 2
