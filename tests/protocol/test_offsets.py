"""``eos.offsets``: source positions committed in the effect's transaction (real PostgreSQL)."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from eos_airflow import ConfigurationError, FencedError, Ledger, Origin, failpoints
from eos_airflow.errors import FailpointError
from tests.conftest import events


@pytest.fixture
def out(conn: psycopg.Connection) -> psycopg.Connection:
    conn.execute("CREATE TABLE out (n int, written_by text)")
    return conn


def consume(batch: int, name: str = "w"):
    def fn(eos):
        start = eos.offsets.get("kafka:orders/0", -1) + 1
        eos.conn.cursor().executemany(
            "INSERT INTO out VALUES (%s, %s)", [(n, name) for n in range(start, start + batch)]
        )
        eos.offsets["kafka:orders/0"] = start + batch - 1
        return {"from": start}

    return fn


def test_offsets_commit_with_the_outputs_and_record_old_and_new(ledger: Ledger, out):
    assert ledger.run("k1", consume(3)) == {"from": 0}
    assert ledger.run("k2", consume(2)) == {"from": 3}
    assert out.execute("SELECT array_agg(n ORDER BY n) FROM out").fetchone() == ([0, 1, 2, 3, 4],)
    row = out.execute("SELECT source, position, key, attempt FROM eos.offsets").fetchall()
    assert row == [("kafka:orders/0", 4, "k2", 1)]
    moves = out.execute(
        "SELECT key, detail FROM eos.ledger_events WHERE event = 'offsets' ORDER BY id"
    ).fetchall()
    assert moves == [
        ("k1", {"offsets": {"kafka:orders/0": {"from": None, "to": 2}}}),
        ("k2", {"offsets": {"kafka:orders/0": {"from": 2, "to": 4}}}),
    ]
    assert events(out, "k2") == [("claimed", 1), ("offsets", 1), ("committed", 1)]


def test_failure_rolls_back_outputs_and_offset_together(ledger: Ledger, out, monkeypatch):
    ledger.run("k1", consume(3))
    monkeypatch.setenv("EOS_FAILPOINTS", "before_commit@1=raise")
    with pytest.raises(FailpointError):
        ledger.run("k2", consume(5), attempt=1, origin=Origin("d", "t", "r", -1))
    assert out.execute("SELECT count(*) FROM out").fetchone() == (3,)
    assert out.execute("SELECT position FROM eos.offsets").fetchone() == (2,)
    # the retry reads the old position again: no gap, no duplicate
    assert ledger.run("k2", consume(5), attempt=2, origin=Origin("d", "t", "r", -1)) == {"from": 3}
    assert out.execute("SELECT count(*), count(DISTINCT n) FROM out").fetchone() == (8, 8)


def test_get_set_and_mapping_forms(ledger: Ledger, out):
    def fn(eos):
        seen = {
            "missing": eos.offsets.get("table:public.readings"),
            "default": eos.offsets.get("table:public.readings", {"id": 0}),
            "contains": "table:public.readings" in eos.offsets,
        }
        eos.offsets.set("table:public.readings", {"id": 10, "ts": "2024-01-01T00:00:00"})
        seen["staged"] = eos.offsets["table:public.readings"]
        with pytest.raises(KeyError):
            eos.offsets["never"]
        with pytest.raises(ConfigurationError, match="non-empty name"):
            eos.offsets.set("", 1)
        return seen

    assert ledger.run("k", fn) == {
        "missing": None,
        "default": {"id": 0},
        "contains": False,
        "staged": {"id": 10, "ts": "2024-01-01T00:00:00"},
    }
    assert ledger.run("k2", lambda eos: eos.offsets["table:public.readings"]) == {
        "id": 10,
        "ts": "2024-01-01T00:00:00",
    }


def test_two_concurrent_effects_on_one_source_serialise(db: str, out):
    """Both read the position; the second waits for the first's commit, then continues
    after it — never both from the same position."""
    failpoints_hold = threading.Event()
    first_read = threading.Event()

    def slow(eos):
        start = eos.offsets.get("s", -1) + 1
        first_read.set()
        failpoints_hold.wait(10)
        eos.conn.cursor().executemany(
            "INSERT INTO out VALUES (%s, 'slow')", [(n,) for n in range(start, start + 3)]
        )
        eos.offsets["s"] = start + 2
        return start

    def fast(eos):
        start = eos.offsets.get("s", -1) + 1
        eos.conn.cursor().executemany(
            "INSERT INTO out VALUES (%s, 'fast')", [(n,) for n in range(start, start + 3)]
        )
        eos.offsets["s"] = start + 2
        return start

    results = {}
    with Ledger(db) as ledger:
        a = threading.Thread(target=lambda: results.setdefault("slow", ledger.run("a", slow)))
        a.start()
        assert first_read.wait(10)
        b = threading.Thread(target=lambda: results.setdefault("fast", ledger.run("b", fast)))
        b.start()
        time.sleep(0.5)
        assert b.is_alive()  # blocked on the source's lock, not reading position -1
        failpoints_hold.set()
        a.join(10)
        b.join(10)
    assert results == {"slow": 0, "fast": 3}
    assert out.execute("SELECT array_agg(n ORDER BY n) FROM out").fetchone() == (
        [0, 1, 2, 3, 4, 5],
    )
    assert out.execute("SELECT position FROM eos.offsets").fetchone() == (5,)


def test_fenced_attempt_advances_no_offset(db: str, out):
    """A zombie try holding a position loses it to the newer try: its offset never commits."""
    ti = Origin("d", "t", "r", -1)
    held, go = threading.Event(), threading.Event()

    def hook(attempt):
        if attempt == 1:
            held.set()
            go.wait(10)

    failpoints.set_hook("before_commit", hook)
    try:
        with Ledger(db) as ledger:
            errors = []

            def zombie():
                try:
                    ledger.run("k", consume(3, "zombie"), attempt=1, origin=ti)
                except FencedError as exc:
                    errors.append(exc)

            t = threading.Thread(target=zombie)
            t.start()
            assert held.wait(10)
            # try 2 cannot read the position while try 1 holds the source: it would wait, so
            # let try 1 reach its fenced commit first by claiming only, then release it.
            conn = ledger.connection()
            conn.execute(
                "SELECT * FROM eos.claim('k', gen_random_uuid(), 2, 'd', 't', 'r', "
                "-1, 'h', 1, 'skip')"
            )
            ledger.putconn(conn)
            go.set()
            t.join(10)
            assert errors and "newer attempt" in str(errors[0])
    finally:
        failpoints.set_hook("before_commit", None)
    assert out.execute("SELECT count(*) FROM out").fetchone() == (0,)
    assert out.execute("SELECT count(*) FROM eos.offsets").fetchone() == (0,)
