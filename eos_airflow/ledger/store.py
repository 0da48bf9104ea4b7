"""Ledger tier: :class:`LedgerStore`, the one gateway to a ledger schema's rows and functions.

Every read and write of the ledger made by the tiers above (protocol, api, adapters, CLI, web)
is a method here: one method per ledger operation, typed parameters in, frozen dataclasses
(or plain values) out. The SQL itself lives in ``sql/*.sql`` as named queries
(:mod:`eos_airflow.ledger.queries` loads them); outside this tier nobody names a query.

A store is a light handle on one connection and one schema; make one where it is needed::

    store = LedgerStore(conn, "eos")
    entry = store.entry("sales/2024-06-30")

The methods run in the connection's current transaction (or autocommit) and raise what
PostgreSQL raises, except that a statement which finds no ledger schema, function or table
raises :class:`~eos_airflow.errors.LedgerSchemaError` saying how to create it. The ledger's
own refusals carry the SQLSTATEs of :data:`eos_airflow.errors.LEDGER_SQLSTATES`.

The hot path (:meth:`LedgerStore.claim` with ``begin=True``, :meth:`LedgerStore.commit`)
sends each step as one simple-protocol message; from a connection's second effect on it
executes session-level prepared statements (:class:`HotPath` tracks them per connection).
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql
from psycopg.rows import class_row, dict_row

from eos_airflow.errors import LedgerSchemaError
from eos_airflow.ledger.filters import like_prefix
from eos_airflow.ledger.keys import check_schema
from eos_airflow.ledger.queries import prepared_names, query, render

T = TypeVar("T")

log = logging.getLogger(__name__)


class HotPath(enum.Enum):
    """Per connection and ledger schema: the state of the hot path's prepared statements."""

    PLAIN = "plain"  #: not prepared yet: the next claim prepares them
    PREPARED = "prepared"  #: prepared in this session: claim and commit execute them
    NEVER = "never"  #: this session drops prepared statements: send plain statements


class ClaimAction(enum.StrEnum):
    """What the ledger's claim() answered."""

    RUN = "run"  #: this attempt owns the key: run the effect
    SKIP = "skip"  #: committed and on_committed="skip": reuse the result
    REFUSE = "refuse"  #: committed and on_committed="fail"
    FENCED = "fenced"  #: a newer try of the task instance owns (or owned) the key
    WAIT = "wait"  #: another live attempt owns the key: wait for its session to end


# ---------------------------------------------------------------------------------------------
# What the ledger returns
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claim:
    """The answer of claim(): the action, and the ledger row as the claim found it."""

    action: str
    prior_state: str | None
    attempt: int | None
    version: int | None
    result: Any
    holder: str | None
    committed_at: datetime | None
    #: two-phase claims: the key's unfinished earlier transactions
    others: list[dict[str, Any]] | None = None


@dataclass(frozen=True, slots=True)
class Committed:
    """A committed version of an effect."""

    version: int
    committed_at: datetime | None


@dataclass(frozen=True, slots=True)
class FingerprintCheck:
    """A skipping attempt's inputs against the committed version's (check_fingerprint())."""

    matches: bool
    committed: str | None


@dataclass(frozen=True, slots=True)
class Entry:
    """One ledger row (``ledger show``)."""

    key: str
    state: str
    attempt: int
    owner: uuid.UUID | None
    version: int
    dag_id: str | None
    task_id: str | None
    run_id: str | None
    map_index: int | None
    host: str | None
    pid: int | None
    result: Any
    claimed_at: datetime | None
    committed_at: datetime | None
    updated_at: datetime | None
    event_seq: int
    last_hash: bytes | None
    #: the committed version's input fingerprint (0013; None: none given)
    fingerprint: str | None = None
    #: the highest version reported to Airflow as asset events (0013)
    announced: int = 0


@dataclass(frozen=True, slots=True)
class EntrySummary:
    """One ledger row as lists show it (``ledger list``, the audit page)."""

    key: str
    state: str
    attempt: int
    version: int
    dag_id: str | None
    task_id: str | None
    run_id: str | None
    map_index: int | None
    host: str | None
    claimed_at: datetime | None
    committed_at: datetime | None
    updated_at: datetime | None
    event_seq: int
    result: Any


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a key's hash chain."""

    id: int
    key: str
    seq: int
    event: str
    attempt: int | None
    at: datetime
    detail: Any
    prev_hash: bytes | None
    hash: bytes


@dataclass(frozen=True, slots=True)
class RecoveryPoint:
    """Where a chunked effect's last committed chunk ended."""

    seq: int  # chunks committed for the version being written
    rows: int  # source items consumed
    position: Any  # the last item's position (position= function), else None
    state: Any  # the function's own JSON state at that point
    attempt: int  # the attempt that committed it


@dataclass(frozen=True, slots=True)
class StoredRecoveryPoint:
    """A recovery point as ``ledger show`` lists it."""

    version: int
    seq: int
    attempt: int
    rows: int
    position: Any
    state: Any
    at: datetime


@dataclass(frozen=True, slots=True)
class FenceCause:
    """Why an attempt lost its key: the try that holds it, or ``released`` by recovery."""

    attempt: int
    released: bool


@dataclass(frozen=True, slots=True)
class Reopened:
    version: int
    attempt: int


@dataclass(frozen=True, slots=True)
class ExpiredClaim:
    """A claim that ``recover`` expired (its owner's session had ended)."""

    key: str
    attempt: int
    run_id: str | None
    claimed_at: datetime | None
    reason: str


@dataclass(frozen=True, slots=True)
class LiveClaim:
    """A claim held by a live session, older than asked: ``recover`` leaves it alone."""

    key: str
    attempt: int
    run_id: str | None
    host: str | None
    pid: int | None
    claimed_at: datetime | None


@dataclass(frozen=True, slots=True)
class GlobalTransaction:
    """One global transaction of the two- and three-phase protocols (the decision log)."""

    txid: str
    protocol: str
    attempt: int
    participants: dict[str, Any] = field(default_factory=dict)
    decision: str | None = None
    key: str | None = None
    owner: uuid.UUID | None = None
    outcome: str | None = None
    created_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class KeyOutcome:
    """A key's state after another run's transaction may have finished it."""

    state: str
    result: Any
    version: int
    committed_at: datetime | None


@dataclass(frozen=True, slots=True)
class Vote:
    """A three-phase vote in a participant's ledger."""

    state: str
    result: Any
    txid: str | None = None
    key: str | None = None
    attempt: int | None = None
    participants: Any = None


@dataclass(frozen=True, slots=True)
class Abandoned:
    """Whether a transaction's attempt can never decide it (then another run may abort it)."""

    abandoned: bool
    decision: str | None


@dataclass(frozen=True, slots=True)
class KnownParticipant:
    name: str
    conn_id: str


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """An undelivered outbox message taken (locked) by a relay."""

    id: int
    message_id: str
    destination: str
    message_key: str | None
    payload: Any
    headers: Any


@dataclass(frozen=True, slots=True)
class Backlog:
    destination: str
    pending: int
    oldest: datetime | None


@dataclass(frozen=True, slots=True)
class EventCount:
    """Events of one kind in one group (a DAG, or a day)."""

    grp: str
    event: str
    n: int


@dataclass(frozen=True, slots=True)
class Latency:
    """Claim-to-commit milliseconds of committed attempts."""

    n: int
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None


@dataclass(frozen=True, slots=True)
class Activity:
    """Events per hour or day (the audit page's chart)."""

    bucket: datetime
    commits: int
    skips: int
    fences: int
    failures: int


@dataclass(frozen=True, slots=True)
class AppliedMigration:
    revision: str
    checksum: str | None
    package_version: str | None
    applied_at: datetime | None


@dataclass(frozen=True, slots=True)
class ServerFacts:
    """What ``doctor`` checks of the server and the role."""

    server_version_num: int
    max_prepared_transactions: int
    synchronous_commit: str
    role: str
    can_claim: bool | None
    append_only: bool | None


# ---------------------------------------------------------------------------------------------
# The gateway
# ---------------------------------------------------------------------------------------------

#: Statements that find no ledger schema, function or table.
_SCHEMA_ERRORS = (pgerrors.UndefinedFunction, pgerrors.InvalidSchemaName, pgerrors.UndefinedTable)
#: Schema names checked already (a store is made per use: the hot path skips the check).
_CHECKED: set[str] = set()

_hot_paths: weakref.WeakKeyDictionary[psycopg.Connection[Any], dict[str, HotPath]] = (
    weakref.WeakKeyDictionary()
)


def _commit_params(
    key: str, owner: uuid.UUID, result: str, detail: str | None, fingerprint: str | None
) -> dict[str, Any]:
    return {
        "key": key,
        "owner": owner,
        "result": result,
        "detail": detail,
        "fingerprint": fingerprint,
    }


class LedgerStore:
    """The ledger schema ``schema`` as seen through the connection ``conn``."""

    __slots__ = ("conn", "schema")

    def __init__(self, conn: psycopg.Connection[Any], schema: str = "eos") -> None:
        self.conn = conn
        if type(schema) is not str or schema not in _CHECKED:
            _CHECKED.add(check_schema(schema))
        self.schema = schema

    def __repr__(self) -> str:
        return f"<LedgerStore schema={self.schema!r} db={self.conn.info.dbname!r}>"

    # -- plumbing ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _schema_errors(self) -> Iterator[None]:
        """A ledger statement that finds no ledger function, schema or table: say how to
        create it (unless the user's own statement had failed the transaction before)."""
        try:
            yield
        except _SCHEMA_ERRORS as exc:
            error = self._schema_error(exc)
            if error is None:
                raise
            raise error from exc

    def _schema_error(self, exc: psycopg.Error) -> LedgerSchemaError | None:
        if self.conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
            return None  # the user's own statement referenced something missing
        return LedgerSchemaError(
            f'the ledger schema "{self.schema}" is missing or incomplete in database '
            f'"{self.conn.info.dbname}" ({exc.diag.message_primary}); create it with '
            "`eos-airflow db migrate` (same --dsn or --conn-id)"
        )

    def _rows(self, name: str, params: Mapping[str, Any], kind: type[T]) -> list[T]:
        cur = self.conn.cursor(row_factory=class_row(kind))
        with self._schema_errors():
            return cur.execute(query(name, self.schema), params).fetchall()

    def _row(self, name: str, params: Mapping[str, Any], kind: type[T]) -> T | None:
        cur = self.conn.cursor(row_factory=class_row(kind))
        with self._schema_errors():
            return cur.execute(query(name, self.schema), params).fetchone()

    def _value(self, name: str, params: Mapping[str, Any]) -> Any:
        """The first column of the first row (None without a row)."""
        cur = self.conn.cursor()
        with self._schema_errors():
            row = cur.execute(query(name, self.schema), params).fetchone()
        return None if row is None else row[0]

    def _script(self, message: bytes, params: Mapping[str, Any], kind: Callable[..., T]) -> T:
        """Several statements in one round trip: bound on the client, one simple-protocol
        message (the server stops at the first error). The first row of the first statement
        that returns rows, as ``kind(*row)`` (the hot path: no per-call row factory)."""
        cur = psycopg.ClientCursor(self.conn)
        try:
            cur.execute(message, params)
        except _SCHEMA_ERRORS as exc:
            error = self._schema_error(exc)
            if error is None:
                raise
            raise error from exc
        while cur.description is None and cur.nextset():
            pass
        row = cur.fetchone()
        assert row is not None, "the ledger function returned no row"
        return kind(*row)

    # -- the single-database protocol -----------------------------------------------------

    def claim(self, params: Mapping[str, Any], *, begin: bool = False) -> Claim:
        """claim() the key (``params``: key, owner, attempt, dag_id, task_id, run_id,
        map_index, host, pid, on_committed) in its own transaction. With ``begin`` the
        effect's transaction is opened (BEGIN) in the same round trip; the caller rolls it
        back unless the answer is ``run``. ``params`` may also hold ``detail`` (a JSON
        object's text joining the claim's event)."""
        if "detail" not in params:
            params = {**params, "detail": None}
        if not begin:
            row = self._row("claim", params, Claim)
            assert row is not None
            return row
        return self._claim_then_begin(params)

    def _claim_then_begin(self, params: Mapping[str, Any]) -> Claim:
        """A connection's first effect sends the claim as a plain statement (an Airflow task
        runs one effect per connection: preparing would not pay); the second also prepares
        the claim and the commit call, which later effects execute without parsing or
        planning them again."""
        schema, states = self.schema, _hot_paths.setdefault(self.conn, {})
        for again in (True, True, False):
            state = states.get(schema)
            preparing = state is HotPath.PLAIN
            if state is None or state is HotPath.NEVER:
                message = query("claim_then_begin", schema)
                states.setdefault(schema, HotPath.PLAIN)
            elif state is HotPath.PREPARED:
                message = query("claim_prepared_then_begin", schema)
            else:
                message = (
                    query("prepare_hot_path", schema)
                    + b"\n"
                    + query("claim_prepared_then_begin", schema)
                )
            try:
                row = self._script(message, params, Claim)
            except pgerrors.InvalidSqlStatementName:
                if state is not HotPath.PREPARED or not again:
                    raise
                states[schema] = HotPath.PLAIN  # the session lost them (DEALLOCATE): again
                continue
            except pgerrors.DuplicatePreparedStatement:
                self.drop_prepared()  # left over from a failed message: drop, again
                if not again:
                    raise
                continue
            except BaseException:
                if preparing:
                    self.drop_prepared()
                raise
            if preparing:
                states[schema] = HotPath.PREPARED
            return row
        raise AssertionError("unreachable")

    def hot_path(self) -> HotPath | None:
        """The state of this connection's prepared hot path for the schema (None: unused)."""
        return _hot_paths.get(self.conn, {}).get(self.schema)

    def commit(
        self,
        key: str,
        owner: uuid.UUID,
        result: str,
        detail: str | None = None,
        fingerprint: str | None = None,
    ) -> Committed:
        """commit() (fenced: SQLSTATE EOS01 unless ``owner`` owns the key) and COMMIT, in one
        round trip. If commit() raises, COMMIT does not run and the transaction stays
        aborted. When the session dropped the prepared statements (DEALLOCATE ALL, DISCARD
        ALL), raises ``InvalidSqlStatementName`` and sends plain statements from then on.
        ``detail`` (a JSON object's text) joins the commit event; ``fingerprint`` is stored
        with the version."""
        prepared = self.hot_path() is HotPath.PREPARED
        message = query("commit_prepared_then_end" if prepared else "commit_then_end", self.schema)
        params = _commit_params(key, owner, result, detail, fingerprint)
        try:
            return self._script(message, params, Committed)
        except pgerrors.InvalidSqlStatementName:
            _hot_paths[self.conn][self.schema] = HotPath.NEVER
            raise

    def commit_in_transaction(
        self,
        key: str,
        owner: uuid.UUID,
        result: str,
        detail: str | None = None,
        fingerprint: str | None = None,
    ) -> Committed:
        """commit() (fenced) inside the caller's transaction, without ending it."""
        params = _commit_params(key, owner, result, detail, fingerprint)
        row = self._row("commit", params, Committed)
        assert row is not None
        return row

    def check_fingerprint(
        self,
        key: str,
        version: int,
        fingerprint: str,
        attempt: int,
        on_mismatch: str,
        detail: str | None = None,
    ) -> FingerprintCheck:
        """Compare a skipping attempt's input fingerprint with the committed version's; a
        difference is recorded as a `mismatch` event (own transaction)."""
        params = {
            "key": key,
            "version": version,
            "fingerprint": fingerprint,
            "attempt": attempt,
            "on_mismatch": on_mismatch,
            "detail": detail,
        }
        row = self._row("check_fingerprint", params, FingerprintCheck)
        assert row is not None
        return row

    def announce(
        self, key: str, version: int, attempt: int, detail: str | None = None
    ) -> str | None:
        """Record that ``version`` of ``key`` was reported to Airflow (own transaction): how
        it was made (committed, replaced) when this call announces it, else None."""
        params = {"key": key, "version": version, "attempt": attempt, "detail": detail}
        return self._value("announce", params)

    def drop_prepared(self) -> None:
        """After a failed message that prepared the hot path: drop what it prepared, if
        anything, so that the next effect can prepare again."""
        conn = self.conn
        if conn.broken or conn.closed:
            return
        names = list(prepared_names(self.schema))
        try:
            cur = conn.cursor()
            found = cur.execute(query("prepared_hot_path", self.schema), {"names": names})
            for (name,) in found.fetchall():
                conn.execute(sql.SQL("DEALLOCATE {}").format(sql.Identifier(name)))
        except psycopg.Error:
            log.warning(
                "could not drop the prepared statements of the ledger on this connection",
                exc_info=True,
            )

    def release(
        self, key: str, owner: uuid.UUID, attempt: int, event: str, detail: Mapping[str, Any]
    ) -> None:
        """Record ``event`` (failed, fenced, skipped) for the attempt and free the key."""
        params = {
            "key": key,
            "owner": owner,
            "attempt": attempt,
            "event": event,
            "detail": json.dumps(detail),
        }
        with self._schema_errors():
            self.conn.execute(query("release", self.schema), params)

    def wait_for_owner(self, key: str, holder: str | None) -> None:
        """Block (up to the transaction's lock_timeout) until the holder's session ends."""
        with self._schema_errors():
            self.conn.execute(query("wait_for_owner", self.schema), {"key": key, "holder": holder})

    def fence_cause(
        self, key: str, owner: uuid.UUID, attempt: int, txid: str | None = None
    ) -> FenceCause | None:
        params = {"key": key, "owner": str(owner), "attempt": attempt, "txid": txid}
        return self._row("fence_cause", params, FenceCause)

    def commit_outcome(
        self, key: str, owner: uuid.UUID, attempt: int, detail: Mapping[str, Any]
    ) -> Committed | None:
        """After a connection broke during COMMIT: the commit of ``owner``, or None when it
        did not happen (the claim is then released under the row lock)."""
        params = {"key": key, "owner": owner, "attempt": attempt, "detail": json.dumps(detail)}
        row = self._row("commit_outcome", params, Committed)
        return None if row is None or row.version is None else row

    def entry(self, key: str) -> Entry | None:
        return self._row("get_entry", {"key": key}, Entry)

    def events(self, key: str) -> list[Event]:
        return self._rows("entry_events", {"key": key}, Event)

    def entries(
        self,
        *,
        dag_id: str | None = None,
        state: str | None = None,
        prefix: str | None = None,
        limit: int | None = None,
        mismatched: bool = False,
    ) -> list[EntrySummary]:
        """Ledger rows by key; ``mismatched``: only keys whose current version a skip saw
        with other inputs (a ``mismatch`` event)."""
        params = {
            "dag_id": dag_id,
            "state": state,
            "prefix": like_prefix(prefix),
            "limit": limit,
            "mismatched": mismatched,
        }
        return self._rows("list_entries", params, EntrySummary)

    def reopen(self, key: str, reason: str, on_behalf_of: str) -> Reopened:
        """reopen(): EOS04 when there is no such key, EOS05 when it is not committed or an
        attempt holds it."""
        params = {"key": key, "reason": reason, "on_behalf_of": on_behalf_of}
        row = self._row("reopen", params, Reopened)
        assert row is not None
        return row

    # -- chunked effects and offsets ------------------------------------------------------

    def has_recovery_point(self, key: str) -> bool:
        return bool(self._value("has_recovery_point", {"key": key}))

    def resume(self, key: str, owner: uuid.UUID) -> RecoveryPoint | None:
        """Lock the key (fenced) and record the resumption at the newest recovery point."""
        return self._row("resume", {"key": key, "owner": owner}, RecoveryPoint)

    def checkpoint(
        self,
        key: str,
        owner: uuid.UUID,
        *,
        rows: int,
        position: str | None,
        state: str | None,
        detail: Mapping[str, Any],
    ) -> int:
        """Record a recovery point (fenced) in the chunk's transaction; its sequence number."""
        params = {
            "key": key,
            "owner": owner,
            "rows": rows,
            "position": position,
            "state": state,
            "detail": json.dumps(detail),
        }
        return int(self._value("checkpoint", params))

    def recovery_points(self, key: str) -> list[StoredRecoveryPoint]:
        return self._rows("recovery_points", {"key": key}, StoredRecoveryPoint)

    def offset(self, source: str) -> tuple[bool, Any]:
        """The committed position of ``source``, read under its lock until the transaction
        ends: ``(found, position)``."""
        cur = self.conn.cursor()
        with self._schema_errors():
            row = cur.execute(query("get_offset", self.schema), {"source": source}).fetchone()
        return (False, None) if row is None else (True, row[0])

    def advance_offsets(self, key: str, owner: uuid.UUID | None, positions: str) -> Any:
        """Write the staged positions (JSON) of the effect (fenced); the moves made."""
        return self._value("advance_offsets", {"key": key, "owner": owner, "positions": positions})

    def lock_offset(self, source: str) -> None:
        """Take ``source``'s session lock: concurrent runs of one source serialise."""
        self.conn.execute(
            render("SELECT pg_advisory_lock({schema}.offset_lock_id(%s))", self.schema), [source]
        )

    def unlock_offset(self, source: str) -> bool:
        cur = self.conn.execute(
            render("SELECT pg_advisory_unlock({schema}.offset_lock_id(%s))", self.schema),
            [source],
        )
        row = cur.fetchone()
        return bool(row and row[0])

    # -- the outbox and the inbox --------------------------------------------------------

    def outbox_last_seq(self, key: str, version: int) -> int:
        return int(self._value("outbox_last_seq", {"key": key, "version": version}) or 0)

    def outbox_insert(self, params: Mapping[str, Any]) -> None:
        """outbox_publish() (fenced): key, owner, version, seq, message_id, destination,
        message_key, payload (JSON), headers (JSON)."""
        with self._schema_errors():
            self.conn.execute(query("outbox_insert", self.schema), params)

    def outbox_pending(
        self, exact: Sequence[str], schemes: Sequence[str], limit: int
    ) -> list[OutboxRow]:
        params = {"exact": list(exact), "schemes": list(schemes), "limit": limit}
        return self._rows("outbox_pending", params, OutboxRow)

    def outbox_mark_delivered(self, ids: Sequence[int], relay: str) -> int:
        return int(self._value("outbox_mark_delivered", {"ids": list(ids), "relay": relay}) or 0)

    def outbox_backlog(self) -> list[Backlog]:
        return self._rows("outbox_backlog", {}, Backlog)

    def inbox_accept(self, consumer: str, ids: Sequence[str], sources: Sequence[str]) -> set[str]:
        """The message ids not applied before by ``consumer`` (recorded now)."""
        cur = self.conn.cursor()
        params = {"consumer": consumer, "ids": list(ids), "sources": list(sources)}
        with self._schema_errors():
            rows = cur.execute(query("inbox_accept", self.schema), params).fetchall()
        return {row[0] for row in rows}

    # -- two- and three-phase commit ------------------------------------------------------

    def twophase_claim(
        self, params: Mapping[str, Any], *, txid: str, protocol: str, participants: str
    ) -> Claim:
        """claim() and, when the attempt runs, log its txid and participants (JSON)."""
        full = {**params, "txid": txid, "protocol": protocol, "participants": participants}
        row = self._row("twophase_claim", full, Claim)
        assert row is not None
        return row

    def twophase_decide(
        self,
        txid: str,
        key: str,
        owner: uuid.UUID,
        result: str,
        detail: str | None = None,
        fingerprint: str | None = None,
    ) -> Committed:
        """The commit point: decide ``commit`` and commit the key (EOS01 fenced, EOS07 when
        recovery decided the txid already)."""
        params = {
            "txid": txid,
            "key": key,
            "owner": owner,
            "result": result,
            "detail": detail,
            "fingerprint": fingerprint,
        }
        row = self._row("twophase_decide", params, Committed)
        assert row is not None
        return row

    def twophase_abort(self, txid: str, attempt: int, by: str, reason: str) -> str:
        """Decide abort unless decided; the decision in force."""
        params = {"txid": txid, "attempt": attempt, "by": by, "reason": reason}
        return str(self._value("twophase_abort", params))

    def twophase_resolved(
        self, txid: str, outcome: str, by: str | None = None, result: str | None = None
    ) -> None:
        params = {"txid": txid, "outcome": outcome, "by": by, "result": result}
        with self._schema_errors():
            self.conn.execute(query("twophase_resolved", self.schema), params)

    def twophase_forget(self, txid: str, owner: uuid.UUID) -> None:
        with self._schema_errors():
            self.conn.execute(query("twophase_forget", self.schema), {"txid": txid, "owner": owner})

    def twophase_get(self, txid: str) -> GlobalTransaction | None:
        return self._row("twophase_get", {"txid": txid}, GlobalTransaction)

    def twophase_unresolved(self) -> list[GlobalTransaction]:
        return self._rows("twophase_unresolved", {}, GlobalTransaction)

    def twophase_unresolved_key(self, key: str) -> list[GlobalTransaction]:
        """The key's unfinished transactions that a run which skips the key may finish."""
        return self._rows("twophase_unresolved_key", {"key": key}, GlobalTransaction)

    def twophase_abandoned(self, txid: str) -> Abandoned:
        row = self._row("twophase_abandoned", {"txid": txid}, Abandoned)
        assert row is not None
        return row

    def twophase_known_participants(self) -> list[KnownParticipant]:
        return self._rows("twophase_known_participants", {}, KnownParticipant)

    def key_outcome(self, key: str) -> KeyOutcome | None:
        return self._row("twophase_key_entry", {"key": key}, KeyOutcome)

    def owner_alive(self, key: str, owner: uuid.UUID) -> bool:
        return bool(self._value("owner_alive", {"key": key, "owner": owner}))

    def precommit_check(self) -> None:
        """Fails unless this participant's ledger has the three-phase vote table."""
        with self._schema_errors():
            self.conn.execute(query("precommit_check", self.schema), {})

    def precommit_vote(
        self,
        txid: str,
        key: str | None,
        attempt: int,
        state: str,
        participants: str,
        result: str | None,
    ) -> Vote | None:
        """Write a vote unless one exists: the vote in force (None when another session's
        vote committed while this one waited: read again)."""
        params = {
            "txid": txid,
            "key": key,
            "attempt": attempt,
            "state": state,
            "participants": participants,
            "result": result,
        }
        return self._row("precommit_vote", params, Vote)

    def precommit_get(self, txid: str) -> Vote | None:
        return self._row("precommit_get", {"txids": [txid]}, Vote)

    # -- operators' tools: recover, doctor ------------------------------------------------

    def expire_claims(self, older_than: datetime | None) -> list[ExpiredClaim]:
        return self._rows("recover_claims", {"older_than": older_than}, ExpiredClaim)

    def live_claims(self, older_than: datetime) -> list[LiveClaim]:
        return self._rows("live_claims", {"older_than": older_than}, LiveClaim)

    def applied_migrations(self) -> list[AppliedMigration]:
        return self._rows("applied_migrations", {}, AppliedMigration)

    def server_facts(self) -> ServerFacts:
        row = self._row("doctor_facts", {"schema": self.schema}, ServerFacts)
        assert row is not None
        return row

    def in_doubt_count(self) -> int:
        return int(self._value("doctor_in_doubt", {}) or 0)

    def orphaned_claims(self) -> int:
        return int(self._value("orphaned_claims", {}) or 0)

    # -- audit reads ---------------------------------------------------------------------

    def count_events(self, *, since: datetime | None, prefix: str | None) -> int:
        params = {"since": since, "prefix": like_prefix(prefix)}
        return int(self._value("count_events", params) or 0)

    def export_events(
        self, *, since: datetime | None, prefix: str | None, batch: int
    ) -> Iterator[list[dict[str, Any]]]:
        """Every event in id order (hashes as hex), in batches of ``batch`` rows, read
        through a server-side cursor in one transaction."""
        params = {"since": since, "prefix": like_prefix(prefix)}
        with self.conn.transaction(), self._schema_errors():
            cur = self.conn.cursor(name="eos_export", row_factory=dict_row)
            cur.execute(query("export_events", self.schema), params)
            while rows := cur.fetchmany(batch):
                yield rows

    def event_counts(self, *, since: datetime | None, by: str) -> list[EventCount]:
        return self._rows("stats_by_group", {"since": since, "by": by}, EventCount)

    def commit_latency(self, *, since: datetime | None) -> Latency:
        row = self._row("commit_latency", {"since": since}, Latency)
        assert row is not None
        return row

    def state_counts(self) -> dict[str, int]:
        cur = self.conn.cursor()
        with self._schema_errors():
            rows = cur.execute(query("entry_states", self.schema), {}).fetchall()
        return {state: n for state, n in rows}

    # -- the audit page ------------------------------------------------------------------

    def recent_entries(
        self,
        *,
        dag_id: str | None,
        state: str | None,
        prefix: str | None,
        since: datetime | None,
        dag_ids: Sequence[str] | None,
        limit: int,
    ) -> list[EntrySummary]:
        """Rows updated since ``since``, newest first; ``dag_ids`` None: every DAG."""
        params = {
            "dag_id": dag_id,
            "state": state,
            "prefix": like_prefix(prefix),
            "since": since,
            "all_dags": dag_ids is None,
            "dag_ids": list(dag_ids or []),
            "limit": limit,
        }
        return self._rows("web_entries", params, EntrySummary)

    def task_instance_keys(
        self, dag_id: str, task_id: str, run_id: str, map_index: int
    ) -> list[str]:
        params = {"dag_id": dag_id, "task_id": task_id, "run_id": run_id, "map_index": map_index}
        cur = self.conn.cursor()
        with self._schema_errors():
            return [r[0] for r in cur.execute(query("web_ti_keys", self.schema), params)]

    def activity(
        self, *, since: datetime, bucket: str, dag_ids: Sequence[str] | None
    ) -> list[Activity]:
        params = {
            "since": since,
            "bucket": bucket,
            "all_dags": dag_ids is None,
            "dag_ids": list(dag_ids or []),
        }
        return self._rows("web_activity", params, Activity)

    # -- verification, gc, schema revision (ledger/chain.py, ledger/gc.py, ledger/migrate.py)

    def chain_events(self, batch: int = 5000) -> Iterator[dict[str, Any]]:
        """Every event in chain order (key, seq), detail as PostgreSQL's canonical jsonb text,
        through a server-side cursor in one transaction."""
        with (
            self.conn.transaction(),
            self.conn.cursor("eos_verify", row_factory=dict_row) as cur,
            self._schema_errors(),
        ):
            cur.itersize = batch
            cur.execute(query("chain_events", self.schema), {})
            yield from cur

    def chain_entries(self) -> list[tuple[Any, ...]]:
        """Per key: key, event_seq, last_hash, state, attempt, version, has_result."""
        with self.conn.cursor() as cur, self._schema_errors():
            return cur.execute(query("chain_entries", self.schema), {}).fetchall()

    def chain_starts(self) -> list[tuple[Any, ...]]:
        """Keys whose oldest events gc removed: key, through_seq, through_hash, versions,
        claims."""
        with self.conn.cursor() as cur, self._schema_errors():
            return cur.execute(query("chain_starts", self.schema), {}).fetchall()

    def gc_candidates(self, cutoff: datetime, pattern: str | None) -> list[str]:
        """Committed, idle keys with events older than ``cutoff`` (keys LIKE ``pattern``)."""
        params = {"cutoff": cutoff, "prefix": pattern}
        with self.conn.cursor() as cur, self._schema_errors():
            return [k for (k,) in cur.execute(query("gc_candidates", self.schema), params)]

    def gc_preview(self, keys: Sequence[str], cutoff: datetime) -> int:
        return int(self._value("gc_preview", {"keys": list(keys), "cutoff": cutoff}) or 0)

    def gc_prune(
        self, keys: Sequence[str], cutoff: datetime, on_behalf_of: str
    ) -> list[tuple[Any, ...]]:
        """gc_prune(): per pruned key, (key, events removed, through seq)."""
        params = {"keys": list(keys), "cutoff": cutoff, "on_behalf_of": on_behalf_of}
        with self.conn.cursor() as cur, self._schema_errors():
            return cur.execute(query("gc_prune", self.schema), params).fetchall()

    def chain_heads(self) -> list[tuple[str, int, bytes]]:
        """Every key's chain head: (key, event_seq, last_hash), in key order."""
        with self.conn.cursor() as cur, self._schema_errors():
            return cur.execute(query("chain_heads", self.schema), {}).fetchall()

    def newest_event(self) -> tuple[int, str, int, bytes] | None:
        """The newest event: (id, key, seq, hash)."""
        with self.conn.cursor() as cur, self._schema_errors():
            return cur.execute(query("newest_event", self.schema), {}).fetchone()

    def event_totals(self) -> tuple[int, int]:
        """(events in the table, events gc removed)."""
        with self.conn.cursor() as cur, self._schema_errors():
            row = cur.execute(query("event_totals", self.schema), {}).fetchone()
        assert row is not None
        return row[0], row[1]

    def event_hash(self, key: str, seq: int) -> bytes | None:
        """The hash of ``key``'s event ``seq``, if it is still there."""
        value = self._value("event_hash_at", {"key": key, "seq": seq})
        return None if value is None else bytes(value)

    def revision(self) -> str | None:
        """The schema revision stored in the database (raises if the schema is missing)."""
        return self._value("schema_revision", {})


class AsyncLedgerStore:
    """The ledger reads and waiter rows of :mod:`eos_airflow.ledger.watch`, on an
    asynchronous connection (the triggerer's event loop)."""

    __slots__ = ("conn", "schema")

    def __init__(self, conn: psycopg.AsyncConnection[Any], schema: str = "eos") -> None:
        self.conn = conn
        self.schema = check_schema(schema)

    async def listen(self) -> None:
        """LISTEN on the schema's commit channel."""
        await self.conn.execute(query("listen", self.schema), {})

    async def register_waiters(
        self, listener: str, keys: Sequence[str], is_prefix: Sequence[bool], ttl: float
    ) -> None:
        params = {"listener": listener, "keys": list(keys), "is_prefix": list(is_prefix)}
        await self.conn.execute(query("register_waiters", self.schema), {**params, "ttl": ttl})

    async def unregister_waiters(
        self, listener: str, keys: Sequence[str], is_prefix: Sequence[bool]
    ) -> None:
        params = {"listener": listener, "keys": list(keys), "is_prefix": list(is_prefix)}
        await self.conn.execute(query("unregister_waiters", self.schema), params)

    async def refresh_waiters(self, listener: str, ttl: float) -> None:
        params = {"listener": listener, "ttl": ttl}
        await self.conn.execute(query("refresh_waiters", self.schema), params)

    async def drop_listener(self, listener: str) -> None:
        await self.conn.execute(query("drop_listener", self.schema), {"listener": listener})

    async def key_states(
        self, keys: Sequence[str], *, locked: bool = False
    ) -> dict[str, tuple[str, Any]]:
        """``{key: (state, result)}`` of the keys that have a row; ``locked`` waits for a
        commit in flight on them to finish (FOR SHARE)."""
        name = "watch_keys_locked" if locked else "watch_keys"
        cur = self.conn.cursor()
        await cur.execute(query(name, self.schema), {"keys": list(keys)})
        return {key: (state, result) for key, state, result in await cur.fetchall()}

    async def prefix_states(
        self, prefix: str, *, locked: bool = False
    ) -> dict[str, tuple[str, Any]]:
        name = "watch_prefix_locked" if locked else "watch_prefix"
        cur = self.conn.cursor()
        await cur.execute(query(name, self.schema), {"prefix": prefix})
        return {key: (state, result) for key, state, result in await cur.fetchall()}


def key_states(
    conn: psycopg.Connection[Any], schema: str, keys: Sequence[str], prefix: str | None
) -> dict[str, tuple[str, Any]]:
    """``{key: (state, result)}`` of ``keys`` and of the keys starting with ``prefix``, in
    one read without locks (the sensor's poke)."""
    name_keys, name_prefix = query("watch_keys", schema), query("watch_prefix", schema)
    with conn.cursor() as cur:
        rows = cur.execute(name_keys, {"keys": list(keys)}).fetchall()
        if prefix is not None:
            rows += cur.execute(name_prefix, {"prefix": prefix}).fetchall()
    return {key: (state, result) for key, state, result in rows}


__all__ = [
    "Abandoned",
    "AsyncLedgerStore",
    "Activity",
    "AppliedMigration",
    "Backlog",
    "Claim",
    "ClaimAction",
    "Committed",
    "Entry",
    "EntrySummary",
    "Event",
    "EventCount",
    "ExpiredClaim",
    "FenceCause",
    "GlobalTransaction",
    "HotPath",
    "KeyOutcome",
    "KnownParticipant",
    "Latency",
    "LedgerStore",
    "LiveClaim",
    "OutboxRow",
    "RecoveryPoint",
    "Reopened",
    "ServerFacts",
    "StoredRecoveryPoint",
    "Vote",
    "key_states",
]
