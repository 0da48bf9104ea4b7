"""Transfers, chunked loads and incremental copies under real Airflow (`airflow dags test`):
a chunked load killed mid-load resumes after its last committed chunk."""

from __future__ import annotations

import psycopg
import pytest

from eos_airflow.failpoints import EXIT_CODE
from eos_airflow.ledger.chain import verify
from tests.conftest import events

pytestmark = pytest.mark.airflow

ROWS = 20_000


def query(dsn: str, sql: str, params=None) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, params).fetchall()


@pytest.fixture
def movement_tables(db: str) -> str:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE move_src AS SELECT g AS id, md5(g::text) AS payload, "
            "date '2024-01-01' + g %% 2 AS day FROM generate_series(1, %s) AS g",
            [ROWS],
        )
        conn.execute("CREATE TABLE move_dst (id int, payload text)")
        conn.execute("CREATE TABLE move_daily (day date, n bigint)")
        conn.execute("INSERT INTO move_daily VALUES ('2024-01-01', -1), ('2023-12-31', 7)")
        conn.execute("CREATE TABLE readings (id bigserial PRIMARY KEY, value int)")
        conn.execute("CREATE TABLE readings_copy (id bigint, value int)")
        conn.execute("INSERT INTO readings (value) SELECT g FROM generate_series(1, 100) g")
    return db


def test_killed_chunked_load_resumes_and_transfers_are_exact(airflow, movement_tables):
    db = movement_tables
    # run 1: the chunked load's first try dies (os._exit) right after committing chunk 4
    crashed = airflow.dags_test("eos_movement", "2024-01-01", failpoints="after_chunk@1#4=exit")
    assert crashed.returncode == EXIT_CODE, crashed.stdout[-4000:] + crashed.stderr[-2000:]
    assert query(db, "SELECT count(*) FROM move_dst") == [(4000,)]
    assert query(db, "SELECT count(*) FROM eos.recovery_points WHERE key = 'move/2024-01-01'") == [
        (4,)
    ]
    assert query(db, "SELECT state::text FROM eos.ledger WHERE key = 'move/2024-01-01'") == [
        ("running",)
    ]
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("INSERT INTO readings (value) SELECT g FROM generate_series(1, 20) g")

    # run 2 of the same day: its load takes over the dead owner's key and resumes after
    # chunk 4; its try 1 fails after 3 more chunks and Airflow's retry (try 2) resumes again
    rerun = airflow.dags_test("eos_movement", "2024-01-01", failpoints="after_chunk@1#3=raise")
    out = rerun.stdout + rerun.stderr
    assert query(db, "SELECT count(*), count(DISTINCT id), min(id), max(id) FROM move_dst") == [
        (ROWS, ROWS, 1, ROWS)
    ], out[-4000:]
    assert query(
        db, "SELECT count(*) FROM move_dst d JOIN move_src s USING (id) WHERE d.payload = s.payload"
    ) == [(ROWS,)]
    resumed = query(
        db,
        "SELECT attempt, (detail->>'rows')::int, "
        "(detail->>'checkpointed_by_attempt')::int, detail->>'after_seq' "
        "FROM eos.ledger_events WHERE key = 'move/2024-01-01' "
        "AND event = 'resumed' ORDER BY seq",
    )
    assert resumed == [(1, 4000, 1, "4"), (2, 7000, 1, "7")], out[-4000:]
    entry = query(
        db, "SELECT state::text, attempt, run_id FROM eos.ledger WHERE key = 'move/2024-01-01'"
    )
    assert entry[0][:2] == ("committed", 2)
    took_over = query(
        db,
        "SELECT detail->'took_over'->>'reason' FROM eos.ledger_events "
        "WHERE key = 'move/2024-01-01' AND event = 'claimed' ORDER BY seq",
    )
    # run 2 took the key over from run 1's dead attempt; its try 1 released it when it failed
    assert took_over == [(None,), ("previous owner's session ended",), (None,)]
    assert query(
        db, "SELECT count(*), max(rows) FROM eos.recovery_points WHERE key = 'move/2024-01-01'"
    ) == [(20, ROWS)]
    assert "resuming after recovery point 4 (4,000 rows consumed" in out
    assert "resuming after recovery point 7 (7,000 rows consumed" in out
    assert "chunk 20 written (commits with the effect): 20,000 rows" in out

    # the daily partition was replaced (twice: once per run), other days untouched
    assert query(db, "SELECT day::text, n FROM move_daily ORDER BY day") == [
        ("2023-12-31", 7),
        ("2024-01-01", ROWS // 2),
    ]
    with psycopg.connect(db) as conn:
        kinds = [e for e, _ in events(conn, "move_daily/2024-01-01")]
        assert kinds.count("committed") == 1 and kinds.count("replaced") == 1
        assert verify(conn).ok
    # the incremental copy took the 100 rows in run 1 and the 20 new ones in run 2, once
    assert query(db, "SELECT count(*), count(DISTINCT id), max(id) FROM readings_copy") == [
        (120, 120, 120)
    ]
    assert query(db, "SELECT position FROM eos.offsets") == [(120,)]

    # bad inputs fail at once with what to do, and wrote nothing
    assert "Airflow connection 'no_such_source' is not defined" in out
    assert "target table public.no_such_table does not exist" in out
    assert "the source query failed" in out and "fix sql=" in out

    # the example DAG of the README parses, with its chunked task
    parsed = airflow.python(
        "from airflow.dag_processing.dagbag import DagBag\n"
        "bag = DagBag(dag_folder='dags/eos_analytics_daily.py', safe_mode=False)\n"
        "assert not bag.import_errors, bag.import_errors\n"
        "dag = bag.get_dag('eos_analytics_daily')\n"
        "print(sorted(t.task_id for t in dag.tasks), dag.get_task('events_history').chunk_rows)\n"
    )
    assert parsed.returncode == 0, parsed.stderr[-3000:]
    assert "['events_history', 'orders_daily', 'revenue_daily'] 50000" in parsed.stdout
