"""``eos.iceberg``: Iceberg commits that land with the effect, read back by a stock pyiceberg
``SqlCatalog("eos", ...)`` on the ledger's database (real PostgreSQL); every test runs on a
file:// and on an s3:// warehouse (the ``lake`` fixture)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import psycopg
import pyarrow as pa
import pytest
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.exceptions import NoSuchTableError
from pyiceberg.expressions import EqualTo
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.transforms import IdentityTransform
from pyiceberg.types import LongType, NestedField, StringType

from eos_airflow import (
    ConfigurationError,
    FailpointError,
    FencedError,
    LakehouseConflictError,
    Ledger,
    MisuseError,
    Origin,
)
from eos_airflow.protocol.iceberg import reader_uri
from tests.conftest import ROOT, events
from tests.lakehouse.conftest import Lake

TI = Origin("lake", "load", "manual__1", -1)
ARROW = pa.schema([pa.field("day", pa.string()), pa.field("amount", pa.int64())])
ICEBERG = Schema(
    NestedField(1, "day", StringType(), required=False),
    NestedField(2, "amount", LongType(), required=False),
)
BY_DAY = PartitionSpec(PartitionField(1, 1000, IdentityTransform(), "day"))


def rows(day: str, *amounts: int) -> pa.Table:
    return pa.table({"day": [day] * len(amounts), "amount": list(amounts)}, schema=ARROW)


@pytest.fixture
def warehouse(lake: Lake) -> str:
    return lake.uri("warehouse")


@pytest.fixture
def props(lake: Lake) -> dict[str, str]:
    """The FileIO properties every ``eos.iceberg(...)`` call of a test passes."""
    return lake.iceberg


@pytest.fixture
def reader(db: str, warehouse: str, lake: Lake) -> Iterator[SqlCatalog]:
    """A stock catalog on the ledger's database: the name, the URI, the warehouse and the
    storage's FileIO properties."""
    readers: list[SqlCatalog] = []

    def make() -> SqlCatalog:
        catalog = SqlCatalog("eos", uri=reader_uri(db), warehouse=warehouse, **lake.iceberg)
        readers.append(catalog)
        return catalog

    yield make
    for catalog in readers:
        catalog.close()


def table_rows(catalog: SqlCatalog, name: str = "lake.sales") -> list[tuple[str, int]]:
    data = catalog.load_table(name).scan().to_arrow()
    return sorted(zip(data["day"].to_pylist(), data["amount"].to_pylist(), strict=True))


def create(
    ledger: Ledger, warehouse: str, props: dict[str, str], *, schema=ARROW, spec=None, key="create"
) -> None:
    ledger.run(
        key,
        lambda eos: bool(
            eos.iceberg(
                "lake.sales",
                schema=schema,
                partition_spec=spec,
                warehouse=warehouse,
                properties=props,
            )
        ),
    )


def append(props: dict[str, str], day: str, *amounts: int, then=None):
    def fn(eos):
        table = eos.iceberg("lake.sales", properties=props)
        table.append(rows(day, *amounts))
        if then is not None:
            then(eos)
        return {"snapshot": table.current_snapshot().snapshot_id}

    return fn


def waiting_for_a_lock(db: str, timeout: float = 10) -> None:
    """Until a session of the test database waits for a lock."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(db, autocommit=True) as conn:
        while time.monotonic() < deadline:
            waiting = conn.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ).fetchone()[0]
            if waiting:
                return
            time.sleep(0.02)
    raise AssertionError("no session waits for a lock")


def test_append_commits_with_the_ledger(ledger: Ledger, reader, warehouse: str, props, conn):
    def fn(eos):
        table = eos.iceberg("lake.sales", schema=ARROW, warehouse=warehouse, properties=props)
        table.append(rows("2024-01-01", 1, 2, 3))
        return {"snapshot": table.current_snapshot().snapshot_id}

    result = ledger.run("sales/2024-01-01", fn, origin=TI)
    catalog = reader()
    table = catalog.load_table("lake.sales")
    assert table_rows(catalog) == [("2024-01-01", 1), ("2024-01-01", 2), ("2024-01-01", 3)]
    assert [s.snapshot_id for s in table.snapshots()] == [result["snapshot"]]
    assert catalog.list_namespaces() == [("lake",)]
    assert conn.execute(
        "SELECT catalog_name, table_namespace, table_name FROM public.iceberg_tables"
    ).fetchall() == [("eos", "lake", "sales")]
    assert events(conn) == [("claimed", 1), ("committed", 1)]


def test_a_function_that_raises_after_its_append_changes_nothing(
    ledger: Ledger, reader, warehouse: str, props
):
    create(ledger, warehouse, props)
    ledger.run("day1", append(props, "2024-01-01", 1))
    before = reader().load_table("lake.sales").current_snapshot().snapshot_id

    def boom(eos):
        raise RuntimeError("after the append")

    with pytest.raises(RuntimeError, match="after the append"):
        ledger.run("day2", append(props, "2024-01-02", 2, then=boom))
    catalog = reader()
    table = catalog.load_table("lake.sales")
    assert table.current_snapshot().snapshot_id == before
    assert len(table.snapshots()) == 1
    assert table_rows(catalog) == [("2024-01-01", 1)]
    # the retry writes it once
    ledger.run("day2", append(props, "2024-01-02", 2), attempt=2)
    assert table_rows(reader()) == [("2024-01-01", 1), ("2024-01-02", 2)]


def test_a_table_created_by_a_failed_effect_does_not_exist(
    ledger: Ledger, reader, warehouse: str, props, conn
):
    def fn(eos):
        table = eos.iceberg("lake.sales", schema=ARROW, warehouse=warehouse, properties=props)
        table.append(rows("2024-01-01", 1))
        raise RuntimeError("after creating")

    with pytest.raises(RuntimeError, match="after creating"):
        ledger.run("k", fn)
    catalog = reader()
    with pytest.raises(NoSuchTableError):
        catalog.load_table("lake.sales")
    assert catalog.list_namespaces() == []
    assert events(conn) == [("claimed", 1), ("failed", 1)]


def test_a_fenced_attempt_cannot_publish_its_snapshot(
    ledger: Ledger, reader, warehouse: str, props, db
):
    """Try 1 appended and is still running (a zombie) when try 2 claims the key: try 2's
    swap waits for the zombie's pointer lock, the zombie is fenced at its commit, and only
    try 2's snapshot lands."""
    create(ledger, warehouse, props)
    in_run, release = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def hold(eos):
        in_run.set()
        assert release.wait(20)

    def zombie():
        try:
            ledger.run("k", append(props, "zombie", 1, then=hold), attempt=1, origin=TI)
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion
            outcome["zombie"] = exc

    def newer():
        outcome["newer"] = ledger.run("k", append(props, "newer", 2), attempt=2, origin=TI)

    first = threading.Thread(target=zombie)
    first.start()
    assert in_run.wait(20)
    second = threading.Thread(target=newer)
    second.start()
    waiting_for_a_lock(db)  # try 2 claimed the key and waits for the table's pointer
    release.set()
    first.join(20)
    second.join(20)
    assert isinstance(outcome["zombie"], FencedError)
    catalog = reader()
    table = catalog.load_table("lake.sales")
    assert table_rows(catalog) == [("newer", 2)]
    assert [s.snapshot_id for s in table.snapshots()] == [outcome["newer"]["snapshot"]]
    with psycopg.connect(db) as conn:
        found = events(conn, "k")
    # try 2 commits once the zombie rolled back, while the zombie records its fencing
    assert found[:2] == [("claimed", 1), ("claimed", 2)]
    assert sorted(found[2:]) == [("committed", 2), ("fenced", 1)]


def test_a_retry_after_the_commit_adds_nothing(ledger: Ledger, reader, warehouse: str, props):
    create(ledger, warehouse, props)
    first = ledger.run_outcome("day1", append(props, "2024-01-01", 1), origin=TI)
    again = ledger.run_outcome("day1", append(props, "2024-01-01", 1), attempt=2, origin=TI)
    assert (first.action, again.action) == ("committed", "skipped")
    assert again.result == first.result
    table = reader().load_table("lake.sales")
    assert len(table.snapshots()) == 1
    assert table_rows(reader()) == [("2024-01-01", 1)]


@pytest.mark.parametrize("writers", [2, 4])
def test_concurrent_effects_appending_to_one_table_all_land(
    ledger: Ledger, reader, warehouse: str, props, writers: int, caplog
):
    """Each effect loads the same metadata, then appends: each commit waits for the table's
    pointer, finds it moved by the effects before it and re-applies its append on the new
    metadata before its swap — no swap is lost, so pyiceberg never has to retry one."""
    create(ledger, warehouse, props)
    loaded = threading.Barrier(writers)
    errors: list[BaseException] = []

    def fn(i: int):
        def body(eos):
            table = eos.iceberg("lake.sales", properties=props)
            loaded.wait(20)
            table.append(rows(f"day{i}", i))
            return {"snapshot": table.current_snapshot().snapshot_id}

        return body

    def run(i: int) -> None:
        try:
            ledger.run(f"writer/{i}", fn(i))
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            errors.append(exc)

    caplog.set_level(logging.WARNING, logger="pyiceberg")
    threads = [threading.Thread(target=run, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    catalog = reader()
    assert table_rows(catalog) == [(f"day{i}", i) for i in range(writers)]
    table = catalog.load_table("lake.sales")
    snapshots = table.snapshots()
    assert len(snapshots) == writers
    # one line of history: each snapshot's parent is the one before it
    assert [s.parent_snapshot_id for s in snapshots[1:]] == [s.snapshot_id for s in snapshots[:-1]]
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]


def test_an_overwrite_invalidated_by_a_concurrent_commit_is_a_retryable_conflict(
    ledger: Ledger, reader, warehouse: str, props
):
    """Both effects read the table; the first deletes the partition's files and commits; the
    second's overwrite of that partition, rebuilt on the new metadata, finds the files it
    replaces gone (pyiceberg's validation): a retryable conflict, nothing of it committed;
    its retry lands."""
    create(ledger, warehouse, props, schema=ICEBERG, spec=BY_DAY)
    ledger.run("load", append(props, "d1", 1, 2))
    loaded, first_committed = threading.Barrier(2), threading.Event()
    outcomes: dict[str, object] = {}

    def delete(eos):
        table = eos.iceberg("lake.sales", properties=props)
        loaded.wait(20)
        table.delete(EqualTo("day", "d1"))

    def overwrite(eos):
        table = eos.iceberg("lake.sales", properties=props)
        loaded.wait(20)
        assert first_committed.wait(20)
        table.overwrite(rows("d1", 10), overwrite_filter=EqualTo("day", "d1"))
        return table.current_snapshot().snapshot_id

    def run(key, fn):
        try:
            outcomes[key] = ledger.run(key, fn)
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            outcomes[key] = exc
        if key == "delete":
            first_committed.set()

    threads = [
        threading.Thread(target=run, args=("delete", delete)),
        threading.Thread(target=run, args=("overwrite", overwrite)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert outcomes["delete"] is None
    conflict = outcomes["overwrite"]
    assert isinstance(conflict, LakehouseConflictError), conflict
    assert conflict.retryable and "Retry" in str(conflict)
    assert table_rows(reader()) == []

    def overwrite_again(eos):
        eos.iceberg("lake.sales", properties=props).overwrite(
            rows("d1", 10), overwrite_filter=EqualTo("day", "d1")
        )

    ledger.run("overwrite", overwrite_again, attempt=2)
    assert table_rows(reader()) == [("d1", 10)]


def test_replace_overwrites_one_partition(ledger: Ledger, reader, warehouse: str, props, db):
    create(ledger, warehouse, props, schema=ICEBERG, spec=BY_DAY)

    def day(name: str, *amounts: int):
        def fn(eos):
            table = eos.iceberg("lake.sales", properties=props)
            table.overwrite(rows(name, *amounts), overwrite_filter=EqualTo("day", name))
            return sum(amounts)

        return fn

    ledger.run("day/1", day("2024-01-01", 1, 2))
    ledger.run("day/2", day("2024-01-02", 5, 6))
    catalog = reader()
    before = catalog.load_table("lake.sales")
    snapshots_before = len(before.snapshots())
    outcome = ledger.run_outcome("day/1", day("2024-01-01", 10, 20), on_committed="replace")
    assert (outcome.action, outcome.version) == ("replaced", 2)
    after = reader().load_table("lake.sales")
    assert table_rows(reader()) == [
        ("2024-01-01", 10),
        ("2024-01-01", 20),
        ("2024-01-02", 5),
        ("2024-01-02", 6),
    ]
    # one commit (one swap of the pointer) with the replacing effect; pyiceberg's overwrite
    # writes it as two snapshots: the partition's files deleted, the new files appended
    assert after.metadata_location != before.metadata_location
    with psycopg.connect(db) as conn:
        previous = conn.execute(
            "SELECT previous_metadata_location FROM public.iceberg_tables"
        ).fetchone()[0]
    assert previous == before.metadata_location
    new = after.snapshots()[snapshots_before:]
    assert [s.summary.operation.value for s in new] == ["delete", "append"]
    assert new[0].parent_snapshot_id == before.current_snapshot().snapshot_id
    assert after.scan().to_arrow().num_rows == before.scan().to_arrow().num_rows


def test_an_unknown_table_without_schema_is_refused_and_nothing_commits(
    ledger: Ledger, reader, warehouse: str, props, conn
):
    def fn(eos):
        eos.iceberg("lake.nope", warehouse=warehouse, properties=props)
        return 1

    with pytest.raises(ConfigurationError, match=r"'lake\.nope' does not exist.*schema="):
        ledger.run("k", fn)
    assert events(conn) == [("claimed", 1), ("failed", 1)]
    assert conn.execute("SELECT state::text FROM eos.ledger").fetchone()[0] != "committed"
    with pytest.raises(NoSuchTableError):
        reader().load_table("lake.nope")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"identifier": "sales"}, "not 'namespace.table'"),
        ({"identifier": "lake."}, "not 'namespace.table'"),
        ({"identifier": 42}, "must be 'namespace.table'"),
        ({"identifier": "lake.sales", "schema": {"day": "string"}}, "schema= must be"),
        ({"identifier": "lake.sales", "schema": ARROW, "partition_spec": ["day"]}, "PartitionSpec"),
        ({"identifier": "lake.sales", "schema": ARROW}, "needs warehouse="),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(
    ledger: Ledger, conn, props, kwargs, message
):
    def fn(eos):
        eos.iceberg(**kwargs, properties=props)

    with pytest.raises(ConfigurationError, match=message):
        ledger.run("k", fn)
    assert conn.execute("SELECT to_regclass('public.iceberg_tables')").fetchone()[0] is None


def test_a_reader_sees_the_old_snapshot_while_the_effect_is_open(
    ledger: Ledger, reader, warehouse: str, props
):
    create(ledger, warehouse, props)
    ledger.run("day1", append(props, "2024-01-01", 1))
    catalog = reader()
    old = catalog.load_table("lake.sales").current_snapshot().snapshot_id
    appended, release = threading.Event(), threading.Event()

    def hold(eos):
        appended.set()
        assert release.wait(20)

    thread = threading.Thread(
        target=lambda: ledger.run("day2", append(props, "2024-01-02", 2, then=hold))
    )
    thread.start()
    try:
        assert appended.wait(20)
        assert catalog.load_table("lake.sales").current_snapshot().snapshot_id == old
        assert table_rows(catalog) == [("2024-01-01", 1)]
    finally:
        release.set()
        thread.join(20)
    assert table_rows(catalog) == [("2024-01-01", 1), ("2024-01-02", 2)]


def test_schema_evolution_and_delete_join_the_effect(ledger: Ledger, reader, warehouse: str, props):
    create(ledger, warehouse, props)
    ledger.run("day1", append(props, "2024-01-01", 1, 2))

    def evolve(fail: bool):
        def fn(eos):
            table = eos.iceberg("lake.sales", properties=props)
            with table.update_schema() as update:
                update.add_column("note", StringType())
            table.delete(EqualTo("amount", 1))
            if fail:
                raise RuntimeError("after evolving")
            return [f.name for f in table.schema().fields]

        return fn

    with pytest.raises(RuntimeError):
        ledger.run("evolve", evolve(True))
    table = reader().load_table("lake.sales")
    assert [f.name for f in table.schema().fields] == ["day", "amount"]
    assert table_rows(reader()) == [("2024-01-01", 1), ("2024-01-01", 2)]
    assert ledger.run("evolve", evolve(False), attempt=2) == ["day", "amount", "note"]
    table = reader().load_table("lake.sales")
    assert [f.name for f in table.schema().fields] == ["day", "amount", "note"]
    assert table_rows(reader()) == [("2024-01-01", 2)]


def test_a_schema_change_waiting_for_a_concurrent_append_lands_after_it(
    ledger: Ledger, reader, warehouse: str, props, db
):
    """The append holds the table's pointer; the schema change's swap waits, loses, and is
    sent again on the new metadata (its requirements still hold)."""
    create(ledger, warehouse, props)
    appended, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def hold(eos):
        appended.set()
        assert release.wait(20)

    def evolve(eos):
        with eos.iceberg("lake.sales", properties=props).update_schema() as update:
            update.add_column("note", StringType())

    def run(key, fn):
        try:
            ledger.run(key, fn)
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            errors.append(exc)

    first = threading.Thread(target=run, args=("append", append(props, "2024-01-01", 1, then=hold)))
    first.start()
    assert appended.wait(20)
    second = threading.Thread(target=run, args=("evolve", evolve))
    second.start()
    waiting_for_a_lock(db)
    release.set()
    first.join(20)
    second.join(20)
    assert errors == []
    table = reader().load_table("lake.sales")
    assert [f.name for f in table.schema().fields] == ["day", "amount", "note"]
    assert table_rows(reader()) == [("2024-01-01", 1)]


def test_concurrent_effects_creating_one_table_both_land(
    ledger: Ledger, reader, warehouse: str, props
):
    """Both find no namespace and no table; the second one's inserts wait for the first
    effect, hit its rows, and go on in the same transaction (the failed insert was a
    savepoint) with the table the first one created."""
    ledger.run(
        "catalog",
        lambda eos: bool(
            eos.iceberg("other.t", schema=ARROW, warehouse=warehouse, properties=props)
        ),
    )
    started = threading.Barrier(2)
    errors: list[BaseException] = []

    def body(i: int):
        def fn(eos):
            started.wait(20)
            table = eos.iceberg("lake.sales", schema=ARROW, warehouse=warehouse, properties=props)
            table.append(rows(f"day{i}", i))

        return fn

    def run(i: int) -> None:
        try:
            ledger.run(f"creator/{i}", body(i))
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert table_rows(reader()) == [("day0", 0), ("day1", 1)]


def test_a_table_used_after_its_effect_is_refused(ledger: Ledger, warehouse: str, props):
    create(ledger, warehouse, props)
    kept = {}

    def fn(eos):
        kept["table"] = eos.iceberg("lake.sales", properties=props)

    ledger.run("k", fn)
    with pytest.raises(MisuseError, match="after its effect ended"):
        kept["table"].append(rows("late", 1))


def test_commit_and_rollback_stay_refused_and_the_connection_stays_usable(
    ledger: Ledger, warehouse: str, props
):
    """The catalog never ends the effect's transaction; user SQL on eos.conn after the
    append commits with it."""

    def fn(eos):
        eos.iceberg("lake.sales", schema=ARROW, warehouse=warehouse, properties=props).append(
            rows("d", 1)
        )
        eos.conn.execute("CREATE TABLE marker (n int)")
        eos.conn.execute("INSERT INTO marker VALUES (1)")
        with pytest.raises(MisuseError):
            eos.conn.commit()
        return eos.conn.execute("SELECT count(*) FROM marker").fetchone()[0]

    assert ledger.run("k", fn) == 1


def test_without_pyiceberg_the_error_names_the_extra(ledger: Ledger, props, monkeypatch):
    for name in [m for m in sys.modules if m == "pyiceberg" or m.startswith("pyiceberg.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "eos_airflow.protocol.iceberg", raising=False)

    def fn(eos):
        eos.iceberg("lake.sales", properties=props)

    with pytest.raises(ConfigurationError, match=r"pip install 'eos-airflow\[lakehouse\]'"):
        ledger.run("k", fn)


@pytest.mark.parametrize("step", ["after_claim", "before_commit", "after_commit"])
def test_a_failpoint_at_each_step_lands_the_append_once(
    ledger: Ledger, reader, warehouse: str, props, monkeypatch, step
):
    create(ledger, warehouse, props)
    monkeypatch.setenv("EOS_FAILPOINTS", f"{step}@1=raise")
    with pytest.raises(FailpointError):
        ledger.run("day1", append(props, "2024-01-01", 1), origin=TI)
    committed = step == "after_commit"
    assert table_rows(reader()) == ([("2024-01-01", 1)] if committed else [])
    outcome = ledger.run_outcome("day1", append(props, "2024-01-01", 1), attempt=2, origin=TI)
    assert outcome.action == ("skipped" if committed else "committed")
    assert table_rows(reader()) == [("2024-01-01", 1)]
    assert len(reader().load_table("lake.sales").snapshots()) == 1


CHILD = """
import json
import sys
import pyarrow as pa
from eos_airflow import Ledger, Origin

dsn, key, props = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
data = pa.table({"day": ["2024-01-01"], "amount": [1]})

def fn(eos):
    eos.iceberg("lake.sales", properties=props).append(data)
    return 1

Ledger(dsn).run(key, fn, attempt=1, origin=Origin("lake", "load", "manual__1", -1))
"""


@pytest.mark.parametrize("step", ["before_commit", "after_commit"])
def test_a_process_killed_at_a_step_lands_the_append_once(
    ledger: Ledger, reader, warehouse: str, props, db: str, step
):
    """The attempt's process dies (``os._exit``) after its append: before the commit the
    server rolls the effect back and frees the table's pointer; the retry appends once."""
    create(ledger, warehouse, props)
    env = {**os.environ, "EOS_FAILPOINTS": f"{step}@1=exit", "PYTHONPATH": str(ROOT)}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, db, "day1", json.dumps(props)],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert child.returncode == 137, child.stderr.decode()[-2000:]
    committed = step == "after_commit"
    assert table_rows(reader()) == ([("2024-01-01", 1)] if committed else [])
    outcome = ledger.run_outcome(
        "day1", append(props, "2024-01-01", 1), attempt=2, origin=TI, wait_timeout=60
    )
    assert outcome.action == ("skipped" if committed else "committed")
    assert table_rows(reader()) == [("2024-01-01", 1)]
    assert len(reader().load_table("lake.sales").snapshots()) == 1
