"""``eos-airflow lake orphans``: the files a rolled-back or fenced effect left in Iceberg and
Delta tables are listed — exactly those, never a committed one, never a fresh one — and
``--delete`` removes them while the tables read the same rows (file:// and s3://)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pyarrow as pa
import pytest
from deltalake import DeltaTable
from pyiceberg.catalog.sql import SqlCatalog

from eos_airflow import FencedError, LakehouseConflictError, Ledger, Origin
from eos_airflow.protocol.iceberg import reader_uri
from tests.conftest import ROOT
from tests.lakehouse.conftest import Lake
from tests.lakehouse.test_iceberg import waiting_for_a_lock

TI = Origin("lake", "load", "manual__1", -1)
ARROW = pa.schema([pa.field("day", pa.string()), pa.field("amount", pa.int64())])


def rows(day: str, *amounts: int) -> pa.Table:
    return pa.table({"day": [day] * len(amounts), "amount": list(amounts)}, schema=ARROW)


def cli(db: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """``eos-airflow lake orphans ...`` as a separate process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EOS_LEDGER_DSN", None)
    return subprocess.run(
        [sys.executable, "-m", "eos_airflow.cli.main", "lake", "orphans", *argv, "--dsn", db],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def listed(db: str, lake: Lake, *argv: str) -> dict:
    props = [f"--property={k}={v}" for k, v in lake.iceberg.items()]
    done = cli(db, *argv, *props, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def paths(report: dict, lake: Lake, *parts: str) -> set[str]:
    """The listed files as paths relative to ``lake.uri(*parts)``."""
    base = lake.uri(*parts) + "/"
    found = {o["path"] for o in report["orphans"]}
    assert all(p.startswith(base) for p in found), found
    return {p[len(base) :] for p in found}


def files(lake: Lake, *parts: str) -> set[str]:
    """The files under ``lake.uri(*parts)``. On S3, deleting a file through pyarrow (as
    pyiceberg's FileIO does) leaves a zero-byte directory marker (a key ending in ``/``) so
    that its directory still exists; a marker is no file of any table, and no reader sees
    it."""
    return {p for p in lake.files(*parts) if not p.endswith("/")}


@pytest.fixture
def reader(db: str, lake: Lake) -> Iterator:
    readers: list[SqlCatalog] = []

    def make() -> SqlCatalog:
        catalog = SqlCatalog(
            "eos", uri=reader_uri(db), warehouse=lake.uri("warehouse"), **lake.iceberg
        )
        readers.append(catalog)
        return catalog

    yield make
    for catalog in readers:
        catalog.close()


def table_rows(catalog: SqlCatalog, name: str = "lake.sales") -> list[tuple[str, int]]:
    data = catalog.load_table(name).scan().to_arrow()
    return sorted(zip(data["day"].to_pylist(), data["amount"].to_pylist(), strict=True))


def create(ledger: Ledger, lake: Lake) -> None:
    def fn(eos):
        eos.iceberg(
            "lake.sales", schema=ARROW, warehouse=lake.uri("warehouse"), properties=lake.iceberg
        )

    ledger.run("create", fn)


def append(lake: Lake, day: str, *amounts: int, then=None):
    def fn(eos):
        eos.iceberg("lake.sales", properties=lake.iceberg).append(rows(day, *amounts))
        if then is not None:
            then(eos)

    return fn


def boom(eos) -> None:
    raise RuntimeError("after the append")


def failed_append(ledger: Ledger, lake: Lake, key: str) -> None:
    with pytest.raises(RuntimeError, match="after the append"):
        ledger.run(key, append(lake, key, 9, then=boom))


def test_files_of_a_failed_effect_are_listed_then_deleted(
    ledger: Ledger, lake: Lake, reader, db: str
):
    create(ledger, lake)
    ledger.run("day1", append(lake, "2024-01-01", 1, 2))
    committed = files(lake, "warehouse")
    failed_append(ledger, lake, "day2")
    left = files(lake, "warehouse") - committed
    # the data file, the manifest, the manifest list and the metadata file
    assert {p.rsplit(".", 1)[-1] for p in left} == {"parquet", "avro", "json"}
    assert len(left) == 4

    report = listed(db, lake, "--older-than", "0s")
    assert paths(report, lake, "warehouse") == left
    assert report["count"] == 4 and report["deleted"] == 0
    assert report["bytes"] == sum(o["size"] for o in report["orphans"]) > 0
    assert {o["table"] for o in report["orphans"]} == {"lake.sales"}
    assert files(lake, "warehouse") == committed | left  # listing deletes nothing
    elsewhere = listed(db, lake, "--older-than", "0s", "--warehouse", lake.uri("other"))
    assert elsewhere["count"] == 0
    here = listed(db, lake, "--older-than", "0s", "--warehouse", lake.uri("warehouse"))
    assert paths(here, lake, "warehouse") == left

    deleted = listed(db, lake, "--older-than", "0s", "--delete", "--table", "lake.sales")
    assert paths(deleted, lake, "warehouse") == left and deleted["deleted"] == 4
    assert files(lake, "warehouse") == committed
    assert table_rows(reader()) == [("2024-01-01", 1), ("2024-01-01", 2)]
    assert listed(db, lake, "--older-than", "0s")["count"] == 0
    # the table still takes commits
    ledger.run("day2", append(lake, "2024-01-02", 3), attempt=2)
    assert table_rows(reader())[-1] == ("2024-01-02", 3)


def test_files_of_a_fenced_attempt_are_listed_not_those_of_the_try_that_fenced_it(
    ledger: Ledger, lake: Lake, reader, db: str
):
    create(ledger, lake)
    before = files(lake, "warehouse")
    in_run, release = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def hold(eos):
        in_run.set()
        assert release.wait(20)

    def zombie():
        try:
            ledger.run("k", append(lake, "zombie", 1, then=hold), attempt=1, origin=TI)
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion
            outcome["zombie"] = exc

    first = threading.Thread(target=zombie)
    first.start()
    assert in_run.wait(20)
    zombie_files = files(lake, "warehouse") - before  # appended, not committed yet
    second = threading.Thread(
        target=lambda: ledger.run("k", append(lake, "newer", 2), attempt=2, origin=TI)
    )
    second.start()
    waiting_for_a_lock(db)  # try 2 claimed the key and waits for the table's pointer
    release.set()
    first.join(20)
    second.join(20)
    assert isinstance(outcome["zombie"], FencedError)
    assert table_rows(reader()) == [("newer", 2)]
    assert len(zombie_files) == 4

    report = listed(db, lake, "--older-than", "0s")
    assert paths(report, lake, "warehouse") == zombie_files
    committed = files(lake, "warehouse") - zombie_files
    listed(db, lake, "--older-than", "0s", "--delete")
    assert files(lake, "warehouse") == committed
    assert table_rows(reader()) == [("newer", 2)]


def test_files_newer_than_the_cutoff_are_not_listed(ledger: Ledger, lake: Lake, reader, db: str):
    create(ledger, lake)
    ledger.run("day1", append(lake, "2024-01-01", 1))
    committed = files(lake, "warehouse")
    failed_append(ledger, lake, "old")
    old = files(lake, "warehouse") - committed
    time.sleep(1.5)  # beyond the store's one-second clock
    cutoff = datetime.now(UTC).isoformat()
    time.sleep(1.5)
    failed_append(ledger, lake, "new")
    new = files(lake, "warehouse") - committed - old
    assert len(old) == len(new) == 4

    assert listed(db, lake, "--older-than", "1h")["count"] == 0
    assert listed(db, lake)["count"] == 0  # the default: a day
    assert paths(listed(db, lake, "--older-than", cutoff), lake, "warehouse") == old
    listed(db, lake, "--older-than", cutoff, "--delete")
    assert files(lake, "warehouse") == committed | new
    assert table_rows(reader()) == [("2024-01-01", 1)]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--table", "lake.nope"], "no Iceberg table 'lake.nope'"),
        (["--table", "sales"], "not NAMESPACE.TABLE"),
        (["--older-than", "3 fortnights"], "--older-than '3 fortnights' is neither a duration"),
        (["--property", "s3.endpoint"], "--property 's3.endpoint' is not KEY=VALUE"),
        (["--delta", "{lake}/nope"], "no Delta table at"),
    ],
)
def test_bad_input_is_a_clear_error_and_nothing_is_deleted(
    ledger: Ledger, lake: Lake, db: str, argv, message
):
    create(ledger, lake)
    failed_append(ledger, lake, "day1")
    before = files(lake, "warehouse")
    argv = [a.replace("{lake}", lake.root) for a in argv]
    options = [f"--storage-option={k}={v}" for k, v in lake.delta.items()]
    if "--delta" not in argv:
        options = [f"--property={k}={v}" for k, v in lake.iceberg.items()]
    done = cli(db, "--older-than", "0s", *argv, *options, "--delete")
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert files(lake, "warehouse") == before


def test_without_tables_nothing_is_listed(db: str, lake: Lake):
    done = cli(db, "--older-than", "0s")
    assert done.returncode == 0, done.stderr
    assert "0 orphan files, 0 bytes" in done.stdout


def delta_write(lake: Lake, data):
    def fn(eos):
        return eos.delta(lake.uri("events"), storage_options=lake.delta).write(data)

    return fn


def delta_rows(lake: Lake) -> list[tuple[str, int]]:
    data = DeltaTable(lake.uri("events"), storage_options=lake.delta or None).to_pyarrow_table()
    return sorted(zip(data["day"].to_pylist(), data["amount"].to_pylist(), strict=True))


def test_delta_files_of_a_write_that_lost_its_commit_are_listed_then_deleted(
    ledger: Ledger, lake: Lake, db: str
):
    """A zombie's Delta write conflicts with the try that fenced it: its data file stays,
    unreferenced; ``--delta`` lists exactly it, and ``--delete`` removes it."""
    ledger.run("base", delta_write(lake, rows("base", 0)), origin=TI)
    reading, release = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def slow_rows():
        reading.set()
        assert release.wait(30)
        yield from rows("zombie", 1).to_batches()

    def zombie():
        data = pa.RecordBatchReader.from_batches(ARROW, slow_rows())
        try:
            ledger.run("k", delta_write(lake, data), attempt=1, origin=TI)
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion
            outcome["zombie"] = exc

    first = threading.Thread(target=zombie)
    first.start()
    assert reading.wait(30)
    ledger.run("k", delta_write(lake, rows("newer", 2)), attempt=2, origin=TI)
    committed = files(lake, "events")
    release.set()
    first.join(60)
    assert isinstance(outcome["zombie"], LakehouseConflictError), outcome["zombie"]
    left = {p for p in files(lake, "events") - committed if not p.startswith("_delta_log/")}
    assert len(left) == 1 and next(iter(left)).endswith(".parquet")

    options = [f"--storage-option={k}={v}" for k, v in lake.delta.items()]
    done = cli(db, "--delta", lake.uri("events"), *options, "--older-than", "0s", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert paths(report, lake, "events") == left
    assert report["count"] == 1 and report["bytes"] > 0

    done = cli(db, "--delta", lake.uri("events"), *options, "--older-than", "0s", "--delete")
    assert done.returncode == 0, done.stderr
    assert "1 orphan files" in done.stdout and "1 deleted" in done.stdout
    assert not left & files(lake, "events")
    assert committed - files(lake, "events") == set()
    assert delta_rows(lake) == [("base", 0), ("newer", 2)]
