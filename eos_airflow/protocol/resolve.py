"""Protocol tier: when the connection breaks during COMMIT: learn from the ledger whether the commit
happened.

A client whose connection breaks after it sent COMMIT cannot know whether the server committed.
Its writes and its ledger commit share one transaction, so the ledger knows: commit() names
the attempt's owner token in its ``committed`` event. From a new connection, the attempt first
waits for the broken session's transaction to end (its row lock on the ledger entry), locks
the entry itself, then looks for that event:

- found: the effect committed; the attempt reports it, as if the reply had arrived;
- not found: nothing committed; still holding the entry's lock, the attempt releases its
  claim (event ``failed``), so a commit() of the broken session that had not reached the
  entry yet is fenced and cannot commit after all; it fails with a retryable error, and the
  next try writes the effect;
- the old transaction is still open after ``wait_timeout`` (the server has not noticed the
  broken connection yet): the outcome stays unknown to this attempt, which fails retryably;
  the next try learns it from the ledger, as any try does.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import psycopg
from psycopg import errors as pgerrors

from eos_airflow.errors import CommitNotDoneError, CommitOutcomeUnknownError, EosError
from eos_airflow.ledger.store import LedgerStore

log = logging.getLogger(__name__)


def commit_outcome(
    connect: Callable[[], psycopg.Connection[Any]],
    schema: str,
    key: str,
    owner: uuid.UUID,
    attempt: int,
    wait_timeout: float,
    cause: BaseException,
) -> tuple[int, datetime | None]:
    """Return ``(version, committed_at)`` if ``owner`` committed ``key``; otherwise release the
    claim and raise :class:`CommitNotDoneError` (or :class:`CommitOutcomeUnknownError`)."""
    try:
        conn = connect()
    except (psycopg.Error, EosError) as exc:
        raise CommitOutcomeUnknownError(
            f"effect {key!r} attempt {attempt}: the connection broke during COMMIT ({cause}) "
            f"and the ledger cannot be reached to ask whether it committed ({exc}); the next "
            "try finds out from the ledger (Airflow retries this)"
        ) from cause
    try:
        conn.autocommit = True
        store = LedgerStore(conn, schema)
        detail = {
            "error": type(cause).__name__,
            "message": str(cause)[:500],
            "step": "commit",
            "resolved": "not committed",
        }
        try:
            with conn.transaction():
                conn.execute(
                    "SELECT set_config('lock_timeout', %s, true)",
                    [f"{max(1, int(wait_timeout * 1000))}ms"],
                )
                found = store.commit_outcome(key, owner, attempt, detail)
        except pgerrors.LockNotAvailable:
            raise CommitOutcomeUnknownError(
                f"effect {key!r} attempt {attempt}: the connection broke during COMMIT "
                f"({cause}) and the server still holds the transaction open after "
                f"{wait_timeout:g} s; the next try finds out from the ledger whether it "
                "committed (Airflow retries this)"
            ) from cause
        if found is not None:
            log.warning(
                "effect %s: the connection broke during COMMIT; the ledger shows the "
                "commit happened (version %s)",
                key,
                found.version,
            )
            return found.version, found.committed_at
    finally:
        conn.close()
    raise CommitNotDoneError(
        f"effect {key!r} attempt {attempt}: the connection broke during COMMIT ({cause}); "
        "the ledger shows that it did not commit, so nothing was written. Retry (Airflow's "
        "next try writes the effect)"
    ) from cause
