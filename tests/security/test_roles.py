"""Least privilege after ``eos-airflow db grant --writer W --auditor A``, beyond what
tests/cli/test_gc_grant_cli.py covers (the writer's plain effects and its refused edits of
history; the auditor's verify and refused writes):

- the writer runs every single-database protocol: chunked effects with recovery points,
  offsets, outbox messages and the relay marking them delivered, reopened keys;
- the auditor, logged in as itself, runs the read-only CLI (list, show, verify, export, stats,
  doctor) and cannot change anything through the CLI or the protocol (claim, reopen, gc,
  relay marks).
"""

from __future__ import annotations

import json

import psycopg
import pytest

from eos_airflow import EosError, Ledger, Origin
from tests.security.conftest import cli

TI = Origin("roles", "load", "run_1", -1)


def test_the_writer_runs_every_single_database_protocol(granted):
    owner, writer, _ = granted
    with psycopg.connect(writer) as conn:
        assert conn.execute("SELECT current_user").fetchone()[0].startswith("eos_w_")

    def chunked(eos):
        chunks = eos.checkpoints(range(10), every=3)
        for chunk in chunks:
            eos.conn.cursor().executemany(
                "INSERT INTO target VALUES (%s, %s)", [(eos.key, n) for n in chunk]
            )
        start = eos.offsets.get("table:source", 0)
        eos.offsets["table:source"] = start + 10
        eos.publish("nats:orders.new", {"rows": chunks.rows})
        return {"rows": chunks.rows, "from": start}

    with Ledger(writer) as ledger:
        assert ledger.run("load/1", chunked, origin=TI) == {"rows": 10, "from": 0}
        assert ledger.run("load/2", chunked, origin=TI) == {"rows": 10, "from": 10}
        assert ledger.run("load/1", chunked, origin=TI, attempt=2) == {"rows": 10, "from": 0}
        assert (
            ledger.run("load/1", chunked, origin=TI, attempt=3, on_committed="replace")["from"]
            == 20
        )
    with psycopg.connect(writer, autocommit=True) as conn:
        from eos_airflow.protocol.outbox import mark_delivered, pending

        with conn.transaction():
            messages = pending(conn, "eos", [], ["nats"], 10)
            assert mark_delivered(conn, "eos", [m.id for m in messages], "relay") == 3
    assert cli("ledger", "verify", "--dsn", owner).returncode == 0


def test_the_auditor_reads_and_exports_but_changes_nothing(granted):
    owner, writer, auditor = granted
    with Ledger(writer) as ledger:
        ledger.run("a", lambda eos: {"v": 1}, origin=TI)
        ledger.run("b", lambda eos: eos.publish("nats:x.y", {"v": 2}), origin=TI)
    for argv in (
        ("ledger", "list"),
        ("ledger", "show", "a"),
        ("ledger", "verify"),
        ("ledger", "export"),
        ("ledger", "stats"),
        ("doctor",),
    ):
        done = cli(*argv, "--dsn", auditor, "--format", "json")
        assert done.returncode == 0, (argv, done.stderr)
    exported = cli("ledger", "export", "--dsn", auditor, "--format", "json")
    assert [json.loads(line)["event"] for line in exported.stdout.splitlines()] == [
        "claimed",
        "committed",
        "claimed",
        "committed",
    ]

    before = cli("ledger", "export", "--dsn", owner, "--format", "json").stdout
    refused = cli("ledger", "reopen", "a", "--reason", "audit", "--dsn", auditor)
    assert refused.returncode == 3, refused.stderr
    assert refused.stderr.startswith("eos-airflow: error: permission denied: "), refused.stderr
    assert "run it as the ledger's owner" in refused.stderr
    gc = cli("ledger", "gc", "--older-than", "0s", "--dsn", auditor)
    assert gc.returncode == 2 and "this database role may not run gc" in gc.stderr
    with Ledger(auditor) as ledger, pytest.raises((EosError, psycopg.Error)):
        ledger.run("c", lambda eos: 1, origin=TI)
    with psycopg.connect(auditor, autocommit=True) as conn:
        for statement in (
            "UPDATE eos.outbox SET delivered_at = now()",
            "INSERT INTO eos.offsets (source, position) VALUES ('s', '1')",
            "DELETE FROM eos.recovery_points",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
    assert cli("ledger", "export", "--dsn", owner, "--format", "json").stdout == before
