"""The single-database protocol: claim → run → commit (docs/guarantees.md, "Protocol").

1. **claim** (own short transaction): take the key, or learn that it is committed (skip,
   refuse), owned by a newer try (fenced) or by another live attempt (wait, then claim again).
   The owner holds a session advisory lock while it owns the key.
2. **run**: in one transaction on the same connection, call the user's function with the
   open :class:`Effect`; its return value must encode as JSON.
3. **commit**: in that same transaction, mark the key committed — only if this attempt still
   owns it — and COMMIT. A fenced attempt's transaction rolls back with its writes.
On any failure after the claim, **release** records ``failed`` (or ``fenced``) and frees the key.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import errors as pgerrors

from eos_airflow import failpoints
from eos_airflow.errors import (
    AlreadyCommittedError,
    FencedError,
    KeyInProgressError,
    LedgerSchemaError,
    UserCodeError,
)
from eos_airflow.ledger.queries import query
from eos_airflow.protocol.effect import (
    MAX_RESULT_BYTES,
    Effect,
    Origin,
    Previous,
    check_key,
    encode_result,
)

log = logging.getLogger(__name__)

#: SQLSTATE raised by the ledger's commit function when a newer attempt owns the key.
FENCED_SQLSTATE = "EOS01"
#: How long a claimant waits for another live attempt of the key before giving up with the
#: retryable KeyInProgressError. Long enough to ride out a typical short load; short enough
#: that Airflow's own retry, rather than a blocked worker slot, absorbs a long one.
DEFAULT_WAIT_TIMEOUT = 30.0

#: SQLSTATE classes that another try cannot fix: bad data (22), constraints (23), bad SQL or
#: missing objects and privileges (42), unsupported features (0A), invalid auth/catalog (28, 3D, 3F).
_PERMANENT_SQLSTATE_CLASSES = frozenset({"22", "23", "42", "0A", "28", "3D", "3F"})

_HOST = socket.gethostname()


@dataclass(frozen=True)
class Outcome:
    """What one call of the protocol did."""

    key: str
    action: str  # "committed", "replaced" or "skipped"
    result: Any
    version: int
    attempt: int
    committed_at: datetime | None


def run_effect(
    conn: psycopg.Connection[Any],
    key: str,
    fn: Callable[[Effect], Any],
    *,
    schema: str = "eos",
    attempt: int = 1,
    on_committed: str = "skip",
    origin: Origin | None = None,
    wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
    max_result_bytes: int = MAX_RESULT_BYTES,
) -> Outcome:
    """Run ``fn`` as the effect ``key`` exactly once on ``conn`` (an autocommit connection)."""
    check_key(key)
    origin = origin or Origin()
    owner = uuid.uuid4()
    claim = _claim(conn, schema, key, owner, attempt, origin, on_committed, wait_timeout)
    if claim["action"] == "skip":
        log.info("effect %s is committed (version %s): skipped", key, claim["version"])
        return Outcome(key, "skipped", claim["result"], claim["version"], attempt,
                       claim["committed_at"])

    previous = None
    if claim["prior_state"] == "committed":
        previous = Previous(claim["result"], claim["version"], claim["committed_at"])
    elif claim["prior_state"] == "reopened":  # rare: an operator reopened the key
        entry = _execute(conn, "get_entry", schema, {"key": key}).fetchone()
        previous = Previous(entry["result"], entry["version"], entry["committed_at"])
    event, detail = "failed", {}
    try:
        failpoints.check("after_claim", attempt=attempt)
        with conn.transaction():
            result = fn(Effect(key, attempt, conn, previous, origin))
            payload = encode_result(result, limit=max_result_bytes)
            failpoints.check("before_commit", attempt=attempt)
            committed = _execute(conn, "commit", schema,
                                 {"key": key, "owner": owner, "result": payload}).fetchone()
    except BaseException as exc:
        if isinstance(exc, pgerrors.Error) and exc.sqlstate == FENCED_SQLSTATE:
            event, detail = "fenced", {"step": "commit"}
        else:
            detail = {"error": type(exc).__name__, "message": str(exc)[:500]}
        _release(conn, schema, key, owner, attempt, event, detail)
        if event == "fenced":
            raise FencedError(
                f"effect {key!r}: a newer attempt claimed it while attempt {attempt} ran; "
                "this attempt's writes were rolled back. Nothing to do: the newer attempt "
                "writes the effect (do not retry this one)"
            ) from exc
        if isinstance(exc, pgerrors.Error) and not isinstance(exc, pgerrors.OperationalError):
            error = UserCodeError(
                f"effect {key!r} attempt {attempt}: the database refused a statement "
                f"({exc.sqlstate}: {exc}); nothing was written. {_hint(exc)}"
            )
            error.retryable = (exc.sqlstate or "")[:2] not in _PERMANENT_SQLSTATE_CLASSES
            raise error from exc
        raise
    failpoints.check("after_commit", attempt=attempt)
    action = "replaced" if claim["prior_state"] == "committed" else "committed"
    log.info("effect %s %s (version %s)", key, action, committed["version"])
    return Outcome(key, action, json.loads(payload), committed["version"], attempt,
                   committed["committed_at"])


def _claim(conn: psycopg.Connection[Any], schema: str, key: str, owner: uuid.UUID,
           attempt: int, origin: Origin, on_committed: str, wait_timeout: float
           ) -> dict[str, Any]:
    params = {
        "key": key, "owner": owner, "attempt": attempt, "dag_id": origin.dag_id,
        "task_id": origin.task_id, "run_id": origin.run_id, "map_index": origin.map_index,
        "host": _HOST, "pid": os.getpid(), "on_committed": on_committed,
    }
    deadline = time.monotonic() + wait_timeout
    while True:
        row = _execute(conn, "claim", schema, params).fetchone()
        assert row is not None
        action = row["action"]
        if action in ("run", "skip"):
            return row
        if action == "refuse":
            raise AlreadyCommittedError(
                f"effect {key!r} is already committed (version {row['version']}, "
                f"at {row['committed_at']}) and on_committed='fail'; use "
                "on_committed='skip' to reuse its result or 'replace' to write it again"
            )
        if action == "fenced":
            # fenced by the try that holds the key, or by one that claimed it and is gone
            whose = "owns it" if row["holder"] is not None else "claimed it before"
            raise FencedError(
                f"effect {key!r}: try {row['attempt']} of this task instance {whose}, so try "
                f"{attempt} stops without writing (do not retry this one)"
            )
        _wait_for_owner(conn, schema, key, row, deadline, wait_timeout)


def _wait_for_owner(conn: psycopg.Connection[Any], schema: str, key: str,
                    row: dict[str, Any], deadline: float, wait_timeout: float) -> None:
    """Sleep on the owner's session lock until it ends or the deadline passes."""
    remaining = deadline - time.monotonic()
    holder = row["result"] or {}
    if remaining > 0:
        try:
            with conn.transaction():
                conn.execute("SELECT set_config('lock_timeout', %s, true)",
                             [f"{max(1, int(remaining * 1000))}ms"])
                _execute(conn, "wait_for_owner", schema, {"key": key, "holder": row["holder"]})
            return
        except pgerrors.LockNotAvailable:
            pass
    raise KeyInProgressError(
        f"effect {key!r} is being written by another live attempt (run "
        f"{holder.get('run_id')!r}, try {row['attempt']}, host {holder.get('host')!r}, "
        f"pid {holder.get('pid')}, claimed {holder.get('claimed_at')}); waited "
        f"{wait_timeout:g} s. Retry later (Airflow retries this), or raise wait_timeout"
    )


def _release(conn: psycopg.Connection[Any], schema: str, key: str, owner: uuid.UUID,
             attempt: int, event: str, detail: dict[str, Any]) -> None:
    """Record the failure; never let a failed release hide the original error."""
    try:
        _execute(conn, "release", schema, {"key": key, "owner": owner, "attempt": attempt,
                                           "event": event, "detail": json.dumps(detail)})
    except Exception:  # the original exception is re-raised by the caller
        log.warning("could not record %s for effect %s; the next claim takes the key over",
                    event, key, exc_info=True)
        # The session may still hold the owner's advisory lock, which tells other runs that
        # the owner is alive: end the session so that the key is free to take over.
        conn.close()


def _execute(conn: psycopg.Connection[Any], name: str, schema: str,
             params: dict[str, Any]) -> psycopg.Cursor[Any]:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    try:
        return cur.execute(query(name, schema), params)
    except (pgerrors.UndefinedFunction, pgerrors.InvalidSchemaName, pgerrors.UndefinedTable) as exc:
        if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
            raise  # the user's own statement referenced something missing
        raise LedgerSchemaError(
            f'the ledger schema "{schema}" is missing or incomplete in database '
            f'"{conn.info.dbname}" ({exc.diag.message_primary}); create it with '
            "`eos-airflow db migrate` (same --dsn or --conn-id)"
        ) from exc


def _hint(exc: psycopg.Error) -> str:
    if isinstance(exc, pgerrors.UndefinedTable):
        return "Create the table (or fix its name) before running the task."
    if isinstance(exc, pgerrors.SyntaxError):
        return "Fix the SQL."
    return exc.diag.message_hint or "Fix the statement or the data it reads."


__all__ = ["Outcome", "run_effect"]
