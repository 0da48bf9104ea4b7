"""Operator actions and other runs meeting a key's attempts (docs/guarantees.md, "Operator
actions"): ``ledger reopen`` followed by attempts that fail or crash, ``recover`` next to a
live attempt, and a run that skips next to another run's live replace.

Each test checks what a user would: the target's rows, the outbox's messages, the ledger's
state, version and events, and which errors the attempts raised.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from eos_airflow import Ledger, Origin, failpoints
from eos_airflow.protocol.recovery import recover
from tests.conftest import ROOT, events
from tests.protocol.test_twophase import ORIGIN, Banks, _banks, transfer

KEY = "transfer/2024-01-01"  # the key test_twophase's Banks look at
DAY = "sales/2024-01-01"


def reload_day(eos):
    """Load the day; a run that supersedes a committed version removes that version's rows
    first (docs/usage.md: "remove the old outputs when eos.previous is set")."""
    if eos.previous is not None:
        eos.conn.execute("DELETE FROM sales WHERE day = '2024-01-01'")
    eos.conn.execute("INSERT INTO sales VALUES ('2024-01-01', %s)", [eos.attempt])
    eos.publish("nats:sales.loaded", {"day": "2024-01-01"})
    if os.environ.get("EOS_TEST_FAIL_LOAD") == "1":
        raise RuntimeError("the source file is truncated")
    return {"previous_version": eos.previous.version if eos.previous else 0}


CRASHING_RUN = """
import sys
from eos_airflow import Ledger, Origin
from tests.protocol.test_operator_actions import reload_day
with Ledger(sys.argv[1]) as ledger:
    ledger.run(sys.argv[2], reload_day, attempt=1, origin=Origin("sales", "load", "run-2", -1))
"""


@pytest.fixture
def sales(conn: psycopg.Connection) -> psycopg.Connection:
    conn.execute("CREATE TABLE sales (day date, loaded_by_try int)")
    return conn


def reopen(conn: psycopg.Connection, key: str = KEY) -> None:
    conn.execute("SELECT * FROM eos.reopen(%s, 'source file corrected', 'test')", [key])


@pytest.mark.parametrize("interrupted", ["failed", "crashed"])
def test_a_reopened_key_keeps_its_previous_version_across_failed_and_crashed_attempts(
    db: str, sales, monkeypatch, interrupted
):
    """Reopen, then an attempt that fails (or dies) before its commit: the key is ``failed``
    (or ``running`` with a dead owner) but still holds version 1, so the next attempt must
    see it as ``eos.previous`` and replace it — not add version 2 beside it."""
    with Ledger(db) as ledger:
        ledger.run(DAY, reload_day, origin=Origin("sales", "load", "run-1", -1))
        reopen(sales, DAY)
        if interrupted == "failed":
            monkeypatch.setenv("EOS_TEST_FAIL_LOAD", "1")
            with pytest.raises(RuntimeError, match="truncated"):
                ledger.run(DAY, reload_day, origin=Origin("sales", "load", "run-2", -1))
            monkeypatch.delenv("EOS_TEST_FAIL_LOAD")
        else:
            env = {**os.environ, "EOS_FAILPOINTS": "before_commit=exit", "PYTHONPATH": str(ROOT)}
            done = subprocess.run(
                [sys.executable, "-c", CRASHING_RUN, db, DAY],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                cwd=ROOT,
            )
            assert done.returncode == failpoints.EXIT_CODE, done.stdout + done.stderr
        assert sales.execute("SELECT state::text FROM eos.ledger").fetchone()[0] == (
            "failed" if interrupted == "failed" else "running"
        )
        outcome = ledger.run_outcome(
            DAY, reload_day, attempt=2, origin=Origin("sales", "load", "run-2", -1)
        )
    assert (outcome.action, outcome.version, outcome.result) == (
        "committed",
        2,
        {"previous_version": 1},
    )
    assert sales.execute("SELECT loaded_by_try FROM sales").fetchall() == [(2,)]
    assert sales.execute("SELECT version, seq FROM eos.outbox ORDER BY id").fetchall() == [
        (1, 1),
        (2, 1),
    ], "message numbering follows the version being written"
    interruption = ["failed"] if interrupted == "failed" else []  # a crash records nothing
    assert [e for e, _ in events(sales, DAY)] == [
        "claimed",
        "committed",
        "reopened",
        "claimed",
        *interruption,
        "claimed",
        "committed",
    ]


# --- recover and a run that skips, next to live attempts ----------------------------------

HOLD = """
import sys, time
from eos_airflow import Ledger, LostClaimError
def hold(eos):
    eos.conn.execute("INSERT INTO sales VALUES ('2024-01-01', %s)", [eos.attempt])
    if sys.argv[2] == "drop-lock":  # the function frees the session's advisory locks
        eos.conn.execute("SELECT pg_advisory_unlock_all()")
    print("in-run", flush=True)
    sys.stdin.readline()
    return {"try": eos.attempt}
try:
    print(Ledger(sys.argv[1]).run(sys.argv[2], hold), flush=True)
except LostClaimError as exc:
    print("LOST", exc.retryable, exc, flush=True)
"""


def _cli(*args: str, dsn: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eos_airflow.cli.main", *args, "--dsn", dsn],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_recover_never_expires_a_live_claim_but_an_abandoned_one_fails_retryably(db: str, sales):
    """recover expires only claims whose session is gone. An attempt whose function dropped
    the session's advisory locks looks gone: recover releases it, and the attempt fails with
    the retryable LostClaimError — not with FencedError, which Airflow would not retry."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for mode, expect_lost in (("keep-lock", False), ("drop-lock", True)):
        key = mode
        sales.execute("TRUNCATE sales")
        child = subprocess.Popen(
            [sys.executable, "-c", HOLD, db, mode],
            env=env,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout.readline().strip() == "in-run"
        report = _cli("recover", "--older-than", "0s", "--format", "json", dsn=db)
        assert report.returncode == 0, report.stderr
        expired = [r["key"] for r in json.loads(report.stdout)["expired"]]
        assert expired == ([key] if expect_lost else [])
        rest, _ = child.communicate("go\n", timeout=30)
        if expect_lost:
            assert rest.startswith("LOST True") and "released the key" in rest, rest
            assert sales.execute("SELECT count(*) FROM sales").fetchone() == (0,)
            assert [e for e, _ in events(sales, key)] == ["claimed", "failed", "fenced"]
            with Ledger(db) as ledger:  # Airflow's retry writes the effect
                assert ledger.run(key, lambda eos: {"try": eos.attempt}, attempt=2) == {"try": 2}
        else:
            assert rest.strip() == "{'try': 1}", rest
            assert sales.execute("SELECT loaded_by_try FROM sales").fetchall() == [(1,)]
            assert [e for e, _ in events(sales, key)] == ["claimed", "committed"]


# --- several databases ----------------------------------------------------------------


@pytest.fixture
def banks(pg_admin_dsn: str, template_db: str) -> Iterator[Banks]:
    """Banks ``a`` and ``b``, with bank ``a``'s ledger as the coordinator."""
    yield from _banks(pg_admin_dsn, template_db, separate_coordinator=False)


def move_once(eos):
    """The transfer as an effect that may replace itself: a run that supersedes a committed
    version first undoes that version's move, so the money moves once per key."""
    if eos.previous is not None:
        eos.conns["a"].execute("UPDATE accounts SET balance = balance + 10 WHERE id = 1")
        eos.conns["b"].execute("UPDATE accounts SET balance = balance - 10 WHERE id = 1")
    if os.environ.get("EOS_TEST_FAIL_LOAD") == "1":
        raise RuntimeError("the transfer's input is missing")
    return transfer(eos)


class Stalled:
    """Hold the attempts of one try at a failpoint step until released."""

    def __init__(self, step: str, attempt: int) -> None:
        self.step, self.attempt = step, attempt
        self.reached, self.go = threading.Event(), threading.Event()

    def __call__(self, attempt: int | None) -> None:
        if attempt == self.attempt:
            time.sleep(0.2)  # let every participant finish the step
            self.reached.set()
            self.go.wait(60)

    def __enter__(self) -> Stalled:
        failpoints.set_hook(self.step, self)
        return self

    def __exit__(self, *exc: object) -> None:
        failpoints.set_hook(self.step, None)
        self.go.set()


def in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict[str, object]]:
    done: dict[str, object] = {}

    def call() -> None:
        try:
            done["outcome"] = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            done["outcome"] = exc

    thread = threading.Thread(target=call)
    thread.start()
    return thread, done


def test_recover_leaves_a_live_prepared_attempt_alone(banks):
    """Finding: recover aborted an undecided transaction whose attempt was alive (prepared,
    about to decide) once the grace period counted from the claim had passed; the attempt
    then failed with the non-retryable FencedError and the transfer was lost."""
    with Stalled("after_prepare", 1) as stalled, banks.ledger() as ledger:
        thread, done = in_thread(ledger.run_outcome, KEY, move_once, origin=ORIGIN)
        assert stalled.reached.wait(30)
        time.sleep(1.2)
        with banks.ledger() as other:
            (waiting,) = other.recover(grace=1)
        assert waiting.outcome == "waiting" and "its attempt is alive" in waiting.detail
        stalled.go.set()
        thread.join(30)
    assert done["outcome"].action == "committed", done
    banks.assert_moved(1)
    assert banks.events() == ["claimed", "prepared", "decided", "committed"]


SLOW_WORKER = """
import sys, time
from eos_airflow import Origin
from eos_airflow.multiledger import MultiLedger
from tests.protocol.test_operator_actions import move_once
def slow(eos):
    time.sleep(float(sys.argv[4]))
    return move_once(eos)
with MultiLedger(sys.argv[1], {"a": sys.argv[2], "b": sys.argv[3]},
                 conn_ids={"a": "bank_a", "b": "bank_b"}) as banks:
    banks.run("transfer/2024-01-01", slow, origin=Origin("bank", "transfer", "run-1", -1))
"""


def test_recover_counts_the_grace_period_from_prepare(banks):
    """An attempt that ran 3 s, prepared and died: its transaction is abandoned, but recover
    waits the grace period from its PREPARE, not from its claim — also when it finds the
    participants by the Airflow connection ids in the decision log (`recover --conn-id`)."""
    env = {**os.environ, "EOS_FAILPOINTS": "after_prepare=exit", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", SLOW_WORKER, banks.dsns["c"], banks.dsns["a"], banks.dsns["b"], "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == failpoints.EXIT_CODE, done.stderr
    by_conn_id = {"bank_a": banks.dsns["a"], "bank_b": banks.dsns["b"]}

    def connect(conn_id: str):
        return lambda: psycopg.connect(by_conn_id[conn_id], autocommit=True)

    with psycopg.connect(banks.dsns["c"], autocommit=True) as coordinator:
        (young,) = recover(coordinator, by_conn_id=connect, grace=2.5)
        assert young.outcome == "waiting" and "within the grace period" in young.detail
        time.sleep(2.6)
        (old,) = recover(coordinator, by_conn_id=connect, grace=2.5)
    assert old.outcome == "aborted", old
    assert banks.prepared() == []
    with banks.ledger() as ledger:
        again = ledger.run_outcome(KEY, move_once, attempt=2, origin=ORIGIN)
    assert again.action == "committed"
    banks.assert_moved(1)


def test_a_run_that_skips_leaves_another_runs_live_replace_alone(banks):
    """Finding: a run that found the key committed aborted every unresolved transaction of
    the key — also another run's live replace attempt, which then died with FencedError."""
    with banks.ledger() as ledger:
        ledger.run(KEY, move_once, origin=ORIGIN)
    with Stalled("after_prepare", 1) as stalled, banks.ledger() as ledger:
        thread, done = in_thread(
            ledger.run_outcome,
            KEY,
            move_once,
            on_committed="replace",
            origin=Origin("bank", "transfer", "run-2", -1),
        )
        assert stalled.reached.wait(30)
        with banks.ledger() as other:
            skipped = other.run_outcome(
                KEY, move_once, origin=Origin("bank", "transfer", "run-3", -1)
            )
        assert skipped.action == "skipped" and len(banks.prepared()) == 2
        stalled.go.set()
        thread.join(30)
    assert (done["outcome"].action, done["outcome"].version) == ("replaced", 2), done
    banks.assert_moved(1)


def test_a_decided_transaction_finished_by_a_skipping_run_is_still_reported_committed(banks):
    """Finding: a run that skips finishes a decided transaction (COMMIT PREPARED) between the
    owner's decision and the owner's own COMMIT PREPARED; the owner then raised psycopg's
    UndefinedObject although its effect had committed."""
    with banks.ledger() as ledger:
        ledger.run(KEY, move_once, origin=ORIGIN)
    with Stalled("after_decision", 1) as stalled, banks.ledger() as ledger:
        thread, done = in_thread(
            ledger.run_outcome,
            KEY,
            move_once,
            on_committed="replace",
            origin=Origin("bank", "transfer", "run-2", -1),
        )
        assert stalled.reached.wait(30)
        with banks.ledger() as other:
            skipped = other.run_outcome(
                KEY, move_once, origin=Origin("bank", "transfer", "run-3", -1)
            )
        assert skipped.action == "skipped" and skipped.version == 2
        assert banks.prepared() == [], "the skipping run finished the decided transaction"
        stalled.go.set()
        thread.join(30)
    assert (done["outcome"].action, done["outcome"].version) == ("replaced", 2), done
    banks.assert_moved(1)


def test_a_reopened_transfer_keeps_its_previous_version_after_a_failed_attempt(banks, monkeypatch):
    with banks.ledger() as ledger:
        ledger.run(KEY, move_once, origin=ORIGIN)
        with psycopg.connect(banks.dsns["c"], autocommit=True) as conn:
            reopen(conn)
        monkeypatch.setenv("EOS_TEST_FAIL_LOAD", "1")
        with pytest.raises(RuntimeError, match="input is missing"):
            ledger.run(KEY, move_once, origin=Origin("bank", "transfer", "run-2", -1))
        monkeypatch.delenv("EOS_TEST_FAIL_LOAD")
        again = ledger.run_outcome(
            KEY, move_once, attempt=2, origin=Origin("bank", "transfer", "run-2", -1)
        )
    assert (again.action, again.version) == ("committed", 2)
    banks.assert_moved(1)
