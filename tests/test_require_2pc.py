"""2PC tests on a server without prepared transactions: skipped on a developer's machine,
a failure in CI (EOS_REQUIRE_2PC=1, set by .ci/run), so that a misconfigured server cannot
silently drop the multi-database protocol from a green run."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.conftest import ROOT, prepared_transactions_or_skip
from tests.faults.server import LocalServer


@pytest.fixture(scope="module")
def no_2pc_server() -> Iterator[LocalServer]:
    own = LocalServer({"max_prepared_transactions": "0"}).init().start()
    try:
        yield own
    finally:
        own.destroy()


def test_the_helper_skips_by_default_and_fails_when_2pc_is_required(no_2pc_server, monkeypatch):
    monkeypatch.delenv("EOS_REQUIRE_2PC", raising=False)
    with pytest.raises(pytest.skip.Exception, match="max_prepared_transactions = 0"):
        prepared_transactions_or_skip(no_2pc_server.dsn())
    monkeypatch.setenv("EOS_REQUIRE_2PC", "1")
    with pytest.raises(
        pytest.fail.Exception,
        match="EOS_REQUIRE_2PC=1: the test server has max_prepared_transactions = 0",
    ):
        prepared_transactions_or_skip(no_2pc_server.dsn())


def test_the_helper_lets_a_server_with_slots_through(pg_admin_dsn, monkeypatch):
    monkeypatch.setenv("EOS_REQUIRE_2PC", "1")
    prepared_transactions_or_skip(pg_admin_dsn)  # the suite's server has slots


@pytest.mark.parametrize("require,outcome", [("0", "1 skipped"), ("1", "1 error")])
def test_a_2pc_test_module_obeys_it(no_2pc_server, require, outcome):
    """A real 2PC test, run by pytest against the server without slots."""
    env = {
        **os.environ,
        "EOS_TEST_DSN": no_2pc_server.dsn(),
        "EOS_REQUIRE_2PC": require,
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-rs",
            "tests/protocol/test_twophase.py::"
            "test_a_caught_error_in_one_participant_is_not_prepared_as_if_it_worked",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert outcome in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
    assert "max_prepared_transactions = 0" in done.stdout
    assert done.returncode == (0 if require == "0" else 1)


def test_ci_requires_2pc():
    assert "export EOS_REQUIRE_2PC=1" in (ROOT / ".ci" / "run").read_text()
