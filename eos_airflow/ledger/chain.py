"""Ledger tier: the events' hash chain: recompute it independently of the database and check it.

Each key's events form a chain: event ``seq`` stores ``prev_hash`` (the hash of event
``seq - 1``, or 32 zero bytes for the first) and ``hash = SHA-256(prev_hash || canonical)``,
where ``canonical`` is the UTF-8 of key, seq, event, attempt, ``at`` in microseconds since the
epoch and ``detail`` as PostgreSQL's jsonb text, joined by U+001F. The ledger row stores the
chain's head (``event_seq``, ``last_hash``), so deleting a key's newest event is detected too.

Beyond the hashes, the ledger row must agree with what its events say happened: its
``version`` is the number of commits (``committed``/``replaced`` events), its ``state`` is
``committed`` exactly when the last commit was not followed by ``reopened``, its ``attempt``
is the last claim's, and a committed row has a result. Event ids grow along each chain (one
key's events are appended under its row lock), so an edited id is found too.

``ledger gc`` removes a committed key's oldest events: ``pruned_chains`` says where the
remaining chain starts, and the chain's newest ``pruned`` event (hash-chained like every
event) must say the same; so must ``pruned_claims``, the removed claims' highest tries that
fencing reads, and the event's ``claims``. A heads file (:mod:`eos_airflow.ledger.heads`) adds
what the database alone cannot show: that no key's tail or whole history vanished since.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg

from eos_airflow.ledger.store import LedgerStore
from eos_airflow.states import EntryState

GENESIS = bytes(32)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)


def canonical(key: str, seq: int, event: str, attempt: int, at: datetime, detail: str) -> bytes:
    """The bytes hashed for one event (the ledger's ``event_hash`` function computes the same)."""
    at_us = (at - _EPOCH) // _MICROSECOND
    return "\x1f".join((key, str(seq), event, str(attempt), str(at_us), detail)).encode()


def event_hash(prev_hash: bytes, row: dict[str, Any]) -> bytes:
    return hashlib.sha256(
        prev_hash
        + canonical(row["key"], row["seq"], row["event"], row["attempt"], row["at"], row["detail"])
    ).digest()


@dataclass
class Problem:
    """The first place where the chain does not hold."""

    key: str
    seq: int | None
    event_id: int | None
    reason: str

    def __str__(self) -> str:
        where = f"event id {self.event_id} (key {self.key!r}, seq {self.seq})"
        if self.event_id is None:
            where = f"key {self.key!r}"
        return f"{where}: {self.reason}"


@dataclass
class Verification:
    events: int = 0
    keys: int = 0
    problems: list[Problem] = field(default_factory=list)  # the first max_problems of them
    problem_count: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_problem(self) -> Problem | None:
        return self.problems[0] if self.problems else None


#: Event kinds whose effect on the ledger row verify knows; keys with other kinds (added by
#: later protocol features) get the hash checks but not the row-consistency checks.
_KNOWN_KINDS = frozenset(
    {
        "claimed",
        "committed",
        "replaced",
        "skipped",
        "fenced",
        "failed",
        "reopened",
        "pruned",
        "checkpoint",
        "resumed",
        "offsets",
    }
)


@dataclass(frozen=True)
class Entry:
    """What the ledger row says about its key (the part verify checks)."""

    event_seq: int
    last_hash: bytes
    state: str | None = None
    attempt: int | None = None
    version: int | None = None
    has_result: bool | None = None


@dataclass(frozen=True)
class Start:
    """Where a pruned key's remaining chain starts (``pruned_chains``)."""

    through_seq: int
    through_hash: bytes
    versions: int
    #: what gc kept of the removed claims for fencing (``pruned_claims``), sorted:
    #: (dag_id, task_id, run_id, map_index, attempt)
    claims: tuple[tuple[Any, ...], ...] = ()


@dataclass
class _Walk:
    """One key's chain being walked."""

    key: str
    expected_seq: int = 1
    prev: bytes = GENESIS
    last_id: int = 0
    versions: int = 0
    committed: bool = False
    reopened: bool = False
    last_claim: int | None = None
    unknown_kinds: bool = False
    last_pruned: str | None = None

    @classmethod
    def begin(cls, key: str, start: Start | None) -> _Walk:
        if start is None:
            return cls(key)
        return cls(
            key, start.through_seq + 1, start.through_hash, versions=start.versions, committed=True
        )

    def follow(self, event: str, attempt: int, detail: str) -> None:
        if event in ("committed", "replaced"):
            self.versions += 1
            self.committed, self.reopened = True, False
        elif event == "reopened":
            self.committed, self.reopened = False, True
        elif event == "claimed":
            self.last_claim = attempt
            self.reopened = False
        elif event == "pruned":
            self.last_pruned = detail
        elif event not in _KNOWN_KINDS:
            self.unknown_kinds = True


def _entry_problems(walk: _Walk, entry: Entry) -> Iterator[Problem]:
    """Where the ledger row disagrees with what its events say happened."""
    if entry.state is None or walk.unknown_kinds:
        return
    key = walk.key
    if entry.version != walk.versions:
        yield Problem(
            key,
            None,
            None,
            f"ledger row says version {entry.version}, the events record "
            f"{walk.versions} commit(s) (row edited, or commit events removed)",
        )
    expected = "committed" if walk.committed else "reopened" if walk.reopened else None
    if expected is not None and entry.state != expected:
        yield Problem(
            key,
            None,
            None,
            f"ledger row says state {entry.state!r}, the events say {expected!r} (row edited)",
        )
    elif expected is None and entry.state in (EntryState.COMMITTED, EntryState.REOPENED):
        yield Problem(
            key,
            None,
            None,
            f"ledger row says state {entry.state!r}, but no commit "
            "event stands behind it (row edited, or events removed)",
        )
    if walk.last_claim is not None and entry.attempt != walk.last_claim:
        yield Problem(
            key,
            None,
            None,
            f"ledger row says attempt {entry.attempt}, the last "
            f"claim was attempt {walk.last_claim} (row edited)",
        )
    if entry.state == "committed" and not entry.has_result:
        yield Problem(key, None, None, "ledger row is committed but has no result (row edited)")


def _start_problems(walk: _Walk, start: Start | None) -> Iterator[Problem]:
    """A pruned chain's start must be the one its newest ``pruned`` event recorded."""
    if start is None:
        return
    if walk.last_pruned is None:
        yield Problem(
            walk.key,
            start.through_seq,
            None,
            "pruned_chains says events up to this one were removed by gc, but no "
            "`pruned` event records it (table edited, or events removed)",
        )
        return
    recorded = json.loads(walk.last_pruned)
    if (recorded.get("through_seq"), recorded.get("through_hash")) != (
        start.through_seq,
        start.through_hash.hex(),
    ):
        yield Problem(
            walk.key,
            start.through_seq,
            None,
            f"pruned_chains says gc removed events up to {start.through_seq}, the "
            f"newest `pruned` event says {recorded.get('through_seq')} "
            "(table edited, or events removed)",
        )
    claims = _sorted_claims(
        (c.get("dag_id"), c.get("task_id"), c.get("run_id"), c.get("map_index"), c.get("attempt"))
        for c in recorded.get("claims", [])
    )
    if claims != start.claims:
        yield Problem(
            walk.key,
            start.through_seq,
            None,
            "pruned_claims (what gc kept of the removed claims for fencing) differs from "
            "the newest `pruned` event's claims (table edited)",
        )


def _sorted_claims(claims: Iterable[tuple[Any, ...]]) -> tuple[tuple[Any, ...], ...]:
    return tuple(sorted(claims, key=lambda c: tuple((v is None, v) for v in c)))


def check_events(
    rows: Iterable[dict[str, Any]],
    heads: dict[str, tuple[int, bytes]] | None = None,
    *,
    entries: dict[str, Entry] | None = None,
    starts: dict[str, Start] | None = None,
    max_problems: int = 100,
) -> Verification:
    """Check events ordered by (key, seq) against each other and against the ledger rows.

    ``heads`` (key -> (event_seq, last_hash)) checks the chains' heads only; ``entries``
    checks the whole row. ``starts`` gives the start of chains that gc pruned.
    """
    result = Verification()
    problems: list[Problem] = []
    rows_by_key: dict[str, Entry] = dict(entries or {})
    for k, (seq, last) in (heads or {}).items():
        rows_by_key.setdefault(k, Entry(seq, last))
    starts = starts or {}
    walk: _Walk | None = None

    def close_key(done: _Walk) -> None:
        entry = rows_by_key.pop(done.key, None)
        last_seq = done.expected_seq - 1
        if entry is None:
            problems.append(
                Problem(done.key, None, None, "events exist but the ledger row is missing")
            )
            return
        if (entry.event_seq, entry.last_hash) != (last_seq, done.prev):
            problems.append(
                Problem(
                    done.key,
                    entry.event_seq,
                    None,
                    f"ledger row says the chain ends at event {entry.event_seq} with hash "
                    f"{entry.last_hash.hex()[:16]}…, the events end at {last_seq} with "
                    f"{done.prev.hex()[:16]}… (events deleted or appended outside the ledger)",
                )
            )
        problems.extend(_start_problems(done, starts.get(done.key)))
        problems.extend(_entry_problems(done, entry))

    for row in rows:
        if walk is None or row["key"] != walk.key:
            if walk is not None:
                close_key(walk)
            walk = _Walk.begin(row["key"], starts.get(row["key"]))
            result.keys += 1
        key = walk.key
        result.events += 1
        if row["seq"] != walk.expected_seq:
            if row["seq"] > walk.expected_seq:
                missing = (
                    f"events {walk.expected_seq}..{row['seq'] - 1} are missing"
                    if row["seq"] - walk.expected_seq > 1
                    else f"event {walk.expected_seq} is missing"
                )
            else:
                missing = "an event is repeated or reordered"
            problems.append(
                Problem(
                    key,
                    row["seq"],
                    row["id"],
                    f"expected event number {walk.expected_seq} of this key "
                    f"({missing}; an event is missing or reordered)",
                )
            )
        elif bytes(row["prev_hash"]) != walk.prev:
            problems.append(
                Problem(
                    key, row["seq"], row["id"], "prev_hash does not match the previous event's hash"
                )
            )
        elif event_hash(walk.prev, row) != bytes(row["hash"]):
            problems.append(
                Problem(
                    key, row["seq"], row["id"], "hash does not match the event's content (edited)"
                )
            )
        elif row["id"] <= walk.last_id:
            problems.append(
                Problem(
                    key,
                    row["seq"],
                    row["id"],
                    f"event id {row['id']} is not after the previous event's "
                    f"id {walk.last_id} (id edited or events reordered)",
                )
            )
        walk.follow(row["event"], row["attempt"], row["detail"])
        walk.expected_seq, walk.prev = row["seq"] + 1, bytes(row["hash"])
        walk.last_id = row["id"]
    if walk is not None:
        close_key(walk)
    for orphan, entry in sorted(rows_by_key.items()):
        if entry.event_seq > 0 and orphan not in starts:
            problems.append(
                Problem(
                    orphan,
                    entry.event_seq,
                    None,
                    f"ledger row records {entry.event_seq} events but none exist (deleted)",
                )
            )
        elif orphan in starts:
            problems.append(
                Problem(
                    orphan,
                    entry.event_seq,
                    None,
                    f"ledger row records {entry.event_seq} events; gc removed "
                    f"{starts[orphan].through_seq}, the rest are gone (deleted)",
                )
            )
    result.problems = problems[:max_problems]
    result.problem_count = len(problems)
    return result


def _stream(conn: psycopg.Connection[Any], schema: str) -> Iterator[dict[str, Any]]:
    yield from LedgerStore(conn, schema).chain_events()


def load_entries(conn: psycopg.Connection[Any], schema: str) -> dict[str, Entry]:
    return {
        k: Entry(seq, bytes(h), state, attempt, version, has_result)
        for k, seq, h, state, attempt, version, has_result in LedgerStore(
            conn, schema
        ).chain_entries()
    }


def load_starts(conn: psycopg.Connection[Any], schema: str) -> dict[str, Start]:
    return {
        k: Start(through, bytes(h), versions, _sorted_claims(tuple(c) for c in claims))
        for k, through, h, versions, claims in LedgerStore(conn, schema).chain_starts()
    }


def verify(conn: psycopg.Connection[Any], schema: str = "eos") -> Verification:
    """Walk every key's chain in the database and check it against the ledger rows."""
    outermost = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with conn.transaction():  # one snapshot for the rows and the events
        if outermost:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        entries = load_entries(conn, schema)
        starts = load_starts(conn, schema)
        return check_events(_stream(conn, schema), entries=entries, starts=starts)
