"""Concurrent attempts of one key: fencing, racing runs, crashed owners (real PostgreSQL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eos_airflow import FencedError, KeyInProgressError, Ledger, Origin, failpoints
from eos_airflow.ledger.chain import verify
from tests.conftest import events

TI = Origin("d", "t", "manual__1", -1)


@pytest.fixture
def writes(conn: psycopg.Connection) -> psycopg.Connection:
    conn.execute("CREATE TABLE writes (key text, attempt int, run_id text)")
    return conn


def write(eos, hold: float = 0.0):
    eos.conn.execute(
        "INSERT INTO writes VALUES (%s, %s, %s)", [eos.key, eos.attempt, eos.origin.run_id]
    )
    if hold:
        time.sleep(hold)
    return {"attempt": eos.attempt, "run_id": eos.origin.run_id}


def test_fifty_concurrent_runs_commit_exactly_once(db: str, writes):
    """50 runs of different DAG runs race for one partition key: one writes, the rest skip
    (after waiting) or give up with the retryable KeyInProgressError."""
    ledger = Ledger(db)
    barrier = threading.Barrier(50)

    def claimant(i: int) -> str:
        barrier.wait()
        try:
            return ledger.run_outcome(
                "sales/2024-01-01",
                lambda eos: write(eos, hold=0.5),
                origin=Origin("sales", "load", f"run_{i}", -1),
                wait_timeout=0.05 if i % 2 else 20,
            ).action
        except KeyInProgressError as exc:
            assert exc.retryable and "another live attempt" in str(exc)
            return "in_progress"

    with ThreadPoolExecutor(50) as pool:
        actions = list(pool.map(claimant, range(50)))
    ledger.close()
    assert actions.count("committed") == 1
    assert set(actions) <= {"committed", "skipped", "in_progress"}
    assert "skipped" in actions  # the patient claimants saw the commit
    assert writes.execute("SELECT count(*) FROM writes").fetchone() == (1,)
    assert [e for e, _ in events(writes)].count("committed") == 1
    assert verify(writes).ok


CHILD = textwrap.dedent("""
    import sys, time
    from eos_airflow import Ledger, Origin
    ledger = Ledger(sys.argv[1])
    def fn(eos):
        eos.conn.execute("INSERT INTO writes VALUES (%s, %s, 'child')", [eos.key, eos.attempt])
        print("in-run", flush=True)
        time.sleep(float(sys.argv[2]))
        return {"by": "child"}
    print(ledger.run("k", fn, origin=Origin("d", "t", "child", -1)), flush=True)
""")


def _child(db: str, hold: float, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, db, str(hold)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def test_waiter_takes_over_when_the_owner_is_killed(db: str, writes):
    child = _child(db, hold=60)
    assert child.stdout.readline().strip() == "in-run"
    result = {}

    def waiter():
        with Ledger(db) as ledger:
            result["out"] = ledger.run_outcome(
                "k", write, origin=Origin("d", "t", "other", -1), wait_timeout=30
            )

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.5)  # the waiter is now blocked on the owner's session lock
    assert thread.is_alive()
    started = time.monotonic()
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    thread.join(30)
    assert result["out"].action == "committed"
    assert time.monotonic() - started < 5
    assert writes.execute("SELECT run_id FROM writes").fetchall() == [("other",)]
    took_over = writes.execute(
        "SELECT detail->'took_over'->>'reason' FROM eos.ledger_events "
        "WHERE event = 'claimed' AND seq = 2"
    ).fetchone()
    assert took_over == ("previous owner's session ended",)


def test_claimant_does_not_take_over_a_live_owner(db: str, writes):
    child = _child(db, hold=3)
    assert child.stdout.readline().strip() == "in-run"
    with Ledger(db) as ledger, pytest.raises(KeyInProgressError, match="run 'child'"):
        ledger.run("k", write, origin=Origin("d", "t", "other", -1), wait_timeout=0.5)
    assert child.wait(10) == 0
    assert writes.execute("SELECT run_id FROM writes").fetchall() == [("child",)]


def test_exit_after_commit_then_new_run_does_not_write_again(db: str, writes):
    child = _child(db, hold=0, env={"EOS_FAILPOINTS": "after_commit=exit"})
    child.stdout.readline()
    assert child.wait(10) == failpoints.EXIT_CODE
    with Ledger(db) as ledger:
        out = ledger.run_outcome("k", write, origin=Origin("d", "t", "rerun", -1))
    assert out.action == "skipped" and out.result == {"by": "child"}
    assert writes.execute("SELECT count(*) FROM writes").fetchone() == (1,)
    assert [e for e, _ in events(writes)].count("committed") == 1


def test_exit_before_commit_then_retry_writes_once(db: str, writes):
    child = _child(db, hold=0, env={"EOS_FAILPOINTS": "before_commit=exit"})
    child.stdout.readline()
    assert child.wait(10) == failpoints.EXIT_CODE
    with Ledger(db) as ledger:
        out = ledger.run_outcome("k", write, origin=Origin("d", "t", "child", -1), attempt=2)
    assert out.action == "committed"
    assert writes.execute("SELECT run_id FROM writes").fetchall() == [("child",)]
    assert events(writes) == [("claimed", 1), ("claimed", 2), ("committed", 2)]


# --- randomized interleavings -------------------------------------------------------------

STEPS = ("start", "after_claim", "in_run", "before_commit", "after_commit")


class Scheduler:
    """Holds every attempt thread at each protocol step until the test releases it."""

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.waiting: dict[str, str] = {}
        self.go: set[str] = set()
        self.free = False  # once set, nobody is held any more

    def hold(self, step: str) -> None:
        name = threading.current_thread().name
        with self.cv:
            if self.free:
                return
            self.waiting[name] = step
            self.cv.notify_all()
            assert self.cv.wait_for(lambda: name in self.go or self.free, timeout=60), name
            self.go.discard(name)
            del self.waiting[name]
            self.cv.notify_all()

    def release(self, name: str) -> None:
        with self.cv:
            self.go.add(name)
            self.cv.notify_all()
            # wait until it leaves this step (it may then block inside PostgreSQL)
            self.cv.wait_for(lambda: name not in self.go, timeout=5)


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
@settings(
    max_examples=int(os.environ.get("EOS_HYPOTHESIS_EXAMPLES", "30")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    tries=st.lists(st.integers(1, 3), min_size=2, max_size=4),
    schedule=st.lists(st.integers(0, 11), min_size=24, max_size=24),
)
def test_random_interleavings_never_commit_twice_or_commit_fenced(db: str, writes, tries, schedule):
    """Each step of each attempt (start, claim, run, commit) is released in an order drawn by
    hypothesis; tries 1-3 of one task instance, duplicates included. Every attempt's outcome
    is recorded (an exception other than a fence or a wait timeout fails the example, and so
    does an exception escaping a thread), and the key makes progress: one attempt commits."""
    key = f"k-{uuid.uuid4().hex[:8]}"
    sched = Scheduler()
    for step in failpoints.STEPS:
        failpoints.set_hook(step, lambda attempt, step=step: sched.hold(step))
    ledger = Ledger(db, wait_timeout=1)
    outcomes: dict[str, object] = {}

    def attempt(name: str, try_number: int) -> None:
        sched.hold("start")

        def fn(eos):
            eos.conn.execute("INSERT INTO writes VALUES (%s, %s, %s)", [key, eos.attempt, name])
            sched.hold("in_run")
            return {"by": name}

        try:
            outcomes[name] = ledger.run_outcome(key, fn, attempt=try_number, origin=TI)
        except BaseException as exc:  # every outcome is recorded and judged below
            outcomes[name] = exc

    threads = [
        threading.Thread(target=attempt, args=(f"a{i}", t), name=f"a{i}")
        for i, t in enumerate(tries)
    ]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        choices = iter(schedule)
        while any(t.is_alive() for t in threads):
            assert time.monotonic() < deadline, f"interleaving stuck: {sched.waiting}"
            with sched.cv:
                ready = sorted(n for n in sched.waiting if n not in sched.go)
            if not ready:
                time.sleep(0.005)
                continue
            sched.release(ready[next(choices, 0) % len(ready)])
    finally:
        with sched.cv:
            sched.free = True
            sched.cv.notify_all()
        for thread in threads:
            thread.join(30)
        for step in failpoints.STEPS:
            failpoints.set_hook(step, None)
        ledger.close()

    if os.environ.get("EOS_DEBUG_INTERLEAVINGS"):
        print(tries, {n: getattr(o, "action", type(o).__name__) for n, o in outcomes.items()})
    assert not [t.name for t in threads if t.is_alive()], "attempts still running"
    assert sorted(outcomes) == sorted(t.name for t in threads), f"outcomes lost: {outcomes}"
    unexpected = {
        n: o
        for n, o in outcomes.items()
        if isinstance(o, BaseException) and not isinstance(o, FencedError | KeyInProgressError)
    }
    assert not unexpected, f"attempts failed unexpectedly: {unexpected!r}"
    key_events = writes.execute(
        "SELECT event::text, attempt FROM eos.ledger_events WHERE key = %s ORDER BY seq", [key]
    ).fetchall()
    commits = [a for e, a in key_events if e == "committed"]
    rows = writes.execute("SELECT attempt, run_id FROM writes WHERE key = %s", [key]).fetchall()
    assert len(commits) == 1, (
        f"{len(commits)} commits (progress needs exactly one): {key_events}, outcomes {outcomes}"
    )
    assert len(rows) == len(commits), (rows, key_events)
    if commits:
        # the committing attempt was the latest claimant when it committed
        before = key_events[: [e for e, _ in key_events].index("committed")]
        last_claim = [a for e, a in before if e == "claimed"][-1]
        assert commits[0] == last_claim == rows[0][0]
        winner = rows[0][1]
        assert outcomes[winner].action == "committed"
    for name, outcome in outcomes.items():
        if isinstance(outcome, FencedError):
            assert all(run_id != name for _, run_id in rows)
    if any(getattr(o, "action", None) == "skipped" for o in outcomes.values()):
        assert commits
    assert verify(writes).ok
