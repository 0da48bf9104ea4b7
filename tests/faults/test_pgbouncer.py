"""Behind PgBouncer (docs/deploy.md): the crash matrix and the take-over tests through a real
PgBouncer in session mode and in transaction mode.

Session mode (``pool_mode = session``, ``EOS_POOL_MODE=session`` declared): a sample of the
crash matrix (tests/faults/test_crash_matrix.py's runner: a kill, a raise or a pause at each
failpoint) for single-database effects, chunked effects and two-phase commit, every database
reached through PgBouncer; then no duplicates, no losses (the matrix's checks), and nothing
leaked: no advisory lock, no prepared transaction, and no prepared statement on any server
session PgBouncer keeps. A waiter takes over when the owner's process is killed.

Transaction mode: an attempt's ownership (a session-level advisory lock) cannot work, so the
claim is refused at once with PoolingError (``EOS10``) — nothing claimed, nothing written,
nothing left behind, no waiting; also when the deployment wrongly declares session pooling,
as soon as the server session changes under the connection. Two-phase commit whose
participants sit behind transaction pooling (the coordinator's ledger reached directly)
works: PREPARE TRANSACTION ends the transaction, COMMIT PREPARED runs from any session; a
coordinator behind transaction pooling is refused like any ledger.

The sample is sized to stay within a few minutes; ``-m slow`` (EOS_SLOW=1) runs a larger one.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from eos_airflow import ConfigurationError, Ledger, Origin, PoolingError
from eos_airflow.multiledger import MultiLedger
from eos_airflow.protocol.local import run_effect
from eos_airflow.protocol.pooling import POOL_MODE_ENV
from tests.conftest import create_database, drop_database
from tests.faults import crash
from tests.faults.pgbouncer import PgBouncer, require_pgbouncer
from tests.faults.test_crash_matrix import ACTIONS, SCENARIOS, SEED, drive, finish_prepared

MODES = ("session", "transaction")
#: The default sample: each step × each action this many times (a few seconds per round).
SAMPLE_ROUNDS = {"local": 2, "chunked": 1, "2pc": 1}
#: Crash-matrix runs per protocol in the slow tier (EOS_PGBOUNCER_RUNS overrides).
SLOW_RUNS = int(os.environ.get("EOS_PGBOUNCER_RUNS", "0")) or 60


@pytest.fixture(scope="module")
def bouncers(pg_admin_dsn: str) -> Iterator[dict[str, PgBouncer]]:
    require_pgbouncer()
    started: dict[str, PgBouncer] = {}
    try:
        for mode in MODES:
            started[mode] = PgBouncer(pg_admin_dsn, mode).start()
        yield started
    finally:
        for bouncer in started.values():
            bouncer.destroy()


class Databases(dict):
    """Migrated databases by role (direct DSNs), each created on first use."""

    def __init__(self, admin: str, template: str) -> None:
        super().__init__()
        self.admin, self.template, self.token = admin, template, uuid.uuid4().hex[:8]

    def __missing__(self, role: str) -> str:
        dsn = self[role] = create_database(
            self.admin, f"eos_pgb_{role}_{self.token}", template=self.template
        )
        return dsn


@pytest.fixture
def databases(pg_admin_dsn: str, template_db: str) -> Iterator[Databases]:
    made = Databases(pg_admin_dsn, template_db)
    try:
        yield made
    finally:
        names = [dbname(dsn) for dsn in made.values()]
        finish_prepared(pg_admin_dsn, names)
        for name in names:
            drop_database(pg_admin_dsn, name)


def need_prepared_transactions(databases: Databases) -> None:
    """2PC tests skip without prepared transactions, unless EOS_REQUIRE_2PC=1 (CI)."""
    with psycopg.connect(databases["a"]) as conn:
        if int(conn.execute("SHOW max_prepared_transactions").fetchone()[0]) > 0:
            return
    message = "max_prepared_transactions = 0 on the test server"
    if os.environ.get("EOS_REQUIRE_2PC") == "1":
        pytest.fail(message + "; EOS_REQUIRE_2PC=1 makes this a failure")
    pytest.skip(message)


# -- what must be left behind: nothing ------------------------------------------------------


def dbname(dsn: str) -> str:
    return str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])


def leftovers(admin: str, bouncer: PgBouncer, direct: dict[str, str]) -> dict[str, list]:
    """Advisory locks and prepared transactions in the databases (seen directly), and
    prepared statements on every server session PgBouncer keeps for them (each one occupied
    by a client of its own, in a transaction, so that PgBouncer hands each out once)."""
    names = [dbname(dsn) for dsn in direct.values()]
    with psycopg.connect(admin) as conn:
        locks = conn.execute(
            "SELECT d.datname, l.objid, l.pid FROM pg_locks l JOIN pg_database d "
            "ON d.oid = l.database WHERE l.locktype = 'advisory' AND d.datname = ANY(%s)",
            [names],
        ).fetchall()
        prepared = conn.execute(
            "SELECT gid FROM pg_prepared_xacts WHERE database = ANY(%s)", [names]
        ).fetchall()
    statements: list = []
    servers = [s for s in bouncer.show("SERVERS") if s["database"] in names]
    for name in {s["database"] for s in servers}:
        pids = {s["remote_pid"] for s in servers if s["database"] == name}
        clients, seen = [], set()
        try:
            for _ in pids:
                client = psycopg.connect(bouncer.dsn(name))  # not autocommit: holds a server
                clients.append(client)
                pid, names_found = client.execute(
                    "SELECT pg_backend_pid(), array(SELECT name FROM pg_prepared_statements)"
                ).fetchone()
                seen.add(pid)
                statements += [(name, pid, n) for n in names_found]
        finally:
            for client in clients:
                client.close()
        assert pids <= seen, f"{name}: server sessions {pids - seen} were not inspected"
    return {
        "advisory locks": locks,
        "prepared transactions": prepared,
        "prepared statements": statements,
    }


def assert_nothing_left(admin: str, bouncer: PgBouncer, direct: dict[str, str]) -> None:
    left = leftovers(admin, bouncer, direct)
    assert not any(left.values()), f"left behind through PgBouncer ({bouncer.mode}): {left}"


# -- the crash matrix through PgBouncer -----------------------------------------------------


def full_combos(name: str, runs: int | None = None) -> list[tuple[str, str]]:
    """Every step × every action of the protocol (or ``runs`` of them, cycling), shuffled."""
    combos = [(step, action) for step in SCENARIOS[name].steps for action in ACTIONS]
    plan = [combos[i % len(combos)] for i in range(runs or len(combos))]
    random.Random(f"{SEED}/{name}/pgbouncer").shuffle(plan)
    return plan


def through_bouncer(
    name: str, bouncer: PgBouncer, direct: dict[str, str], participants_only: bool = False
) -> crash.Scenario:
    """The crash matrix's scenario ``name`` over ``direct``'s databases, reached through
    ``bouncer`` (2PC with ``participants_only``: the coordinator's ledger directly)."""
    if name in ("2pc", "3pc"):
        dsns = {role: bouncer.through(direct[role]) for role in ("a", "b", "c")}
        if participants_only:
            dsns["c"] = direct["c"]
    else:
        dsns = {"db": bouncer.through(direct["db"])}
    scenario = SCENARIOS[name](dsns, random.Random(f"{SEED}/{name}/{bouncer.mode}"), False)
    scenario.setup()
    return scenario


def report(scenario: crash.Scenario, where: str, tally: dict) -> None:
    print(
        f"\ncrash matrix {scenario.name} through PgBouncer {where} (EOS_FAULT_SEED={SEED}): "
        f"{tally['runs']} runs, {tally['fired']} faults fired, {tally['keys']} keys, "
        f"{tally['duplicates']} duplicates, {tally['lost']} lost, "
        f"{tally['left']} left behind; {tally['seconds']:.1f} s"
    )


def run_matrix(
    scenario: crash.Scenario,
    plan: list[tuple[str, str]],
    admin: str,
    bouncer: PgBouncer,
    direct: dict[str, str],
    where: str,
) -> dict:
    tally = drive(scenario, plan)  # asserts every key committed once, as its callers were told
    keys = [k for k in scenario.keys]
    with psycopg.connect(scenario.ledger_dsn) as conn:
        committed = dict(
            conn.execute(
                "SELECT key, count(*) FROM eos.ledger_events WHERE key = ANY(%s) AND event IN "
                "('committed', 'replaced') GROUP BY key",
                [keys],
            ).fetchall()
        )
    tally["duplicates"] = sum(1 for k in keys if committed.get(k, 0) > 1)
    tally["lost"] = sum(1 for k in keys if committed.get(k, 0) == 0)
    left = leftovers(admin, bouncer, direct)
    tally["left"] = sum(len(v) for v in left.values())
    report(scenario, where, tally)
    assert tally["duplicates"] == tally["lost"] == 0
    assert not any(left.values()), f"left behind: {left}"
    return tally


@pytest.mark.parametrize("name", ["local", "chunked", "2pc"])
def test_crash_sample_through_session_pooling(name, bouncers, databases, pg_admin_dsn, monkeypatch):
    if name == "2pc":
        need_prepared_transactions(databases)
    monkeypatch.setenv(POOL_MODE_ENV, "session")
    bouncer = bouncers["session"]
    scenario = through_bouncer(name, bouncer, databases)
    plan = full_combos(name, SAMPLE_ROUNDS[name] * 3 * len(SCENARIOS[name].steps))
    tally = run_matrix(scenario, plan, pg_admin_dsn, bouncer, databases, "session mode")
    assert {step for step, _ in tally["by_step"]} == set(scenario.steps)
    assert tally["fired"] == len(plan), f"some faults did not fire: {tally['by_step']}"


def test_two_phase_participants_behind_transaction_pooling(bouncers, databases, pg_admin_dsn):
    """The coordinator's ledger reached directly, the participants through transaction
    pooling: PREPARE TRANSACTION ends each participant's transaction (PgBouncer may hand its
    server session to another client), COMMIT PREPARED and recovery run from any session."""
    need_prepared_transactions(databases)
    bouncer = bouncers["transaction"]
    scenario = through_bouncer("2pc", bouncer, databases, participants_only=True)
    plan = full_combos("2pc", 2 * len(SCENARIOS["2pc"].steps))  # each step twice
    tally = run_matrix(
        scenario, plan, pg_admin_dsn, bouncer, databases, "transaction mode (participants)"
    )
    assert tally["fired"] == len(plan), f"some faults did not fire: {tally['by_step']}"


def test_two_phase_participants_reused_behind_transaction_pooling(
    bouncers, databases, pg_admin_dsn
):
    """One MultiLedger runs many effects on the same participant connections while other
    clients keep the pool busy (so PgBouncer moves each participant between server
    sessions): every effect commits, and no prepared statement is left on any server
    session (psycopg prepares a statement it ran five times: through transaction pooling
    that statement would stay on a server session other clients get, and be missing from the
    next one — PgBouncer 1.18 does not track them)."""
    need_prepared_transactions(databases)
    bouncer = bouncers["transaction"]
    for role in ("a", "b"):
        with psycopg.connect(databases[role], autocommit=True) as conn:
            conn.execute("CREATE TABLE t (key text)")
    stop = threading.Event()

    def churn() -> None:
        others = [
            psycopg.connect(bouncer.through(databases[r]), autocommit=True)
            for r in ("a", "b", "a", "b")
        ]
        try:
            while not stop.is_set():
                for other in others:
                    other.execute("SELECT pg_sleep(0.001)", prepare=False)
        finally:
            for other in others:
                other.close()

    def fn(eos):
        for name in ("a", "b"):
            eos.conns[name].execute("INSERT INTO t VALUES (%s)", [eos.key])
        return {"key": eos.key}

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        with MultiLedger(databases["c"], {r: bouncer.through(databases[r]) for r in "ab"}) as banks:
            outcomes = [banks.run_outcome(f"k{i}", fn).action for i in range(30)]
    finally:
        stop.set()
        thread.join(30)
    assert outcomes == ["committed"] * 30
    for role in ("a", "b"):
        with psycopg.connect(databases[role]) as conn:
            assert conn.execute("SELECT count(*), count(DISTINCT key) FROM t").fetchone() == (
                30,
                30,
            )
    assert_nothing_left(pg_admin_dsn, bouncer, {r: databases[r] for r in "abc"})


@pytest.mark.slow
@pytest.mark.parametrize("name", ["local", "chunked", "2pc"])
def test_crash_matrix_through_session_pooling(name, bouncers, databases, pg_admin_dsn, monkeypatch):
    if name == "2pc":
        need_prepared_transactions(databases)
    monkeypatch.setenv(POOL_MODE_ENV, "session")
    bouncer = bouncers["session"]
    scenario = through_bouncer(name, bouncer, databases)
    plan = full_combos(name, SLOW_RUNS)
    tally = run_matrix(scenario, plan, pg_admin_dsn, bouncer, databases, "session mode")
    assert tally["fired"] >= 0.9 * len(plan), f"too few faults fired: {tally['by_step']}"


# -- transaction mode: refused at the claim -------------------------------------------------


@pytest.mark.parametrize("declared", [False, True], ids=["undeclared", "declared-session"])
def test_transaction_pooling_is_refused_at_the_claim(
    declared, bouncers, databases, pg_admin_dsn, monkeypatch
):
    """Through transaction pooling the claim is refused with PoolingError (EOS10), at once
    and before anything is claimed: no ledger row, no event, no write, no lock. Declaring
    session pooling wrongly does not help once the server session changes under the
    connection (here: another client takes the server session the ledger's last transaction
    used — PgBouncer hands out the most recently freed one)."""
    bouncer = bouncers["transaction"]
    dsn = bouncer.through(databases["db"])
    with psycopg.connect(databases["db"], autocommit=True) as conn:
        conn.execute("CREATE TABLE rows_t (key text)")

    def write(eos):
        eos.conn.execute("INSERT INTO rows_t VALUES (%s)", [eos.key])
        return {"key": eos.key}

    if declared:
        monkeypatch.setenv(POOL_MODE_ENV, "session")
    else:
        monkeypatch.delenv(POOL_MODE_ENV, raising=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        if declared:  # the first claim pins the server session; then another client
            assert run_effect(conn, "first", write).action == "committed"  # takes it
            with psycopg.connect(dsn) as other:
                other.execute("SELECT 1")  # in a transaction: holds the freed server session
                started = time.monotonic()
                with pytest.raises(PoolingError) as refused:
                    run_effect(conn, "k", write)
        else:
            started = time.monotonic()
            with pytest.raises(PoolingError) as refused:
                run_effect(conn, "k", write)
        took = time.monotonic() - started
    message = str(refused.value)
    assert message.startswith("EOS10: ")
    assert "pool_mode = session" in message and "directly" in message
    assert "Nothing was claimed" in message
    assert (
        "changed between transactions" if declared else "goes through a connection pooler"
    ) in message
    assert isinstance(refused.value, ConfigurationError) and not refused.value.retryable
    assert took < 2, f"the refusal took {took:.1f} s"
    with psycopg.connect(databases["db"]) as conn:
        assert conn.execute("SELECT count(*) FROM eos.ledger WHERE key = 'k'").fetchone() == (0,)
        assert conn.execute(
            "SELECT count(*) FROM eos.ledger_events WHERE key = 'k'"
        ).fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM rows_t WHERE key = 'k'").fetchone() == (0,)
    assert_nothing_left(pg_admin_dsn, bouncer, {"db": databases["db"]})


def test_a_coordinator_behind_transaction_pooling_is_refused(
    bouncers, databases, pg_admin_dsn, monkeypatch
):
    """A multi-database effect whose coordinator's ledger sits behind transaction pooling is
    refused at its claim, before any participant begins: nothing prepared, nothing written."""
    need_prepared_transactions(databases)
    monkeypatch.delenv(POOL_MODE_ENV, raising=False)
    bouncer = bouncers["transaction"]
    for role in ("a", "b"):
        with psycopg.connect(databases[role], autocommit=True) as conn:
            conn.execute("CREATE TABLE t (key text)")

    def fn(eos):
        for name in ("a", "b"):
            eos.conns[name].execute("INSERT INTO t VALUES (%s)", [eos.key])
        return {}

    with MultiLedger(bouncer.through(databases["c"]), {r: databases[r] for r in "ab"}) as banks:
        with pytest.raises(PoolingError, match="^EOS10: .*pool_mode = session"):
            banks.run("k", fn)
    for role in ("a", "b"):
        with psycopg.connect(databases[role]) as conn:
            assert conn.execute("SELECT count(*) FROM t").fetchone() == (0,)
    with psycopg.connect(databases["c"]) as conn:
        assert conn.execute("SELECT count(*) FROM eos.ledger").fetchone() == (0,)
    assert_nothing_left(pg_admin_dsn, bouncer, {r: databases[r] for r in "abc"})


# -- take-over through session pooling ------------------------------------------------------

OWNER = textwrap.dedent("""
    import sys, time
    from eos_airflow import Ledger, Origin
    ledger = Ledger(sys.argv[1])
    def fn(eos):
        eos.conn.execute("INSERT INTO writes VALUES (%s, %s, 'owner')", [eos.key, eos.attempt])
        print("in-run", flush=True)
        time.sleep(float(sys.argv[2]))
        return {"by": "owner"}
    print(ledger.run("k", fn, origin=Origin("d", "t", "owner", -1)), flush=True)
""")


def owner(dsn: str, hold: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", OWNER, dsn, str(hold)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, POOL_MODE_ENV: "session"},
    )


def waiter_write(eos):
    eos.conn.execute(
        "INSERT INTO writes VALUES (%s, %s, %s)", [eos.key, eos.attempt, eos.origin.run_id]
    )
    return {"by": eos.origin.run_id}


def test_waiter_takes_over_when_the_owner_is_killed_through_session_pooling(
    bouncers, databases, pg_admin_dsn, monkeypatch
):
    """The owner's process dies (SIGKILL) mid-effect: PgBouncer closes the server session
    that was in the owner's transaction, its advisory lock goes with it, and the waiter —
    blocked on that lock through PgBouncer — takes over within seconds and writes once."""
    monkeypatch.setenv(POOL_MODE_ENV, "session")
    bouncer = bouncers["session"]
    dsn = bouncer.through(databases["db"])
    with psycopg.connect(databases["db"], autocommit=True) as conn:
        conn.execute("CREATE TABLE writes (key text, attempt int, run_id text)")
    child = owner(dsn, hold=60)
    assert child.stdout.readline().strip() == "in-run", child.stderr.read()
    result: dict = {}

    def waiter() -> None:
        try:
            with Ledger(dsn) as ledger:
                result["out"] = ledger.run_outcome(
                    "k", waiter_write, origin=Origin("d", "t", "waiter", -1), wait_timeout=30
                )
        except Exception as exc:  # reported below
            result["error"] = exc

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.5)  # the waiter now waits on the owner's session lock
    assert thread.is_alive(), result
    started = time.monotonic()
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    thread.join(30)
    took = time.monotonic() - started
    assert "error" not in result, result
    assert result["out"].action == "committed"
    assert took < 5, f"the take-over took {took:.1f} s"
    with psycopg.connect(databases["db"]) as conn:
        assert conn.execute("SELECT run_id FROM writes").fetchall() == [("waiter",)]
        reason = conn.execute(
            "SELECT detail->'took_over'->>'reason' FROM eos.ledger_events "
            "WHERE event = 'claimed' AND seq = 2"
        ).fetchone()
        assert reason == ("previous owner's session ended",)
    print(f"\ntake-over through PgBouncer session mode: {took:.2f} s after the kill")
    assert_nothing_left(pg_admin_dsn, bouncer, {"db": databases["db"]})


def test_a_live_owner_is_not_taken_over_through_session_pooling(
    bouncers, databases, pg_admin_dsn, monkeypatch
):
    """Through PgBouncer the owner's lock still says "alive": another run waits, then gives
    up with KeyInProgressError; the owner commits."""
    from eos_airflow import KeyInProgressError

    monkeypatch.setenv(POOL_MODE_ENV, "session")
    bouncer = bouncers["session"]
    dsn = bouncer.through(databases["db"])
    with psycopg.connect(databases["db"], autocommit=True) as conn:
        conn.execute("CREATE TABLE writes (key text, attempt int, run_id text)")
    child = owner(dsn, hold=2)
    assert child.stdout.readline().strip() == "in-run", child.stderr.read()
    with Ledger(dsn) as ledger, pytest.raises(KeyInProgressError, match="run 'owner'"):
        ledger.run("k", waiter_write, origin=Origin("d", "t", "other", -1), wait_timeout=0.5)
    assert child.wait(10) == 0, child.stderr.read()
    with psycopg.connect(databases["db"]) as conn:
        assert conn.execute("SELECT run_id FROM writes").fetchall() == [("owner",)]
    assert_nothing_left(pg_admin_dsn, bouncer, {"db": databases["db"]})


@pytest.mark.parametrize(
    "where", ["direct", "session-undeclared", "session-declared", "transaction-undeclared"]
)
def test_doctor_reports_the_pooler(where, bouncers, databases):
    """`eos-airflow doctor` says whether a pooler answers and whether claims will pass."""
    import json

    from tests.conftest import BIN

    mode = where.split("-")[0]
    dsn = databases["db"] if mode == "direct" else bouncers[mode].through(databases["db"])
    env = {k: v for k, v in os.environ.items() if k != POOL_MODE_ENV}
    if where.endswith("-declared"):
        env[POOL_MODE_ENV] = "session"
    done = subprocess.run(
        [str(BIN / "eos-airflow"), "doctor", "--dsn", dsn, "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    (check,) = [c for c in json.loads(done.stdout)["checks"] if c["check"] == "connection pooler"]
    if mode == "direct":
        assert check["status"] == "ok" and check["detail"].startswith("none")
    elif where.endswith("-declared"):
        assert check["status"] == "ok" and f"{POOL_MODE_ENV}=session" in check["detail"]
    else:
        assert check["status"] == "fail" and "EOS10" in check["detail"]
        assert "pool_mode = session" in check["detail"]
        assert done.returncode != 0
