"""``eos-airflow`` as a user runs it: a subprocess, its exit code, stdout and stderr."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from eos_airflow import Ledger, Origin
from tests.conftest import ROOT, create_database, drop_database
from tests.ledger.test_migrations import HEAD, REVISIONS

UNREACHABLE = "postgresql://postgres@127.0.0.1:1/x"
LIST_COLUMNS = [
    "key",
    "state",
    "attempt",
    "version",
    "dag_id",
    "task_id",
    "run_id",
    "map_index",
    "claimed_at",
    "committed_at",
]


def cli(*argv: str, env_dsn: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``eos-airflow ARGV``; EOS_LEDGER_DSN is ``env_dsn`` (unset when None)."""
    env = {k: v for k, v in os.environ.items() if k not in ("EOS_LEDGER_DSN", "EOS_LEDGER_SCHEMA")}
    env["COLUMNS"] = "300"  # wide enough that rich tables do not fold keys
    if env_dsn is not None:
        env["EOS_LEDGER_DSN"] = env_dsn
    return subprocess.run(
        [sys.executable, "-m", "eos_airflow.cli.main", *argv],
        cwd=ROOT,
        env=env,
        text=True,
        capture_output=True,
        timeout=120,
    )


def cli_all(*calls: tuple[str, ...]) -> list[subprocess.CompletedProcess[str]]:
    """Run independent CLI calls at once (each process spends most of its time importing)."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return list(pool.map(lambda argv: cli(*argv), calls))


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


# --- db migrate -----------------------------------------------------------------------------


def test_db_migrate_creates_the_schema_then_is_up_to_date(empty_db: str):
    first = cli("db", "migrate", "--dsn", empty_db)
    assert first.returncode == 0, first.stderr
    assert (
        first.stdout == f"ledger schema 'eos' at revision {HEAD} (applied {', '.join(REVISIONS)})\n"
    )
    again = cli("db", "migrate", "--dsn", empty_db)
    as_json = cli("db", "migrate", "--format", "json", env_dsn=empty_db)
    assert (again.returncode, as_json.returncode) == (0, 0), (again.stderr, as_json.stderr)
    assert again.stdout == f"ledger schema 'eos' at revision {HEAD} (up to date)\n"
    assert json.loads(as_json.stdout) == {"applied": [], "revision": HEAD, "schema": "eos"}
    with psycopg.connect(empty_db) as conn:
        assert conn.execute("SELECT revision FROM eos.schema_migrations ORDER BY 1").fetchall() == [
            (r,) for r in REVISIONS
        ]


def test_db_migrate_json_lists_the_applied_revision(empty_db: str):
    out = cli("db", "migrate", "--dsn", empty_db, "--format", "json", "--schema", "audit")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"applied": REVISIONS, "revision": HEAD, "schema": "audit"}
    with psycopg.connect(empty_db) as conn:
        assert conn.execute("SELECT count(*) FROM audit.ledger").fetchone() == (0,)


# --- ledger list / show ---------------------------------------------------------------------

SALES = Origin("sales", "load", "manual__1", -1)
ORDERS = Origin("orders", "load", "manual__1", -1)
COMMITTED = {
    "sales/2024-01-01": SALES,
    "sales/2024-01-02": SALES,
    "orders/1": ORDERS,
    "tmp_1": None,
    "tmpX1": None,
}
FAILED = {"sales/2024-01-03": SALES}


class Boom(Exception):
    pass


def boom(eos) -> None:
    raise Boom("source went away")


@pytest.fixture(scope="module")
def listed(pg_admin_dsn: str, template_db: str) -> Iterator[str]:
    """A ledger with committed and failed keys of two DAGs (the tests only read it)."""
    name = f"eos_cli_{uuid.uuid4().hex[:10]}"
    dsn = create_database(pg_admin_dsn, name, template=template_db)
    try:
        with Ledger(dsn) as ledger:
            for key, origin in COMMITTED.items():
                ledger.run(key, lambda eos: {"rows": 3}, origin=origin)
            for key, origin in FAILED.items():
                with pytest.raises(Boom):
                    ledger.run(key, boom, origin=origin)
            ledger.run("sales/2024-01-01", lambda eos: {"rows": 4}, attempt=2, origin=SALES)
        yield dsn
    finally:
        drop_database(pg_admin_dsn, name)


def test_ledger_list_formats_and_filters(listed: str):
    base = ("ledger", "list", "--dsn", listed)
    table, as_json, as_csv, committed, prefix, dag, underscore = cli_all(
        base,
        (*base, "--format", "json"),
        (*base, "--format", "csv"),
        (*base, "--format", "json", "--state", "committed"),
        (*base, "--format", "json", "--prefix", "sales/"),
        (*base, "--format", "json", "--dag-id", "orders"),
        (*base, "--format", "json", "--prefix", "tmp_"),
    )
    for out in (table, as_json, as_csv, committed, prefix, dag, underscore):
        assert out.returncode == 0, out.stderr
        assert out.stderr == ""

    everything = sorted({**COMMITTED, **FAILED})
    assert "6 ledger entries" in table.stdout
    for key in everything:
        assert key in table.stdout

    rows = json_lines(as_json.stdout)
    assert [(r["key"], r["state"]) for r in rows] == [
        (k, "failed" if k in FAILED else "committed") for k in everything
    ]
    first = next(r for r in rows if r["key"] == "sales/2024-01-01")
    assert (first["dag_id"], first["run_id"], first["version"], first["result"]) == (
        "sales",
        "manual__1",
        1,
        {"rows": 3},
    )

    lines = list(csv.reader(io.StringIO(as_csv.stdout)))
    assert lines[0] == LIST_COLUMNS
    assert [line[:3] for line in lines[1:]] == [
        [k, "failed" if k in FAILED else "committed", "1"] for k in everything
    ]

    def keys(out: subprocess.CompletedProcess[str]) -> list[str]:
        return [r["key"] for r in json_lines(out.stdout)]

    assert keys(committed) == sorted(COMMITTED)
    assert keys(prefix) == ["sales/2024-01-01", "sales/2024-01-02", "sales/2024-01-03"]
    assert keys(dag) == ["orders/1"]
    assert keys(underscore) == ["tmp_1"]  # "_" is literal text, not a LIKE wildcard


def test_ledger_show_entry_and_events(listed: str):
    table, as_json, csv_out, unknown = cli_all(
        ("ledger", "show", "sales/2024-01-01", "--dsn", listed),
        ("ledger", "show", "sales/2024-01-01", "--dsn", listed, "--format", "json"),
        ("ledger", "show", "sales/2024-01-03", "--dsn", listed, "--format", "csv"),
        ("ledger", "show", "sales/1999-01-01", "--dsn", listed),
    )
    assert (table.returncode, as_json.returncode, csv_out.returncode) == (0, 0, 0)
    assert "ledger entry sales/2024-01-01" in table.stdout
    assert "3 events" in table.stdout
    for word in ("committed", "claimed", "skipped", "manual__1", '{"rows": 3}'):
        assert word in table.stdout

    shown = json.loads(as_json.stdout)
    assert set(shown) == {"entry", "events", "recovery_points"}
    assert shown["recovery_points"] == []  # not a chunked effect
    entry = shown["entry"]
    assert (entry["key"], entry["state"], entry["version"], entry["event_seq"]) == (
        "sales/2024-01-01",
        "committed",
        1,
        3,
    )
    assert entry["result"] == {"rows": 3}
    assert [e["event"] for e in shown["events"]] == ["claimed", "committed", "skipped"]
    assert [(e["seq"], e["attempt"]) for e in shown["events"]] == [(1, 1), (2, 1), (3, 2)]
    assert shown["events"][-1]["hash"] == entry["last_hash"]

    events = list(csv.DictReader(io.StringIO(csv_out.stdout)))
    assert [(e["seq"], e["event"]) for e in events] == [("1", "claimed"), ("2", "failed")]
    assert json.loads(events[1]["detail"]) == {"error": "Boom", "message": "source went away"}

    assert unknown.returncode == 2
    assert unknown.stdout == ""
    assert "no ledger entry for key 'sales/1999-01-01'" in unknown.stderr


def test_ledger_show_json_of_a_running_key(ledger: Ledger, db: str):
    running, done = threading.Event(), threading.Event()

    def slow(eos):
        running.set()
        assert done.wait(60)
        return 1

    worker = threading.Thread(target=ledger.run, args=("busy", slow))
    worker.start()
    try:
        assert running.wait(30)
        out = cli("ledger", "show", "busy", "--dsn", db, "--format", "json")
    finally:
        done.set()
        worker.join()
    assert out.returncode == 0, out.stderr
    entry = json.loads(out.stdout)["entry"]
    assert entry["state"] == "running"
    uuid.UUID(entry["owner"])


# --- ledger verify --------------------------------------------------------------------------


def test_ledger_verify_passes_then_names_the_first_tampered_event(
    ledger: Ledger, conn: psycopg.Connection, db: str
):
    ledger.run("a", lambda eos: 1)
    ledger.run("b", lambda eos: 2)
    ledger.run("b", lambda eos: 3)
    with pytest.raises(Boom):
        ledger.run("c", boom)
    intact = cli("ledger", "verify", "--dsn", db)
    assert intact.returncode == 0, intact.stderr
    assert intact.stdout == "ledger verified: 7 events of 3 keys, hash chains intact\n"

    event_id = conn.execute(
        "SELECT id FROM eos.ledger_events WHERE key = 'b' AND seq = 2"
    ).fetchone()[0]
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute(
            "UPDATE eos.ledger_events SET detail = '{\"version\": 7}' WHERE id = %s", [event_id]
        )
    text, as_json = cli_all(
        ("ledger", "verify", "--dsn", db), ("ledger", "verify", "--dsn", db, "--format", "json")
    )
    assert text.returncode == 1
    assert "LEDGER VERIFICATION FAILED: 1 problem(s) in 7 events of 3 keys" in text.stderr
    assert f"first bad event: event id {event_id} (key 'b', seq 2)" in text.stderr
    assert "edited" in text.stderr
    assert as_json.returncode == 1
    report = json.loads(as_json.stdout)
    assert (report["ok"], report["events"], report["keys"], report["problems"]) == (False, 7, 3, 1)
    assert report["first_bad"] == {
        "key": "b",
        "seq": 2,
        "event_id": event_id,
        "reason": "hash does not match the event's content (edited)",
    }


# --- errors ---------------------------------------------------------------------------------


def test_errors_exit_codes_and_messages(empty_db: str):
    no_db, unreachable, no_schema, no_schema_json, bad_command, bad_option = cli_all(
        ("ledger", "list"),
        ("ledger", "verify", "--dsn", UNREACHABLE),
        ("ledger", "list", "--dsn", empty_db),
        ("ledger", "show", "k", "--dsn", empty_db, "--format", "json"),
        ("ledger", "frobnicate"),
        ("ledger", "list", "--bogus"),
    )
    assert no_db.returncode == 2
    assert "no ledger database given" in no_db.stderr
    assert "--dsn" in no_db.stderr and "EOS_LEDGER_DSN" in no_db.stderr

    assert unreachable.returncode == 3
    assert "cannot connect to the ledger database" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr

    assert no_schema.returncode == 3
    assert "eos-airflow db migrate" in no_schema.stderr
    assert no_schema_json.returncode == 3
    error = json.loads(no_schema_json.stderr)
    assert error["error"] == "LedgerSchemaError"
    assert "eos-airflow db migrate" in error["message"]
    for out in (no_db, unreachable, no_schema, no_schema_json):
        assert out.stdout == ""

    assert bad_command.returncode == 2
    assert "invalid choice: 'frobnicate'" in bad_command.stderr
    assert bad_option.returncode == 2
    assert "unrecognized arguments: --bogus" in bad_option.stderr


def test_db_migrate_unreachable_database():
    out = cli("db", "migrate", "--dsn", UNREACHABLE)
    assert out.returncode == 3, out.stderr
    assert "cannot connect to the ledger database" in out.stderr
