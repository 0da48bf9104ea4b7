"""`ledger gc`, `ledger heads`, `ledger verify --heads` (and their deprecated former names
`ledger checkpoint`, `--checkpoint`) and `db grant` against real ledgers, real roles (SET ROLE)
and bad input."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from eos_airflow import Ledger, Origin
from eos_airflow.cli.main import main
from eos_airflow.ledger import chain
from tests.cli.test_audit_cli import cli as cli_process
from tests.conftest import events

TI = Origin("sales", "load", "run_1", -1)


def cli(*argv: str, dsn: str) -> subprocess.CompletedProcess[str]:
    """The CLI in this process (the same code path as the command, without its start-up
    time); one test below runs it as a real subprocess."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*argv, "--dsn", dsn])
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


class Boom(Exception):
    pass


def boom(eos) -> None:
    raise Boom("no")


@pytest.fixture
def history(db: str) -> str:
    """A: committed then skipped; B: failed only; C: committed, replaced."""
    with Ledger(db) as ledger:
        ledger.run("a", lambda eos: {"v": 1}, origin=TI)
        ledger.run("a", lambda eos: {"v": 1}, origin=TI, attempt=2)
        with pytest.raises(Boom):
            ledger.run("b", boom, origin=TI)
        ledger.run("c", lambda eos: {"v": 1}, origin=TI)
        ledger.run("c", lambda eos: {"v": 2}, origin=TI, on_committed="replace")
    return db


@contextlib.contextmanager
def superuser_edit(dsn: str) -> Iterator[psycopg.Connection]:
    """A committed edit that bypasses the append-only trigger (as a superuser could)."""
    with psycopg.connect(dsn) as conn:
        conn.execute("SET session_replication_role = replica")
        yield conn
        conn.commit()


def verify_json(dsn: str, *extra: str) -> tuple[int, dict]:
    out = cli("ledger", "verify", "--format", "json", *extra, dsn=dsn)
    return out.returncode, json.loads(out.stdout) if out.stdout else {"stderr": out.stderr}


# --- gc ---------------------------------------------------------------------------------------


def test_gc_removes_old_committed_history_and_verify_still_passes(history: str):
    with psycopg.connect(history) as conn:
        before = events(conn)
    dry = cli("ledger", "gc", "--older-than", "0s", "--dry-run", "--format", "json", dsn=history)
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout) | {"cutoff": None, "sample": None} == {
        "cutoff": None,
        "sample": None,
        "dry_run": True,
        "keys": 2,
        "events": 7,
    }
    with psycopg.connect(history) as conn:
        assert events(conn) == before  # a dry run removes nothing

    out = cli("ledger", "gc", "--older-than", "0s", "--format", "json", dsn=history)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert (report["keys"], report["events"]) == (2, 7)
    with psycopg.connect(history) as conn:
        assert events(conn, "a") == [("pruned", 1)]  # the committed attempt
        assert events(conn, "b") == [("claimed", 1), ("failed", 1)]  # not committed: kept
        assert [e for e, _ in events(conn, "c")] == ["pruned"]
        detail = conn.execute("SELECT detail FROM eos.ledger_events WHERE key = 'c'").fetchone()[0]
        assert (detail["through_seq"], detail["events"], detail["versions"]) == (4, 4, 2)
        assert conn.execute(
            "SELECT key, through_seq, events, versions FROM eos.pruned_chains ORDER BY key"
        ).fetchall() == [("a", 3, 3, 1), ("c", 4, 4, 2)]
    code, result = verify_json(history)
    assert code == 0 and result["ok"], result
    # the protocol carries on: a skip of a pruned key, then a second gc prunes again
    with Ledger(history) as ledger:
        assert ledger.run("c", lambda eos: {"v": 9}, origin=TI) == {"v": 2}
    again = cli("ledger", "gc", "--older-than", "0s", "--format", "json", dsn=history)
    assert (json.loads(again.stdout)["keys"], json.loads(again.stdout)["events"]) == (1, 2)
    nothing = cli("ledger", "gc", "--older-than", "0s", "--format", "json", dsn=history)
    assert json.loads(nothing.stdout)["keys"] == 0  # only its own `pruned` events are left
    with psycopg.connect(history) as conn:
        assert conn.execute(
            "SELECT events, versions FROM eos.pruned_chains WHERE key = 'c'"
        ).fetchone() == (6, 2)
    assert verify_json(history)[0] == 0
    text = cli("ledger", "gc", "--older-than", "30d", dsn=history)
    assert text.returncode == 0 and "gc removed 0 events of 0 committed keys" in text.stdout


@pytest.mark.parametrize(
    "tamper, reason",
    [
        ("DELETE FROM eos.ledger_events WHERE key = 'c'", "the rest are gone"),
        ("UPDATE eos.pruned_chains SET through_seq = 3 WHERE key = 'c'", "expected event number 4"),
        ("UPDATE eos.pruned_chains SET versions = 1 WHERE key = 'c'", "ledger row says version 2"),
        ("DELETE FROM eos.pruned_chains WHERE key = 'c'", "expected event number 1"),
        (
            "UPDATE eos.ledger_events SET detail = jsonb_set(detail, '{through_seq}', '2') "
            "WHERE key = 'c'",
            "hash does not match",
        ),
    ],
)
def test_tampering_after_gc_is_detected(history: str, tamper: str, reason: str):
    assert cli("ledger", "gc", "--older-than", "0s", dsn=history).returncode == 0
    with superuser_edit(history) as conn:
        conn.execute(tamper)
    code, result = verify_json(history)
    assert code == 1
    assert result["first_bad"]["key"] == "c"
    assert reason in result["first_bad"]["reason"]


def test_gc_deletes_only_through_its_function(history: str):
    with psycopg.connect(history, autocommit=True) as conn:
        with pytest.raises(psycopg.Error, match="append-only") as err:
            conn.execute("DELETE FROM eos.ledger_events WHERE key = 'a'")
        assert err.value.sqlstate == "EOS02"
        assert conn.execute(
            "SELECT count(*) FROM eos.ledger_events WHERE key = 'a'"
        ).fetchone() == (3,)


def test_gc_rejects_bad_durations_before_connecting():
    out = cli("ledger", "gc", "--older-than", "a while", dsn="postgresql://nobody@127.0.0.1:1/x")
    assert out.returncode == 2
    assert "--older-than 'a while' is neither a duration (30d, 12h" in out.stderr


# --- heads files ----------------------------------------------------------------------


def test_heads_file_detects_a_truncated_tail_and_a_removed_key(history: str, tmp_path):
    path = tmp_path / "heads.json"
    out = cli("ledger", "heads", "--out", str(path), "--format", "json", dsn=history)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""  # no deprecation line for the current name
    taken = json.loads(path.read_text())
    assert (taken["format"], taken["format_version"]) == ("eos-airflow-heads", 1)
    assert (taken["events"], taken["keys"]) == (9, 3) and taken["heads"]["c"][0] == 4
    assert verify_json(history, "--heads", str(path)) == (0, verify_json(history)[1])
    with Ledger(history) as ledger:  # the ledger grows after the heads file: still fine
        ledger.run("a", lambda eos: {"v": 1}, origin=TI, attempt=3)
        ledger.run("d", lambda eos: {"v": 1}, origin=TI)
    assert verify_json(history, "--heads", str(path))[0] == 0

    # cut key a's tail back before the heads file, and fix its row so the chain verifies
    with superuser_edit(history) as conn:
        conn.execute("DELETE FROM eos.ledger_events WHERE key = 'a' AND seq >= 3")
        conn.execute(
            "UPDATE eos.ledger AS l SET event_seq = 2, last_hash = e.hash "
            "FROM eos.ledger_events AS e WHERE l.key = 'a' AND e.key = 'a' "
            "AND e.seq = 2"
        )
    assert verify_json(history)[0] == 0  # the chains alone cannot tell
    code, result = verify_json(history, "--heads", str(path))
    assert code == 1
    assert result["first_bad"]["key"] == "a" and result["first_bad"]["seq"] == 3
    assert "the ledger now ends at 2 (the tail was removed)" in result["first_bad"]["reason"]

    with superuser_edit(history) as conn:  # remove key b's whole history
        conn.execute("DELETE FROM eos.ledger_events WHERE key = 'b'")
        conn.execute("DELETE FROM eos.ledger WHERE key = 'b'")
    text = cli_process("ledger", "verify", "--heads", str(path), dsn=history)
    assert text.returncode == 1
    assert (
        "key 'b': the heads file records 2 events of this key; its ledger row and history "
        "are gone (removed)"
    ) in text.stderr


def test_heads_file_survives_gc(history: str, tmp_path):
    path = tmp_path / "heads.json"
    assert cli("ledger", "heads", "--out", str(path), dsn=history).returncode == 0
    assert cli("ledger", "gc", "--older-than", "0s", dsn=history).returncode == 0
    assert verify_json(history, "--heads", str(path))[0] == 0


def test_bad_heads_files_are_refused(history: str, tmp_path):
    path = tmp_path / "heads.json"
    assert cli("ledger", "heads", "--out", str(path), dsn=history).returncode == 0
    good = json.loads(path.read_text())
    cases = {
        "missing.json": (None, "does not exist; write one with `eos-airflow ledger heads --out"),
        "garbage.json": ("{not json", "is not a heads file written by `eos-airflow ledger heads`"),
        "foreign.json": (json.dumps({"hello": 1}), "no format marker"),
        "edited.json": (
            json.dumps({**good, "heads": {**good["heads"], "a": [1, "00"]}}),
            "is damaged: its heads do not match its heads_digest",
        ),
        "future.json": (json.dumps({**good, "format_version": 99}), "upgrade eos-airflow"),
    }
    for name, (content, message) in cases.items():
        target = tmp_path / name
        if content is not None:
            target.write_text(content)
        out = cli("ledger", "verify", "--heads", str(target), dsn=history)
        assert out.returncode == 2, (name, out.stderr)
        assert message in out.stderr, (name, out.stderr)
    other = cli("ledger", "verify", "--heads", str(path), "--schema", "audit", dsn=history)
    assert other.returncode == 3  # no ledger in schema "audit"
    unwritable = cli("ledger", "heads", "--out", str(tmp_path / "no" / "h.json"), dsn=history)
    assert unwritable.returncode == 2 and "cannot write the heads file to" in unwritable.stderr


DEPRECATED_COMMAND = (
    "`ledger checkpoint` is deprecated; use `ledger heads --out FILE` (it does the same)"
)
DEPRECATED_OPTION = (
    "`ledger verify --checkpoint FILE` is deprecated; use `ledger verify --heads FILE` "
    "(it does the same)"
)


def test_the_former_names_still_work_and_say_they_are_deprecated(history: str, tmp_path):
    old = tmp_path / "old-command.json"
    out = cli("ledger", "checkpoint", "--out", str(old), dsn=history)
    assert out.returncode == 0, out.stderr
    assert out.stderr == f"eos-airflow: warning: {DEPRECATED_COMMAND}\n"  # one line
    assert "chain heads of 3 keys (9 events) written to" in out.stdout
    assert verify_json(history, "--heads", str(old))[0] == 0

    # a file written before the rename: the old format marker, otherwise the same content
    legacy = tmp_path / "legacy.json"
    legacy.write_text(
        json.dumps({**json.loads(old.read_text()), "format": "eos-airflow-checkpoint"})
    )
    assert verify_json(history, "--heads", str(legacy))[0] == 0

    # --checkpoint: the same check as --heads, with one deprecation line (JSON with --format json)
    new = tmp_path / "new.json"
    assert cli("ledger", "heads", "--out", str(new), dsn=history).returncode == 0
    for path in (new, legacy):
        out = cli("ledger", "verify", "--format", "json", "--checkpoint", str(path), dsn=history)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == verify_json(history, "--heads", str(path))[1]
        assert [json.loads(line) for line in out.stderr.splitlines()] == [
            {"warning": DEPRECATED_OPTION}
        ]
    text = cli("ledger", "verify", "--checkpoint", str(legacy), dsn=history)
    assert text.returncode == 0 and text.stderr == f"eos-airflow: warning: {DEPRECATED_OPTION}\n"

    # and the deprecated option still finds what --heads finds
    with superuser_edit(history) as conn:
        conn.execute("DELETE FROM eos.ledger_events WHERE key = 'b'")
        conn.execute("DELETE FROM eos.ledger WHERE key = 'b'")
    code, result = verify_json(history, "--checkpoint", str(legacy))
    assert code == 1 and result["first_bad"]["key"] == "b"
    assert verify_json(history, "--heads", str(old))[0] == 1


def test_the_former_names_are_not_listed_in_help():
    from eos_airflow.cli.main import build_parser

    ledger_help, verify_help = io.StringIO(), io.StringIO()
    for argv, sink in (
        (["ledger", "--help"], ledger_help),
        (["ledger", "verify", "--help"], verify_help),
    ):
        with contextlib.redirect_stdout(sink), pytest.raises(SystemExit):
            build_parser().parse_args(argv)
    assert "heads" in ledger_help.getvalue() and "checkpoint" not in ledger_help.getvalue()
    assert "--heads" in verify_help.getvalue() and "--checkpoint" not in verify_help.getvalue()


def test_heads_and_checkpoint_together_are_refused(tmp_path):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        main(["ledger", "verify", "--heads", "a.json", "--checkpoint", "b.json"])
    assert exit_.value.code == 2 and "not allowed with argument" in err.getvalue()


# --- roles ----------------------------------------------------------------------------------


@pytest.fixture
def roles(db: str, pg_admin_dsn: str) -> Iterator[tuple[str, str]]:
    suffix = uuid.uuid4().hex[:8]
    writer, auditor = f"eos_writer_{suffix}", f"eos_auditor_{suffix}"
    yield writer, auditor
    with psycopg.connect(db, autocommit=True) as conn:
        for role in (writer, auditor):
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone():
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
    with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
        for role in (writer, auditor):
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def as_role(dsn: str, role: str):
    def connect() -> psycopg.Connection:
        conn = psycopg.connect(dsn, autocommit=True)
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
        return conn

    return connect


def test_db_grant_makes_history_insert_only_for_the_writer(history: str, roles):
    writer, auditor = roles
    out = cli(
        "db", "grant", "--writer", writer, "--auditor", auditor, "--format", "json", dsn=history
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["created"] == [writer, auditor]
    again = cli("db", "grant", "--writer", writer, "--auditor", auditor, dsn=history)
    assert again.returncode == 0 and "created" not in again.stdout  # idempotent

    # the writer runs the whole protocol: claims, commits, skips, failures, waiting rows
    with Ledger(connect=as_role(history, writer)) as ledger:
        assert ledger.run("w/1", lambda eos: {"n": 1}, origin=TI) == {"n": 1}
        assert ledger.run("w/1", lambda eos: {"n": 2}, origin=TI, attempt=2) == {"n": 1}
        with pytest.raises(Boom):
            ledger.run("w/2", boom, origin=TI)
    with as_role(history, writer)() as conn:
        for statement in (
            "UPDATE eos.ledger_events SET attempt = 9",
            "DELETE FROM eos.ledger_events",
            "TRUNCATE eos.ledger_events",
            "DELETE FROM eos.ledger",
            "DELETE FROM eos.pruned_chains",
            "SELECT * FROM eos.gc_prune(ARRAY['a'], now(), 'me')",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
        conn.execute("SET eos.gc_prune = 'on'")  # the flag alone opens nothing
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM eos.ledger_events")
    with as_role(history, auditor)() as conn:
        assert chain.verify(conn).ok
        assert conn.execute("SELECT count(*) FROM eos.ledger_events").fetchone()[0] == 14
        for statement in (
            "INSERT INTO eos.waiters VALUES ('k', false, 'me', now())",
            "UPDATE eos.ledger SET version = 9",
            "SELECT * FROM eos.gc_prune(ARRAY['a'], now(), 'me')",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
    gc = cli("ledger", "gc", "--older-than", "0s", "--format", "json", dsn=history)
    assert gc.returncode == 0 and json.loads(gc.stdout)["keys"] == 3  # the owner may


def test_the_trigger_refuses_a_non_owner_that_sets_the_gc_flag(history: str, roles):
    writer, _ = roles
    with psycopg.connect(history, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(writer)))
        conn.execute(
            sql.SQL(
                "GRANT USAGE ON SCHEMA eos TO {0}; GRANT SELECT, DELETE ON eos.ledger_events TO {0}"
            ).format(sql.Identifier(writer))
        )
    with as_role(history, writer)() as conn:
        conn.execute("SET eos.gc_prune = 'on'")
        with pytest.raises(psycopg.Error, match="append-only") as err:
            conn.execute("DELETE FROM eos.ledger_events WHERE key = 'a'")
        assert err.value.sqlstate == "EOS02"


def test_db_grant_bad_input(history: str, empty_db: str, roles):
    writer, _ = roles
    same = cli("db", "grant", "--writer", writer, "--auditor", writer, dsn=history)
    assert same.returncode == 2 and "must be different roles" in same.stderr
    missing = cli("db", "grant", "--writer", writer, "--auditor", "x", dsn=empty_db)
    assert missing.returncode == 3 and "eos-airflow db migrate" in missing.stderr
    down = cli(
        "db",
        "grant",
        "--writer",
        writer,
        "--auditor",
        "x",
        dsn="postgresql://postgres@127.0.0.1:1/none",
    )
    assert down.returncode == 3 and "cannot connect to the ledger database" in down.stderr
    with psycopg.connect(history, autocommit=True) as conn:
        conn.execute("UPDATE eos.alembic_version SET version_num = '0003'")
    old = cli("ledger", "gc", "--older-than", "1d", dsn=history)
    assert old.returncode == 3 and "run `eos-airflow db migrate`" in old.stderr
    with psycopg.connect(history) as conn:  # nothing was created
        assert conn.execute(
            "SELECT count(*) FROM pg_roles WHERE rolname = %s", [writer]
        ).fetchone() == (0,)
