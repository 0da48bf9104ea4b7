"""Table output for pipes and narrow terminals: keys are printed whole, one row per line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from eos_airflow import Ledger, Origin
from tests.conftest import ROOT, create_database, drop_database

ORIGIN = Origin("accounting_close", "load", "manual__1", -1)
KEYS = [f"acc/2026-01-0{d}/region-emea-{d:02d}" for d in range(1, 6)]
DEFAULT = ["key", "state", "attempt", "version", "committed_at"]
WIDE = [
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
BOX = re.compile("[│┃┏┡└]")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def cli(*argv: str, terminal_width: int | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``eos-airflow``; stdout is a pipe, or a terminal of ``terminal_width`` columns."""
    env = {k: v for k, v in os.environ.items() if k not in ("EOS_LEDGER_DSN", "COLUMNS")}
    env.pop("FORCE_COLOR", None)
    env.pop("TTY_COMPATIBLE", None)
    if terminal_width is not None:
        env.update(TTY_COMPATIBLE="1", COLUMNS=str(terminal_width), NO_COLOR="1")
    done = subprocess.run(
        [sys.executable, "-m", "eos_airflow.cli.main", *argv],
        cwd=ROOT,
        env=env,
        text=True,
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert terminal_width is not None or not ANSI.search(done.stdout)
    done.stdout = ANSI.sub("", done.stdout)
    return done


@pytest.fixture(scope="module")
def accounts(pg_admin_dsn: str, template_db: str) -> Iterator[str]:
    name = f"eos_out_{uuid.uuid4().hex[:10]}"
    dsn = create_database(pg_admin_dsn, name, template=template_db)
    try:
        with Ledger(dsn) as ledger:
            for key in KEYS:
                ledger.run(key, lambda eos: {"rows": 3, "note": "x" * 80}, origin=ORIGIN)
        yield dsn
    finally:
        drop_database(pg_admin_dsn, name)


def lines_with(text: str, key: str) -> list[str]:
    return [line for line in text.splitlines() if key in line]


def assert_keys_whole(text: str, keys: list[str] = KEYS) -> None:
    for key in keys:
        assert len(lines_with(text, key)) == 1, (key, text)


def test_piped_ledger_list_is_plain_text_with_whole_keys_one_row_per_line(accounts: str):
    out = cli("ledger", "list", "--dsn", accounts).stdout
    lines = out.splitlines()
    assert lines[0] == f"{len(KEYS)} ledger entries"
    assert lines[1].split() == DEFAULT
    assert len(lines) == 2 + len(KEYS)
    assert not BOX.search(out)
    for key, line in zip(KEYS, lines[2:], strict=True):
        assert line.split()[:4] == [key, "committed", "1", "1"], line
    # grep finds whole keys: what a script filters on
    grep = subprocess.run(
        f"{sys.executable} -m eos_airflow.cli.main ledger list --dsn '{accounts}' | grep acc/2026",
        shell=True,
        cwd=ROOT,
        text=True,
        capture_output=True,
        check=True,
    )
    assert [line.split()[0] for line in grep.stdout.splitlines()] == KEYS

    wide = cli("ledger", "list", "--wide", "--dsn", accounts).stdout.splitlines()
    assert wide[1].split() == WIDE
    assert all("accounting_close" in line and "manual__1" in line for line in wide[2:])


def test_tsv_and_plain_formats(accounts: str):
    tsv = cli("ledger", "list", "--format", "tsv", "--dsn", accounts).stdout.splitlines()
    assert tsv[0].split("\t") == DEFAULT
    assert [line.split("\t")[:2] for line in tsv[1:]] == [[k, "committed"] for k in KEYS]
    plain = cli("ledger", "list", "--format", "plain", "--dsn", accounts, terminal_width=200)
    assert not BOX.search(plain.stdout)
    assert plain.stdout.splitlines()[1].split() == DEFAULT


@pytest.mark.parametrize("width", [60, 45])
def test_narrow_terminal_never_breaks_a_key(accounts: str, width: int):
    out = cli("ledger", "list", "--dsn", accounts, terminal_width=width).stdout
    assert BOX.search(out), out  # a rich table: the terminal was honoured
    assert all(len(line) <= width for line in out.splitlines()), out
    assert_keys_whole(out)
    assert "left out for the terminal's width" in out, out  # a less important column went


def test_narrow_terminal_wide_shows_every_column_with_whole_keys(accounts: str):
    out = cli("ledger", "list", "--wide", "--dsn", accounts, terminal_width=60).stdout
    assert_keys_whole(out)
    for column in WIDE:
        assert column in out.replace("\n", ""), (column, out)


@pytest.mark.parametrize("width", [None, 60])
def test_every_table_command_keeps_keys_whole(accounts: str, width: int | None):
    key = KEYS[0]
    show = cli("ledger", "show", key, "--dsn", accounts, terminal_width=width).stdout
    assert len(lines_with(show, key)) >= 1
    assert all(key in line for line in lines_with(show, key[:8])), show
    stats = cli("ledger", "stats", "--dsn", accounts, terminal_width=width).stdout
    assert len(lines_with(stats, "accounting_close")) == 1, stats
    doctor = subprocess.run(
        [sys.executable, "-m", "eos_airflow.cli.main", "doctor", "--dsn", accounts],
        cwd=ROOT,
        text=True,
        capture_output=True,
        env={**os.environ, **({"TTY_COMPATIBLE": "1", "COLUMNS": str(width)} if width else {})},
        timeout=120,
    ).stdout
    doctor = ANSI.sub("", doctor)
    for check in ("schema revision", "max_prepared_transactions"):
        if check in doctor:
            assert len(lines_with(doctor, check)) == 1, doctor
    outbox = cli("outbox", "status", "--dsn", accounts, terminal_width=width).stdout
    assert "destination" in outbox
    if width is None:
        assert not BOX.search(show + stats + outbox)
        assert all(len(lines_with(show, k)) == 0 for k in KEYS[1:])


HOLD = """
import sys
from eos_airflow import Ledger

def hold(eos):
    print("in-run", flush=True)
    sys.stdin.readline()

with Ledger(sys.argv[1]) as ledger:
    ledger.run(sys.argv[2], hold)
"""


def test_recover_listing_keeps_keys_whole(db: str):
    key = "acc/2026-01-01/region-emea-held-claim-01"
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, db, key],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "in-run"
        piped = cli("recover", "--older-than", "0s", "--dsn", db).stdout
        narrow = cli("recover", "--older-than", "0s", "--dsn", db, terminal_width=60).stdout
    finally:
        child.communicate("go\n", timeout=60)
    assert "claims older than --older-than" in piped
    assert not BOX.search(piped)
    (row,) = lines_with(piped, key)
    assert row.split()[:2] == [key, "1"], piped
    # key, attempt, run_id, host, pid, claimed_at do not fit 60 columns with the key whole:
    # the listing falls back to plain text rather than fold the key
    assert len(lines_with(narrow, key)) == 1, narrow
    assert not BOX.search(narrow), narrow
