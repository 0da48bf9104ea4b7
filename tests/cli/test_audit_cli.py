"""`ledger export`, `ledger stats` and `doctor` against real ledgers."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import psycopg
import pytest

from eos_airflow import FencedError, Ledger, Origin

TI = Origin("sales", "load", "run_1", -1)


def cli(*argv: str, dsn: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eos_airflow.cli.main", *argv, "--dsn", dsn],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def history(db: str) -> str:
    """2 commits, 1 skip, 1 failure, 1 fence-at-claim, across two DAGs."""
    with Ledger(db) as ledger:
        ledger.run("sales/2024-01-01", lambda eos: 1, origin=TI)
        ledger.run("sales/2024-01-01", lambda eos: 1, origin=TI, attempt=2)  # skipped
        with pytest.raises(ZeroDivisionError):
            ledger.run("sales/2024-01-02", lambda eos: 1 / 0, origin=TI)  # failed
        ledger.run("stock/2024-01-01", lambda eos: 2, origin=Origin("stock", "load", "run_9", -1))
    return db


def test_stats_counts_every_decision(history: str):
    out = cli("ledger", "stats", "--format", "json", dsn=history)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert {k: data[k] for k in ("claimed", "committed", "skipped", "fenced", "failed")} == {
        "claimed": 3,
        "committed": 2,
        "skipped": 1,
        "fenced": 0,
        "failed": 1,
    }
    assert data["duplicates_prevented"] == 1
    assert data["entries"] == {"committed": 2, "failed": 1}
    assert data["by_dag"]["sales"]["skipped"] == 1 and data["by_dag"]["stock"]["committed"] == 1
    assert data["commit_latency_ms"]["p50"] > 0
    table = cli("ledger", "stats", dsn=history)
    assert "duplicates prevented (skipped + fenced): 1" in table.stdout


def test_stats_counts_fenced_attempts(db: str):
    started, release = threading.Event(), threading.Event()

    def newer_try(ledger: Ledger) -> None:
        def hold(eos):
            started.set()
            release.wait(10)

        ledger.run("k", hold, origin=TI, attempt=3)

    with Ledger(db) as ledger:
        thread = threading.Thread(target=newer_try, args=(ledger,))
        thread.start()
        assert started.wait(10)
        try:
            with pytest.raises(FencedError):
                ledger.run("k", lambda eos: 1, origin=TI, attempt=2)
        finally:
            release.set()
            thread.join(10)
    data = json.loads(cli("ledger", "stats", "--format", "json", dsn=db).stdout)
    assert (data["fenced"], data["committed"], data["duplicates_prevented"]) == (1, 1, 1)


def test_export_writes_the_whole_trail_as_json_lines_and_csv(history: str, tmp_path):
    lines = cli("ledger", "export", dsn=history).stdout.splitlines()
    rows = [json.loads(line) for line in lines]
    with psycopg.connect(history) as conn:
        total = conn.execute("SELECT count(*) FROM eos.ledger_events").fetchone()[0]
    assert len(rows) == total == 7
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    assert set(rows[0]) == {
        "id",
        "key",
        "seq",
        "event",
        "attempt",
        "at",
        "detail",
        "prev_hash",
        "hash",
    }
    target = tmp_path / "trail.csv"
    out = cli("ledger", "export", "--format", "csv", "--output", str(target), dsn=history)
    assert out.returncode == 0 and f"exported {total} events" in out.stderr
    parsed = list(csv.DictReader(io.StringIO(target.read_text())))
    assert len(parsed) == total and parsed[0]["event"] == "claimed"
    assert json.loads(parsed[0]["detail"])["dag_id"] == "sales"
    stock = cli("ledger", "export", "--prefix", "stock/", dsn=history).stdout.splitlines()
    assert [json.loads(line)["event"] for line in stock] == ["claimed", "committed"]
    future = cli("ledger", "export", "--since", "2999-01-01T00:00:00Z", dsn=history)
    assert future.returncode == 0 and future.stdout == ""


def test_bad_since_is_explained(history: str):
    out = cli("ledger", "stats", "--since", "last tuesday", dsn=history)
    assert out.returncode == 2
    assert "neither a duration (30d, 12h" in out.stderr


def test_doctor_passes_on_a_fresh_ledger_and_fails_when_history_is_editable(db: str):
    ok = cli("doctor", "--format", "json", dsn=db)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    checks = {c["check"]: c["status"] for c in json.loads(ok.stdout)["checks"]}
    assert checks["schema revision"] == checks["privileges"] == checks["append-only events"] == "ok"
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("ALTER TABLE eos.ledger_events DISABLE TRIGGER ledger_events_append_only")
    bad = cli("doctor", "--format", "json", dsn=db)
    assert bad.returncode == 1
    (check,) = [c for c in json.loads(bad.stdout)["checks"] if c["check"] == "append-only events"]
    assert check["status"] == "fail"
    assert "ENABLE TRIGGER ledger_events_append_only" in check["detail"]


def test_doctor_reports_a_missing_schema(empty_db: str):
    out = cli("doctor", "--format", "json", dsn=empty_db)
    assert out.returncode == 3  # schema missing: the exit code of every command (usage.md)
    (schema,) = [c for c in json.loads(out.stdout)["checks"] if c["check"] == "schema revision"]
    assert schema["status"] == "fail" and "eos-airflow db migrate" in schema["detail"]


def test_doctor_warns_about_claims_of_crashed_owners(db: str):
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent("""
        import sys, time
        from eos_airflow import Ledger
        def hang(eos):
            print("in-run", flush=True); time.sleep(60)
        Ledger(sys.argv[1]).run("k", hang)
    """),
            db,
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ,
    )
    assert child.stdout.readline().strip() == "in-run"
    live = json.loads(cli("doctor", "--format", "json", dsn=db).stdout)
    assert {c["check"]: c["status"] for c in live["checks"]}["claims of dead owners"] == "ok"
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    dead = json.loads(cli("doctor", "--format", "json", dsn=db).stdout)
    (check,) = [c for c in dead["checks"] if c["check"] == "claims of dead owners"]
    assert check["status"] == "warn" and check["detail"].startswith("1 running keys")


HOLDER = textwrap.dedent("""
    import sys, time
    from eos_airflow import Ledger, FencedError
    def hold(eos):
        eos.conn.execute("CREATE TABLE written (x int)")
        print("in-run", flush=True)
        if sys.argv[2] == "stdin":  # hold until the test says go: no race with its checks
            sys.stdin.readline()
        else:
            time.sleep(float(sys.argv[2]))
        return 1
    try:
        Ledger(sys.argv[1]).run("k", hold)
    except FencedError as exc:
        print("FENCED", exc, flush=True)
""")


def test_recover_expires_claims_of_crashed_owners(db: str):
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, db, "60"], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "in-run"
    assert json.loads(cli("recover", "--format", "json", dsn=db).stdout) == {
        "expired": [],
        "held": [],
        "transactions": [],
    }
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    out = cli("recover", "--format", "json", dsn=db)
    assert out.returncode == 0, out.stderr
    (expired,) = json.loads(out.stdout)["expired"]
    assert (expired["key"], expired["reason"]) == ("k", "owner session ended")
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT state::text, owner FROM eos.ledger").fetchone() == (
            "failed",
            None,
        )
        detail = conn.execute("SELECT detail FROM eos.ledger_events WHERE seq = 2").fetchone()[0]
        assert detail["recovered_by"] == "eos-airflow recover"
    assert cli("ledger", "verify", dsn=db).returncode == 0


def test_recover_older_than_leaves_a_live_owner_alone(db: str):
    """A claim held by a live session is never expired, however old: its attempt may still
    commit, and fencing it (non-retryable) would lose the effect. It is listed instead."""
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, db, "stdin"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "in-run"
    out = cli("recover", "--older-than", "0s", "--format", "json", dsn=db)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["expired"] == []
    (held,) = report["held"]
    assert (held["key"], held["attempt"], held["pid"]) == ("k", 1, child.pid)
    text = cli("recover", "--older-than", "0s", dsn=db).stdout
    assert "left 1 claims older than --older-than alone" in text
    rest, _ = child.communicate("go\n", timeout=30)
    assert child.returncode == 0 and "FENCED" not in rest
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT to_regclass('written')").fetchone() == ("written",)
        assert conn.execute(
            "SELECT event::text FROM eos.ledger_events ORDER BY seq"
        ).fetchall() == [("claimed",), ("committed",)]


def test_reopen_lets_the_next_run_reprocess_with_the_previous_result(db: str):
    with Ledger(db) as ledger:
        ledger.run("sales/2024-01-01", lambda eos: {"rows": 3}, origin=TI)
        out = cli(
            "ledger",
            "reopen",
            "sales/2024-01-01",
            "--reason",
            "source file corrected",
            "--format",
            "json",
            dsn=db,
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["state"] == "reopened"
        seen = {}

        def reload(eos):
            seen["previous"] = eos.previous
            return {"rows": 4}

        again = ledger.run_outcome(
            "sales/2024-01-01", reload, origin=Origin("sales", "load", "run_2", -1)
        )
    assert again.action == "committed" and again.version == 2
    assert seen["previous"].result == {"rows": 3} and seen["previous"].version == 1
    with psycopg.connect(db) as conn:
        kinds = conn.execute(
            "SELECT event::text, detail->>'reason' FROM eos.ledger_events ORDER BY seq"
        ).fetchall()
    assert kinds == [
        ("claimed", None),
        ("committed", None),
        ("reopened", "source file corrected"),
        ("claimed", None),
        ("committed", None),
    ]
    stats = json.loads(cli("ledger", "stats", "--format", "json", dsn=db).stdout)
    assert stats["reopened"] == 1 and stats["committed"] == 2
    assert cli("ledger", "verify", dsn=db).returncode == 0


def test_reopen_refuses_unknown_and_uncommitted_keys(db: str):
    with Ledger(db) as ledger, pytest.raises(ZeroDivisionError):
        ledger.run("broken", lambda eos: 1 / 0)
    unknown = cli("ledger", "reopen", "nope", "--reason", "x", dsn=db)
    assert unknown.returncode == 2 and "no ledger entry for key 'nope'" in unknown.stderr
    failed = cli("ledger", "reopen", "broken", "--reason", "x", dsn=db)
    assert failed.returncode == 2
    assert "key broken is failed, not committed and idle" in failed.stderr
    blank = cli("ledger", "reopen", "broken", "--reason", " ", dsn=db)
    assert blank.returncode == 2 and "--reason must say why" in blank.stderr
