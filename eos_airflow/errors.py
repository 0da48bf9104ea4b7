"""Errors raised by eos-airflow.

Every error derives from :class:`EosError` and says what happened and what to do next.
``retryable`` tells the Airflow adapters whether another try can succeed: permanent errors
are raised to Airflow as ``AirflowFailException`` so it does not retry them.
"""

from __future__ import annotations


class EosError(Exception):
    """Root of every error raised by eos-airflow."""

    retryable: bool = False


class LedgerSchemaError(EosError):
    """The ledger schema is missing, outdated or written by a newer eos-airflow."""


class ConfigurationError(EosError):
    """A connection, option or argument is invalid."""


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


class UserCodeError(EosError):
    """The effect's SQL or function failed; its writes were rolled back."""

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
