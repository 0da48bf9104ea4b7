"""Least privilege for the role tasks connect as (schema revision 0011, docs/security.md).

Finding: the writer had INSERT on ``ledger_events`` and UPDATE on ``ledger``. A writer login
appended a back-dated ``committed`` event with a correct hash (SHA-256 without a secret:
anyone with the code can compute it) and moved the chain head: ``ledger verify`` said ok and
every later attempt skipped the key, so its effect was lost. Now every function that changes
the ledger runs as its owner, the writer only executes them, and this file checks both sides:
what a writer login can no longer do, and that it still runs every kind of effect.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone

import psycopg
import pytest
from psycopg import sql

from eos_airflow import Ledger, Origin, failpoints
from eos_airflow.ledger import chain
from eos_airflow.ledger.migrate import head_revision, migrate
from eos_airflow.ledger.roles import direct_writers, grant
from eos_airflow.ledger.watch import WaitSpec, Watcher
from eos_airflow.multiledger import MultiLedger
from eos_airflow.protocol.resolve import CommitNotDoneError, commit_outcome
from tests.conftest import ROOT, dsn_for
from tests.protocol.test_twophase import ORIGIN, Banks, _banks, transfer
from tests.security.conftest import cli

TI = Origin("roles", "load", "run_1", -1)


def export(dsn: str) -> str:
    return cli("ledger", "export", "--dsn", dsn, "--format", "json").stdout


def test_a_writer_login_cannot_forge_an_event_or_move_a_chain_head(granted):
    owner, writer, _ = granted
    with Ledger(writer) as ledger:
        ledger.run("sales/1", lambda eos: {"rows": 1}, origin=TI)
        with pytest.raises(RuntimeError):
            ledger.run("sales/2", lambda eos: (_ for _ in ()).throw(RuntimeError("x")), origin=TI)
    before = export(owner)
    with psycopg.connect(writer, autocommit=True) as conn:
        seq, head = conn.execute(
            "SELECT event_seq, last_hash FROM eos.ledger WHERE key = 'sales/2'"
        ).fetchone()
        at = datetime(2024, 1, 1, tzinfo=timezone.utc)
        detail = {"version": 1, "run_id": "run_1"}
        detail_text = conn.execute("SELECT %s::jsonb::text", [json.dumps(detail)]).fetchone()[0]
        forged = chain.event_hash(
            head,
            {
                "key": "sales/2",
                "seq": seq + 1,
                "event": "committed",
                "attempt": 1,
                "at": at,
                "detail": detail_text,
            },
        )
        refused = {
            "a back-dated event with a correct hash": (
                "INSERT INTO eos.ledger_events (key, seq, event, attempt, at, detail, "
                "prev_hash, hash) VALUES ('sales/2', %s, 'committed', 1, %s, %s, %s, %s)",
                [seq + 1, at, json.dumps(detail), head, forged],
            ),
            "the chain head moved": (
                "UPDATE eos.ledger SET event_seq = event_seq + 1, "
                "last_hash = %s, state = 'committed' WHERE key = 'sales/2'",
                [forged],
            ),
            "the event appender": (
                "SELECT eos.append_event('sales/2', %s, %s, 'committed', 1, '{}')",
                [seq + 1, head],
            ),
            "a reopen": ("SELECT * FROM eos.reopen('sales/1', 'x')", None),
            "a gc": ("SELECT * FROM eos.gc_prune(ARRAY['sales/1'], now())", None),
            "an outbox row": (
                "INSERT INTO eos.outbox (effect_key, version, seq, message_id, "
                "destination, payload) VALUES ('sales/1', 1, 9, gen_random_uuid(),"
                " 'nats:x', '{}')",
                None,
            ),
            "an offset": ("UPDATE eos.offsets SET position = '0'", None),
            "a waiter": ("INSERT INTO eos.waiters VALUES ('k', false, 'me', now())", None),
            "a fingerprint": (
                "INSERT INTO eos.versions (key, version, fingerprint) VALUES ('sales/1', 1, 'x')",
                None,
            ),
            "an announcement": ("UPDATE eos.versions SET announced = 9", None),
        }
        for what, (statement, params) in refused.items():
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement, params)
            assert what
        # the protocol's functions record what they do, nothing else
        with pytest.raises(psycopg.Error, match="records failed, fenced or skipped"):
            conn.execute("SELECT eos.release('sales/2', gen_random_uuid(), 1, 'committed', '{}')")
        # a fingerprint check records a mismatch only when the fingerprints differ, and
        # a version is announced once: neither rewrites what was committed
        with pytest.raises(psycopg.Error, match="on_mismatch is warn, fail or replace"):
            conn.execute("SELECT * FROM eos.check_fingerprint('sales/1', 1, 'x', 1, 'no')")
        with pytest.raises(psycopg.Error, match="not owned by this attempt"):
            conn.execute(
                "SELECT eos.outbox_publish('sales/1', gen_random_uuid(), 2, 1, "
                "gen_random_uuid(), 'nats:x', NULL, '{}', '{}')"
            )
    assert export(owner) == before
    assert cli("ledger", "verify", "--dsn", owner).returncode == 0
    with Ledger(writer) as ledger:  # the key was not forged committed: the next try runs it
        assert ledger.run("sales/2", lambda eos: {"rows": 2}, origin=TI, attempt=2) == {"rows": 2}


def test_the_writer_waits_for_commits_and_resolves_a_lost_commit(granted):
    """The sensor's waiter rows and the commit-outcome question go through functions too."""
    _, writer, _ = granted
    with Ledger(writer) as ledger:
        ledger.run("done/1", lambda eos: {"ok": True}, origin=TI)

    async def wait() -> str:
        watcher = Watcher(writer)
        verdict = await watcher.wait(WaitSpec(keys=("done/1",)), timeout=20)
        return verdict.status

    assert asyncio.run(wait()) == "committed"
    owner_token = uuid.uuid4()
    with psycopg.connect(writer, autocommit=True) as conn:
        conn.execute(
            "SELECT * FROM eos.claim('lost/1', %s, 1, 'roles', 'load', 'run_1', -1, "
            "'h', 1, 'skip')",
            [owner_token],
        )
    with pytest.raises(CommitNotDoneError):
        commit_outcome(
            lambda: psycopg.connect(writer),
            "eos",
            "lost/1",
            owner_token,
            1,
            5,
            RuntimeError("connection lost"),
        )
    with psycopg.connect(writer) as conn:
        assert conn.execute(
            "SELECT state::text FROM eos.ledger WHERE key = 'lost/1'"
        ).fetchone() == ("failed",)


@pytest.fixture
def writer_banks(pg_admin_dsn: str, template_db: str) -> Iterator[tuple[Banks, dict[str, str]]]:
    """Banks ``a`` and ``b`` (``a`` coordinates) and a writer login granted on both."""
    role = f"eos_w_{uuid.uuid4().hex[:8]}"
    for banks in _banks(pg_admin_dsn, template_db, separate_coordinator=False):
        with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        dsns = {}
        try:
            for name in ("a", "b"):
                with psycopg.connect(banks.dsns[name], autocommit=True) as conn:
                    grant(conn, "eos", role, role + "_audit")
                    conn.execute(
                        sql.SQL(
                            "GRANT SELECT, INSERT, UPDATE ON accounts, transfer_log TO {}"
                        ).format(sql.Identifier(role))
                    )
                dsns[name] = dsn_for(banks.dsns[name], banks.names[name]) + f" user={role}"
            yield banks, dsns
        finally:
            with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                    [role],
                )
            for name in ("a", "b"):
                with psycopg.connect(banks.dsns[name], autocommit=True) as conn:
                    for r in (role, role + "_audit"):
                        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(r)))
            with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
                for r in (role, role + "_audit"):
                    conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(r)))


CRASH = """
import sys
from eos_airflow import Origin
from eos_airflow.multiledger import MultiLedger
from tests.protocol.test_twophase import transfer
with MultiLedger(sys.argv[1], {"a": sys.argv[1], "b": sys.argv[2]}, protocol=sys.argv[3]) as m:
    m.run(sys.argv[4], transfer, origin=Origin("bank", "transfer", "run-1", -1))
"""


@pytest.mark.parametrize("protocol", ["2pc", "3pc"])
def test_the_writer_runs_multi_database_effects_and_their_recovery(writer_banks, protocol):
    banks, dsns = writer_banks
    with MultiLedger(dsns["a"], dsns, protocol=protocol) as ledger:
        first = ledger.run_outcome("transfer/1", transfer, origin=ORIGIN)
        again = ledger.run_outcome("transfer/1", transfer, attempt=2, origin=ORIGIN)
    assert (first.action, again.action) == ("committed", "skipped")
    env = {**os.environ, "EOS_FAILPOINTS": "after_decision=exit", "PYTHONPATH": str(ROOT)}
    died = subprocess.run(
        [sys.executable, "-c", CRASH, dsns["a"], dsns["b"], protocol, "transfer/2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert died.returncode == failpoints.EXIT_CODE, died.stderr
    assert len(banks.prepared()) == 2
    with MultiLedger(dsns["a"], dsns, protocol=protocol) as ledger:
        (done,) = ledger.recover(grace=0)
    assert done.outcome == "committed", done
    a, b = banks.balances()
    assert (a, b) == (80, 120) and banks.prepared() == []


def test_a_migration_moves_the_old_grants_to_the_functions(empty_db: str, pg_admin_dsn: str):
    """A ledger laid out by the previous `db grant` (INSERT on events, UPDATE on the ledger,
    DML on the working tables) loses the direct writes at revision 0011, and the writer keeps
    running effects through the functions."""
    role = f"eos_w_{uuid.uuid4().hex[:8]}"
    migrate(empty_db, revision="0010")
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        w = sql.Identifier(role)
        for statement in (
            "GRANT USAGE ON SCHEMA eos TO {}",
            "GRANT SELECT ON ALL TABLES IN SCHEMA eos TO {}",
            "GRANT USAGE ON ALL SEQUENCES IN SCHEMA eos TO {}",
            "GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA eos TO {}",
            "GRANT INSERT ON eos.ledger_events TO {}",
            "GRANT INSERT, UPDATE ON eos.ledger TO {}",
            "GRANT INSERT, UPDATE, DELETE ON eos.waiters, eos.outbox, eos.inbox, "
            "eos.offsets, eos.recovery_points, eos.twophase, eos.precommits TO {}",
            "CREATE TABLE public.target (key text)",
            "GRANT INSERT ON public.target TO {}",
        ):
            conn.execute(sql.SQL(statement).format(w))
        assert {d["role"] for d in direct_writers(conn, "eos")} == {role}
    try:
        assert migrate(empty_db, revision="0011") == ["0011"]
        with psycopg.connect(empty_db) as conn:
            assert direct_writers(conn, "eos") == []
        applied = migrate(empty_db)  # 0012 and the revisions after it
        assert applied[0] == "0012" and applied[-1] == head_revision()
        with psycopg.connect(empty_db) as conn:
            assert direct_writers(conn, "eos") == []
        as_writer = dsn_for(empty_db, psycopg.conninfo.conninfo_to_dict(empty_db)["dbname"])
        as_writer += f" user={role}"

        def load(eos):
            eos.conn.execute("INSERT INTO public.target VALUES (%s)", [eos.key])
            eos.publish("nats:x.y", {"k": eos.key})
            return 1

        with Ledger(as_writer) as ledger:
            assert ledger.run("moved/1", load, origin=TI) == 1
        with (
            psycopg.connect(as_writer) as conn,
            pytest.raises(psycopg.errors.InsufficientPrivilege),
        ):
            conn.execute(
                "INSERT INTO eos.ledger_events (key, seq, event, attempt, at, detail, "
                "prev_hash, hash) VALUES ('x', 1, 'claimed', 1, now(), '{}', '', '')"
            )
    finally:
        with psycopg.connect(empty_db, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_doctor_probes_the_roles_privileges_and_flags_direct_writes(granted):
    owner, writer, auditor = granted

    def checks(dsn: str) -> dict[str, dict[str, str]]:
        done = cli("doctor", "--dsn", dsn, "--format", "json")
        return {c["check"]: c for c in json.loads(done.stdout)["checks"]}

    as_writer = checks(writer)
    assert as_writer["privileges"]["status"] == "ok"
    assert "ran a claim and a commit (rolled back)" in as_writer["privileges"]["detail"]
    assert as_writer["direct writes"]["status"] == "ok"
    assert checks(auditor)["privileges"]["status"] == "warn"
    role = psycopg.conninfo.conninfo_to_dict(writer)["user"]
    with psycopg.connect(owner, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "REVOKE EXECUTE ON FUNCTION eos.commit(text, uuid, jsonb, jsonb, text) FROM {}"
            ).format(sql.Identifier(role))
        )
        conn.execute(
            sql.SQL("GRANT INSERT ON eos.ledger_events TO {}").format(sql.Identifier(role))
        )
    broken = checks(writer)
    assert broken["privileges"]["status"] == "fail"
    assert "permission denied for function commit" in broken["privileges"]["detail"]
    assert broken["direct writes"]["status"] == "warn"
    assert f"{role} (INSERT on ledger_events)" in broken["direct writes"]["detail"]
    assert cli("doctor", "--dsn", writer).returncode == 1
    with psycopg.connect(owner) as conn:  # the probes left nothing behind
        assert conn.execute(
            "SELECT count(*) FROM eos.ledger WHERE key LIKE 'eos-doctor/%'"
        ).fetchone() == (0,)
