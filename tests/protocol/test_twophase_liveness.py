"""Other runs meet a live multi-database attempt, and an attempt outlives its coordinator
session (docs/twophase.md, "Recovery"; docs/guarantees.md, "Operator actions and other runs").

- A new owner finishes the key's earlier transactions right after its claim. It must leave
  alone the transaction of a newer try that claimed the key meanwhile and is alive: aborting
  it made that try fail and the effect was written by nobody.
- An attempt that lost only its coordinator session can still PREPARE on its participants
  after recovery aborted (and closed) its transaction: the attempt must roll back what it
  prepared, and ``recover`` must find such prepared transactions on the participants the
  decision log names, although the log lists nothing unfinished.

Each test checks what a user would: balances, prepared transactions, the ledger's state and
the errors the attempts raised.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from eos_airflow import DatabaseUnavailableError, FencedError, LostClaimError, failpoints
from eos_airflow.multiledger import MultiLedger
from eos_airflow.protocol.recovery import recover
from tests.conftest import ROOT
from tests.protocol.test_operator_actions import KEY, in_thread, move_once
from tests.protocol.test_twophase import ORIGIN, Banks, _banks


@pytest.fixture
def banks(pg_admin_dsn: str, template_db: str) -> Iterator[Banks]:
    """Banks ``a`` and ``b`` and a coordinator ``c`` of its own (its sessions can be cut)."""
    yield from _banks(pg_admin_dsn, template_db, separate_coordinator=True)


@pytest.fixture
def hooks() -> Iterator[dict[str, object]]:
    installed: dict[str, object] = {}
    yield installed
    for step in installed:
        failpoints.set_hook(step, None)


def hook(installed: dict[str, object], step: str, fn) -> None:
    failpoints.set_hook(step, fn)
    installed[step] = fn


class ScanStall:
    """Participant connections whose first look at pg_prepared_xacts waits until released:
    holds a new owner between its claim and its finishing of the key's earlier transactions."""

    def __init__(self) -> None:
        self.reached, self.go = threading.Event(), threading.Event()
        self.armed = True

    def factory(self, dsn: str):
        stall = self

        class Conn(psycopg.Connection):
            def execute(self, query, *args, **kwargs):
                if stall.armed and isinstance(query, str) and "pg_prepared_xacts" in query:
                    stall.armed = False
                    stall.reached.set()
                    stall.go.wait(60)
                return super().execute(query, *args, **kwargs)

        return lambda: Conn.connect(dsn, autocommit=True)


def test_a_new_owner_leaves_a_newer_tries_live_transaction_alone(banks, hooks, monkeypatch):
    """Try 2 claims the key and stalls before it finishes the key's earlier transactions;
    try 3 claims it meanwhile (a newer try takes over), runs and prepares. Try 2 then found
    try 3's prepared transaction on the participants and aborted it: try 3 could not decide,
    try 2 was fenced, and the transfer was written by nobody. Now try 2 leaves it alone: try 3
    commits, and try 2 learns it was fenced."""
    monkeypatch.setenv("EOS_TEST_FAIL_LOAD", "1")
    with banks.ledger() as ledger, pytest.raises(RuntimeError, match="input is missing"):
        ledger.run(KEY, move_once, attempt=1, origin=ORIGIN)
    monkeypatch.delenv("EOS_TEST_FAIL_LOAD")
    assert banks.state() == "failed"

    c_prepared, b_begun = threading.Event(), threading.Event()

    def after_prepare(attempt):
        if attempt == 3:
            time.sleep(0.2)  # let both participants prepare
            c_prepared.set()
            b_begun.wait(30)  # try 3 decides only once try 2 finished the earlier ones

    def after_claim(attempt):
        if attempt == 2:
            b_begun.set()

    hook(hooks, "after_prepare", after_prepare)
    hook(hooks, "after_claim", after_claim)
    stall = ScanStall()
    stalled = MultiLedger(
        banks.dsns["c"], {"a": stall.factory(banks.dsns["a"]), "b": stall.factory(banks.dsns["b"])}
    )
    with stalled, banks.ledger() as newer:
        b_thread, b_done = in_thread(stalled.run_outcome, KEY, move_once, attempt=2, origin=ORIGIN)
        assert stall.reached.wait(30), "try 2 never looked for the key's prepared transactions"
        c_thread, c_done = in_thread(newer.run_outcome, KEY, move_once, attempt=3, origin=ORIGIN)
        assert c_prepared.wait(30), c_done
        assert len(banks.prepared()) == 2
        stall.go.set()
        c_thread.join(60)
        b_thread.join(60)
    assert not c_thread.is_alive() and not b_thread.is_alive()
    outcome = c_done["outcome"]
    assert not isinstance(outcome, Exception), f"try 3 failed: {outcome!r}"
    assert (outcome.action, outcome.version, outcome.attempt) == ("committed", 1, 3)
    assert isinstance(b_done["outcome"], FencedError), b_done
    assert "try 3" in str(b_done["outcome"])
    assert banks.state() == "committed"
    banks.assert_moved(1)


def _cut_coordinator(banks: Banks) -> None:
    """End every session of the coordinator database (the participants' stay) and wait until
    they are gone, so that the attempt's claim lock is free."""
    with psycopg.connect(banks.admin, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            [banks.names["c"]],
        )
        for _ in range(100):
            left = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", [banks.names["c"]]
            ).fetchone()[0]
            if left == 0:
                return
            time.sleep(0.05)
    raise AssertionError("the coordinator's sessions did not end")


def _recover(banks: Banks, **kwargs):
    with psycopg.connect(banks.dsns["c"], autocommit=True) as coordinator:
        return recover(coordinator, grace=0, **kwargs)


def _by_conn_id(banks: Banks):
    by_conn_id = {"bank_a": banks.dsns["a"], "bank_b": banks.dsns["b"]}
    return lambda conn_id: lambda: psycopg.connect(by_conn_id[conn_id], autocommit=True)


def test_an_attempt_that_lost_its_coordinator_session_rolls_back_what_it_prepared(banks, hooks):
    """The attempt's coordinator session ends right before PREPARE; recovery sees its owner
    gone, aborts the transaction and closes it (nothing was prepared yet). The attempt then
    PREPAREs on its participants, which still answer: it used to leave both prepared (an
    orphan holding the account's row lock, decided abort) and report the transaction in
    doubt. Now it settles it in a new session: rolled back, a retryable error, and the next
    try moves the money once."""
    found: list = []

    def before_commit(attempt):
        if attempt == 1:
            _cut_coordinator(banks)
            found.extend(_recover(banks, by_conn_id=_by_conn_id(banks)))

    hook(hooks, "before_commit", before_commit)
    with MultiLedger(
        banks.dsns["c"],
        {"a": banks.dsns["a"], "b": banks.dsns["b"]},
        conn_ids={"a": "bank_a", "b": "bank_b"},
    ) as ledger:
        with pytest.raises(LostClaimError, match="lost the coordinator's session") as lost:
            ledger.run(KEY, move_once, attempt=1, origin=ORIGIN)
        assert [r.outcome for r in found] == ["aborted"], found
        assert lost.value.retryable
        assert banks.prepared() == [], "the attempt rolled back what it prepared"
        assert banks.balances() == (100, 100)
        again = ledger.run_outcome(KEY, move_once, attempt=2, origin=ORIGIN)
    assert (again.action, again.version) == ("committed", 1)
    banks.assert_moved(1)


def test_an_attempt_whose_coordinator_session_ended_while_it_ran_prepares_nothing(banks):
    """The coordinator session ends while the function runs: the attempt checks its session
    right before PREPARE, so it prepares nothing (no window in which an orphan could hold the
    account's row lock), rolls both participants back and fails retryably."""

    def cut_then_move(eos):
        _cut_coordinator(banks)
        return move_once(eos)

    with banks.ledger() as ledger:
        with pytest.raises(DatabaseUnavailableError, match="before transaction") as lost:
            ledger.run(KEY, cut_then_move, attempt=1, origin=ORIGIN)
        assert lost.value.retryable and "nothing was committed" in str(lost.value)
        assert banks.prepared() == [] and banks.balances() == (100, 100)
        again = ledger.run_outcome(KEY, move_once, attempt=2, origin=ORIGIN)
    assert (again.action, again.version) == ("committed", 1)
    banks.assert_moved(1)


ORPHANING_WORKER = """
import sys, time
from eos_airflow import Origin, failpoints
from eos_airflow.multiledger import MultiLedger
from tests.protocol.test_operator_actions import move_once
def before_commit(attempt):
    print("ready", flush=True)
    sys.stdin.readline()
failpoints.set_hook("before_commit", before_commit)
failpoints.set_hook("after_prepare", lambda attempt: time.sleep(0.5))  # both prepare
with MultiLedger(sys.argv[1], {"a": sys.argv[2], "b": sys.argv[3]},
                 conn_ids={"a": "bank_a", "b": "bank_b"}) as banks:
    banks.run("transfer/2024-01-01", move_once, origin=Origin("bank", "transfer", "run-1", -1))
"""


def test_recover_finds_prepared_transactions_the_log_closed_on_the_logged_participants(banks):
    """An attempt lost its coordinator session; recovery aborted and closed its transaction
    (nothing prepared); the attempt prepared both participants and died. The decision log
    lists nothing unfinished, so `recover --conn-id` used to report nothing while the orphans
    held the account's row lock and blocked every later try. recover now looks on the
    participants the log names by connection id and rolls them back (decided abort)."""
    env = {**os.environ, "EOS_FAILPOINTS": "after_prepare=exit", "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", ORPHANING_WORKER, banks.dsns["c"], banks.dsns["a"], banks.dsns["b"]],
        env=env,
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        _cut_coordinator(banks)
        first = _recover(banks, by_conn_id=_by_conn_id(banks))
        assert [r.outcome for r in first] == ["aborted"], first
        _, err = child.communicate("go\n", timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == failpoints.EXIT_CODE, err
    orphans = banks.prepared()
    assert len(orphans) == 2, orphans
    second = _recover(banks, by_conn_id=_by_conn_id(banks))
    assert [(r.outcome, sorted(r.participants)) for r in second] == [("aborted", ["a", "b"])]
    assert banks.prepared() == []
    assert banks.balances() == (100, 100)
    with banks.ledger() as ledger:
        again = ledger.run_outcome(KEY, move_once, attempt=2, origin=ORIGIN)
    assert (again.action, again.version) == ("committed", 1)
    banks.assert_moved(1)
