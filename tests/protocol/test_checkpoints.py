"""Chunked effects: recovery points, resumption after kills, fencing across chunks, atomic
publication (real PostgreSQL, real processes killed with os._exit and SIGKILL)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psycopg
import pytest

from eos_airflow import ConfigurationError, FencedError, Ledger, Origin, failpoints
from eos_airflow.ledger.chain import verify
from eos_airflow.protocol.transfer import transfer
from tests.conftest import ROOT, events

TI = Origin("warehouse", "load", "manual__1", -1)


def make_source(conn: psycopg.Connection, rows: int) -> None:
    conn.execute(
        "CREATE TABLE src AS SELECT g AS id, md5(g::text) AS payload "
        "FROM generate_series(1, %s) AS g",
        [rows],
    )
    conn.execute("ALTER TABLE src ADD PRIMARY KEY (id)")
    conn.execute("CREATE TABLE dst (id int, payload text)")


def assert_exactly_once(conn: psycopg.Connection, rows: int) -> None:
    assert conn.execute(
        "SELECT count(*), count(DISTINCT id), min(id), max(id) FROM dst"
    ).fetchone() == (rows, rows, 1, rows)
    assert conn.execute(
        "SELECT count(*) FROM dst JOIN src USING (id) WHERE dst.payload = src.payload"
    ).fetchone() == (rows,)


def test_chunks_commit_with_recovery_points_and_the_last_with_the_effect(ledger: Ledger, conn):
    conn.execute("CREATE TABLE t (i int)")

    def load(eos):
        chunks = eos.checkpoints(range(25), every=10, position=lambda i: i)
        for chunk in chunks:
            with eos.conn.cursor().copy("COPY t FROM STDIN") as copy:
                for i in chunk:
                    copy.write_row((i,))
            chunks.state = {"sum": (chunks.state or {}).get("sum", 0) + sum(chunk)}
        return {"rows": chunks.rows, "chunks": chunks.chunks, "state": chunks.state}

    assert ledger.run("k", load) == {"rows": 25, "chunks": 3, "state": {"sum": 300}}
    assert events(conn, "k") == [
        ("claimed", 1),
        ("checkpoint", 1),
        ("checkpoint", 1),
        ("checkpoint", 1),
        ("committed", 1),
    ]
    points = conn.execute(
        "SELECT version, seq, rows, position, state FROM eos.recovery_points ORDER BY seq"
    ).fetchall()
    assert points == [
        (1, 1, 10, 9, {"sum": 45}),
        (1, 2, 20, 19, {"sum": 190}),
        (1, 3, 25, 24, {"sum": 300}),
    ]
    assert conn.execute("SELECT count(*) FROM t").fetchone() == (25,)
    # a committed effect is skipped; the loop does not run again
    assert ledger.run_outcome("k", load).action == "skipped"
    assert verify(conn).ok


def test_retry_resumes_after_the_last_committed_chunk(ledger: Ledger, conn, monkeypatch):
    conn.execute("CREATE TABLE t (i int, attempt int)")
    seen: list[tuple[int, list[int]]] = []

    def load(eos):
        chunks = eos.checkpoints(lambda after: range(after, 50), every=10)
        for chunk in chunks:
            seen.append((eos.attempt, chunk[:1]))
            eos.conn.cursor().executemany(
                "INSERT INTO t VALUES (%s, %s)", [(i, eos.attempt) for i in chunk]
            )
        return chunks.rows

    monkeypatch.setenv("EOS_FAILPOINTS", "after_chunk@1#3=raise")
    failpoints._hits.clear()
    with pytest.raises(failpoints.FailpointError):
        ledger.run("k", load, attempt=1, origin=TI)
    assert conn.execute("SELECT state::text FROM eos.ledger").fetchone() == ("failed",)
    assert ledger.run("k", load, attempt=2, origin=TI) == 50
    assert seen == [(1, [0]), (1, [10]), (1, [20]), (2, [30]), (2, [40])]
    assert conn.execute("SELECT attempt, count(*) FROM t GROUP BY 1 ORDER BY 1").fetchall() == [
        (1, 30),
        (2, 20),
    ]
    resumed = conn.execute(
        "SELECT attempt, detail FROM eos.ledger_events WHERE event = 'resumed'"
    ).fetchall()
    assert resumed == [
        (2, {"after_seq": 3, "rows": 30, "position": None, "checkpointed_by_attempt": 1})
    ]


def test_bad_options_and_protocols_without_recovery_points(ledger: Ledger):
    with pytest.raises(ConfigurationError, match="every= .* and/or seconds="):
        ledger.run("a", lambda eos: list(eos.checkpoints([1, 2])))
    with pytest.raises(ConfigurationError, match="every= must be an integer >= 1"):
        ledger.run("b", lambda eos: list(eos.checkpoints([1, 2], every=0)))

    def short_source(eos):
        return sum(len(c) for c in eos.checkpoints([1, 2, 3], every=1))

    assert ledger.run("c", short_source) == 3

    def slow_items():
        for i in range(8):
            time.sleep(0.03)
            yield i

    def by_time(eos):  # a chunk closes when 0.05 s have passed since it began
        return [len(c) for c in eos.checkpoints(slow_items(), seconds=0.05)]

    sizes = ledger.run("d", by_time)
    assert sum(sizes) == 8 and len(sizes) >= 3 and max(sizes) <= 3, sizes


# --- kill and resume a 100-chunk load in real processes -------------------------------------

CHILD = textwrap.dedent("""
    import json, sys, psycopg
    from eos_airflow import Ledger, Origin
    from eos_airflow.protocol.transfer import transfer
    dsn, attempt, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    def load(eos):
        return transfer(eos, lambda: psycopg.connect(dsn),
                        query="SELECT id, payload FROM src ORDER BY id", table="dst",
                        chunk_rows=chunk)
    with Ledger(dsn) as ledger:
        print(json.dumps(ledger.run("load/2024-01-01", load, attempt=attempt,
                         origin=Origin("warehouse", "load", "manual__1", -1))), flush=True)
""")


def _attempt(
    db: str, attempt: int, chunk: int, failpoint: str | None = None
) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "EOS_FAILPOINTS"}
    if failpoint:
        env["EOS_FAILPOINTS"] = failpoint
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, db, str(attempt), str(chunk)],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _points(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM eos.recovery_points").fetchone()[0]


def kill_and_resume(db: str, conn: psycopg.Connection, rows: int, chunks: int, seed: int) -> None:
    """Attempts 1-4 die at random chunk boundaries and mid-chunk (exit failpoints, a raised
    failpoint, SIGKILL from here); attempt 5 finishes. Each row lands exactly once."""
    rng = random.Random(seed)
    chunk = rows // chunks
    make_source(conn, rows)
    k1, k2, k4 = rng.randint(2, chunks // 5), rng.randint(2, chunks // 5), rng.randint(2, 8)
    expected_resume = []

    # 1: dies right after committing its k1-th chunk
    p = _attempt(db, 1, chunk, f"after_chunk@1#{k1}=exit")
    assert p.wait(120) == failpoints.EXIT_CODE, p.stderr.read()
    assert _points(conn) == k1
    expected_resume.append((2, k1 * chunk))
    # 2: dies with its k2-th chunk written and its recovery point recorded, before COMMIT
    p = _attempt(db, 2, chunk, f"before_chunk_commit@2#{k2}=exit")
    assert p.wait(120) == failpoints.EXIT_CODE, p.stderr.read()
    done = k1 + k2 - 1
    assert _points(conn) == done
    expected_resume.append((3, done * chunk))
    # 3: SIGKILL from outside, mid-chunk, after a random number of further chunks
    p = _attempt(db, 3, chunk)
    target = done + rng.randint(1, 5)
    deadline = time.monotonic() + 120
    while _points(conn) < target:
        assert p.poll() is None and time.monotonic() < deadline, p.stderr.read()
        time.sleep(0.002)
    time.sleep(rng.uniform(0, 0.02))
    p.send_signal(signal.SIGKILL)
    assert p.wait(30) == -signal.SIGKILL
    done = _points(conn)
    expected_resume.append((4, done * chunk))
    # 4: a raised failure after its k4-th chunk (the attempt records `failed`)
    p = _attempt(db, 4, chunk, f"after_chunk@4#{k4}=raise")
    assert p.wait(120) == 1 and "FailpointError" in p.stderr.read()
    done += k4
    expected_resume.append((5, done * chunk))
    # 5: finishes
    p = _attempt(db, 5, chunk)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert json.loads(out)["rows"] == rows

    assert_exactly_once(conn, rows)
    resumed = conn.execute(
        "SELECT attempt, (detail->>'rows')::bigint FROM eos.ledger_events "
        "WHERE event = 'resumed' ORDER BY seq"
    ).fetchall()
    assert resumed == expected_resume, (seed, k1, k2, k4)
    state = conn.execute("SELECT state::text, attempt FROM eos.ledger").fetchone()
    assert state == ("committed", 5)
    assert _points(conn) == chunks  # one recovery point per chunk, none written twice
    assert conn.execute("SELECT count(DISTINCT seq) FROM eos.recovery_points").fetchone() == (
        chunks,
    )
    assert verify(conn).ok

    # `eos-airflow ledger show` lists where each attempt checkpointed
    show = subprocess.run(
        [
            sys.executable,
            "-m",
            "eos_airflow.cli.main",
            "ledger",
            "show",
            "load/2024-01-01",
            "--dsn",
            db,
            "--format",
            "json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert show.returncode == 0, show.stderr
    shown = json.loads(show.stdout)
    assert len(shown["recovery_points"]) == chunks
    assert shown["recovery_points"][-1]["rows"] == rows
    assert {p["attempt"] for p in shown["recovery_points"]} <= {1, 2, 3, 4, 5}


def test_kill_and_resume_100_chunks(db: str, conn):
    seed = int(os.environ.get("EOS_SEED", random.randrange(10**6)))
    kill_and_resume(db, conn, rows=100_000, chunks=100, seed=seed)


@pytest.mark.slow
def test_kill_and_resume_1m_rows_100_chunks(db: str, conn):
    rows = int(os.environ.get("EOS_CHECKPOINT_ROWS", "1000000"))
    seed = int(os.environ.get("EOS_SEED", random.randrange(10**6)))
    kill_and_resume(db, conn, rows=rows, chunks=100, seed=seed)


# --- fencing across chunks ------------------------------------------------------------------


def test_zombie_cannot_commit_a_chunk_after_a_newer_try_claimed(db: str, conn):
    """Try 1 commits 2 chunks, writes its 3rd and stalls (a zombie); try 2 claims, resumes
    after chunk 2 and finishes. Try 1 wakes: its chunk rolls back, FencedError."""
    make_source(conn, 1000)
    stalled, wake = threading.Event(), threading.Event()

    def load(eos):
        def rows(after):
            return conn_rows[after:]

        chunks = eos.checkpoints(rows, every=100)
        for chunk in chunks:
            eos.conn.cursor().executemany("INSERT INTO dst VALUES (%s, %s)", chunk)
            if eos.attempt == 1 and chunks.chunks == 2:
                stalled.set()
                assert wake.wait(30)
        return chunks.rows

    conn_rows = conn.execute("SELECT id, payload FROM src ORDER BY id").fetchall()
    errors: list[BaseException] = []
    with Ledger(db) as ledger:

        def zombie():
            try:
                ledger.run("k", load, attempt=1, origin=TI)
            except BaseException as exc:  # noqa: BLE001 - the test inspects it
                errors.append(exc)

        t = threading.Thread(target=zombie)
        t.start()
        assert stalled.wait(30)
        assert ledger.run("k", load, attempt=2, origin=TI) == 1000
        wake.set()
        t.join(30)
    assert len(errors) == 1 and isinstance(errors[0], FencedError), errors
    assert_exactly_once(conn, 1000)
    ev = events(conn, "k")
    assert ev[:3] == [("claimed", 1), ("checkpoint", 1), ("checkpoint", 1)]
    assert ("resumed", 2) in ev and ("fenced", 1) in ev
    assert conn.execute(
        "SELECT detail->>'step' FROM eos.ledger_events WHERE event = 'fenced'"
    ).fetchone() == ("checkpoint",)
    assert conn.execute(
        "SELECT attempt, count(*) FROM eos.recovery_points GROUP BY 1 ORDER BY 1"
    ).fetchall() == [(1, 2), (2, 8)]


def test_zombie_held_between_chunks_is_fenced_at_its_next_chunk(db: str, conn):
    """The after_chunk barrier: try 1 has committed chunk 1 and holds; try 2 claims and
    finishes; try 1's next chunk never commits."""
    make_source(conn, 300)
    held, go = threading.Event(), threading.Event()

    def hook(attempt):
        if attempt == 1:
            held.set()
            assert go.wait(30)

    def load(eos):
        return transfer(
            eos,
            lambda: psycopg.connect(db),
            table="dst",
            chunk_rows=100,
            query="SELECT id, payload FROM src ORDER BY id",
        )["rows"]

    failpoints.set_hook("after_chunk", hook)
    errors: list[BaseException] = []
    try:
        with Ledger(db) as ledger:

            def zombie():
                try:
                    ledger.run("k", load, attempt=1, origin=TI)
                except BaseException as exc:  # noqa: BLE001 - the test inspects it
                    errors.append(exc)

            t = threading.Thread(target=zombie)
            t.start()
            assert held.wait(30)
            assert ledger.run("k", load, attempt=2, origin=TI) == 300
            go.set()
            t.join(30)
    finally:
        failpoints.set_hook("after_chunk", None)
    assert len(errors) == 1 and isinstance(errors[0], FencedError), errors
    assert_exactly_once(conn, 300)


# --- atomic publication ---------------------------------------------------------------------


def test_staged_load_shows_readers_no_partial_partition(db: str, conn):
    rows = 20_000
    make_source(conn, rows)
    conn.execute("INSERT INTO dst SELECT id, 'old' FROM generate_series(1, 5) AS id")
    counts: set[int] = set()
    stop = threading.Event()

    def reader():
        with psycopg.connect(db, autocommit=True) as r:
            while not stop.is_set():
                counts.add(r.execute("SELECT count(*) FROM dst").fetchone()[0])

    def load(eos):
        return transfer(
            eos,
            lambda: psycopg.connect(db),
            table="dst",
            chunk_rows=1000,
            mode="replace",
            query="SELECT id, payload FROM src ORDER BY id",
        )

    t = threading.Thread(target=reader)
    t.start()
    try:
        with Ledger(db) as ledger:
            result = ledger.run("k", load)
        time.sleep(0.05)
    finally:
        stop.set()
        t.join(10)
    assert result == {
        "rows": rows,
        "table": "dst",
        "mode": "replace",
        "chunks": 20,
        "format": "binary",
    }
    assert counts == {5, rows}  # the old partition, then the whole new one
    assert_exactly_once(conn, rows)
    assert conn.execute(
        "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'eos_stage_%'"
    ).fetchone() == (0,)
    assert conn.execute(
        "SELECT count(*) FROM eos.ledger_events WHERE event = 'checkpoint'"
    ).fetchone() == (20,)


def test_offsets_advance_with_each_chunk(ledger: Ledger, conn, monkeypatch):
    """A consumer committing in chunks: each chunk's rows and its source position commit
    together, so after a crash the committed position matches the committed rows."""
    conn.execute("CREATE TABLE t (i int)")

    def consume(eos):
        chunks = eos.checkpoints(lambda done: range(done, 95), every=10)
        for chunk in chunks:
            eos.conn.cursor().executemany("INSERT INTO t VALUES (%s)", [(i,) for i in chunk])
            eos.offsets["queue:q/0"] = chunk[-1]
        return chunks.rows

    monkeypatch.setenv("EOS_FAILPOINTS", "after_chunk@1#4=raise")
    failpoints._hits.clear()
    with pytest.raises(failpoints.FailpointError):
        ledger.run("k", consume, attempt=1, origin=TI)
    assert conn.execute("SELECT position FROM eos.offsets").fetchone() == (39,)
    assert conn.execute("SELECT count(*) FROM t").fetchone() == (40,)
    assert ledger.run("k", consume, attempt=2, origin=TI) == 95
    assert conn.execute("SELECT count(*), count(DISTINCT i), max(i) FROM t").fetchone() == (
        95,
        95,
        94,
    )
    assert conn.execute("SELECT position, attempt FROM eos.offsets").fetchone() == (94, 2)
    moves = conn.execute(
        "SELECT detail->'offsets'->'queue:q/0' FROM eos.ledger_events "
        "WHERE event = 'offsets' ORDER BY seq"
    ).fetchall()
    assert [m[0]["to"] for m in moves] == [9, 19, 29, 39, 49, 59, 69, 79, 89, 94]
