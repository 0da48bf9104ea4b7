"""PostgreSQL restarted with ``-m immediate`` (a crash: no shutdown checkpoint, crash
recovery at start) while effects run: 8 restarts in the default run, 100 in the slow tier
(EOS_RESTART_CYCLES overrides both).

Invariants after recovery: every key committed exactly once, its one target row written by the
attempt the ledger names, every effect reported committed to its caller still committed (no
loss), no claim left running, and the hash chains verify.
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

CYCLES = int(os.environ.get("EOS_RESTART_CYCLES", "0")) or None


def drive(
    dsn: str, keys: int, stop: threading.Event, done: dict[str, object], rng: random.Random
) -> None:
    """Run effect after effect; retry each key with the next try until it returns."""
    ledger = Ledger(dsn, wait_timeout=5)
    try:
        for i in range(keys):
            key, attempt = f"restart/{i}", 1
            while not stop.is_set():

                def fn(eos, i=i):
                    eos.conn.execute(
                        "INSERT INTO target (key, attempt) VALUES (%s, %s)", [eos.key, eos.attempt]
                    )
                    time.sleep(rng.uniform(0, 0.01))
                    return {"i": i, "attempt": eos.attempt}

                try:
                    done[key] = ledger.run(
                        key, fn, attempt=attempt, origin=Origin("restarts", "load", "run", i)
                    )
                    break
                except (EosError, psycopg.Error):
                    attempt += 1  # Airflow's next try
                    time.sleep(0.05)
    finally:
        ledger.close()


@pytest.mark.parametrize(
    "cycles", [CYCLES or 8, pytest.param(CYCLES or 100, marks=pytest.mark.slow)]
)
def test_immediate_restarts_lose_nothing_and_commit_nothing_twice(own_server, own_db, cycles):
    with psycopg.connect(own_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE target (key text, attempt int)")
    rng = random.Random(int(os.environ.get("EOS_FAULT_SEED", "0")) or None)
    keys = 40 * cycles
    stop, done = threading.Event(), {}
    worker = threading.Thread(target=drive, args=(own_db, keys, stop, done, rng))
    worker.start()
    try:
        for _ in range(cycles):
            time.sleep(rng.uniform(0.05, 0.6))
            own_server.restart("immediate")
        deadline = time.monotonic() + 120
        while worker.is_alive() and time.monotonic() < deadline:
            worker.join(1)
    finally:
        stop.set()
        worker.join(30)
    assert len(done) == keys, f"only {len(done)} of {keys} keys finished"

    with psycopg.connect(own_db, autocommit=True) as conn:
        rows = conn.execute("SELECT key, attempt FROM target").fetchall()
        ledger = dict(
            conn.execute("SELECT key, attempt FROM eos.ledger WHERE state = 'committed'").fetchall()
        )
        states = Counter(s for (s,) in conn.execute("SELECT state::text FROM eos.ledger"))
        commits = Counter(
            k
            for (k,) in conn.execute("SELECT key FROM eos.ledger_events WHERE event = 'committed'")
        )
        assert verify(conn).ok
    written = Counter(k for k, _ in rows)
    assert set(written.values()) == {1}, "a key written twice"
    assert set(commits.values()) == {1}, "a key committed twice"
    assert states == {"committed": keys}, states
    assert dict(rows) == ledger, "each row written by the attempt the ledger names"
    for key, result in done.items():  # what callers were told is what the ledger kept
        assert ledger[key] == result["attempt"]
    retried = sum(1 for a in ledger.values() if a > 1)
    print(
        f"\n{cycles} immediate restarts on PostgreSQL {own_server.version()}: {keys} keys, "
        f"{retried} needed a retry, 0 duplicates, 0 lost"
    )
