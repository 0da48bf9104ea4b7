"""Many attempts of one key, driven step by step in random orders against a reference model.

Each attempt has its own PostgreSQL session and drives the ledger's own steps (claim; begin and
write; commit() then COMMIT; release after a failure; its session killed). Hypothesis picks
the order; a small Python model of the state machine (docs/guarantees.md) predicts every
answer, and after every step the ledger row, the target table and the invariants are checked:
at most one attempt's writes visible, no commit by an attempt after a higher try of its task
instance claimed the key, and a committed key never runs user code again.

EOS_STATEFUL_EXAMPLES sets the number of runs (default 25; the slow tier runs 1,000).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from eos_airflow.ledger.chain import verify
from eos_airflow.ledger.queries import query

KEY = "stateful/k"
#: attempts: tries 1-3 of one task instance, and tries 1-2 of another run (another origin)
ATTEMPTS = [("ti", 1), ("ti", 2), ("ti", 3), ("other", 1), ("other", 2)]
ORIGINS = {"ti": ("d", "load", "manual__1", -1), "other": ("d", "load", "backfill__1", -1)}


@dataclass
class Attempt:
    origin: str
    try_number: int
    conn: psycopg.Connection
    owner: uuid.UUID = field(default_factory=uuid.uuid4)
    phase: str = "new"  # new, waiting, claimed, writing, done


@dataclass
class Model:
    """What the ledger should say: the reference for every step."""

    state: str | None = None  # None (no row), running, committed, failed
    owner: tuple[str, int] | None = None
    row_try: int = 0
    max_claimed: dict[str, int] = field(default_factory=dict)
    alive: set[tuple[str, int]] = field(default_factory=set)
    committed_by: tuple[str, int] | None = None

    def claim(self, me: tuple[str, int]) -> str:
        """The claim's answer, in the order docs/guarantees.md lists the rules ("The
        protocol", step 1, and "Fencing scope")."""
        origin, try_number = me
        if self.state is None:  # no row: the attempt owns K
            self._take(me)
            return "run"
        if self.state == "committed":  # committed: skipped (on_committed="skip")
            return "skip"
        # a try is fenced by the highest try of its task instance that ever claimed K, also
        # after that try released K or another run took it over
        if self.max_claimed.get(origin, 0) > try_number:
            return "fenced"
        if self.owner is not None:
            # an older try of the same task instance is taken over; another run's owner
            # only once its session has ended, else wait
            older_try = self.owner[0] == origin and self.owner[1] < try_number
            if not older_try and self.owner in self.alive:
                return "wait"
        self._take(me)  # no owner (the last attempt failed), or taken over
        return "run"

    def _take(self, me: tuple[str, int]) -> None:
        origin, try_number = me
        self.state, self.owner = "running", me
        self.row_try = try_number  # the ledger's `attempt`: the try that claimed last
        self.max_claimed[origin] = max(self.max_claimed.get(origin, 0), try_number)
        self.alive.add(me)

    def commit(self, me: tuple[str, int]) -> bool:
        if self.owner != me:
            return False
        self.state, self.owner, self.committed_by = "committed", None, me
        self.alive.discard(me)
        return True

    def release(self, me: tuple[str, int]) -> None:
        if self.owner == me:
            self.owner = None
            if self.state == "running":
                self.state = "failed"
        self.alive.discard(me)

    def crash(self, me: tuple[str, int]) -> None:
        self.alive.discard(me)


class LedgerMachine(RuleBasedStateMachine):
    dsn: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.admin = psycopg.connect(self.dsn, autocommit=True)
        self.admin.execute("TRUNCATE target")
        self.key = f"{KEY}/{uuid.uuid4().hex}"  # a fresh key per run: history is append-only
        self.model = Model()
        self.attempts = {
            me: Attempt(me[0], me[1], psycopg.connect(self.dsn, autocommit=True)) for me in ATTEMPTS
        }

    def teardown(self) -> None:
        for attempt in self.attempts.values():
            attempt.conn.close()
        self.admin.close()

    def _call(self, who: Attempt, name: str, **params):
        cur = who.conn.cursor(row_factory=psycopg.rows.dict_row)
        return cur.execute(query(name, "eos"), params).fetchone()

    @rule(me=st.sampled_from(ATTEMPTS))
    def claim(self, me):
        attempt = self.attempts[me]
        if attempt.phase not in ("new", "waiting"):
            return
        dag, task, run, index = ORIGINS[me[0]]
        row = self._call(
            attempt,
            "claim",
            key=self.key,
            owner=attempt.owner,
            attempt=me[1],
            dag_id=dag,
            task_id=task,
            run_id=run,
            map_index=index,
            host="h",
            pid=1,
            on_committed="skip",
        )
        expected = self.model.claim(me)
        assert row["action"] == expected, (me, row, self.model)
        attempt.phase = {"run": "claimed", "wait": "waiting"}.get(expected, "done")

    @precondition(lambda self: any(a.phase == "claimed" for a in self.attempts.values()))
    @rule(me=st.sampled_from(ATTEMPTS))
    def write(self, me):
        attempt = self.attempts[me]
        if attempt.phase != "claimed":
            return
        attempt.conn.execute("BEGIN")
        attempt.conn.execute("INSERT INTO target VALUES (%s, %s, %s)", [self.key, me[0], me[1]])
        attempt.phase = "writing"

    @rule(me=st.sampled_from(ATTEMPTS))
    def commit(self, me):
        attempt = self.attempts[me]
        if attempt.phase != "writing":
            return
        expected = self.model.commit(me)
        try:
            self._call(attempt, "commit", key=self.key, owner=attempt.owner, result='{"ok":1}')
            attempt.conn.execute("COMMIT")
            assert expected, f"{me} committed, the model says it is fenced"
            # fencing: no higher try of its task instance had claimed the key
            assert me[1] >= self.model.max_claimed[me[0]], (me, self.model)
        except psycopg.Error as exc:  # SQLSTATE EOS01: a newer attempt owns the key
            assert exc.sqlstate == "EOS01" and not expected, (me, exc)
            attempt.conn.execute("ROLLBACK")
            self._call(
                attempt,
                "release",
                key=self.key,
                owner=attempt.owner,
                attempt=me[1],
                event="fenced",
                detail='{"step": "commit"}',
            )
            self.model.release(me)
        attempt.phase = "done"

    @rule(me=st.sampled_from(ATTEMPTS))
    def fail(self, me):
        attempt = self.attempts[me]
        if attempt.phase not in ("claimed", "writing"):
            return
        if attempt.phase == "writing":
            attempt.conn.execute("ROLLBACK")
        self._call(
            attempt,
            "release",
            key=self.key,
            owner=attempt.owner,
            attempt=me[1],
            event="failed",
            detail='{"error": "boom"}',
        )
        self.model.release(me)
        attempt.phase = "done"

    @rule(me=st.sampled_from(ATTEMPTS))
    def crash(self, me):
        attempt = self.attempts[me]
        if attempt.phase == "done" or attempt.conn.closed:
            return
        pid = attempt.conn.info.backend_pid
        self.admin.execute("SELECT pg_terminate_backend(%s, 5000)", [pid])
        attempt.conn.close()
        self.model.crash(me)
        attempt.phase = "done"

    @invariant()
    def ledger_agrees_with_the_model(self):
        row = self.admin.execute(
            "SELECT state::text, attempt, owner IS NOT NULL FROM eos.ledger WHERE key = %s",
            [self.key],
        ).fetchone()
        model = self.model
        if model.state is None:
            assert row is None
            return
        assert row == (model.state, model.row_try, model.owner is not None), (row, model)
        visible = self.admin.execute(
            "SELECT origin, try FROM target WHERE key = %s", [self.key]
        ).fetchall()
        assert len(visible) <= 1, "two attempts' writes are visible"
        if model.committed_by is not None:
            assert visible == [model.committed_by]
        else:
            assert visible == []


@pytest.fixture
def machine_db(db: str) -> str:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("CREATE TABLE target (key text, origin text, try int)")
    return db


def _run(db: str, examples: int) -> None:
    LedgerMachine.dsn = db
    test = LedgerMachine.TestCase
    test.settings = settings(
        max_examples=examples,
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    test().runTest()
    with psycopg.connect(db) as conn:
        assert verify(conn).ok


def test_random_step_orders_match_the_reference_model(machine_db):
    _run(machine_db, int(os.environ.get("EOS_STATEFUL_EXAMPLES", "25")))


@pytest.mark.slow
def test_random_step_orders_match_the_reference_model_1000(machine_db):
    _run(machine_db, int(os.environ.get("EOS_STATEFUL_EXAMPLES", "1000")))
