"""A worker whose network vanishes loses its claim within the liveness bound.

The owner runs in its own network namespace (tests/faults/netns.py) and claims a key through
``Ledger(dsn, liveness_timeout=6)``; then the router between it and the server starts
dropping every packet — no FIN, no RST, no ACK, no ICMP: the owner is simply silent, as a
worker behind a partition or on a host that lost power. A claimant of
another run waits for the key. The server must end the silent owner's session (rolling back
its write and freeing its locks) within ``liveness_bound`` of the outage, and the waiter take
the key over. (The owner's own keepalives may make its process give up meanwhile; nothing it
sends reaches the server any more.)

Three ways an owner can be holding the key when its network goes, each ended by another of
the settings: idle in its transaction (keepalive probes), in a silent statement
(``client_connection_check_interval`` notices the dead socket), and in a statement that keeps
sending (keepalives never run while data is in flight: ``tcp_user_timeout``). With the
liveness settings off the same owner keeps the key past the bound (the control case: the
black hole is real, not a reset).

Needs root and ``ip netns``; skipped otherwise, unless EOS_REQUIRE_NETNS=1 (CI sets it).
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from eos_airflow import KeyInProgressError, Ledger, Origin
from eos_airflow.ledger.connection import Liveness
from tests.faults import netns
from tests.faults.server import LocalServer

ROOT = Path(__file__).resolve().parents[2]
#: The liveness timeout under test: short, so that a case takes seconds.
LIVENESS = 6.0
BOUND = Liveness(LIVENESS).bound
#: Allowance over the bound for a loaded machine: the waiter's own round trips, the server
#: noticing the socket error, process scheduling on shared cores.
SLACK = 4.0
KEY = "liveness/partition"


@pytest.fixture(scope="module")
def vanishing() -> Iterator[netns.VanishingNetwork]:
    why = netns.available()
    if why is not None:
        if os.environ.get("EOS_REQUIRE_NETNS") == "1":
            pytest.fail(f"EOS_REQUIRE_NETNS=1 but a network namespace cannot be made: {why}")
        pytest.skip(f"needs a network namespace: {why} (set EOS_REQUIRE_NETNS=1 to require)")
    with netns.VanishingNetwork() as net:
        yield net


@pytest.fixture
def network(vanishing: netns.VanishingNetwork) -> Iterator[netns.VanishingNetwork]:
    """The namespace's network, up at the start of each test."""
    yield vanishing
    vanishing.restore()


@pytest.fixture(scope="module")
def server(vanishing: netns.VanishingNetwork) -> Iterator[LocalServer]:
    """A server of the test's own, listening also on the host end of the veth pair."""
    own = LocalServer({"listen_addresses": f"'127.0.0.1,{vanishing.host_address}'"}).init()
    with open(own.pgdata / "pg_hba.conf", "a") as hba:
        hba.write(f"host all all {vanishing.network} trust\n")
    try:
        yield own.start()
    finally:
        own.destroy()


@pytest.fixture
def dbname(server: LocalServer, request: pytest.FixtureRequest) -> str:
    name = "".join(c if c.isalnum() else "_" for c in request.node.name[-40:].lower())
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
    dsn = server.create_database(name)
    with Ledger(dsn) as ledger:
        ledger.migrate()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (who text)")
    return name


def start_owner(
    network: netns.VanishingNetwork, server: LocalServer, dbname: str, mode: str, liveness: float
) -> tuple[subprocess.Popen[str], int]:
    """The owner, in the namespace: returns once it holds the key (and its backend pid)."""
    dsn = (
        f"postgresql://postgres@{network.host_address}:"
        f"{server.port}/{dbname}?connect_timeout=5&sslmode=disable"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EOS_LIVENESS_TIMEOUT", None)
    proc = network.run(
        [sys.executable, "-m", "tests.faults.vanishing_client", dsn, KEY, mode, str(liveness)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("claimed "):
        proc.kill()
        pytest.fail(f"the owner did not claim the key: {line!r} {proc.stderr.read()[-2000:]}")
    if mode != "idle":
        time.sleep(0.5)  # let its statement start
    return proc, int(line.split()[1])


def backend_alive(dsn: str, pid: int) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return (
            conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()[
                0
            ]
            == 1
        )


def take_over(dsn: str, wait_timeout: float) -> tuple[float | None, object]:
    """A claimant of another run: (monotonic time its function started, its outcome)."""
    started: list[float] = []

    def write(eos):
        started.append(time.monotonic())
        eos.conn.execute("INSERT INTO t (who) VALUES ('waiter')")
        return "waiter"

    with Ledger(dsn, liveness_timeout=LIVENESS) as ledger:
        try:
            outcome = ledger.run_outcome(
                KEY,
                write,
                origin=Origin("liveness", "load", "run_b", -1),
                wait_timeout=wait_timeout,
            )
        except KeyInProgressError as exc:
            return None, exc
    return started[0], outcome


@pytest.mark.parametrize("mode", ["idle", "statement", "sending"])
def test_a_silent_owner_loses_its_claim_and_a_waiter_takes_over_within_the_bound(
    network, server, dbname, mode
):
    dsn = server.dsn(dbname)
    owner, pid = start_owner(network, server, dbname, mode, LIVENESS)
    try:
        network.vanish()
        vanished = time.monotonic()
        started, outcome = take_over(dsn, wait_timeout=BOUND + SLACK)
        assert started is not None, (
            f"the waiter gave up after {BOUND + SLACK:.0f} s: the silent owner still holds the "
            f"key ({outcome}); its backend is alive: {backend_alive(dsn, pid)}"
        )
        took = started - vanished
        assert took <= BOUND + SLACK, f"took over after {took:.1f} s (bound {BOUND:.1f} s)"
        assert outcome.action == "committed" and outcome.version == 1
        assert not backend_alive(dsn, pid)
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SELECT who FROM t").fetchall() == [("waiter",)]
            rows = conn.execute(
                "SELECT event::text, detail ? 'took_over' FROM eos.ledger_events "
                "WHERE key = %s ORDER BY id",
                [KEY],
            ).fetchall()
            assert rows == [("claimed", False), ("claimed", True), ("committed", False)]
            state = conn.execute(
                "SELECT state::text, run_id FROM eos.ledger WHERE key = %s", [KEY]
            ).fetchone()
            assert state == ("committed", "run_b")
        print(f"{mode}: took over {took:.1f} s after the network vanished (bound {BOUND:.1f} s)")
    finally:
        owner.kill()
        owner.wait()


def test_without_liveness_the_silent_owner_keeps_the_key_past_the_bound(network, server, dbname):
    dsn = server.dsn(dbname)
    owner, pid = start_owner(network, server, dbname, "idle", 0)
    try:
        network.vanish()
        started, outcome = take_over(dsn, wait_timeout=BOUND + SLACK)
        assert started is None and isinstance(outcome, KeyInProgressError)
        assert backend_alive(dsn, pid)  # the server still waits for the silent client
        with psycopg.connect(dsn, autocommit=True) as conn:
            state = conn.execute(
                "SELECT state::text, run_id FROM eos.ledger WHERE key = %s", [KEY]
            ).fetchone()
            assert state == ("running", "run_a")
    finally:
        owner.kill()
        owner.wait()
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", [pid])
