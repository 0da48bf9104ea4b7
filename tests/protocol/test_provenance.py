"""What each committed version was made from and who was told about it (schema revision
0013): input fingerprints and ``on_mismatch``, the code and lakehouse snapshots recorded in
the events, and announcements (real PostgreSQL ledger)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pyarrow as pa
import pytest

from eos_airflow import ConfigurationError, FingerprintMismatchError, Ledger, Origin
from eos_airflow.ledger.chain import verify
from eos_airflow.protocol.fingerprints import canonical, code_of, fingerprint
from tests.conftest import events

ORIGIN = Origin("daily", "load", "run-1", -1, code={"dag_version_id": "v-1", "bundle_name": "b"})


def write(amount: int):
    def fn(eos):
        eos.conn.execute("INSERT INTO out VALUES (%s, %s)", [eos.key, amount])
        return {"amount": amount}

    return fn


@pytest.fixture
def out(conn: psycopg.Connection) -> psycopg.Connection:
    conn.execute("CREATE TABLE out (key text, amount int)")
    return conn


def rows(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute("SELECT key, amount FROM out ORDER BY amount").fetchall()


def detail(conn: psycopg.Connection, key: str, event: str) -> list[dict]:
    return [
        d
        for (d,) in conn.execute(
            "SELECT detail FROM eos.ledger_events WHERE key = %s AND event::text = %s ORDER BY seq",
            [key, event],
        )
    ]


# -- fingerprints ---------------------------------------------------------------------------


def test_fingerprints_are_canonical_and_the_same_in_another_process():
    class Thing:
        pass

    a = fingerprint(sql="SELECT 1", parameters={"b": 2, "a": {1, 3, 2}}, obj=Thing())
    b = fingerprint(obj=Thing(), parameters={"a": {3, 2, 1}, "b": 2}, sql="SELECT 1")
    assert a == b and a.startswith("sha256:") and len(a) == len("sha256:") + 64
    assert fingerprint(sql="SELECT 2") != fingerprint(sql="SELECT 1")
    assert "0x" not in json.dumps(canonical({"o": Thing()}))
    code = (
        "from eos_airflow.protocol.fingerprints import fingerprint\n"
        "print(fingerprint(sql='SELECT 1', parameters={'b': 2, 'a': {1, 2, 3}}))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
    )
    assert other.stdout.strip() == fingerprint(sql="SELECT 1", parameters={"a": {1, 2, 3}, "b": 2})


def test_code_of_a_function_changes_with_its_body():
    def f(x):
        return x + 1

    def g(x):
        return x + 2

    assert code_of(f)["function"].endswith("f")
    assert code_of(f)["code"] != code_of(g)["code"]


def test_the_fingerprint_is_stored_with_the_version_and_in_its_commit_event(ledger, out):
    done = ledger.run_outcome("k", write(1), origin=ORIGIN, fingerprint="sha256:one")
    assert done.action == "committed"
    assert out.execute("SELECT version, fingerprint FROM eos.versions").fetchall() == [
        (1, "sha256:one")
    ]
    (committed,) = detail(out, "k", "committed")
    assert committed["fingerprint"] == "sha256:one"
    # the same inputs: a plain skip, no mismatch
    again = ledger.run_outcome("k", write(1), origin=ORIGIN, fingerprint="sha256:one")
    assert (again.action, again.mismatch) == ("skipped", None)
    assert [e for e, _ in events(out, "k")] == ["claimed", "committed", "skipped"]


def test_on_mismatch_warn_skips_and_records_a_mismatch(ledger, out, caplog):
    ledger.run("k", write(1), origin=ORIGIN, fingerprint="sha256:one")
    done = ledger.run_outcome("k", write(2), origin=ORIGIN, fingerprint="sha256:two")
    assert (done.action, done.result, done.mismatch) == ("skipped", {"amount": 1}, "sha256:one")
    assert rows(out) == [("k", 1)]
    assert [e for e, _ in events(out, "k")] == ["claimed", "committed", "skipped", "mismatch"]
    (mismatch,) = detail(out, "k", "mismatch")
    assert mismatch["committed_fingerprint"] == "sha256:one"
    assert mismatch["fingerprint"] == "sha256:two"
    assert (mismatch["version"], mismatch["on_mismatch"], mismatch["run_id"]) == (
        1,
        "warn",
        "run-1",
    )
    assert "committed from other inputs" in caplog.text
    assert verify(out).ok


def test_on_mismatch_fail_refuses_and_writes_nothing(ledger, out):
    ledger.run("k", write(1), origin=ORIGIN, fingerprint="sha256:one")
    with pytest.raises(FingerprintMismatchError, match="on_committed='replace'") as caught:
        ledger.run("k", write(2), origin=ORIGIN, fingerprint="sha256:two", on_mismatch="fail")
    assert not caught.value.retryable
    assert rows(out) == [("k", 1)]
    assert [e for e, _ in events(out, "k")][-1] == "mismatch"
    assert out.execute("SELECT version FROM eos.ledger").fetchall() == [(1,)]


def test_on_mismatch_replace_writes_a_new_version_from_the_new_inputs(ledger, out):
    def replace(eos):
        if eos.previous is not None:
            eos.conn.execute("DELETE FROM out WHERE key = %s", [eos.key])
        return write(2)(eos)

    ledger.run("k", write(1), origin=ORIGIN, fingerprint="sha256:one")
    done = ledger.run_outcome(
        "k", replace, origin=ORIGIN, fingerprint="sha256:two", on_mismatch="replace"
    )
    assert (done.action, done.version, done.result) == ("replaced", 2, {"amount": 2})
    assert rows(out) == [("k", 2)]
    assert out.execute("SELECT version, fingerprint FROM eos.versions").fetchall() == [
        (2, "sha256:two")
    ]
    kinds = [e for e, _ in events(out, "k")]
    assert kinds == ["claimed", "committed", "skipped", "mismatch", "claimed", "replaced"]
    # the new inputs again: a plain skip
    assert ledger.run_outcome("k", replace, fingerprint="sha256:two").mismatch is None


def test_a_version_without_fingerprint_is_not_a_mismatch(ledger, out):
    ledger.run("k", write(1))
    done = ledger.run_outcome("k", write(2), fingerprint="sha256:two", on_mismatch="fail")
    assert (done.action, done.mismatch) == ("skipped", None)


def test_ledger_list_mismatched_finds_the_keys(ledger, out, db):
    ledger.run("a", write(1), fingerprint="sha256:one")
    ledger.run("b", write(1), fingerprint="sha256:one")
    ledger.run("a", write(2), fingerprint="sha256:two")  # warn
    ledger.run("b", write(1), fingerprint="sha256:one")
    done = subprocess.run(
        [sys.executable, "-m", "eos_airflow.cli.main", "ledger", "list", "--mismatched"]
        + ["--dsn", db, "--format", "json"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["key"] for line in done.stdout.splitlines()] == ["a"]
    shown = subprocess.run(
        [sys.executable, "-m", "eos_airflow.cli.main", "ledger", "show", "a"]
        + ["--dsn", db, "--format", "json"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    assert shown.returncode == 0, shown.stderr
    assert '"fingerprint": "sha256:one"' in shown.stdout


def test_bad_on_mismatch_is_refused_before_anything_runs(ledger, out):
    with pytest.raises(ConfigurationError, match="on_mismatch='maybe' is not valid"):
        ledger.run("k", write(1), on_mismatch="maybe")
    assert events(out, "k") == []


# -- provenance in the events ----------------------------------------------------------------


def test_the_code_that_ran_is_in_the_claim_and_commit_events(ledger, out):
    ledger.run("k", write(1), origin=ORIGIN)
    ledger.run("k", write(1), origin=ORIGIN)
    for kind in ("claimed", "committed", "skipped"):
        (found,) = detail(out, "k", kind)
        assert (found["dag_version_id"], found["bundle_name"]) == ("v-1", "b"), kind
    assert verify(out).ok


def test_the_protocol_fields_cannot_be_overridden_by_the_detail(ledger, out):
    forged = Origin("daily", "load", "run-1", -1, code={"version": 99, "owner": "me"})
    ledger.run("k", write(1), origin=forged)
    (committed,) = detail(out, "k", "committed")
    assert committed["version"] == 1 and committed["owner"] != "me"


def test_a_detail_that_is_not_an_object_or_too_large_is_refused(out):
    for bad, message in (("[1]", "JSON object"), (json.dumps({"x": "y" * 9000}), "8192")):
        with pytest.raises(psycopg.Error, match=message) as caught:
            out.execute(
                "SELECT * FROM eos.claim('k', gen_random_uuid(), 1, 'd', 't', 'r', -1, 'h', 1, "
                "'skip', %s::jsonb)",
                [bad],
            )
        assert caught.value.sqlstate == "EOS11"
    assert events(out, "k") == []


def test_lakehouse_commits_name_their_snapshot_and_version_in_the_commit_event(
    ledger, out, tmp_path
):
    warehouse = (tmp_path / "lake").as_uri()
    data = pa.table({"n": pa.array([1, 2, 3], pa.int64())})

    def load(eos):
        table = eos.iceberg("sales.daily", schema=data.schema, warehouse=warehouse)
        table.append(data)
        eos.delta(f"{warehouse}/delta_daily").write(data)
        return {"ok": True}

    ledger.run("lake", load)
    (committed,) = detail(out, "lake", "committed")
    from pyiceberg.catalog.sql import SqlCatalog

    from eos_airflow.protocol.iceberg import reader_uri

    dsn = out.info.dsn
    table = SqlCatalog("eos", uri=reader_uri(dsn), warehouse=warehouse).load_table("sales.daily")
    assert committed["iceberg"] == {"sales.daily": table.current_snapshot().snapshot_id}
    assert committed["delta"] == {f"{warehouse}/delta_daily": 1}


# -- announcements ---------------------------------------------------------------------------


def test_each_version_is_announced_once(ledger, out):
    ledger.run("k", write(1))
    assert ledger.announce("k", 1, 1, {"run_id": "r1"}) == "committed"
    assert ledger.announce("k", 1, 2, {"run_id": "r1"}) is None
    assert ledger.announce("k", 2, 2) is None  # no such version
    ledger.run("k", write(2), on_committed="replace")
    assert ledger.announce("k", 1, 3) is None  # superseded
    assert ledger.announce("k", 2, 3) == "replaced"
    assert ledger.announce("k", 2, 3) is None
    announced = detail(out, "k", "announced")
    assert [(d["version"], d["action"]) for d in announced] == [(1, "committed"), (2, "replaced")]
    assert out.execute("SELECT announced FROM eos.versions").fetchall() == [(2,)]
    assert verify(out).ok


def test_an_unknown_key_is_not_announced(ledger, out):
    assert ledger.announce("nope", 1, 1) is None
    assert events(out, "nope") == []


def test_two_processes_announcing_one_version_announce_it_once(db, out):
    code = (
        "import sys\nfrom eos_airflow import Ledger\n"
        "with Ledger(sys.argv[1]) as l: print(l.announce('k', 1, 1))"
    )
    with Ledger(db) as ledger:
        ledger.run("k", write(1))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, db],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parents[2],
        )
        for _ in range(4)
    ]
    said = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert said == ["None", "None", "None", "committed"]
    assert len(detail(out, "k", "announced")) == 1
