"""Connections cut between the code and PostgreSQL at chosen protocol moments (a TCP fault
proxy, tests/faults/proxy.py): during the claim, the user's writes, the ledger commit call,
the release, and COMMIT itself — where the client cannot know whether the commit happened
and the protocol resolves that from the ledger. 60 cuts in the default run, 500 in the slow
tier (EOS_CUTS overrides both).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter

import psycopg
import pytest

from eos_airflow import EosError, Ledger, Origin
from eos_airflow.ledger.chain import verify

CUTS = int(os.environ.get("EOS_CUTS", "0")) or None
#: Where to cut: a client message containing these bytes ... An effect sends two protocol
#: messages around the user's statements: the claim with its COMMIT and the effect's BEGIN,
#: then the ledger's commit() with the effect's COMMIT. From a connection's second effect on,
#: both run as prepared statements, named in the message (EXECUTE "eos_claim_…").
MOMENTS = (
    b".claim(",
    b'EXECUTE "eos_claim_',
    b"INSERT INTO target",
    b".commit(",
    b'EXECUTE "eos_commit_',
    b".release(",
)
#: ... dropped before the server sees it, or forwarded and its reply lost.
MODES = ("drop", "lose_reply")


def write(eos):
    eos.conn.execute("INSERT INTO target (key, attempt) VALUES (%s, %s)", [eos.key, eos.attempt])
    return {"attempt": eos.attempt}


@pytest.fixture
def target(own_db: str) -> str:
    with psycopg.connect(own_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE target (key text, attempt int)")
    return own_db


def test_commit_reply_lost_is_resolved_from_the_ledger(proxy, target):
    """COMMIT reached the server, the reply did not reach the client: the same call reports
    the commit (it asks the ledger), instead of failing a task whose effect landed."""
    dbname = target.rsplit("/", 1)[1]
    with Ledger(proxy.dsn(dbname)) as ledger:
        fired = proxy.arm(b".commit(", "lose_reply")  # the message that ends in COMMIT
        outcome = ledger.run_outcome("lost-reply", write, origin=Origin("d", "t", "r", -1))
        assert fired.is_set()
        assert (outcome.action, outcome.result, outcome.version) == ("committed", {"attempt": 1}, 1)
        fired = proxy.arm(b".commit(", "drop")
        with pytest.raises(EosError, match="the ledger shows that it did not commit") as raised:
            ledger.run("dropped", write, origin=Origin("d", "t", "r", -1))
        assert fired.is_set() and raised.value.retryable
        assert ledger.run("dropped", write, attempt=2, origin=Origin("d", "t", "r", -1)) == {
            "attempt": 2
        }
    with psycopg.connect(target) as conn:
        assert conn.execute("SELECT key, attempt FROM target ORDER BY key").fetchall() == [
            ("dropped", 2),
            ("lost-reply", 1),
        ]
        assert conn.execute(
            "SELECT key, event::text, attempt FROM eos.ledger_events ORDER BY key, seq"
        ).fetchall() == [
            ("dropped", "claimed", 1),
            ("dropped", "failed", 1),
            ("dropped", "claimed", 2),
            ("dropped", "committed", 2),
            ("lost-reply", "claimed", 1),
            ("lost-reply", "committed", 1),
        ]


def test_socket_closed_before_the_connection_counts_as_broken_is_resolved(proxy, target):
    """psycopg reports "connection socket closed" when poll() flags the socket bad before
    libpq has read the EOF; the connection does not count as broken yet. COMMIT reached the
    server: the call must still ask the ledger, not fail a task whose effect landed."""
    dbname = target.rsplit("/", 1)[1]
    opened: list[psycopg.Connection] = []

    def connect() -> psycopg.Connection:
        opened.append(psycopg.connect(proxy.dsn(dbname), autocommit=True))
        return opened[-1]

    # A pipe's write end whose reader is gone: poll() answers POLLERR and never POLLIN, the
    # state psycopg reports as a closed socket while libpq still calls the connection OK.
    reader, writer = os.pipe()
    os.close(reader)
    fired = proxy.arm(b".commit(", "lose_reply")  # COMMIT runs; its reply never comes

    def flag_socket() -> None:
        if fired.wait(10):
            os.dup2(writer, opened[0].fileno())

    flagger = threading.Thread(target=flag_socket)
    try:
        with Ledger(connect=connect) as ledger:
            flagger.start()
            outcome = ledger.run_outcome("socket-closed", write, origin=Origin("d", "t", "r", -1))
    finally:
        flagger.join()
        os.close(writer)
    assert fired.is_set() and len(opened) == 2, "the ledger was asked on a new connection"
    assert (outcome.action, outcome.result, outcome.version) == ("committed", {"attempt": 1}, 1)
    with psycopg.connect(target) as conn:
        assert conn.execute("SELECT key, attempt FROM target").fetchall() == [("socket-closed", 1)]
        assert events_of(conn, "socket-closed") == [("claimed", 1), ("committed", 1)]


def test_a_commit_that_reaches_the_ledger_late_is_resolved_consistently(proxy, target):
    """The broken session's commit() has not locked the ledger entry yet when the new
    connection asks (here another session's FOR SHARE holds it back). The answer must match
    what happens: either the late commit() is fenced (the release comes first), or the
    question waits for it. Found by review: the question ran with FOR SHARE, which does not
    wait behind a share lock, and released in a later transaction — the ledger then said
    `failed ... not committed` after `committed`, and the caller was told nothing committed."""
    dbname = target.rsplit("/", 1)[1]
    blocker = psycopg.connect(target, autocommit=True)

    def write_then_hold_the_entry(eos):
        eos.conn.execute(
            "INSERT INTO target (key, attempt) VALUES (%s, %s)", [eos.key, eos.attempt]
        )
        blocker.execute("BEGIN")
        blocker.execute("SELECT 1 FROM eos.ledger WHERE key = %s FOR SHARE", [eos.key])
        threading.Timer(1.5, blocker.execute, ["COMMIT"]).start()
        return {"attempt": eos.attempt}

    try:
        with Ledger(proxy.dsn(dbname)) as ledger:
            fired = proxy.arm(b".commit(", "lose_reply", reply_wait=0)
            outcome = ledger.run_outcome(
                "late", write_then_hold_the_entry, origin=Origin("d", "t", "r", -1)
            )
            assert fired.is_set()
    finally:
        time.sleep(1.6)
        blocker.close()
    with psycopg.connect(target) as conn:
        trail = events_of(conn, "late")
        rows = conn.execute("SELECT count(*) FROM target WHERE key = 'late'").fetchone()[0]
    assert (outcome.action, outcome.version) == ("committed", 1)
    assert trail == [("claimed", 1), ("committed", 1)] and rows == 1


def events_of(conn: psycopg.Connection, key: str) -> list[tuple[str, int]]:
    return conn.execute(
        "SELECT event::text, attempt FROM eos.ledger_events WHERE key = %s ORDER BY seq", [key]
    ).fetchall()


@pytest.mark.parametrize("cuts", [CUTS or 60, pytest.param(CUTS or 500, marks=pytest.mark.slow)])
def test_random_cuts_never_duplicate_or_lose_a_commit(proxy, target, cuts):
    rng = random.Random(int(os.environ.get("EOS_FAULT_SEED", "0")) or None)
    dbname = target.rsplit("/", 1)[1]
    # none of psycopg's automatic prepared statements: those travel without their text, and
    # the proxy would no longer see the moment to cut (the ledger's own are named in theirs)
    dsn = proxy.dsn(dbname)
    ledger = Ledger(
        connect=lambda: psycopg.connect(dsn, autocommit=True, prepare_threshold=None),
        wait_timeout=10,
    )
    told: dict[str, int] = {}
    fired_at: Counter[tuple[bytes, str]] = Counter()
    key_no = 0
    try:
        while sum(fired_at.values()) < cuts:
            key, attempt = f"cut/{key_no}", 1
            key_no += 1
            while True:
                moment, mode = rng.choice(MOMENTS), rng.choice(MODES)
                fired = proxy.arm(moment, mode) if rng.random() < 0.8 else None
                try:
                    told[key] = ledger.run(
                        key, write, attempt=attempt, origin=Origin("cuts", "load", "run", key_no)
                    )["attempt"]
                    break
                except (EosError, psycopg.Error):
                    attempt += 1  # Airflow's next try
                finally:
                    if fired is not None and fired.is_set():
                        fired_at[(moment, mode)] += 1
                    proxy.disarm()
                    if attempt > 20:
                        pytest.fail(f"{key}: 20 tries did not finish it")
    finally:
        ledger.close()
    time.sleep(0.2)
    with psycopg.connect(target, autocommit=True) as conn:
        rows = conn.execute("SELECT key, attempt FROM target").fetchall()
        committed = dict(
            conn.execute("SELECT key, attempt FROM eos.ledger WHERE state = 'committed'").fetchall()
        )
        states = Counter(s for (s,) in conn.execute("SELECT state::text FROM eos.ledger"))
        commits = Counter(
            k
            for (k,) in conn.execute(
                "SELECT key FROM eos.ledger_events WHERE event IN ('committed', 'replaced')"
            )
        )
        assert verify(conn).ok
    written = Counter(k for k, _ in rows)
    assert set(written.values()) == {1}, "a key written twice"
    assert set(commits.values()) == {1}, "a key committed twice"
    assert states == {"committed": len(told)}, states
    assert dict(rows) == committed == told, "callers, rows and ledger agree"
    print(
        f"\n{sum(fired_at.values())} cuts over {len(told)} keys: "
        + ", ".join(f"{m.decode()}/{mode} {n}" for (m, mode), n in sorted(fired_at.items()))
    )
