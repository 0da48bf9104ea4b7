"""Upgrading a live ledger to the head revision while an effect runs.

The previous release (this checkout's package as it was before the head revision was added,
taken from the git history) creates its ledgers at the revision before head and fills them:
committed, failed and chunked keys with recovery points, committed source offsets, undelivered
outbox messages, a two-phase transaction left in doubt by a crash, and an attempt that is
still running in another process. This package then migrates every ledger to head while that
attempt runs, and each effect continues: the running attempt commits once, the failed key
retries, the chunked key resumes after its recovery point, the offsets continue, the outbox
delivers each message once, `eos-airflow recover` finishes the in-doubt transaction, and the
hash chains verify. The revisions involved are computed (head and the one before), so the test
keeps working as revisions are added.
"""

from __future__ import annotations

import io
import json
import os
import select
import subprocess
import sys
import tarfile
import textwrap
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from eos_airflow import KeyInProgressError, Ledger, Origin, failpoints
from eos_airflow.cli.doctor import diagnose
from eos_airflow.ledger.chain import verify
from eos_airflow.ledger.migrate import (
    check_revision,
    checksum_state,
    current_revision,
    down_revision,
    head_revision,
    migrate,
    script_paths,
)
from eos_airflow.relay import Relay
from tests.conftest import (
    ROOT,
    create_database,
    drop_database,
    events,
    prepared_transactions_or_skip,
)

ORIGIN = Origin("upgrade", "load", "run-1", -1)
TRANSFER = "transfer/2024-01-01"

#: Run by the previous release's package (its directory first on sys.path, argv[1]).
OLD = textwrap.dedent("""
    import json, sys
    import eos_airflow
    from eos_airflow import Ledger, MultiLedger, Origin

    assert eos_airflow.__file__.startswith(sys.argv[1]), eos_airflow.__file__
    mode, dsn = sys.argv[2], sys.argv[3]
    ORIGIN = Origin("upgrade", "load", "run-1", -1)

    def row(eos, tag):
        eos.conn.execute("INSERT INTO out VALUES (%s, %s, %s)", [eos.key, tag, eos.attempt])

    def fail(eos):
        row(eos, "failed try")
        raise RuntimeError("attempt 1 fails")

    def load(eos):
        chunks = eos.checkpoints(lambda after: range(after, 50), every=10)
        for chunk in chunks:
            if eos.attempt == 1 and chunk[0] == 30:
                raise RuntimeError("attempt 1 stops after three chunks")
            eos.conn.cursor().executemany(
                "INSERT INTO dst VALUES (%s, %s)", [(i, eos.attempt) for i in chunk])
        return chunks.rows

    def consume(eos):
        start = eos.offsets.get("kafka:orders/0", -1) + 1
        eos.conn.cursor().executemany(
            "INSERT INTO out VALUES (%s, %s, %s)",
            [(eos.key, str(n), eos.attempt) for n in range(start, start + 3)])
        eos.offsets["kafka:orders/0"] = start + 2
        return {"from": start}

    def publish(eos):
        return [eos.publish("nats:alerts", {"n": 1}), eos.publish("kafka:alerts", {"n": 2})]

    def hold(eos):
        row(eos, "held")
        ids = [eos.publish("nats:alerts", {"n": 3})]
        print("holding", flush=True)
        assert sys.stdin.readline().strip() == "go"
        return {"held": True, "published": ids}

    def transfer(eos):
        eos.conns["a"].execute("UPDATE accounts SET balance = balance - 10 WHERE id = 1")
        eos.conns["b"].execute("UPDATE accounts SET balance = balance + 10 WHERE id = 1")
        return {"amount": 10, "by_try": eos.attempt}

    if mode == "setup":
        with Ledger(dsn) as ledger:
            done = {"committed/1": ledger.run("committed/1", lambda eos: row(eos, "done") or 1)}
            for key, fn in (("failed/1", fail), ("chunked/1", load)):
                try:
                    ledger.run(key, fn, attempt=1, origin=ORIGIN)
                except RuntimeError:
                    done[key] = "failed"
            done["offsets/1"] = ledger.run("offsets/1", consume)
            done["outbox/1"] = ledger.run("outbox/1", publish)
    elif mode == "hold":
        with Ledger(dsn) as ledger:
            done = ledger.run("running/1", hold, attempt=1, origin=ORIGIN)
    elif mode == "transfer":  # dies at the failpoint set in EOS_FAILPOINTS
        with MultiLedger(dsn, {"a": dsn, "b": sys.argv[4]}) as banks:
            done = banks.run(sys.argv[5], transfer, attempt=1,
                             origin=Origin("bank", "transfer", "run-1", -1))
    print(json.dumps(done), flush=True)
""")


@dataclass
class Previous:
    """The previous release's package, unpacked from git, and how to run it."""

    path: Path
    commit: str

    def run(
        self, *argv: str, env: dict[str, str] | None = None, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *argv],
            cwd=self.path,  # not the checkout: its eos_airflow would come first
            env={**os.environ, **(env or {}), "PYTHONPATH": str(self.path)},
            capture_output=True,
            text=True,
            timeout=120,
            **kwargs,
        )

    def worker(self, *argv: str, env: dict[str, str] | None = None) -> Any:
        done = self.run("-c", OLD, str(self.path), *argv, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout.splitlines()[-1])

    def migrate(self, dsn: str) -> None:
        done = self.run("-m", "eos_airflow.cli.main", "db", "migrate", "--dsn", dsn)
        assert done.returncode == 0, done.stdout + done.stderr


def git(*argv: str) -> str:
    return subprocess.run(
        ["git", *argv], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()


@pytest.fixture(scope="module")
def previous(tmp_path_factory: pytest.TempPathFactory) -> Previous:
    """The package as it was before the head revision was added: the parent of the commit
    that added head's migration file (or the last commit, while that file is not committed)."""
    if not (ROOT / ".git").exists():
        pytest.skip("the upgrade test takes the previous release from the git history")
    wrapper = script_paths()[head_revision()].relative_to(ROOT).as_posix()
    added = git("log", "--diff-filter=A", "--format=%H", "--", wrapper).splitlines()
    commit = f"{added[-1]}^" if added else "HEAD"
    commit = git("rev-parse", "--verify", commit)
    archive = subprocess.run(
        ["git", "archive", "--format=tar", commit, "eos_airflow"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    path = tmp_path_factory.mktemp("previous-release")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(path, filter="data")
    release = Previous(path, commit)
    done = release.run(
        "-c", "from eos_airflow.ledger.migrate import head_revision; print(head_revision())"
    )
    assert done.stdout.strip() == down_revision(head_revision()), (commit, done.stderr)
    return release


@dataclass
class RecordingSink:
    """A broker that keeps what it was sent (the relay's Sink protocol)."""

    scheme: str
    received: list[tuple[str, str, Any]] = field(default_factory=list)

    def send(self, messages: Sequence[Any]) -> int:
        self.received += [(m.message_id, str(m.destination), m.payload) for m in messages]
        return 0

    def close(self) -> None:
        pass


@pytest.fixture
def ledgers(pg_admin_dsn: str) -> Iterator[dict[str, str]]:
    """Empty databases: ``ledger`` (single-database effects), ``a`` and ``b`` (banks; ``a``'s
    ledger coordinates the transfer)."""
    token = uuid.uuid4().hex[:8]
    names = {n: f"eos_up_{n}_{token}" for n in ("ledger", "a", "b")}
    dsns = {n: create_database(pg_admin_dsn, name) for n, name in names.items()}
    try:
        prepared_transactions_or_skip(dsns["a"])
        yield dsns
    finally:
        with psycopg.connect(pg_admin_dsn) as conn:
            leftovers = conn.execute(
                "SELECT gid, database FROM pg_prepared_xacts WHERE database = ANY(%s)",
                [list(names.values())],
            ).fetchall()
        for gid, database in leftovers:
            with psycopg.connect(dsns[_key(names, database)], autocommit=True) as conn:
                conn.execute(
                    psycopg.sql.SQL("ROLLBACK PREPARED {}").format(psycopg.sql.Literal(gid))
                )
        for name in names.values():
            drop_database(pg_admin_dsn, name)


def _key(names: dict[str, str], database: str) -> str:
    return next(k for k, v in names.items() if v == database)


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eos_airflow.cli.main", *argv],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def wait_holding(proc: subprocess.Popen[str], timeout: float) -> None:
    """Wait until the holder's attempt runs (it printed "holding"), or fail with its stderr."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().strip() if ready else ""
    if line != "holding":
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the previous release's attempt did not start ({line!r}): {err}")


def balances(dsns: dict[str, str]) -> tuple[int, int]:
    found = []
    for name in ("a", "b"):
        with psycopg.connect(dsns[name]) as conn:
            found.append(conn.execute("SELECT balance FROM accounts").fetchone()[0])
    return found[0], found[1]


def test_a_live_ledger_upgrades_to_head_while_an_effect_runs(
    previous: Previous, ledgers: dict[str, str]
):
    head, before = head_revision(), down_revision(head_revision())
    dsn, a, b = ledgers["ledger"], ledgers["a"], ledgers["b"]

    # --- the previous release: ledgers at the revision before head, with live data -------
    for target in ledgers.values():
        previous.migrate(target)
        with psycopg.connect(target) as conn:
            assert current_revision(conn, "eos") == before
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE out (key text, tag text, attempt int)")
        conn.execute("CREATE TABLE dst (i int, attempt int)")
    for bank in (a, b):
        with psycopg.connect(bank, autocommit=True) as conn:
            conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL)")
            conn.execute("INSERT INTO accounts VALUES (1, 100)")
    setup = previous.worker("setup", dsn)
    assert len(previous_ids(dsn, "outbox/1")) == 2
    assert setup == {
        "committed/1": 1,
        "failed/1": "failed",
        "chunked/1": "failed",
        "offsets/1": {"from": 0},
        "outbox/1": previous_ids(dsn, "outbox/1"),
    }
    # A crash after the commit decision: prepared on both banks, decided in a's ledger.
    done = previous.run(
        "-c",
        OLD,
        str(previous.path),
        "transfer",
        a,
        b,
        TRANSFER,
        env={"EOS_FAILPOINTS": "after_decision@1=exit"},
    )
    assert done.returncode == failpoints.EXIT_CODE, done.stdout + done.stderr
    with psycopg.connect(a) as conn:
        assert len(conn.execute("SELECT gid FROM pg_prepared_xacts").fetchall()) == 2
    assert balances(ledgers) == (100, 100)  # in doubt

    # An attempt of the previous release runs (claimed, wrote, published; not committed).
    holder = subprocess.Popen(
        [sys.executable, "-c", OLD, str(previous.path), "hold", dsn],
        cwd=previous.path,
        env={**os.environ, "PYTHONPATH": str(previous.path)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_holding(holder, 60)

        # --- this package migrates every ledger to head while that attempt runs ----------
        for target in (dsn, a, b):
            # A migration that waited for the running attempt would fail here, not hang.
            connect = lambda t=target: psycopg.connect(t, options="-c lock_timeout=30s")  # noqa: E731
            assert migrate(connect) == [head]
            with psycopg.connect(target) as conn:
                assert check_revision(conn, "eos") == head
        assert holder.poll() is None, "the running attempt ended during the migration"

        # The attempt is still live: neither a new claim nor recovery takes its key.
        with Ledger(dsn) as ledger, pytest.raises(KeyInProgressError):
            ledger.run("running/1", lambda eos: 0, attempt=1, origin=ORIGIN, wait_timeout=0.5)
        done = cli("recover", "--dsn", dsn, "--grace", "0s", "--format", "json")
        assert done.returncode == 0, done.stderr
        assert "running/1" not in done.stdout

        # The previous release's attempt commits on the upgraded ledger, once.
        out, err = holder.communicate("go\n", timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert holder.returncode == 0, err
    held = json.loads(out.splitlines()[-1])
    assert held["held"] is True

    with Ledger(dsn) as ledger, psycopg.connect(dsn, autocommit=True) as conn:
        # running: committed once by the old attempt; this package skips it
        again = ledger.run_outcome("running/1", lambda eos: 0, attempt=2, origin=ORIGIN)
        assert (again.action, again.result) == ("skipped", held)
        assert [e for e, _ in events(conn, "running/1")] == ["claimed", "committed", "skipped"]
        # committed: skipped with the stored result
        assert ledger.run_outcome("committed/1", lambda eos: 2).result == 1
        # failed: the retry runs and commits
        retry = ledger.run_outcome("failed/1", lambda eos: eos.attempt, attempt=2, origin=ORIGIN)
        assert (retry.action, retry.result) == ("committed", 2)
        assert events(conn, "failed/1") == [
            ("claimed", 1),
            ("failed", 1),
            ("claimed", 2),
            ("committed", 2),
        ]

        # chunked: resumes after its newest recovery point (three chunks of attempt 1)
        def load(eos):
            chunks = eos.checkpoints(lambda after: range(after, 50), every=10)
            for chunk in chunks:
                eos.conn.cursor().executemany(
                    "INSERT INTO dst VALUES (%s, %s)", [(i, eos.attempt) for i in chunk]
                )
            return chunks.rows

        assert ledger.run("chunked/1", load, attempt=2, origin=ORIGIN) == 50
        assert conn.execute(
            "SELECT attempt, count(*), count(DISTINCT i), min(i), max(i) FROM dst "
            "GROUP BY 1 ORDER BY 1"
        ).fetchall() == [(1, 30, 30, 0, 29), (2, 20, 20, 30, 49)]
        assert conn.execute(
            "SELECT attempt, detail FROM eos.ledger_events WHERE event = 'resumed'"
        ).fetchall() == [
            (2, {"after_seq": 3, "rows": 30, "position": None, "checkpointed_by_attempt": 1})
        ]

        # offsets: continue from the position the previous release committed
        def consume(eos):
            start = eos.offsets.get("kafka:orders/0", -1) + 1
            eos.offsets["kafka:orders/0"] = start + 2
            return {"from": start}

        assert ledger.run("offsets/2", consume) == {"from": 3}
        assert conn.execute("SELECT source, position, key FROM eos.offsets").fetchall() == [
            ("kafka:orders/0", 5, "offsets/2")
        ]

        # outbox: the three messages (two committed before, one by the running attempt)
        # are delivered once each
        sinks = {"nats": RecordingSink("nats"), "kafka": RecordingSink("kafka")}
        assert Relay(conn, sinks).drain().total == 3
        assert Relay(conn, sinks).drain().total == 0
        received = sinks["nats"].received + sinks["kafka"].received
        assert sorted(m[0] for m in received) == sorted(
            previous_ids(dsn, "outbox/1") + held["published"]
        )
        assert sorted(m[2]["n"] for m in received) == [1, 2, 3]

        # the user's rows: each committed effect's writes once, nothing of rolled-back tries
        assert conn.execute(
            "SELECT key, tag, attempt FROM out WHERE key NOT LIKE 'offsets/%' ORDER BY key"
        ).fetchall() == [("committed/1", "done", 1), ("running/1", "held", 1)]
        assert verify(conn).ok

    # in doubt: `eos-airflow recover` (this package) commits the decided transfer
    done = cli(
        "recover",
        "--dsn",
        a,
        "--grace",
        "0s",
        "--format",
        "json",
        "--participant",
        f"a={a}",
        "--participant",
        f"b={b}",
    )
    assert done.returncode == 0, done.stderr
    assert [t["outcome"] for t in json.loads(done.stdout)["transactions"]] == ["committed"]
    assert balances(ledgers) == (90, 110)
    with psycopg.connect(a) as conn:
        assert conn.execute("SELECT count(*) FROM pg_prepared_xacts").fetchone() == (0,)
        assert [e for e, _ in events(conn, TRANSFER)][-1] == "recovered"
        assert verify(conn).ok
        # The migrations the previous release recorded and the one this package recorded
        # both check out (a release before checksums covered the SQL recorded the file's).
        check = next(c for c in diagnose(conn, "eos") if c["check"] == "migration checksums")
        recorded = dict(conn.execute("SELECT revision, checksum FROM eos.schema_migrations"))
    assert check["status"] == "ok", check
    covers_sql = (
        "def checksum_state" in (previous.path / "eos_airflow/ledger/migrate.py").read_text()
    )
    assert {r: checksum_state(r, c) for r, c in recorded.items()} == {
        **{r: "match" if covers_sql else "wrapper" for r in recorded if r != head},
        head: "match",
    }


def previous_ids(dsn: str, key: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [
            str(m)
            for (m,) in conn.execute(
                "SELECT message_id FROM eos.outbox WHERE effect_key = %s ORDER BY seq", [key]
            )
        ]
