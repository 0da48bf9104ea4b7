"""Shipped schema revisions are frozen, and what a migration records covers the SQL it ran.

``eos_airflow/ledger/migrations/SHIPPED.sha256`` lists the sha256 of every shipped wrapper
(``migrations/versions/NNNN_*.py``) and SQL file (``sql/NNNN_*.sql``). A change to any of them
fails here: ledgers migrated before would keep the old SQL while new ones ran the new. A
schema change goes into a new revision, which adds its lines to the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import psycopg
import pytest

from eos_airflow.cli.doctor import diagnose
from eos_airflow.ledger.migrate import (
    checksum,
    checksum_of,
    checksum_state,
    down_revision,
    head_revision,
    migrate,
    revision_files,
    script_paths,
    wrapper_checksum,
)
from tests.conftest import ROOT

LEDGER = ROOT / "eos_airflow" / "ledger"
MANIFEST = LEDGER / "migrations" / "SHIPPED.sha256"


def manifest() -> dict[str, str]:
    """path (relative to eos_airflow/ledger) -> sha256, as ``sha256sum`` writes them."""
    entries: dict[str, str] = {}
    for line in MANIFEST.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        digest, path = line.split("  ", 1)
        assert path not in entries, f"{path} is listed twice in {MANIFEST.name}"
        entries[path] = digest
    return entries


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def revision_of(path: str) -> str:
    return path.rsplit("/", 1)[-1][:4]


def test_no_shipped_migration_file_changed():
    changed = [path for path, digest in manifest().items() if sha256(LEDGER / path) != digest]
    assert not changed, (
        f"shipped migration files changed: {', '.join(changed)}. Shipped revisions are frozen "
        "(ledgers migrated before keep the old SQL): restore them and put the change in a new "
        "revision"
    )


def test_every_revision_file_is_in_the_manifest():
    files = {
        path.relative_to(LEDGER).as_posix()
        for pattern in (
            "migrations/versions/[0-9][0-9][0-9][0-9]_*.py",
            "sql/[0-9][0-9][0-9][0-9]_*.sql",
        )
        for path in LEDGER.glob(pattern)
    }
    listed = set(manifest())
    assert not files - listed, (
        f"not in {MANIFEST.relative_to(ROOT)}: {sorted(files - listed)}; add their lines "
        "(cd eos_airflow/ledger && sha256sum FILE...)"
    )
    assert not listed - files, f"listed but missing: {sorted(listed - files)}"
    # Every shipped revision has its wrapper listed; no revision is listed without one.
    wrappers = {revision_of(p) for p in listed if p.startswith("migrations/")}
    assert wrappers == set(script_paths())
    assert {revision_of(p) for p in listed} == wrappers


def test_the_recorded_checksum_covers_the_wrapper_and_the_sql_it_runs():
    listed = manifest()
    for revision, wrapper in script_paths().items():
        files = [p.relative_to(LEDGER).as_posix() for p in revision_files(revision)]
        # What the wrapper runs: itself, then its own revision's SQL file(s).
        assert files[0] == wrapper.relative_to(LEDGER).as_posix()
        assert files[1:] == sorted(p for p in listed if p.startswith(f"sql/{revision}_")), files
        expected = hashlib.sha256(
            "".join(f"{listed[p]}  {p}\n" for p in files).encode()
        ).hexdigest()
        assert checksum(revision) == expected
        assert checksum(revision) != wrapper_checksum(revision) == listed[files[0]]


def test_an_edit_of_the_sql_or_the_wrapper_changes_the_checksum(tmp_path):
    files = revision_files("0008")
    copies = []
    for path in files:
        copy = tmp_path / path.relative_to(LEDGER)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copy)
        copies.append(copy)
    assert checksum_of(copies, tmp_path) == checksum("0008")
    for copy in copies:
        original = copy.read_bytes()
        copy.write_bytes(original.replace(b"v_fence_try integer", b"v_fence_try bigint", 1) + b"\n")
        assert checksum_of(copies, tmp_path) != checksum("0008"), copy.name
        copy.write_bytes(original)


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs coreutils sha256sum")
def test_the_checksum_is_what_sha256sum_says():
    """As documented: cd eos_airflow/ledger && sha256sum WRAPPER SQL... | sha256sum."""
    for revision in script_paths():
        names = [p.relative_to(LEDGER).as_posix() for p in revision_files(revision)]
        listing = subprocess.run(
            ["sha256sum", *names], cwd=LEDGER, capture_output=True, check=True
        ).stdout
        assert hashlib.sha256(listing).hexdigest() == checksum(revision)


# --- ledgers whose revisions were recorded with the earlier checksum (the wrapper's) --------


def checksum_check(dsn: str) -> dict[str, str]:
    with psycopg.connect(dsn) as conn:
        return next(c for c in diagnose(conn, "eos") if c["check"] == "migration checksums")


def test_a_ledger_recorded_with_wrapper_checksums_migrates_and_checks_fine(empty_db: str):
    previous = down_revision(head_revision())
    assert previous is not None
    applied = migrate(empty_db, revision=previous)
    with psycopg.connect(empty_db, autocommit=True) as conn:
        for revision in applied:  # what eos-airflow recorded before checksums covered the SQL
            conn.execute(
                "UPDATE eos.schema_migrations SET checksum = %s WHERE revision = %s",
                [wrapper_checksum(revision), revision],
            )
    assert migrate(empty_db) == [head_revision()]
    with psycopg.connect(empty_db) as conn:
        recorded = dict(conn.execute("SELECT revision, checksum FROM eos.schema_migrations"))
    assert recorded[head_revision()] == checksum(head_revision())
    assert {r: checksum_state(r, c) for r, c in recorded.items()} == {
        **{r: "wrapper" for r in applied},
        head_revision(): "match",
    }
    check = checksum_check(empty_db)
    assert check["status"] == "ok", check
    assert f"{', '.join(applied)} recorded by an earlier eos-airflow" in check["detail"]
    # The CLI says the same, and the other checks did not fail on the old records.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "eos_airflow.cli.main",
            "doctor",
            "--dsn",
            empty_db,
            "--format",
            "json",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    checks = {c["check"]: c for c in json.loads(done.stdout)["checks"]}
    assert checks["migration checksums"] == check


def test_doctor_warns_when_a_recorded_checksum_matches_neither_form(db: str):
    assert checksum_check(db) == {
        "check": "migration checksums",
        "status": "ok",
        "detail": "every applied migration matches its files",
    }
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            "UPDATE eos.schema_migrations SET checksum = %s WHERE revision = '0004'",
            [hashlib.sha256(b"another 0004").hexdigest()],
        )
    check = checksum_check(db)
    assert (check["status"], check["detail"]) == (
        "warn",
        "applied migrations differ from the shipped files: 0004",
    )


def test_the_changelog_records_every_schema_revision():
    rows = {
        line.split("|")[1].strip()
        for line in (ROOT / "CHANGELOG.md").read_text().splitlines()
        if line.startswith("| 0")
    }
    assert rows == set(script_paths()), "CHANGELOG.md: one row per schema revision"
