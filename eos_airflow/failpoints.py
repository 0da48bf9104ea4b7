"""Errors tier: fault injection at named protocol steps, off unless ``EOS_FAILPOINTS`` is set.

``EOS_FAILPOINTS="after_commit=exit,before_commit=raise,after_claim=sleep:2.5"``:

- ``raise``: raise :class:`~eos_airflow.errors.FailpointError` at that step;
- ``exit``: end the process at once with ``os._exit(EXIT_CODE)`` (no cleanup, like SIGKILL);
- ``sleep:SECONDS``: pause, e.g. to let a newer attempt claim the key meanwhile.

A process can watch its failpoints fire with :func:`set_observer` (the crash matrix's forked
children report each firing to the test, as evidence that the fault really happened).

An optional ``@N`` suffix on the step fires only on attempt N (``after_commit@1=exit``), so a
retry of the same task runs clean. An optional ``#K`` suffix fires only the K-th time this
process reaches the step (``after_chunk@1#7=exit``: attempt 1 dies after its 7th chunk).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from eos_airflow.errors import ConfigurationError, FailpointError

#: Steps of the single-database protocol (docs/guarantees.md names them).
STEPS = frozenset(
    {
        "after_claim",
        "before_commit",
        "after_commit",
        # chunked effects: a chunk's recovery point is written / it committed
        "before_chunk_commit",
        "after_chunk",
        # outbox relay: batch sent and acknowledged, not yet marked delivered;
        # Kafka ingest: batch polled, nothing written yet
        "after_send",
        "after_poll",
        # several databases (docs/twophase.md): the first participant prepared /
        # the commit decision is logged / the first COMMIT PREPARED ran /
        # (3PC) every participant recorded its pre-commit
        "after_prepare",
        "after_decision",
        "after_first_commit_prepared",
        "after_precommit",
        # eos.delta(): Delta's commit (with the effect's transaction marker) is done, the
        # ledger's is not
        "after_delta_commit",
    }
)
#: Exit status used by ``exit``; 137 is what a shell reports for SIGKILL.
EXIT_CODE = 137

#: In-process hooks by step, for tests that hold attempts at a step (barriers). Set with
#: :func:`set_hook`; each hook receives the attempt number.
_hooks: dict[str, Callable[[int | None], None]] = {}
#: Called as ``observer(step, action, attempt)`` when a configured failpoint fires, before
#: its action runs (so an ``exit`` is observed too). Set with :func:`set_observer`.
_observer: Callable[[str, str, int | None], None] | None = None
#: How often this process reached each step (for ``#K``).
_hits: dict[str, int] = {}
# a forked child is a new process: it counts its own hits from zero
os.register_at_fork(after_in_child=_hits.clear)


def set_hook(step: str, hook: Callable[[int | None], None] | None) -> None:
    """Call ``hook(attempt)`` whenever a thread of this process reaches ``step`` (None clears)."""
    if step not in STEPS:
        raise ConfigurationError(f"unknown failpoint step {step!r}; known: {sorted(STEPS)}")
    if hook is None:
        _hooks.pop(step, None)
    else:
        _hooks[step] = hook


def set_observer(observer: Callable[[str, str, int | None], None] | None) -> None:
    """Call ``observer(step, action, attempt)`` whenever a failpoint of ``EOS_FAILPOINTS``
    fires in this process, just before its action (``raise``, ``exit``, ``sleep:S``) runs;
    None clears it. Steps that are reached without firing are not reported."""
    global _observer
    _observer = observer


def _parse(spec: str) -> dict[tuple[str, int | None, int | None], str]:
    actions: dict[tuple[str, int | None, int | None], str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        step, sep, action = item.partition("=")
        step, _, nth = step.strip().partition("#")
        step, _, only = step.partition("@")
        action = action.strip()
        if not sep or not (action in ("raise", "exit") or action.startswith("sleep:")):
            raise ConfigurationError(
                f"EOS_FAILPOINTS entry {item!r} is not STEP=ACTION; "
                "ACTION is raise, exit or sleep:SECONDS (e.g. after_commit=exit)"
            )
        if step.strip() not in STEPS:  # a typo would otherwise inject nothing, silently
            raise ConfigurationError(
                f"EOS_FAILPOINTS entry {item!r}: unknown step {step.strip()!r}; known steps: "
                f"{', '.join(sorted(STEPS))}"
            )
        if action.startswith("sleep:"):
            try:
                float(action[6:])
            except ValueError:
                raise ConfigurationError(
                    f"EOS_FAILPOINTS entry {item!r}: sleep needs seconds, e.g. sleep:2.5"
                ) from None
        if not (only or "1").isdigit() or not (nth or "1").isdigit():
            raise ConfigurationError(
                f"EOS_FAILPOINTS entry {item!r}: @ATTEMPT and #HIT are whole numbers "
                "(e.g. after_commit@1=exit, after_chunk#3=raise)"
            )
        actions[(step, int(only) if only else None, int(nth) if nth else None)] = action
    return actions


def check(step: str, *, attempt: int | None = None) -> None:
    """Fire the failpoint configured for ``step`` (and ``attempt``), if any."""
    hook = _hooks.get(step)
    if hook is not None:
        hook(attempt)
    spec = os.environ.get("EOS_FAILPOINTS")
    if not spec:
        return
    actions = _parse(spec)
    hit = _hits[step] = _hits.get(step, 0) + 1
    action = (
        actions.get((step, attempt, hit))
        or actions.get((step, None, hit))
        or actions.get((step, attempt, None))
        or actions.get((step, None, None))
    )
    if action is None:
        return
    if _observer is not None:
        _observer(step, action, attempt)
    if action == "raise":
        raise FailpointError(f"failpoint {step} fired (EOS_FAILPOINTS={spec!r})")
    if action == "exit":
        print(f"eos-airflow: failpoint {step} exits the process", file=sys.stderr, flush=True)
        os._exit(EXIT_CODE)
    time.sleep(float(action[6:]))
