"""Protocol tier: finishing in-doubt transactions across several databases (docs/twophase.md,
"Recovery").

A transaction is in doubt while a participant holds it prepared. Three callers finish it,
all through :func:`resolve`:

- the **next attempt** of the key, right after its claim: it finishes the transactions no
  attempt can decide any more -- decided ones, and undecided ones whose attempt's session is
  gone or which no longer owns the key; a live attempt that owns the key (a newer try that
  claimed it meanwhile) is left to finish its own;
- **recover** (``eos-airflow recover``): with the coordinator's decision log; an undecided
  transaction is aborted only when it is provably abandoned: its attempt's session is gone
  (the claim's lock is free, so it can never decide) and its participants prepared it longer
  than a grace period ago. It also looks on the participants the log names for prepared
  transactions that the log no longer lists (an attempt that lost its coordinator session
  prepared after recovery closed its txid) and finishes them as decided;
- **terminate** (``eos-airflow recover --terminate``, 3PC only): without the coordinator,
  from the participants' votes — any ``precommitted`` → commit; otherwise abort, by writing
  ``aborted`` votes in participant order (the first participant's vote decides a race with a
  late coordinator). Two-phase transactions cannot be terminated: they wait (block) for the
  coordinator's decision.
Every participant is finished with COMMIT PREPARED or ROLLBACK PREPARED, and the outcome is
recorded in the coordinator's log when it is reachable (the key gets a ``recovered`` event).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import psycopg

from eos_airflow.errors import EosError
from eos_airflow.ledger.store import GlobalTransaction, LedgerStore, Vote
from eos_airflow.protocol.pooling import behind_pooler
from eos_airflow.protocol.prepared import (
    finish_prepared,
    gid_of,
    key_hash,
    parse_gid,
    prepared_on,
)

log = logging.getLogger(__name__)

Connect = Callable[[], "psycopg.Connection[Any]"]

#: Seconds since its first PREPARE for which `recover` leaves an undecided transaction alone
#: even when its attempt's session is gone. PREPARE-to-decision takes milliseconds; a minute
#: also covers a transaction found on a participant alone, whose owner cannot be asked.
DEFAULT_GRACE = 60.0


@dataclass
class Resolution:
    """What recovery did with one global transaction."""

    txid: str
    key: str | None
    protocol: str
    outcome: str  # committed, aborted, waiting (undecided, in grace), blocked, unreachable
    participants: list[str] = field(default_factory=list)
    detail: str = ""


def logged(row: Mapping[str, Any]) -> GlobalTransaction:
    """A transaction of the decision log as the ledger's claim lists it (JSON)."""
    return GlobalTransaction(
        txid=row["txid"],
        protocol=row["protocol"],
        attempt=row["attempt"],
        participants=row.get("participants") or {},
        decision=row.get("decision"),
    )


def vote(
    conn: psycopg.Connection[Any],
    schema: str,
    txid: str,
    key: str | None,
    attempt: int,
    state: str,
    names: list[str],
    result: str | None,
) -> Vote:
    """Write a 3PC vote at a participant unless one exists; return the vote in force."""
    store = LedgerStore(conn, schema)
    for _ in range(5):
        found = store.precommit_vote(txid, key, attempt, state, json.dumps(names), result)
        if found is not None:
            return found
    raise RuntimeError(f"the vote of {txid} could not be read back")  # pragma: no cover


def _votes(conns: Mapping[str, psycopg.Connection[Any]], schema: str, txid: str) -> dict[str, Vote]:
    found = {}
    for name, conn in conns.items():
        row = LedgerStore(conn, schema).precommit_get(txid)
        if row is not None:
            found[name] = row
    return found


def resolve(
    txid: str,
    *,
    protocol: str,
    conns: Mapping[str, psycopg.Connection[Any]],
    coordinator: psycopg.Connection[Any] | None,
    schema: str = "eos",
    decision: str | None = None,
    key: str | None = None,
    attempt: int = 0,
    force: bool = False,
    by: str = "eos-airflow recover",
    waiting: str = "within the grace period",
) -> Resolution:
    """Finish ``txid`` on ``conns`` (its participants by name) and log the outcome. An
    undecided transaction is aborted only with ``force``; otherwise it is reported as
    waiting, for the reason ``waiting``."""
    names = sorted(conns)
    done = Resolution(txid, key, protocol, "waiting", names)
    result = None
    if protocol == "3pc":
        votes = _votes(conns, schema, txid)
        states = {v.state for v in votes.values()}
        if key is None:
            key = next((v.key for v in votes.values() if v.key), None)
            done.key = key
        if decision == "commit" or "precommitted" in states:
            commit = True
            result = next((v.result for v in votes.values() if v.state == "precommitted"), None)
        elif decision == "abort" or "aborted" in states:
            commit = False
        elif not force:
            done.detail = f"undecided, no pre-commit yet: {waiting}"
            return done
        else:
            commit = False
            for name in names:  # the first participant's vote decides a race
                held = vote(conns[name], schema, txid, key, attempt, "aborted", names, None)
                if held.state == "precommitted":
                    commit, result = True, held.result
                    break
    else:
        if decision is None:
            if coordinator is None:
                done.outcome = "blocked"
                done.detail = (
                    "two-phase commit: only the coordinator's decision log can "
                    "decide; bring the coordinator back, then run eos-airflow recover"
                )
                return done
            if not force:
                done.detail = f"undecided: {waiting}"
                return done
            decision = _abort(
                coordinator, schema, txid, attempt, by, "no decision (presumed abort)"
            )
        commit = decision == "commit"
    finished = [
        name for name in names if finish_prepared(conns[name], gid_of(txid, name), commit=commit)
    ]
    done.outcome = "committed" if commit else "aborted"
    done.detail = (
        f"{'COMMIT' if commit else 'ROLLBACK'} PREPARED on "
        f"{', '.join(finished) or 'no participant (finished before)'}"
    )
    if coordinator is not None:
        if not commit and decision != "abort":
            _abort(coordinator, schema, txid, attempt, by, "participants aborted (3PC)")
        LedgerStore(coordinator, schema).twophase_resolved(
            txid, done.outcome, by, None if result is None else json.dumps(result)
        )
    log.info("transaction %s (%s) %s: %s", txid, key, done.outcome, done.detail)
    return done


def _abort(
    coordinator: psycopg.Connection[Any], schema: str, txid: str, attempt: int, by: str, reason: str
) -> str:
    return LedgerStore(coordinator, schema).twophase_abort(txid, attempt, by, reason)


def finish_for_key(
    coordinator: psycopg.Connection[Any],
    conns: Mapping[str, psycopg.Connection[Any]],
    rows: Sequence[GlobalTransaction],
    key: str,
    *,
    schema: str,
    by: str,
    scan: bool,
    exclude: str | None = None,
) -> list[Resolution]:
    """Finish the key's other transactions that no attempt can decide any more (the caller
    claimed or skipped the key); with ``scan``, also look for them on the participants.

    A transaction is finished as decided, or aborted when it is abandoned (see the query
    ``twophase_abandoned``): its attempt's session is gone or the attempt no longer owns the
    key. The transaction of a live attempt that owns the key -- a newer try that claimed it
    after the caller did, another run's replace -- is left alone: it decides or aborts its own.
    The check runs per transaction right before it is finished, not on the claim's snapshot."""
    store = LedgerStore(coordinator, schema)
    txids = {row.txid: row for row in rows}
    if scan:
        hashed = key_hash(key)
        for conn in conns.values():
            for gid in prepared_on(conn):
                parsed = parse_gid(gid)
                if (
                    parsed is None
                    or parsed.key_hash != hashed
                    or parsed.txid == exclude
                    or parsed.txid in txids
                ):
                    continue
                txids[parsed.txid] = store.twophase_get(parsed.txid) or GlobalTransaction(
                    parsed.txid, parsed.protocol, parsed.attempt
                )
    done = []
    for txid, row in txids.items():
        members = {n: c for n, c in conns.items() if not row.participants or n in row.participants}
        check = store.twophase_abandoned(txid)
        if not check.abandoned:
            done.append(
                Resolution(
                    txid,
                    key,
                    row.protocol,
                    "waiting",
                    sorted(members),
                    "its attempt is alive and owns the key: it decides or "
                    "aborts the transaction itself",
                )
            )
            log.info("transaction %s (%s) left to its live attempt", txid, key)
            continue
        done.append(
            resolve(
                txid,
                protocol=row.protocol,
                conns=members,
                coordinator=coordinator,
                schema=schema,
                decision=check.decision or row.decision,
                key=key,
                attempt=row.attempt,
                force=True,
                by=by,
            )
        )
    return done


class _Participants:
    """Connections to participants by name, opened on first use and closed at the end."""

    def __init__(
        self, given: Mapping[str, Connect], by_conn_id: Callable[[str], Connect] | None
    ) -> None:
        self.given = dict(given)
        self.by_conn_id = by_conn_id
        self.open: dict[tuple[str, str | None], psycopg.Connection[Any]] = {}

    def get(self, name: str, conn_id: str | None) -> psycopg.Connection[Any]:
        slot = (name, None if name in self.given else conn_id)
        if slot not in self.open:
            if name in self.given:
                connect = self.given[name]
            elif conn_id and self.by_conn_id is not None:
                connect = self.by_conn_id(conn_id)
            else:
                raise LookupError(
                    f"participant {name!r} has no Airflow connection id in the decision log; "
                    f"pass --participant {name}=DSN"
                )
            conn = connect()
            conn.autocommit = True
            behind_pooler(conn)  # pooled: no automatic prepared statements
            self.open[slot] = conn
        return self.open[slot]

    def close(self) -> None:
        for conn in self.open.values():
            conn.close()


def recover(
    coordinator: psycopg.Connection[Any],
    *,
    schema: str = "eos",
    participants: Mapping[str, Connect] | None = None,
    by_conn_id: Callable[[str], Connect] | None = None,
    grace: float = DEFAULT_GRACE,
    by: str = "eos-airflow recover",
) -> list[Resolution]:
    """Finish every in-doubt transaction of the coordinator ``coordinator``.

    Participants are found by the Airflow connection ids in the decision log
    (``by_conn_id``), or given by name in ``participants`` (which are also scanned for
    prepared transactions the log has no row for)."""
    store = LedgerStore(coordinator, schema)
    rows = {r.txid: r for r in store.twophase_unresolved()}
    pool = _Participants(participants or {}, by_conn_id)
    now = datetime.now(timezone.utc)
    prepared_at: dict[str, datetime] = {}
    done: list[Resolution] = []
    try:
        for name in sorted(participants or {}):
            for gid, at in prepared_on(pool.get(name, None)).items():
                parsed = parse_gid(gid)
                if parsed is None or parsed.participant != name:
                    continue
                prepared_at[parsed.txid] = min(at, prepared_at.get(parsed.txid, at))
                if parsed.txid not in rows:
                    rows[parsed.txid] = store.twophase_get(parsed.txid) or GlobalTransaction(
                        parsed.txid,
                        parsed.protocol,
                        parsed.attempt,
                        participants={n: {"conn_id": None} for n in participants or {}},
                        created_at=at,
                    )
        _scan_logged_participants(
            coordinator, schema, pool, rows, prepared_at, skip=set(participants or {})
        )
        for txid, row in rows.items():
            members = row.participants or {n: {"conn_id": None} for n in participants or {}}
            try:
                conns = {n: pool.get(n, (info or {}).get("conn_id")) for n, info in members.items()}
            except (LookupError, psycopg.OperationalError, EosError) as exc:
                done.append(
                    Resolution(
                        txid,
                        row.key,
                        row.protocol,
                        "unreachable",
                        sorted(members),
                        str(exc).strip(),
                    )
                )
                continue
            waiting = None
            if row.decision is None:
                waiting = _still_live(
                    coordinator, schema, row, conns, now, grace, prepared_at.get(txid)
                )
            done.append(
                resolve(
                    txid,
                    protocol=row.protocol,
                    conns=conns,
                    coordinator=coordinator,
                    schema=schema,
                    decision=row.decision,
                    key=row.key,
                    attempt=row.attempt,
                    force=waiting is None,
                    by=by,
                    waiting=waiting or "",
                )
            )
    finally:
        pool.close()
    return done


def _scan_logged_participants(
    coordinator: psycopg.Connection[Any],
    schema: str,
    pool: _Participants,
    rows: dict[str, GlobalTransaction],
    prepared_at: dict[str, datetime],
    skip: set[str],
) -> None:
    """Look on every participant the decision log names by Airflow connection id for our
    prepared transactions that the log does not list as unfinished: an attempt that lost its
    coordinator session may PREPARE after recovery decided abort and resolved its txid (it
    found nothing prepared then). Such a transaction is finished as its decision says; one
    without a log row waits out the grace period like any other."""
    if pool.by_conn_id is None:
        return
    store = LedgerStore(coordinator, schema)
    partial: set[str] = set()
    for name, conn_id in ((r.name, r.conn_id) for r in store.twophase_known_participants()):
        if name in skip:
            continue
        try:
            found = prepared_on(pool.get(name, conn_id))
        except (LookupError, psycopg.Error, EosError) as exc:
            log.warning(
                "cannot look for prepared transactions on participant %s (connection id %s): %s",
                name,
                conn_id,
                str(exc).strip(),
            )
            continue
        for gid, at in found.items():
            parsed = parse_gid(gid)
            if parsed is None or parsed.participant != name:
                continue
            prepared_at[parsed.txid] = min(at, prepared_at.get(parsed.txid, at))
            if parsed.txid in rows and parsed.txid not in partial:
                continue
            row = rows.get(parsed.txid) or store.twophase_get(parsed.txid)
            if row is not None and row.participants and parsed.txid not in partial:
                rows[parsed.txid] = row
                continue
            partial.add(parsed.txid)  # the log does not say where it lives: collect that
            row = row or GlobalTransaction(
                parsed.txid, parsed.protocol, parsed.attempt, created_at=at
            )
            rows[parsed.txid] = replace(
                row, participants={**(row.participants or {}), name: {"conn_id": conn_id}}
            )


def _still_live(
    coordinator: psycopg.Connection[Any],
    schema: str,
    row: GlobalTransaction,
    conns: Mapping[str, psycopg.Connection[Any]],
    now: datetime,
    grace: float,
    prepared_at: datetime | None,
) -> str | None:
    """Why an undecided transaction must be left alone, or None when it is abandoned.

    Its attempt is alive while its session holds the claim's lock: it may still decide, and
    aborting it under its feet would fail an effect that no try then writes. Once the
    session is gone it can never decide. The grace period, counted from the earliest
    PREPARE on its participants (from the log entry when nothing is prepared), covers what
    the lock cannot tell: a transaction found on a participant alone names no owner."""
    if row.owner is not None and row.key is not None:
        if LedgerStore(coordinator, schema).owner_alive(row.key, row.owner):
            return (
                "its attempt is alive (its session holds the claim): it decides or aborts "
                "the transaction itself"
            )
    for name, conn in conns.items():
        for at in prepared_on(conn, gid_of(row.txid, name)).values():
            prepared_at = at if prepared_at is None else min(prepared_at, at)
    born = prepared_at or row.created_at
    assert born is not None, "a logged transaction has a creation time"
    age = (now - born).total_seconds()
    if age < grace:
        return f"prepared {age:.0f} s ago, within the grace period of {grace:g} s"
    return None


def terminate(
    participants: Mapping[str, Connect],
    *,
    schema: str = "eos",
    grace: float = DEFAULT_GRACE,
    by: str = "eos-airflow recover --terminate",
) -> list[Resolution]:
    """The 3PC termination protocol, run on the participants alone (coordinator down).

    Pass every participant of the transactions to finish. Three-phase transactions end
    committed (a participant pre-committed) or aborted; two-phase ones are reported
    ``blocked``: they need the coordinator's decision."""
    pool = _Participants(participants, None)
    now = datetime.now(timezone.utc)
    found: dict[str, tuple[str, int, datetime]] = {}
    done: list[Resolution] = []
    try:
        for name in sorted(participants):
            for gid, at in prepared_on(pool.get(name, None)).items():
                parsed = parse_gid(gid)
                if parsed is None or parsed.participant != name:
                    continue
                _, _, oldest = found.get(parsed.txid, (None, None, at))
                found[parsed.txid] = (parsed.protocol, parsed.attempt, min(at, oldest))
        conns = {name: pool.get(name, None) for name in participants}
        for txid, (protocol, attempt, born) in sorted(found.items()):
            done.append(
                resolve(
                    txid,
                    protocol=protocol,
                    conns=conns,
                    coordinator=None,
                    schema=schema,
                    attempt=attempt,
                    force=(now - born).total_seconds() >= grace,
                    by=by,
                )
            )
    finally:
        pool.close()
    return done


__all__ = ["DEFAULT_GRACE", "Resolution", "finish_prepared", "recover", "resolve", "terminate"]
