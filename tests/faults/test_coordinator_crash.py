"""A coordinator server that crashes after the participants PREPAREd (docs/twophase.md).

The coordinator's ledger is a server of the test's own; the banks live on the suite's server.
To make the window deterministic, the coordinator's WAL writer is stopped (SIGSTOP) before the
attempt runs: an asynchronous commit then stays in memory until something else flushes the
WAL. The attempt dies right after PREPARE, and the whole coordinator server is killed with
SIGKILL (a power cut, as far as its disk can tell), then started again (crash recovery).

Finding: the claim and the transaction-id log committed asynchronously, so the crash lost
them while the prepared transactions survived on the banks; the next try's claim was a fresh
insert that never looked for them, and blocked on their row locks. The claim of a
multi-database effect is now durable before anything is prepared (schema revision 0010).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from eos_airflow import failpoints
from eos_airflow.ledger.migrate import migrate
from tests.conftest import ROOT, create_database, drop_database, prepared_transactions_or_skip
from tests.faults.server import LocalServer
from tests.protocol.test_twophase import SETUP, finish_leftovers

RUN = """
import sys
from eos_airflow import Origin
from eos_airflow.multiledger import MultiLedger
from tests.protocol.test_twophase import transfer
with MultiLedger(sys.argv[1], {"a": sys.argv[2], "b": sys.argv[3]}) as banks:
    print(banks.run_outcome("transfer/2024-01-01", transfer, attempt=int(sys.argv[4]),
                            origin=Origin("bank", "transfer", "run-1", -1)).action)
"""


@pytest.fixture
def coordinator() -> Iterator[LocalServer]:
    # autovacuum off and the longest WAL writer delay: nothing but the attempt writes WAL
    server = LocalServer({"autovacuum": "off", "wal_writer_delay": "'10s'"}).init().start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def bank_dsns(pg_admin_dsn: str, template_db: str) -> Iterator[dict[str, str]]:
    names = {n: f"eos_crash_{n}_{uuid.uuid4().hex[:8]}" for n in ("a", "b")}
    dsns = {n: create_database(pg_admin_dsn, db, template=template_db) for n, db in names.items()}
    prepared_transactions_or_skip(dsns["a"])
    for dsn in dsns.values():
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SETUP)
    yield dsns
    finish_leftovers(pg_admin_dsn, names.values())
    for db in names.values():
        drop_database(pg_admin_dsn, db)


def _server_pids(server: LocalServer) -> list[int]:
    postmaster = int((server.pgdata / "postmaster.pid").read_text().split()[0])
    children = subprocess.run(
        ["pgrep", "-P", str(postmaster)], capture_output=True, text=True
    ).stdout.split()
    return [postmaster, *map(int, children)]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "gone"


def _attempt(
    coordinator_dsn: str, banks: dict[str, str], attempt: int, failpoint: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if failpoint:
        env["EOS_FAILPOINTS"] = failpoint
    return subprocess.run(
        [sys.executable, "-c", RUN, coordinator_dsn, banks["a"], banks["b"], str(attempt)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_a_coordinator_crash_after_prepare_loses_no_claim_and_blocks_no_retry(
    coordinator: LocalServer, bank_dsns: dict[str, str]
):
    dsn = coordinator.create_database("ledger")
    migrate(dsn)
    with psycopg.connect(dsn) as conn:
        (walwriter,) = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'walwriter'"
        ).fetchone()
    os.kill(walwriter, signal.SIGSTOP)

    died = _attempt(dsn, bank_dsns, 1, "after_prepare=exit")
    assert died.returncode == failpoints.EXIT_CODE, died.stderr
    pids = _server_pids(coordinator)
    for pid in pids:  # the whole server dies at once
        os.kill(pid, signal.SIGKILL)
    for pid in pids:
        while Path(f"/proc/{pid}").exists() and "Z" not in _state(pid):
            time.sleep(0.05)
    # after a power cut no process has the old postmaster's pid: a zombie the container's
    # init has not reaped yet would still answer for it, so the stale lock files go
    (coordinator.pgdata / "postmaster.pid").unlink()
    for lock in coordinator.root.glob(".s.PGSQL.*.lock"):
        lock.unlink()
    try:
        coordinator.start()  # crash recovery replays what reached the disk
    except subprocess.CalledProcessError:
        pytest.fail("the coordinator did not start again:\n" + coordinator.logfile.read_text())

    with psycopg.connect(dsn) as conn:
        logged = conn.execute("SELECT attempt, decision FROM eos.twophase").fetchall()
        state = conn.execute("SELECT state::text, attempt FROM eos.ledger").fetchall()
    assert logged == [(1, None)], "the transaction-id log survived the crash"
    assert state == [("running", 1)], "the claim survived the crash"

    try:
        retry = _attempt(dsn, bank_dsns, 2)
    except subprocess.TimeoutExpired:
        pytest.fail("the next try blocked on the orphaned prepared transactions")
    assert retry.returncode == 0 and retry.stdout.strip() == "committed", retry.stderr
    balances = []
    for name in ("a", "b"):
        with psycopg.connect(bank_dsns[name]) as conn:
            balances.append(conn.execute("SELECT balance FROM accounts").fetchone()[0])
            assert conn.execute(
                "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()"
            ).fetchone() == (0,)
    assert balances == [90, 110]
