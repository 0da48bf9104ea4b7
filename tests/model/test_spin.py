"""Exhaustive model checking of the protocols with spin (model/*.pml).

Each model is compiled and searched exhaustively; the test asserts that the search found no
error, and that the search can fail: the variant of the model with the flaw it guards against
(-D switch) yields a counterexample. spin comes from Debian's `spin` package; without it these
tests skip, unless EOS_REQUIRE_SPIN=1 (CI) turns the skip into a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

MODELS = Path(__file__).resolve().parents[2] / "model"


def _require_spin() -> None:
    if shutil.which("spin") and shutil.which("gcc"):
        return
    if os.environ.get("EOS_REQUIRE_SPIN") == "1":
        pytest.fail("spin and gcc are required (apt-get install spin gcc)")
    pytest.skip("spin is not installed (apt-get install spin)")


def check(model: str, claim: str, tmp_path: Path, *, defines: tuple[str, ...] = (),
          liveness: bool = False) -> dict[str, object]:
    """Run spin's exhaustive search of ``claim`` in ``model``; return what pan reported."""
    _require_spin()
    source = MODELS / model
    generated = subprocess.run(["spin", *(f"-D{d}" for d in defines), "-a", str(source)],
                               cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert generated.returncode == 0, generated.stdout + generated.stderr
    built = subprocess.run(["gcc", "-O2", "-DNFAIR=4", "-o", "pan", "pan.c"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    argv = ["./pan", "-m1000000"] + (["-a", "-f"] if liveness else []) + ["-N", claim]
    searched = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    out = searched.stdout
    errors = int(re.search(r"errors: (\d+)", out).group(1))
    states = int(re.search(r"(\d+) states, stored", out).group(1))
    return {"errors": errors, "states": states, "output": out,
            "violation": "assertion violated" in out or "acceptance cycle" in out}


def test_ledger_model_never_commits_twice_and_never_commits_a_fenced_try(tmp_path):
    result = check("ledger.pml", "at_most_once", tmp_path)
    assert result["errors"] == 0, result["output"]
    assert "search depth too small" not in result["output"]
    print(f"\nledger.pml at_most_once + fencing asserts: {result['states']:,} states, 0 errors")


def test_ledger_model_eventually_commits_under_weak_fairness(tmp_path):
    result = check("ledger.pml", "eventually_once", tmp_path, liveness=True)
    assert result["errors"] == 0, result["output"]
    print(f"\nledger.pml eventually_once: {result['states']:,} states, 0 errors")


def test_ledger_model_finds_the_flaw_of_row_only_fencing(tmp_path):
    """Without the claim history (schema revisions before 0008) a lower try can commit after
    a higher try claimed the key: the model must find that counterexample."""
    result = check("ledger.pml", "at_most_once", tmp_path, defines=("ROW_ONLY_FENCING",))
    assert result["errors"] >= 1 and result["violation"], result["output"]
    assert "i>=max_claimed_try" in result["output"]


def test_twophase_model_is_atomic_and_never_commits_two_attempts(tmp_path):
    result = check("twophase.pml", "atomicity", tmp_path)
    assert result["errors"] == 0, result["output"]
    print(f"\ntwophase.pml atomicity: {result['states']:,} states, 0 errors")


def test_twophase_model_leaves_no_transaction_in_doubt(tmp_path):
    result = check("twophase.pml", "no_in_doubt_left", tmp_path, liveness=True)
    assert result["errors"] == 0, result["output"]
    print(f"\ntwophase.pml no_in_doubt_left: {result['states']:,} states, 0 errors")


def test_twophase_model_finds_the_flaw_of_an_unlogged_abort(tmp_path):
    """Recovery that rolls back an undecided transaction without logging `abort` first lets a
    late attempt decide `commit` after one participant rolled back: a counterexample."""
    result = check("twophase.pml", "atomicity", tmp_path, defines=("UNLOGGED_ABORT",))
    assert result["errors"] >= 1 and result["violation"], result["output"]
