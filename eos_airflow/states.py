"""Errors tier: the words of the ledger, each spelled once: entry states, event kinds, what a
call of the protocol did, and the ``on_committed`` choices.

Each is a :class:`~enum.StrEnum`: members equal their strings, so they compare with, print as
and encode to JSON as the plain words the ledger stores (``EntryState.COMMITTED ==
"committed"``). The protocol, the CLI, the audit page and the table definitions all take
their lists from here.
"""

from __future__ import annotations

from enum import StrEnum

from eos_airflow.errors import ConfigurationError


class EntryState(StrEnum):
    """Lifecycle of an effect key (``ledger.state``)."""

    RUNNING = "running"  #: an attempt claimed the key and has not committed or failed yet
    COMMITTED = "committed"  #: an attempt's writes and this mark committed in one transaction
    FAILED = "failed"  #: the last attempt rolled back; the next claim may run the key again
    REOPENED = "reopened"  #: an operator reopened a committed key: the next claim runs it


class EventKind(StrEnum):
    """Kinds of audit events (``ledger_events.event``); each protocol decision appends one."""

    CLAIMED = "claimed"  #: an attempt took the key (detail: whose claim it replaced)
    COMMITTED = "committed"  #: the effect committed (first version)
    REPLACED = "replaced"  #: on_committed="replace" committed a new version
    SKIPPED = "skipped"  #: the key was committed already; the user's code did not run
    FENCED = "fenced"  #: a newer attempt owned the key; this attempt could not claim or commit
    FAILED = "failed"  #: the attempt's transaction rolled back (error in user code or SQL)
    REOPENED = "reopened"  #: an operator reopened a committed key (detail: reason, by)
    CHECKPOINT = "checkpoint"  #: a chunk committed with its recovery point (seq, rows)
    RESUMED = "resumed"  #: an attempt continues a chunked effect after its newest recovery point
    OFFSETS = "offsets"  #: the effect advanced source offsets (detail: each source's from, to)
    PREPARED = "prepared"  #: every participant of a multi-database effect prepared
    DECIDED = "decided"  #: the coordinator decided commit (the commit point)
    ABORTED = "aborted"  #: a multi-database transaction was decided abort
    RECOVERED = "recovered"  #: recovery finished an in-doubt multi-database transaction
    PRUNED = "pruned"  #: ledger gc removed the key's old events (detail: through_seq, hash)
    MISMATCH = "mismatch"  #: a skipping attempt's inputs differ from the committed version's
    ANNOUNCED = "announced"  #: the committed version was reported to Airflow as asset events


class Action(StrEnum):
    """What one call of the protocol did (``Outcome.action``)."""

    COMMITTED = "committed"  #: the function ran and its effect committed (first version)
    REPLACED = "replaced"  #: the function ran again and superseded the committed version
    SKIPPED = "skipped"  #: the key was committed: the stored result, the function not run
    #: several databases: an earlier attempt's transaction had committed on the participants;
    #: this attempt recorded it and returns that result without running the function
    RECOVERED = "recovered"


class OnCommitted(StrEnum):
    """What an attempt does when its key is committed already."""

    SKIP = "skip"  #: return the stored result without running the function
    REPLACE = "replace"  #: run again and atomically supersede the committed version
    FAIL = "fail"  #: refuse (AlreadyCommittedError)


def check_on_committed(value: object) -> OnCommitted:
    """``value`` as an :class:`OnCommitted`, or the one error every entry raises for a bad
    ``on_committed`` (a :class:`~eos_airflow.errors.ConfigurationError`, also a ValueError)."""
    if isinstance(value, str) and value in {c.value for c in OnCommitted}:
        return OnCommitted(value)
    raise ConfigurationError(
        f"on_committed={value!r} is not valid; choose one of {', '.join(OnCommitted)}"
    )


class OnMismatch(StrEnum):
    """What a skipping attempt does when the committed version was made from other inputs
    (its input fingerprint differs from the attempt's)."""

    WARN = "warn"  #: skip, log a warning and record a ``mismatch`` event
    FAIL = "fail"  #: refuse (FingerprintMismatchError, not retried)
    REPLACE = "replace"  #: run again and supersede the committed version


def check_on_mismatch(value: object) -> OnMismatch:
    """``value`` as an :class:`OnMismatch`, else a
    :class:`~eos_airflow.errors.ConfigurationError`."""
    if isinstance(value, str) and value in {c.value for c in OnMismatch}:
        return OnMismatch(value)
    raise ConfigurationError(
        f"on_mismatch={value!r} is not valid; choose one of {', '.join(OnMismatch)}"
    )


def check_attempt(value: object) -> int:
    """``value`` if it is a try number (an integer >= 1), else :class:`ConfigurationError`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigurationError(f"attempt must be an integer >= 1, got {value!r}")
    return value


__all__ = [
    "Action",
    "EntryState",
    "EventKind",
    "OnCommitted",
    "check_attempt",
    "check_on_committed",
]
