"""Effects across several databases (protocol/twophase.py, recovery.py) on real PostgreSQL.

Every test moves 10 from account 1 of bank ``a`` to account 1 of bank ``b`` (each starts at
100) as one effect, and checks what a user would: the balances changed exactly once or not at
all, the total is unchanged, nothing is left in ``pg_prepared_xacts``, and the ledger says why.
Crashes are real: ``exit`` failpoints run in a subprocess that ends with ``os._exit``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import sql

from eos_airflow import (
    ConfigurationError,
    FencedError,
    LedgerSchemaError,
    Origin,
    failpoints,
)
from eos_airflow.errors import DatabaseUnavailableError, FailpointError
from eos_airflow.multiledger import MultiLedger
from eos_airflow.protocol.twophase import (
    InDoubtError,
    ParticipantError,
    make_txid,
    parse_gid,
)
from tests.conftest import (
    ROOT,
    create_database,
    drop_database,
    dsn_for,
    events,
    prepared_transactions_or_skip,
)

KEY = "transfer/2024-01-01"
ORIGIN = Origin("bank", "transfer", "run-1", -1)
#: Every failpoint of the protocol and the protocol it belongs to.
STEPS = {
    "after_prepare": "2pc",
    "after_decision": "2pc",
    "after_first_commit_prepared": "2pc",
    "after_precommit": "3pc",
}
#: Does the effect stand after a crash at this step (the decision was taken)?
DECIDED = {
    "after_prepare": False,
    "after_decision": True,
    "after_first_commit_prepared": True,
    "after_precommit": True,
}
#: Steps after the decision committed: an attempt interrupted there by an exception (not a
#: crash) finishes its transaction itself before it fails, leaving nothing in doubt.
ROLLED_FORWARD = {"after_decision", "after_first_commit_prepared"}

SETUP = """
CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL);
INSERT INTO accounts VALUES (1, 100);
CREATE TABLE transfer_log (account int REFERENCES accounts DEFERRABLE INITIALLY DEFERRED,
                           amount int);
"""

WORKER = """
import sys
from eos_airflow import Origin
from eos_airflow.multiledger import MultiLedger
from tests.protocol.test_twophase import transfer
coordinator, a, b, protocol = sys.argv[1:5]
with MultiLedger(coordinator, {"a": a, "b": b}, protocol=protocol) as banks:
    print(banks.run(sys.argv[5], transfer, attempt=1,
                    origin=Origin("bank", "transfer", "run-1", -1)))
"""


def transfer(eos):
    eos.conns["a"].execute("UPDATE accounts SET balance = balance - 10 WHERE id = 1")
    eos.conns["a"].execute("INSERT INTO transfer_log VALUES (1, -10)")
    eos.conns["b"].execute("UPDATE accounts SET balance = balance + 10 WHERE id = 1")
    eos.conns["b"].execute("INSERT INTO transfer_log VALUES (1, 10)")
    return {"amount": 10, "by_try": eos.attempt}


@dataclass
class Banks:
    """Coordinator ``c`` (its own database, so it can go down alone) and banks ``a``, ``b``."""

    admin: str
    names: dict[str, str]
    dsns: dict[str, str]

    def ledger(self, protocol: str = "2pc") -> MultiLedger:
        return MultiLedger(
            self.dsns["c"], {"a": self.dsns["a"], "b": self.dsns["b"]}, protocol=protocol
        )

    def balances(self) -> tuple[int, int]:
        found = []
        for name in ("a", "b"):
            with psycopg.connect(self.dsns[name]) as conn:
                found.append(conn.execute("SELECT balance FROM accounts").fetchone()[0])
        return found[0], found[1]

    def prepared(self) -> list[str]:
        with psycopg.connect(self.admin) as conn:
            return [
                gid
                for (gid,) in conn.execute(
                    "SELECT gid FROM pg_prepared_xacts WHERE database = ANY(%s)",
                    [list(self.names.values())],
                )
            ]

    def assert_moved(self, times: int) -> None:
        a, b = self.balances()
        assert (a, b) == (100 - 10 * times, 100 + 10 * times)
        assert a + b == 200
        assert self.prepared() == []

    def state(self, key: str = KEY) -> str | None:
        with psycopg.connect(self.dsns["c"]) as conn:
            row = conn.execute(
                "SELECT state::text FROM eos.ledger WHERE key = %s", [key]
            ).fetchone()
        return row and row[0]

    def events(self, key: str = KEY) -> list[str]:
        with psycopg.connect(self.dsns["c"]) as conn:
            return [e for e, _ in events(conn, key)]

    def coordinator_down(self) -> None:
        with psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(
                    sql.Identifier(self.names["c"])
                )
            )
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                [self.names["c"]],
            )

    def coordinator_up(self) -> None:
        with psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(
                    sql.Identifier(self.names["c"])
                )
            )

    def crash(self, protocol: str, failpoint: str, key: str = KEY) -> None:
        """Run attempt 1 in a process that dies at ``failpoint``."""
        env = {**os.environ, "EOS_FAILPOINTS": f"{failpoint}@1=exit", "PYTHONPATH": str(ROOT)}
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                WORKER,
                self.dsns["c"],
                self.dsns["a"],
                self.dsns["b"],
                protocol,
                key,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert done.returncode == failpoints.EXIT_CODE, done.stdout + done.stderr
        assert f"failpoint {failpoint.split('@')[0]} exits the process" in done.stderr


def _banks(admin: str, template: str, *, separate_coordinator: bool) -> Iterator[Banks]:
    token = uuid.uuid4().hex[:8]
    names = {
        n: f"eos_2pc_{n}_{token}" for n in (("c", "a", "b") if separate_coordinator else ("a", "b"))
    }
    dsns = {n: create_database(admin, db, template=template) for n, db in names.items()}
    dsns.setdefault("c", dsns["a"])  # else bank a's ledger coordinates, as in most set-ups
    try:
        prepared_transactions_or_skip(dsns["a"])
    except BaseException:  # skipped or failed: leave no databases behind
        for db in names.values():
            drop_database(admin, db)
        raise
    for name in ("a", "b"):
        with psycopg.connect(dsns[name], autocommit=True) as conn:
            conn.execute(SETUP)
    yield Banks(admin, names, dsns)
    if separate_coordinator:
        Banks(admin, names, dsns).coordinator_up()
    finish_leftovers(admin, names.values())
    for db in names.values():
        drop_database(admin, db)


@pytest.fixture
def banks(pg_admin_dsn: str, template_db: str) -> Iterator[Banks]:
    """Banks ``a`` and ``b``; ``a``'s ledger is the coordinator."""
    yield from _banks(pg_admin_dsn, template_db, separate_coordinator=False)


@pytest.fixture
def split_banks(pg_admin_dsn: str, template_db: str) -> Iterator[Banks]:
    """Banks ``a`` and ``b`` and a coordinator database ``c`` of its own (it can go down)."""
    yield from _banks(pg_admin_dsn, template_db, separate_coordinator=True)


def finish_leftovers(admin: str, databases) -> None:
    """Roll back what a failed test left prepared: it would block DROP DATABASE and hold one
    of the server's max_prepared_transactions slots."""
    with psycopg.connect(admin) as conn:
        rows = conn.execute(
            "SELECT gid, database FROM pg_prepared_xacts WHERE database = ANY(%s)",
            [list(databases)],
        ).fetchall()
    for gid, database in rows:
        with psycopg.connect(dsn_for(admin, database), autocommit=True) as conn:
            conn.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))


@pytest.mark.parametrize("protocol", ["2pc", "3pc"])
def test_transfer_commits_once_on_both_databases_and_logs_the_decision(banks, protocol):
    with banks.ledger(protocol) as ledger:
        first = ledger.run_outcome(KEY, transfer, origin=ORIGIN)
        again = ledger.run_outcome(KEY, transfer, attempt=2, origin=ORIGIN)
    assert (first.action, first.result) == ("committed", {"amount": 10, "by_try": 1})
    assert (again.action, again.result) == ("skipped", {"amount": 10, "by_try": 1})
    banks.assert_moved(1)
    assert banks.events() == ["claimed", "prepared", "decided", "committed", "skipped"]
    with psycopg.connect(banks.dsns["c"]) as conn:
        txid, decision, outcome, participants = conn.execute(
            "SELECT txid, decision, outcome, participants FROM eos.twophase"
        ).fetchone()
    assert (decision, outcome) == ("commit", "committed")
    assert txid.startswith(f"eos:{protocol[0]}:") and len(txid) + 2 < 200
    assert sorted(participants) == ["a", "b"]
    assert parse_gid(participants["b"]["gid"]).txid == txid
    with psycopg.connect(banks.dsns["a"]) as conn:
        votes = conn.execute("SELECT state FROM eos.precommits").fetchall()
    assert votes == ([("precommitted",)] if protocol == "3pc" else [])


def test_gids_stay_under_200_bytes_and_name_their_key_attempt_and_participant():
    txid = make_txid("3pc", "k" * 1000, 2_000_000_000, uuid.uuid4())
    gid = f"{txid}:{'p' * 40}"
    assert len(gid.encode()) < 200
    parsed = parse_gid(gid)
    assert (parsed.protocol, parsed.attempt, parsed.participant) == ("3pc", 2_000_000_000, "p" * 40)
    assert parse_gid("someone_elses_gid") is None


def test_single_target_handle_is_refused_and_bad_targets_fail_before_anything(banks):
    with banks.ledger() as ledger, pytest.raises(ConfigurationError) as info:
        ledger.run(KEY, lambda eos: eos.conn.execute("SELECT 1"), origin=ORIGIN)
    assert str(info.value) == (
        "this effect writes to several targets ('a', 'b'): use "
        "eos.conns[name], e.g. eos.conns['a'], instead of eos.conn"
    )
    assert banks.state() == "failed"
    for bad, message in [
        ({"a": banks.dsns["a"]}, "at least two names"),
        ({"a": banks.dsns["a"], "b-x": banks.dsns["b"]}, "letters, digits"),
    ]:
        with pytest.raises(ConfigurationError, match=message):
            MultiLedger(banks.dsns["c"], bad)
    with pytest.raises(ConfigurationError, match="choose '2pc' or '3pc'"):
        MultiLedger(banks.dsns["c"], {"a": banks.dsns["a"], "b": banks.dsns["b"]}, protocol="xa")
    banks.assert_moved(0)


@pytest.mark.parametrize("protocol", ["2pc", pytest.param("3pc", marks=pytest.mark.slow)])
def test_participant_refusing_to_prepare_commits_nothing_anywhere(banks, protocol):
    def bad_transfer(eos):
        transfer(eos)
        eos.conns["b"].execute("INSERT INTO transfer_log VALUES (999, 1)")  # checked at PREPARE
        return {}

    with banks.ledger(protocol) as ledger, pytest.raises(ParticipantError) as info:
        ledger.run(KEY, bad_transfer, origin=ORIGIN)
    message = str(info.value)
    assert message.startswith(
        f"effect {KEY!r} attempt 1: participant 'b' refused to prepare (23503: "
    )
    assert "nothing was committed on any database" in message
    assert info.value.retryable is False
    banks.assert_moved(0)
    assert banks.state() == "failed"
    assert banks.events()[-2:] == ["aborted", "failed"]


def test_a_caught_error_in_one_participant_is_not_prepared_as_if_it_worked(banks):
    def swallow(eos):
        transfer(eos)
        try:
            eos.conns["b"].execute("SELECT 1 / 0")
        except psycopg.errors.DivisionByZero:
            pass  # b's transaction is aborted now: PREPARE would only roll it back
        return {}

    with banks.ledger() as ledger, pytest.raises(ParticipantError) as info:
        ledger.run(KEY, swallow, origin=ORIGIN)
    assert str(info.value).startswith(
        "a statement failed in participant 'b''s transaction "
        "and the function went on (it caught the error); "
        "nothing was committed."
    )
    banks.assert_moved(0)
    assert banks.state() == "failed"


def test_3pc_needs_the_ledger_schema_in_every_participant(banks):
    with psycopg.connect(banks.dsns["b"], autocommit=True) as conn:
        conn.execute("DROP SCHEMA eos CASCADE")
    with banks.ledger("3pc") as ledger, pytest.raises(LedgerSchemaError) as info:
        ledger.run(KEY, transfer, origin=ORIGIN)
    assert (
        f'the ledger schema "eos" is missing or incomplete in database '
        f'"{banks.names["b"]}"' in str(info.value)
    )
    assert "eos-airflow db migrate" in str(info.value)
    banks.assert_moved(0)
    assert banks.state() == "failed"


@pytest.mark.parametrize("step", list(STEPS))
def test_raise_at_each_failpoint_then_retry_moves_money_once(banks, step, monkeypatch):
    protocol = STEPS[step]
    monkeypatch.setenv("EOS_FAILPOINTS", f"{step}@1=raise")
    with banks.ledger(protocol) as ledger:
        with pytest.raises(FailpointError):
            ledger.run(KEY, transfer, origin=ORIGIN)
        if step in ROLLED_FORWARD:  # attempt 1 committed everywhere before failing
            assert banks.prepared() == []
            banks.assert_moved(1)
        retry = ledger.run_outcome(KEY, transfer, attempt=2, origin=ORIGIN)
    banks.assert_moved(1)
    assert banks.state() == "committed"
    if step in ROLLED_FORWARD:  # the retry skips: nothing was left to finish
        assert (retry.action, retry.result) == ("skipped", {"amount": 10, "by_try": 1})
        assert "recovered" not in banks.events()
    elif DECIDED[step]:  # the retry finished attempt 1's transaction and ran nothing
        assert retry.result == {"amount": 10, "by_try": 1}
        assert retry.action in ("skipped", "recovered")
        assert "recovered" in banks.events()
    else:
        assert (retry.action, retry.result) == ("committed", {"amount": 10, "by_try": 2})
        assert "aborted" in banks.events()


@pytest.mark.parametrize(
    "step,how", [("after_decision", "recover"), ("after_first_commit_prepared", "retry")]
)
def test_process_killed_at_each_failpoint_is_finished_by_retry_or_recover(banks, step, how):
    _crash_and_finish(banks, STEPS[step], step, how)


#: Every step of each protocol (two-phase commit has no pre-commit step).
PROTOCOL_STEPS = [
    (step, protocol)
    for protocol in ("2pc", "3pc")
    for step in STEPS
    if not (step == "after_precommit" and protocol == "2pc")
]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["retry", "recover"])
@pytest.mark.parametrize("action", ["raise", "exit"])
@pytest.mark.parametrize(
    "step,protocol", PROTOCOL_STEPS, ids=[f"{step}-{protocol}" for step, protocol in PROTOCOL_STEPS]
)
def test_failpoint_matrix(banks, step, protocol, action, how, monkeypatch):
    """Every step × protocol × action × finisher, EOS_2PC_ROUNDS times (default 1)."""
    for round_ in range(int(os.environ.get("EOS_2PC_ROUNDS", "1"))):
        _crash_and_finish(
            banks,
            protocol,
            step,
            how,
            key=f"{KEY}/{round_}",
            moved=round_,
            action=action,
            monkeypatch=monkeypatch,
        )


def _crash_and_finish(
    banks: Banks,
    protocol: str,
    step: str,
    how: str,
    key: str = KEY,
    moved: int = 0,
    action: str = "exit",
    monkeypatch: pytest.MonkeyPatch | None = None,
) -> None:
    decided = DECIDED[step]
    if action == "exit":
        banks.crash(protocol, step, key)
        if step != "after_first_commit_prepared":  # there the others may finish in time
            assert banks.prepared(), "the crash should leave prepared transactions in doubt"
    else:
        assert monkeypatch is not None
        with monkeypatch.context() as patch, banks.ledger(protocol) as ledger:
            patch.setenv("EOS_FAILPOINTS", f"{step}@1=raise")
            with pytest.raises(FailpointError):
                ledger.run(key, transfer, origin=ORIGIN)
    assert banks.balances()[0] + banks.balances()[1] == 200
    with banks.ledger(protocol) as ledger:
        if how == "recover":
            done = ledger.recover(grace=0)
            if action == "raise" and step in ROLLED_FORWARD:  # finished by attempt 1 itself
                expected = []
            else:
                expected = ["committed"] if decided else ([] if action == "raise" else ["aborted"])
            assert [r.outcome for r in done] == expected, done
            banks.assert_moved(moved + int(decided))
            assert banks.state(key) == ("committed" if decided else "failed")
            assert ("recovered" in banks.events(key)) == bool(expected)
        retry = ledger.run_outcome(key, transfer, attempt=2, origin=ORIGIN)
    banks.assert_moved(moved + 1)
    assert banks.state(key) == "committed"
    assert retry.result["by_try"] == (1 if decided else 2)


def test_recover_finishes_a_partly_committed_transaction(banks):
    """Crash after the decision; one participant committed (as after a crash between the
    COMMIT PREPAREDs); recover commits the other one and logs the recovery."""
    banks.crash("2pc", "after_decision")
    gid = next(g for g in banks.prepared() if g.endswith(":a"))
    with psycopg.connect(banks.dsns["a"], autocommit=True) as conn:
        conn.execute(sql.SQL("COMMIT PREPARED {}").format(sql.Literal(gid)))
    assert banks.balances() == (90, 100)  # the invariant is broken while in doubt
    with banks.ledger() as ledger:
        done = ledger.recover(grace=0)
    assert [(r.outcome, r.detail) for r in done] == [("committed", "COMMIT PREPARED on b")]
    banks.assert_moved(1)
    assert banks.events()[-1] == "recovered"


def test_zombie_cannot_decide_after_a_newer_try_claimed(banks):
    """Try 1 prepared and stalls; try 2 claims, aborts try 1's prepared work and commits;
    try 1 wakes up and its commit decision is refused (fenced)."""
    prepared, go = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def stall(attempt):
        if attempt == 1:
            time.sleep(0.2)  # let the other participant finish preparing too
            prepared.set()
            go.wait(30)

    def zombie():
        with banks.ledger() as ledger:
            try:
                outcome["zombie"] = ledger.run(KEY, transfer, attempt=1, origin=ORIGIN)
            except Exception as exc:  # noqa: BLE001 - the test inspects it
                outcome["zombie"] = exc

    failpoints.set_hook("after_prepare", stall)
    try:
        thread = threading.Thread(target=zombie)
        thread.start()
        assert prepared.wait(30)
        assert len(banks.prepared()) == 2
        with banks.ledger() as ledger:
            newer = ledger.run_outcome(KEY, transfer, attempt=2, origin=ORIGIN)
        go.set()
        thread.join(30)
    finally:
        failpoints.set_hook("after_prepare", None)
        go.set()
    assert (newer.action, newer.result) == ("committed", {"amount": 10, "by_try": 2})
    assert isinstance(outcome["zombie"], FencedError), outcome
    assert "a newer attempt claimed it while attempt 1 ran" in str(outcome["zombie"])
    banks.assert_moved(1)
    with psycopg.connect(banks.dsns["c"]) as conn:
        rows = conn.execute(
            "SELECT attempt, decision, outcome FROM eos.twophase ORDER BY attempt"
        ).fetchall()
        log = [(e, a) for e, a in events(conn, KEY)]
    assert rows == [(1, "abort", "aborted"), (2, "commit", "committed")]
    assert ("aborted", 1) in log and ("fenced", 1) in log
    assert log[-1] == ("fenced", 1) and ("committed", 2) in log


def test_3pc_participants_finish_the_transfer_while_the_coordinator_is_down(split_banks):
    """Coordinator killed after every participant pre-committed, and its database down: the
    termination protocol commits on the participants; recovery later reconciles the ledger."""
    banks = split_banks
    banks.crash("3pc", "after_precommit")
    banks.coordinator_down()
    try:
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(banks.dsns["c"]).close()
        done = _cli(
            "recover",
            "--terminate",
            "--grace",
            "0s",
            "--format",
            "json",
            "--participant",
            f"a={banks.dsns['a']}",
            "--participant",
            f"b={banks.dsns['b']}",
        )
        assert done.returncode == 0, done.stderr
        assert [r["outcome"] for r in json.loads(done.stdout)["transactions"]] == ["committed"]
        banks.assert_moved(1)
    finally:
        banks.coordinator_up()
    assert banks.state() == "running"  # the coordinator has not heard of it yet
    done = _cli(
        "recover",
        "--dsn",
        banks.dsns["c"],
        "--grace",
        "0s",
        "--format",
        "json",
        "--participant",
        f"a={banks.dsns['a']}",
        "--participant",
        f"b={banks.dsns['b']}",
    )
    assert done.returncode == 0, done.stderr
    assert banks.state() == "committed"
    assert banks.events()[-2:] == ["recovered", "committed"]
    with banks.ledger("3pc") as ledger:
        again = ledger.run_outcome(KEY, transfer, attempt=2, origin=ORIGIN)
    assert (again.action, again.result) == ("skipped", {"amount": 10, "by_try": 1})
    banks.assert_moved(1)


@pytest.mark.parametrize("step", ["after_prepare", "after_decision"])
def test_2pc_blocks_while_the_coordinator_is_down_then_recover_finishes(split_banks, step):
    banks = split_banks
    banks.crash("2pc", step)
    banks.coordinator_down()
    try:
        with banks.ledger() as ledger:
            assert [r.outcome for r in ledger.terminate(grace=0)] == ["blocked"]
            with pytest.raises(DatabaseUnavailableError, match="cannot connect to the ledger"):
                ledger.run(KEY, transfer, attempt=2, origin=ORIGIN)
        assert len(banks.prepared()) == 2  # in doubt: locks held until the coordinator is back
        assert sum(banks.balances()) == 200 and banks.balances() == (100, 100)
    finally:
        banks.coordinator_up()
    done = _cli(
        "recover",
        "--dsn",
        banks.dsns["c"],
        "--grace",
        "0s",
        "--participant",
        f"a={banks.dsns['a']}",
        "--participant",
        f"b={banks.dsns['b']}",
    )
    assert done.returncode == 0, done.stderr
    decided = DECIDED[step]
    assert ("committed" if decided else "aborted") in done.stdout
    banks.assert_moved(int(decided))


def test_recover_leaves_young_undecided_transactions_alone(banks):
    banks.crash("2pc", "after_prepare")
    with banks.ledger() as ledger:
        assert [r.outcome for r in ledger.recover(grace=3600)] == ["waiting"]
        assert len(banks.prepared()) == 2
        assert [r.outcome for r in ledger.recover(grace=0)] == ["aborted"]
    banks.assert_moved(0)


def test_lost_coordinator_during_decision_is_in_doubt_not_aborted(split_banks, monkeypatch):
    banks = split_banks

    def down(attempt):
        banks.coordinator_down()

    failpoints.set_hook("after_prepare", down)
    try:
        with banks.ledger() as ledger, pytest.raises(InDoubtError, match="stays in doubt"):
            ledger.run(KEY, transfer, origin=ORIGIN)
    finally:
        failpoints.set_hook("after_prepare", None)
        banks.coordinator_up()
    assert len(banks.prepared()) == 2
    with banks.ledger() as ledger:
        assert ledger.run_outcome(KEY, transfer, attempt=2, origin=ORIGIN).action == "committed"
    banks.assert_moved(1)


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("EOS_LEDGER_DSN", "EOS_FAILPOINTS")}
    return subprocess.run(
        [sys.executable, "-m", "eos_airflow.cli.main", *argv],
        cwd=ROOT,
        env=env,
        text=True,
        capture_output=True,
        timeout=60,
    )
