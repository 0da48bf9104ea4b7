"""Fencing remembers every try that claimed a key (schema revision 0008).

The two paths that model checking (model/ledger.pml, -DROW_ONLY_FENCING) found around
row-only fencing, replayed against PostgreSQL: a lower try of a task instance arriving after a
higher try released the key, or after another origin took the key over from a crashed higher
try. Both must be fenced at claim and write nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import psycopg
import pytest

from eos_airflow import FencedError, Ledger, Origin
from eos_airflow.ledger.chain import verify
from tests.conftest import events

TI = Origin("sales", "load", "manual__1", -1)
OTHER_RUN = Origin("sales", "load", "backfill__1", -1)


@pytest.fixture
def sales(conn: psycopg.Connection) -> psycopg.Connection:
    conn.execute("CREATE TABLE sales (day text, attempt int)")
    return conn


def insert(eos):
    eos.conn.execute("INSERT INTO sales VALUES ('2024-01-01', %s)", [eos.attempt])
    return {"attempt": eos.attempt}


def boom(eos):
    eos.conn.execute("INSERT INTO sales VALUES ('2024-01-01', %s)", [eos.attempt])
    raise RuntimeError("the load failed")


def test_lower_try_after_the_higher_try_failed_is_fenced(ledger: Ledger, sales):
    with pytest.raises(RuntimeError):
        ledger.run("k", boom, attempt=2, origin=TI)
    with pytest.raises(FencedError, match="try 2 of this task instance claimed it before"):
        ledger.run("k", insert, attempt=1, origin=TI)
    assert sales.execute("SELECT * FROM sales").fetchall() == []
    assert events(sales) == [("claimed", 2), ("failed", 2), ("fenced", 1)]
    # the newer try itself may run again (Airflow's next try is newer still)
    assert ledger.run("k", insert, attempt=3, origin=TI) == {"attempt": 3}
    assert sales.execute("SELECT attempt FROM sales").fetchall() == [(3,)]


CHILD = textwrap.dedent("""
    import sys, time
    from eos_airflow import Ledger, Origin
    def fn(eos):
        print("in-run", flush=True)
        time.sleep(60)
    Ledger(sys.argv[1]).run("k", fn, attempt=2, origin=Origin("sales", "load", "manual__1", -1))
""")


def test_lower_try_after_another_origin_took_over_from_a_crashed_higher_try_is_fenced(
    db: str, ledger: Ledger, sales
):
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, db], stdout=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    assert child.stdout.readline().strip() == "in-run"  # try 2 owns the key
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    with pytest.raises(RuntimeError):  # another run takes the key over, then fails
        ledger.run("k", boom, attempt=1, origin=OTHER_RUN)
    with pytest.raises(FencedError, match="try 2 of this task instance claimed it before"):
        ledger.run("k", insert, attempt=1, origin=TI)
    assert sales.execute("SELECT * FROM sales").fetchall() == []
    assert events(sales) == [("claimed", 2), ("claimed", 1), ("failed", 1), ("fenced", 1)]
    fenced = sales.execute(
        "SELECT detail->>'owner_attempt', detail->>'run_id' "
        "FROM eos.ledger_events WHERE event = 'fenced'"
    ).fetchone()
    assert fenced == ("2", "manual__1")
    assert verify(sales).ok
