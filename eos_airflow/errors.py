"""Errors tier: every error eos-airflow raises, and the ledger's SQLSTATEs.

Every error derives from :class:`EosError` and says what happened and what to do next.
``retryable`` tells the Airflow adapters whether another try can succeed: their retry policy
(``EosRetryPolicy``, eos_airflow/operators/retry.py) fails a task at once on a permanent error
and retries a retryable one. Retryability is
a property of the class (for errors from the database, of the SQLSTATE): nothing sets it on
an instance.

The ledger's functions raise their own SQLSTATEs (``EOS01``...); :data:`LEDGER_SQLSTATES`
registers each to the error class it becomes and what it means, and
:func:`ledger_error_class` reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple


class EosError(Exception):
    """Root of every error raised by eos-airflow."""

    retryable: bool = False


class LedgerSchemaError(EosError):
    """The ledger schema is missing, outdated or written by a newer eos-airflow."""


class ConfigurationError(EosError, ValueError):
    """A connection, option or argument is invalid. Also a :class:`ValueError`: a bad operator
    argument fails the DAG file's import, as Airflow expects of bad arguments."""


class BadKeyError(ConfigurationError):
    """An effect key is empty, too long, contains control characters or failed to render."""


class PoolingError(ConfigurationError):
    """The ledger connection goes through a connection pooler that cannot keep the owner's
    session (transaction or statement pooling, or a pooler not declared to pool sessions):
    the advisory lock that tells other runs "the owner is alive" would outlive the owner or
    move to another client. Messages start with ``EOS10``."""


class ResultError(EosError):
    """The function's return value cannot be stored in the ledger (not JSON, or too large)."""


class FencedError(EosError):
    """A newer attempt claimed the key: this attempt's writes were rolled back; do not retry it."""


class LostClaimError(EosError):
    """The key was released while the attempt ran (not taken by another attempt): its writes
    were rolled back; retry it."""

    retryable = True


class KeyInProgressError(EosError):
    """Another live attempt holds the key; retry later (the key is not lost)."""

    retryable = True


class AlreadyCommittedError(EosError):
    """The key is committed and ``on_committed="fail"`` forbids running it again."""


class FingerprintMismatchError(EosError):
    """The key is committed from other inputs than this attempt's (its input fingerprint
    differs) and ``on_mismatch="fail"`` refuses to skip. Not retried: the inputs decide."""


class UserCodeError(EosError):
    """The effect's SQL or function failed; its writes were rolled back.

    With ``sqlstate`` (the database refused a statement) another try can succeed unless the
    SQLSTATE's class is permanent (:func:`sqlstate_retryable`); without it, the class's
    ``default_retryable`` decides."""

    #: whether another try can succeed when no SQLSTATE tells
    default_retryable = True

    def __init__(self, message: str = "", *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate

    @property
    def retryable(self) -> bool:
        if self.sqlstate is not None:
            return sqlstate_retryable(self.sqlstate)
        return self.default_retryable

    @retryable.setter
    def retryable(self, value: bool) -> None:
        # an instance cannot say otherwise: the class and the SQLSTATE decide
        raise AttributeError(f"{type(self).__name__}.retryable follows the SQLSTATE")


class MisuseError(UserCodeError):
    """The function used the effect's transaction in a way the protocol forbids (it called
    ``commit()``/``rollback()`` on ``eos.conn`` or ended the transaction with SQL); its
    writes were rolled back. Another try fails the same way: fix the code."""

    default_retryable = False


class ParticipantError(UserCodeError):
    """A participant of a multi-database effect refused a statement or PREPARE; nothing was
    committed anywhere."""

    default_retryable = False  # the same function fails the same way


class InDoubtError(EosError):
    """The commit decision's fate is unknown (the coordinator became unreachable); the next
    attempt or ``eos-airflow recover`` finishes the prepared transactions."""

    retryable = True


class FailpointError(EosError):
    """An injected failure (``EOS_FAILPOINTS``) fired; used only in fault-injection runs."""

    retryable = True


class LedgerIntegrityError(EosError):
    """``ledger verify`` found an event whose hash chain does not hold."""


class HorizonTimeoutError(EosError):
    """An incremental copy waited longer than ``horizon_timeout`` for source transactions that
    may hold drawn sequence values; nothing was copied; retry, or end those transactions."""

    retryable = True


class CommitOutcomeUnknownError(EosError):
    """The connection broke during COMMIT and the ledger could not be asked in time."""

    retryable = True


class CommitNotDoneError(EosError):
    """The connection broke during COMMIT, and the ledger shows that nothing committed."""

    retryable = True


class MessageError(EosError):
    """A message cannot go into the outbox or be loaded: payload not JSON, bad destination."""


class KafkaError(EosError):
    """Kafka reported an error while consuming; nothing was written, a retry reads again."""

    retryable = True


class KafkaDataLostError(KafkaError):
    """Messages after the stored offset are gone from the broker (retention): nothing was
    written; a retry cannot bring them back."""

    retryable = False


class DeliveryError(EosError):
    """A broker did not accept a batch; the messages stay in the outbox and are re-sent."""

    retryable = True


class LakehouseConflictError(EosError):
    """Concurrent commits to a lakehouse table (Iceberg, Delta) kept beating this effect's
    commit, or changed what it depended on (the files an overwrite replaces, a Delta
    transaction marker of the same effect); nothing of the effect was committed. Retry: the next try applies the change to the table as it is then."""

    retryable = True


class LakehouseStorageError(EosError):
    """A lakehouse table's storage (object store or file system) refused a request or could
    not be reached; nothing of the effect was committed. Retry once the storage answers
    (Airflow retries this); check the location and its settings if it persists."""

    retryable = True


class PermissionDenied(EosError):
    """The connected role may not do what the command asked."""


class DatabaseUnavailableError(EosError):
    """The database cannot be reached (down, wrong address, refused credentials)."""

    retryable = True


#: SQLSTATE classes no retry can fix: bad data (22), constraint violations (23), syntax or
#: access rules (42), unsupported features (0A), authorization (28), unknown catalog or
#: schema (3D, 3F).
PERMANENT_SQLSTATE_CLASSES = frozenset({"22", "23", "42", "0A", "28", "3D", "3F"})


def sqlstate_retryable(sqlstate: str | None) -> bool:
    """Whether another try can succeed after a database error with this SQLSTATE."""
    return (sqlstate or "")[:2] not in PERMANENT_SQLSTATE_CLASSES


class LedgerCode(NamedTuple):
    """One of the ledger's own SQLSTATEs: the error it becomes and what it means."""

    error: type[EosError]
    meaning: str


#: SQLSTATE of the ledger's fenced steps (commit, checkpoint, resume, outbox, offsets, decide).
FENCED = "EOS01"
#: The hash-chained events refused an UPDATE, DELETE or TRUNCATE.
APPEND_ONLY = "EOS02"
#: reopen(): no ledger entry for the key.
NO_SUCH_KEY = "EOS04"
#: reopen(): the key is not committed, or an attempt holds it.
NOT_REOPENABLE = "EOS05"
#: twophase_decide(): recovery decided (or forgot) the transaction before the attempt.
DECIDED_ALREADY = "EOS07"
#: twophase_resolved(): the outcome contradicts the decision.
OUTCOME_CONTRADICTS = "EOS08"
#: release(): the event is not one of failed, fenced, skipped.
BAD_RELEASE_EVENT = "EOS09"
#: A pooler that cannot keep the owner's session (raised by the protocol, not by SQL).
POOLED_SESSION = "EOS10"
#: An event's detail is not a JSON object of at most 8 kB, or on_mismatch is unknown (0013).
BAD_DETAIL = "EOS11"

#: Every SQLSTATE of eos-airflow (``sql/schema.sql`` raises all but ``EOS10``), registered
#: once to the error class it becomes.
LEDGER_SQLSTATES: Mapping[str, LedgerCode] = {
    FENCED: LedgerCode(FencedError, "a newer attempt (or recovery) took the key: fenced"),
    APPEND_ONLY: LedgerCode(LedgerIntegrityError, "ledger events are append-only"),
    NO_SUCH_KEY: LedgerCode(ConfigurationError, "no ledger entry for the key"),
    NOT_REOPENABLE: LedgerCode(
        ConfigurationError, "only a committed key with no running attempt can be reopened"
    ),
    DECIDED_ALREADY: LedgerCode(InDoubtError, "recovery decided the transaction first"),
    OUTCOME_CONTRADICTS: LedgerCode(
        LedgerIntegrityError, "a transaction's outcome contradicts its decision"
    ),
    BAD_RELEASE_EVENT: LedgerCode(
        ConfigurationError, "release() records failed, fenced or skipped only"
    ),
    POOLED_SESSION: LedgerCode(PoolingError, "the pooler cannot keep the owner's session"),
    BAD_DETAIL: LedgerCode(
        ConfigurationError, "an event's detail is a JSON object of at most 8 kB"
    ),
}


def ledger_sqlstate(exc: BaseException) -> str | None:
    """The ledger SQLSTATE carried by ``exc`` (a database error), or None."""
    sqlstate = getattr(exc, "sqlstate", None)
    return sqlstate if sqlstate in LEDGER_SQLSTATES else None


def ledger_error_class(exc: BaseException) -> type[EosError] | None:
    """The error class :data:`LEDGER_SQLSTATES` registers for ``exc``'s SQLSTATE, or None."""
    code = ledger_sqlstate(exc)
    return None if code is None else LEDGER_SQLSTATES[code].error


def sql_hint(exc: Any) -> str:
    """What to do about a statement of the user's that the database refused."""
    sqlstate = getattr(exc, "sqlstate", None) or ""
    if sqlstate == "42P01":  # undefined_table
        return "Create the table (or fix its name) before running the task."
    if sqlstate == "42601":  # syntax_error
        return "Fix the SQL."
    diag = getattr(exc, "diag", None)
    return (diag.message_hint if diag is not None else None) or (
        "Fix the statement or the data it reads."
    )
