"""Transfers (COPY source query → target table) and incremental table copies inside an
effect: exact target rows after crashes at every failpoint, clear errors, late commits."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from datetime import date

import psycopg
import pytest

from eos_airflow import ConfigurationError, Ledger, Origin, failpoints
from eos_airflow.errors import FailpointError, HorizonTimeoutError
from eos_airflow.protocol.incremental import incremental
from eos_airflow.protocol.transfer import transfer
from tests.conftest import ROOT, events

TI = Origin("d", "copy", "r1", -1)


@pytest.fixture
def tables(conn: psycopg.Connection) -> psycopg.Connection:
    conn.execute("CREATE SCHEMA mart")
    conn.execute(
        "CREATE TABLE src AS SELECT g AS id, date '2024-01-01' + g % 3 AS day, "
        "md5(g::text) AS payload FROM generate_series(1, 3000) AS g"
    )
    conn.execute("CREATE TABLE mart.daily (id int, day date, payload text)")
    return conn


def copy(db: str, **options):
    options.setdefault("query", "SELECT id, day, payload FROM src ORDER BY id")
    options.setdefault("table", "mart.daily")
    return lambda eos: transfer(eos, lambda: psycopg.connect(db), **options)


def target(conn: psycopg.Connection, where: str = "true") -> list[tuple]:
    return conn.execute(
        f"SELECT id, day, payload FROM mart.daily WHERE {where} ORDER BY id"  # noqa: S608
    ).fetchall()


def source(conn: psycopg.Connection, where: str = "true") -> list[tuple]:
    return conn.execute(
        f"SELECT id, day, payload FROM src WHERE {where} ORDER BY id"  # noqa: S608
    ).fetchall()


def test_append_copies_every_row_once_with_binary_copy(db: str, ledger: Ledger, tables):
    out = ledger.run("append", copy(db))
    assert out == {
        "rows": 3000,
        "table": "mart.daily",
        "mode": "append",
        "chunks": 1,
        "format": "binary",
    }
    assert ledger.run_outcome("append", copy(db)).action == "skipped"
    assert target(tables) == source(tables)


def test_text_copy_when_types_differ_and_named_columns(db: str, ledger: Ledger, tables):
    tables.execute("CREATE TABLE wide (id bigint, day text, payload text, note text)")
    out = ledger.run("wide", copy(db, table="wide", columns=["id", "day", "payload"]))
    assert out["format"] == "text" and out["rows"] == 3000
    assert tables.execute("SELECT count(*), sum(id), count(note) FROM wide").fetchone() == (
        3000,
        4501500,
        0,
    )


def test_replace_swaps_the_partition_in_one_transaction(db: str, ledger: Ledger, tables):
    tables.execute(
        "INSERT INTO mart.daily VALUES (-1, '2024-01-02', 'stale'), (-2, '2024-01-03', 'other day')"
    )
    replace = copy(
        db,
        mode="replace",
        replace_where="day = %(day)s",
        query="SELECT id, day, payload FROM src WHERE day = %(day)s ORDER BY id",
        parameters={"day": date(2024, 1, 2)},
    )
    assert ledger.run("replace/2024-01-02", replace)["rows"] == 1000
    assert target(tables, "day = '2024-01-02'") == source(tables, "day = '2024-01-02'")
    assert target(tables, "day <> '2024-01-02'") == [(-2, date(2024, 1, 3), "other day")]
    # a backfill re-run supersedes the partition (on_committed="replace"): same rows again
    tables.execute("UPDATE src SET payload = 'v2' WHERE day = '2024-01-02'")
    assert (
        ledger.run_outcome("replace/2024-01-02", replace, on_committed="replace").action
        == "replaced"
    )
    assert target(tables, "day = '2024-01-02'") == source(tables, "day = '2024-01-02'")
    assert len(target(tables)) == 1001


@pytest.mark.parametrize("visibility", ["chunks", "atomic"])
def test_chunked_append(db: str, ledger: Ledger, tables, visibility):
    out = ledger.run("chunked", copy(db, chunk_rows=700, visibility=visibility))
    assert out == {
        "rows": 3000,
        "table": "mart.daily",
        "mode": "append",
        "chunks": 5,
        "format": "binary",
    }
    assert target(tables) == source(tables)


CHILD = textwrap.dedent("""
    import sys, psycopg
    from eos_airflow import Ledger, Origin
    from eos_airflow.protocol.transfer import transfer
    dsn, attempt, chunk = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    def load(eos):
        return transfer(eos, lambda: psycopg.connect(dsn), table="mart.daily",
                        query="SELECT id, day, payload FROM src ORDER BY id", mode="replace",
                        chunk_rows=int(chunk) if chunk != "-" else None)
    with Ledger(dsn) as ledger:
        print(ledger.run("k", load, attempt=attempt, origin=Origin("d", "copy", "r1", -1)))
""")

STEPS = [
    ("after_claim", False),
    ("before_commit", False),
    ("after_commit", False),
    ("before_chunk_commit", True),
    ("after_chunk", True),
    ("before_commit", True),
]


def _spec(step: str, chunked: bool, action: str) -> str:
    # chunked: fire at the 2nd chunk boundary, so that one chunk is committed before the crash
    return f"{step}@1#2={action}" if chunked and step != "before_commit" else f"{step}@1={action}"


def _check_exact(tables: psycopg.Connection, chunked: bool, step: str) -> None:
    assert target(tables) == source(tables)
    kinds = [e for e, _ in events(tables, "k")]
    assert kinds.count("committed") == 1
    if chunked and step != "before_commit":
        assert "resumed" in kinds


@pytest.mark.parametrize(("step", "chunked"), STEPS)
def test_exception_at_each_failpoint_then_retry_gives_the_source_exactly(
    db: str, tables, monkeypatch, step, chunked
):
    tables.execute("INSERT INTO mart.daily VALUES (-1, '2024-01-01', 'replaced by the load')")
    load = copy(db, mode="replace", chunk_rows=1000 if chunked else None)
    monkeypatch.setenv("EOS_FAILPOINTS", _spec(step, chunked, "raise"))
    failpoints._hits.clear()
    with Ledger(db) as ledger:
        with pytest.raises(FailpointError):
            ledger.run("k", load, attempt=1, origin=TI)
        ledger.run("k", load, attempt=2, origin=TI)
    _check_exact(tables, chunked, step)


@pytest.mark.parametrize(("step", "chunked"), [s for s in STEPS if s[0] != "after_claim"])
def test_exit_at_each_failpoint_then_retry_gives_the_source_exactly(db: str, tables, step, chunked):
    tables.execute("INSERT INTO mart.daily VALUES (-1, '2024-01-01', 'replaced by the load')")
    env = {**os.environ, "EOS_FAILPOINTS": _spec(step, chunked, "exit")}
    chunk = "1000" if chunked else "-"
    first = subprocess.run(
        [sys.executable, "-c", CHILD, db, "1", chunk],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert first.returncode == failpoints.EXIT_CODE, first.stderr
    with Ledger(db) as ledger:  # the retry, in this process
        ledger.run(
            "k",
            copy(db, mode="replace", chunk_rows=int(chunk) if chunked else None),
            attempt=2,
            origin=TI,
        )
    _check_exact(tables, chunked, step)


def test_bad_input_fails_clearly_and_writes_nothing(db: str, ledger: Ledger, tables):
    cases = [
        (dict(table="mart.missing"), "target table mart.missing does not exist"),
        (dict(query="SELEC id FROM src"), "the source query failed .*42601.*fix sql="),
        (dict(query="SELECT id, day, payload FROM nowhere"), 'relation "nowhere" does not'),
        (dict(query="SELECT id FROM src"), "returns 1 columns and table mart.daily has 3"),
        (dict(table="a.b.c"), "is not a table name"),
        (dict(mode="upsert"), "mode='upsert' is not valid"),
        (dict(mode="replace", chunk_rows=10, visibility="chunks"), "half-replaced"),
        (dict(columns=["id", "nope"]), "has no column 'nope'"),
    ]
    for i, (options, message) in enumerate(cases):
        with pytest.raises(ConfigurationError, match=message):
            ledger.run(f"bad/{i}", copy(db, **options))
    assert target(tables) == []
    assert {e for e, _ in events(tables)} <= {"claimed", "failed"}


# --- incremental copies -------------------------------------------------------------------


@pytest.fixture
def readings(conn: psycopg.Connection) -> psycopg.Connection:
    conn.execute("CREATE TABLE readings (id bigserial PRIMARY KEY, value int)")
    conn.execute("CREATE TABLE readings_copy (id bigint, value int)")
    return conn


def incr(db: str, **options):
    options.setdefault("source_table", "readings")
    options.setdefault("column", "id")
    options.setdefault("target_table", "readings_copy")
    options.setdefault("offset_source", "table:public.readings")
    return lambda eos: incremental(eos, lambda: psycopg.connect(db), **options)


def add(conn: psycopg.Connection, n: int) -> None:
    conn.execute("INSERT INTO readings (value) SELECT g FROM generate_series(1, %s) AS g", [n])


def copied(conn: psycopg.Connection) -> tuple:
    return conn.execute(
        "SELECT count(*), count(DISTINCT id), max(id) FROM readings_copy"
    ).fetchone()


def position(conn: psycopg.Connection) -> object:
    row = conn.execute(
        "SELECT position FROM eos.offsets WHERE source = 'table:public.readings'"
    ).fetchone()
    return row and row[0]


def test_incremental_picks_up_new_rows_once(db: str, ledger: Ledger, readings):
    add(readings, 100)
    assert ledger.run("run1", incr(db))["rows"] == 100
    assert ledger.run("run2", incr(db))["rows"] == 0
    add(readings, 50)
    out = ledger.run("run3", incr(db))
    assert (out["from"], out["to"], out["rows"]) == (100, 150, 50)
    assert copied(readings) == (150, 150, 150)
    assert position(readings) == 150


def test_incremental_crash_between_write_and_commit_no_gap_no_duplicate(
    db: str, ledger: Ledger, readings, monkeypatch
):
    add(readings, 100)
    ledger.run("run1", incr(db))
    add(readings, 40)
    monkeypatch.setenv("EOS_FAILPOINTS", "before_commit@1=raise")
    with pytest.raises(FailpointError):
        ledger.run("run2", incr(db), attempt=1, origin=TI)
    assert copied(readings) == (100, 100, 100) and position(readings) == 100
    add(readings, 10)  # arrives between the crash and the retry
    assert ledger.run("run2", incr(db), attempt=2, origin=TI)["rows"] == 50
    assert copied(readings) == (150, 150, 150) and position(readings) == 150


def test_incremental_chunked_resumes_within_the_fixed_range(
    db: str, ledger: Ledger, readings, monkeypatch
):
    add(readings, 1000)
    monkeypatch.setenv("EOS_FAILPOINTS", "after_chunk@1#3=raise")
    failpoints._hits.clear()
    with pytest.raises(FailpointError):
        ledger.run("run1", incr(db, chunk_rows=100), attempt=1, origin=TI)
    assert copied(readings) == (300, 300, 300) and position(readings) == 300
    add(readings, 500)  # beyond the range the first attempt fixed
    out = ledger.run("run1", incr(db, chunk_rows=100), attempt=2, origin=TI)
    assert (out["to"], out["rows"], out["resumed_after"]) == (1000, 700, 300)
    assert copied(readings) == (1000, 1000, 1000) and position(readings) == 1000
    assert ledger.run("run2", incr(db, chunk_rows=100))["rows"] == 500
    assert copied(readings) == (1500, 1500, 1500)


def test_incremental_late_commit_is_not_skipped(db: str, ledger: Ledger, readings):
    """A transaction takes id 11 and stays open while id 12 commits: the run waits for it
    (here: gives up after horizon_timeout, copying nothing), so 11 is copied once it commits;
    horizon='none' would lose it."""
    add(readings, 10)
    with psycopg.connect(db) as late:  # a transaction left open
        late.execute("INSERT INTO readings (value) VALUES (-1)")  # id 11, not committed
        add(readings, 1)  # id 12, committed
        with pytest.raises(HorizonTimeoutError, match=r"pid \d+ \(idle in transaction"):
            ledger.run("run1", incr(db, horizon_timeout=0.3))
        assert copied(readings) == (0, 0, None) and position(readings) is None
        late.commit()
    out = ledger.run("run1", incr(db), attempt=2)
    assert (out["from"], out["to"], out["rows"]) == (None, 12, 12)
    assert copied(readings) == (12, 12, 12)

    # the same situation without the horizon loses the late row for good
    readings.execute("CREATE TABLE naive_copy (id bigint, value int)")
    with psycopg.connect(db) as late:
        late.execute("INSERT INTO readings (value) VALUES (-1)")  # id 13
        add(readings, 1)  # id 14
        naive = incr(db, target_table="naive_copy", offset_source="naive", horizon="none")
        assert ledger.run("naive1", naive)["to"] == 14
        late.commit()
    assert ledger.run("naive2", naive)["rows"] == 0
    assert readings.execute("SELECT count(*) FROM naive_copy WHERE id = 13").fetchone() == (0,)


def test_incremental_lag_and_bad_input(db: str, ledger: Ledger, readings):
    add(readings, 100)
    assert ledger.run("lag", incr(db, lag=30))["to"] == 70
    with pytest.raises(ConfigurationError, match="cannot read readings.nope"):
        ledger.run("bad1", incr(db, column="nope"))
    with pytest.raises(ConfigurationError, match="horizon='later' is not valid"):
        ledger.run("bad2", incr(db, horizon="later"))
    assert copied(readings)[0] == 70
