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
import random
import uuid
from collections import Counter
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
    announced: int = 0  # the version reported to Airflow (asset events)

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
        params = {"detail": None, "fingerprint": None, **params}  # the protocol's own
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
            self._call(
                attempt,
                "commit",
                key=self.key,
                owner=attempt.owner,
                result='{"ok":1}',
                fingerprint=f"fp-{me[0]}",  # each run's inputs differ
            )
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

    @rule(me=st.sampled_from(ATTEMPTS))
    def compare_inputs(self, me):
        """A skip's fingerprint check, at any moment: it matches unless the key is committed
        from another run's inputs; a mismatch is recorded, nothing else changes."""
        attempt = self.attempts[me]
        if attempt.conn.closed or attempt.phase == "writing":
            return
        row = self._call(
            attempt,
            "check_fingerprint",
            key=self.key,
            version=1,
            fingerprint=f"fp-{me[0]}",
            attempt=me[1],
            on_mismatch="warn",
        )
        model = self.model
        other = model.state == "committed" and model.committed_by[0] != me[0]
        assert row["matches"] is not other, (me, row, model)

    @rule(me=st.sampled_from(ATTEMPTS))
    def announce(self, me):
        """Any attempt may report version 1 (a retry that skipped, a late zombie, another
        run): it is announced once, and only once committed."""
        attempt = self.attempts[me]
        if attempt.conn.closed or attempt.phase == "writing":
            return
        row = self._call(attempt, "announce", key=self.key, version=1, attempt=me[1])
        model = self.model
        expected = "committed" if model.state == "committed" and model.announced < 1 else None
        assert row["announce"] == expected, (me, row, model)
        if expected is not None:
            model.announced = 1

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


# -- Delta: the write outside the transaction, made idempotent by its marker -----------------


class DeltaMachine(LedgerMachine):
    """The same attempts, each writing a Delta table between its claim and its commit, in
    the protocol's two steps (protocol/delta.py): *read* (own the key? the table's marker for
    it) and *write* (the Delta commit with the marker, unless found). Hypothesis interleaves
    them with every other attempt's claim, write, commit, failure and crash. Checked after
    every step: the table holds at most one attempt's write of the key, never a write of an
    attempt that did not own the key at its read, and a committed key's write is there."""

    uri: str = ""
    options: dict[str, str] = {}
    #: How often each outcome of a Delta step happened, over the whole run.
    seen: Counter[str] = Counter()

    def __init__(self) -> None:
        super().__init__()
        self.table = f"{self.uri}/{uuid.uuid4().hex[:12]}"
        self.prepared: dict[tuple[str, int], object] = {}
        self.first: dict[tuple[str, int], bool] = {}
        self.delta_by: tuple[str, int] | None = None  # whose write the table holds

    def _effect(self, me):
        from eos_airflow.protocol.effect import Effect

        attempt = self.attempts[me]
        session = type("Session", (), {"owner": attempt.owner})()
        first = self.first.get(me, False)
        return Effect(self.key, me[1], attempt.conn, session=session, first_of_version=first)

    def _in(self, *phases: str) -> list[tuple[str, int]]:
        return [me for me, a in self.attempts.items() if a.phase in phases]

    def _ready(self) -> list[tuple[str, int]]:
        """Attempts whose Delta step is done (written or found): they may commit."""
        return [
            me
            for me in self._in("writing")
            if (getattr(self.prepared.get(me), "result", None) or {}).get("conflict") is False
        ]

    # Each step draws among the attempts that can take it: a random attempt would mostly be
    # in the wrong phase, and the interleavings that matter would be rare.
    @precondition(lambda self: self._in("new", "waiting"))
    @rule(data=st.data())
    def claim_one(self, data):
        me = data.draw(st.sampled_from(self._in("new", "waiting")))
        prior = self.model.state
        LedgerMachine.claim(self, me)
        if self.attempts[me].phase == "claimed":
            # as the protocol tells the effect: nothing of this version can exist yet
            self.first[me] = prior is None

    @precondition(lambda self: self._in("claimed"))
    @rule(data=st.data())
    def write_one(self, data):
        LedgerMachine.write(self, data.draw(st.sampled_from(self._in("claimed"))))

    @precondition(lambda self: [me for me in self._in("writing") if me not in self.prepared])
    @rule(data=st.data())
    def delta_read(self, data):
        from eos_airflow.errors import FencedError

        me = data.draw(st.sampled_from([m for m in self._in("writing") if m not in self.prepared]))
        attempt = self.attempts[me]
        target = self._effect(me).delta(self.table, storage_options=self.options)
        try:
            self.prepared[me] = target.prepare()
            self.seen["read"] += 1
            assert self.model.owner == me, f"{me} read as owner, the model says {self.model}"
        except FencedError:
            self.seen["fenced at read"] += 1
            assert self.model.owner != me, (me, self.model)
            attempt.conn.execute("ROLLBACK")
            self._call(
                attempt,
                "release",
                key=self.key,
                owner=attempt.owner,
                attempt=me[1],
                event="fenced",
                detail='{"step": "delta"}',
            )
            self.model.release(me)
            attempt.phase = "done"

    def _unwritten(self) -> list[tuple[str, int]]:
        return [
            me
            for me in self._in("writing")
            if me in self.prepared and getattr(self.prepared[me], "result", None) is None
        ]

    @precondition(lambda self: self._unwritten())
    @rule(data=st.data())
    def delta_write(self, data):
        import pyarrow as pa

        from eos_airflow.errors import LakehouseConflictError

        me = data.draw(st.sampled_from(self._unwritten()))
        prepared = self.prepared[me]
        rows = pa.table({"key": [self.key], "origin": [me[0]], "try": [me[1]]})
        try:
            result = prepared.commit(rows)
        except LakehouseConflictError:
            # another attempt's write with this key's marker landed since this one read
            assert self.delta_by is not None and self.delta_by != me, (me, self.delta_by)
            prepared.result = {"written": False, "conflict": True}
            self.seen["conflict"] += 1
            return
        prepared.result = {**result, "conflict": False}
        if result["written"]:
            assert self.delta_by is None, f"{me} wrote after {self.delta_by}"
            self.delta_by = me
            self.seen["written"] += 1
        else:
            assert self.delta_by is not None
            self.seen["found"] += 1

    @precondition(lambda self: self._ready())
    @rule(data=st.data())
    def commit_one(self, data):
        me = data.draw(st.sampled_from(self._ready()))
        committed = self.model.owner == me
        LedgerMachine.commit(self, me)
        self.seen["committed" if committed else "fenced at commit"] += 1

    @precondition(lambda self: self._in("claimed", "writing"))
    @rule(data=st.data())
    def fail_one(self, data):
        LedgerMachine.fail(self, data.draw(st.sampled_from(self._in("claimed", "writing"))))

    @precondition(lambda self: self._in("claimed", "writing"))
    @rule(data=st.data())
    def crash_one(self, data):
        LedgerMachine.crash(self, data.draw(st.sampled_from(self._in("claimed", "writing"))))

    @rule()
    def idle(self):
        """Every attempt finished: nothing moves (the invariants are checked again)."""

    # the base machine's steps for a random attempt are replaced by the ones above
    claim = write = commit = fail = crash = None  # type: ignore[assignment]

    @invariant()
    def delta_table_holds_one_write(self):
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        try:
            data = DeltaTable(self.table, storage_options=self.options or None).to_pyarrow_table()
        except TableNotFoundError:
            data = None
        found = []
        if data is not None:
            found = list(zip(data["origin"].to_pylist(), data["try"].to_pylist(), strict=True))
        assert len(found) <= 1, f"two writes of one key: {found}"
        if self.delta_by is not None:
            assert found == [self.delta_by]
        if self.model.committed_by is not None:
            assert len(found) == 1, "the key committed without its Delta write"


class _Choice:
    """Stands in for Hypothesis's ``data`` when the seeded driver below runs the rules."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def draw(self, strategy):
        self.drawn = self.rng.choice(list(strategy.elements))
        return self.drawn


#: The Delta machine's steps and when each can run (their preconditions).
DELTA_STEPS = {
    "claim_one": lambda m: m._in("new", "waiting"),
    "write_one": lambda m: m._in("claimed"),
    "delta_read": lambda m: [me for me in m._in("writing") if me not in m.prepared],
    "delta_write": lambda m: m._unwritten(),
    "commit_one": lambda m: m._ready(),
    "fail_one": lambda m: m._in("claimed", "writing"),
    "crash_one": lambda m: m._in("claimed", "writing"),
}


@pytest.mark.parametrize("storage", ["file", pytest.param("s3", marks=pytest.mark.slow)])
def test_delta_writes_in_random_step_orders_land_once(machine_db, tmp_path, storage, request):
    """The Delta machine's steps in seeded random orders (EOS_STATEFUL_EXAMPLES runs of up to
    40 steps; failures and crashes drawn less often than progress, so that most runs reach
    the interleavings of reads, writes and commits that matter). The seed is printed;
    EOS_FAULT_SEED=<seed> replays a run."""
    if storage == "s3":
        s3 = request.getfixturevalue("s3_server")
        DeltaMachine.uri = s3.bucket(f"eos-model-{uuid.uuid4().hex[:10]}")
        DeltaMachine.options = s3.delta_options()
    else:
        DeltaMachine.uri, DeltaMachine.options = tmp_path.as_uri(), {}
    DeltaMachine.dsn = machine_db
    DeltaMachine.seen = Counter()
    seed = int(os.environ.get("EOS_FAULT_SEED", "0")) or random.SystemRandom().randrange(2**31)
    runs = int(os.environ.get("EOS_STATEFUL_EXAMPLES", "40"))
    weights = {"fail_one": 0.15, "crash_one": 0.15}
    for number in range(runs):
        rng = random.Random(f"{seed}/{number}")
        machine = DeltaMachine()
        trail: list[str] = []
        try:
            for _ in range(40):
                enabled = [name for name, can in DELTA_STEPS.items() if can(machine)]
                if not enabled:
                    break
                name = rng.choices(enabled, [weights.get(n, 1.0) for n in enabled])[0]
                choice = _Choice(rng)
                getattr(machine, name)(choice)
                trail.append(f"{name}{choice.drawn}")
                machine.delta_table_holds_one_write()
                machine.ledger_agrees_with_the_model()
        except AssertionError as exc:
            raise AssertionError(f"EOS_FAULT_SEED={seed} run {number}: {trail}: {exc}") from exc
        finally:
            machine.teardown()
    seen = DeltaMachine.seen
    print(f"\nDelta model ({storage}, EOS_FAULT_SEED={seed}, {runs} runs): {dict(seen)}")
    # the runs met the protocol's cases: writes, reads finding another attempt's write,
    # commits, and attempts fenced after their read
    assert seen["written"] and seen["found"] and seen["committed"], seen
