"""``ledger gc`` keeps the fencing history (schema revision 0012, docs/guarantees.md).

Fencing reads the highest try of a task instance that ever claimed a key; when the ledger row
names another run, that is the key's ``claimed`` events, which gc removes. gc now keeps, per
key and task instance, the highest try among the claims it removed (``pruned_claims``), and
claim() reads it with the remaining events. A ledger created before 0012 keeps its claims in
the chain until the next gc, which summarises them.
"""

from __future__ import annotations

import contextlib
import io
import time
import uuid
from dataclasses import replace

import psycopg
import pytest
from psycopg.types.json import Jsonb

from eos_airflow import Ledger, Origin
from eos_airflow.cli.main import main as cli
from eos_airflow.errors import FencedError
from eos_airflow.ledger.chain import verify
from eos_airflow.ledger.migrate import head_revision, migrate

RUN_A = Origin("d", "load", "run-A", -1)
RUN_B = Origin("d", "load", "run-B", -1)


def boom(eos):
    raise RuntimeError("the source is missing")


def gc(db: str) -> None:
    time.sleep(0.01)  # every event is older than the cutoff
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli(["ledger", "gc", "--older-than", "0s", "--dsn", db]) == 0


def pruned_claims(conn: psycopg.Connection, key: str) -> list[tuple]:
    return conn.execute(
        "SELECT dag_id, task_id, run_id, map_index, attempt FROM eos.pruned_claims "
        "WHERE key = %s ORDER BY run_id, map_index",
        [key],
    ).fetchall()


def claimed_events(conn: psycopg.Connection, key: str) -> int:
    (n,) = conn.execute(
        "SELECT count(*) FROM eos.ledger_events WHERE key = %s AND event = 'claimed'", [key]
    ).fetchone()
    return n


def test_an_install_from_0011_fences_after_the_upgrade_and_gc(empty_db: str):
    """Keys claimed and committed at revision 0011 (through the protocol's functions, as the
    previous release runs them), then 0012 applied, then gc: the claims it removes are kept
    for fencing, and the lower try of the run is fenced once another run holds the row."""
    assert migrate(empty_db, revision="0011") == [
        "0001",
        "0002",
        "0003",
        "0004",
        "0005",
        "0006",
        "0007",
        "0008",
        "0009",
        "0010",
        "0011",
    ]
    with psycopg.connect(empty_db, autocommit=True) as conn:
        for key, attempt, map_index in (("old/1", 2, -1), ("old/2", 3, 4)):
            owner = uuid.uuid4()
            (action, *_) = conn.execute(
                "SELECT * FROM eos.claim(%s, %s, %s, 'd', 'load', 'run-A', %s, 'h', 1, 'skip')",
                [key, owner, attempt, map_index],
            ).fetchone()
            assert action == "run"
            conn.execute(
                "SELECT * FROM eos.commit(%s, %s, %s)", [key, owner, Jsonb({"try": attempt})]
            )
        applied = migrate(empty_db)  # 0012, and the revisions after it
        assert applied[0] == "0012" and applied[-1] == head_revision()
        gc(empty_db)
        assert claimed_events(conn, "old/1") == 0  # gc removed the claims...
        assert pruned_claims(conn, "old/1") == [("d", "load", "run-A", -1, 2)]  # ...and kept them
        assert pruned_claims(conn, "old/2") == [("d", "load", "run-A", 4, 3)]
        (detail,) = conn.execute(
            "SELECT detail FROM eos.ledger_events WHERE key = 'old/1' AND event = 'pruned'"
        ).fetchone()
        assert detail["claims"] == [
            {"dag_id": "d", "task_id": "load", "run_id": "run-A", "map_index": -1, "attempt": 2}
        ]
        for key, map_index, fenced_try in (("old/1", -1, 1), ("old/2", 4, 2)):
            conn.execute("SELECT * FROM eos.reopen(%s, 'source corrected')", [key])
            with Ledger(empty_db) as ledger:
                with pytest.raises(RuntimeError):
                    ledger.run(key, boom, origin=replace(RUN_B, map_index=map_index))
                with pytest.raises(FencedError):
                    ledger.run(
                        key,
                        lambda eos: {"try": eos.attempt},
                        attempt=fenced_try,
                        origin=replace(RUN_A, map_index=map_index),
                    )
        result = verify(conn)
        assert result.ok, result.problems


def test_repeated_gc_merges_the_history_per_task_instance(db: str):
    """Each gc merges what it removes with what earlier runs kept: per run and map index the
    highest try, never another task instance's; the chains still verify."""
    with Ledger(db) as ledger, psycopg.connect(db, autocommit=True) as conn:
        ledger.run("k", lambda eos: 1, attempt=3, origin=RUN_A)
        gc(db)
        conn.execute("SELECT * FROM eos.reopen('k', 'again')")
        ledger.run("k", lambda eos: 2, attempt=2, origin=RUN_B)
        gc(db)
        assert pruned_claims(conn, "k") == [
            ("d", "load", "run-A", -1, 3),
            ("d", "load", "run-B", -1, 2),
        ]
        conn.execute("SELECT * FROM eos.reopen('k', 'again')")
        # another map index of run A is another task instance: its try 1 runs
        ledger.run("k", lambda eos: 3, attempt=1, origin=replace(RUN_A, map_index=0))
        gc(db)
        assert pruned_claims(conn, "k") == [
            ("d", "load", "run-A", -1, 3),
            ("d", "load", "run-A", 0, 1),
            ("d", "load", "run-B", -1, 2),
        ]
        conn.execute("SELECT * FROM eos.reopen('k', 'again')")
        for origin, try_number in ((RUN_A, 2), (RUN_B, 1)):
            with pytest.raises(FencedError):
                ledger.run("k", lambda eos: 4, attempt=try_number, origin=origin)
        assert ledger.run("k", lambda eos: 5, attempt=3, origin=RUN_A) == 5
        result = verify(conn)
        assert result.ok, result.problems


@pytest.mark.parametrize(
    "tamper",
    [
        "UPDATE eos.pruned_claims SET attempt = 1",
        "DELETE FROM eos.pruned_claims",
        "INSERT INTO eos.pruned_claims VALUES ('k', 'd', 'load', 'run-B', -1, 1, now())",
    ],
)
def test_verify_detects_an_edited_fencing_history(db: str, tamper: str):
    """What gc kept for fencing must be what the hash-chained `pruned` event lists: lowering,
    removing or adding a try in pruned_claims (which would unfence a late try, or fence an
    innocent one) fails `ledger verify`."""
    with Ledger(db) as ledger, psycopg.connect(db, autocommit=True) as conn:
        ledger.run("k", lambda eos: 1, attempt=2, origin=RUN_A)
        gc(db)
        assert verify(conn).ok
        conn.execute(tamper)
        result = verify(conn)
        assert not result.ok
        assert "pruned_claims" in result.first_problem.reason, result.problems
