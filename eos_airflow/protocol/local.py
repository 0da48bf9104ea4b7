"""Protocol tier: the single-database protocol: claim → run → commit (docs/guarantees.md,
"Protocol").

1. **claim** (own short transaction): take the key, or learn that it is committed (skip,
   refuse), owned by a newer try (fenced) or by another live attempt (wait, then claim again).
   The owner holds a session advisory lock while it owns the key.
2. **run**: in one transaction on the same connection, call the user's function with the
   open :class:`Effect`; its return value must encode as JSON.
3. **commit**: in that same transaction, mark the key committed — only if this attempt still
   owns it — and COMMIT. A fenced attempt's transaction rolls back with its writes.
On any failure after the claim, **release** records ``failed`` (or ``fenced``) and frees the key.

A chunked effect (``eos.checkpoints``, protocol/checkpoints.py) commits inside step 2: each
chunk ends with **checkpoint** (fenced like commit, the key stays owned) and COMMIT, and a
retry starts with **resume** after the newest recovery point. Offsets staged on
``eos.offsets`` (protocol/offsets.py) are written just before each checkpoint and the commit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import errors as pgerrors

from eos_airflow import failpoints
from eos_airflow.errors import (
    AlreadyCommittedError,
    CommitNotDoneError,
    CommitOutcomeUnknownError,
    FencedError,
    FingerprintMismatchError,
    KeyInProgressError,
    LostClaimError,
    MisuseError,
    ResultError,
    UserCodeError,
    ledger_error_class,
    sql_hint,
)
from eos_airflow.ledger.keys import check_key
from eos_airflow.ledger.store import Claim, ClaimAction, Committed, LedgerStore, RecoveryPoint
from eos_airflow.protocol.effect import (
    MAX_RESULT_BYTES,
    Effect,
    Origin,
    Previous,
    encode_result,
)
from eos_airflow.protocol.pooling import check_session
from eos_airflow.protocol.resolve import commit_outcome
from eos_airflow.states import Action, EntryState, check_on_mismatch

log = logging.getLogger(__name__)

#: How long a claimant waits for another live attempt of the key before giving up with the
#: retryable KeyInProgressError. Long enough to ride out a typical short load; short enough
#: that Airflow's own retry, rather than a blocked worker slot, absorbs a long one.
DEFAULT_WAIT_TIMEOUT = 30.0


_HOST = socket.gethostname()


@dataclass(frozen=True)
class Outcome:
    """What one call of the protocol did."""

    key: str
    action: Action  # committed, replaced, skipped or (several databases) recovered
    result: Any
    version: int
    attempt: int
    committed_at: datetime | None
    #: On a skip: the committed version was made from other inputs (a ``mismatch`` event
    #: was recorded); the committed fingerprint, else None.
    mismatch: str | None = None
    #: Set by the Airflow adapters when the task reports asset events: how the version was
    #: made (committed, replaced) when this run announced it, else None.
    announced: str | None = None


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
    reconnect: Callable[[], psycopg.Connection[Any]] | None = None,
    fingerprint: str | None = None,
    on_mismatch: str = "warn",
) -> Outcome:
    """Run ``fn`` as the effect ``key`` exactly once on ``conn`` (an autocommit connection).

    ``reconnect`` opens a new connection to the same database: when the connection breaks
    during COMMIT, the attempt asks the ledger through it whether the commit happened
    (protocol/resolve.py); without it, the next try finds out.

    ``fingerprint`` (of the attempt's inputs, protocol/fingerprints.py) is stored with the
    version it commits; a skip compares it with the committed version's and on a difference
    does what ``on_mismatch`` says: ``"warn"`` (skip, with a ``mismatch`` event),
    ``"fail"`` (:class:`FingerprintMismatchError`) or ``"replace"`` (run again as
    ``on_committed="replace"``).
    """
    check_key(key)
    check_on_mismatch(on_mismatch)
    origin = origin or Origin()
    owner = uuid.uuid4()
    # The claim, its COMMIT and the effect's BEGIN travel in one round trip.
    claim = claim_key(
        conn, schema, key, owner, attempt, origin, on_committed, wait_timeout, begin=True
    )
    if claim.action == ClaimAction.SKIP:
        log.info("effect %s is committed (version %s): skipped", key, claim.version)
        version = claim.version or 0
        mismatch = None
        if fingerprint is not None:
            mismatch = check_fingerprint(
                conn, schema, key, version, fingerprint, attempt, origin, on_mismatch
            )
        if mismatch is not None and on_mismatch == "replace":
            return run_effect(
                conn,
                key,
                fn,
                schema=schema,
                attempt=attempt,
                on_committed="replace",
                origin=origin,
                wait_timeout=wait_timeout,
                max_result_bytes=max_result_bytes,
                reconnect=reconnect,
                fingerprint=fingerprint,
            )
        return Outcome(
            key, Action.SKIPPED, claim.result, version, attempt, claim.committed_at, mismatch
        )

    event, detail = "failed", {}
    session = Session(conn, schema, key, owner, attempt)
    try:
        previous = previous_version(conn, schema, key, claim)
        failpoints.check("after_claim", attempt=attempt)
        eos = Effect(
            key,
            attempt,
            conn,
            previous,
            origin,
            schema=schema,
            session=session,
            # a new key only: a committed key stays committed while attempts to replace it
            # fail, and one of them may have written to a Delta table
            first_of_version=claim.prior_state is None,
        )
        with _own_transaction(conn, key):
            result = fn(eos)
        payload = encode_result(result, limit=max_result_bytes)
        failpoints.check("before_commit", attempt=attempt)
        if eos.offsets_in_use is not None:
            eos.offsets_in_use.flush()
        try:
            committed = session.commit(payload, commit_detail(eos), fingerprint)
        except psycopg.OperationalError as exc:  # did COMMIT happen? the ledger knows
            if reconnect is None or _server_refused(conn, exc):
                raise
            conn.close()
            version, committed_at = commit_outcome(
                reconnect, schema, key, owner, attempt, wait_timeout, exc
            )
            committed = Committed(version, committed_at)
    except (CommitNotDoneError, CommitOutcomeUnknownError):
        raise  # resolved (and released) through a new connection
    except BaseException as exc:
        session.rollback()
        holder = None
        if ledger_error_class(exc) is FencedError:
            event, detail = "fenced", {"step": session.step}
            holder = lost_to(conn, schema, key, owner, attempt)
        else:
            detail = {"error": type(exc).__name__, "message": str(exc)[:500]}
        release_key(conn, schema, key, owner, attempt, event, detail)
        if event == "fenced" and holder is None:  # released, not taken by another attempt
            raise LostClaimError(
                f"effect {key!r} attempt {attempt}: `eos-airflow recover` released the key "
                "while the attempt ran (its session looked gone: was its advisory lock "
                "dropped?); its writes were rolled back. Retry (Airflow retries this)"
            ) from exc
        if event == "fenced":
            raise FencedError(
                f"effect {key!r}: a newer attempt claimed it while attempt {attempt} ran "
                f"(try {holder}); this attempt's writes were rolled back. Nothing to do: the "
                "newer attempt writes the effect (do not retry this one)"
            ) from exc
        if isinstance(exc, pgerrors.Error) and not isinstance(exc, pgerrors.OperationalError):
            raise UserCodeError(
                f"effect {key!r} attempt {attempt}: the database refused a statement "
                f"({exc.sqlstate}: {exc}); nothing was written. {sql_hint(exc)}",
                sqlstate=exc.sqlstate,
            ) from exc
        raise
    failpoints.check("after_commit", attempt=attempt)
    action = Action.REPLACED if claim.prior_state == EntryState.COMMITTED else Action.COMMITTED
    log.info("effect %s %s (version %s)", key, action, committed.version)
    return Outcome(
        key, action, json.loads(payload), committed.version, attempt, committed.committed_at
    )


def lost_to(
    conn: psycopg.Connection[Any],
    schema: str,
    key: str,
    owner: uuid.UUID,
    attempt: int,
    txid: str | None = None,
) -> int | None:
    """After a fenced commit: the try that took ``key`` from the attempt ``owner``, or None
    when recovery released it (or the ledger cannot say) — then nobody writes the effect
    unless the attempt is retried."""
    try:
        cause = LedgerStore(conn, schema).fence_cause(key, owner, attempt, txid)
    except psycopg.Error:
        return None
    return None if cause is None or cause.released else cause.attempt


def previous_version(
    conn: psycopg.Connection[Any], schema: str, key: str, claim: Claim
) -> Previous | None:
    """The committed version this attempt supersedes, if the row holds one: under "replace",
    and whenever an operator reopened the key — also after attempts that failed or crashed
    since the reopen, which left the row ``failed`` or ``running`` with that version."""
    if claim.prior_state == "committed":
        return Previous(claim.result, claim.version or 0, claim.committed_at)
    if not claim.version:
        return None
    entry = LedgerStore(conn, schema).entry(key)
    assert entry is not None, "a claimed key has a ledger row"
    return Previous(entry.result, entry.version, entry.committed_at)


def _server_refused(conn: psycopg.Connection[Any], exc: psycopg.Error) -> bool:
    """True when the server answered the commit round trip with an error on a live
    connection: then COMMIT did not take effect. Any other failure — no answer (psycopg may
    raise "connection socket closed" on EOF before libpq marks the connection bad), or an
    answer on a connection that broke (a FATAL shutdown message) — leaves the outcome
    unknown to this session, and only the ledger can tell."""
    return exc.sqlstate is not None and not conn.closed and not conn.broken


class Session:
    """The owner's control of the effect's transaction: BEGIN, COMMIT, and in a chunked
    effect the intermediate commits (step "checkpoint") and the resumption (step "resume").

    The transaction is driven with explicit statements on the autocommit connection, so that
    a chunk can COMMIT and the next chunk BEGIN inside the user's function; a
    ``with eos.conn.transaction()`` block in user code becomes a savepoint, as before.
    """

    def __init__(
        self, conn: psycopg.Connection[Any], schema: str, key: str, owner: uuid.UUID, attempt: int
    ) -> None:
        self.conn = conn
        self.schema = schema
        self.key = key
        self.owner = owner
        self.attempt = attempt
        self.step = "commit"  # the fenced step in progress (for the `fenced` event)
        self.store = LedgerStore(conn, schema)

    def __repr__(self) -> str:
        return f"<Session key={self.key!r} attempt={self.attempt} step={self.step}>"

    def begin(self) -> None:
        self.conn.execute("BEGIN")

    def commit(
        self, payload: str, detail: str | None = None, fingerprint: str | None = None
    ) -> Committed:
        """The effect's last step: the ledger's commit() (fenced) and COMMIT in one round
        trip. If commit() raises, COMMIT does not run and the transaction stays aborted (the
        caller rolls it back)."""
        try:
            return self.store.commit(self.key, self.owner, payload, detail, fingerprint)
        except pgerrors.InvalidSqlStatementName as exc:
            # this session's code drops prepared statements: the store stops using them
            raise UserCodeError(
                f"effect {self.key!r}: the function dropped this session's prepared statements "
                "(DEALLOCATE ALL or DISCARD ALL), the ledger's among them; nothing was written. "
                "The next try on this connection does without them; better, remove the statement"
            ) from exc

    def end(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        """Roll back the open transaction, if any; never hide the caller's exception."""
        conn = self.conn
        if conn.closed or conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            return
        try:
            conn.execute("ROLLBACK")
        except psycopg.Error:
            log.warning(
                "rollback of effect %s failed; closing its connection", self.key, exc_info=True
            )
            conn.close()

    def resume(self, eos: Effect | None = None) -> RecoveryPoint | None:
        """The newest recovery point of the version being written, recorded as `resumed`
        and committed at once (with what the function wrote before its loop, and offsets it
        staged); or None."""
        if not self.store.has_recovery_point(self.key):
            return None
        self.step = "resume"
        point = self.store.resume(self.key, self.owner)
        if point is None:
            self.step = "commit"
            return None
        offsets = eos.offsets_in_use if eos is not None else None
        if offsets is not None:
            offsets.flush()
        self.end()
        self.step = "commit"
        if offsets is not None:
            offsets.transaction_ended()
        self.begin()
        return point

    def checkpoint(
        self,
        eos: Effect,
        *,
        rows: int,
        position: Any,
        state: Any,
        detail: dict[str, Any],
        final: bool = False,
    ) -> int:
        """Record a recovery point in the chunk's transaction (fenced), then COMMIT it and
        BEGIN the next chunk — unless this is the final chunk, which commits with the effect."""
        self.step = "checkpoint"
        if eos.offsets_in_use is not None:
            eos.offsets_in_use.flush()
        seq = self.store.checkpoint(
            self.key,
            self.owner,
            rows=rows,
            position=_json(position, "position"),
            state=_json(state, "state"),
            detail=detail,
        )
        self.step = "commit"
        if final:
            return seq
        failpoints.check("before_chunk_commit", attempt=self.attempt)
        self.end()
        failpoints.check("after_chunk", attempt=self.attempt)
        if eos.offsets_in_use is not None:
            eos.offsets_in_use.transaction_ended()
        self.begin()
        return seq


def _json(value: Any, what: str) -> str | None:
    if value is None:
        return None
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ResultError(
            f"the recovery point's {what} must be JSON, got {type(value).__name__}: {exc}"
        ) from None


@contextlib.contextmanager
def _own_transaction(conn: psycopg.Connection[Any], key: str) -> Iterator[None]:
    """While the user's function runs, the effect's transaction is the protocol's: commit()
    and rollback() on ``eos.conn`` are refused, and ending it with SQL is detected."""

    def refuse() -> None:
        raise MisuseError(
            f"effect {key!r}: eos.conn is inside the effect's transaction: do not call "
            "commit() or rollback() (the ledger commits your writes with the effect; raise "
            "an exception to roll them back)"
        )

    conn.commit = refuse  # type: ignore[method-assign]
    conn.rollback = refuse  # type: ignore[method-assign]
    try:
        yield
    finally:
        del conn.commit, conn.rollback
    if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.INTRANS:
        raise MisuseError(
            f"effect {key!r}: the function ended the effect's transaction itself (a COMMIT or "
            "ROLLBACK statement); writes it committed that way escaped the ledger. Remove the "
            "statement: the ledger commits your writes with the effect"
        )


def _detail_json(detail: Mapping[str, Any] | None) -> str | None:
    """An event's extra detail as the JSON object text the ledger takes (None: nothing)."""
    if not detail:
        return None
    return json.dumps(dict(detail), default=str, separators=(",", ":"), sort_keys=True)


def commit_detail(eos: Effect) -> str | None:
    """What the commit event records beside the protocol's fields: the code that ran (the
    origin's ``code``) and what the effect noted (``eos.note``: snapshot ids, versions)."""
    return _detail_json({**(eos.origin.code or {}), **eos.commit_detail})


def check_fingerprint(
    conn: psycopg.Connection[Any],
    schema: str,
    key: str,
    version: int,
    fingerprint: str,
    attempt: int,
    origin: Origin,
    on_mismatch: str,
) -> str | None:
    """After a skip: compare ``fingerprint`` with the committed version's. On a difference
    the ledger records a ``mismatch`` event; then warn and return the committed fingerprint
    (``"warn"``, ``"replace"``) or raise :class:`FingerprintMismatchError` (``"fail"``).
    None when they match (or the version has no fingerprint)."""
    detail = {
        "dag_id": origin.dag_id,
        "task_id": origin.task_id,
        "run_id": origin.run_id,
        "map_index": origin.map_index,
    }
    found = LedgerStore(conn, schema).check_fingerprint(
        key, version, fingerprint, attempt, on_mismatch, _detail_json(detail)
    )
    if found.matches:
        return None
    message = (
        f"effect {key!r}: version {version} was committed from other inputs (fingerprint "
        f"{_short(found.committed)}) than this attempt's ({_short(fingerprint)}): the SQL, "
        "the arguments or the code changed since"
    )
    if on_mismatch == "fail":
        raise FingerprintMismatchError(
            f"{message}. on_mismatch='fail': nothing was written. To write the effect with "
            "the new inputs run it with on_committed='replace' (or on_mismatch='replace'); "
            "to keep the committed version, restore the inputs or use on_mismatch='warn'"
        )
    if on_mismatch == "replace":
        log.warning("%s; on_mismatch='replace': writing a new version", message)
    else:
        log.warning(
            "%s; skipped and kept the committed version (on_mismatch='warn'; 'replace' "
            "writes a new version, 'fail' refuses)",
            message,
        )
    return found.committed


def _short(fingerprint: str | None) -> str:
    return "none" if fingerprint is None else fingerprint[:12]


def claim_key(
    conn: psycopg.Connection[Any],
    schema: str,
    key: str,
    owner: uuid.UUID,
    attempt: int,
    origin: Origin,
    on_committed: str,
    wait_timeout: float,
    *,
    twophase: dict[str, str] | None = None,
    begin: bool = False,
) -> Claim:
    """The claim step: returns a claim whose action is ``run`` or ``skip``, or raises.

    ``twophase`` (txid, protocol, participants) also logs the two-phase transaction in the
    same round trip. With ``begin``, a claim that returns ``run`` leaves the effect's
    transaction open (BEGIN sent in the same round trip); any other outcome leaves the
    connection idle."""
    params = {
        "key": key,
        "owner": owner,
        "attempt": attempt,
        "dag_id": origin.dag_id,
        "task_id": origin.task_id,
        "run_id": origin.run_id,
        "map_index": origin.map_index,
        "host": _HOST,
        "pid": os.getpid(),
        "on_committed": on_committed,
        "detail": _detail_json(origin.code),
    }
    check_session(conn)  # a pooler must keep the owner's session (protocol/pooling.py)
    store = LedgerStore(conn, schema)
    deadline = time.monotonic() + wait_timeout
    while True:
        if twophase is not None:
            claim = store.twophase_claim(params, **twophase)
        else:
            claim = store.claim(params, begin=begin)
        if claim.action == ClaimAction.RUN:
            return claim
        if begin:  # the effect will not run: close the transaction opened for it
            conn.execute("ROLLBACK")
        if claim.action == ClaimAction.SKIP:
            return claim
        if claim.action == ClaimAction.REFUSE:
            raise AlreadyCommittedError(
                f"effect {key!r} is already committed (version {claim.version}, "
                f"at {claim.committed_at}) and on_committed='fail'; use "
                "on_committed='skip' to reuse its result or 'replace' to write it again"
            )
        if claim.action == ClaimAction.FENCED:
            # fenced by the try that holds the key, or by one that claimed it and is gone
            whose = "owns it" if claim.holder is not None else "claimed it before"
            raise FencedError(
                f"effect {key!r}: try {claim.attempt} of this task instance {whose}, so try "
                f"{attempt} stops without writing (do not retry this one)"
            )
        _wait_for_owner(store, key, claim, deadline, wait_timeout)


def _wait_for_owner(
    store: LedgerStore, key: str, claim: Claim, deadline: float, wait_timeout: float
) -> None:
    """Sleep on the owner's session lock until it ends or the deadline passes."""
    remaining = deadline - time.monotonic()
    holder = claim.result or {}
    if remaining > 0:
        try:
            with store.conn.transaction():
                store.conn.execute(
                    "SELECT set_config('lock_timeout', %s, true)",
                    [f"{max(1, int(remaining * 1000))}ms"],
                )
                store.wait_for_owner(key, claim.holder)
            return
        except pgerrors.LockNotAvailable:
            pass
    raise KeyInProgressError(
        f"effect {key!r} is being written by another live attempt (run "
        f"{holder.get('run_id')!r}, try {claim.attempt}, host {holder.get('host')!r}, "
        f"pid {holder.get('pid')}, claimed {holder.get('claimed_at')}); waited "
        f"{wait_timeout:g} s. Retry later (Airflow retries this), or raise wait_timeout"
    )


def release_key(
    conn: psycopg.Connection[Any],
    schema: str,
    key: str,
    owner: uuid.UUID,
    attempt: int,
    event: str,
    detail: dict[str, Any],
) -> None:
    """Record the failure; never let a failed release hide the original error."""
    try:
        LedgerStore(conn, schema).release(key, owner, attempt, event, detail)
    except Exception:  # the original exception is re-raised by the caller
        log.warning(
            "could not record %s for effect %s; the next claim takes the key over",
            event,
            key,
            exc_info=True,
        )
        # The session may still hold the owner's advisory lock, which tells other runs that
        # the owner is alive: end the session so that the key is free to take over.
        conn.close()


__all__ = [
    "DEFAULT_WAIT_TIMEOUT",
    "Outcome",
    "Session",
    "claim_key",
    "lost_to",
    "previous_version",
    "release_key",
    "run_effect",
]
