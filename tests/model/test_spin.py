"""Exhaustive model checking of the protocols with spin (model/*.pml).

Each model is searched exhaustively twice over:

- a **safety run** without a never claim (``-DSAFETY -DNOCLAIM``): assertions, the model's
  invariant (a monitor process) and **invalid end states** — a run where some process is
  stuck (a deadlock, or a prepared transaction that nothing can finish);
- **LTL runs**, one per never claim (``-N name``; liveness under weak fairness, ``-a -f``).

A correct model must end with 0 errors and a **complete** search: the test fails when pan
says the search was not completed, the depth limit was reached, or memory ran out. Each
flawed variant (-D switch; the earlier or a known-wrong behaviour) must yield a
counterexample: errors > 0, a trail, and — replayed with ``spin -t`` — the violation the
variant is about. spin comes from Debian's `spin` package; without it these tests skip,
unless EOS_REQUIRE_SPIN=1 (CI) turns the skip into a failure.

Run with ``-s`` to see the state counts (they are recorded in model/results.txt and
docs/reliability.md).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

MODELS = Path(__file__).resolve().parents[2] / "model"
DEPTH = 100_000  # pan -m: far above every model's depth; reaching it fails the test
INCOMPLETE = (
    "Search not completed",
    "max search depth too small",
    "out of memory",
    "error: max search depth",
    "aborting",
    "VECTORSZ",
)


def _require_spin() -> None:
    if shutil.which("spin") and shutil.which("gcc"):
        return
    if os.environ.get("EOS_REQUIRE_SPIN") == "1":
        pytest.fail("spin and gcc are required (apt-get install spin gcc)")
    pytest.skip("spin is not installed (apt-get install spin)")


@dataclass
class Search:
    model: str
    run: str  # "safety (no never claim)" or "ltl NAME"
    defines: tuple[str, ...]
    output: str
    errors: int
    states: int
    transitions: int
    depth: int
    seconds: float
    trail: str  # spin -t replay of the counterexample ("" when none)

    @property
    def incomplete(self) -> list[str]:
        return [marker for marker in INCOMPLETE if marker in self.output]

    def summary(self) -> str:
        flags = " ".join(f"-D{d}" for d in self.defines) or "(as designed)"
        return (
            f"{self.model} {self.run} {flags}: {self.states:,} states stored, "
            f"{self.transitions:,} transitions, depth {self.depth}, "
            f"errors {self.errors}, {self.seconds:g} s"
        )


def search(
    model: str, tmp_path: Path, *, ltl: str | None = None, defines: tuple[str, ...] = ()
) -> Search:
    """Compile ``model`` and search it exhaustively: without a never claim (``ltl=None``:
    assertions and invalid end states) or with the never claim ``ltl``."""
    _require_spin()
    shutil.copy(MODELS / model, tmp_path / model)  # the trail's replay reads it there
    flags = [f"-D{d}" for d in defines]
    generated = subprocess.run(
        ["spin", *flags, "-a", model], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert generated.returncode == 0, generated.stdout + generated.stderr
    # safety searches are short: an unoptimised pan compiles 4x faster than it searches slower
    cflags = ["-O0", "-DSAFETY", "-DNOCLAIM"] if ltl is None else ["-O1", "-DNFAIR=4"]
    built = subprocess.run(
        ["gcc", *cflags, "-o", "pan", "pan.c"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    argv = ["./pan", f"-m{DEPTH}"] + ([] if ltl is None else ["-a", "-f", "-N", ltl])
    searched = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    out = searched.stdout + searched.stderr

    def number(pattern: str, cast: type = int) -> float:
        found = re.search(pattern, out)
        assert found, f"pan's report lacks {pattern!r}:\n{out}"
        return cast(found.group(1))

    if ltl is None:  # the run checks what it claims to: assertions and end states, no claim
        assert re.search(r"invalid end states\s+\+", out), out
        assert re.search(r"assertion violations\s+\+", out), out
        assert re.search(
            r"never claim\s+- \(none specified\)|never claim\s+- \(not selected\)", out
        ), out
    else:
        assert re.search(rf"never claim\s+\+ \({re.escape(ltl)}\)", out), out
    trail = ""
    if (tmp_path / f"{model}.trail").exists():
        replay = subprocess.run(
            ["spin", *flags, "-t", "-p", "-g", model],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        trail = replay.stdout
    result = Search(
        model,
        "safety (no never claim)" if ltl is None else f"ltl {ltl}",
        defines,
        out,
        int(number(r"errors: (\d+)")),
        int(number(r"(\d+) states, stored")),
        int(number(r"(\d+) transitions \(")),
        int(number(r"depth reached (\d+)")),
        float(number(r"pan: elapsed time ([\d.e+]+)", float)),
        trail,
    )
    print(f"\nspin: {result.summary()}")
    return result


def verified(model: str, tmp_path: Path, ltl: str | None = None) -> Search:
    """The model as designed: no error, and the search covered every state."""
    result = search(model, tmp_path, ltl=ltl)
    assert result.errors == 0, result.output + result.trail
    assert not result.incomplete, f"incomplete search ({result.incomplete}):\n{result.output}"
    assert result.depth < DEPTH
    return result


def refuted(
    model: str, tmp_path: Path, define: str, *, violation: str, trail_says: tuple[str, ...] = ()
) -> Search:
    """A flawed variant: spin must find a counterexample, of the kind ``violation``
    (pan's report), whose replay shows ``trail_says``."""
    result = search(model, tmp_path, defines=(define,))
    assert result.errors >= 1, result.output
    assert result.trail, f"no trail for the counterexample:\n{result.output}"
    assert violation in result.output, result.output
    for said in trail_says:
        assert said in result.trail, f"{said!r} not in the counterexample:\n{result.trail}"
    return result


# --- ledger.pml: claim / fence / commit of one database ---------------------------------


def test_ledger_model_safety_and_end_states(tmp_path):
    verified("ledger.pml", tmp_path)


def test_ledger_model_never_commits_twice_and_never_commits_a_fenced_try(tmp_path):
    verified("ledger.pml", tmp_path, "at_most_once")


def test_ledger_model_eventually_commits_under_weak_fairness(tmp_path):
    verified("ledger.pml", tmp_path, "eventually_once")


def test_ledger_model_finds_the_flaw_of_row_only_fencing(tmp_path):
    """Without the claim history (schema revisions before 0008) a lower try can commit after
    a higher try claimed the key: the model must find that counterexample."""
    refuted("ledger.pml", tmp_path, "ROW_ONLY_FENCING", violation="i>=max_claimed_try")


# --- twophase.pml: 2PC with recover, a skipping run and the next try ----------------------


def test_twophase_model_safety_and_end_states(tmp_path):
    """Atomicity, no commit without a `commit` decision (a decided-abort txid never
    commits), no participant committing two attempts, a live owner never aborted by others,
    and at the end nothing left prepared with every `commit` committed everywhere."""
    verified("twophase.pml", tmp_path)


def test_twophase_model_safety_and_end_states_with_two_faults(tmp_path):
    """The same with two faults per run (e.g. a lost coordinator session, then a crash)."""
    result = search("twophase.pml", tmp_path, defines=("CRASHES=2",))
    assert result.errors == 0 and not result.incomplete, result.output + result.trail


def test_twophase_model_invariant_as_ltl(tmp_path):
    verified("twophase.pml", tmp_path, "safety")


def test_twophase_model_leaves_no_transaction_in_doubt(tmp_path):
    verified("twophase.pml", tmp_path, "no_in_doubt_left")


LIVE_OWNER_ABORTED = "assertion violated  !((alive["  # assert(!(alive[b] && owner == b + 1))


def test_twophase_model_finds_recover_aborting_a_live_attempt(tmp_path):
    """Grace counted from the claim, owner's liveness not asked (the old recover): recover
    aborts the undecided transaction of the attempt that owns the key and is alive."""
    refuted(
        "twophase.pml",
        tmp_path,
        "GRACE_FROM_CLAIM",
        violation=LIVE_OWNER_ABORTED,
        trail_says=("finisher 4",),
    )


def test_twophase_model_finds_a_skipping_run_aborting_a_live_replace(tmp_path):
    """The old skip path finished every unresolved transaction of the key: it aborts a live
    replace attempt's."""
    refuted(
        "twophase.pml",
        tmp_path,
        "SKIP_ABORTS_LIVE",
        violation=LIVE_OWNER_ABORTED,
        trail_says=("finisher 3", "replacing = 1"),
    )


def test_twophase_model_finds_the_orphans_of_a_non_durable_claim(tmp_path):
    """An asynchronous claim and txid log, lost in a coordinator crash after the
    participants PREPAREd, with recover reading only the log: the prepared transaction is
    never finished (invalid end state: recover cannot end, nothing can finish it)."""
    refuted(
        "twophase.pml",
        tmp_path,
        "NONDURABLE_CLAIM",
        violation="invalid end state",
        trail_says=("coordinator crash lost the log",),
    )


def test_twophase_model_finds_the_claim_path_aborting_a_newer_live_try(tmp_path):
    """The claim path finishing every other transaction of the key (no liveness test): a
    zombie try 1, replacing, scans the participants after try 2 took the key over and
    PREPAREd, and aborts the live owner's transaction."""
    refuted(
        "twophase.pml",
        tmp_path,
        "OWNER_FINISHES_ALL",
        violation=LIVE_OWNER_ABORTED,
        trail_says=("finisher 2",),
    )


def test_twophase_model_finds_the_orphan_of_a_lost_coordinator_session(tmp_path):
    """recover reading only the decision log: an attempt that lost only its coordinator
    session is aborted and marked resolved before it PREPAREs over its live participant
    connections; the orphan prepared transaction is never finished."""
    refuted(
        "twophase.pml",
        tmp_path,
        "RECOVER_LOG_ONLY",
        violation="invalid end state",
        trail_says=("lost its coordinator session", "finisher 4"),
    )


def test_twophase_model_finds_the_flaw_of_an_unlogged_abort(tmp_path):
    """Recovery that rolls an undecided transaction back without logging `abort` first lets
    a late attempt decide `commit` after a participant rolled back."""
    refuted("twophase.pml", tmp_path, "UNLOGGED_ABORT", violation="assertion violated")


# --- threephase.pml: 3PC with the termination protocol ------------------------------------


def test_threephase_model_safety_and_end_states(tmp_path):
    """Crash-stop: atomic, nothing commits before the first participant's pre-commit, a
    logged abort never commits, and the termination protocol leaves nothing prepared."""
    verified("threephase.pml", tmp_path)


def test_threephase_model_invariant_as_ltl(tmp_path):
    verified("threephase.pml", tmp_path, "safety")


def test_threephase_model_leaves_no_transaction_in_doubt(tmp_path):
    verified("threephase.pml", tmp_path, "no_in_doubt_left")


def test_threephase_model_finds_the_unsafety_under_partition(tmp_path):
    """A terminator that reaches only the last participant aborts it while the coordinator
    pre-commits the first: the participants decide differently (docs/twophase.md)."""
    result = refuted("threephase.pml", tmp_path, "PARTITION", violation="assertion violated")
    assert "Terminator" in result.trail and "vote[2] = ABT" in result.trail, result.trail
