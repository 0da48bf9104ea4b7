"""Protocol tier: effects across several databases: two-phase commit through the ledger
(docs/twophase.md).

The coordinator is the ledger of one database (``ledger_conn_id``); the participants are the
target databases. Presumed abort: nothing but the decision makes a transaction commit.

1. **claim** the key in the coordinator's ledger, as in the single-database protocol; then
   **begin**: log the global transaction id (txid) and its participants, and finish the key's
   earlier in-doubt transactions that no attempt can decide any more (recovery.py); a live
   attempt that owns the key is left to finish its own.
2. **run** the user's function with one open transaction per participant (``eos.conns``).
3. **prepare** every participant (``PREPARE TRANSACTION``, in parallel threads), once the
   coordinator session (which holds the claim's lock) answered. When that session is lost
   around PREPARE or the decision, the attempt settles its txid in a new session (``abort``
   unless decided) and finishes its own prepared work as decided.
4. (3PC only) **pre-commit**: inside the coordinator's decision transaction, record a
   ``precommitted`` vote in each participant's ledger, in participant order.
5. **decide** (the commit point): in one coordinator transaction, decide ``commit`` for the
   txid and commit the key — fenced like the single-database commit: only while this
   attempt owns the key and nobody aborted the txid.
6. **commit prepared** everywhere (in parallel), then mark the txid resolved.
A failure before the decision rolls every participant back and releases the key; after it
(or when the decision's fate is unknown) the transaction stays in doubt until the next attempt,
``eos-airflow recover`` or (3PC) the termination protocol finishes it.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from typing import Any, cast

import psycopg
from psycopg import errors as pgerrors

from eos_airflow import failpoints
from eos_airflow.errors import (
    ConfigurationError,
    DatabaseUnavailableError,
    EosError,
    FencedError,
    InDoubtError,
    LostClaimError,
    ParticipantError,
    ledger_error_class,
    sql_hint,
)
from eos_airflow.ledger.keys import check_key
from eos_airflow.ledger.store import ClaimAction, Committed, LedgerStore
from eos_airflow.protocol import recovery
from eos_airflow.protocol.effect import (
    MAX_RESULT_BYTES,
    Effect,
    Origin,
    encode_result,
)
from eos_airflow.protocol.local import (
    DEFAULT_WAIT_TIMEOUT,
    Outcome,
    check_fingerprint,
    claim_key,
    commit_detail,
    lost_to,
    previous_version,
    release_key,
)
from eos_airflow.protocol.pooling import behind_pooler
from eos_airflow.protocol.prepared import (
    Gid,
    finish_prepared,
    gid_of,
    key_hash,
    make_txid,
    parse_gid,
    rollback_open,
    statement,
)
from eos_airflow.states import Action, EntryState, check_on_mismatch

log = logging.getLogger(__name__)

PROTOCOLS = ("2pc", "3pc")
_NAME = re.compile(r"^[A-Za-z0-9_]{1,40}$")


def check_targets(targets: Mapping[str, Any], protocol: str) -> None:
    """Raise :class:`ConfigurationError` unless ``targets`` and ``protocol`` are usable."""
    if protocol not in PROTOCOLS:
        raise ConfigurationError(
            f"protocol={protocol!r} is not valid for several targets; choose '2pc' or '3pc'"
        )
    if not isinstance(targets, Mapping) or len(targets) < 2:
        raise ConfigurationError(
            "targets must map at least two names to databases, e.g. "
            "targets={'a': 'bank_a', 'b': 'bank_b'}; use conn_id= for one database"
        )
    for name in targets:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigurationError(
                f"target name {name!r} must be 1-40 letters, digits or underscores "
                "(it is part of the prepared transaction's id)"
            )


class MultiEffect(Effect):
    """The open effect of several targets: write through ``eos.conns[name]``."""

    @property
    def conn(self) -> psycopg.Connection[Any]:
        names = ", ".join(repr(n) for n in (self.targets or {}))
        raise ConfigurationError(
            f"this effect writes to several targets ({names}): use eos.conns[name], e.g. "
            f"eos.conns[{next(iter(self.targets or ['a']))!r}], instead of eos.conn"
        )

    @conn.setter
    def conn(self, value: Any) -> None:  # the dataclass __init__ assigns the placeholder
        pass

    def __repr__(self) -> str:
        return (
            f"<MultiEffect key={self.key!r} attempt={self.attempt} "
            f"targets={sorted(self.targets or {})}>"
        )


def run_two_phase(
    coordinator: psycopg.Connection[Any],
    conns: Mapping[str, psycopg.Connection[Any]],
    key: str,
    fn: Callable[[Effect], Any],
    *,
    protocol: str = "2pc",
    conn_ids: Mapping[str, str | None] | None = None,
    schema: str = "eos",
    attempt: int = 1,
    on_committed: str = "skip",
    origin: Origin | None = None,
    wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
    max_result_bytes: int = MAX_RESULT_BYTES,
    executor: ThreadPoolExecutor | None = None,
    fingerprint: str | None = None,
    on_mismatch: str = "warn",
) -> Outcome:
    """Run ``fn`` as effect ``key`` exactly once across ``conns`` (autocommit connections by
    participant name), coordinated through the ledger on ``coordinator``. ``fingerprint``
    and ``on_mismatch`` as in :func:`~eos_airflow.protocol.local.run_effect`."""
    check_key(key)
    check_on_mismatch(on_mismatch)
    check_targets(conns, protocol)
    for conn in conns.values():  # a pooled participant: no automatic prepared statements
        behind_pooler(conn)
    origin = origin or Origin()
    owner = uuid.uuid4()
    txid = make_txid(protocol, key, attempt, owner)
    names = sorted(conns)  # participant order: 3PC votes are written in this order
    participants = {n: {"gid": gid_of(txid, n), "conn_id": (conn_ids or {}).get(n)} for n in names}
    # claim, and (when this attempt runs) log the txid and its participants: one round trip
    store = LedgerStore(coordinator, schema)
    claim = claim_key(
        coordinator,
        schema,
        key,
        owner,
        attempt,
        origin,
        on_committed,
        wait_timeout,
        twophase={"txid": txid, "protocol": protocol, "participants": json.dumps(participants)},
    )
    by = f"attempt {attempt}"
    if claim.action == ClaimAction.SKIP:
        unfinished = store.twophase_unresolved_key(key)
        recovery.finish_for_key(
            coordinator, conns, unfinished, key, schema=schema, by=by, scan=False
        )
        log.info("effect %s is committed (version %s): skipped", key, claim.version)
        version = claim.version or 0
        mismatch = None
        if fingerprint is not None:
            mismatch = check_fingerprint(
                coordinator, schema, key, version, fingerprint, attempt, origin, on_mismatch
            )
        if mismatch is not None and on_mismatch == "replace":
            return run_two_phase(
                coordinator,
                conns,
                key,
                fn,
                protocol=protocol,
                conn_ids=conn_ids,
                schema=schema,
                attempt=attempt,
                on_committed="replace",
                origin=origin,
                wait_timeout=wait_timeout,
                max_result_bytes=max_result_bytes,
                executor=executor,
                fingerprint=fingerprint,
            )
        return Outcome(
            key, Action.SKIPPED, claim.result, version, attempt, claim.committed_at, mismatch
        )
    try:
        others = [recovery.logged(row) for row in claim.others or []]
        if others or claim.prior_state is not None:
            recovery.finish_for_key(
                coordinator, conns, others, key, schema=schema, by=by, scan=True, exclude=txid
            )
            entry = store.key_outcome(key)
            assert entry is not None, "a claimed key has a ledger row"
            if entry.state == "committed" and claim.prior_state != "committed":
                # an earlier attempt's three-phase transaction committed on the participants
                store.twophase_forget(txid, owner)
                release_key(
                    coordinator,
                    schema,
                    key,
                    owner,
                    attempt,
                    "skipped",
                    {"reason": "an earlier attempt's transaction committed", "by": by},
                )
                return Outcome(
                    key, Action.RECOVERED, entry.result, entry.version, attempt, entry.committed_at
                )
    except BaseException as exc:
        release_key(
            coordinator,
            schema,
            key,
            owner,
            attempt,
            "failed",
            {"error": type(exc).__name__, "message": str(exc)[:500], "step": "begin"},
        )
        raise
    previous = previous_version(coordinator, schema, key, claim)
    step = Step()
    step.redial = _redial(coordinator)
    pool = executor or ThreadPoolExecutor(max_workers=len(names))
    try:
        failpoints.check("after_claim", attempt=attempt)
        for name in names:
            step.participant = name
            if protocol == "3pc":  # its votes need the ledger schema in every participant
                LedgerStore(conns[name], schema).precommit_check()
            conns[name].execute("BEGIN")
            step.open.add(name)
        step.participant = None
        eos = MultiEffect(
            key,
            attempt,
            cast("psycopg.Connection[Any]", None),  # no single conn: MultiEffect.conn raises
            previous,
            origin,
            schema=schema,
            targets={n: conns[n] for n in names},
        )
        result = fn(eos)
        payload = encode_result(result, limit=max_result_bytes)
        _check_coordinator(coordinator, key, txid)
        failpoints.check("before_commit", attempt=attempt)
        step.name = "prepare"
        _prepare_all(pool, conns, names, txid, step, attempt)
        step.name = "decide"
        if protocol == "3pc":
            with coordinator.transaction():
                committed = _decide(
                    coordinator, schema, txid, key, owner, payload, eos, fingerprint
                )
                step.name = "precommit"
                for name in names:
                    step.participant = name
                    vote = recovery.vote(
                        conns[name], schema, txid, key, attempt, "precommitted", names, payload
                    )
                    if vote.state != "precommitted":
                        raise InDoubtError(
                            f"effect {key!r}: recovery aborted transaction {txid} at "
                            f"participant {name!r} before it pre-committed; nothing was "
                            "committed. Retry (Airflow retries this)"
                        )
                    step.precommitted = True
                step.participant = None
                failpoints.check("after_precommit", attempt=attempt)
                step.name = "decide"
        else:
            committed = _decide(coordinator, schema, txid, key, owner, payload, eos, fingerprint)
        step.decided = True
        failpoints.check("after_decision", attempt=attempt)
        step.name = "commit prepared"
        _commit_prepared_all(pool, conns, names, txid, attempt)
        store.twophase_resolved(txid, "committed")
    except BaseException as exc:
        _fail(exc, coordinator, conns, schema, key, txid, owner, attempt, step)
        raise  # _fail raises the mapped error; this keeps type checkers informed
    finally:
        if executor is None:
            pool.shutdown(wait=False)
    failpoints.check("after_commit", attempt=attempt)
    action = Action.REPLACED if claim.prior_state == EntryState.COMMITTED else Action.COMMITTED
    log.info(
        "effect %s %s across %s (version %s, %s)",
        key,
        action,
        ", ".join(names),
        committed.version,
        protocol,
    )
    return Outcome(
        key, action, json.loads(payload), committed.version, attempt, committed.committed_at
    )


def _settle(
    exc: psycopg.OperationalError,
    redial: Callable[[], psycopg.Connection[Any]],
    conns: Mapping[str, psycopg.Connection[Any]],
    schema: str,
    key: str,
    txid: str,
    attempt: int,
    step: Step,
) -> None:
    """The coordinator session was lost around PREPARE or the decision, while the
    participants still answer: in a new session, abort the txid unless it is decided (the
    decision in force is returned) and finish this attempt's prepared work accordingly, so
    that nothing it prepared outlives it. Returns when that was impossible (the
    coordinator is unreachable): the transaction then stays in doubt as before."""
    try:
        with redial() as coordinator:
            store = LedgerStore(coordinator, schema)
            decision = store.twophase_abort(
                txid, attempt, f"attempt {attempt}", "the attempt lost its coordinator session"
            )
            commit = decision == "commit"
            for name in sorted(step.prepared):
                finish_prepared(conns[name], gid_of(txid, name), commit=commit)
            store.twophase_resolved(txid, "committed" if commit else "aborted")
    except psycopg.Error:
        log.warning(
            "effect %s: could not reach the coordinator again to settle %s",
            key,
            txid,
            exc_info=True,
        )
        return
    if commit:
        log.warning(
            "effect %s: transaction %s committed although the coordinator session was "
            "lost after its decision; finished it on every participant",
            key,
            txid,
        )
        raise exc  # committed everywhere; the caller still sees what interrupted it
    raise LostClaimError(
        f"effect {key!r} attempt {attempt}: lost the coordinator's session during {step.name} "
        f"of transaction {txid} ({str(exc).strip()}); it was aborted and its prepared "
        "transactions rolled back on every participant, nothing was committed. Retry "
        "(Airflow retries this)"
    ) from exc


class Step:
    """Where the attempt is, for the failure path."""

    def __init__(self) -> None:
        self.name = "run"
        self.participant: str | None = None
        self.open: set[str] = set()  # participants with an open transaction
        self.prepared: set[str] = set()
        self.precommitted = False
        self.decided = False
        #: a new coordinator connection, for settling the txid after its session was lost
        self.redial: Callable[[], psycopg.Connection[Any]] | None = None


def _redial(coordinator: psycopg.Connection[Any]) -> Callable[[], psycopg.Connection[Any]]:
    """A way to reach the coordinator again in a new session (same server and settings)."""
    dsn, password = coordinator.info.dsn, coordinator.info.password

    def connect() -> psycopg.Connection[Any]:
        extra: dict[str, Any] = {"password": password} if password else {}
        return psycopg.connect(dsn, autocommit=True, connect_timeout=10, **extra)

    return connect


def _check_coordinator(coordinator: psycopg.Connection[Any], key: str, txid: str) -> None:
    """Before anything is prepared: is the coordinator session (which holds the claim's lock)
    still there? Once it is gone, recovery may abort and resolve the txid, and work prepared
    afterwards would be an orphan that holds its row locks."""
    try:
        coordinator.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailableError(
            f"effect {key!r}: lost the coordinator's session before transaction {txid} was "
            f"prepared ({str(exc).strip()}); every participant was rolled back and nothing "
            "was committed. Retry (Airflow retries this)"
        ) from exc


def _decide(
    coordinator: psycopg.Connection[Any],
    schema: str,
    txid: str,
    key: str,
    owner: uuid.UUID,
    payload: str,
    eos: Effect,
    fingerprint: str | None,
) -> Committed:
    return LedgerStore(coordinator, schema).twophase_decide(
        txid, key, owner, payload, commit_detail(eos), fingerprint
    )


def _prepare_all(
    pool: ThreadPoolExecutor,
    conns: Mapping[str, psycopg.Connection[Any]],
    names: list[str],
    txid: str,
    step: Step,
    attempt: int,
) -> None:
    """PREPARE every participant in parallel; raise the first refusal once all finished."""

    def prepare(name: str) -> str:
        conn = conns[name]
        status = conn.info.transaction_status
        if status == psycopg.pq.TransactionStatus.INERROR:
            raise ParticipantError(
                f"a statement failed in participant {name!r}'s transaction and the function "
                "went on (it caught the error); nothing was committed. Let the error "
                f"propagate, or wrap the statement in `with eos.conns[{name!r}].transaction():`"
            )
        if status != psycopg.pq.TransactionStatus.INTRANS:
            raise ParticipantError(
                f"the function ended participant {name!r}'s transaction itself (commit or "
                "rollback), so it cannot be prepared; what it committed there stays. Do not "
                "call commit() or rollback() on eos.conns[...]: eos-airflow commits them"
            )
        done = conn.execute(statement("PREPARE TRANSACTION", gid_of(txid, name)))
        if done.statusmessage != "PREPARE TRANSACTION":  # PostgreSQL rolled it back instead
            raise ParticipantError(
                f"participant {name!r} did not prepare "
                f"({done.statusmessage}); nothing was committed"
            )
        return name

    futures: dict[Future[str], str] = {pool.submit(prepare, n): n for n in names}
    errors: list[tuple[str, BaseException]] = []
    first = True
    for future in as_completed(futures):
        name = futures[future]
        step.open.discard(name)  # PREPARE ends the session's transaction either way
        try:
            future.result()
        except BaseException as exc:
            errors.append((name, exc))
            continue
        step.prepared.add(name)
        if first:
            first = False
            try:
                failpoints.check("after_prepare", attempt=attempt)
            except BaseException as exc:
                errors.append(("", exc))
    if errors:
        name, error = errors[0]
        step.participant = name or None
        raise error


def _commit_prepared_all(
    pool: ThreadPoolExecutor,
    conns: Mapping[str, psycopg.Connection[Any]],
    names: list[str],
    txid: str,
    attempt: int,
) -> None:
    # Once the decision is durable, another run that skips the key, or `recover`, may finish
    # a participant first: a gid that is no longer prepared was committed by them.
    futures = [pool.submit(finish_prepared, conns[n], gid_of(txid, n), commit=True) for n in names]
    errors: list[BaseException] = []
    for done, future in enumerate(as_completed(futures), 1):
        # wait for every thread, so that none still uses its connection when this returns
        try:
            future.result()
            if done == 1:
                failpoints.check("after_first_commit_prepared", attempt=attempt)
        except BaseException as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


def _fail(
    exc: BaseException,
    coordinator: psycopg.Connection[Any],
    conns: Mapping[str, psycopg.Connection[Any]],
    schema: str,
    key: str,
    txid: str,
    owner: uuid.UUID,
    attempt: int,
    step: Step,
) -> None:
    """Undo what can be undone, record why, and raise the error the caller should see."""
    store = LedgerStore(coordinator, schema)
    for name in step.open:
        rollback_open(conns[name])
    in_doubt = (
        step.decided
        or step.precommitted
        or (step.name == "decide" and isinstance(exc, psycopg.OperationalError))
    )
    if step.decided and not isinstance(exc, psycopg.OperationalError):
        # The commit decision is durable and the databases answer: finish it now rather than
        # leave prepared transactions holding their locks until the next attempt or recover.
        try:
            for name in sorted(step.prepared):
                finish_prepared(conns[name], gid_of(txid, name), commit=True)
            store.twophase_resolved(txid, "committed")
            in_doubt = False
        except psycopg.Error:
            log.warning(
                "effect %s: could not finish committed transaction %s now", key, txid, exc_info=True
            )
        if not in_doubt:
            raise exc  # committed everywhere; the caller still sees what interrupted it
    if (
        in_doubt
        and isinstance(exc, psycopg.OperationalError)
        and not step.decided
        and not step.precommitted
        and step.redial is not None
    ):
        _settle(exc, step.redial, conns, schema, key, txid, attempt, step)
    if in_doubt:
        log.warning(
            "effect %s: transaction %s is in doubt after %s (%s); the next attempt or "
            "`eos-airflow recover` finishes it",
            key,
            txid,
            step.name,
            exc,
        )
        if isinstance(exc, psycopg.OperationalError):
            raise InDoubtError(
                f"effect {key!r}: lost the coordinator during {step.name} of transaction "
                f"{txid} ({str(exc).strip()}); its prepared work stays in doubt until the "
                "coordinator is back: the next attempt or `eos-airflow recover` finishes it"
            ) from exc
        raise exc
    fenced = ledger_error_class(exc) is FencedError
    holder = lost_to(coordinator, schema, key, owner, attempt, txid) if fenced else None
    try:  # log the abort first: nobody can decide the txid afterwards
        store.twophase_abort(
            txid,
            attempt,
            f"attempt {attempt}",
            "fenced" if fenced else f"{type(exc).__name__} at {step.name}",
        )
    except psycopg.Error:
        log.warning(
            "could not log the abort of %s; rolling back anyway (presumed abort)",
            txid,
            exc_info=True,
        )
    for name in sorted(step.prepared):
        finish_prepared(conns[name], gid_of(txid, name), commit=False)
    try:
        store.twophase_resolved(txid, "aborted")
    except psycopg.Error:
        log.warning("could not mark %s resolved; `eos-airflow recover` does", txid, exc_info=True)
    detail: dict[str, Any] = {"step": step.name, "txid": txid}
    if not fenced:
        detail.update(error=type(exc).__name__, message=str(exc)[:500])
        if step.participant:
            detail["participant"] = step.participant
    release_key(coordinator, schema, key, owner, attempt, "fenced" if fenced else "failed", detail)
    if fenced and holder is None:  # released by recovery, not taken by another attempt
        raise LostClaimError(
            f"effect {key!r} attempt {attempt}: recovery aborted its transaction {txid} "
            "while it ran (its coordinator session looked gone); its prepared transactions "
            "were rolled back on every participant and nothing was committed. Retry (Airflow "
            "retries this)"
        ) from exc
    if fenced:
        raise FencedError(
            f"effect {key!r}: a newer attempt claimed it while attempt {attempt} ran "
            f"(try {holder}); this attempt's prepared transactions were rolled back on every "
            "participant. Nothing to do: the newer attempt writes the effect (do not retry "
            "this one)"
        ) from exc
    if ledger_error_class(exc) is InDoubtError:
        error: EosError = InDoubtError(
            f"effect {key!r}: recovery aborted transaction {txid} before attempt {attempt} "
            "decided it; nothing was committed. Retry (Airflow retries this)"
        )
        raise error from exc
    if isinstance(exc, pgerrors.Error) and not isinstance(exc, pgerrors.OperationalError):
        where = f"participant {step.participant!r}" if step.participant else "a participant"
        if isinstance(exc, pgerrors.ObjectNotInPrerequisiteState) and "prepared" in str(exc):
            raise ConfigurationError(
                f"effect {key!r}: {where} cannot prepare transactions ({exc}); nothing was "
                "committed anywhere. Set max_prepared_transactions > 0 on its server "
                "(ALTER SYSTEM SET max_prepared_transactions = 64, then restart PostgreSQL)"
            ) from exc
        action = "refused to prepare" if step.name == "prepare" else "refused a statement"
        raise ParticipantError(
            f"effect {key!r} attempt {attempt}: {where} {action} ({exc.sqlstate}: "
            f"{str(exc).strip()}); nothing was committed on any database. {sql_hint(exc)}",
            sqlstate=exc.sqlstate,
        ) from exc
    raise exc


__all__ = [
    "PROTOCOLS",
    "Gid",
    "InDoubtError",
    "MultiEffect",
    "ParticipantError",
    "check_targets",
    "gid_of",
    "key_hash",
    "make_txid",
    "parse_gid",
    "run_two_phase",
]
