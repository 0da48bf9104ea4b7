"""``eos.delta``: Delta writes made idempotent by Delta's transaction marker (app id = the
effect key, version = the ledger version written), on file:// and on the S3 API, read back
with deltalake and DuckDB (real PostgreSQL ledger)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import duckdb
import psycopg
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from eos_airflow import (
    ConfigurationError,
    FailpointError,
    FencedError,
    LakehouseConflictError,
    LakehouseStorageError,
    Ledger,
    MisuseError,
    Origin,
)
from tests.conftest import ROOT, events
from tests.lakehouse.conftest import Lake

TI = Origin("lake", "load", "manual__1", -1)
ARROW = pa.schema([pa.field("day", pa.string()), pa.field("amount", pa.int64())])


def rows(day: str, *amounts: int) -> pa.Table:
    return pa.table({"day": [day] * len(amounts), "amount": list(amounts)}, schema=ARROW)


def write(lake: Lake, data: pa.Table | None = None, *, name: str = "sales", **options):
    def fn(eos):
        return eos.delta(lake.uri(name), storage_options=lake.delta).write(
            rows("2024-01-01", 1, 2) if data is None else data, **options
        )

    return fn


def table(lake: Lake, name: str = "sales") -> DeltaTable:
    return DeltaTable(lake.uri(name), storage_options=lake.delta or None)


def table_rows(lake: Lake, name: str = "sales") -> list[tuple[str, int]]:
    data = table(lake, name).to_pyarrow_table()
    return sorted(zip(data["day"].to_pylist(), data["amount"].to_pylist(), strict=True))


def writes_of(lake: Lake, key: str, name: str = "sales") -> int:
    """How many commits of the table's log carry ``key``'s transaction marker."""
    dt = table(lake, name)
    found = 0
    for version in range(dt.version() + 1):
        log = f"_delta_log/{version:020d}.json"
        text = _read(lake, f"{name}/{log}")
        found += sum(
            1
            for line in text.splitlines()
            if line.strip() and json.loads(line).get("txn", {}).get("appId") == key
        )
    return found


def _read(lake: Lake, path: str) -> str:
    if lake.s3 is None:
        return open(lake.uri(path).removeprefix("file://"), encoding="utf-8").read()
    bucket = lake.root.removeprefix("s3://")
    body = lake.s3.client().get_object(Bucket=bucket, Key=path)["Body"]
    return body.read().decode()


def race_a_zombie(ledger: Ledger, lake: Lake) -> BaseException | None:
    """Try 1 of key ``k`` reads the table and starts its write, whose data comes only once
    try 2 took the key over, wrote ``("newer", 2)`` and committed; returns what try 1
    raised."""
    reading, release = threading.Event(), threading.Event()
    outcome: dict[str, BaseException] = {}

    def slow_rows():  # the zombie's data: produced only once try 2 has committed
        reading.set()
        assert release.wait(30)
        yield from rows("zombie", 1).to_batches()

    def zombie():
        reader = pa.RecordBatchReader.from_batches(ARROW, slow_rows())
        try:
            ledger.run("k", write(lake, reader), attempt=1, origin=TI)
        except Exception as exc:  # noqa: BLE001 - returned for the assertion
            outcome["zombie"] = exc

    first = threading.Thread(target=zombie)
    first.start()
    assert reading.wait(30)  # try 1 owns the key, read the table, is writing
    ledger.run("k", write(lake, rows("newer", 2)), attempt=2, origin=TI)
    release.set()
    first.join(60)
    return outcome.get("zombie")


def test_a_write_commits_with_its_marker(ledger: Ledger, lake: Lake, conn):
    result = ledger.run("sales/2024-01-01", write(lake), origin=TI)
    assert result == {
        "table_uri": lake.uri("sales"),
        "delta_version": 1,  # version 0 created the table, empty
        "app_id": "sales/2024-01-01",
        "txn_version": 1,
        "written": True,
    }
    assert table_rows(lake) == [("2024-01-01", 1), ("2024-01-01", 2)]
    assert table(lake).transaction_version("sales/2024-01-01") == 1
    assert events(conn) == [("claimed", 1), ("committed", 1)]
    # DuckDB reads the same table through Arrow
    arrow = table(lake).to_pyarrow_dataset()  # noqa: F841 - read by the query below
    assert duckdb.sql("SELECT sum(amount) FROM arrow").fetchall() == [(3,)]


def test_a_retry_and_a_second_run_add_no_version(ledger: Ledger, lake: Lake):
    first = ledger.run_outcome("day1", write(lake), origin=TI)
    retry = ledger.run_outcome("day1", write(lake), attempt=2, origin=TI)
    other_run = ledger.run_outcome("day1", write(lake), origin=Origin("lake", "load", "r2", -1))
    assert (first.action, retry.action, other_run.action) == ("committed", "skipped", "skipped")
    assert table(lake).version() == 1  # the creation, the write
    assert table_rows(lake) == [("2024-01-01", 1), ("2024-01-01", 2)]


@pytest.mark.parametrize("step", ["after_claim", "after_delta_commit", "before_commit"])
def test_a_failpoint_at_each_step_writes_once(ledger: Ledger, lake: Lake, conn, monkeypatch, step):
    """A fault between Delta's commit and the ledger's: the retry finds its marker, writes
    nothing, and commits the ledger; a fault before the write: the retry writes once."""
    monkeypatch.setenv("EOS_FAILPOINTS", f"{step}@1=raise")
    with pytest.raises(FailpointError):
        ledger.run("day1", write(lake), origin=TI)
    wrote = step != "after_claim"
    assert (table_rows(lake) if wrote else lake.files("sales")) == (
        [("2024-01-01", 1), ("2024-01-01", 2)] if wrote else []
    )
    outcome = ledger.run_outcome("day1", write(lake), attempt=2, origin=TI)
    assert outcome.action == "committed"
    assert outcome.result["written"] is not wrote
    assert outcome.result["txn_version"] == 1
    assert table_rows(lake) == [("2024-01-01", 1), ("2024-01-01", 2)]
    assert writes_of(lake, "day1") == 1
    assert table(lake).version() == 1
    assert [e for e, _ in events(conn, "day1")] == ["claimed", "failed", "claimed", "committed"]


CHILD = """
import json, sys
import pyarrow as pa
from eos_airflow import Ledger, Origin

dsn, key, uri, options = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
data = pa.table({"day": ["2024-01-01"], "amount": [1]})

def fn(eos):
    return eos.delta(uri, storage_options=options).write(data)

Ledger(dsn).run(key, fn, attempt=1, origin=Origin("lake", "load", "manual__1", -1))
"""


@pytest.mark.parametrize("step", ["after_delta_commit", "before_commit", "after_commit"])
def test_a_process_killed_at_a_step_writes_once(ledger: Ledger, lake: Lake, db: str, step):
    env = {**os.environ, "EOS_FAILPOINTS": f"{step}@1=exit", "PYTHONPATH": str(ROOT)}
    args = [db, "day1", lake.uri("sales"), json.dumps(lake.delta)]
    child = subprocess.run(
        [sys.executable, "-c", CHILD, *args], env=env, capture_output=True, timeout=120
    )
    assert child.returncode == 137, child.stderr.decode()[-2000:]
    assert table_rows(lake) == [("2024-01-01", 1)]
    outcome = ledger.run_outcome(
        "day1", write(lake, rows("2024-01-01", 1)), attempt=2, origin=TI, wait_timeout=60
    )
    assert outcome.action == ("skipped" if step == "after_commit" else "committed")
    assert table_rows(lake) == [("2024-01-01", 1)]
    assert writes_of(lake, "day1") == 1


def test_replace_overwrites_one_partition(ledger: Ledger, lake: Lake, conn):
    ledger.run("day1", write(lake, rows("d1", 1, 2), partition_by="day"), origin=TI)
    ledger.run("day2", write(lake, rows("d2", 5)), origin=TI)
    replaced = ledger.run_outcome(
        "day1",
        write(lake, rows("d1", 10, 20), mode="overwrite", predicate="day = 'd1'"),
        on_committed="replace",
        origin=TI,
    )
    assert replaced.action == "replaced"
    assert (replaced.version, replaced.result["txn_version"]) == (2, 2)
    assert table_rows(lake) == [("d1", 10), ("d1", 20), ("d2", 5)]
    assert table(lake).version() == 3  # created, day1, day2, and one for the replacement
    assert table(lake).transaction_version("day1") == 2


def test_a_crashed_replacement_is_not_written_twice(ledger: Ledger, lake: Lake, monkeypatch):
    ledger.run("day1", write(lake, rows("d1", 1), partition_by="day"), origin=TI)
    replace = write(lake, rows("d1", 7), mode="overwrite", predicate="day = 'd1'")
    monkeypatch.setenv("EOS_FAILPOINTS", "after_delta_commit@1=raise")
    with pytest.raises(FailpointError):
        ledger.run("day1", replace, on_committed="replace", origin=TI)
    monkeypatch.delenv("EOS_FAILPOINTS")
    outcome = ledger.run_outcome("day1", replace, on_committed="replace", attempt=2, origin=TI)
    assert (outcome.action, outcome.version, outcome.result["written"]) == ("replaced", 2, False)
    assert table_rows(lake) == [("d1", 7)]
    assert table(lake).version() == 2  # created, written, replaced once


def test_a_zombie_that_read_the_table_before_the_newer_try_cannot_write(
    ledger: Ledger, lake: Lake, db: str
):
    """Try 1 read the table and is about to commit its Delta write when try 2 takes the key
    over, writes and commits: try 1's Delta commit conflicts on the effect's marker and
    writes nothing; the table holds try 2's rows once."""
    ledger.run("other", write(lake, rows("base", 0)), origin=TI)  # the table exists
    zombie = race_a_zombie(ledger, lake)
    assert isinstance(zombie, LakehouseConflictError), zombie
    assert table_rows(lake) == [("base", 0), ("newer", 2)]
    assert writes_of(lake, "k") == 1
    with psycopg.connect(db) as conn:
        found = [e for e, _ in events(conn, "k")]
    assert found.count("committed") == 1


def test_a_fenced_attempt_writes_nothing(ledger: Ledger, lake: Lake, db: str):
    """Try 1 is still in its function when try 2 commits: when it reaches its write, the
    ledger says it no longer owns the key, and nothing reaches the table."""
    started, release = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def zombie_fn(eos):
        started.set()
        assert release.wait(30)
        return write(lake, rows("zombie", 1))(eos)

    def zombie():
        try:
            ledger.run("k", zombie_fn, attempt=1, origin=TI)
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion
            outcome["zombie"] = exc

    first = threading.Thread(target=zombie)
    first.start()
    assert started.wait(30)
    ledger.run("k", write(lake, rows("newer", 2)), attempt=2, origin=TI)
    release.set()
    first.join(60)
    assert isinstance(outcome["zombie"], FencedError)
    assert table_rows(lake) == [("newer", 2)]
    assert table(lake).version() == 1


@pytest.mark.parametrize("writers", [2, 4])
def test_concurrent_effects_appending_to_one_table_all_land(
    ledger: Ledger, lake: Lake, db: str, writers: int
):
    ledger.run("create", write(lake, rows("base", 0)), origin=TI)
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            Ledger(db).run(f"w{n}", write(lake, rows(f"w{n}", n)), origin=TI)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(1, writers + 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert table_rows(lake) == [("base", 0)] + [(f"w{n}", n) for n in range(1, writers + 1)]
    assert table(lake).version() == writers + 1


def test_two_writes_to_one_table_in_one_effect_are_refused(ledger: Ledger, lake: Lake, conn):
    def fn(eos):
        target = eos.delta(lake.uri("sales"), storage_options=lake.delta)
        target.write(rows("a", 1))
        eos.delta(lake.uri("sales"), storage_options=lake.delta).write(rows("b", 2))

    with pytest.raises(MisuseError, match="one write per table per effect"):
        ledger.run("k", fn, origin=TI)
    assert [e for e, _ in events(conn, "k")] == ["claimed", "failed"]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda eos, lake: eos.delta(42), "table_uri must be the table's location"),
        (lambda eos, lake: eos.delta("ftp://host/t"), "unknown scheme"),
        (
            lambda eos, lake: eos.delta(lake.uri("t"), storage_options={"endpoint": "x"}),
            "unknown storage option 'endpoint'",
        ),
        (
            lambda eos, lake: eos.delta(lake.uri("t"), storage_options=["x"]),
            "storage_options= must be a dict",
        ),
        (
            lambda eos, lake: eos.delta(lake.uri("t"), storage_options=lake.delta).write(
                rows("a", 1), mode="upsert"
            ),
            "mode must be one of append, overwrite",
        ),
        (
            lambda eos, lake: eos.delta(lake.uri("t"), storage_options=lake.delta).write(
                rows("a", 1), predicate="day = 'a'"
            ),
            "use it with mode='overwrite'",
        ),
    ],
)
def test_bad_arguments_are_refused_and_nothing_is_written(
    ledger: Ledger, lake: Lake, conn, call, message
):
    with pytest.raises(ConfigurationError, match=message):
        ledger.run("k", lambda eos: call(eos, lake), origin=TI)
    assert lake.files("t") == []
    assert [e for e, _ in events(conn, "k")] == ["claimed", "failed"]


def test_a_schema_mismatch_is_refused_and_nothing_is_written(ledger: Ledger, lake: Lake, conn):
    ledger.run("day1", write(lake), origin=TI)
    wrong = pa.table({"day": ["2024-01-02"], "amount": ["not a number"]})
    with pytest.raises(ConfigurationError, match="does not match the table's schema"):
        ledger.run("day2", write(lake, wrong), origin=TI)
    assert table(lake).version() == 1
    assert table_rows(lake) == [("2024-01-01", 1), ("2024-01-01", 2)]
    assert [e for e, _ in events(conn, "day2")] == ["claimed", "failed"]


def test_a_location_that_is_not_a_delta_table_is_refused(ledger: Ledger, lake: Lake, conn):
    if lake.s3 is None:
        path = lake.uri("notes").removeprefix("file://")
        os.makedirs(path)
        with open(f"{path}/readme.txt", "w", encoding="utf-8") as f:
            f.write("not a table")
    else:
        bucket = lake.root.removeprefix("s3://")
        lake.s3.client().put_object(Bucket=bucket, Key="notes/readme.txt", Body=b"x")
    with pytest.raises(ConfigurationError, match="is not a Delta table"):
        ledger.run("k", write(lake, name="notes"), origin=TI)
    assert lake.files("notes") == ["readme.txt"]
    assert [e for e, _ in events(conn, "k")] == ["claimed", "failed"]


def test_an_unreachable_store_is_a_clear_error(ledger: Ledger, conn):
    options = {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_ALLOW_HTTP": "true",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "y",
        "AWS_REGION": "us-east-1",
        "max_retries": "0",
        "timeout": "2s",
    }

    def fn(eos):
        return eos.delta("s3://nowhere/sales", storage_options=options).write(rows("a", 1))

    with pytest.raises(LakehouseStorageError, match="could not be reached"):
        ledger.run("k", fn, origin=TI)
    assert [e for e, _ in events(conn, "k")] == ["claimed", "failed"]


def test_without_deltalake_the_error_names_the_extra(ledger: Ledger, monkeypatch):
    monkeypatch.setitem(sys.modules, "deltalake", None)
    with pytest.raises(ConfigurationError, match=r"pip install 'eos-airflow\[lakehouse\]'"):
        ledger.run("k", lambda eos: eos.delta("file:///tmp/x"), origin=TI)


def test_a_zombie_that_read_before_the_table_existed_cannot_write_after_it_was_created(
    ledger: Ledger, lake: Lake
):
    """Found by the stateful model: try 1 read no table; try 2 took the key over, created the
    table with its write and committed. Try 1's write must not append to the new table: it
    creates only where no table exists: it loses, or reads the new table's marker."""
    zombie = race_a_zombie(ledger, lake)
    # refused by Delta (the table's first commit exists), or it found try 2's marker and
    # its ledger commit was fenced: either way it wrote nothing
    assert isinstance(zombie, (LakehouseConflictError, FencedError)), zombie
    assert table_rows(lake) == [("newer", 2)]
    assert writes_of(lake, "k") == 1
