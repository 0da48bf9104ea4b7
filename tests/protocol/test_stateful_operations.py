"""Several runs of one key, operator actions and crashes, driven in random orders.

Attempts of one key — tries 1 and 2 of run A and try 1 of run B, each started with
``on_committed="skip"`` or ``"replace"`` — run the real protocol (``Ledger.run_outcome``, or
``MultiLedger.run_outcome`` over two databases with two-phase commit) in threads. Failpoint
hooks hold each attempt at every step: claimed, written, prepared, decided. Hypothesis picks
what happens next: an attempt goes on to its next step, fails there (its function raises), or
crashes (its sessions are terminated, as when its worker dies); an operator runs
``eos-airflow ledger reopen``, ``eos-airflow recover`` (with and without ``--older-than``,
grace 0 or an hour) or ``eos-airflow ledger gc``.

The oracle is written from docs/guarantees.md, not from the SQL:

- the target's rows for the key are exactly the outputs of the latest committed version (the
  function removes the old outputs when ``eos.previous`` is set), never two versions' outputs,
  never none once a commit was reported;
- every attempt that runs gets ``eos.previous`` whenever the key holds a committed version;
- a claim runs, skips, is fenced (a higher try of its task instance claimed the key) or waits
  for a live owner of another run (then ``KeyInProgressError``), in the documented order;
- a live attempt is never fenced by recover or by a run that skips: it commits, or loses the
  key only to a newer try of its own task instance (``FencedError``); recover expires only
  claims whose session is gone, and aborts an undecided transaction only when its attempt is
  gone and it was prepared longer than the grace period ago;
- the ledger's ``state``, ``version`` and ``attempt`` match the model after every step, and
  every key's event chain verifies at the end.

``FLAWS`` re-creates the behaviour before the fixes of docs/guarantees.md "Operator actions and
other runs" (test-only monkeypatches of the old rules); each must make the machine fail.

EOS_STATEFUL_OPS_EXAMPLES sets the number of runs per mode (default 30; the slow tier 300).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.errors import Flaky
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from psycopg import sql

from eos_airflow import KeyInProgressError, Ledger, Origin, failpoints
from eos_airflow.cli.main import main as cli
from eos_airflow.errors import FencedError
from eos_airflow.ledger import queries, store
from eos_airflow.ledger.chain import verify
from eos_airflow.ledger.store import LedgerStore
from eos_airflow.multiledger import MultiLedger
from eos_airflow.protocol import local, prepared, recovery, twophase
from eos_airflow.protocol.effect import Previous
from tests.conftest import create_database, drop_database
from tests.protocol.test_twophase import finish_leftovers

# Three runs: a skip of one run can meet a second run's live replace after a first run's
# commit (a run that merely skips must leave another run's live attempt alone).
ATTEMPTS = [("A", 1), ("A", 2), ("B", 1), ("C", 1)]
STEPS = ("after_claim", "before_commit", "after_prepare", "after_decision")
TIMEOUT = 20.0  # seconds an attempt may take to reach its next step


class Crashed(BaseException):
    """Raised at a held step after the attempt's sessions were terminated: its worker died."""


class Boom(Exception):
    """The function fails at a held step."""


@dataclass
class Runner:
    """One attempt, run in a thread and held at every step until told to go on."""

    me: tuple[str, int]
    on_committed: str
    app: str
    commands: queue.Queue = field(default_factory=queue.Queue)
    reports: queue.Queue = field(default_factory=queue.Queue)
    at: str = "start"  # the step it is held at, or "done"
    outcome: Any = None
    error: BaseException | None = None
    previous: Previous | None = None  # what its function saw as eos.previous
    expected_previous: int | None = None  # the version the model says it supersedes
    deleted_epoch: int | None = None  # the visible outputs its open transaction deleted
    decided_version: int = 0
    replacing: bool = False  # it claimed a committed key (on_committed="replace")
    crashed: bool = False

    def hold(self, step: str) -> None:
        self.reports.put(step)
        command = self.commands.get(timeout=120)
        if command == "crash":
            raise Crashed(step)
        if command == "fail":
            raise Boom(f"the function fails at {step}")


_RUNNERS: dict[threading.Thread, Runner] = {}
#: What the machine did, for the report (docs/reliability.md)
STATS: Counter = Counter()


def _hook(step: str):
    def hook(attempt: int | None) -> None:
        runner = _RUNNERS.get(threading.current_thread())
        if runner is not None:
            runner.hold(step)

    return hook


@dataclass
class Model:
    """What the guarantee says the ledger and the target hold."""

    state: str | None = None  # None (no row), running, committed, failed, reopened
    version: int = 0
    attempt: int = 0  # the try of the attempt that last claimed the key
    owner: tuple[str, int] | None = None
    result: dict | None = None  # the latest committed version's result
    visible: tuple[str, int] | None = None  # whose outputs the target shows
    epoch: int = 0  # bumped whenever the visible outputs change
    pending: tuple[str, int] | None = None  # decided, its participants not committed yet
    max_claimed: dict[str, int] = field(default_factory=dict)
    alive: set = field(default_factory=set)
    # two-phase transactions that are logged and unresolved, by attempt: "open" (live,
    # undecided), "orphan" (its attempt is gone, undecided), "decided"
    txns: dict = field(default_factory=dict)

    def claim(self, me: tuple[str, int], on_committed: str) -> str:
        """The claim rules of docs/guarantees.md ("The protocol", "Fencing scope")."""
        run, try_number = me
        if self.state is None:
            return "run"
        if self.state == "committed" and on_committed == "skip":
            return "skip"
        # fenced by the highest try of its task instance that ever claimed the key, whatever
        # `ledger gc` pruned since
        fence = self.max_claimed.get(run, 0)
        if fence > try_number:
            return "fenced"
        if self.owner is not None:
            newer_try = self.owner[0] == run and self.owner[1] < try_number
            if not newer_try and self.owner in self.alive:
                return "wait"  # another run's live owner: wait, then KeyInProgressError
        return "run"

    def take(self, me: tuple[str, int]) -> None:
        self.state = "committed" if self.state == "committed" else "running"
        self.owner, self.attempt = me, me[1]
        self.max_claimed[me[0]] = max(self.max_claimed.get(me[0], 0), me[1])
        self.alive.add(me)

    def release(self, me: tuple[str, int]) -> None:
        if self.owner == me:
            self.owner = None
            if self.state == "running":
                self.state = "failed"
        self.alive.discard(me)

    def commit(self, me: tuple[str, int], result: dict) -> int:
        self.version += 1
        self.state, self.owner, self.result = "committed", None, result
        self.alive.discard(me)
        return self.version

    def show(self, me: tuple[str, int]) -> None:
        self.visible, self.epoch = me, self.epoch + 1


class OperationsMachine(RuleBasedStateMachine):
    dsns: dict[str, str] = {}
    multi = False

    def __init__(self) -> None:
        super().__init__()
        self.key = f"ops/{uuid.uuid4().hex[:12]}"
        self.model = Model()
        self.runners: dict[tuple[str, int], Runner] = {}
        self.admins = {
            name: psycopg.connect(dsn, autocommit=True) for name, dsn in self.dsns.items()
        }
        self.ledger = self.admins["a"]

    # --- driving attempts ------------------------------------------------------------

    def _effect(self, eos) -> dict:
        runner = _RUNNERS[threading.current_thread()]
        runner.previous = eos.previous
        conns = [eos.conns["a"], eos.conns["b"]] if self.multi else [eos.conn]
        for conn in conns:
            conn.execute("SET LOCAL lock_timeout = '300ms'")
            if eos.previous is not None:  # docs/usage.md: remove the old outputs
                conn.execute("DELETE FROM out WHERE key = %s", [eos.key])
            conn.execute("INSERT INTO out VALUES (%s, %s, %s)", [eos.key, *runner.me])
        return {"by": "".join(map(str, runner.me))}

    def _start(self, runner: Runner) -> None:
        run, try_number = runner.me
        origin = Origin("d", "load", f"run-{run}", -1)

        def connect(name: str):
            return lambda: psycopg.connect(
                self.dsns[name], autocommit=True, application_name=runner.app
            )

        def go() -> None:
            try:
                if self.multi:
                    with MultiLedger(
                        connect("a"), {"a": connect("a"), "b": connect("b")}, wait_timeout=0.3
                    ) as ledger:
                        runner.outcome = ledger.run_outcome(
                            self.key,
                            self._effect,
                            attempt=try_number,
                            origin=origin,
                            on_committed=runner.on_committed,
                        )
                else:
                    with Ledger(connect=connect("a"), wait_timeout=0.3) as ledger:
                        runner.outcome = ledger.run_outcome(
                            self.key,
                            self._effect,
                            attempt=try_number,
                            origin=origin,
                            on_committed=runner.on_committed,
                        )
            except BaseException as exc:  # noqa: BLE001 - the machine judges it
                runner.error = exc
            finally:
                runner.reports.put("done")

        thread = threading.Thread(target=go, daemon=True)
        _RUNNERS[thread] = runner
        thread.start()

    def _await(self, runner: Runner) -> str:
        try:
            runner.at = runner.reports.get(timeout=TIMEOUT)
        except queue.Empty:
            raise AssertionError(
                f"{runner.me} neither reached a step nor ended in "
                f"{TIMEOUT:g} s (held at {runner.at})"
            ) from None
        return runner.at

    def _prepared(self, prefix: str) -> dict[str, int]:
        return {
            name: conn.execute(
                "SELECT count(*) FROM pg_prepared_xacts WHERE database = "
                "current_database() AND starts_with(gid, %s)",
                [prefix],
            ).fetchone()[0]
            for name, conn in self.admins.items()
        }

    def _error(self, runner: Runner, kind: type[BaseException]) -> None:
        assert runner.at == "done" and isinstance(runner.error, kind), (
            f"{runner.me}: expected {kind.__name__}, got {runner.error!r} / {runner.outcome}"
            f" at {runner.at}; model {self.model}"
        )

    def _finish_key_txns(
        self, *, abort_live_older: tuple[str, int] | None = None, scan: bool = False
    ) -> None:
        """What a run that claims (or skips) does to the key's other transactions: a decided
        one is committed, an abandoned one aborted; a claimant also aborts the transaction of
        the older try it took the key from, and (scanning the participants) what a zombie
        prepared after its transaction had been aborted."""
        for who, status in list(self.model.txns.items()):
            if status == "aborted-prepared" and scan:
                del self.model.txns[who]
            elif status == "aborted-live" and scan and self.runners[who].at == "after_prepare":
                self.model.txns[who] = "rolled-back"
            elif status == "decided":
                self.model.show(who)
                self.model.pending = None
                del self.model.txns[who]
            elif status == "orphan" or (who == abort_live_older and status == "open"):
                self.model.txns[who] = "aborted"
                if status == "orphan" and self.model.owner == who:
                    self.model.release(who)  # the abort releases the gone owner's claim

    def _resolve_aborted(self) -> None:
        self.model.txns = {w: s for w, s in self.model.txns.items() if s != "aborted"}

    @precondition(lambda self: len(self.runners) < len(ATTEMPTS))
    @rule(data=st.data(), on_committed=st.sampled_from(["skip", "replace"]))
    def start(self, data, on_committed):
        me = data.draw(st.sampled_from([a for a in ATTEMPTS if a not in self.runners]))
        runner = Runner(me, on_committed, f"eos-ops-{me[0]}{me[1]}-{uuid.uuid4().hex[:6]}")
        self.runners[me] = runner
        model = self.model
        expected = model.claim(me, on_committed)
        STATS[f"claim {expected}"] += 1
        previous_owner = model.owner
        self._start(runner)
        at = self._await(runner)
        if expected == "skip":
            assert at == "done" and runner.error is None, (me, runner.error, model)
            outcome = runner.outcome
            assert (outcome.action, outcome.version, outcome.result) == (
                "skipped",
                model.version,
                model.result,
            ), (me, outcome, model)
            if self.multi:  # it finishes the key's decided and abandoned transactions
                self._finish_key_txns()
                self._resolve_aborted()
        elif expected == "fenced":
            self._error(runner, FencedError)
        elif expected == "wait":
            self._error(runner, KeyInProgressError)
        else:
            assert at == "after_claim", (me, runner.error, runner.outcome, model)
            runner.expected_previous = model.version or None
            runner.replacing = model.state == "committed"
            if self.multi:
                older = (
                    previous_owner
                    if (previous_owner is not None and previous_owner in model.alive)
                    else None
                )
                self._finish_key_txns(abort_live_older=older, scan=True)
                self._resolve_aborted()
                if older is not None and model.txns.get(older) is None:
                    # its decision will be refused; what it had already prepared, the claim
                    # rolled back (the claim finishes the transactions of the try it took
                    # the key from, on the participants too): recover finds nothing of it
                    # unless it prepares again later
                    prepared = self.runners[older].at == "after_prepare"
                    model.txns[older] = "rolled-back" if prepared else "aborted-live"
                model.txns[me] = "open"
            model.take(me)

    def _held(self, *steps: str) -> list[tuple[str, int]]:
        return [me for me, r in self.runners.items() if r.at in steps]

    @precondition(lambda self: any(r.at in STEPS for r in self.runners.values()))
    @rule(data=st.data())
    def advance(self, data):
        me = data.draw(st.sampled_from(self._held(*STEPS)))
        runner, model = self.runners[me], self.model
        step = runner.at
        STATS[f"advance from {step}"] += 1
        conflict = False
        if step == "after_claim":
            # its DELETE of the visible outputs meets another live attempt's open
            # transaction that deleted them too (a zombie older try): it fails retryably
            conflict = runner.expected_previous is not None and any(
                r.deleted_epoch == model.epoch and self._holds_locks(r)
                for r in self.runners.values()
                if r is not runner
            )
        prefix = f"eos:2:{twophase.key_hash(self.key)}:{me[1]}:"
        before = sum(self._prepared(prefix).values()) if step == "before_commit" else 0
        runner.commands.put("go")
        at = self._await(runner)
        if at == "after_prepare":  # the hook fires once the first participant prepared
            deadline = time.monotonic() + TIMEOUT
            while sum(self._prepared(prefix).values()) < before + 2:
                assert time.monotonic() < deadline, "the participants did not prepare"
                time.sleep(0.02)
        if step == "after_claim":
            if conflict:  # the lock timeout, raised as is or as the retryable cause
                error = runner.error
                assert at == "done" and isinstance(
                    error
                    if isinstance(error, psycopg.errors.LockNotAvailable)
                    else getattr(error, "__cause__", None),
                    psycopg.errors.LockNotAvailable,
                ), (me, runner.error, model)
                self._release(me)
                return
            assert at == "before_commit", (me, at, runner.error, model)
            seen = runner.previous.version if runner.previous is not None else None
            assert seen == runner.expected_previous, (
                f"{me} saw eos.previous={seen}, the key holds version "
                f"{runner.expected_previous}: {model}"
            )
            if runner.previous is not None:
                runner.deleted_epoch = model.epoch
        elif step == "before_commit" and not self.multi or step == "after_prepare":
            if model.owner == me:
                assert runner.error is None, (
                    f"{me} owns the key and is alive, yet failed: {runner.error!r}; {model}"
                )
                version = model.commit(me, {"by": "".join(map(str, me))})
                if self.multi:
                    assert at == "after_decision", (me, at, model)
                    runner.decided_version = version
                    model.txns[me] = "decided"
                    model.pending = me
                else:
                    assert at == "done", (me, at)
                    self._check_committed(runner, version)
                    model.show(me)
            else:  # only a newer try of its own task instance takes a live attempt's key
                assert model.max_claimed[me[0]] > me[1], (me, model)
                self._error(runner, FencedError)
                model.alive.discard(me)
                model.txns.pop(me, None)
        elif step == "before_commit":  # several databases: PREPARE
            assert at == "after_prepare", (me, at, runner.error, model)
        else:  # after_decision: COMMIT PREPARED everywhere
            assert at == "done", (me, at)
            self._check_committed(runner, runner.decided_version)
            if model.txns.get(me) == "decided":
                model.show(me)
                model.pending = None
                del model.txns[me]

    def _holds_locks(self, runner: Runner) -> bool:
        """Does this other attempt's transaction still hold the rows it deleted: open, or
        prepared after a newer try aborted its txid (alive, or dead until someone rolls
        it back)?"""
        status = self.model.txns.get(runner.me)
        if runner.at == "before_commit" or status == "decided":  # decided, not finished
            return True
        if runner.at == "after_prepare":
            return status != "rolled-back"
        return runner.crashed and status == "aborted-prepared"

    def _check_committed(self, runner: Runner, version: int) -> None:
        assert runner.error is None, (runner.me, runner.error, self.model)
        action = "replaced" if runner.replacing else "committed"
        assert (runner.outcome.action, runner.outcome.version) == (action, version), (
            runner.me,
            runner.outcome,
            self.model,
        )

    def _release(self, me: tuple[str, int]) -> None:
        self.model.release(me)
        if self.model.txns.get(me) in ("open", "aborted-live", "rolled-back"):
            del self.model.txns[me]

    @precondition(lambda self: any(r.at in STEPS[:3] for r in self.runners.values()))
    @rule(data=st.data())
    def fail(self, data):
        me = data.draw(st.sampled_from(self._held(*STEPS[:3])))
        runner = self.runners[me]
        STATS[f"fail at {runner.at}"] += 1
        runner.commands.put("fail")
        self._await(runner)
        self._error(runner, Boom)
        self._release(me)

    @precondition(lambda self: any(r.at in STEPS for r in self.runners.values()))
    @rule(data=st.data())
    def crash(self, data):
        me = data.draw(st.sampled_from(self._held(*STEPS)))
        runner = self.runners[me]
        step = runner.at
        STATS[f"crash at {step}"] += 1
        self.ledger.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
            "WHERE application_name = %s",
            [runner.app],
        )
        runner.commands.put("crash")
        self._await(runner)
        assert runner.at == "done" and runner.error is not None, (me, runner.outcome)
        runner.crashed = True
        self.model.alive.discard(me)
        if self.multi and self.model.txns.get(me) == "open":
            self.model.txns[me] = "orphan"
        elif self.multi and self.model.txns.get(me) == "aborted-live":
            if step == "after_prepare":  # prepared after a newer try aborted its txid
                self.model.txns[me] = "aborted-prepared"
            else:
                del self.model.txns[me]
        elif self.multi and self.model.txns.get(me) == "rolled-back":
            del self.model.txns[me]
        if step == "before_commit":
            runner.deleted_epoch = None  # the server rolled its transaction back

    # --- operator actions -------------------------------------------------------------

    def _cli(self, *args: str) -> tuple[int, str]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            code = cli([*args, "--dsn", self.dsns["a"]])
        return code, out.getvalue()

    @precondition(lambda self: bool(self.runners))
    @rule(
        action=st.sampled_from(["reopen", "reopen", "recover", "recover --older-than", "gc"]),
        grace=st.sampled_from([0, 3600]),
    )
    def operate(self, action, grace):
        """One operator action (one rule for all, so that attempts get most of the steps)."""
        if action == "reopen":
            self.reopen()
        elif action == "gc":
            self.gc()
        else:
            self.recover(action.endswith("older-than"), grace)

    @precondition(lambda self: any(r.at in STEPS for r in self.runners.values()))
    @rule(data=st.data())
    def advance_again(self, data):
        """Going on is the common case: twice as likely as failing or crashing."""
        self.advance(data)

    def reopen(self):
        code, _ = self._cli("ledger", "reopen", self.key, "--reason", "source corrected")
        model = self.model
        allowed = model.state == "committed" and model.owner is None
        assert (code == 0) == allowed, (code, model)
        STATS["reopen" if allowed else "reopen refused"] += 1
        if allowed:
            model.state = "reopened"

    def recover(self, older_than, grace):
        args = ["recover", "--format", "json", "--grace", f"{grace}s"]
        if older_than:
            args += ["--older-than", "0s"]
        if self.multi:
            args += ["--participant", f"a={self.dsns['a']}", "--participant", f"b={self.dsns['b']}"]
        time.sleep(0.01)  # every claim so far is older than "now - 0s"
        code, out = self._cli(*args)
        assert code == 0, out
        report = json.loads(out)
        model = self.model
        # in-doubt transactions first: decided ones commit; undecided ones are aborted only
        # when their attempt is gone and the grace period passed
        expected = []
        for who, status in sorted(model.txns.items()):
            if status == "decided":
                expected.append((who[1], "committed"))
                model.show(who)
                model.pending = None
                del model.txns[who]
            elif status == "orphan":
                expected.append((who[1], "aborted" if grace == 0 else "waiting"))
                if grace == 0:
                    del model.txns[who]
                    if model.owner == who:
                        model.release(who)  # the abort releases the gone owner's claim
            elif status == "aborted-prepared":  # a zombie's, prepared after its abort
                expected.append((who[1], "aborted"))
                del model.txns[who]
            elif status == "aborted-live":  # resolved; found again if it prepared since
                if self.runners[who].at == "after_prepare":
                    expected.append((who[1], "aborted"))
                    model.txns[who] = "rolled-back"  # nothing of it is prepared any more
            elif status == "open":  # a live attempt's, undecided
                expected.append((who[1], "waiting"))
        # (the databases outlive one example: earlier examples' keys are recovered too)
        got = sorted(
            (int(t["txid"].split(":")[3]), t["outcome"])
            for t in report["transactions"]
            if t["key"] == self.key
        )
        assert got == sorted(expected), (got, expected, model)
        STATS["recover"] += 1
        STATS.update(f"recover: transaction {o}" for _, o in got)
        # claims: only those whose session is gone are expired; live ones are listed
        gone = model.owner is not None and model.owner not in model.alive
        live = model.owner is not None and model.owner in model.alive
        expired = [r["key"] for r in report["expired"] if r["key"] == self.key]
        held = [r["key"] for r in report["held"] if r["key"] == self.key]
        assert expired == ([self.key] if gone else []), (report, model)
        assert held == ([self.key] if live and older_than else []), (report, model)
        STATS.update(
            ["recover: claim expired"] * len(expired) + ["recover: claim held"] * len(held)
        )
        if gone:
            model.release(model.owner)

    def gc(self):
        time.sleep(0.01)
        code, out = self._cli("ledger", "gc", "--older-than", "0s", "--format", "json")
        assert code == 0, out
        STATS["gc"] += 1

    # --- what must hold after every step ----------------------------------------------

    @invariant()
    def ledger_and_target_match_the_model(self):
        model = self.model
        row = self.ledger.execute(
            "SELECT state::text, version, attempt, owner IS NOT NULL FROM eos.ledger "
            "WHERE key = %s",
            [self.key],
        ).fetchone()
        if model.state is None:
            assert row is None
        else:
            assert row == (model.state, model.version, model.attempt, model.owner is not None), (
                row,
                model,
            )
        for name, conn in self.admins.items():
            if name == "a" or self.multi:
                rows = conn.execute(
                    "SELECT run, try FROM out WHERE key = %s", [self.key]
                ).fetchall()
                expected = [] if model.visible is None else [model.visible]
                assert rows == expected, (
                    f"database {name}: the target shows {rows}, the latest committed "
                    f"version is {model.visible}'s: {model}"
                )

    def teardown(self) -> None:
        STATS["examples"] += 1
        for runner in self.runners.values():
            if runner.at in STEPS:
                runner.commands.put("fail")
                with contextlib.suppress(queue.Empty):
                    runner.reports.get(timeout=TIMEOUT)
        for thread in [t for t, r in _RUNNERS.items() if r in self.runners.values()]:
            thread.join(TIMEOUT)
            del _RUNNERS[thread]
        for conn in self.admins.values():
            conn.close()


@contextlib.contextmanager
def databases(admin: str, template: str, mode: str) -> Iterator[dict[str, str]]:
    """One target database ("single"), or two with bank a's ledger coordinating ("multi")."""
    token = uuid.uuid4().hex[:8]
    names = {n: f"eos_ops_{n}_{token}" for n in (("a", "b") if mode == "multi" else ("a",))}
    dsns = {n: create_database(admin, db, template=template) for n, db in names.items()}
    try:
        for dsn in dsns.values():
            with psycopg.connect(dsn, autocommit=True) as conn:
                if (
                    mode == "multi"
                    and int(conn.execute("SHOW max_prepared_transactions").fetchone()[0]) == 0
                ):
                    pytest.skip("two-phase commit needs max_prepared_transactions > 0")
                conn.execute("CREATE TABLE out (key text, run text, try int)")
        for step in STEPS:
            failpoints.set_hook(step, _hook(step))
        yield dsns
    finally:
        for step in STEPS:
            failpoints.set_hook(step, None)
        finish_leftovers(admin, names.values())
        for db in names.values():
            drop_database(admin, db)


@pytest.fixture
def target_dbs(pg_admin_dsn: str, template_db: str, request) -> Iterator[dict[str, str]]:
    with databases(pg_admin_dsn, template_db, request.param) as dsns:
        yield dsns


def run_machine(
    dsns: dict[str, str],
    examples: int,
    *,
    shrink: bool = True,
    steps: int = 20,
    derandomize: bool = False,
) -> None:
    OperationsMachine.dsns = dsns
    OperationsMachine.multi = "b" in dsns
    test = OperationsMachine.TestCase
    phases = [Phase.generate] + ([Phase.shrink] if shrink else [])
    test.settings = settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        phases=phases,
        database=None,
        report_multiple_bugs=False,
        derandomize=derandomize,
        suppress_health_check=list(HealthCheck),
    )
    STATS.clear()
    started = time.monotonic()
    try:
        test().runTest()
    finally:
        print(
            f"{'two databases' if 'b' in dsns else 'one database'}: "
            f"{time.monotonic() - started:.0f} s; "
            + ", ".join(f"{k}: {v}" for k, v in sorted(STATS.items()))
        )
    with psycopg.connect(dsns["a"]) as conn:
        assert verify(conn).ok


EXAMPLES = int(os.environ.get("EOS_STATEFUL_OPS_EXAMPLES", "30"))


@pytest.mark.parametrize("target_dbs", ["single", "multi"], indirect=True)
def test_runs_and_operator_actions_keep_the_guarantee(target_dbs):
    # The default run replays the same histories every time (a fixed seed): a failure here
    # is reproducible; the hunts below draw new histories.
    run_machine(target_dbs, EXAMPLES, derandomize=True)


# The slow tier draws new histories every time, in a bounded number of examples (a few
# minutes per mode); a failure prints the seed to replay it with --hypothesis-seed.
SLOW_HUNT_EXAMPLES = int(os.environ.get("EOS_STATEFUL_OPS_SLOW_EXAMPLES", "60"))


@pytest.mark.slow
@pytest.mark.parametrize("target_dbs", ["single", "multi"], indirect=True)
def test_runs_and_operator_actions_keep_the_guarantee_new_histories(target_dbs):
    run_machine(target_dbs, SLOW_HUNT_EXAMPLES)


# The long hunts (hundreds of examples, minutes each) run on request: EOS_FLAW_HUNT=1.
# A 1,000-example run stopped once on a model gap, found again and shrunk on 2026-12-04: a
# try that takes the key from a live older try which had already PREPAREd rolls that
# older try's prepared transactions back in its claim, so recover then lists nothing of it;
# the model expected recover to abort it (docs/results/stateful-hunts.txt).
HUNT = pytest.mark.skipif(
    not os.environ.get("EOS_FLAW_HUNT"),
    reason="long hunt: set EOS_FLAW_HUNT=1 (and EOS_SLOW=1) to run it",
)


@pytest.mark.slow
@HUNT
# a hunt's length is its example count (EOS_STATEFUL_OPS_EXAMPLES), not the suite's per-test limit
@pytest.mark.timeout(7200)
@pytest.mark.parametrize("target_dbs", ["single", "multi"], indirect=True)
def test_runs_and_operator_actions_keep_the_guarantee_300(target_dbs):
    run_machine(target_dbs, int(os.environ.get("EOS_STATEFUL_OPS_EXAMPLES", "300")))


# --- the old behaviour: each flaw must be found ---------------------------------------------


def _old_previous(conn, schema, key, claim):
    """Before the fix: previous only when the claimed row was committed or reopened."""
    if claim.prior_state == "committed":
        return Previous(claim.result, claim.version, claim.committed_at)
    if claim.prior_state == "reopened":
        entry = LedgerStore(conn, schema).entry(key)
        return Previous(entry.result, entry.version, entry.committed_at)
    return None


def _old_still_live(coordinator, schema, row, conns, now, grace, prepared_at):
    """Before the fix: no liveness test, and the grace period counted from the claim."""
    born = prepared_at or row.created_at
    if (now - born).total_seconds() < grace:
        return "within the grace period"
    return None


OLD_RECOVER_CLAIMS = """
WITH stale AS (
    SELECT l.key, l.owner, l.attempt, l.state, l.event_seq, l.last_hash, l.claimed_at,
           NOT {schema}.owner_alive(l.key, l.owner) AS owner_gone
    FROM {schema}.ledger AS l WHERE l.owner IS NOT NULL FOR UPDATE SKIP LOCKED
), expired AS (
    SELECT s.*, {schema}.append_event(s.key, s.event_seq + 1, s.last_hash, 'failed', s.attempt,
               jsonb_build_object('recovered_by', 'eos-airflow recover',
                                  'released_owner', s.owner)) AS hash
    FROM stale AS s
    WHERE s.owner_gone OR s.claimed_at < %(older_than)s::timestamptz
)
UPDATE {schema}.ledger AS l
SET state = CASE WHEN e.state = 'running' THEN 'failed'::{schema}.effect_state ELSE e.state END,
    owner = NULL, event_seq = e.event_seq + 1, last_hash = e.hash, updated_at = clock_timestamp()
FROM expired AS e WHERE l.key = e.key
RETURNING l.key, l.attempt, l.run_id, e.claimed_at, 'old rule' AS reason
"""

OLD_UNRESOLVED_KEY = """
SELECT txid, protocol, decision, participants, attempt
FROM {schema}.twophase WHERE key = %(key)s AND outcome IS NULL ORDER BY created_at
"""


def _old_finish_for_key(real):
    """Before the fix: a run that skips the key finished every unresolved transaction of the
    key as it found it (no look at whether its attempt still lives and owns the key)."""

    def finish(coordinator, conns, rows, key, *, schema, by, scan, exclude=None):
        if scan:  # a claim's clean-up: unchanged
            return real(
                coordinator, conns, rows, key, schema=schema, by=by, scan=scan, exclude=exclude
            )
        return [
            recovery.resolve(
                row.txid,
                protocol=row.protocol,
                conns={
                    n: c for n, c in conns.items() if not row.participants or n in row.participants
                },
                coordinator=coordinator,
                schema=schema,
                decision=row.decision,
                key=key,
                attempt=row.attempt,
                force=True,
                by=by,
            )
            for row in rows
        ]

    return finish


def _old_commit_prepared_all(pool, conns, names, txid, attempt):
    """Before the fix: COMMIT PREPARED raised when another run had finished the gid."""
    futures = [
        pool.submit(
            conns[n].execute, prepared.statement("COMMIT PREPARED", prepared.gid_of(txid, n))
        )
        for n in names
    ]
    for future in futures:
        future.result()


def _old_query(name: str, text: str):
    real = queries.query

    def query(which: str, schema: str) -> bytes:
        if which != name:
            return real(which, schema)
        return sql.SQL(text).format(schema=sql.Identifier(schema)).as_bytes(None)

    return query


FLAWS = {
    # reopen, then an attempt fails or crashes: the next one got no eos.previous
    "previous-after-reopen": (
        "single",
        lambda mp: (
            mp.setattr(local, "previous_version", _old_previous),
            mp.setattr(twophase, "previous_version", _old_previous),
        ),
    ),
    # recover --older-than expired (fenced) a live single-database owner
    "recover-older-than-live-owner": (
        "single",
        lambda mp: mp.setattr(store, "query", _old_query("recover_claims", OLD_RECOVER_CLAIMS)),
    ),
    # recover aborted a live multi-database attempt once the grace counted from its claim passed
    "recover-live-prepared": (
        "multi",
        lambda mp: mp.setattr(recovery, "_still_live", _old_still_live),
    ),
    # a run that skips aborted another run's live replace
    "skip-aborts-live-replace": (
        "multi",
        lambda mp: (
            mp.setattr(store, "query", _old_query("twophase_unresolved_key", OLD_UNRESOLVED_KEY)),
            mp.setattr(recovery, "finish_for_key", _old_finish_for_key(recovery.finish_for_key)),
        ),
    ),
    # a decided transaction finished by a skipping run: its owner raised UndefinedObject
    "decided-finished-by-another-run": (
        "multi",
        lambda mp: mp.setattr(twophase, "_commit_prepared_all", _old_commit_prepared_all),
    ),
}


@pytest.mark.slow  # minutes each: up to 300 examples until the flaw shows
@HUNT
@pytest.mark.timeout(7200)
@pytest.mark.parametrize(
    "flaw",
    sorted(FLAWS),
)
def test_the_machine_finds_each_old_flaw(pg_admin_dsn, template_db, flaw, monkeypatch):
    """Each rule of docs/guarantees.md "Operator actions and other runs", put back to what
    it was before its fix, makes the machine fail (no shrinking: finding is what counts)."""
    mode, install = FLAWS[flaw]
    install(monkeypatch)
    with databases(pg_admin_dsn, template_db, mode) as dsns:
        started = time.monotonic()
        with pytest.raises((AssertionError, Flaky)) as found:
            run_machine(
                dsns,
                int(os.environ.get("EOS_STATEFUL_FLAW_EXAMPLES", "300")),
                shrink=False,
                steps=30,
            )
    print(
        f"{flaw}: found in {time.monotonic() - started:.1f} s: "
        f"{str(found.value).splitlines()[0][:300]}"
    )


def test_gc_keeps_the_fencing_history(db: str):
    """Found by the machine: try 2 of run A commits, gc prunes the key's events, an operator
    reopens it and run B's attempt fails (the row now names run B). Try 1 of run A must be
    fenced (docs/guarantees.md, "Fencing scope"): gc kept that try 2 claimed (pruned_claims,
    schema revision 0012), although it removed the `claimed` event."""
    run_a, run_b = Origin("d", "load", "run-A", -1), Origin("d", "load", "run-B", -1)

    def boom(eos):
        raise RuntimeError("the source is missing")

    with Ledger(db) as ledger, psycopg.connect(db, autocommit=True) as conn:
        ledger.run("k", lambda eos: {"try": eos.attempt}, attempt=2, origin=run_a)
        time.sleep(0.01)
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli(["ledger", "gc", "--older-than", "0s", "--dsn", db]) == 0
        conn.execute("SELECT * FROM eos.reopen('k', 'source corrected')")
        with pytest.raises(RuntimeError):
            ledger.run("k", boom, origin=run_b)
        with pytest.raises(FencedError):
            ledger.run("k", lambda eos: {"try": eos.attempt}, attempt=1, origin=run_a)
